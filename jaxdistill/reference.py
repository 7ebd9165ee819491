"""The PyTorch side of parity checks: diffusers' `UNet2DConditionModel` for a spec, its forward with the
same feature taps as ours (forward hooks), and the comparison. Needs the `torch` extra; nothing in
training or inference imports this module.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jaxdistill.spec import UNetSpec
from jaxdistill.unet import dummy_inputs

TOLERANCE = 1e-4  # float32: max |ours − diffusers| ≤ TOLERANCE · max |diffusers|, per output and feature


def random_diffusers_unet(spec: UNetSpec, seed: int = 0):
    """A diffusers UNet for `spec` with random weights: PyTorch's init, then every norm's scale and bias
    perturbed too (defaults of 1 and 0 would hide a swapped or dropped norm parameter)."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel(**{k: v for k, v in spec.to_diffusers_config().items() if not k.startswith("_")})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    return model.eval()


def write_random_unet(folder: str | Path, spec: UNetSpec, seed: int = 0, **save_kwargs) -> Path:
    """Saves a random diffusers UNet for `spec` with diffusers' own `save_pretrained` (safetensors)."""
    random_diffusers_unet(spec, seed).save_pretrained(str(folder), safe_serialization=True, **save_kwargs)
    return Path(folder)


def random_inputs(spec: UNetSpec, batch: int = 2, size: int | tuple[int, int] = 16, seq_len: int = 8,
                  seed: int = 0) -> dict:
    """Fresh random numpy inputs for a UNet call: NHWC latents, timesteps across [0, 1000), context,
    pooled text embedding and SDXL-like time ids (sizes and crop offsets)."""
    rng = np.random.default_rng(seed)
    shapes = dummy_inputs(spec, batch, size, seq_len)
    inputs = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in shapes.items()}
    inputs["timesteps"] = rng.uniform(0, 1000, size=batch).astype(np.float32)
    if "time_ids" in inputs:
        inputs["time_ids"] = rng.integers(0, 1024, size=shapes["time_ids"].shape).astype(np.float32)
    return inputs


def tap_names(model) -> list[str]:
    """Our feature names for a diffusers UNet: every down/up resnet and attention, each block, the mid block."""
    names = []
    for kind, blocks in (("down_blocks", model.down_blocks), ("up_blocks", model.up_blocks)):
        for i, block in enumerate(blocks):
            for j in range(len(block.resnets)):
                names.append(f"{kind}.{i}.resnets.{j}")
            for j in range(len(getattr(block, "attentions", []))):
                names.append(f"{kind}.{i}.attentions.{j}")
            names.append(f"{kind}.{i}")
    if model.mid_block is not None:
        names.append("mid_block")
    return names


def torch_forward(model, inputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """diffusers forward on our NHWC inputs → (NHWC prediction, {tap name: NHWC feature})."""
    import torch

    captured, hooks = {}, []
    for name in tap_names(model):
        def hook(_module, _args, output, name=name):
            captured[name] = output[0] if isinstance(output, tuple) else output
        hooks.append(model.get_submodule(name).register_forward_hook(hook))
    t = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    added = {k: t[k] for k in ("text_embeds", "time_ids") if k in t}
    try:
        with torch.no_grad():
            out = model(t["sample"].permute(0, 3, 1, 2), t["timesteps"], t["encoder_hidden_states"],
                        added_cond_kwargs=added or None).sample
    finally:
        for h in hooks:
            h.remove()
    nhwc = lambda x: x.permute(0, 2, 3, 1).float().numpy()  # noqa: E731
    return nhwc(out), {k: nhwc(v) for k, v in captured.items()}


def relative_errors(ours: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> dict[str, float]:
    """max |ours − reference| / max |reference| for every name in `reference` (shapes must agree)."""
    errors = {}
    for name, ref in reference.items():
        if name not in ours:
            raise KeyError(f"feature {name} is missing from our UNet's features")
        mine = np.asarray(ours[name], np.float32)
        if mine.shape != ref.shape:
            raise ValueError(f"{name}: our shape {mine.shape} ≠ diffusers' {ref.shape}")
        errors[name] = float(np.max(np.abs(mine - ref)) / max(np.max(np.abs(ref)), 1e-30))
    return errors
