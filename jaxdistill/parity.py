"""`python -m jaxdistill.parity`: check our Flax UNet against diffusers' PyTorch UNet, number for number.

With `--unet DIR` it loads a diffusers UNet folder (or pipeline folder) through `load_unet` and through
diffusers, runs both on fresh random inputs and prints the relative error of the prediction and of every
feature tap. Without it, it writes a random tiny SDXL-shaped UNet (`--preset`) with diffusers and does
the same. Exits 1 if anything exceeds the float32 tolerance. Needs the `torch` extra.
"""

from __future__ import annotations

import sys
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp

from jaxdistill import presets
from jaxdistill.convert import WEIGHTS_NAME, load_unet, resolve_unet_folder
from jaxdistill.reference import TOLERANCE, random_inputs, relative_errors, torch_forward, write_random_unet
from jaxdistill.spec import UNetSpec
from jaxdistill.unet import UNet, count_params


def check_folder(folder, batch: int = 2, size: int = 16, seq_len: int = 8, seed: int = 0) -> dict[str, float]:
    """Relative errors (ours vs diffusers) of the prediction ("sample") and of every feature."""
    return compare(*load_pair(folder), batch, size, seq_len, seed)


def load_pair(folder) -> tuple[UNetSpec, dict, Any]:
    """(spec, params) by `load_unet` and diffusers' `UNet2DConditionModel` (float32, eval) of one folder."""
    from diffusers import UNet2DConditionModel

    spec, params = load_unet(folder, dtype=jnp.float32)
    # The weights load_unet read: the plain file or index, else the fp16 variant (as `read_safetensors`).
    unet_dir = resolve_unet_folder(folder)
    plain = any((unet_dir / name).is_file() for name in (WEIGHTS_NAME, WEIGHTS_NAME + ".index.json"))
    reference = UNet2DConditionModel.from_pretrained(str(unet_dir), variant=None if plain else "fp16",
                                                     low_cpu_mem_usage=False)
    return spec, params, reference.float().eval()


def compare(spec: UNetSpec, params: dict, reference, batch: int = 2, size: int | tuple[int, int] = 16,
            seq_len: int = 8, seed: int = 0) -> dict[str, float]:
    """Relative errors of our forward vs `reference`'s on the same fresh random inputs."""
    inputs = random_inputs(spec, batch, size, seq_len, seed)
    ours = jax.jit(lambda p, x: UNet(spec).apply({"params": p}, **x))(params, inputs)
    ref_sample, ref_features = torch_forward(reference, inputs)
    return relative_errors({"sample": ours.sample, **ours.features}, {"sample": ref_sample, **ref_features})


def main(argv=None) -> int:
    from jaxdistill import cli

    parser = cli.parser("parity", __doc__.split("\n\n")[0])
    parser.add_argument("--unet", help="diffusers UNet or pipeline folder (default: a random tiny one)")
    parser.add_argument("--preset", default="sdxl", choices=sorted(presets.PRESETS),
                        help="topology of the random tiny UNet")
    parser.add_argument("--size", type=int, default=16, help="latent side (pixels / 8)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seed", type=cli.seed, default=0)
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch {args.batch}: must be at least 1")

    def check_size(spec: UNetSpec):
        factor = spec.downscale
        if args.size < 1 or args.size % factor:
            parser.error(f"--size {args.size}: this UNet downsamples {factor}×, so the latent side must be a "
                         f"positive multiple of {factor}")

    with tempfile.TemporaryDirectory() as tmp:
        folder = args.unet
        if folder is None:
            spec = presets.tiny(presets.PRESETS[args.preset])
            check_size(spec)
            folder = write_random_unet(tmp, spec, seed=args.seed)
            print(f"random tiny {args.preset}-shaped UNet ({count_params(spec):,} parameters) written by diffusers")
        try:
            pair = load_pair(folder)
        except (OSError, ValueError) as e:  # --unet missing or unreadable: a usage error (ours failing: a bug)
            if args.unet is None:
                raise
            parser.error(f"--unet: {e}")
        check_size(pair[0])
        start = time.perf_counter()
        errors = compare(*pair, args.batch, args.size, seed=args.seed)
    worst = max(errors, key=errors.get)
    print(f"{'output / feature':<34} {'max|jax-torch| / max|torch|':>28}")
    for name in ["sample"] + sorted(k for k in errors if k != "sample"):
        print(f"{name:<34} {errors[name]:>28.2e}")
    ok = errors[worst] <= TOLERANCE
    print(f"{len(errors)} tensors compared in {time.perf_counter() - start:.1f}s; worst {worst} "
          f"{errors[worst]:.2e} — {'PASS' if ok else 'FAIL'} (tolerance {TOLERANCE:.0e}, float32)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
