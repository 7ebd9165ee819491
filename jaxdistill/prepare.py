"""`python -m jaxdistill.prepare`: images and captions → a TFDS data set of SDXL training inputs.

Every good example of a source (`jaxdistill.sources`: a folder, webdataset tars, a TFDS data set) is
preprocessed, encoded once in JAX — VAE latents (one draw of the latent distribution, scaled, as
diffusers' SDXL training script precomputes them), the 77×(D1+D2) prompt embeddings and the pooled
embedding of SDXL's two text encoders — and written with its six time ids.

Output: a TFDS data set in ArrayRecord files (`tfds.builder_from_directory(OUT)`; random access with
`as_data_source`, no TensorFlow needed; `as_dataset` gives tf.data where TensorFlow is installed), one
file per source shard, plus `jaxdistill_data.json` (how it was made, the latent shape of every example,
what was skipped and why). Work is spread over hosts by source shard (each process its own), batches
over the local devices. Each shard is written to `shards/<name>-<fingerprint>.array_record` and, once
done, gets a progress file `progress/shard-<name>.json` holding its input's fingerprint
(`Source.fingerprint`); it is skipped when the command is run again while that input is unchanged, so an
interrupted run resumes where it stopped, a shard whose input changed is redone, and a source that gained
or lost shards (images added to a folder, another tar downloaded) resumes too: only its new and changed
shards are encoded. When every shard is done, the TFDS file names (`...-00000-of-00012`, in source order)
are linked to the shard files and the metadata written. A resume with other settings (preprocessing,
decode rules, seed, dtypes, pipeline) is refused. A host that cannot open its pipeline or source, see the
settings, read the weights or finish a shard stops every host with one error naming it (`sharding.agreed`);
where a shard failed, the others first finish their own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill import sources as S
from jaxdistill.convert import WeightsError
from jaxdistill.records import atomic_json, changes, describe
from jaxdistill.sharding import (
    agreed,
    attempt,
    gather_failures,
    hold_folder,
    initialize_distributed,
    raise_failures,
)
from jaxdistill.text import TextEncoders, check_pipeline_folder, load_text_encoders
from jaxdistill.vae import VAESpec, encode_latents, load_vae

DATASET_NAME = "jaxdistill_latents"
INFO_NAME = "jaxdistill_data.json"
SPLIT = "train"
_TEMPLATE = "{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}"
STORAGE_DTYPES = ("float16", "float32")
# Bumped when the same settings would write other data: 2 = shard files keyed by name, flip before crop
# (sources.preprocess), tar keys with the tar's name. An older folder is refused, not mixed in.
FORMAT = 3  # 3: the embeddings stored as bytes (as lists of floats, 2, they took 48 ms an SDXL example to write)


class PrepareError(ValueError):
    """An input or setting `prepare` cannot use (a resume with other settings, a pipeline folder without
    its parts, ...): `main` reports it as a usage error, without a traceback."""


@dataclasses.dataclass(eq=False)
class Encoders:
    """SDXL's VAE and two text encoders, loaded from a pipeline folder."""

    vae_spec: VAESpec
    text: TextEncoders
    params: dict  # {"vae": tree, "text": {"text_encoder": tree, "text_encoder_2": tree}}

    @property
    def latent_channels(self) -> int:
        return self.vae_spec.latent_channels

    @property
    def downscale(self) -> int:
        return self.vae_spec.downscale


def load_encoders(pipeline: str | os.PathLike, dtype: str = "float32") -> Encoders:
    """The VAE (`vae/`) and text encoders (`text_encoder[_2]/`, `tokenizer[_2]/`) of a diffusers SDXL
    pipeline folder, computing in `dtype` (SDXL's VAE overflows in float16: use float32 or bfloat16)."""
    vae_spec, vae_params = load_vae(pipeline)
    text = load_text_encoders(pipeline, jnp.dtype(dtype))
    return Encoders(vae_spec, text, {"vae": vae_params, "text": text.params})


def make_encode(encoders: Encoders, dtype: str = "float32") -> Callable[..., dict[str, jax.Array]]:
    """The pure encoding function `(params, pixels [B, H, W, 3] in [-1, 1], ids1 [B, 77], ids2 [B, 77],
    rng) → {latents [B, H/8, W/8, 4], encoder_hidden_states [B, 77, D1+D2], text_embeds [B, P]}`, all
    float32; `rng` None takes the latent distribution's mean. Used by `prepare` and, for on-the-fly
    encoding, inside the train step."""
    spec, text = encoders.vae_spec, encoders.text

    def encode(params, pixels, ids1, ids2, rng=None):
        latents = encode_latents(spec, params["vae"], pixels, rng, dtype=jnp.dtype(dtype))
        context, pooled = text.encode(params["text"], ids1, ids2)
        return {"latents": latents, "encoder_hidden_states": context.astype(jnp.float32),
                "text_embeds": pooled.astype(jnp.float32)}

    return encode


def features(latent_channels: int, seq_len: int, context_dim: int, pooled_dim: int, dtype: str = "float16"):
    """The TFDS features of one prepared example. Latents may differ in shape (aspect-ratio buckets)."""
    import tensorflow_datasets as tfds

    return tfds.features.FeaturesDict({
        "latents": tfds.features.Tensor(shape=(None, None, latent_channels), dtype=np.dtype(dtype),
                                        encoding="bytes"),
        "encoder_hidden_states": tfds.features.Tensor(shape=(seq_len, context_dim), dtype=np.dtype(dtype),
                                                      encoding="bytes"),
        "text_embeds": tfds.features.Tensor(shape=(pooled_dim,), dtype=np.dtype(dtype), encoding="bytes"),
        "time_ids": tfds.features.Tensor(shape=(6,), dtype=np.int32),
        "key": tfds.features.Text(),
        "caption": tfds.features.Text(),
    })


def prepare(source: S.Source, pipeline: str | os.PathLike, out: str | os.PathLike, *,
            prep: S.Preprocessing | None = None, rules: S.DecodeRules | None = None,
            batch_size: int = 16, seed: int = 0, storage_dtype: str = "float16", compute_dtype: str = "float32",
            process_index: int | None = None, process_count: int | None = None,
            progress: bool = True, workers: int = 0) -> dict[str, Any]:
    """Encodes this process's shards of `source` into `out` (skipping shards already done from the same
    input) and, once every shard of every process is done, writes the TFDS metadata. Returns the summary
    (also in INFO_NAME). A pipeline folder without its parts, or `out` holding shards made with other
    settings, raises `PrepareError` before the models load. `workers`: threads decoding images (0: one per
    CPU core, up to 16); the data set is the same for any number."""
    import tensorflow_datasets as tfds
    from tqdm import tqdm

    prep, rules = prep or S.Preprocessing(), rules or S.DecodeRules()
    if not 0 <= seed < 2**32:  # as config.seed: each record's draws are seeded by it (numpy refuses negatives)
        raise PrepareError(f"seed {seed}: expected 0 ≤ seed < 2^32")
    if storage_dtype not in STORAGE_DTYPES:
        raise PrepareError(f"storage dtype {storage_dtype!r}: expected one of {STORAGE_DTYPES}")
    local = jax.local_devices()
    if batch_size < 1 or batch_size % len(local):
        raise PrepareError(f"batch size {batch_size} must be a positive multiple of the {len(local)} local devices")
    pi = jax.process_index() if process_index is None else process_index
    pc = jax.process_count() if process_count is None else process_count

    def open_inputs():  # each host reads its own copy of the pipeline and lists the source itself
        _check_pipeline(pipeline)
        try:
            shards = source.shards()
        except ValueError as e:  # an empty folder: the user's input, not a bug
            raise PrepareError(str(e)) from None
        if not shards:
            raise PrepareError(f"source {source.description} has no shards: nothing to prepare")
        return shards

    all_shards = agreed(open_inputs, "could not open its pipeline or source", error=PrepareError)
    out = Path(out)
    blocked = next((p for p in (out, *out.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise PrepareError(f"--out {out}: {blocked} is a file; give a folder (new, or an earlier prepare's to resume)")
    (out / "progress").mkdir(parents=True, exist_ok=True)
    # one command per --out
    with hold_folder(out, "a jaxdistill.prepare", first=pi == 0, error=PrepareError):
        # No shard count here: a source that gained or lost shards resumes (shard files are keyed by name). The
        # batch size is here: a batch's latent noise is drawn for the batch.
        settings = {"format": FORMAT, "pipeline": os.path.abspath(pipeline), "pipeline_files": _files_digest(pipeline),
                    "source": source.description, "preprocessing": dataclasses.asdict(prep),
                    "rules": dataclasses.asdict(rules), "seed": seed, "batch_size": batch_size,
                    "storage_dtype": storage_dtype, "compute_dtype": compute_dtype}
        _check_settings(out, settings, process_index=pi, process_count=pc)  # before the costly model load
        fingerprints = {s.index: source.fingerprint(s) for s in all_shards}
        encoders = agreed(lambda: load_encoders(pipeline, compute_dtype), "could not read its pipeline's weights",
                          error=PrepareError)
        feats = features(encoders.latent_channels, encoders.text.tokenizers[0].model_max_length,
                         sum(s.hidden_size for s in encoders.text.specs), encoders.text.specs[1].projection_dim,
                         storage_dtype)
        mesh = jax.sharding.Mesh(np.array(local), ("data",))
        data_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        params = jax.device_put(encoders.params, replicated)
        encode = jax.jit(make_encode(encoders, compute_dtype), in_shardings=(replicated, data_sharding, data_sharding,
                                                                             data_sharding, replicated),
                         out_shardings=data_sharding)

        mine = S.shards_for_process(all_shards, pi, pc)
        todo = [s for s in mine if done_record(out, s, fingerprints[s.index]) is None]
        changed = sum(_progress_file(out, s).is_file() for s in todo)
        print(f"prepare: {source.description}: {len(all_shards)} shards, {len(mine)} for process {pi}/{pc}, "
              f"{len(mine) - len(todo)} already done"
              + (f", {changed} redone because their input changed since they were written" if changed else ""))
        bar = tqdm(total=len(todo), unit="shard", disable=not progress, dynamic_ncols=True)
        start = time.perf_counter()

        def encode_mine():
            kept_total, threads = 0, S.decode_workers(workers)

            def show(kept_in_shard: int):  # after every batch: one shard of a large source can take many minutes
                kept = kept_total + kept_in_shard
                bar.set_postfix(examples=kept, rate=f"{kept / (time.perf_counter() - start):.1f}/s")

            for shard in todo:
                kept_total += _prepare_shard(source, shard, out, encoders, params, encode, feats,
                                             prep=prep, rules=rules, batch_size=batch_size, seed=seed,
                                             storage_dtype=storage_dtype, fingerprint=fingerprints[shard.index],
                                             workers=threads, on_batch=show)
                bar.update(1)

        _, failed = attempt(encode_mine)
        bar.close()
        # Every host meets here once its shards are written (or one failed: the others finish theirs, nothing
        # done is lost); one that failed stops all with its reason.
        raise_failures(failed, gather_failures(failed)[0], "could not prepare its shards", error=PrepareError,
                       then=f"prepare: the shards finished in {out} are kept; run the same command to resume.")
        records = [done_record(out, s, fingerprints[s.index]) for s in all_shards]
        missing = [s.name for s, r in zip(all_shards, records, strict=True) if r is None]
        if missing:
            print(f"prepare: {len(missing)} shards not done yet ({', '.join(missing[:5])}...): run again to finish")
            return {"done": False, "missing": missing}
        skips = S.Skips()
        for r in records:
            skips.merge(S.Skips.from_dict(r["skips"]))
        summary = settings | {"done": True, "num_examples": sum(r["examples"] for r in records),
                              "shard_lengths": [r["examples"] for r in records],
                              "shapes": [r["shapes"] for r in records], "skips": skips.to_dict(),
                              "latent_channels": encoders.latent_channels}
        if pi == 0:
            final = [out / _shard_file(i, len(records)) for i in range(len(records))]
            for path in out.glob(f"{DATASET_NAME}-{SPLIT}.array_record-*"):
                if path not in final:  # from a finish with another number of shards
                    path.unlink()
            for r, path in zip(records, final, strict=True):
                _link(out / r["file"], path)
            template = tfds.core.ShardedFileTemplate(data_dir=out, template=_TEMPLATE, dataset_name=DATASET_NAME,
                                                     filetype_suffix="array_record")
            split = tfds.core.SplitInfo(name=SPLIT, shard_lengths=summary["shard_lengths"],
                                        num_bytes=sum(r["bytes"] for r in records), filename_template=template)
            tfds.folder_dataset.write_metadata(data_dir=out, features=feats, split_infos=[split],
                                               filename_template=template, check_data=False,
                                               description="SDXL training inputs prepared by jaxdistill.prepare")
            atomic_json(out / INFO_NAME, summary)
            _note_stale_shards(out, all_shards)
        print(f"prepare: {summary['num_examples']} examples in {out}; {skips.summary()}")
        return summary


def _note_stale_shards(out: Path, shards: Sequence[S.Shard]):
    """Says how much disk the shard files of shards no longer in the source hold (a tar removed, a folder
    prepared again with more --files-per-shard): kept, since a source that has them again reuses them."""
    current = {_progress_file(out, s).name for s in shards}
    stale = [p for p in (out / "progress").glob("shard-*.json") if p.name not in current]
    files = [out / f for f in (json.loads(p.read_text()).get("file", "") for p in stale) if f and (out / f).is_file()]
    if files:
        size = sum(f.stat().st_size for f in files)
        print(f"prepare: note: {len(files)} shard file{'s' * (len(files) > 1)} of shards no longer in the source "
              f"({size / 1e6:,.1f} MB) kept in {out / 'shards'}: a source that has them again reuses them. To free the "
              f"space, delete {', '.join(f.name for f in files[:3])}{' …' if len(files) > 3 else ''} and the progress "
              f"files that name them ({', '.join(p.name for p in stale[:3])}{' …' if len(stale) > 3 else ''})")


def done_record(out: str | os.PathLike, shard: S.Shard, fingerprint: str) -> dict | None:
    """The progress record of a finished shard, or None when the shard is to be (re)done: no progress file,
    one written from other input than `fingerprint` (its ArrayRecord file would hold the wrong examples),
    or one whose ArrayRecord file is gone."""
    out = Path(out)
    path = _progress_file(out, shard)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    ok = record.get("fingerprint") == fingerprint and (out / record.get("file", "")).is_file()
    return record if ok else None


# ---- helpers ------------------------------------------------------------------------------------

def _prepare_shard(source, shard: S.Shard, out: Path, encoders: Encoders, params, encode, feats, *,
                   prep, rules, batch_size: int, seed: int, storage_dtype: str, fingerprint: str,
                   workers: int = 1, on_batch: Callable[[int], None] | None = None) -> int:
    """Encodes one shard into its ArrayRecord file, then writes its progress file (the shard is done).
    Examples are batched by pixel shape (buckets); the latent noise is a function of (seed, shard name,
    batch). The file is named by the shard's name and input fingerprint: the progress file of an earlier
    version of the shard keeps describing its own file until the new one replaces it. `on_batch` is told
    the examples written so far after each batch."""
    from array_record.python.array_record_module import ArrayRecordWriter

    progress = _progress_file(out, shard)
    previous = json.loads(progress.read_text()).get("file") if progress.is_file() else None
    skips = S.Skips()
    rel = f"shards/{_file_stem(shard.name)}-{fingerprint[:16]}.array_record"
    path = out / rel
    path.parent.mkdir(exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    runs: list[list[int]] = []  # run-length encoded latent shapes in write order: [h, w, count]
    # The noise is keyed by the shard's name, not its index: a shard keeps it when shards are added before it.
    name_hash = hashlib.blake2b(shard.name.encode("utf-8", "surrogateescape"), digest_size=4).digest()
    rng = jax.random.fold_in(jax.random.key(seed), int.from_bytes(name_hash, "little") >> 1)  # < 2**31
    batches = 0

    def flush(group: list[S.Example]):
        nonlocal batches
        n = len(group)
        group = group + [group[-1]] * (batch_size - n)  # pad the last batch; the padding is dropped
        ids1, ids2 = encoders.text.tokenize([e.caption for e in group])
        pixels = np.stack([e.pixels for e in group])
        encoded = jax.device_get(encode(params, pixels, ids1, ids2, jax.random.fold_in(rng, batches)))
        batches += 1
        for i, e in enumerate(group[:n]):
            example = {k: np.asarray(v[i], storage_dtype) for k, v in encoded.items()}
            writer.write(feats.serialize_example(example | {"time_ids": e.time_ids, "key": e.key,
                                                            "caption": e.caption}))
            h, w = example["latents"].shape[:2]
            if runs and runs[-1][:2] == [h, w]:
                runs[-1][2] += 1
            else:
                runs.append([h, w, 1])
        if on_batch is not None:
            on_batch(sum(r[2] for r in runs))

    pending: dict[tuple[int, ...], list[S.Example]] = {}
    for example in S.read_examples(source, shard, seed=seed, prep=prep, rules=rules, skips=skips, workers=workers):
        group = pending.setdefault(example.pixels.shape, [])
        group.append(example)
        if len(group) == batch_size:
            flush(pending.pop(example.pixels.shape))
    for group in pending.values():
        flush(group)
    writer.close()
    os.replace(tmp, path)
    count = sum(r[2] for r in runs)
    atomic_json(progress, {"shard": shard.name, "index": shard.index, "fingerprint": fingerprint, "file": rel,
                           "examples": count, "bytes": path.stat().st_size, "shapes": runs, "skips": skips.to_dict()})
    if previous and previous != rel:
        (out / previous).unlink(missing_ok=True)
    return count


def _shard_file(index: int, count: int) -> str:
    """The TFDS name of the index-th of count shard files."""
    return f"{DATASET_NAME}-{SPLIT}.array_record-{index:05d}-of-{count:05d}"


def _file_stem(name: str) -> str:
    """A shard name as a file name ("a/00001" → "a%2F00001"); a long one shortened, made unique by a hash."""
    stem = quote(name, safe="", errors="surrogateescape")
    if len(stem) <= 120:
        return stem
    return f"{stem[:80]}~{hashlib.sha256(name.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}"


def _progress_file(out: Path, shard: S.Shard) -> Path:
    return out / "progress" / f"shard-{_file_stem(shard.name)}.json"  # "shard-": never settings.json


def _link(target: Path, path: Path):
    """Makes `path` name the file `target` (replaced atomically): a hard link, or a relative symbolic
    link where the file system has no hard links."""
    if path.exists() and os.path.samefile(path, target):
        return
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(target, tmp)
    except OSError:
        os.symlink(os.path.relpath(target, path.parent), tmp)
    os.replace(tmp, path)


def _files_digest(pipeline: str | os.PathLike) -> str:
    """A digest of the files `load_encoders` reads (the VAE, text encoders, tokenizers; their contents, ~2 GB
    for SDXL, a few seconds): weights replaced in place (an fp16-fix VAE, the same size) are another pipeline,
    and each host's own copy of the same pipeline is the same one."""
    from jaxdistill.text import ENCODERS

    root, digest = Path(pipeline), hashlib.sha256()
    for part in ("vae", *(name for encoder, tokenizer, _ in ENCODERS for name in (encoder, tokenizer))):
        for f in sorted((root / part).rglob("*")):
            if f.is_file():
                digest.update(f.relative_to(root).as_posix().encode() + b"\0")
                with open(f, "rb") as file:
                    for block in iter(lambda: file.read(1 << 24), b""):
                        digest.update(block)
    return digest.hexdigest()[:16]


def _check_pipeline(pipeline: str | os.PathLike):
    """The parts `load_encoders` reads, checked before anything is written or loaded."""
    try:
        check_pipeline_folder(pipeline)
    except FileNotFoundError as e:
        raise PrepareError(f"pipeline {e}") from None


def _check_settings(out: Path, settings: Mapping[str, Any], *, process_index: int = 0, process_count: int = 1):
    """A resumed run must make the same data set: refuse to mix shards made with other settings. Process 0
    writes the settings of a new data set — also over those of a run that finished no shard (one that failed
    at its start: a retry with mended settings is no mix) —; the others wait for it, then check like a resume."""
    path = out / "progress" / "settings.json"
    settings = json.loads(json.dumps(settings))  # compare as stored: tuples (buckets) come back as lists
    if process_index == 0 and not (path.is_file() and any(path.parent.glob("shard-*.json"))):
        atomic_json(path, settings)
    if process_count > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("jaxdistill.prepare: settings written")

    def compare():  # each host reads the file: one that does not see it (storage not shared) stops all
        if not path.is_file():
            raise PrepareError(f"{path} is missing after process 0 wrote it: is {out} on a file system all hosts "
                               "share?")
        before = json.loads(path.read_text())
        changed = changes(before, settings)
        if changed:
            if before.get("format") != settings.get("format"):  # no settings bring those files back
                raise PrepareError(f"{out} holds shards prepared by an older version of prepare (format "
                                   f"{before.get('format')!r}, now {settings['format']}); prepare into a new --out")
            raise PrepareError(f"{out} holds shards prepared with other settings ({describe(changed)}); use a new "
                               "--out, or rerun with the original settings to resume")

    agreed(compare, f"could not take up the settings of {out}", error=PrepareError)


def main(argv: Sequence[str] | None = None) -> int:
    """Encode an image–caption source into a TFDS data set of SDXL latents, embeddings and time ids."""

    from jaxdistill import cli

    parser = cli.parser("prepare", main.__doc__)
    parser.add_argument("--source", required=True,
                        help="folder:PATH | tar:GLOB | tfds:NAME[:SPLIT] | a path (see jaxdistill.sources)")
    parser.add_argument("--pipeline", required=True, help="diffusers SDXL pipeline folder (vae/, text_encoder*/, "
                                                          "tokenizer*/)")
    parser.add_argument("--out", required=True, help="the TFDS data set folder to write (resumable)")
    parser.add_argument("--resolution", type=int, default=1024,
                        help="a multiple of 8 (the VAE's downscale); SDXL-shaped UNets halve the latents twice, "
                             "so they need a multiple of 32 (the trainer checks)")
    parser.add_argument("--center-crop", action="store_true", help="centre crop (default: random crop)")
    parser.add_argument("--random-flip", action="store_true")
    parser.add_argument("--buckets", action="store_true", help="SDXL aspect-ratio buckets scaled to --resolution")
    parser.add_argument("--min-size", type=int, default=0, help="skip images whose short side is smaller")
    parser.add_argument("--max-pixels", type=int, default=S.DecodeRules().max_pixels)
    parser.add_argument("--batch-size", type=int, default=16, help="per host; a multiple of the local devices")
    parser.add_argument("--storage-dtype", choices=STORAGE_DTYPES, default="float16")
    parser.add_argument("--compute-dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--caption-column", default="text", help="metadata.jsonl/csv caption column (folders)")
    parser.add_argument("--files-per-shard", type=int, default=1000,
                        help="folders: images per shard; hosts share the work by shards, so give a multi-host "
                             "run at least as many shards as hosts")
    parser.add_argument("--image-key", default="image", help="TFDS sources: the image feature (dotted if nested)")
    parser.add_argument("--text-key", default="text", help="TFDS sources: the caption feature (dotted if nested)")
    parser.add_argument("--data-dir", help="TFDS sources: tfds data_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=0,
                        help="threads decoding images (0, the default: one per CPU core, up to 16)")
    parser.add_argument("--distributed", action="store_true",
                        help="jax.distributed.initialize() even where no multi-host environment is detected "
                             "(JAX_COORDINATOR_ADDRESS, SLURM and TPU VM slices are detected without it)")
    args = parser.parse_args(argv)
    if args.resolution < 8 or args.resolution % 8:
        parser.error(f"--resolution {args.resolution}: must be a positive multiple of 8 (the VAE's downscale)")
    if args.files_per_shard < 1:
        parser.error(f"--files-per-shard {args.files_per_shard}: must be at least 1")
    if args.workers < 0:
        parser.error(f"--workers {args.workers}: must be 0 (one per CPU core) or more")
    if args.min_size < 0:
        parser.error(f"--min-size {args.min_size}: must be 0 (keep every image) or more pixels")
    if args.max_pixels < max(args.min_size, 1) ** 2:  # every image would be skipped as too_many_pixels
        parser.error(f"--max-pixels {args.max_pixels}: must be at least --min-size² ({max(args.min_size, 1) ** 2}); "
                     f"the default is {S.DecodeRules().max_pixels}")
    try:
        if not initialize_distributed() and args.distributed:  # as train does; the flag covers other clusters
            jax.distributed.initialize()
    except (ValueError, RuntimeError) as e:  # an incomplete JAX_* description, a task short of its GPUs
        print(f"error: {e}", file=sys.stderr)
        return 1
    kind = args.source.partition(":")[0]
    options = {}
    if kind == "tfds":
        options = {"image_key": args.image_key, "text_key": args.text_key, "data_dir": args.data_dir}
    elif kind == "folder" or (kind not in ("tar", "tfds") and Path(args.source).is_dir()
                              and not list(Path(args.source).glob("*.tar"))):
        options = {"caption_column": args.caption_column, "files_per_shard": args.files_per_shard}
    try:
        source = S.open_source(args.source, **options)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    try:
        buckets = S.sdxl_buckets(args.resolution) if args.buckets else None
    except ValueError as e:
        parser.error(f"--buckets: {e}")
    prep = S.Preprocessing(resolution=args.resolution, center_crop=args.center_crop, random_flip=args.random_flip,
                           buckets=buckets)
    rules = S.DecodeRules(max_pixels=args.max_pixels, min_size=args.min_size)
    # each shard's file is written whole, then named: what a SIGTERM leaves is the finished shards
    stopped = f"prepare stopped; the shards finished in {args.out} are kept: run the same command to resume"
    try:
        with cli.stop_on_sigterm(stopped):
            summary = prepare(source, args.pipeline, args.out, prep=prep, rules=rules, batch_size=args.batch_size,
                              seed=args.seed, storage_dtype=args.storage_dtype, compute_dtype=args.compute_dtype,
                              workers=args.workers)
    except (PrepareError, FileNotFoundError, WeightsError) as e:  # bad settings or pipeline, not a bug
        parser.error(str(e))
    except KeyboardInterrupt:
        print(f"\n{stopped}", file=sys.stderr)
        return 130
    if summary["done"] and not summary["num_examples"]:  # a data set of nothing: the trainer could not use it
        hint = (f"; captions come from a metadata file's {args.caption_column!r} column (--caption-column) or a .txt "
                "beside each image" if summary["skips"]["skipped"].get("caption_missing") else "")
        print(f"prepare: error: no example was kept (the reasons are above){hint}", file=sys.stderr)
        return 1
    return 0 if summary["done"] else 3


if __name__ == "__main__":
    from jaxdistill.prepare import main as _main

    raise SystemExit(_main())
