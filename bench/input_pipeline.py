"""Training on the fly (`data.source=images`): how long the loop waits for its batches.

Builds a folder of `--images` JPEGs (`--size`² smooth random pictures, each with a caption file) and a
tiny random SDXL-shaped pipeline (text encoders and VAE: the real topology at small widths, the VAE's
four blocks downsampling 8× as SDXL's), then runs
the trainer itself on them — plain diffusion training of a small UNet, the VAE and text encoders inside
the step — and reads its metrics.jsonl: samples/s and `data_wait` (the share of the time the loop spent
waiting for its next batch) over the steps after compilation. The input alone is timed as well:
StreamedImages reading the same batches with nothing else running (decode, crop, resize, tokenize), and
the first batch of a resume at the last step, replaying the stream up to it or going on from the
position a checkpoint there would hold (`state` / `seek`), both checked to give the batch the uninterrupted
stream read (`resume_exact`).

With the next batch read in a background thread while the step runs, the wait is what the input takes
beyond the step; without it, the whole read. A CPU shares its cores between the two, so the overlap is
smaller here than beside an accelerator.

Run (from the repository root, PYTHONPATH=. or jaxdistill installed):
    python bench/input_pipeline.py                           # 64 images of 768², 256² training, batch 8
    python bench/input_pipeline.py --size 2048 --workers 1 --json bench/out/input.json
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def write_images(folder: Path, count: int, size: int) -> None:
    """`count` JPEGs of `size`² smooth noise (they compress like photos, not like white noise), captioned."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        coarse = rng.integers(0, 256, (size // 32, size // 32, 3), np.uint8)
        image = Image.fromarray(coarse).resize((size, size), Image.BICUBIC)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        (folder / f"{i:05d}.jpg").write_bytes(buffer.getvalue())
        (folder / f"{i:05d}.txt").write_text(f"picture number {i}")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--size", type=int, default=768, help="side of the source JPEGs")
    parser.add_argument("--resolution", type=int, default=256, help="training resolution (crop and resize)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--workers", type=int, default=0, help="threads decoding images (data.workers; 0: a core each)")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="input_pipeline_") as tmp:  # images, pipeline and run: gone after
        figures = measure(args, Path(tmp))
    for k, v in figures.items():
        print(f"{k:<26} {v:.4g}" if isinstance(v, float) else f"{k:<26} {v}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return figures


def measure(args: argparse.Namespace, root: Path) -> dict:
    """The figures of one run in folder `root`."""
    import jax

    from jaxdistill import sources as S
    from jaxdistill.config import base_config
    from jaxdistill.data import StreamedImages
    from jaxdistill.reference import write_random_text_encoders, write_random_vae
    from jaxdistill.spec import UNetSpec
    from jaxdistill.text import load_tokenizers
    from jaxdistill.train import MODELS, run

    write_images(root / "images", args.images, args.size)
    pipeline = root / "pipeline"
    write_random_text_encoders(pipeline, seed=1)
    write_random_vae(pipeline / "vae", seed=2, block_out_channels=(16, 16, 32, 32))  # SDXL's 8× downsampling
    # a small UNet with every part, conditioned as the tiny text encoders give (80-d tokens, 40-d pooled)
    MODELS["bench-input"] = UNetSpec(
        block_out_channels=(32, 64), down_depths=((0,), (1,)), up_depths=((1, 1), (0, 0)), num_attention_heads=(1, 2),
        mid_block_type="UNetMidBlock2DCrossAttn", mid_depth=1, cross_attention_dim=80, norm_num_groups=8,
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=40 + 6 * 8,
        sample_size=args.resolution // 8)
    c = base_config()
    c.model, c.plan = "bench-input", ""
    c.loss.output = c.loss.feature = 0.0
    c.data.update(source="images", path=f"folder:{root / 'images'}", pipeline=str(pipeline),
                  resolution=args.resolution, workers=args.workers)
    c.batch_size, c.optimizer.accumulation = args.batch, 1
    c.precision.teacher = c.precision.student_compute = "float32"
    c.steps, c.log_every, c.checkpoint_every, c.eval.every = args.steps, 1, args.steps, 0
    run(c, root / "run")
    rows = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if "samples_per_s" in r]

    def stream():
        return StreamedImages(S.open_source(f"folder:{root / 'images'}"), load_tokenizers(str(pipeline)),
                              prep=S.Preprocessing(resolution=args.resolution), batch_size=args.batch,
                              workers=S.decode_workers(args.workers))

    first = stream()
    t0 = time.perf_counter()
    for step in range(args.steps):
        last = first.batch(step, ahead=step + 1 < args.steps)  # the input alone: nothing beside it
    read_s = (time.perf_counter() - t0) / args.steps
    # a resume at the last step: replaying the stream up to it, or going on from the position saved there
    resume_s, exact = {}, True
    for how in ("replay", "seek"):
        resumed = stream()
        if how == "seek":
            resumed.seek(args.steps - 1, [first.state(args.steps - 1)])
        t0 = time.perf_counter()
        batch = resumed.batch(args.steps - 1, ahead=False)
        resume_s[how] = time.perf_counter() - t0
        exact &= all(np.array_equal(batch[k], last[k]) for k in last)  # the batch the uninterrupted stream read

    return {
        "device": f"{jax.devices()[0].platform}: {platform.processor() or platform.machine()}",
        "images": args.images, "size": args.size, "resolution": args.resolution, "batch": args.batch,
        "workers": S.decode_workers(args.workers),
        "steps_timed": len(timed),
        "samples_per_s": statistics.median(r["samples_per_s"] for r in timed),
        "step_s": args.batch / statistics.median(r["samples_per_s"] for r in timed),
        "data_wait": statistics.median(r["data_wait"] for r in timed) if timed and "data_wait" in timed[0] else None,
        "input_alone_s_per_batch": read_s,
        "resume_replay_s": resume_s["replay"],
        "resume_seek_s": resume_s["seek"],
        "resume_exact": exact,
    }


if __name__ == "__main__":
    main()
