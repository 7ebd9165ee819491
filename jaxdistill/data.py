"""Training batches: `PreparedLatents` reads a data set written by `python -m jaxdistill.prepare`;
`StreamedImages` decodes an image–caption source for encoding inside the train step; `SyntheticLatents`
generates a small latent set for the tiny config and tests.

All are deterministic in (seed, step): `batch(step)` always returns the same examples, so a resumed run
continues exactly. The position saved with a checkpoint is the step, and for a stream each host's
`state(step)`, which `seek` takes back so that a resume goes on from there without decoding what came
before. Each has an `identity` (a small JSON-able dict to store with a checkpoint: `check_same_data`
refuses a resume onto other data) and a `skip_report()` (the skipped-input summary, once). The prepared
set is read by index (TFDS's ArrayRecord data source: random access, no TensorFlow): every epoch is a
fresh permutation drawn from (seed, epoch), batches never mix latent shapes (aspect-ratio buckets), and
each host reads only its slice of every global batch. Both read the next batch in a background thread
while the current one trains.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from jaxdistill.records import changes, describe
from jaxdistill.spec import UNetSpec

if TYPE_CHECKING:  # sources (Pillow) is imported only where images are read
    from jaxdistill.sources import Example, Skips

INFO_NAME = "jaxdistill_data.json"  # written by jaxdistill.prepare beside the TFDS metadata


def make_data(c, spec: UNetSpec) -> PreparedLatents | StreamedImages | SyntheticLatents:
    """The training data a config asks for (`config.data.source`: "prepared" with `data.path`; "images"
    with a source spec in `data.path`, encoded inside the train step; "synthetic"), this host's slice of
    every batch. A wrong data.path, an empty folder or a bad setting is a ValueError. Cheap — it reads the
    data set's metadata and one batch (prepared) or lists the source and loads the tokenizers (images) —
    so it can run before the models load; it needs only the student's `spec`."""
    import jax

    if c.data.source == "prepared":
        data = PreparedLatents(c.data.path, batch_size=c.batch_size, seed=c.seed,
                               process_index=jax.process_index(), process_count=jax.process_count())
        check_fits(data, spec)
        return data
    if c.data.source == "images":
        from jaxdistill import sources as S
        from jaxdistill.text import check_pipeline_folder, load_tokenizers

        try:
            check_pipeline_folder(c.data.pipeline)
        except FileNotFoundError as e:
            raise ValueError(f"config.data.pipeline={e}") from None

        prep = S.Preprocessing(resolution=c.data.resolution, center_crop=c.data.center_crop,
                               random_flip=c.data.random_flip)
        return StreamedImages(S.open_source(c.data.path), load_tokenizers(c.data.pipeline), prep=prep,
                              batch_size=c.batch_size, seed=c.seed, process_index=jax.process_index(),
                              process_count=jax.process_count(), workers=S.decode_workers(c.data.workers))
    return SyntheticLatents(spec, resolution=c.data.resolution, seq_len=c.data.seq_len,
                            num_examples=c.data.num_examples, batch_size=c.batch_size, seed=c.seed,
                            process_index=jax.process_index(), process_count=jax.process_count())


def shape_groups(shapes: list) -> tuple[list[tuple[int, int]], list[np.ndarray]]:
    """The run-length latent shapes prepare records per shard (`[[[h, w, count], ...], ...]`) → (the
    distinct shapes in sorted order, for each the indices of its examples in ascending order), with numpy
    alone: no Python object per example (a 100M-example set would take minutes and gigabytes)."""
    runs = np.array([run for shard in shapes for run in shard], np.int64).reshape(-1, 3)  # [R, (h, w, count)]
    distinct, run_group = np.unique(runs[:, :2], axis=0, return_inverse=True)
    # example index → its shape's position, in the smallest integer type (a radix sort for few shapes)
    group_of = np.repeat(run_group.reshape(-1).astype(np.min_scalar_type(len(distinct))), runs[:, 2])
    order = np.argsort(group_of, kind="stable")  # stable: each group's indices stay ascending
    bounds = np.cumsum(np.bincount(group_of, minlength=len(distinct)))[:-1]
    return [(int(h), int(w)) for h, w in distinct], np.split(order, bounds) if len(distinct) else []


