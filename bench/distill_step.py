"""Speed of one distillation step: ours (JAX) beside the usual PyTorch step, same recipe, model, batch, device.

Ours: `jaxdistill.step.make_train_step` exactly as the trainer builds it (teacher frozen, student pruned
with the ssd1b plan, every resnet/attention tap, AdamW, scanned transformer layers, donated state),
compiled ahead of time (compile time reported), warmed up, then `--iters` timed steps.
PyTorch: `jaxdistill.reference.torch_distill_step` — diffusers teacher under `no_grad`, forward hooks on
the same taps, AdamW, gradient clipping; bf16 autocast when `--dtype bf16` on CUDA.

FLOP utilisation = model FLOPs per step ÷ step time ÷ peak. Model FLOPs = teacher forward + 3 × student
forward (forward + backward), each from XLA's cost analysis of the compiled forward; the peak is a large
square matmul in the step's compute dtype, measured by this script on the same device (the best of a few
runs). Peak memory: XLA's compiled memory analysis of the step (arguments + outputs − aliased + temps);
PyTorch: `torch.cuda.max_memory_allocated` on a GPU, the growth of the process's peak RSS on a CPU.

Default sizes finish on a 2-core CPU in minutes: SDXL's topology (depths 2/10, mid 10) at reduced widths
(`--width 64`: blocks 64/128/256, heads of 32), 256² images (32² latents), batch 2. On a GPU:
`--full --resolution 1024 --batch 4 --dtype bf16` is the real SSD-1B distillation step.

    python bench/distill_step.py --json bench/out/distill_cpu.json
    python bench/distill_step.py --full --resolution 1024 --batch 4 --dtype bf16    # GPU
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory for torch after JAX

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxdistill import presets  # noqa: E402
from jaxdistill.layers import stack_layers  # noqa: E402
from jaxdistill.prune import feature_pairs, prune  # noqa: E402
from jaxdistill.schedule import alphas_cumprod  # noqa: E402
from jaxdistill.spec import UNetSpec  # noqa: E402
from jaxdistill.step import init_state, make_optimizer, make_train_step  # noqa: E402
from jaxdistill.unet import UNet, flops, init_params  # noqa: E402

SEQ_LEN = 77


def reduced_sdxl(width: int) -> UNetSpec:
    """SDXL's topology (transformer depths 2/10, 10-deep mid attention, SDXL's conditioning widths) with
    block widths width, 2·width, 4·width and heads of 32 channels."""
    widths = (width, 2 * width, 4 * width)
    return presets.SDXL.replace(block_out_channels=widths, num_attention_heads=tuple(max(w // 32, 1) for w in widths),
                                norm_num_groups=min(32, width // 2))


def peak_matmul_flops(dtype, n: int = 4096, repeats: int = 5) -> float:
    """Best FLOP/s of an n×n×n matmul in `dtype` on the default device."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        mm(a, b).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def batch_for(spec: UNetSpec, batch: int, side: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    pooled = spec.projection_class_embeddings_input_dim - 6 * spec.addition_time_embed_dim
    return {"latents": rng.standard_normal((batch, side, side, 4), np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, SEQ_LEN, spec.cross_attention_dim), np.float32),
            "text_embeds": rng.standard_normal((batch, pooled), np.float32),
            "time_ids": np.tile(np.array([1024, 1024, 0, 0, 1024, 1024], np.float32), (batch, 1))}


def jax_step(teacher_spec, teacher, student_spec, student, kept, batch, args) -> dict:
    """Compile and time our step; → figures."""
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    tx, lr_fn = make_optimizer(1e-5)
    pairs = feature_pairs(teacher_spec, student_spec, "all", kept)
    scan = not args.no_scan_layers
    layout = jax.jit(stack_layers) if scan else (lambda p: p)
    step = make_train_step(UNet(student_spec, dtype=dtype, remat=args.remat, scan_layers=scan),
                           UNet(teacher_spec, dtype=dtype, scan_layers=scan), tx, lr_fn,
                           alphas_cumprod(), pairs=pairs, accumulation=args.accumulation)
    frozen = {"teacher": layout(jax.tree.map(lambda x: x.astype(dtype), teacher)), "encoders": None}
    state = init_state(layout(student), tx, ema=False)
    batch = jax.device_put(batch)
    rng = jax.random.key(0)
    t0 = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=(0,)).lower(state, frozen, batch, rng).compile()
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    peak_bytes = None
    if memory is not None:
        peak_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
                      + memory.temp_size_in_bytes)
    state, metrics = compiled(state, frozen, batch, rng)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        state, metrics = compiled(state, frozen, batch, rng)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    return {"step_s": statistics.median(times), "compile_s": compile_s, "peak_bytes": peak_bytes,
            "loss": float(metrics["loss"]), "pairs": len(pairs)}


