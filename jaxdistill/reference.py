"""The PyTorch side of parity checks: diffusers' `UNet2DConditionModel` for a spec, its forward with the
same feature taps as ours (forward hooks), and the comparison. Needs the `torch` extra; nothing in
training or inference imports this module.
"""

from __future__ import annotations

import types
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


def diffusers_unet(spec: UNetSpec, params: Mapping | None = None, dtype=None, device="cpu"):
    """diffusers' UNet for `spec`, built on the meta device and filled in place on `device` (fast at full
    size: no PyTorch init): our `params` (per-layer layout) when given, else weights ~ N(0, 1/fan_in), norm
    scales 1, biases 0 (the scale of Flax's default init; for timing, where values do not matter).
    `dtype`: a torch dtype (default float32)."""
    import torch
    from diffusers import UNet2DConditionModel
    from diffusers.utils import logging

    from jaxdistill.convert import to_diffusers_state_dict

    logging.set_verbosity_error()  # `.to(dtype)` warns about from_pretrained's fp32 modules: none here
    with torch.device("meta"):
        model = UNet2DConditionModel(**{k: v for k, v in spec.to_diffusers_config().items() if not k.startswith("_")})
    model = model.to(dtype or torch.float32).to_empty(device=device).eval()
    with torch.no_grad():
        if params is not None:
            # np.array copies: arrays from jax are read-only, torch wants writable memory.
            state = to_diffusers_state_dict(params)
            model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
            return model
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.normal_(0.0, p[0].numel() ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()
        for b in model.buffers():
            b.zero_()
    return model


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


class capture_features:
    """Forward hooks on `model`'s tap modules (our feature names, e.g. `down_blocks.1.attentions.0`,
    `mid_block`): inside the `with`, each forward stores the modules' outputs (NCHW, with their graph)
    in the dict that `with` returns."""

    def __init__(self, model, names):
        self.model, self.names, self.features, self.hooks = model, list(names), {}, []

    def __enter__(self) -> dict:
        for name in self.names:
            def hook(_module, _args, output, name=name):
                self.features[name] = output[0] if isinstance(output, tuple) else output
            self.hooks.append(self.model.get_submodule(name).register_forward_hook(hook))
        return self.features

    def __exit__(self, *exc):
        for h in self.hooks:
            h.remove()
        self.hooks.clear()


def torch_forward(model, inputs: Mapping[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """diffusers forward on our NHWC inputs → (NHWC prediction, {tap name: NHWC feature})."""
    import torch

    t = {k: torch.from_numpy(np.asarray(v)) for k, v in inputs.items()}
    added = {k: t[k] for k in ("text_embeds", "time_ids") if k in t}
    with capture_features(model, tap_names(model)) as captured, torch.no_grad():
        out = model(t["sample"].permute(0, 3, 1, 2), t["timesteps"], t["encoder_hidden_states"],
                    added_cond_kwargs=added or None).sample
    nhwc = lambda x: x.permute(0, 2, 3, 1).float().numpy()  # noqa: E731
    return nhwc(out), {k: nhwc(v) for k, v in captured.items()}


def relative_errors(ours: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> dict[str, float]:
    """max |ours − reference| / max |reference| for every name in `reference` (shapes must agree); inf where
    ours is not finite (NaN would compare false against any tolerance and pass)."""
    errors = {}
    for name, ref in reference.items():
        if name not in ours:
            raise KeyError(f"feature {name} is missing from our UNet's features")
        mine = np.asarray(ours[name], np.float32)
        if mine.shape != ref.shape:
            raise ValueError(f"{name}: our shape {mine.shape} ≠ diffusers' {ref.shape}")
        error = float(np.max(np.abs(mine - ref)) / max(np.max(np.abs(ref)), 1e-30))
        errors[name] = error if np.isfinite(mine).all() and np.isfinite(error) else float("inf")
    return errors


# ---- the PyTorch reference of one distillation step ------------------------------------------------

def torch_distill_step(teacher, student, optimizer, batch: Mapping[str, np.ndarray], noise: np.ndarray,
                       timesteps: np.ndarray, alphas_cumprod: np.ndarray, pairs, weights: Mapping[str, float] | None,
                       normalize: str = "none", prediction_type: str = "epsilon",
                       grad_clip: float | None = 1.0, accumulation: int = 1, noise_offset: float = 0.0,
                       offset_noise: np.ndarray | None = None, snr_gamma: float = 0.0,
                       dropped: np.ndarray | None = None) -> dict[str, float]:
    """One distillation step the usual PyTorch way (diffusers' training scripts, Segmind's distill script):
    the reference for `jaxdistill.step` and a baseline for benchmarks.

    `teacher`, `student`: diffusers `UNet2DConditionModel`s (the student's parameters are what
    `optimizer`, e.g. `torch.optim.AdamW(student.parameters(), ...)`, updates); `batch`: our NHWC numpy
    batch (latents [B, H, W, 4], encoder_hidden_states, and text_embeds / time_ids for SDXL); `noise`
    [B, H, W, 4] and integer `timesteps` [B] as drawn by our step; `pairs`: (student tap, teacher tap);
    `weights`: task / output / feature (default 1, 0.5, 0.5). The arrays may be numpy (copied to the
    student's device) or torch tensors (a benchmark's, put on the device before its timing). The teacher
    runs under `no_grad`, taps are read by forward hooks, the loss is

        w_task · MSE(s, target) + w_out · MSE(s, t) + w_feat · Σ_pairs MSE(s_f, t_f) [/ (mean(t_f²) + 1e-8)]

    The options of diffusers' `train_text_to_image_sdxl.py`, its way: `noise_offset` (noise += noise_offset ·
    `offset_noise` [B, 1, 1, 4], the draw), `snr_gamma` (min-SNR-γ weights on the task term from diffusers'
    `compute_snr`) and `dropped` [B] bool (examples whose text embeddings are the empty prompt's: zeros).

    With `accumulation` A, micro-batch i is examples i, i + A, ... (as in our step), each runs forward and
    backward on loss / A (diffusers' scripts' accumulation), then `clip_grad_norm_` (when `grad_clip`) and
    `optimizer.step()` once. Modes (train/eval) are the caller's. → {"loss", "task", "output_kd",
    "feature_kd", "feature/<tap>"..., "grad_norm"}: unweighted terms averaged over micro-batches, as floats
    like our step's metrics; grad_norm before clipping.
    """
    import torch
    import torch.nn.functional as F

    w = {"task": 1.0, "output": 0.5, "feature": 0.5} | dict(weights or {})
    if normalize not in ("none", "teacher_ms"):
        raise ValueError(f"feature normalisation {normalize!r}: expected 'none' or 'teacher_ms'.")
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type={prediction_type!r}: expected 'epsilon' or 'v_prediction'.")
    if len(timesteps) % accumulation:
        raise ValueError(f"batch of {len(timesteps)} does not split into {accumulation} micro-batches")
    device = next(student.parameters()).device

    def tensor(x, dtype=torch.float32):
        if isinstance(x, torch.Tensor):
            return x.to(device, dtype)
        # a numpy copy first: arrays from jax are read-only (torch wants writable memory), maybe bf16
        return torch.from_numpy(np.array(x, np.float32 if dtype == torch.float32 else np.int64)).to(device)

    nchw = lambda x: tensor(x).permute(0, 3, 1, 2).contiguous()  # noqa: E731
    use_teacher = bool(w["output"] or (w["feature"] and pairs))
    pairs = list(pairs) if w["feature"] else []
    mse = lambda a, b: F.mse_loss(a.float(), b.float(), reduction="mean")  # noqa: E731

    def micro_loss(i):
        latents, eps = nchw(batch["latents"][i::accumulation]), nchw(noise[i::accumulation])
        if noise_offset:
            eps = eps + noise_offset * nchw(offset_noise[i::accumulation])
        t = tensor(timesteps[i::accumulation], torch.long)
        acp = tensor(alphas_cumprod)[t].view(-1, 1, 1, 1)
        noisy = acp.sqrt() * latents + (1 - acp).sqrt() * eps  # DDPMScheduler.add_noise
        # DDPMScheduler.get_velocity for v-prediction
        target = eps if prediction_type == "epsilon" else acp.sqrt() * eps - (1 - acp).sqrt() * latents
        context = tensor(batch["encoder_hidden_states"][i::accumulation])
        added = {k: tensor(batch[k][i::accumulation]) for k in ("text_embeds", "time_ids") if k in batch} or None
        if dropped is not None:
            keep = tensor(~np.asarray(dropped[i::accumulation]))
            context = context * keep.view(-1, 1, 1)
            if added and "text_embeds" in added:
                added["text_embeds"] = added["text_embeds"] * keep.view(-1, 1)
        t_pred = None
        with capture_features(teacher, {t_name for _, t_name in pairs}) as t_feats, torch.no_grad():
            if use_teacher:
                t_pred = teacher(noisy, t, context, added_cond_kwargs=added).sample
        with capture_features(student, {s_name for s_name, _ in pairs}) as s_feats:
            s_pred = student(noisy, t, context, added_cond_kwargs=added).sample

        if snr_gamma:  # diffusers' min-SNR weighting, as in its training scripts
            from diffusers.training_utils import compute_snr

            snr = compute_snr(types.SimpleNamespace(alphas_cumprod=tensor(alphas_cumprod)), t)
            weights = torch.stack([snr, snr_gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
            weights = weights / (snr if prediction_type == "epsilon" else snr + 1)
            task = F.mse_loss(s_pred.float(), target.float(), reduction="none")
            terms = {"task": (task.mean(dim=list(range(1, task.ndim))) * weights).mean()}
        else:
            terms = {"task": mse(s_pred, target)}
        loss = w["task"] * terms["task"]
        if w["output"]:
            terms["output_kd"] = mse(s_pred, t_pred)
            loss = loss + w["output"] * terms["output_kd"]
        if pairs:
            per_tap = {}
            for s_name, t_name in pairs:
                term = mse(s_feats[s_name], t_feats[t_name])
                if normalize == "teacher_ms":
                    term = term / (t_feats[t_name].float().pow(2).mean() + 1e-8)
                per_tap[s_name] = term
            terms["feature_kd"] = sum(per_tap.values())
            terms |= {f"feature/{k}": v for k, v in per_tap.items()}
            loss = loss + w["feature"] * terms["feature_kd"]
        return loss, terms

    optimizer.zero_grad(set_to_none=True)
    metrics = {}
    for i in range(accumulation):
        loss, terms = micro_loss(i)
        (loss / accumulation).backward()
        for k, v in {"loss": loss, **terms}.items():
            metrics[k] = metrics.get(k, 0.0) + v.detach() / accumulation  # .item() at the end: one sync
    params = [p for p in student.parameters() if p.grad is not None]
    if grad_clip:
        grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip)
    else:
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in params]))
    optimizer.step()
    return {k: v.item() for k, v in {**metrics, "grad_norm": grad_norm}.items()}


# ---- SDXL's text encoders --------------------------------------------------------------------------

# A few BPE merges of common English, so that the tiny tokenizer really merges (`the`, `and`, `photo`).
_TINY_MERGES = (("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("i", "n"), ("in", "g</w>"),
                ("o", "f</w>"), ("t", "o</w>"), ("p", "h"), ("ph", "o"), ("pho", "to</w>"), ("o", "n</w>"))


def write_tiny_clip_tokenizer(folder: str | Path, pad_token: str = "<|endoftext|>", model_max_length: int = 77):
    """A real byte-level BPE CLIP tokenizer with a tiny vocabulary: CLIP's 256 byte symbols, the same with
    the end-of-word `</w>`, `_TINY_MERGES`, then `<|startoftext|>` and `<|endoftext|>` last (as in CLIP's
    vocab: the EOS id is the largest, which transformers' legacy pooling relies on). Every string
    tokenizes. Written as `vocab.json` + `merges.txt`, then by transformers' own `save_pretrained`.
    SDXL's tokenizer pads with `<|endoftext|>`, its tokenizer_2 with "!". Returns the tokenizer."""
    import json

    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in _TINY_MERGES]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in _TINY_MERGES))
    tokenizer = CLIPTokenizer.from_pretrained(str(folder), pad_token=pad_token, model_max_length=model_max_length)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


