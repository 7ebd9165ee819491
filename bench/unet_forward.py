"""Forward time of the full-size SDXL, SSD-1B and Vega UNets: our JAX UNet beside diffusers' PyTorch one.

For each model (random weights), in one process and on the same machine:
  JAX   — init the parameters, compile `UNet.apply(...).sample` ahead of time (the compile time is
          reported), one warm-up call, then `--iters` timed calls; the median is reported;
  torch — diffusers' `UNet2DConditionModel` built from `spec.to_diffusers_config()`, the same warm-up
          and timed calls under `torch.inference_mode()`.
Only one copy of a model is alive at a time (SDXL is 10.3 GB of float32 weights).

FLOPs are XLA's cost analysis of the compiled JAX forward (2 per multiply-add; convolutions count only
the taps that fall inside the image, and elementwise ops are included), printed beside the figures
PyTorch's FLOP counter gives for diffusers' models (design notes, batch 1, 64² and 128² latents).
GFLOP/s divides that one XLA count by each framework's time, so the two columns compare like for like.
"×SDXL" columns: SDXL's time ÷ the model's time (FLOP ×SDXL: the same for FLOPs, the ceiling).

JAX runs on its default backend (a GPU or TPU when there is one); torch on CUDA when available, with
TF32 matmuls allowed in fp32 as XLA's default precision does on GPUs. JAX's GPU memory is not
preallocated, so that torch finds room after it.

On a CPU the wall times are only as good as the machine is quiet: the process CPU time per forward is
also recorded (a second table). JAX's CPU time hardly moves with other programs' load; torch's
OpenMP threads spin while they wait for each other, so its CPU time grows under load too.

Run (from the repository root, with jaxdistill installed — `pip install -e .` — or PYTHONPATH=.):
    python bench/unet_forward.py                           # 512² images (64² latents), batch 1, fp32
    python bench/unet_forward.py --models ssd1b,vega --iters 5 --json bench/out/cpu.json
    python bench/unet_forward.py --resolution 1024 --batch 4 --dtype bf16   # on an accelerator
"""

from __future__ import annotations

import os

# Before JAX starts a GPU backend: allocate on demand, so that torch finds memory after JAX.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxdistill import UNet, init_params, presets  # noqa: E402
from jaxdistill.layers import ATTENTION  # noqa: E402
from jaxdistill.reference import diffusers_unet  # noqa: E402
from jaxdistill.spec import UNetSpec  # noqa: E402
from jaxdistill.unet import dummy_inputs, flops  # noqa: E402

NAMES = {"sdxl": "SDXL", "ssd1b": "SSD-1B", "vega": "Vega"}
# PyTorch FLOP counter on diffusers' models, batch 1, TFLOP by latent side (shared/docs/design.md §2).
TORCH_COUNTER_TFLOP = {64: {"sdxl": 1.589, "ssd1b": 0.980, "vega": 0.663},
                       128: {"sdxl": 6.761, "ssd1b": 4.208, "vega": 2.822}}
SEQ_LEN = 77


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="sdxl,ssd1b,vega",
                   help=f"comma-separated, from {','.join(presets.PRESETS)} (default: all)")
    p.add_argument("--resolution", type=int, default=512, help="image side in pixels; latents are /8 (default 512)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=None,
                   help="timed calls after one warm-up; the median is reported (default: 3 on CPU, 10 otherwise)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: bf16 params and compute in JAX, the model in bf16 in torch")
    p.add_argument("--attention", choices=ATTENTION, default="auto",
                   help="JAX attention kernel (auto: cuDNN's fused kernel on a GPU in bf16, else xla)")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch side")
    p.add_argument("--json", type=Path, default=None, help="write every figure to this file")
    args = p.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in args.models if m not in presets.PRESETS]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {sorted(presets.PRESETS)}")
    if args.resolution % 64:
        p.error(f"--resolution {args.resolution}: must be a multiple of 64 (latents /8, then two downsamplings)")
    return args


def make_inputs(spec: UNetSpec, batch: int, size: int, resolution: int) -> dict[str, np.ndarray]:
    """Float32 numpy inputs, NHWC sample [B, size, size, 4], context [B, 77, 2048], SDXL's 6 time ids."""
    rng = np.random.default_rng(0)
    shapes = dummy_inputs(spec, batch, size, SEQ_LEN)
    inputs = {k: rng.standard_normal(v.shape, dtype=np.float32) for k, v in shapes.items()}
    inputs["timesteps"] = np.full((batch,), 500.0, np.float32)
    inputs["time_ids"] = np.tile(np.array([resolution, resolution, 0, 0, resolution, resolution], np.float32),
                                 (batch, 1))
    return inputs


def time_calls(call, iters: int) -> dict:
    """One warm-up call, then `iters` timed ones; `call` must block until its result is ready.

    → forward_s (median wall time), times, and cpu_s / cpu_times: this process's CPU time per call
    (user + system, all threads)."""
    call()
    times, cpu_times = [], []
    for _ in range(iters):
        t0, c0 = time.perf_counter(), time.process_time()
        call()
        times.append(time.perf_counter() - t0)
        cpu_times.append(time.process_time() - c0)
    return dict(forward_s=statistics.median(times), times=times, cpu_s=statistics.median(cpu_times),
                cpu_times=cpu_times)


