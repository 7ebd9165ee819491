"""Per-device memory of the full-size SSD-1B and Vega distillation steps, from XLA's compiled memory analysis.

Builds the step `python -m jaxdistill.train` builds (`jaxdistill.train.run_stage`): the student UNet
(scanned transformer layers as in the base config — `configs/ssd1b.py` unrolls them, which measured 14 %
less on an H100, bench/NOTES.md —, bfloat16 compute, float32 master weights, the chosen `remat` policy) distilled
from SDXL's UNet (bfloat16 parameters) with the default recipe of `jaxdistill.config.base_config` (task +
output + feature KD over every resnet and attention tap, AdamW behind global-norm clipping), on a
(data, fsdp, tensor) mesh with the trainer's placements (`jaxdistill.sharding`), the state donated. Every
input is abstract (`jax.ShapeDtypeStruct`): nothing is allocated or run. The step is lowered and compiled
for the mesh, and `Compiled.memory_analysis()` gives the per-device sizes of the SPMD-partitioned program:

    argument  the inputs one device holds: the training state (master weights, AdamW moments), the teacher's
              parameters, its slice of the batch, the key
    output    the new state and the metrics
    alias     the part of the output written into donated input buffers (the state, when donation works)
    temp      every intermediate (activations kept for the backward pass, gradients, the accumulation
              carry, workspace), as XLA's buffer assignment packs them: already the peak over the program
    peak  ≈   argument + output − alias + temp

Arguments stay live for the whole step (the caller owns them); outputs that could not be written into a
donated argument need buffers of their own; temp is the packed size of the intermediates. Generated code
is reported separately (0 on XLA:CPU) and left out of the peak, as are the runtime's own allocations —
hence the 90 % rule of the fits-on columns (✓ when peak ≤ 0.9 × capacity).

What this is not: a measurement on an accelerator. These are XLA:CPU compiler numbers — buffer assignment
of the CPU backend over N simulated host devices (`--xla_force_host_platform_device_count`). The TPU and
GPU compilers fuse, schedule and lay out memory differently (and XLA:CPU computes bfloat16 dots in float32),
so treat the figures as estimates until measured on the accelerator (`jax.Device.memory_stats()` after a
few steps). The compile itself takes minutes on a small CPU at 1024².

Placements are the trainer's: parameters by the rule table, the batch over data × fsdp, the AdamW moments
and EMA like their parameters (`sharding.like_params`, as `init_state` places them).
`--replicate-opt-state` replicates the moments instead (what the trainer did before that was fixed), for
comparison.

Run (from the repository root, with jaxdistill installed — `pip install -e .` — or PYTHONPATH=.):
    python bench/memory.py --model ssd1b --mesh fsdp=8 --batch-per-device 1 --remat full
    python bench/memory.py --model both --mesh fsdp=8 --mesh fsdp=4,tensor=2 --remat none full --json out.json
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import platform
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

# Importing JAX does not start a backend; the CPU backend reads XLA_FLAGS when the first device is asked
# for, which `main` does only after setting the simulated device count.
import jax
import jax.numpy as jnp

from jaxdistill import presets
from jaxdistill.config import base_config
from jaxdistill.layers import stack_layers
from jaxdistill.prune import feature_pairs
from jaxdistill.schedule import alphas_cumprod
from jaxdistill.sharding import (
    AXES,
    batch_sharding,
    check_divided,
    like_params,
    make_mesh,
    mesh_shape,
    param_shardings,
    replicated,
)
from jaxdistill.step import init_state, make_optimizer, make_train_step
from jaxdistill.unet import UNet, abstract_params, count_params

MODELS = {"ssd1b": ("SSD-1B", presets.SSD_1B), "vega": ("Vega", presets.VEGA)}
CAPACITIES_GB = (16, 32, 80, 95)  # device memory, GiB
HEADROOM = 0.9  # fits when the peak is at most this share of the capacity: the runtime needs some too
GIB = 2**30
SEQ_LEN = 77  # SDXL's context length: [B, 77, 2048]


def parse_mesh(text: str) -> dict[str, int]:
    """`data=2,fsdp=4` → {"data": 2, "fsdp": 4, "tensor": 1}."""
    sizes = dict.fromkeys(AXES, 1)
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name.strip() not in sizes or not value.strip().lstrip("-").isdigit():
            raise argparse.ArgumentTypeError(f"--mesh {text!r}: expected AXIS=SIZE,... with axes {AXES}")
        sizes[name.strip()] = int(value)
    if any(v < 1 for v in sizes.values()):
        raise argparse.ArgumentTypeError(f"--mesh {text!r}: sizes are positive (no -1 here: give every size)")
    return sizes


def mesh_label(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{a}={sizes[a]}" for a in AXES if sizes[a] > 1) or "1 device"


def nbytes(leaf: Any, sharding: Any = None) -> int:
    """Bytes of one array (or of the shard one device holds under `sharding`)."""
    shape = sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape
    return math.prod(shape) * jnp.dtype(leaf.dtype).itemsize


def per_device(tree: Any, shardings: Any) -> int:
    """Bytes of `tree` (abstract arrays) one device holds under `shardings` (a matching tree)."""
    return sum(nbytes(x, s) for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True))


def measure(model: str, sizes: Mapping[str, int], batch_per_device: int, accumulation: int, remat: str,
            resolution: int, ema: bool = False, replicate_opt_state: bool = False) -> dict[str, Any]:
    """Lowers and compiles one distillation step for abstract inputs; → its per-device memory figures."""
    c = base_config()  # the trainer's defaults: loss weights, optimizer, schedule, precision, rules
    name, spec = MODELS[model]
    teacher_spec = presets.SDXL
    n = math.prod(sizes.values())
    mesh = make_mesh(dict(sizes), devices=jax.devices("cpu")[:n])
    rules = [tuple(r) for r in c.mesh.rules]
    compute = jnp.dtype(c.precision.student_compute)

    # the models and the step, as run_stage makes them
    student = UNet(spec, dtype=compute, remat=remat, scan_layers=True)
    teacher = UNet(teacher_spec, dtype=jnp.dtype(c.precision.teacher), scan_layers=True)
    pairs = feature_pairs(teacher_spec, spec, c.loss.taps)
    o = c.optimizer
    tx, lr_fn = make_optimizer(o.lr, o.warmup_steps, o.weight_decay, o.b1, o.b2, o.eps, o.grad_clip, o.schedule,
                               c.steps)
    s = c.schedule
    acp = alphas_cumprod(s.num_train_timesteps, s.beta_start, s.beta_end, s.beta_schedule)
    ema_decay = 0.9999 if ema else 0.0
    step = make_train_step(student, teacher, tx, lr_fn, acp, pairs=pairs,
                           weights={"task": c.loss.task, "output": c.loss.output, "feature": c.loss.feature},
                           normalize=c.loss.normalize, prediction_type=s.prediction_type,
                           accumulation=accumulation, ema_decay=ema_decay)

    # abstract inputs in the trainer's layouts and placements
    student_params = jax.eval_shape(stack_layers, abstract_params(spec))
    teacher_params = jax.eval_shape(
        lambda p: stack_layers(jax.tree.map(lambda x: x.astype(c.precision.teacher), p)), abstract_params(teacher_spec))
    student_sharding = param_shardings(student_params, mesh, rules)
    build = functools.partial(init_state, tx=tx, ema=ema)
    state = jax.eval_shape(build, student_params)
    state_sharding = like_params(state, student_sharding, mesh)  # the trainer's init_state placement
    if replicate_opt_state:  # the placement before that was fixed, for comparison
        state_sharding = state_sharding.replace(opt_state=jax.tree.map(lambda _: replicated(mesh),
                                                                       state_sharding.opt_state))
    frozen = {"teacher": teacher_params, "encoders": None}
    frozen_sharding = {"teacher": param_shardings(teacher_params, mesh, rules), "encoders": None}
    batch_size = batch_per_device * accumulation * sizes["data"] * sizes["fsdp"]  # global, all micro-batches
    side = resolution // 8  # SDXL's VAE: 8× downsampling, 4 latent channels
    pooled = spec.projection_class_embeddings_input_dim - 6 * spec.addition_time_embed_dim
    f32 = jnp.float32
    batch = {"latents": jax.ShapeDtypeStruct((batch_size, side, side, spec.in_channels), f32),
             "encoder_hidden_states": jax.ShapeDtypeStruct((batch_size, SEQ_LEN, spec.cross_attention_dim), f32),
             "text_embeds": jax.ShapeDtypeStruct((batch_size, pooled), f32),
             "time_ids": jax.ShapeDtypeStruct((batch_size, 6), f32)}
    key = jax.eval_shape(lambda: jax.random.key(0))

    train_step = jax.jit(step, donate_argnums=(0,),
                         in_shardings=(state_sharding, frozen_sharding, batch_sharding(mesh), replicated(mesh)),
                         out_shardings=(state_sharding, replicated(mesh)))
    t0 = time.perf_counter()
    lowered = train_step.lower(state, frozen, batch, key)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    m = compiled.memory_analysis()

    peak = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes + m.temp_size_in_bytes
    opt_leaves = jax.tree.leaves(state.opt_state)
    return {
        "model": name, "params": count_params(spec), "teacher_params": count_params(teacher_spec),
        "mesh": dict(sizes), "devices": n, "batch_per_device": batch_per_device, "accumulation": accumulation,
        "global_batch": batch_size, "remat": remat, "resolution": resolution, "ema": ema,
        "opt_state": "replicated" if replicate_opt_state else "like params",
        "feature_pairs": len(pairs),
        # what the inputs take per device, from their shardings (the argument size, split up)
        "student_params_bytes": per_device(state.params, state_sharding.params),
        "opt_state_bytes": per_device(opt_leaves, jax.tree.leaves(state_sharding.opt_state)),
        "ema_bytes": per_device(state.ema_params, state_sharding.ema_params) if ema else 0,
        "teacher_bytes": per_device(teacher_params, frozen_sharding["teacher"]),
        # XLA's figures for one device's program
        "argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
        "alias_bytes": m.alias_size_in_bytes, "temp_bytes": m.temp_size_in_bytes,
        "generated_code_bytes": m.generated_code_size_in_bytes, "peak_bytes": peak,
        "fits": {f"{cap}GB": peak <= HEADROOM * cap * GIB for cap in CAPACITIES_GB},
        "lower_s": round(t1 - t0, 1), "compile_s": round(t2 - t1, 1),
    }


def gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown table of `measure` rows (GiB per device)."""
    caps = " | ".join(f"{c} GB" for c in CAPACITIES_GB)
    lines = [f"| model | mesh | batch/device | remat | opt state | student state | teacher | arguments | "
             f"output − alias | temp | **peak** | {caps} | compile s |",
             "|" + "---|" * (12 + len(CAPACITIES_GB))]
    for r in rows:
        batch = f"{r['batch_per_device']}" + (f" × {r['accumulation']}" if r["accumulation"] > 1 else "")
        state = r["student_params_bytes"] + r["opt_state_bytes"] + r["ema_bytes"]
        fits = " | ".join("✓" if r["fits"][f"{c}GB"] else "✗" for c in CAPACITIES_GB)
        lines.append(f"| {r['model']} | {mesh_label(r['mesh'])} | {batch} | {r['remat']} | {r['opt_state']} | "
                     f"{gib(state)} | {gib(r['teacher_bytes'])} | {gib(r['argument_bytes'])} | "
                     f"{gib(r['output_bytes'] - r['alias_bytes'])} | {gib(r['temp_bytes'])} | "
                     f"**{gib(r['peak_bytes'])}** | {fits} | {r['compile_s']:.0f} |")
    return "\n".join(lines)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores; jax {jax.__version__}"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=[*MODELS, "both"], default="both")
    p.add_argument("--mesh", type=parse_mesh, action="append",
                   help="AXIS=SIZE,... over data, fsdp, tensor (others 1); repeat for several meshes "
                        "(default fsdp=8)")
    p.add_argument("--devices", type=int, default=0,
                   help="simulated CPU devices (default: the largest mesh's size)")
    p.add_argument("--batch-per-device", type=int, default=1,
                   help="examples per device per micro-batch (global batch = this × accumulation × data × fsdp)")
    p.add_argument("--accumulation", type=int, default=1, help="micro-batches per step (a scan inside the step)")
    p.add_argument("--remat", nargs="+", choices=["none", "full", "dots"], default=["full"])
    p.add_argument("--resolution", type=int, default=1024, help="image side in pixels (latents: side / 8)")
    p.add_argument("--ema", action="store_true", help="keep an EMA of the student (a third float32 copy)")
    p.add_argument("--replicate-opt-state", action="store_true",
                   help="replicate the AdamW moments (the trainer's placement before it was fixed), for comparison")
    p.add_argument("--json", type=Path, help="write the rows (and the machine) here")
    args = p.parse_args(argv)
    meshes = args.mesh or [parse_mesh("fsdp=8")]
    devices = args.devices or max(math.prod(m.values()) for m in meshes)
    for m in meshes:
        mesh_shape(m, math.prod(m.values()))
    if any(math.prod(m.values()) > devices for m in meshes):
        p.error(f"--devices {devices} is fewer than a mesh needs")
    if args.resolution % 64:
        p.error("--resolution must be a multiple of 64 (latents: a multiple of 8, three UNet levels)")

    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices}"])
    if len(jax.devices("cpu")) < devices:
        raise SystemExit(f"expected {devices} CPU devices, found {len(jax.devices('cpu'))}: JAX's CPU backend "
                         "started before XLA_FLAGS was set; run this in a fresh process")

    models = list(MODELS) if args.model == "both" else [args.model]
    rules = [tuple(r) for r in base_config().mesh.rules]
    teacher = abstract_params(presets.SDXL)
    for model in models:  # what the trainer refuses (an axis that divides no width) is refused before compiling
        params = {"student": abstract_params(MODELS[model][1]), "teacher": teacher}
        for sizes in meshes:
            try:
                check_divided(params, sizes, rules)
            except ValueError as e:
                p.error(f"--mesh {mesh_label(sizes)} ({MODELS[model][0]}): the trainer refuses it: {e}")

    where = f"{machine()}; XLA:CPU compile only, {devices} simulated devices"
    print(f"Per-device memory of one distillation step (teacher SDXL bf16, student bf16 compute / f32 master "
          f"weights, AdamW), {args.resolution}² images ({args.resolution // 8}² latents), from XLA's compiled "
          f"memory analysis. {where}.\nThese are XLA:CPU compiler numbers (the CPU backend's buffer assignment); "
          "TPU/GPU compilers lay out memory differently: estimates until measured on the accelerator.\n"
          "peak = argument + output − alias + temp; fits: peak ≤ 90 % of the capacity (GiB).", flush=True)
    rows = []
    for model in models:
        for sizes in meshes:
            for remat in args.remat:
                row = measure(model, sizes, args.batch_per_device, args.accumulation, remat, args.resolution,
                              args.ema, args.replicate_opt_state)
                rows.append(row)
                print(f"{row['model']} {mesh_label(sizes)} remat={remat}: peak {gib(row['peak_bytes'])} GiB "
                      f"(lower {row['lower_s']} s, compile {row['compile_s']} s)", file=sys.stderr, flush=True)
    print(table(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": where, "command": " ".join(sys.argv), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