def write_random_text_encoders(pipeline_dir: str | Path, seed: int = 0, hidden: tuple[int, int] = (32, 48),
                               layers: tuple[int, int] = (3, 4), heads: tuple[int, int] = (2, 3),
                               projection_dim: int = 40) -> Path:
    """The text half of a diffusers SDXL pipeline folder at tiny sizes, written by transformers' own
    `save_pretrained` (safetensors): `text_encoder/` (CLIPTextModel, quick_gelu, SDXL's legacy
    eos_token_id=2: pooled at the largest id), `text_encoder_2/` (CLIPTextModelWithProjection, gelu, the
    tokenizer's real eos_token_id: pooled at the first EOS), `tokenizer/` and `tokenizer_2/` (pads with "!",
    like SDXL's). Weights are PyTorch's init with every layer norm's weight and bias perturbed (1 and 0 would
    hide a swapped or dropped norm parameter). The vocabulary size is the tokenizer's."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    root = Path(pipeline_dir)
    tokenizers = [write_tiny_clip_tokenizer(root / "tokenizer"),
                  write_tiny_clip_tokenizer(root / "tokenizer_2", pad_token="!")]
    torch.manual_seed(seed)
    for i, (cls, act) in enumerate(((CLIPTextModel, "quick_gelu"), (CLIPTextModelWithProjection, "gelu"))):
        tok = tokenizers[i]
        config = CLIPTextConfig(
            vocab_size=len(tok), hidden_size=hidden[i], intermediate_size=4 * hidden[i], num_hidden_layers=layers[i],
            num_attention_heads=heads[i], max_position_embeddings=tok.model_max_length, hidden_act=act,
            projection_dim=projection_dim, bos_token_id=0 if i == 0 else tok.bos_token_id,
            eos_token_id=2 if i == 0 else tok.eos_token_id, pad_token_id=1 if i == 0 else tok.pad_token_id)
        model = cls(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.add_(0.2 * torch.randn_like(p))
        model.eval().save_pretrained(str(root / ("text_encoder", "text_encoder_2")[i]), safe_serialization=True)
    return root


# ---- the VAE -------------------------------------------------------------------------------------

def write_random_vae(folder: str | Path, seed: int = 0, *, variant: str | None = None,
                     max_shard_size: int | str | None = None, **config_overrides) -> Path:
    """Saves a tiny random diffusers `AutoencoderKL` with diffusers' own `save_pretrained` (safetensors):
    two blocks of widths (16, 32), one resnet per down block, 8 groups, 4 latent channels, unless
    `config_overrides` (diffusers config fields) say otherwise; the block types follow
    `block_out_channels`. PyTorch's init, then every norm's scale and bias perturbed (defaults of 1 and 0
    would hide a swapped or dropped norm parameter)."""
    import torch
    from diffusers import AutoencoderKL

    config = {"block_out_channels": (16, 32), "layers_per_block": 1, "norm_num_groups": 8,
              "latent_channels": 4, "sample_size": 32} | config_overrides
    n = len(config["block_out_channels"])
    config = {"down_block_types": ("DownEncoderBlock2D",) * n, "up_block_types": ("UpDecoderBlock2D",) * n} | config
    torch.manual_seed(seed)
    model = AutoencoderKL(**config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.add_(0.2 * torch.randn_like(p))
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.eval().save_pretrained(str(folder), safe_serialization=True, variant=variant, **kwargs)
    return Path(folder)


# ---- a whole SDXL pipeline -----------------------------------------------------------------------

# A micro UNet whose conditioning fits `write_random_text_encoders`' defaults: context 32 + 48 = 80,
# pooled 40 (+ 6 time ids × 8).
PIPELINE_UNET = UNetSpec(
    block_out_channels=(32, 32), down_depths=((0,), (2,)), up_depths=((2, 2), (0, 0)), num_attention_heads=(1, 1),
    mid_block_type="UNetMidBlock2DCrossAttn", mid_depth=2, cross_attention_dim=80, norm_num_groups=8,
    addition_time_embed_dim=8, projection_class_embeddings_input_dim=40 + 6 * 8, sample_size=16)


def text_encoder_sizes(unet: UNetSpec) -> dict:
    """Hidden sizes, heads and projection of two tiny text encoders that fit `unet` (SDXL's split of the
    context: 2/5 from the first encoder, 768 + 1280 at full size)."""
    if unet.addition_embed_type != "text_time":
        raise ValueError("an SDXL pipeline needs a UNet with SDXL's added text/time embedding")
    first = unet.cross_attention_dim * 2 // 5 // 2 * 2
    hidden = (first, unet.cross_attention_dim - first)
    heads = (2, next(h for h in (3, 2, 1) if hidden[1] % h == 0))
    return {"hidden": hidden, "heads": heads,
            "projection_dim": unet.projection_class_embeddings_input_dim - 6 * unet.addition_time_embed_dim}


def write_random_pipeline(pipeline_dir: str | Path, unet: UNetSpec = PIPELINE_UNET, seed: int = 0) -> Path:
    """A complete tiny diffusers SDXL pipeline folder (`StableDiffusionXLPipeline.from_pretrained` loads it):
    random text encoders and tokenizers sized to fit `unet` (their hidden sizes add up to its
    cross_attention_dim, the pooled projection is what its added embedding takes besides the six time ids),
    VAE (16, 32 wide: images are 2× the latents), a UNet for `unet`, SDXL's Euler scheduler config, and
    `model_index.json`, all written by diffusers / transformers."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from jaxdistill.sample import SDXL_SCHEDULER_CONFIG

    root = Path(pipeline_dir)
    write_random_text_encoders(root, seed=seed, **text_encoder_sizes(unet))
    write_random_vae(root / "vae", seed=seed + 1)
    write_random_unet(root / "unet", unet, seed=seed + 2)
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(root / "vae"), unet=UNet2DConditionModel.from_pretrained(root / "unet"),
        text_encoder=CLIPTextModel.from_pretrained(root / "text_encoder"),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2"),
        tokenizer=CLIPTokenizer.from_pretrained(root / "tokenizer"),
        tokenizer_2=CLIPTokenizer.from_pretrained(root / "tokenizer_2"),
        scheduler=EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG))
    pipe.save_pretrained(str(root), safe_serialization=True)
    return root