def bench_jax(spec: UNetSpec, inputs: dict[str, np.ndarray], dtype, iters: int, attention: str = "auto") -> dict:
    """Compile and time the JAX forward; → params, gflop, init_s, compile_s and `time_calls`' figures."""
    t0 = time.perf_counter()
    params = jax.block_until_ready(init_params(spec, jax.random.key(0), param_dtype=dtype))
    init_s = time.perf_counter() - t0
    n_params = sum(x.size for x in jax.tree.leaves(params))
    model = UNet(spec, dtype=dtype, param_dtype=dtype, attention=attention)
    x = {k: jnp.asarray(v) for k, v in inputs.items()}

    t0 = time.perf_counter()
    compiled = jax.jit(lambda p, x: model.apply({"params": p}, **x).sample).lower(params, x).compile()
    compile_s = time.perf_counter() - t0
    out = compiled(params, x)
    if not bool(jnp.isfinite(out).all()):
        raise RuntimeError(f"JAX forward gave non-finite values (depths {spec.down_depths} / {spec.up_depths})")
    timing = time_calls(lambda: jax.block_until_ready(compiled(params, x)), iters)
    # The plain-attention count: a fused kernel is a custom call that cost analysis cannot see.
    gflop = flops(spec, *inputs["sample"].shape[:2], inputs["encoder_hidden_states"].shape[1]) / 1e9
    return dict(params=n_params, gflop=gflop, init_s=init_s, compile_s=compile_s, **timing)


def bench_torch(spec: UNetSpec, inputs: dict[str, np.ndarray], dtype, iters: int, device) -> dict:
    """Time diffusers' forward; → `time_calls`' figures."""
    import torch

    model = diffusers_unet(spec, dtype=dtype, device=device)
    t = {k: torch.from_numpy(v).to(device) for k, v in inputs.items()}
    sample = t["sample"].permute(0, 3, 1, 2).contiguous().to(dtype)  # NHWC → NCHW
    ehs, cond = t["encoder_hidden_states"].to(dtype), {"text_embeds": t["text_embeds"].to(dtype),
                                                       "time_ids": t["time_ids"]}

    def call():
        out = model(sample, t["timesteps"], ehs, added_cond_kwargs=cond).sample
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    with torch.inference_mode():
        if not bool(torch.isfinite(call()).all()):
            raise RuntimeError(f"torch forward gave non-finite values (depths {spec.down_depths} / "
                               f"{spec.up_depths})")
        return time_calls(call, iters)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_devices(torch_device) -> dict[str, str]:
    d = jax.devices()[0]
    cores = f"{os.cpu_count()} cores"
    jax_dev = f"{d.platform}: {cpu_model()}, {cores}" if d.platform == "cpu" else f"{d.platform}: {d.device_kind}"
    out = {"jax": f"{jax_dev} (jax {jax.__version__})"}
    if torch_device is not None:
        import diffusers
        import torch

        name = (torch.cuda.get_device_name(torch_device) if torch_device.type == "cuda"
                else f"{cpu_model()}, {torch.get_num_threads()} threads")
        out["torch"] = f"{torch_device.type}: {name} (torch {torch.__version__}, diffusers {diffusers.__version__})"
    return out


def add_derived(rows: list[dict], size: int, batch: int) -> None:
    """GFLOP/s, torch÷JAX time, the design notes' FLOP count, and speed-ups over SDXL (when SDXL ran),
    from the median wall times and (`*_cpu` keys) from the process CPU times."""
    base = next((r for r in rows if r["model"] == "sdxl"), None)

    def ratio(num, den):
        return None if num is None or den is None else num / den

    for r in rows:
        ref = TORCH_COUNTER_TFLOP.get(size, {}).get(r["model"])
        r["torch_counter_gflop"] = ref * 1e3 * batch if ref is not None else None
        r["jax_gflops"] = ratio(r["gflop"], r["jax_forward_s"])
        r["torch_gflops"] = ratio(r["gflop"], r.get("torch_forward_s"))
        r["torch_over_jax"] = ratio(r.get("torch_forward_s"), r["jax_forward_s"])
        r["torch_over_jax_cpu"] = ratio(r.get("torch_cpu_s"), r["jax_cpu_s"])
        if base is not None:
            r["flop_vs_sdxl"] = ratio(base["gflop"], r["gflop"])
            for key in ("jax_forward_s", "torch_forward_s", "jax_cpu_s", "torch_cpu_s"):
                fw = key.split("_")[0]
                r[f"{fw}_vs_sdxl" + ("_cpu" if "cpu" in key else "")] = ratio(base.get(key), r.get(key))