def check_same_data(saved: dict | None, data: PreparedLatents | StreamedImages | SyntheticLatents) -> None:
    """Refuses to resume onto other data: `saved` is the `identity` a checkpoint stored (None: a checkpoint
    from before identities were stored, not checked). Batches are a function of (seed, step) and of the
    data: on another data set a resumed run would silently read other batches."""
    changed = changes(saved, data.identity) if saved is not None else {}
    if changed:
        raise ValueError(f"the checkpoint was trained on other data than data.path now holds ({describe(changed)}); "
                         "resume with the data it was trained on, or train into a new workdir")


def check_fits(data: PreparedLatents, spec: UNetSpec):
    """Refuses a prepared set whose embeddings or latents do not fit the UNet, naming both sides."""
    example = data.batch(0)
    problems = []
    if example["latents"].shape[-1] != spec.in_channels:
        problems.append(f"latents have {example['latents'].shape[-1]} channels, the UNet takes {spec.in_channels}")
    if example["encoder_hidden_states"].shape[-1] != spec.cross_attention_dim:
        problems.append(f"prompt embeddings are {example['encoder_hidden_states'].shape[-1]}-d, the UNet's "
                        f"cross_attention_dim is {spec.cross_attention_dim}")
    if spec.addition_embed_type == "text_time":
        pooled = spec.projection_class_embeddings_input_dim - 6 * spec.addition_time_embed_dim
        if example["text_embeds"].shape[-1] != pooled:
            problems.append(f"pooled embeddings are {example['text_embeds'].shape[-1]}-d, the UNet expects {pooled}")
    factor = spec.downscale
    bad = sorted({tuple(g) for shard in data.info["shapes"] for *g, _ in shard if g[0] % factor or g[1] % factor})
    if bad:
        problems.append(f"latent shapes {bad} are not divisible by {factor} (the UNet's downsampling)")
    if problems:
        raise ValueError(f"the prepared data set {data.path} (encoded with {data.info.get('pipeline', '?')}) does "
                         "not fit the student UNet: "
                         + "; ".join(problems) + ". Prepare it with the teacher's own pipeline folder.")


class _Indexed:
    """A data set read by index: batch `step` is read directly, so the step is all a resume needs."""

    def skip_report(self, *, final: bool = False) -> str | None:
        """None: nothing to report (prepare reported a prepared set's skips; generated data skips none)."""
        return None

    def state(self, step: int) -> dict | None:
        return None

    def seek(self, step: int, states: list | None) -> None:
        pass


class _ReadAhead:
    """`batch(step)` from `_read(step)`, reading batch `step + 1` in a background thread meanwhile, so
    that the next batch is ready when the step that trains on this one ends."""

    _pool: concurrent.futures.ThreadPoolExecutor | None = None
    _ahead: tuple[int, concurrent.futures.Future] | None = None
    _handed: int | None = None  # the last step `batch` returned (the read-ahead may be a step further)

    def batch(self, step: int, ahead: bool = True) -> dict[str, np.ndarray]:
        """This host's part of global batch `step`; starts reading batch `step + 1` in the background, unless
        not `ahead` (the trainer's last step)."""
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="read-ahead")
        pending, self._ahead = self._ahead, None
        if pending is not None and pending[0] == step:
            out = pending[1].result()
        else:
            if pending is not None:  # one reader at a time: a stream is read in order
                concurrent.futures.wait([pending[1]])
            out = self._read(step)
        self._handed = step
        if ahead:
            self._ahead = (step + 1, self._pool.submit(self._read, step + 1))
        return out