def torch_step(teacher_spec, teacher, student_spec, student, kept, batch, args) -> dict:
    """Time the usual PyTorch step on the same weights; → figures."""
    import torch

    from jaxdistill.convert import to_diffusers_state_dict
    from jaxdistill.reference import random_diffusers_unet, torch_distill_step

    device = "cuda" if torch.cuda.is_available() else "cpu"
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    models = []
    for spec, params in ((teacher_spec, teacher), (student_spec, student)):
        model = random_diffusers_unet(spec)
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in to_diffusers_state_dict(params).items()})
        models.append(model.to(device))
    t_model, s_model = models
    t_model.eval().requires_grad_(False)
    s_model.train()
    optimizer = torch.optim.AdamW(s_model.parameters(), lr=1e-5)
    pairs = feature_pairs(teacher_spec, student_spec, "all", kept)
    rng = np.random.default_rng(0)
    acp = alphas_cumprod()
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bf16" and device == "cuda")

    def one():
        noise = rng.standard_normal(batch["latents"].shape).astype(np.float32)
        timesteps = rng.integers(0, 1000, batch["latents"].shape[0])
        with autocast:
            torch_distill_step(t_model, s_model, optimizer, batch, noise, timesteps, acp, pairs, None)
        if device == "cuda":
            torch.cuda.synchronize()

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    one()  # warm-up
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        one()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024)
    return {"step_s": statistics.median(times), "peak_bytes": peak, "device": device,
            "threads": torch.get_num_threads()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=64, help="first block width of the reduced SDXL (SDXL: 320)")
    parser.add_argument("--full", action="store_true", help="full-size SDXL → SSD-1B (an accelerator's job)")
    parser.add_argument("--resolution", type=int, default=256, help="image side; latents are 1/8")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--remat", choices=("none", "full", "dots"), default="none")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per step (ours)")
    parser.add_argument("--no-scan-layers", action="store_true", help="unrolled transformer layers (the trainer's "
                        "scan_layers=False): slower compile, faster on XLA:CPU")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()

    teacher_spec = presets.SDXL if args.full else reduced_sdxl(args.width)
    teacher = jax.tree.map(np.asarray, init_params(teacher_spec, jax.random.key(0)))
    student_spec, student, kept = prune(teacher_spec, teacher, "ssd1b")
    side = args.resolution // 8
    batch = batch_for(teacher_spec, args.batch, side)
    dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32

    peak = peak_matmul_flops(dtype)
    teacher_flops = flops(teacher_spec, args.batch, side, SEQ_LEN)
    student_flops = flops(student_spec, args.batch, side, SEQ_LEN)
    model_flops = teacher_flops + 3 * student_flops
    ours = jax_step(teacher_spec, teacher, student_spec, student, kept, batch, args)
    gc.collect()
    ref = None if args.no_torch else torch_step(teacher_spec, teacher, student_spec, student, kept, batch, args)

    device = jax.devices()[0]
    out = {
        "device": f"{device.platform}: {getattr(device, 'device_kind', '')} "
                  f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)",
        "model": "SDXL → SSD-1B" + ("" if args.full else f" (SDXL topology, widths {teacher_spec.block_out_channels})"),
        "teacher_params": sum(x.size for x in jax.tree.leaves(teacher)),
        "student_params": sum(x.size for x in jax.tree.leaves(student)),
        "resolution": args.resolution, "batch": args.batch, "dtype": args.dtype, "remat": args.remat,
        "scan_layers": not args.no_scan_layers, "accumulation": args.accumulation,
        "model_tflop_per_step": model_flops / 1e12, "teacher_tflop": teacher_flops / 1e12,
        "student_tflop": student_flops / 1e12, "peak_matmul_tflops": peak / 1e12,
        "step_s": ours["step_s"], "samples_per_s": args.batch / ours["step_s"], "compile_s": ours["compile_s"],
        "flop_utilisation": model_flops / ours["step_s"] / peak, "peak_memory_gb": (ours["peak_bytes"] or 0) / 1e9,
        "feature_pairs": ours["pairs"],
    }
    if ref is not None:
        out |= {"torch_step_s": ref["step_s"], "torch_samples_per_s": args.batch / ref["step_s"],
                "ratio_vs_torch": ref["step_s"] / ours["step_s"], "torch_peak_memory_gb": ref["peak_bytes"] / 1e9,
                "torch_device": ref["device"], "torch_threads": ref["threads"],
                "torch_flop_utilisation": model_flops / ref["step_s"] / peak}
    width = max(len(k) for k in out)
    for k, v in out.items():
        print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
