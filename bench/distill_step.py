"""Speed of one distillation step: ours (JAX) beside the usual PyTorch step, same recipe, model, batch, device.

Ours: `jaxdistill.step.make_train_step` exactly as the trainer builds it with `configs/ssd1b.py` (teacher
frozen, student pruned with the ssd1b plan, every resnet/attention tap, AdamW, that config's attention
kernel, remat and layer layout — unrolled transformer layers —, donated state), compiled ahead of time
(compile time reported), warmed up, then `--iters` timed steps. `--variant` compiles and times others in
the same run (scanned layers, another batch, remat, an XLA option), for before/after figures side by side.
PyTorch: `jaxdistill.reference.torch_distill_step` — diffusers teacher under `no_grad`, forward hooks on
the same taps, AdamW, gradient clipping; with `--dtype bf16` the teacher's weights in bf16 and bf16 autocast
(on a CPU too), with `--dtype fp32` TF32 matmuls on a GPU, as XLA's default precision there (`torch_dtype`,
`torch_tf32` in the JSON). Neither side's timed step copies from the host: PyTorch's batch, noise and
timesteps are device tensors made before the timing (ours draws its noise inside its compiled step).

FLOP utilisation = model FLOPs per step ÷ step time ÷ peak. Model FLOPs = teacher forward + 3 × student
forward (forward + backward), from XLA's cost analysis of each forward lowered for the CPU
(`jaxdistill.train.step_flops`, the count the trainer logs as TFLOP/s); the peak is a large
square matmul in the step's compute dtype, measured by this script on the same device (the best of a few
runs), before and again after the steps: the larger one counts (a peak measured while other jobs held the
cores reads low; `peak_suspect` when a utilisation still comes out above 1). Peak memory: XLA's compiled
memory analysis of the step (arguments + outputs − aliased + temps); PyTorch: `torch.cuda.max_memory_allocated`
on a GPU, the growth of the process's peak RSS on a CPU.

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
import importlib.util  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from jaxdistill import presets  # noqa: E402
from jaxdistill.config import REMAT  # noqa: E402
from jaxdistill.layers import ATTENTION, stack_layers  # noqa: E402
from jaxdistill.prune import feature_pairs, prune  # noqa: E402
from jaxdistill.records import atomic_json  # noqa: E402
from jaxdistill.schedule import alphas_cumprod  # noqa: E402
from jaxdistill.spec import UNetSpec  # noqa: E402
from jaxdistill.step import init_state, make_optimizer, make_train_step  # noqa: E402
from jaxdistill.train import step_flops  # noqa: E402
from jaxdistill.unet import UNet, flops, init_params  # noqa: E402

SEQ_LEN = 77
START = time.perf_counter()


def progress(message: str) -> None:
    """One line on stdout, at once, with the seconds since the start: a run cut short by its time limit
    (a lent GPU's) still says how far it got and where the time went."""
    print(f"[{time.perf_counter() - START:6.1f} s] {message}", flush=True)


def load_config(path: Path):
    """`get_config()` of a config file, as `python -m jaxdistill.train --config PATH` reads it."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


SSD1B = load_config(Path(__file__).resolve().parents[1] / "configs" / "ssd1b.py")  # the step's defaults


def reduced_sdxl(width: int) -> UNetSpec:
    """SDXL's topology (transformer depths 2/10, 10-deep mid attention, SDXL's conditioning widths) with
    block widths width, 2·width, 4·width and heads of 32 channels."""
    widths = (width, 2 * width, 4 * width)
    return presets.SDXL.replace(block_out_channels=widths, num_attention_heads=tuple(max(w // 32, 1) for w in widths),
                                norm_num_groups=min(32, width // 2))


def peak_matmul_flops(dtype, n: int | None = None, repeats: int = 5) -> tuple[float, int]:
    """Best FLOP/s of an n×n×n matmul in `dtype` on the default device, and n (default: 8192 on accelerators,
    where several products are queued per timing so that dispatch does not count; 4096 on a CPU)."""
    accelerator = jax.default_backend() != "cpu"
    n = n or (8192 if accelerator else 4096)
    inner = 10 if accelerator else 1
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            c = mm(a, b)
        c.block_until_ready()
        best = min(best, (time.perf_counter() - t0) / inner)
    return 2 * n**3 / best, n


def batch_for(spec: UNetSpec, batch: int, side: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    pooled = spec.projection_class_embeddings_input_dim - 6 * spec.addition_time_embed_dim
    return {"latents": rng.standard_normal((batch, side, side, 4), np.float32),
            "encoder_hidden_states": rng.standard_normal((batch, SEQ_LEN, spec.cross_attention_dim), np.float32),
            "text_embeds": rng.standard_normal((batch, pooled), np.float32),
            "time_ids": np.tile(np.array([1024, 1024, 0, 0, 1024, 1024], np.float32), (batch, 1))}


def compute_dtype(args) -> type:
    return jnp.bfloat16 if args.dtype == "bf16" else jnp.float32


def _bool(text: str) -> bool:
    return {"true": True, "false": False}[text.lower()]


def _option(text: str) -> bool | int | str:
    """An XLA option's value as XLA wants its type: true/false → bool, digits → int, else the string."""
    return _bool(text) if text.lower() in ("true", "false") else int(text) if text.lstrip("-").isdigit() else text


