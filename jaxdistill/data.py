"""Training batches: `PreparedLatents` reads a data set written by `python -m jaxdistill.prepare`;
`SyntheticLatents` generates a small latent set for the tiny config and tests.

Both are deterministic in (seed, step): `batch(step)` always returns the same examples, so a resumed run
continues exactly, and the position saved with a checkpoint is the step. The prepared set is read by
index (TFDS's ArrayRecord data source: random access, no TensorFlow): every epoch is a fresh permutation
drawn from (seed, epoch), batches never mix latent shapes (aspect-ratio buckets), and each host reads
only its slice of every global batch. The next batch is read in a background thread while the current
one trains.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
from pathlib import Path

import numpy as np

from jaxdistill.spec import UNetSpec

INFO_NAME = "jaxdistill_data.json"  # written by jaxdistill.prepare beside the TFDS metadata


def make_data(c, spec: UNetSpec) -> PreparedLatents | StreamedImages | SyntheticLatents:
    """The training data a config asks for (`config.data.source`: "prepared" with `data.path`; "images"
    with a source spec in `data.path`, encoded inside the train step; "synthetic"), this host's slice of
    every batch."""
    import jax

    if c.data.source == "prepared":
        data = PreparedLatents(c.data.path, batch_size=c.batch_size, seed=c.seed,
                               process_index=jax.process_index(), process_count=jax.process_count())
        check_fits(data, spec)
        return data
    if c.data.source == "images":
        from jaxdistill import sources as S
        from jaxdistill.text import load_tokenizers

        prep = S.Preprocessing(resolution=c.data.resolution, center_crop=c.data.center_crop,
                               random_flip=c.data.random_flip)
        return StreamedImages(S.open_source(c.data.path), load_tokenizers(c.data.pipeline), prep=prep,
                              batch_size=c.batch_size, seed=c.seed, process_index=jax.process_index(),
                              process_count=jax.process_count())
    return SyntheticLatents(spec, resolution=c.data.resolution, seq_len=c.data.seq_len,
                            num_examples=c.data.num_examples, batch_size=c.batch_size, seed=c.seed,
                            process_index=jax.process_index(), process_count=jax.process_count())


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
    factor = 2 ** (spec.num_blocks - 1)
    bad = sorted({tuple(g) for shard in data.info["shapes"] for *g, _ in shard if g[0] % factor or g[1] % factor})
    if bad:
        problems.append(f"latent shapes {bad} are not divisible by {factor} (the UNet's downsampling)")
    if problems:
        raise ValueError(f"the prepared data set {data.path} (encoded with {data.info.get('pipeline', '?')}) does "
                         "not fit the student UNet: "
                         + "; ".join(problems) + ". Prepare it with the teacher's own pipeline folder.")


class PreparedLatents:
    """Batches of a prepared data set: {latents [b, h, w, 4], encoder_hidden_states [b, 77, D], text_embeds
    [b, P], time_ids [b, 6]} in float32, b = batch_size / process_count (this host's slice)."""

    def __init__(self, path: str | os.PathLike, *, batch_size: int, seed: int = 0, process_index: int = 0,
                 process_count: int = 1):
        import tensorflow_datasets as tfds

        path = Path(path)
        info_file = path / INFO_NAME
        if not info_file.is_file():
            raise FileNotFoundError(f"{path} is not a prepared data set (no {INFO_NAME}); make one with "
                                    "python -m jaxdistill.prepare --source ... --pipeline ... --out DIR, and let it "
                                    "finish (it resumes)")
        self.path, self.info = path, json.loads(info_file.read_text())
        if batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} must be divisible by the {process_count} processes")
        self.batch_size, self.seed = batch_size, seed
        per_host = batch_size // process_count
        self.host = slice(process_index * per_host, (process_index + 1) * per_host)
        self.source = tfds.builder_from_directory(str(path)).as_data_source(split="train")
        # example index → latent shape, from the run-length shapes prepare recorded per shard
        shapes = [tuple(run[:2]) for shard in self.info["shapes"] for run in shard for _ in range(run[2])]
        if len(shapes) != len(self.source):
            raise ValueError(f"{path}: {INFO_NAME} lists {len(shapes)} examples, the data set has "
                             f"{len(self.source)}; prepare it again into a new folder")
        groups: dict[tuple[int, int], list[int]] = {}
        for i, shape in enumerate(shapes):
            groups.setdefault(shape, []).append(i)
        self.groups = [np.asarray(groups[k]) for k in sorted(groups)]
        self.steps_per_epoch = sum(len(g) // batch_size for g in self.groups)
        if not self.steps_per_epoch:
            raise ValueError(f"{path} has {len(shapes)} examples in {len(groups)} latent shapes: no shape has a "
                             f"full batch of {batch_size}; lower batch_size or prepare more data")
        small = {k: len(v) for k, v in sorted(groups.items()) if len(v) < batch_size}
        if small and process_index == 0:  # a batch holds one shape: these examples are never trained on
            print(f"data: {sum(small.values())} of {len(shapes)} examples are in latent shapes with fewer examples "
                  f"than a batch of {batch_size} and are never read: {small}. Prepare with fewer --buckets "
                  "shapes or more data, or lower batch_size.")
        self._pool = concurrent.futures.ThreadPoolExecutor(1)
        self._ahead: tuple[int, concurrent.futures.Future] | None = None
        self._cached: tuple[int, list[np.ndarray]] = (-1, [])

    def __len__(self) -> int:
        return len(self.source)

    def _epoch(self, epoch: int) -> list[np.ndarray]:
        """The batches of one epoch: each shape group permuted and cut into full batches (the remainder
        waits for another epoch's permutation), then the batches shuffled together."""
        if self._cached[0] != epoch:
            self._cached = (epoch, self._make_epoch(epoch))
        return self._cached[1]

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
        records = self.source.__getitems__(indices.tolist())
        return {k: np.stack([np.asarray(r[k], np.float32) for r in records])
                for k in ("latents", "encoder_hidden_states", "text_embeds", "time_ids")}

    def validation_batch(self) -> dict[str, np.ndarray]:
        """A fixed batch for monitoring, the same on every host (all of global batch 10⁶: beyond any run)."""
        return self._read(10**6, whole=True)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This host's part of global batch `step`; starts reading batch `step + 1` in the background."""
        if self._ahead is not None and self._ahead[0] == step:
            out = self._ahead[1].result()
        else:
            out = self._read(step)
        self._ahead = (step + 1, self._pool.submit(self._read, step + 1))
        return out


class StreamedImages:
    """Pixels and token ids straight from an image–caption source, for encoding inside the train step
    (`config.data.source = "images"`): {pixels [b, H, W, 3], input_ids [b, 77], input_ids_2 [b, 77],
    time_ids [b, 6]}. Each host streams its own shards, in an order drawn from (seed, epoch); crops and
    flips are functions of (seed, key). `batch(step)` continues the stream; any other step (a resumed
    run) replays the stream from the start, decoding the images it skips: exact, but its cost grows
    with the position — for long runs prepare the data set once instead."""

    def __init__(self, source, tokenizers, *, prep, batch_size: int, seed: int = 0, process_index: int = 0,
                 process_count: int = 1, rules=None):
        from jaxdistill import sources as S

        if batch_size % process_count:
            raise ValueError(f"batch_size {batch_size} must be divisible by the {process_count} processes")
        self.source, self.tokenizers, self.prep = source, tokenizers, prep
        self.rules = rules or S.DecodeRules()
        self.per_host, self.seed = batch_size // process_count, seed
        self.host = (process_index, process_count)
        self.skips = S.Skips()
        self._stream, self._next = None, None

    def _examples(self):
        from jaxdistill import sources as S

        shards = S.shards_for_process(self.source.shards(), *self.host)
        if not shards:
            raise ValueError(f"{self.source.description}: no shards for process {self.host[0]} of {self.host[1]}")
        epoch = 0
        while True:
            found = False
            for i in np.random.default_rng([self.seed, epoch]).permutation(len(shards)):
                for ex in S.read_examples(self.source, shards[i], seed=self.seed, prep=self.prep, rules=self.rules,
                                          skips=self.skips):
                    found = True
                    yield ex
            if not found:
                raise ValueError(f"{self.source.description}: no usable example in this host's shards "
                                 f"({self.skips.summary()})")
            epoch += 1

    def batch(self, step: int) -> dict[str, np.ndarray]:
        if self._next != step:  # a fresh start or a resume: replay the stream up to `step`
            self._stream, self._next = self._examples(), 0
            for _ in range(step * self.per_host):
                next(self._stream)
            self._next = step
        examples = [next(self._stream) for _ in range(self.per_host)]
        self._next = step + 1
        from jaxdistill.text import tokenize

        ids = tokenize(self.tokenizers, [e.caption for e in examples])
        return {"pixels": np.stack([e.pixels for e in examples]), "input_ids": ids[0], "input_ids_2": ids[1],
                "time_ids": np.stack([e.time_ids for e in examples]).astype(np.float32)}

    def validation_batch(self) -> dict[str, np.ndarray]:
        """A fixed batch for monitoring: the first of the stream (read apart from the training stream)."""
        return StreamedImages(self.source, self.tokenizers, prep=self.prep, batch_size=self.per_host,
                              seed=self.seed, rules=self.rules).batch(0)


class SyntheticLatents:
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
        if side % 2 ** (spec.num_blocks - 1):
            raise ValueError(f"data.resolution={resolution}: the latent side {side} must be divisible by "
                             f"{2 ** (spec.num_blocks - 1)} for this UNet")
        self.batch_size, self.seed, self.num_examples = batch_size, seed, num_examples
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

    def batch(self, step: int, whole: bool = False) -> dict[str, np.ndarray]:
        """This host's part of global batch `step` (`whole`: all of it): a fresh permutation every epoch."""
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


def _upsample(x: np.ndarray, side: int) -> np.ndarray:
    """Smooth upsampling [N, h, w, C] → [N, side, side, C] (bilinear via two 1-D interpolations)."""
    n, h, w, c = x.shape
    ys, xs = np.linspace(0, h - 1, side), np.linspace(0, w - 1, side)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[None, :, None, None], (xs - x0)[None, None, :, None]
    rows = x[:, y0] * (1 - fy) + x[:, y1] * fy
    return rows[:, :, x0] * (1 - fx) + rows[:, :, x1] * fx