WALL_COLUMNS = [  # header, key, format
    ("model", "model", None), ("params", "params", "{:,}"), ("GFLOP (XLA)", "gflop", "{:.1f}"),
    ("GFLOP (torch counter)", "torch_counter_gflop", "{:.0f}"), ("JAX compile s", "jax_compile_s", "{:.1f}"),
    ("JAX fwd s", "jax_forward_s", "{:.3f}"), ("JAX GFLOP/s", "jax_gflops", "{:.1f}"),
    ("torch fwd s", "torch_forward_s", "{:.3f}"), ("torch GFLOP/s", "torch_gflops", "{:.1f}"),
    ("torch÷JAX time", "torch_over_jax", "{:.2f}"), ("FLOP ×SDXL", "flop_vs_sdxl", "{:.2f}"),
    ("JAX ×SDXL", "jax_vs_sdxl", "{:.2f}"), ("torch ×SDXL", "torch_vs_sdxl", "{:.2f}"),
]
CPU_COLUMNS = [
    ("model", "model", None), ("JAX CPU s", "jax_cpu_s", "{:.2f}"), ("torch CPU s", "torch_cpu_s", "{:.2f}"),
    ("torch÷JAX", "torch_over_jax_cpu", "{:.2f}"), ("FLOP ×SDXL", "flop_vs_sdxl", "{:.2f}"),
    ("JAX ×SDXL", "jax_vs_sdxl_cpu", "{:.2f}"), ("torch ×SDXL", "torch_vs_sdxl_cpu", "{:.2f}"),
]


def format_table(rows: list[dict], columns: list[tuple]) -> str:
    """A Markdown table, one row per model."""
    def cell(r, key, fmt):
        v = r.get(key)
        if key == "model":
            return NAMES[v]
        return "–" if v is None else fmt.format(v)

    lines = ["| " + " | ".join(h for h, _, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r, k, f) for _, k, f in columns) + " |" for r in rows]
    return "\n".join(lines)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _times(t: dict) -> str:
    return (f"{t['forward_s']:.3f} s median (wall: {', '.join(f'{x:.2f}' for x in t['times'])}; "
            f"CPU: {', '.join(f'{x:.2f}' for x in t['cpu_times'])})")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    size = args.resolution // 8
    on_cpu = jax.default_backend() == "cpu"
    iters = args.iters or (3 if on_cpu else 10)
    jax_dtype = jnp.bfloat16 if args.dtype == "bf16" else jnp.float32
    torch_device = torch_dtype = None
    if not args.no_torch:
        import torch

        torch_device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        torch.backends.cuda.matmul.allow_tf32 = True  # as XLA's default precision on GPUs
        torch_dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    devices = describe_devices(torch_device)
    load_start = os.getloadavg()

    rows = []
    for name in args.models:
        spec = presets.PRESETS[name]
        inputs = make_inputs(spec, args.batch, size, args.resolution)
        j = bench_jax(spec, inputs, jax_dtype, iters, args.attention)
        jax.clear_caches()
        gc.collect()
        log(f"{name}: JAX params {j['init_s']:.1f} s, compile {j['compile_s']:.1f} s, forward {_times(j)}")
        row = dict(model=name, params=j["params"], gflop=j["gflop"], jax_init_s=j["init_s"],
                   jax_compile_s=j["compile_s"], jax_forward_s=j["forward_s"], jax_times=j["times"],
                   jax_cpu_s=j["cpu_s"], jax_cpu_times=j["cpu_times"])
        if torch_device is not None:
            t0 = time.perf_counter()
            t = bench_torch(spec, inputs, torch_dtype, iters, torch_device)
            gc.collect()
            if torch_device.type == "cuda":
                torch.cuda.empty_cache()  # room for the next model's JAX side
            log(f"{name}: torch forward {_times(t)}; {time.perf_counter() - t0:.1f} s with the build")
            row |= dict(torch_forward_s=t["forward_s"], torch_times=t["times"], torch_cpu_s=t["cpu_s"],
                        torch_cpu_times=t["cpu_times"])
        rows.append(row)
        add_derived(rows, size, args.batch)
        save(args, size, iters, devices, dict(start=load_start, end=os.getloadavg()), rows)  # each model, as it ends
    load = dict(start=load_start, end=os.getloadavg())

    print(f"UNet forward, {args.resolution}² images ({size}² latents), batch {args.batch}, {args.dtype}, "
          f"median of {iters} after 1 warm-up")
    for k, v in devices.items():
        print(f"  {k}: {v}")
    print(f"  load average (1, 5, 15 min): start {', '.join(f'{x:.2f}' for x in load['start'])}; "
          f"end {', '.join(f'{x:.2f}' for x in load['end'])}")
    print(format_table(rows, WALL_COLUMNS))
    if on_cpu:
        print("\nProcess CPU time per forward (median, all threads; JAX's barely moves with other load):")
        print(format_table(rows, CPU_COLUMNS))
    save(args, size, iters, devices, load, rows)


def save(args: argparse.Namespace, size: int, iters: int, devices: dict, load: dict, rows: list[dict]) -> None:
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = dict(resolution=args.resolution, latent_size=size, batch=args.batch, dtype=args.dtype,
                      attention=args.attention, iters=iters, devices=devices, load_average=load, rows=rows)
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
