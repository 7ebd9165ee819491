"""SDXL's attention at 1024² on one device: what `attention(..., "auto")` runs beside the plain XLA path.

For each shape SDXL's UNet runs at 1024² images (self-attention over 64² and 32² latent tokens,
cross-attention to 77 text tokens; heads of 64), on fresh random bf16 inputs:
  kernel — what "auto" picks (cuDNN's fused kernel on a GPU where it applies, else xla);
  parity — forward output and the gradients of q, k, v (for a random cotangent) of "auto" against
           "xla": max |auto − xla| ÷ max |xla| (bf16 inputs and outputs, float32 softmax in both; the
           tolerance is 2e-2, a few bf16 ulps);
  time   — forward and forward + backward, median of `--iters` after a warm-up, both paths.
Off GPUs "auto" is the XLA path: only that is timed and the parity is absent.

    python bench/attention.py --json bench/out/attention_gpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from distill_step import timed_call  # bench/ is on the path when this script runs

from jaxdistill.layers import attention, attention_kernel

# (name, batch, query tokens, key tokens, heads): SDXL at 1024², batch 2 (head dim 64 throughout).
SHAPES = (("down_blocks.1 self (64² tokens)", 2, 4096, 4096, 10),
          ("down_blocks.1 cross", 2, 4096, 77, 10),
          ("down_blocks.2 self (32² tokens)", 2, 1024, 1024, 20),
          ("down_blocks.2 cross", 2, 1024, 77, 20))
TOLERANCE = 2e-2


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()
    fused = jax.default_backend() == "gpu"
    impls = ("xla", "auto") if fused else ("xla",)
    rows = []
    for name, b, lq, lk, heads in SHAPES:
        keys = jax.random.split(jax.random.key(len(rows)), 4)
        q = jax.random.normal(keys[0], (b, lq, heads, 64), jnp.bfloat16)
        k, v = (jax.random.normal(key, (b, lk, heads, 64), jnp.bfloat16) for key in keys[1:3])
        cot = jax.random.normal(keys[3], q.shape, jnp.bfloat16)
        row = {"shape": name, "q": list(q.shape), "k": list(k.shape), "auto_kernel": attention_kernel(q, k, v)}
        results = {}
        for impl in impls:
            fn = lambda q, k, v, impl=impl: attention(q, k, v, impl)  # noqa: E731

            def fwd_bwd(q, k, v, c, fn=fn):
                out, vjp = jax.vjp(fn, q, k, v)
                return (out, *vjp(c))

            results[impl] = jax.jit(fwd_bwd)(q, k, v, cot)
            row[f"{impl}_fwd_ms"] = 1e3 * timed_call(fn, q, k, v, iters=args.iters)[1]
            row[f"{impl}_fwd_bwd_ms"] = 1e3 * timed_call(fwd_bwd, q, k, v, cot, iters=args.iters)[1]
        if fused:
            for label, ours, ref in zip(("out", "dq", "dk", "dv"), results["auto"], results["xla"], strict=True):
                ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
                row[f"rel_err_{label}"] = float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
            row["speedup_fwd_bwd"] = row["xla_fwd_bwd_ms"] / row["auto_fwd_bwd_ms"]
        rows.append(row)
        print(json.dumps({k: round(x, 5) if isinstance(x, float) else x for k, x in row.items()}))
    device = jax.devices()[0]
    worst = max((r[k] for r in rows for k in r if k.startswith("rel_err")), default=None)
    out = {"device": f"{device.platform}: {getattr(device, 'device_kind', '')}", "jax": jax.__version__,
           "rows": rows, "worst_rel_err": worst, "tolerance": TOLERANCE}
    print("worst relative error auto vs xla:", worst, "(tolerance", TOLERANCE, ")")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2))
    return 0 if worst is None or worst <= TOLERANCE else 1


if __name__ == "__main__":
    raise SystemExit(main())