class PreparedLatents(_ReadAhead, _Indexed):
    """Batches of a prepared data set: {latents [b, h, w, 4], encoder_hidden_states [b, 77, D], text_embeds
    [b, P], time_ids [b, 6]} in float32, b = batch_size / process_count (this host's slice). `identity`:
    the number of examples and a digest of the shard lengths and latent shapes the order is drawn from."""

    def __init__(self, path: str | os.PathLike, *, batch_size: int, seed: int = 0, process_index: int = 0,
                 process_count: int = 1):
        import tensorflow_datasets as tfds

        path = Path(path)
        info_file = path / INFO_NAME
        if not info_file.is_file():  # ValueError: a usage error for the trainer, like any other bad setting
            what = "no such folder" if not path.is_dir() else f"no {INFO_NAME}"
            raise ValueError(f"data.path {path} is not a prepared data set ({what}); make one with python -m "
                             "jaxdistill.prepare --source ... --pipeline ... --out DIR and let it finish (it "
                             "resumes), or set data.source=images to encode a folder/tar source on the fly")
        self.path, self.info = path, json.loads(info_file.read_text())
        if batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} must be divisible by the {process_count} processes")
        self.batch_size, self.seed = batch_size, seed
        per_host = batch_size // process_count
        self.host = slice(process_index * per_host, (process_index + 1) * per_host)
        self.source = tfds.builder_from_directory(str(path)).as_data_source(split="train")
        shapes, self.groups = shape_groups(self.info["shapes"])
        total = sum(len(g) for g in self.groups)
        if total != len(self.source):
            raise ValueError(f"{path}: {INFO_NAME} lists {total} examples, the data set has "
                             f"{len(self.source)}; prepare it again into a new folder")
        self.identity = {"source": "prepared", "num_examples": total,
                         "digest": _digest([self.info["shard_lengths"], self.info["shapes"]])}
        self.steps_per_epoch = sum(len(g) // batch_size for g in self.groups)
        if not self.steps_per_epoch:
            raise ValueError(f"{path} has {total} examples in {len(shapes)} latent shapes: no shape has a "
                             f"full batch of {batch_size}; lower batch_size or prepare more data")
        small = {shape: len(g) for shape, g in zip(shapes, self.groups, strict=True) if len(g) < batch_size}
        if small and process_index == 0:  # a batch holds one shape: these examples are never trained on
            print(f"data: {sum(small.values())} of {total} examples are in latent shapes with fewer examples "
                  f"than a batch of {batch_size} and are never read: {small}. Prepare with fewer --buckets "
                  "shapes or more data, or lower batch_size.")
        self._cached: tuple[int, list[np.ndarray]] = (-1, [])

    def __len__(self) -> int:
        return len(self.source)

    def _epoch(self, epoch: int) -> list[np.ndarray]:
        """The batches of one epoch: each shape group permuted and cut into full batches (the remainder
        waits for another epoch's permutation), then the batches shuffled together."""
        cached = self._cached  # one read: the prefetch thread may replace it meanwhile
        if cached[0] != epoch:
            cached = self._cached = (epoch, self._make_epoch(epoch))
        return cached[1]

    def _make_epoch(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for group in self.groups:
            order = rng.permutation(group)
            batches += [order[i:i + self.batch_size] for i in range(0, len(order) - self.batch_size + 1,
                                                                     self.batch_size)]
        return [batches[i] for i in rng.permutation(len(batches))]

    def indices(self, step: int) -> np.ndarray:
        """Example indices of global batch `step` (all hosts)."""
        epoch, offset = divmod(step, self.steps_per_epoch)
        return self._epoch(epoch)[offset]

    def _read(self, step: int, whole: bool = False) -> dict[str, np.ndarray]:
        indices = self.indices(step) if whole else self.indices(step)[self.host]
        try:
            records = self.source.__getitems__(indices.tolist())
        except Exception as e:  # array_record's RuntimeError for a damaged chunk, OSError for a lost file
            raise ValueError(f"data.path {self.path}: cannot read examples {indices.tolist()} ({type(e).__name__}: "
                             f"{str(e)[:300]}): a damaged or incomplete copy of the data set? copy it again, or "
                             "prepare it again into a new folder") from e
        return {k: np.stack([np.asarray(r[k], np.float32) for r in records])
                for k in ("latents", "encoder_hidden_states", "text_embeds", "time_ids")}

    def validation_batch(self) -> dict[str, np.ndarray]:
        """A fixed batch for monitoring, the same on every host (all of global batch 10⁶: beyond any run)."""
        return self._read(10**6, whole=True)


class StreamedImages(_ReadAhead):
    """Pixels and token ids straight from an image–caption source, for encoding inside the train step
    (`config.data.source = "images"`): {pixels [b, H, W, 3], input_ids [b, 77], input_ids_2 [b, 77],
    time_ids [b, 6]}, b = batch_size / process_count.

    Every epoch reads the shards in an order drawn from (seed, epoch), the records of each shard in an
    order drawn from (seed, epoch, shard) (a folder's are permuted; a tar's go through a shuffle buffer),
    and draws each example's crop, flip and caption choice from (seed, key, epoch). Every host reads the
    same order and takes every process_count-th record of each shard (decoding only its own), so one
    shard is enough for any number of hosts. `batch(step)` continues the stream; any other step (a
    resumed run) goes on from the position `seek` gives it (`state(step)` of the run that saved the
    checkpoint): the records before it are passed over undecoded (a tar's are still read through its
    shuffle buffer). Without one (a checkpoint saved on another number of hosts) the stream is replayed
    from the start, decoding the images it skips: exact all the same, but its cost grows with the step.

    Opening it lists the source (a folder's files are walked) and checks it has shards: a wrong path or
    an empty folder is a ValueError here, before any reading.
    """

    def __init__(self, source, tokenizers, *, prep, batch_size: int, seed: int = 0, process_index: int = 0,
                 process_count: int = 1, rules=None, workers: int = 1):
        from jaxdistill import sources as S

        if batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} must be divisible by the {process_count} processes")
        self.source, self.tokenizers, self.prep = source, tokenizers, prep
        self.rules = rules or S.DecodeRules()
        self.per_host, self.seed, self.workers = batch_size // process_count, seed, workers
        self.host = (process_index, process_count)
        self.shards = source.shards()
        if not self.shards:
            raise ValueError(f"{source.description}: no shards (an empty split?); give a source with images")
        # as a checkpoint stores it (JSON: bucket tuples become lists), so that it compares equal
        self.identity = json.loads(json.dumps({
            "source": source.description, "seed": seed, "shards": _digest([[s.name, s.size] for s in self.shards]),
            "preprocessing": dataclasses.asdict(prep), "rules": dataclasses.asdict(self.rules)}))
        self.skips = S.Skips()  # this host's records of the first epoch
        self._first_epoch_read, self._reported = False, False
        self._stream, self._next = None, None
        # The reader thread alone moves the stream; the training loop sees it through these snapshots.
        self._at = _START  # where the stream stands: after the last example it gave
        self._before: dict[int, dict] = {}  # step → the state before its batch, for the latest steps
        self._read_so_far: dict[int, tuple[bool, dict]] = {}  # step → (first epoch read, its skips) after its batch
        self._seek: tuple[int, dict] | None = None  # (step, a checkpoint's state at it)

    def epoch_examples(self, epoch: int, skips: Skips | None = None) -> Iterator[Example]:
        """This host's good examples of one epoch, in order (`sources.Example`s); skips counted in `skips`."""
        return (ex for ex, _ in self._epoch(epoch, skips))

    def _epoch(self, epoch: int, skips: Skips | None, shard: int = 0, taken: int = 0
               ) -> Iterator[tuple[Example, tuple[int, int]]]:
        """(example, (its shard's place in the epoch, records of this host's share of that shard read)) from
        the place `shard`, after its first `taken` records, which are passed over undecoded."""
        from jaxdistill import sources as S

        index, count = self.host
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        for k in range(shard, len(order)):
            shard_k = self.shards[order[k]]
            skip = taken if k == shard else 0
            # start rotates with the shard's place in the epoch: the hosts' shares of records differ by
            # at most one per shard, and that one does not always fall to the same host
            records = S.shuffled_records(self.source, shard_k, np.random.default_rng([self.seed, epoch, shard_k.index]),
                                         start=(index - k) % count, step=count, skip=skip)
            examples = S.process_records(records, seed=self.seed, prep=self.prep, rules=self.rules, skips=skips,
                                         epoch=epoch, workers=self.workers)
            for read, ex in enumerate(examples, skip + 1):
                if ex is not None:
                    yield ex, (k, read)

    def _open(self, at: dict) -> Iterator[tuple[Example, dict]]:
        """The stream from position `at` on, with the first epoch's skips counted up to it."""
        from jaxdistill import sources as S

        self.skips, self._first_epoch_read = S.Skips.from_dict(at["skips"]), at["epoch"] > 0
        self._at = at
        return self._examples(at["epoch"], at["shard"], at["taken"])

    def _examples(self, epoch: int, shard: int, taken: int) -> Iterator[tuple[Example, dict]]:
        from jaxdistill import sources as S

        found = (shard, taken) != (0, 0)  # a position inside an epoch comes after one of its examples
        while True:
            skips = self.skips if epoch == 0 else S.Skips()  # the first epoch only: later ones repeat it
            for ex, (k, read) in self._epoch(epoch, skips, shard, taken):
                found = True
                yield ex, {"epoch": epoch, "shard": k, "taken": read}
            if not found:
                raise ValueError(f"{self.source.description}: no usable example for process {self.host[0]} of "
                                 f"{self.host[1]} ({skips.summary()}); check the images and captions, or give "
                                 "more data")
            if epoch == 0:
                self._first_epoch_read = True
            epoch, shard, taken, found = epoch + 1, 0, 0, False

    def skip_report(self, *, final: bool = False) -> str | None:
        """The summary of the inputs this host skipped in its first epoch (`sources.Skips.summary()`), once:
        as soon as that epoch has been read — call it after every step — or, with `final` (at the end of a
        run), what was counted of it so far. None before that, and after it was given once. Later epochs
        are not counted again; a resumed run counts on from its checkpoint (or its replay)."""
        from jaxdistill import sources as S

        # as of the batch handed out, not the one the background thread may already have read after it
        if self._reported or self._handed not in self._read_so_far:
            return None
        whole, skips = self._read_so_far[self._handed]
        if not (whole or final):
            return None
        self._reported = True
        return S.Skips.from_dict(skips).summary() + ("" if whole else "\n  (of the part of the first epoch read)")

    def state(self, step: int) -> dict | None:
        """Where this host's stream stood before batch `step` (JSON-able; None unless that batch is the last
        one asked for, the one read ahead or the one after the last read): what a checkpoint at `step` stores."""
        return self._before.get(step)

    def seek(self, step: int, states: list | None) -> None:
        """Makes `batch(step)` go on from this host's entry of `states` (every host's `state(step)`, as a
        checkpoint stores them), not replay the stream. None, or states of another number of hosts: the
        stream is replayed, and this says so."""
        if states is not None and len(states) == self.host[1] and states[self.host[0]] is not None:
            self._seek = (step, states[self.host[0]])
        elif step and self.host[0] == 0:
            why = (f"it was saved by {len(states)} process{'es' * (len(states) != 1)}, this run has {self.host[1]}"
                   if states and len(states) != self.host[1] else "it holds no stream position")
            print(f"data: the checkpoint cannot say where the stream of images stands ({why}): replaying it up to "
                  f"step {step}, decoding the {step * self.per_host * self.host[1]:,} images it skips")

    def _read(self, step: int) -> dict[str, np.ndarray]:
        if self._next != step:  # a fresh start or a resume
            if self._seek and self._seek[0] == step:
                self._stream = self._open(self._seek[1])
            else:  # replay the stream up to `step`
                self._stream = self._open(_START)
                for _ in range(step * self.per_host):
                    self._at = next(self._stream)[1]
            self._next = step
        kept = {k: v for k, v in self._before.items() if k >= step - 1}  # the batch asked for, and this one
        self._before = kept | {step: self._at | {"skips": _copy(self.skips)}}
        examples, self._next = [], None  # a batch that fails to read opens the stream again
        for _ in range(self.per_host):
            example, self._at = next(self._stream)
            examples.append(example)
        self._next = step + 1
        # also the place before the next batch: a checkpoint after the last step, whose next batch is not read
        # ahead, holds it too
        self._before = self._before | {step + 1: self._at | {"skips": _copy(self.skips)}}
        self._read_so_far = {k: v for k, v in self._read_so_far.items() if k >= step - 1} | {
            step: (self._first_epoch_read, _copy(self.skips))}
        from jaxdistill.text import tokenize

        ids = tokenize(self.tokenizers, [e.caption for e in examples])
        return {"pixels": np.stack([e.pixels for e in examples]), "input_ids": ids[0], "input_ids_2": ids[1],
                "time_ids": np.stack([e.time_ids for e in examples]).astype(np.float32)}

    def validation_batch(self) -> dict[str, np.ndarray]:
        """A fixed batch for monitoring: the first of the stream (read apart from the training stream; not
        by `batch`, which would read the next one ahead)."""
        return StreamedImages(self.source, self.tokenizers, prep=self.prep, batch_size=self.per_host,
                              seed=self.seed, rules=self.rules, workers=self.workers)._read(0)


_START = {"epoch": 0, "shard": 0, "taken": 0, "skips": {}}  # a stream's position before its first example


def _copy(skips: Skips) -> dict:  # a snapshot: the counters go on counting
    return json.loads(json.dumps(skips.to_dict()))


class SyntheticLatents(_Indexed):
    """A small generated data set in latent space: `num_classes` smooth prototype patterns (each with its
    own caption embedding, pooled embedding and SDXL size/crop time ids), every example a prototype plus
    smooth variation. A diffusion model can learn it in minutes on a CPU, so a tiny teacher trained on it
    is a real denoiser with something to distil."""

    def __init__(self, spec: UNetSpec, *, resolution: int = 128, seq_len: int = 8, num_examples: int = 64,
                 num_classes: int = 8, batch_size: int = 8, seed: int = 0, process_index: int = 0,
                 process_count: int = 1):
        rng = np.random.default_rng(seed)
        if batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} must be divisible by the {process_count} processes")
        per_host = batch_size // process_count
        self.host = slice(process_index * per_host, (process_index + 1) * per_host)
        side = resolution // 8
        if side % spec.downscale:
            raise ValueError(f"data.resolution={resolution}: the latent side {side} must be divisible by "
                             f"{spec.downscale} for this UNet")
        self.batch_size, self.seed, self.num_examples = batch_size, seed, num_examples
        self.identity = {"source": "synthetic", "seed": seed, "num_examples": num_examples,
                         "num_classes": num_classes, "resolution": resolution, "seq_len": seq_len}
        coarse = rng.standard_normal((num_classes, 4, 4, spec.in_channels)).astype(np.float32)
        prototypes = _upsample(coarse, side)
        labels = rng.integers(0, num_classes, num_examples)
        variation = _upsample(rng.standard_normal((num_examples, 8, 8, spec.in_channels)).astype(np.float32), side)
        self.latents = (prototypes[labels] + 0.2 * variation).astype(np.float32)
        self.latents /= self.latents.std()
        context = rng.standard_normal((num_classes, seq_len, spec.cross_attention_dim)).astype(np.float32)
        self.encoder_hidden_states = context[labels]
        self.time_ids = np.tile(np.array([resolution, resolution, 0, 0, resolution, resolution], np.float32),
                                (num_examples, 1))
        if spec.addition_embed_type == "text_time":
            pooled_dim = spec.projection_class_embeddings_input_dim - 6 * spec.addition_time_embed_dim
            self.text_embeds = rng.standard_normal((num_classes, pooled_dim)).astype(np.float32)[labels]

    def validation_batch(self) -> dict[str, np.ndarray]:
        """A fixed batch for monitoring, the same on every host (all of global batch 10⁶: beyond any run)."""
        return self.batch(10**6, whole=True)

    def batch(self, step: int, ahead: bool = True, whole: bool = False) -> dict[str, np.ndarray]:
        """This host's part of global batch `step` (`whole`: all of it): a fresh permutation every epoch.
        Generated in memory: nothing to read ahead (`ahead` is for the readers of files)."""
        per_epoch = max(self.num_examples // self.batch_size, 1)
        epoch, offset = divmod(step, per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
        index = np.resize(order[offset * self.batch_size:], self.batch_size)
        index = index if whole else index[self.host]
        out = {"latents": self.latents[index], "encoder_hidden_states": self.encoder_hidden_states[index],
               "time_ids": self.time_ids[index]}
        if hasattr(self, "text_embeds"):
            out["text_embeds"] = self.text_embeds[index]
        return out


def _digest(parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _upsample(x: np.ndarray, side: int) -> np.ndarray:
    """Smooth upsampling [N, h, w, C] → [N, side, side, C] (bilinear via two 1-D interpolations)."""
    n, h, w, c = x.shape
    ys, xs = np.linspace(0, h - 1, side), np.linspace(0, w - 1, side)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[None, :, None, None], (xs - x0)[None, None, :, None]
    rows = x[:, y0] * (1 - fy) + x[:, y1] * fy
    return rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx
