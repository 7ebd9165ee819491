"""Image–caption sources and SDXL preprocessing: read pairs from a folder, webdataset tars or a TFDS data
set, decode them under stated rules for bad input, and resize/crop them into the pixels and time ids the
SDXL UNet is trained on — the way diffusers' `train_text_to_image_sdxl.py` does.

What this is for: the input side of `prepare` (VAE latents and text embeddings written as TFDS shards). It
does no encoding, no batching and no writing: it yields one `Example` (pixels in [-1, 1], six time ids,
a caption) per good input and counts every input it skips, by reason.

Work is cut into *shards* (one tar file, a chunk of a folder's files, a slice of a TFDS split) so that a
long run can be spread over hosts and resumed: `shards_for_process(source.shards(), index, count)` takes
this host's share, `Shard.name` is stable for unchanged input, so finished shards can be marked done, and
`source.fingerprint(shard)` changes when the shard's input does (a file added, rewritten or re-downloaded),
so a done-marker can tell that it is stale. Training on the fly (`data.StreamedImages`) reads a shard with
`shuffled_records` instead (a random order, one host's share of it) and passes the epoch to
`process_record`, so crops and flips are drawn again every epoch.

    source = open_source("tar:/data/laion/*.tar")           # or "folder:/imgs", "tfds:name[:split]", a path
    skips = Skips()
    for shard in shards_for_process(source.shards(), jax.process_index(), jax.process_count()):
        for ex in read_examples(source, shard, seed=0, prep=Preprocessing(resolution=1024), skips=skips):
            ex.pixels      # [H, W, 3] float32 in [-1, 1]; H = W = resolution unless buckets are on
            ex.time_ids    # [6] int32: original_h, original_w, crop_top, crop_left, target_h, target_w
            ex.caption     # str
    print(skips.summary())

Bad input never raises: each skipped record is counted under one reason (`REASONS`), with a few example
keys. The rules, in the order they are checked:

    record-level   missing_image, read_error, duplicate_key, split_sample, bad_metadata, bad_tar (see the sources)
    caption        caption_missing (no .txt / no column / None), caption_not_text (not str/bytes/list),
                   caption_not_utf8 (bytes that are not valid UTF-8: skipped, not guessed at — a latin-1
                   fallback would turn other encodings into mojibake), caption_empty (empty after strip)
    image bytes    empty_file (0 bytes), not_an_image (Pillow cannot identify it), corrupt (header or pixel
                   data unreadable), truncated (pixel data ends early; Pillow's LOAD_TRUNCATED_IMAGES is
                   left off so these are not silently grey-filled)
    image size     too_many_pixels (width*height > max_pixels, checked from the header before decoding;
                   Pillow's own DecompressionBombError counts here too), too_small (short side < min_size;
                   default 0 = keep and upscale, as diffusers does), extreme_aspect (long/short > max_aspect:
                   resizing the short side to the resolution would blow up memory)
    image mode     unsupported_mode (a mode Pillow cannot convert to RGB, e.g. LAB)
    anything else  error:<ExceptionType> (a bug or an unforeseen input; counted, never raised)

Colour rules (`to_rgb`): EXIF orientation is applied first (as 🤗 datasets' Image feature does); alpha
(RGBA, LA, PA, P or L/RGB with a transparency entry) is composited on white; 16-bit (I;16*, and I, taken as
16-bit since that is where Pillow puts 16-bit PNG/TIFF data) is scaled by 255/65535 with rounding, not
clipped, a 16-bit transparent value kept; F (float) is taken as [0, 1] when its maximum is <= 1, else as
[0, 255] (uint16 and float arrays alike); CMYK, L, 1, P and the rest go through Pillow's
`convert("RGB")`. ICC profiles are ignored (diffusers ignores them too).
"""

from __future__ import annotations

import concurrent.futures
import csv
import glob
import hashlib
import io
import itertools
import json
import math
import os
import posixpath
import re
import tarfile
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
SHUFFLE_BUFFER = 1000  # records held to shuffle a shard read in one pass (a tar)
METADATA_FILES = ("metadata.jsonl", "metadata.csv")

REASONS = (
    "missing_image", "read_error", "duplicate_key", "split_sample", "bad_metadata", "bad_tar",
    "caption_missing", "caption_not_text", "caption_not_utf8", "caption_empty",
    "empty_file", "not_an_image", "corrupt", "truncated", "too_many_pixels", "too_small", "extreme_aspect",
    "unsupported_mode",
)

# SDXL's multi-aspect training buckets, (height, width), ~1024² pixels each in steps of 64: the table in
# the SDXL paper's appendix (Podell et al. 2023, "Multi-aspect training"), aspect h/w from 0.25 to 4.
SDXL_BUCKETS_1024 = (
    (512, 2048), (512, 1984), (512, 1920), (512, 1856), (576, 1792), (576, 1728), (576, 1664), (640, 1600),
    (640, 1536), (704, 1472), (704, 1408), (704, 1344), (768, 1344), (768, 1280), (832, 1216), (832, 1152),
    (896, 1152), (896, 1088), (960, 1088), (960, 1024), (1024, 1024), (1024, 960), (1088, 960), (1088, 896),
    (1152, 896), (1152, 832), (1216, 832), (1280, 768), (1344, 768), (1408, 704), (1472, 704), (1536, 640),
    (1600, 640), (1664, 576), (1728, 576), (1792, 576), (1856, 512), (1920, 512), (1984, 512), (2048, 512),
)


# ----------------------------------------------------------------------------------------------- records


class Record(NamedTuple):
    """One raw input, as a source yields it.

    key: unique within the source, stable across runs (a relative path without extension, "tar name/sample
        key", `split/index`); it also seeds the example's randomness.
    image: encoded bytes, a PIL image or a uint8/uint16/float array [H, W(, C)]; None when `error` is set.
    caption: raw caption — str, bytes (decoded under the caption rules), a list of alternatives (one is
        drawn, as diffusers does) or None when there is none.
    extra: source metadata (a tar sample's .json, a metadata row's other columns, a TFDS index).
    error: a skip reason the source already knows (missing_image, read_error, ...), else None.
    """

    key: str
    image: bytes | Image.Image | np.ndarray | None
    caption: Any
    extra: dict
    error: str | None = None


@dataclass
class Skips:
    """Skipped records by reason, a few example keys per reason, and how many records were kept.
    Merge the counters of all shards/hosts with `merge`; `to_dict`/`from_dict` for JSON files."""

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)
    kept: int = 0
    max_examples: int = 3

    def add(self, reason: str, key: str) -> None:
        self.counts[reason] += 1
        keys = self.examples.setdefault(reason, [])
        if len(keys) < self.max_examples:
            keys.append(key)

    def merge(self, other: Skips) -> Skips:
        """Adds `other` into this counter (in place) and returns it."""
        self.counts.update(other.counts)
        self.kept += other.kept
        for reason, keys in other.examples.items():
            mine = self.examples.setdefault(reason, [])
            mine.extend(keys[: max(self.max_examples - len(mine), 0)])
        return self

    @property
    def skipped(self) -> int:
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        return {"kept": self.kept, "skipped": dict(self.counts), "examples": self.examples}

    @classmethod
    def from_dict(cls, d: dict) -> Skips:
        return cls(Counter(d.get("skipped", {})), {k: list(v) for k, v in d.get("examples", {}).items()},
                   d.get("kept", 0))

    def summary(self) -> str:
        total = self.kept + self.skipped
        lines = [f"kept {self.kept} of {total} records, skipped {self.skipped}"]
        for reason, n in self.counts.most_common():
            lines.append(f"  {reason:<18} {n:>9}   e.g. {', '.join(self.examples.get(reason, []))}")
        return "\n".join(lines)


class Skip(Exception):  # noqa: N818  (a verdict, not a failure)
    """Raised by the decoding steps to reject a record; `reason` is one of `REASONS`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# -------------------------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class DecodeRules:
    """Limits applied to every image from its header, before its pixels are decoded.

    max_pixels: width*height above this is skipped as too_many_pixels. Default 8192² = 64 Mpx (192 MB as
        RGB): above any camera photo in web-scale sets, far below what a host can hold. Pillow's own bomb
        limit (2 × `PIL.Image.MAX_IMAGE_PIXELS` ≈ 179 Mpx) still applies on top and counts the same;
        Pillow's DecompressionBombWarning (above `MAX_IMAGE_PIXELS`) is left alone, not silenced.
    min_size: short side below this is skipped as too_small. 0 (default) keeps every image and lets the
        resize upscale it — what diffusers' script does.
    max_aspect: long side / short side above this is skipped as extreme_aspect (a 1×5000 banner resized
        to a 1024 short side would need 15 GB).
    """

    max_pixels: int = 8192 * 8192
    min_size: int = 0
    max_aspect: float = 16.0


def decode_image(data: bytes | Image.Image | np.ndarray | None, rules: DecodeRules = DecodeRules()) -> Image.Image:
    """Encoded bytes / PIL image / array → an RGB PIL image with EXIF orientation applied, or `Skip`.
    Arrays: uint16 and float values are scaled like 16-bit and float images; [H, W, 1] is grey."""
    if data is None:
        raise Skip("missing_image")
    if isinstance(data, np.ndarray):
        if data.ndim == 3 and data.shape[-1] == 1:  # [H, W, 1]: grey (Pillow has no mode for it)
            data = data[..., 0]
        if data.dtype == np.uint16 or data.dtype.kind == "f":  # no RGB(A) mode for these: 8-bit first
            data = _to_uint8(data)
        try:
            img = Image.fromarray(data)
        except Exception as e:  # an array Pillow has no mode for: [H, W, 2], int64, ...
            raise Skip("unsupported_mode", f"array {data.dtype} {data.shape}") from e
    elif isinstance(data, Image.Image):
        img = data
    else:
        if len(data) == 0:
            raise Skip("empty_file")
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise Skip("too_many_pixels", str(e)) from e
        except UnidentifiedImageError as e:
            raise Skip("not_an_image") from e
        except Exception as e:  # a recognised format with a broken header: SyntaxError, struct.error, ...
            raise Skip("corrupt", f"{type(e).__name__}: {e}") from e
    _check_size(img.width, img.height, rules)
    try:
        img.load()  # a no-op for an image already in memory
    except OSError as e:
        raise Skip("truncated" if "truncated" in str(e).lower() else "corrupt", str(e)) from e
    except Exception as e:
        raise Skip("corrupt", f"{type(e).__name__}: {e}") from e
    img = _apply_exif_orientation(img)
    try:
        return to_rgb(img)
    except (ValueError, OSError) as e:
        raise Skip("unsupported_mode", f"{img.mode}: {e}") from e


def _check_size(width: int, height: int, rules: DecodeRules) -> None:
    if width * height > rules.max_pixels:
        raise Skip("too_many_pixels", f"{width}x{height}")
    short, long = min(width, height), max(width, height)
    if short < max(rules.min_size, 1):
        raise Skip("too_small", f"{width}x{height}")
    if long > rules.max_aspect * short:
        raise Skip("extreme_aspect", f"{width}x{height}")


def _apply_exif_orientation(img: Image.Image) -> Image.Image:
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # unreadable EXIF: keep the stored orientation
        return img
    return ImageOps.exif_transpose(img) if orientation in range(2, 9) else img


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode → RGB under the colour rules of the module docstring (alpha on white, 16-bit scaled)."""
    mode = img.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(img)
        transparent = img.info.get("transparency")
        img = Image.fromarray(_to_uint8(a), "L")
        if isinstance(transparent, int):  # a 16-bit tRNS value: compared before scaling, it becomes alpha
            img = Image.merge("LA", (img, Image.fromarray(np.where(a == transparent, 0, 255).astype(np.uint8))))
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        white.alpha_composite(rgba)
        return white.convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def _to_uint8(a: np.ndarray) -> np.ndarray:
    """16-bit (or wider integer) and float pixel values → uint8 under the colour rules: integers
    v → round(v / 257), 0..65535 → 0..255 (Pillow's convert("L") would clip at 255); floats are taken as
    [0, 1] when their maximum is <= 1, else as [0, 255]."""
    if a.dtype.kind == "f":
        a = a.astype(np.float64)
        a = a * 255.0 if np.nanmax(a, initial=0.0) <= 1.0 else a
        return np.clip(np.rint(np.nan_to_num(a)), 0, 255).astype(np.uint8)
    return ((np.clip(a, 0, 65535).astype(np.uint32) + 128) // 257).astype(np.uint8)


def clean_caption(raw: Any, rng: np.random.Generator | None = None) -> str:
    """Raw caption → stripped str, or `Skip`. A list/tuple/array of captions: one is drawn with `rng`
    (the first without one), as diffusers' `tokenize_captions` does; bytes must be valid UTF-8 (a BOM is
    dropped); a str holding surrogate escapes (undecodable bytes read with "surrogateescape") counts as
    caption_not_utf8 too."""
    if isinstance(raw, np.ndarray) and raw.ndim == 0:
        raw = raw.item()
    if isinstance(raw, list | tuple | np.ndarray):
        options = list(raw)
        if not options:
            raise Skip("caption_missing")
        raw = options[int(rng.integers(len(options)))] if rng is not None else options[0]
    if raw is None:
        raise Skip("caption_missing")
    if isinstance(raw, bytes | bytearray | np.bytes_):
        try:
            text = bytes(raw).decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise Skip("caption_not_utf8") from e
    elif isinstance(raw, str):
        try:
            raw.encode("utf-8")
        except UnicodeEncodeError as e:
            raise Skip("caption_not_utf8") from e
        text = raw.removeprefix("\ufeff")
    else:
        raise Skip("caption_not_text", type(raw).__name__)
    text = text.strip()
    if not text:
        raise Skip("caption_empty")
    return text


# --------------------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preprocessing:
    """SDXL training preprocessing, diffusers' `train_text_to_image_sdxl.py` defaults.

    resolution: square target side (`--resolution`), when `buckets` is None.
    center_crop: centre crop (`--center_crop`); False = a random crop.
    random_flip: flip horizontally with probability 0.5 (`--random_flip`).
    buckets: (height, width) targets, e.g. `sdxl_buckets(resolution)`; each image goes to the bucket whose
        aspect ratio is closest to its own. None = the square resolution×resolution, like diffusers.
    """

    resolution: int = 1024
    center_crop: bool = False
    random_flip: bool = False
    buckets: tuple[tuple[int, int], ...] | None = None

    def __post_init__(self):
        sides = [self.resolution, *(d for b in self.buckets or () for d in b)]
        if min(sides) < 1 or self.buckets == ():
            raise ValueError(f"preprocessing: resolution {self.resolution} and buckets {self.buckets} must be "
                             "positive sizes (at least one bucket when given)")


def sdxl_buckets(resolution: int = 1024) -> tuple[tuple[int, int], ...]:
    """SDXL's (height, width) buckets scaled to `resolution`: each side round_half_up(side·res/1024/64)·64,
    at least 64; duplicates (at small resolutions) dropped, order kept. ValueError for a resolution that is
    not a multiple of 64 of at least 256: the square bucket would not be resolution² (96 gave 128²)."""
    if resolution % 64 or resolution < 256:
        raise ValueError(f"aspect-ratio buckets at resolution {resolution}: SDXL's buckets are multiples of 64, so "
                         "the resolution must be a multiple of 64 of at least 256 (or prepare without buckets)")
    out: list[tuple[int, int]] = []
    for h, w in SDXL_BUCKETS_1024:
        b = tuple(max(64, math.floor(d * resolution / 1024 / 64 + 0.5) * 64) for d in (h, w))
        if b not in out:
            out.append(b)
    return tuple(out)


def nearest_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to height/width (in log space, so 2:1 and 1:2 are equally
    far from 1:1); ties go to the first in `buckets`."""
    target = math.log(height / width)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - target))


def resize_to_cover(height: int, width: int, target_h: int, target_w: int) -> tuple[int, int]:
    """Size (h, w) of the smallest aspect-preserving resize covering target_h × target_w. For a square
    target this is torchvision's `Resize(int)` rule diffusers uses: short side = target, long side =
    int(target · long / short) (truncated)."""
    if target_w * height >= target_h * width:  # width is the binding side
        return max(target_h, int(target_w * height / width)), target_w
    return target_h, max(target_w, int(target_h * width / height))


def preprocess(img: Image.Image, prep: Preprocessing, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """RGB image → (pixels [H, W, 3] float32 in [-1, 1], time_ids [6] int32), the rule of diffusers'
    current `train_text_to_image_sdxl.py` (`preprocess_train`):

    record the original size, resize (PIL bilinear, which antialiases — what torchvision's Resize does to a
    PIL image) so the image covers the target, optionally flip (rng.random() < 0.5), then crop the
    (flipped) image (centre: offsets round((resized - target) / 2); random: top then left drawn uniformly
    from rng) and scale to [-1, 1]. time_ids = (original_h, original_w, crop_top, crop_left, target_h,
    target_w): the offset is the ordinary one in the flipped image, within [0, resized - target].
    """
    orig_h, orig_w = img.height, img.width
    th, tw = (prep.resolution, prep.resolution) if prep.buckets is None else nearest_bucket(orig_h, orig_w,
                                                                                            prep.buckets)
    rh, rw = resize_to_cover(orig_h, orig_w, th, tw)
    if (rh, rw) != (orig_h, orig_w):
        img = img.resize((rw, rh), Image.Resampling.BILINEAR)
    # Flipped before the crop, as diffusers does now (an older version cropped first and then stored
    # `image.width - x1`, offsets no unflipped crop can have, e.g. 1024 for an uncropped square image).
    if prep.random_flip and rng.random() < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if prep.center_crop:
        top, left = int(round((rh - th) / 2.0)), int(round((rw - tw) / 2.0))  # torchvision CenterCrop
    else:
        top, left = int(rng.integers(0, rh - th + 1)), int(rng.integers(0, rw - tw + 1))  # RandomCrop.get_params
    img = img.crop((left, top, left + tw, top + th))
    # ToTensor then Normalize([0.5], [0.5]), in float32 like torchvision.
    pixels = (np.asarray(img, np.float32) / np.float32(255.0) - np.float32(0.5)) / np.float32(0.5)
    return pixels, np.array([orig_h, orig_w, top, left, th, tw], np.int32)


def example_rng(seed: int, key: str, epoch: int | None = None) -> np.random.Generator:
    """The generator for one example: a function of (seed, key) only — and of the epoch when one is given
    (training on the fly draws new crops and flips every epoch) — so crops, flips and caption choices do
    not depend on shard order, host count or which records were skipped."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    entropy = [seed, int.from_bytes(digest, "little")] + ([] if epoch is None else [epoch])
    return np.random.default_rng(entropy)


@dataclass
class Example:
    """A preprocessed training example. pixels: [H, W, 3] float32 in [-1, 1]; time_ids: [6] int32
    (original_h, original_w, crop_top, crop_left, target_h, target_w); extra: the record's metadata."""

    key: str
    pixels: np.ndarray
    time_ids: np.ndarray
    caption: str
    extra: dict


def process_record(record: Record, *, seed: int, prep: Preprocessing, rules: DecodeRules = DecodeRules(),
                   skips: Skips | None = None, epoch: int | None = None) -> Example | None:
    """Record → Example, or None with the reason counted in `skips`. Never raises for bad input.
    Randomness from `example_rng(seed, key, epoch)`, drawn in this order: caption choice (lists only),
    flip, crop top, crop left."""
    skips = skips if skips is not None else Skips()
    try:
        if record.error:
            raise Skip(record.error)
        rng = example_rng(seed, record.key, epoch)
        caption = clean_caption(record.caption, rng)  # cheap checks first: no decode for a captionless image
        img = decode_image(record.image, rules)
        pixels, time_ids = preprocess(img, prep, rng)
    except Skip as s:
        skips.add(s.reason, record.key)
        return None
    except Exception as e:  # an unforeseen input or a bug: counted under its type, the run goes on
        skips.add(f"error:{type(e).__name__}", record.key)
        return None
    skips.kept += 1
    return Example(record.key, pixels, time_ids, caption, record.extra)


def process_records(records: Iterable[Record], *, seed: int, prep: Preprocessing, rules: DecodeRules = DecodeRules(),
                    skips: Skips | None = None, epoch: int | None = None, workers: int = 1
                    ) -> Iterator[Example | None]:
    """`process_record` of each record, in their order (None for a skipped one, counted in `skips` in that
    order too): the same results for any `workers`. With `workers` > 1, that many threads decode at once
    (Pillow and numpy let go of the GIL while they decode and resize), at most 2 × workers records ahead
    of what was taken."""
    skips = skips if skips is not None else Skips()
    if workers <= 1:
        for record in records:
            yield process_record(record, seed=seed, prep=prep, rules=rules, skips=skips, epoch=epoch)
        return

    def alone(record):  # its own counter: merged in order below, whatever thread finishes first
        own = Skips()
        return process_record(record, seed=seed, prep=prep, rules=rules, skips=own, epoch=epoch), own

    with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="decode") as pool:
        pending: deque = deque()
        for record in itertools.chain(records, [None]):
            if record is not None:
                pending.append(pool.submit(alone, record))
            while pending and (record is None or len(pending) >= 2 * workers):
                example, own = pending.popleft().result()
                skips.merge(own)
                yield example


def decode_workers(setting: int) -> int:
    """Threads that decode images (`data.workers`, prepare's --workers): 0 picks one per CPU core, up to 16."""
    return setting if setting > 0 else min(os.cpu_count() or 1, 16)


def read_examples(source: Source, shard: Shard, *, seed: int, prep: Preprocessing,
                  rules: DecodeRules = DecodeRules(), skips: Skips | None = None, workers: int = 1
                  ) -> Iterator[Example]:
    """The good examples of one shard, in the source's order; skips counted in `skips`."""
    for ex in process_records(source.read(shard), seed=seed, prep=prep, rules=rules, skips=skips, workers=workers):
        if ex is not None:
            yield ex


def shuffled_records(source: Source, shard: Shard, rng: np.random.Generator, *, start: int = 0, step: int = 1,
                     skip: int = 0, buffer_size: int = SHUFFLE_BUFFER) -> Iterator[Record]:
    """The shard's records in an order drawn from `rng`, and of that order only the records start,
    start + step, ... (one host's share; the others are not decoded), less the first `skip` of those (a
    resumed stream's). A folder shard lists its records: they are permuted, and the files of other hosts
    and of skipped records are not even read. Tar and TFDS shards are read in one pass, through a shuffle
    buffer of `buffer_size` records (raw bytes, not decoded pixels)."""
    if isinstance(source, FolderSource):
        entries = [shard.data[i] for i in rng.permutation(len(shard.data))][start::step][skip:]
        yield from source.read(Shard(shard.name, shard.index, len(entries), tuple(entries)))
        return
    yield from itertools.islice(_buffer_shuffle(source.read(shard), rng, buffer_size), start + skip * step, None, step)


def _buffer_shuffle(records: Iterator[Record], rng: np.random.Generator, size: int) -> Iterator[Record]:
    buffer: list[Record] = []
    for record in records:
        if len(buffer) < size:
            buffer.append(record)
            continue
        i = int(rng.integers(size))
        yield buffer[i]
        buffer[i] = record
    yield from (buffer[i] for i in rng.permutation(len(buffer)))


# -------------------------------------------------------------------------------------------- sources


@dataclass(frozen=True)
class Shard:
    """A unit of resumable work. name: unique within its source and the same on every run over unchanged
    input (use it for done-markers); index: position in `source.shards()`; size: records in it (None for
    tars: unknown without reading); data: what the source's `read` needs (opaque)."""

    name: str
    index: int
    size: int | None
    data: tuple = ()


class Source(Protocol):
    """Anything with deterministic shards of records. `fingerprint(shard)` is a digest of what the shard's
    records are read from: equal fingerprints mean the shard would read the same records again."""

    description: str

    def shards(self) -> list[Shard]: ...

    def read(self, shard: Shard) -> Iterator[Record]: ...

    def fingerprint(self, shard: Shard) -> str: ...


def shards_for_process(shards: Sequence[Shard], process_index: int, process_count: int) -> list[Shard]:
    """This host's share: every process_count-th shard from process_index (disjoint, together complete)."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return list(shards[process_index::process_count])


class _Entry(NamedTuple):
    key: str
    path: str | None  # image file relative to the root; None for error entries
    caption: Any  # from a metadata row (may be None)
    extra: dict
    error: str | None = None
    from_txt: bool = False  # no metadata row: the caption is the .txt beside the image


class FolderSource:
    """Images under `root` (recursive, symlinked folders followed; extensions `IMAGE_EXTENSIONS`, any case)
    with captions from Hugging Face ImageFolder metadata or a `.txt` beside each image.

    Captions: a `metadata.jsonl` or `metadata.csv` in any folder describes files relative to that folder
    (`file_name` column, caption in `caption_column`, other columns go to `extra`); an image no metadata
    row names takes `<same stem>.txt` beside it; neither → caption_missing. Metadata rows naming a file
    that does not exist → missing_image; unparsable rows, rows without `file_name` or naming a file outside
    the folder (an absolute path, `..`) → bad_metadata (a
    whole metadata file that cannot be read or parsed: one bad_metadata, its images use their .txt).
    Keys: the path relative to root without its last extension ("sub/a.b" for sub/a.b.jpg); a second
    file with the same key (a.jpg and a.png) → duplicate_key. Records are in key order; shards are
    `files_per_shard` consecutive records, named "files-000000", ... (stable while the folder is).
    Metadata files are read as UTF-8 (BOM allowed); undecodable bytes inside a caption make that caption
    caption_not_utf8.
    """

    def __init__(self, root: str, *, caption_column: str = "text", files_per_shard: int = 1000):
        if not os.path.isdir(root):
            raise ValueError(f"folder source: {root} is not a folder; give a folder of images (with .txt captions "
                             "or a metadata.jsonl/csv) or a tar glob (tar:GLOB)")
        self.root, self.caption_column, self.files_per_shard = root, caption_column, files_per_shard
        self.description = f"folder:{os.path.abspath(root)}"  # one name however the path was typed"
        self._entries: list[_Entry] | None = None

    def entries(self) -> list[_Entry]:
        if self._entries is None:
            self._entries = _list_folder(self.root, self.caption_column)
        return self._entries

    def shards(self) -> list[Shard]:
        """Raises ValueError for a folder without a single image (or metadata row)."""
        e, n = self.entries(), self.files_per_shard
        if not e:
            raise ValueError(f"folder source: no images ({'/'.join(IMAGE_EXTENSIONS)}) found under {self.root}")
        return [Shard(f"files-{i // n:06d}", i // n, len(e[i:i + n]), tuple(e[i:i + n])) for i in range(0, len(e), n)]

    def fingerprint(self, shard: Shard) -> str:
        """A digest of the shard's entries and of the size and mtime of each image (and of its .txt when the
        caption comes from one). One file added before a shard shifts it, so its entries change too."""
        parts = []
        for e in shard.data:
            files = [e.path] if e.path else []
            if e.path and e.from_txt:
                files.append(posixpath.splitext(e.path)[0] + ".txt")
            parts.append([e.key, e.path, e.caption, e.error, e.from_txt,
                          [_stat(os.path.join(self.root, f)) for f in files]])
        return _digest(parts)

    def read(self, shard: Shard) -> Iterator[Record]:
        for entry in shard.data:
            if entry.error:
                yield Record(entry.key, None, None, entry.extra, entry.error)
                continue
            path = os.path.join(self.root, entry.path)
            try:
                with open(path, "rb") as f:
                    data = f.read()
                caption = entry.caption
                txt = os.path.splitext(path)[0] + ".txt"
                if entry.from_txt and os.path.exists(txt):
                    with open(txt, "rb") as f:
                        caption = f.read()
            except OSError:
                yield Record(entry.key, None, None, entry.extra, "read_error")
                continue
            yield Record(entry.key, data, caption, entry.extra)


def _list_folder(root: str, caption_column: str) -> list[_Entry]:
    images: dict[str, str] = {}  # relative posix path → same
    metadata: dict[str, tuple[Any, dict]] = {}  # relative path → (caption, extra)
    errors: list[_Entry] = []
    visited: set[str] = set()
    # Symlinked folders are followed (a data set assembled from links to other disks); a folder reached
    # twice (two links to it, a link to a parent) is read once.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in visited:
            dirnames.clear()
            continue
        visited.add(real)
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        rel_dir = "" if rel_dir == "." else rel_dir.replace(os.sep, "/")
        for name in sorted(filenames):
            rel = posixpath.join(rel_dir, name)
            if name in METADATA_FILES:
                for row_key, row, error in _read_metadata(os.path.join(dirpath, name), rel):
                    if error:
                        errors.append(_Entry(row_key, None, None, {}, error))
                        continue
                    target = posixpath.normpath(posixpath.join(rel_dir, row.pop("file_name")))
                    if target.startswith(("/", "../")) or target == "..":  # outside the source folder
                        errors.append(_Entry(row_key, None, None, {}, "bad_metadata"))
                        continue
                    if target in metadata:
                        errors.append(_Entry(row_key, None, None, {}, "duplicate_key"))
                        continue
                    metadata[target] = (row.pop(caption_column, None), row)
            elif name.rsplit(".", 1)[-1].lower() in IMAGE_EXTENSIONS and not name.startswith("."):
                images[rel] = rel
    # A metadata row may name an image with another extension (.gif, .tiff): it is read if it exists.
    for target in metadata:
        if target not in images and os.path.isfile(os.path.join(root, target)):
            images[target] = target
    entries: dict[str, _Entry] = {}
    for rel in sorted(images):
        key = posixpath.splitext(rel)[0]
        if key in entries:
            errors.append(_Entry(rel, None, None, {}, "duplicate_key"))
            continue
        caption, extra = metadata.get(rel, (None, {}))
        entries[key] = _Entry(key, rel, caption, extra, from_txt=rel not in metadata)
    for target, (_, extra) in metadata.items():
        if target not in images:
            errors.append(_Entry(posixpath.splitext(target)[0], None, None, extra, "missing_image"))
    return sorted([e._replace(key=_printable(e.key)) for e in (*entries.values(), *errors)], key=lambda e: e.key)


def _read_metadata(path: str, rel: str) -> list[tuple[str, dict, str | None]]:
    """(key for errors, row, error) per row of a metadata.jsonl / metadata.csv. A file that cannot be read
    or parsed as a whole (OSError, csv.Error) is one bad_metadata, keyed by the file: its images fall back
    to their .txt captions."""
    try:
        return list(_metadata_rows(path, rel))
    except (OSError, csv.Error):
        return [(rel, {}, "bad_metadata")]


def _metadata_rows(path: str, rel: str) -> Iterator[tuple[str, dict, str | None]]:
    with open(path, "rb") as f:
        text = f.read().decode("utf-8-sig", "surrogateescape")
    if path.endswith(".jsonl"):
        # Lines end at "\n" only, as in JSON Lines: str.splitlines() also splits at U+0085, U+2028, ...,
        # which json.dumps(ensure_ascii=False) leaves raw inside captions.
        for n, line in enumerate(text.split("\n"), 1):
            line = line.removesuffix("\r")
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                row = None
            ok = isinstance(row, dict) and isinstance(row.get("file_name"), str)
            yield f"{rel}:{n}", row if ok else {}, None if ok else "bad_metadata"
    else:
        # csv's default cell limit (128 KiB) is below what scraped captions reach; the limit is per process.
        csv.field_size_limit(max(csv.field_size_limit(), 2**30))
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for n, row in enumerate(reader, 2):
            ok = bool(row.get("file_name")) and None not in row  # None key: more cells than columns
            yield f"{rel}:{n}", dict(row) if ok else {}, None if ok else "bad_metadata"


class TarSource:
    """webdataset / img2dataset tar shards: `pattern` is a glob ("/data/*.tar"), a folder (its `*.tar`,
    recursively) or one tar; each tar is a shard, named by its path without ".tar" relative to the folder
    the pattern names (the folder given; a glob's part before its first wildcard: "/d/part*/*.tar" names
    /d/part1/00000.tar "part1/00000"; one tar's folder), so adding tars renames none. A sample is the files
    sharing a key, webdataset's rule: key = member path up to the first dot of the basename ("a.b/000123.jpg"
    → key "a.b/000123", extension "jpg"). Image: the first of
    jpg/jpeg/png/webp/bmp present; caption: `.txt`; `.json` (img2dataset's url, size, ...) → extra.
    Files of one sample must be adjacent, as webdataset writes them; a key seen again later in the same
    tar → duplicate_key where it repeats a file type, split_sample where it brings others (a tar written in
    another order, all images then all captions: the earlier part reads as an image without caption; write
    the tar sorted by name). Record keys are "<shard name>/<sample key>" ("00001/000123"), unique across
    tars. A sample without an image → missing_image. A tar that cannot be opened or ends mid-way (an
    interrupted download, also one cut at a member boundary: no end-of-archive marker) → one bad_tar
    record, keyed by the shard name, after the samples read before the damage. Compressed tars (.tar.gz
    etc.) are read too if named by the glob.
    """

    def __init__(self, pattern: str):
        # Names relative to the folder the pattern names, not to the tars' common folder: a tar added in
        # another subfolder renames no shard (prepare's done-markers and the keys stay). An existing folder
        # or file is taken as named, glob characters in its name included.
        if os.path.isdir(pattern):
            paths, base = glob.glob(os.path.join(glob.escape(pattern), "**", "*.tar"), recursive=True), pattern
        elif os.path.isfile(pattern):
            paths, base = [pattern], os.path.dirname(pattern)
        else:
            paths, base = glob.glob(pattern, recursive=True), os.path.dirname(pattern)
            while glob.has_magic(base):
                base = os.path.dirname(base)
        self.paths = sorted(paths)
        if not self.paths:
            raise ValueError(f"tar source: no tar files match {pattern}; check the path or glob (quote it so the "
                             "shell does not expand it)")
        self.description = f"tar:{os.path.abspath(pattern)}"
        self._names = [_printable(os.path.relpath(p, base or ".").replace(os.sep, "/").removesuffix(".tar"))
                       for p in self.paths]

    def shards(self) -> list[Shard]:
        pairs = zip(self._names, self.paths, strict=True)
        return [Shard(name, i, None, (path,)) for i, (name, path) in enumerate(pairs)]

    def fingerprint(self, shard: Shard) -> str:
        """The tar's path (absolute: a glob written another way finds the same tar), size and mtime: a tar
        downloaded again (after a bad_tar) is read again."""
        (path,) = shard.data
        return _digest([os.path.abspath(path), _stat(path)])

    def read(self, shard: Shard) -> Iterator[Record]:
        (path,) = shard.data
        seen: dict[str, set[str]] = {}  # key → its file types
        group_key, group = None, {}
        try:
            with tarfile.open(path, "r|*") as tar:  # one sequential pass: no seeks, any compression
                for member in tar:
                    if not member.isfile():
                        continue
                    dirname, base = posixpath.split(member.name)
                    if base.startswith(".") or "." not in base:
                        continue  # macOS "._x" files, extensionless junk
                    stem, ext = base.split(".", 1)
                    # the shard's name in front: keys unique across tars (two "00000.tar" in different folders)
                    key = _printable(f"{shard.name}/{posixpath.join(dirname, stem).removeprefix('./')}")
                    if key != group_key:
                        if group_key is not None:
                            yield _tar_record(group_key, group, seen)
                        group_key, group = key, {}
                    group[ext.lower()] = tar.extractfile(member).read()
                end = tar.offset
            if not _tar_ends_cleanly(path, end):
                raise tarfile.ReadError("cut before its end-of-archive marker")
        except Exception:  # tarfile.ReadError, EOFError, zlib.error, OSError: a damaged or vanished tar
            if group_key is not None:
                yield _tar_record(group_key, group, seen)
            yield Record(shard.name, None, None, {"path": path}, "bad_tar")
            return
        if group_key is not None:
            yield _tar_record(group_key, group, seen)


def _tar_ends_cleanly(path: str, end: int) -> bool:
    """Whether an uncompressed tar holds a zero block where tarfile stopped reading (`end`). tarfile's
    stream mode takes a missing or cut header after the first one for the end of the archive, so a tar
    cut at (or inside) a member header would otherwise lose its remaining samples without a word. A cut
    compressed stream raises EOFError instead (its offsets are not file offsets: not checked here)."""
    with open(path, "rb") as f:
        if f.read(6).startswith(_COMPRESSED_MAGIC):
            return True
        f.seek(end)
        return f.read(tarfile.BLOCKSIZE) == bytes(tarfile.BLOCKSIZE)


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")  # gzip, bzip2, xz, zstd


def _tar_record(key: str, files: dict[str, bytes], seen: dict[str, set[str]]) -> Record:
    if key in seen:
        return Record(key, None, None, {}, "duplicate_key" if seen[key] & set(files) else "split_sample")
    seen[key] = set(files)
    extra: dict = {}
    if "json" in files:
        try:
            parsed = json.loads(files["json"])
            extra = parsed if isinstance(parsed, dict) else {"json": parsed}
        except ValueError as e:
            extra = {"json_error": str(e)}
    image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
    if image is None:
        return Record(key, None, None, extra, "missing_image")
    return Record(key, image, files.get("txt"), extra)


class TFDSSource:
    """A TFDS data set by name (`tfds.builder(name, data_dir=data_dir)`; name may carry "/config" and
    ":version"). `split` is any TFDS split spec ("train", "train[:10%]", "train+validation"); it is cut
    into shards of `examples_per_shard` consecutive examples named like "train[0:1000]". `image_key` and
    `text_key` name the features (dots for nested ones: "meta.caption"); an Image feature is read as its
    encoded bytes (TFDS's decoding skipped) so the decoding rules apply to it. Keys: "split/index".

    array_record data sets are read with `as_data_source` (no TensorFlow needed); tfrecord ones with
    `as_dataset`, which needs TensorFlow installed.
    """

    def __init__(self, name: str, *, split: str = "train", data_dir: str | None = None, image_key: str = "image",
                 text_key: str = "text", examples_per_shard: int = 1000):
        import tensorflow_datasets as tfds

        self.name, self.split, self.data_dir = name, split, data_dir
        self.image_key, self.text_key, self.examples_per_shard = image_key, text_key, examples_per_shard
        self.description = f"tfds:{name}:{split}"
        try:
            self.builder = tfds.builder(name, data_dir=data_dir)
        except tfds.core.registered.DatasetNotFoundError:  # its message lists every data set TFDS knows
            raise ValueError(f"tfds source {name}: no such data set (data_dir {data_dir}); check the name, "
                             "or give the data_dir it was built in") from None
        if not self.builder.is_prepared():
            raise ValueError(f"tfds source {name}: not built in {self.builder.data_path}; build it first "
                             f"(tfds build {name}) or give the data_dir it was built in")
        try:
            tfds.core.ReadInstruction.from_spec(split).to_absolute(self.builder.info.splits)
        except (ValueError, AssertionError) as e:
            raise ValueError(f"tfds source {name}: bad split {split!r}: {e}") from None
        features = self.builder.info.features
        for k in (image_key, text_key):
            try:
                _get_nested(features, k)
            except KeyError:
                raise ValueError(f"tfds source {name}: no feature {k!r}; features: {features}") from None
        self._skip_image = isinstance(_get_nested(features, image_key), tfds.features.Image)

    def shards(self) -> list[Shard]:
        import tensorflow_datasets as tfds

        splits, out = self.builder.info.splits, []
        for ins in tfds.core.ReadInstruction.from_spec(self.split).to_absolute(splits):
            start = ins.from_ or 0  # None: from the first / to the last example
            stop = splits[ins.splitname].num_examples if ins.to is None else ins.to
            for a in range(start, stop, self.examples_per_shard):
                b = min(a + self.examples_per_shard, stop)
                out.append(Shard(f"{ins.splitname}[{a}:{b}]", len(out), b - a, (ins.splitname, a, b)))
        return out

    def fingerprint(self, shard: Shard) -> str:
        """Which data set (name, version, folder), which examples (split name and range) and which features
        the shard reads."""
        b = self.builder
        data_dir = str(b.data_dir) if "://" in str(b.data_dir) else os.path.abspath(b.data_dir)  # gs:// stays
        return _digest([b.name, str(b.version), data_dir, shard.data, self.image_key, self.text_key])

    def read(self, shard: Shard) -> Iterator[Record]:
        import tensorflow_datasets as tfds

        splitname, a, b = shard.data
        decoders = _nested({self.image_key: tfds.decode.SkipDecoding()}) if self._skip_image else None
        if self.builder.info.file_format == tfds.core.FileFormat.ARRAY_RECORD:
            ds = self.builder.as_data_source(split=shard.name, decoders=decoders)
            examples = (_try(ds.__getitem__, i) for i in range(len(ds)))
        else:  # a broken tfrecord ends the shard (one read_error): its iterator cannot be resumed
            ds = self.builder.as_dataset(split=shard.name, decoders=decoders, shuffle_files=False)
            examples = _try_iter(tfds.as_numpy(ds))
        for index, ex in zip(range(a, b), examples, strict=False):
            key = f"{splitname}/{index}"
            if isinstance(ex, Exception):
                yield Record(key, None, None, {"split": splitname, "index": index}, "read_error")
                continue
            image, text = _get_nested(ex, self.image_key), _get_nested(ex, self.text_key)
            if isinstance(image, np.ndarray) and image.dtype == object:  # SkipDecoding bytes in a 0-d array
                image = image.item()
            yield Record(key, image, text, {"split": splitname, "index": index})


def _printable(name: str) -> str:
    """A path as text that can be written and printed: bytes that are not UTF-8 (which os and tarfile give
    as surrogates) become \\xNN escapes ("caf\\xe9"); UTF-8 names are unchanged."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _stat(path: str) -> list[int] | None:
    """[size, mtime_ns], or None for a file that is not there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns]


def _digest(parts: Any) -> str:
    # json's ensure_ascii escapes the surrogates of undecodable caption bytes, which .encode() would refuse
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _try(fn, *args) -> Any:
    try:
        return fn(*args)
    except Exception as e:
        return e


def _try_iter(it) -> Iterator[Any]:
    try:
        yield from it
    except Exception as e:
        yield e


def _get_nested(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree[part]
    return tree


def _nested(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for dotted, value in flat.items():
        *parents, last = dotted.split(".")
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return out


# ----------------------------------------------------------------------------------------------- specs

# "name", "name/config", "name:1.2.3", "name/config:1.2.3", then an optional ":split" (which may hold
# colons itself: "train[:10%]").
_TFDS_SPEC = re.compile(r"^(?P<name>[^:\[\]]+(?::\d+\.\d+\.\d+)?)(?::(?P<split>.+))?$")


def open_source(spec: str, **options: Any) -> FolderSource | TarSource | TFDSSource:
    """A source from a string spec; `options` go to its constructor.

        folder:PATH                   FolderSource(PATH, caption_column="text", files_per_shard=1000)
        tar:GLOB | tar:DIR | tar:FILE TarSource(...)
        tfds:NAME[:SPLIT]             TFDSSource(NAME, split=SPLIT or "train", data_dir=, image_key=,
                                      text_key=, examples_per_shard=); NAME as tfds.builder takes it
        PATH                          autodetect: a *.tar file, a glob, or a folder holding *.tar files at
                                      its top level → tar; any other folder → folder
    """
    kind, sep, rest = spec.partition(":")
    if sep and kind == "folder":
        return FolderSource(rest, **options)
    if sep and kind == "tar":
        return TarSource(rest, **options)
    if sep and kind == "tfds":
        m = _TFDS_SPEC.match(rest)
        if not m:
            raise ValueError(f"bad tfds spec {spec!r}: expected tfds:NAME[/CONFIG][:VERSION][:SPLIT]")
        if m["split"]:
            options = {"split": m["split"], **options}
        return TFDSSource(m["name"], **options)
    if os.path.isdir(spec):  # first: a folder's name may hold glob characters ("imgs[2023]")
        if glob.glob(os.path.join(glob.escape(spec), "*.tar")):
            return TarSource(spec, **options)
        return FolderSource(spec, **options)
    if spec.endswith(".tar") or glob.has_magic(spec):
        return TarSource(spec, **options)
    raise ValueError(f"cannot open source {spec!r}: not folder:/tar:/tfds:, not an existing folder or tar glob")