VARIANT_KEYS = {"attention": str, "scan_layers": _bool, "remat": str, "batch": int, "accumulation": int,
                "scan_accumulation": _bool}


def parse_variant(text: str, args) -> dict:
    """"key=value,key=value" over the run's options (attention, scan_layers, remat, batch, accumulation,
    scan_accumulation: micro-batches as a scan or straight-line code, default the step's own choice) → the
    variant's settings; keys starting with "xla_" are XLA compiler options for this compile alone."""
    variant = {"attention": args.attention, "scan_layers": SSD1B.scan_layers, "remat": args.remat,
               "batch": args.batch, "accumulation": args.accumulation, "scan_accumulation": None, "xla": {}}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or (key not in VARIANT_KEYS and not key.startswith("xla_")):
            raise SystemExit(f"--variant {text!r}: expected key=value pairs, keys {sorted(VARIANT_KEYS)} or xla_*")
        try:
            if key.startswith("xla_"):
                variant["xla"][key] = _option(value)
            else:
                variant[key] = VARIANT_KEYS[key](value)
        except (KeyError, ValueError):
            raise SystemExit(f"--variant {text!r}: bad value for {key}: {value!r}") from None
    if variant["attention"] not in ATTENTION or variant["remat"] not in REMAT:
        raise SystemExit(f"--variant {text!r}: attention must be one of {ATTENTION}, remat one of {REMAT}")
    if variant["accumulation"] < 1 or variant["batch"] % variant["accumulation"]:
        raise SystemExit(f"--variant {text!r}: batch {variant['batch']} does not split into "
                         f"{variant['accumulation']} micro-batches")
    return variant


def setup(teacher_spec, teacher, student_spec, args, variant: dict):
    """What our step and its parts share: (teacher UNet, student UNet, the teacher's weights in the
    compute dtype and the step's layout, the layout function for the student's weights)."""
    dtype, scan, attention = compute_dtype(args), variant["scan_layers"], variant["attention"]
    layout = jax.jit(stack_layers) if scan else (lambda p: p)
    teacher_model = UNet(teacher_spec, dtype=dtype, scan_layers=scan, attention=attention)
    student_model = UNet(student_spec, dtype=dtype, scan_layers=scan, attention=attention, remat=variant["remat"])
    return teacher_model, student_model, layout(jax.tree.map(lambda x: jnp.asarray(x, dtype), teacher)), layout


def error_text(e: Exception) -> str:
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]


def jax_step(teacher_spec, teacher, student_spec, student, kept, args, variant: dict, record) -> dict:
    """Compile and time our step in one variant (`parse_variant`); → figures. `record(figures)` is called
    with the figures so far after compiling and after timing (a run killed by its time limit keeps them)."""
    name = variant_name(variant)
    tx, lr_fn = make_optimizer(1e-5)
    pairs = feature_pairs(teacher_spec, student_spec, "all", kept)
    teacher_model, student_model, teacher_params, layout = setup(teacher_spec, teacher, student_spec, args, variant)
    step = make_train_step(student_model, teacher_model, tx, lr_fn, alphas_cumprod(), pairs=pairs,
                           accumulation=variant["accumulation"], scan_accumulation=variant["scan_accumulation"])
    frozen = {"teacher": teacher_params, "encoders": None}
    state = init_state(layout(student), tx, ema=False)
    batch = jax.device_put(batch_for(teacher_spec, variant["batch"], args.resolution // 8))
    rng = jax.random.key(0)
    t0 = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(0,)).lower(state, frozen, batch, rng)
    compiled = lowered.compile(compiler_options=variant["xla"] or None)
    compile_s = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    peak_bytes = None
    if memory is not None:
        peak_bytes = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
                      + memory.temp_size_in_bytes)
    record({"compile_s": compile_s, "peak_memory_gb": (peak_bytes or 0) / 1e9})
    progress(f"{name}: compiled in {compile_s:.1f} s, {(peak_bytes or 0) / 1e9:.1f} GB")
    state, metrics = compiled(state, frozen, batch, rng)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(args.iters):
        t0 = time.perf_counter()
        state, metrics = compiled(state, frozen, batch, rng)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    stats = jax.devices()[0].memory_stats() or {}  # allocator's high-water mark (GPU/TPU; includes the setup)
    out = {"step_s": statistics.median(times), "compile_s": compile_s,
           "peak_memory_gb": (peak_bytes or 0) / 1e9, "loss": float(metrics["loss"]), "pairs": len(pairs),
           "measured_peak_memory_gb": stats.get("peak_bytes_in_use", 0) / 1e9 or None}
    record(out)
    if args.profile:  # a failing profiler (no CUPTI, say) must not cost the figures above
        trace_dir = Path(args.profile) / name
        try:
            with jax.profiler.trace(str(trace_dir)):
                for _ in range(PROFILED_STEPS):
                    state, metrics = compiled(state, frozen, batch, rng)
                jax.block_until_ready(metrics)
            out["profile"] = profile_summary(trace_dir, compiled.as_text(), PROFILED_STEPS)
            # the share of the step's wall time that the busiest timeline spends in kernels (on a GPU the rest
            # is idle: launch gaps, host syncs)
            out["profile"]["busy"] = max(out["profile"]["by_line"].values(), default=0) / 1e3 / out["step_s"]
            progress(f"{name}: profiled, GPU/CPU busy {out['profile']['busy']:.0%} of the step")
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            out["profile"] = {"error": error_text(e)}
    return out


PROFILED_STEPS = 3


def variant_name(variant: dict) -> str:
    parts = [variant["attention"], "scan" if variant["scan_layers"] else "unrolled", f"remat-{variant['remat']}",
             f"b{variant['batch']}", f"acc{variant['accumulation']}"]
    if variant["scan_accumulation"] is not None:
        parts.append("acc-scan" if variant["scan_accumulation"] else "acc-straight")
    return "_".join(parts + [f"{k}-{v}" for k, v in variant["xla"].items()])


def profile_summary(trace_dir: Path, hlo: str, steps: int, top: int = 25) -> dict:
    """Where a step's time goes, from a `jax.profiler` trace: the time of every XLA op (events carrying
    an `hlo_op` stat, on the accelerator's planes, or the host's on a CPU) per step, summed by the JAX
    primitive that made it (the last part of the op's `op_name` metadata in the compiled HLO), by pass
    (backward: under `transpose(`; forward: the UNets' other ops, teacher and student; other: the
    optimizer, the losses and ops without a name), and the `top` ops; on a GPU also by kernel (an event's
    name there is the kernel's, also inside XLA's command buffers, whose ops the profile cannot name) and
    by kind of kernel (`kernel_kind`). Times in ms per step."""
    names = {}  # HLO instruction → its op_name metadata
    for m in re.finditer(r"%?([\w.\-]+) = [^\n]*?op_name=\"([^\"]*)\"", hlo):
        names[m.group(1)] = m.group(2)
    path = max(trace_dir.glob("**/*.xplane.pb"), key=lambda p: p.stat().st_mtime)  # this run's, not an older one
    planes = list(jax.profiler.ProfileData.from_file(str(path)).planes)
    devices = [p for p in planes if p.name.startswith("/device:")] or planes
    ops: dict[str, float] = {}
    kernels: dict[str, float] = {}
    by_line: dict[str, float] = {}  # per timeline (a GPU stream, a CPU thread): overlapping lines sum to > the step
    for plane in devices:
        for line in plane.lines:
            for event in line.events:
                op = dict(event.stats).get("hlo_op")
                if op is not None:
                    ops[op] = ops.get(op, 0.0) + event.duration_ns / 1e6 / steps
                    kernels[event.name] = kernels.get(event.name, 0.0) + event.duration_ns / 1e6 / steps
                    key = f"{plane.name}/{line.name}"
                    by_line[key] = by_line.get(key, 0.0) + event.duration_ns / 1e6 / steps
    by_primitive: dict[str, float] = {}
    by_pass = {"forward": 0.0, "backward": 0.0, "other": 0.0}  # other: the optimizer, losses, unnamed ops
    for op, ms in ops.items():
        op_name = names.get(op, "")
        primitive = re.sub(r"\[.*", "", op_name.rsplit("/", 1)[-1]) or op.rstrip("0123456789.")
        by_primitive[primitive] = by_primitive.get(primitive, 0.0) + ms
        by_pass["backward" if "transpose(" in op_name else "forward" if "(UNet)" in op_name else "other"] += ms
    ranked = sorted(ops.items(), key=lambda kv: -kv[1])[:top]
    out = {"ms_per_step": sum(ops.values()), "trace": str(path), "by_line": by_line,
           "by_primitive": dict(sorted(by_primitive.items(), key=lambda kv: -kv[1])), "by_pass": by_pass,
           "top_ops": [{"op": op, "ms": ms, "op_name": names.get(op, "")[-160:]} for op, ms in ranked]}
    if any(name not in ops for name in kernels):  # kernel names of their own (a GPU), not the ops' (a CPU)
        by_kind: dict[str, float] = {}
        for name, ms in kernels.items():
            kind = kernel_kind(name)
            by_kind[kind] = by_kind.get(kind, 0.0) + ms
        out["by_kernel_kind"] = dict(sorted(by_kind.items(), key=lambda kv: -kv[1]))
        ranked = sorted(kernels.items(), key=lambda kv: -kv[1])[:top]
        out["top_kernels"] = [{"kernel": k[:200], "ms": ms, "kind": kernel_kind(k)} for k, ms in ranked]
    return out


# Kinds of GPU kernel by name, first match wins: attention (cuDNN's fused kernels, named fprop/bprop too), then
# cuDNN's convolutions (fprop/dgrad/wgrad, implicit GEMM; cuDNN runs nothing else here) before the matmul
# libraries (cuBLAS's xmma/nvjet, CUTLASS, XLA's Triton GEMM fusions), whose names they share parts of.
# Not "conv": XLA names its dtype-conversion fusions "..._convert_...".
KERNEL_KINDS = (("attention", ("sdpa", "fmha", "flash", "attention")),
                ("convolution", ("fprop", "dgrad", "wgrad", "convolution", "convolve", "implicit_gemm", "cudnn")),
                ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "__dot", "_dot_")),
                ("reduction", ("reduce", "reduction")),
                ("copy/transpose", ("transpose", "copy", "memcpy", "memset", "concatenate", "slice")),
                ("elementwise fusion", ("fusion", "loop_", "wrapped_")))


def kernel_kind(name: str) -> str:
    """What a GPU kernel does, from its name (`KERNEL_KINDS`); "other" when no pattern matches."""
    lower = name.lower()
    return next((kind for kind, parts in KERNEL_KINDS if any(p in lower for p in parts)), "other")


def timed_call(fn, *args, iters: int) -> tuple[float, float]:
    """(compile s, median s per call) of jit(fn)(*args)."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return compile_s, statistics.median(times)


def breakdown(teacher_spec, teacher, student_spec, student, batch, args, variant: dict) -> dict:
    """The step's parts, each compiled and timed alone (where the time goes): teacher forward, student
    forward, student forward + backward (of the mean squares of its output and every tap, so the taps'
    gradients flow as in the step), and the AdamW update of the student's float32 weights."""
    teacher_model, student_model, t_params, layout = setup(teacher_spec, teacher, student_spec, args, variant)
    x = {k: jnp.asarray(v) for k, v in batch.items()}
    x = {"sample": x.pop("latents"), "timesteps": jnp.full((args.batch,), 500), **x}
    s_params = layout(jax.tree.map(jnp.asarray, student))
    forward = lambda m: lambda p, x: m.apply({"params": p}, **x)  # noqa: E731

    def student_loss(p, x):
        out = student_model.apply({"params": p}, **x)
        return sum(jnp.mean(jnp.square(f.astype(jnp.float32))) for f in (out.sample, *out.features.values()))

    tx, _ = make_optimizer(1e-5)
    opt_state = tx.init(s_params)

    def update(p, g, o):
        updates, o = tx.update(g, o, p)
        return optax.apply_updates(p, updates), o

    parts = {"teacher_forward": (forward(teacher_model), t_params, x),
             "student_forward": (forward(student_model), s_params, x),
             "student_forward_backward": (jax.grad(student_loss), s_params, x),
             "adamw_update": (update, s_params, s_params, opt_state)}
    out = {}
    for name, (fn, *inputs) in parts.items():
        compile_s, step_s = timed_call(fn, *inputs, iters=args.iters)
        out[name] = {"ms": 1e3 * step_s, "compile_s": compile_s}
        print(f"breakdown {name}: {1e3 * step_s:.2f} ms (compile {compile_s:.1f} s)", flush=True)
    return out


def torch_step(teacher_spec, teacher, student_spec, student, kept, batch, args) -> dict:
    """Time the usual PyTorch step on the same weights; → figures. In bf16 (GPU or CPU): the frozen teacher's
    weights in bf16 (diffusers' scripts' `weight_dtype`), the student's fp32 under bf16 autocast. In fp32 on
    a GPU: TF32 matmuls and convolutions, as XLA's default precision for f32 there."""
    import torch

    from jaxdistill.reference import diffusers_unet, torch_distill_step

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = args.dtype == "bf16"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t_model = diffusers_unet(teacher_spec, teacher, torch.bfloat16 if bf16 else torch.float32, device)
    s_model = diffusers_unet(student_spec, student, torch.float32, device)
    t_model.requires_grad_(False)
    progress(f"PyTorch: models built on {device}")
    s_model.train()
    optimizer = torch.optim.AdamW(s_model.parameters(), lr=1e-5)
    pairs = feature_pairs(teacher_spec, student_spec, "all", kept)
    rng = np.random.default_rng(0)
    acp = alphas_cumprod()
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)

    accumulation = args.torch_accumulation or args.accumulation
    # the batch, and noise and timesteps of every step, on the device before the timing (ours draws them
    # inside its compiled step)
    tensor = lambda x, dtype=torch.float32: torch.from_numpy(np.array(x)).to(device, dtype)  # noqa: E731
    shape = batch["latents"].shape
    draws = [(tensor(rng.standard_normal(shape)), tensor(rng.integers(0, 1000, shape[0]), torch.long))
             for _ in range(args.iters + 1)]
    batch, acp = {k: tensor(v) for k, v in batch.items()}, tensor(acp)

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def one(noise, timesteps):
        with autocast:
            torch_distill_step(t_model, s_model, optimizer, batch, noise, timesteps, acp, pairs, None,
                               accumulation=accumulation)
        sync()

    one(*draws[0])  # warm-up
    times = []
    for draw in draws[1:]:
        t0 = time.perf_counter()
        one(*draw)
        times.append(time.perf_counter() - t0)
    progress(f"PyTorch: {statistics.median(times):.4f} s per step (median of {args.iters})")
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024)
    return {"step_s": statistics.median(times), "peak_bytes": peak,
            "device": device, "threads": torch.get_num_threads(),
            "dtype": "bf16 autocast, bf16 teacher" if bf16 else "fp32",
            "tf32": device == "cuda" and torch.backends.cuda.matmul.allow_tf32}


SETTINGS = ("batch", "attention", "remat", "scan_layers", "accumulation", "model_tflop_per_step")
HEADLINE = ("step_s", "samples_per_s", "compile_s", "flop_utilisation", "peak_memory_gb", "measured_peak_memory_gb",
            "ratio_vs_torch", "pairs", "error")


def headline(out: dict) -> None:
    """The first variant's settings and figures (as far as it got) to the top level of `out`, so that the top
    level describes one step: its batch and FLOPs with its step time, samples/s and utilisation."""
    first = out["variants"][0]
    out.update({k: first[k] for k in SETTINGS + HEADLINE if k in first})


def rescale_utilisation(out: dict, factor: float) -> None:
    """Every FLOP utilisation in `out` (top level, variants, breakdown) times `factor`: a new peak."""
    for figures in (out, *out.get("variants", []), *out.get("breakdown", {}).values()):
        for key in ("flop_utilisation", "torch_flop_utilisation"):
            if isinstance(figures, dict) and key in figures:
                figures[key] *= factor


def attempt(fn, *args) -> dict:
    """fn(*args), or {"error": ...} when it fails (out of memory, a kernel the platform lacks): the
    failure is recorded and printed, and the run goes on to its other measurements."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 — XLA's and torch's errors have no common type
        traceback.print_exc()
        return {"error": error_text(e)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=64, help="first block width of the reduced SDXL (SDXL: 320)")
    parser.add_argument("--full", action="store_true", help="full-size SDXL → SSD-1B (an accelerator's job)")
    parser.add_argument("--resolution", type=int, default=256, help="image side; latents are 1/8")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--remat", choices=REMAT, default=SSD1B.remat)
    parser.add_argument("--attention", choices=ATTENTION, default=SSD1B.attention,
                        help="attention kernel of our step (auto: cuDNN's fused kernel on a GPU in bf16, else the "
                             "plain XLA path)")
    parser.add_argument("--variant", action="append", default=[], metavar="KEY=VALUE,...",
                        help="a variant of our step to compile and time, repeatable, in order (the first is the "
                             "headline): overrides of attention, scan_layers, remat, batch, accumulation, "
                             "scan_accumulation, and xla_* compiler options, e.g. 'scan_layers=false' or "
                             "'batch=4,remat=dots'")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--accumulation", type=int, default=1, help="micro-batches per step (ours)")
    parser.add_argument("--torch-accumulation", type=int, help="micro-batches per step of the PyTorch reference "
                        "(default: --accumulation), for a global batch whose micro-batch fits PyTorch's memory "
                        "less well than ours")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--profile", help="trace 3 steps of each variant into this folder (jax.profiler; TensorBoard "
                        "reads it) and add a summary: time by JAX primitive, by pass, the top ops")
    parser.add_argument("--breakdown", action="store_true", help="also time the step's parts alone (teacher "
                        "forward, student forward, student forward + backward, AdamW) as the first variant, at --batch")
    parser.add_argument("--peak-size", type=int, help="side of the square matmul that measures the peak (default: "
                        "8192 on an accelerator, 4096 on a CPU; smaller reads lower and takes less time)")
    parser.add_argument("--json", help="write every figure here (rewritten after each phase)")
    args = parser.parse_args(argv)
    variants = [parse_variant(v, args) for v in args.variant or [""]]
    if args.torch_accumulation is not None and (args.torch_accumulation < 1 or args.batch % args.torch_accumulation):
        parser.error(f"--torch-accumulation {args.torch_accumulation} does not divide --batch {args.batch}")

    teacher_spec = presets.SDXL if args.full else reduced_sdxl(args.width)
    teacher = jax.tree.map(np.asarray, init_params(teacher_spec, jax.random.key(0)))
    student_spec, student, kept = prune(teacher_spec, teacher, "ssd1b")
    progress(f"weights drawn: teacher {teacher_spec.block_out_channels}, student pruned")
    side = args.resolution // 8
    batch = batch_for(teacher_spec, args.batch, side)
    dtype = compute_dtype(args)

    peak_before, peak_size = peak_matmul_flops(dtype, args.peak_size)
    peak = peak_before
    # linear in the batch: per sample, as step_flops counts them (cached), so each model is lowered once
    teacher_flops = flops(teacher_spec, 1, side, SEQ_LEN) * args.batch
    student_flops = flops(student_spec, 1, side, SEQ_LEN) * args.batch
    model_flops = step_flops(teacher_spec, student_spec, batch, args.batch)  # the trainer's count, as it logs
    progress(f"peak {peak / 1e12:.3f} TFLOP/s, {model_flops / 1e12:.3f} TFLOP per step at batch {args.batch}")
    device = jax.devices()[0]
    scale = variants[0]["batch"] / args.batch  # FLOPs are linear in the batch; the top level is the headline's
    out = {
        "device": f"{device.platform}: {getattr(device, 'device_kind', '')} "
                  f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs)",
        "software": f"jax {jax.__version__}",
        "model": "SDXL → SSD-1B" + ("" if args.full else f" (SDXL topology, widths {teacher_spec.block_out_channels})"),
        "teacher_params": sum(x.size for x in jax.tree.leaves(teacher)),
        "student_params": sum(x.size for x in jax.tree.leaves(student)),
        "resolution": args.resolution, "dtype": args.dtype,  # + the headline's settings:
        **{k: variants[0][k] for k in SETTINGS if k in variants[0]},
        "model_tflop_per_step": model_flops * scale / 1e12, "teacher_tflop": teacher_flops * scale / 1e12,
        "student_tflop": student_flops * scale / 1e12, "peak_matmul_tflops": peak / 1e12,
        "peak_matmul_size": peak_size,
    }

    def report():  # the whole file, replaced at once: a run killed while writing keeps the last complete one
        if args.json:
            path = Path(args.json)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_json(path, out)

    report()  # what is known before any step runs

    # PyTorch first: its caching allocator hands memory back when done; JAX's keeps what it has taken.
    if not args.no_torch:
        ref = attempt(torch_step, teacher_spec, teacher, student_spec, student, kept, batch, args)
        import torch

        out["software"] += f", torch {torch.__version__}"
        if "error" in ref:
            out["torch_error"] = ref["error"]
        else:
            out |= {"torch_step_s": ref["step_s"], "torch_samples_per_s": args.batch / ref["step_s"],
                    "torch_batch": args.batch, "torch_accumulation": args.torch_accumulation or args.accumulation,
                    "torch_dtype": ref["dtype"], "torch_tf32": ref["tf32"],
                    "torch_peak_memory_gb": ref["peak_bytes"] / 1e9, "torch_device": ref["device"],
                    "torch_threads": ref["threads"], "torch_flop_utilisation": model_flops / ref["step_s"] / peak}
        report()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand the models' memory back before JAX's step

    out["variants"] = []
    for variant in variants:
        entry = {"name": variant_name(variant), **variant,  # model FLOPs scale with the batch
                 "model_tflop_per_step": model_flops * variant["batch"] / args.batch / 1e12}
        out["variants"].append(entry)

        def record(figures: dict, entry=entry, variant=variant) -> None:
            timed = "step_s" in figures and "step_s" not in entry
            entry.update(figures)
            if timed:
                entry.update(samples_per_s=variant["batch"] / figures["step_s"],
                             flop_utilisation=entry["model_tflop_per_step"] * 1e12 / figures["step_s"] / peak)
                if "torch_step_s" in out and variant["batch"] == args.batch:
                    entry["ratio_vs_torch"] = out["torch_step_s"] / figures["step_s"]
            if entry is out["variants"][0]:
                headline(out)
            report()  # before the line below: whoever reads the line finds the file written
            if timed:
                progress(f"{entry['name']}: {figures['step_s']:.4f} s per step (median of {args.iters}), "
                         f"{entry['samples_per_s']:.2f} samples/s, {entry['flop_utilisation']:.1%} of peak"
                         + (f", {entry['ratio_vs_torch']:.2f}× PyTorch" if "ratio_vs_torch" in entry else ""))

        record(attempt(jax_step, teacher_spec, teacher, student_spec, student, kept, args, variant, record))
        gc.collect()
    if args.breakdown:
        parts = attempt(breakdown, teacher_spec, teacher, student_spec, student, batch, args, variants[0])
        for name, flop in (("teacher_forward", teacher_flops), ("student_forward", student_flops),
                           ("student_forward_backward", 3 * student_flops)):
            if name in parts:
                parts[name]["flop_utilisation"] = flop / (parts[name]["ms"] / 1e3) / peak
        out["breakdown"] = parts
        report()
    # the peak again: one measured while other jobs held the cores reads low and inflates every utilisation
    peak_after, _ = peak_matmul_flops(dtype, peak_size)
    progress(f"peak after the steps {peak_after / 1e12:.3f} TFLOP/s (before: {peak_before / 1e12:.3f})")
    out["peak_matmul_tflops_before_after"] = [peak_before / 1e12, peak_after / 1e12]
    if peak_after > peak:
        rescale_utilisation(out, peak / peak_after)
        peak = peak_after
        out["peak_matmul_tflops"] = peak / 1e12
    utilisations = [f["flop_utilisation"] for f in out["variants"] if "flop_utilisation" in f]
    if max(utilisations + [out.get("torch_flop_utilisation", 0)]) > 1:
        out["peak_suspect"] = True
        print("warning: a FLOP utilisation above 1: the measured peak is too low (taken on a loaded machine?)",
              flush=True)
    headline(out)
    report()
    width = max(len(k) for k in out)
    for k, v in out.items():
        if k not in ("variants", "breakdown"):
            print(f"{k:<{width}}  {v:.4g}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    for v in out["variants"]:
        print("variant", {k: round(x, 4) if isinstance(x, float) else x for k, x in v.items() if k != "profile"})
        if "by_pass" in v.get("profile", {}):
            p = v["profile"]
            print(f"  profile: {p['ms_per_step']:.1f} ms of ops per step (busiest timeline {p['busy']:.0%} of it;",
                  {k: round(x, 1) for k, x in p["by_line"].items()}, "), by pass",
                  {k: round(x, 1) for k, x in p["by_pass"].items()}, "top primitives",
                  {k: round(x, 1) for k, x in list(p["by_primitive"].items())[:8]},
                  *(("by kind of kernel", {k: round(x, 1) for k, x in p["by_kernel_kind"].items()})
                    if "by_kernel_kind" in p else ()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
