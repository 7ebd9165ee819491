"""The SDXL-family UNet in Flax linen, built from a `UNetSpec`.

`UNet(spec)(sample, timesteps, encoder_hidden_states, text_embeds, time_ids)` returns the prediction
and a dict of named features: the output of every resnet and attention module of the down and up
blocks (`down_blocks.2.attentions.1`, `up_blocks.0.resnets.2`), of every down/up block
(`down_blocks.1`, the stage outputs) and of the mid block (`mid_block`). Names and parameter paths
mirror diffusers' `UNet2DConditionModel`, so conversion (`convert.py`) is a rename plus transposes.
Features nobody reads are dropped by jit.
"""

from __future__ import annotations

import concurrent.futures
import functools
import math
import os

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxdistill.layers import (
    Downsample2D,
    ResnetBlock2D,
    TimestepEmbedding,
    Transformer2DModel,
    Upsample2D,
    _Layer,
    _Ops,
    rematted,
    timestep_embedding,
    unstack_layers,
)
from jaxdistill.spec import CROSS_ATTN_MID, UNetSpec


class UNetOutput(flax.struct.PyTreeNode):
    sample: jax.Array  # [B, H, W, out_channels]
    features: dict[str, jax.Array]  # name → [B, h, w, c]


class _Block(_Layer):
    """Shared settings of the down, mid and up blocks."""

    spec: UNetSpec = None
    index: int = 0
    scan_layers: bool = False

    def resnet(self, out_channels: int, name: str) -> ResnetBlock2D:
        return rematted(ResnetBlock2D, self.remat)(out_channels, self.spec.norm_num_groups, self.spec.norm_eps,
                                                    dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def transformer(self, block: int, depth: int, name: str) -> Transformer2DModel:
        s = self.spec
        heads = s.num_attention_heads[block]
        return Transformer2DModel(heads, s.block_out_channels[block] // heads, depth, s.norm_num_groups,
                                  s.use_linear_projection, s.upcast_attention, dtype=self.dtype,
                                  param_dtype=self.param_dtype, remat=self.remat, scan_layers=self.scan_layers,
                                  attention=self.attention, name=name)


class DownBlock(_Block):
    """diffusers' `DownBlock2D` (no depths) or `CrossAttnDownBlock2D`."""

    @nn.compact
    def __call__(self, h, temb, context):
        """→ (h, skip connections, features)."""
        out = self.spec.block_out_channels[self.index]
        skips, feats = [], {}
        for j, depth in enumerate(self.spec.down_depths[self.index]):
            h = feats[f"resnets.{j}"] = self.resnet(out, f"resnets_{j}")(h, temb)
            if depth:
                h = feats[f"attentions.{j}"] = self.transformer(self.index, depth, f"attentions_{j}")(h, context)
            skips.append(h)
        if self.index < self.spec.num_blocks - 1:
            h = Downsample2D(dtype=self.dtype, param_dtype=self.param_dtype, name="downsamplers_0")(h)
            skips.append(h)
        return h, skips, feats


class MidBlock(_Block):
    """`UNetMidBlock2DCrossAttn` (resnet, attention, resnet) or `UNetMidBlock2D` (one resnet)."""

    @nn.compact
    def __call__(self, h, temb, context):
        width = self.spec.block_out_channels[-1]
        h = self.resnet(width, "resnets_0")(h, temb)
        if self.spec.mid_block_type == CROSS_ATTN_MID:
            h = self.transformer(self.spec.num_blocks - 1, self.spec.mid_depth, "attentions_0")(h, context)
            h = self.resnet(width, "resnets_1")(h, temb)
        return h


class UpBlock(_Block):
    """diffusers' `UpBlock2D` (no depths) or `CrossAttnUpBlock2D`."""

    @nn.compact
    def __call__(self, h, skips, temb, context):
        """Consumes skip connections from the end of `skips`; → (h, features)."""
        block = self.spec.num_blocks - 1 - self.index  # the down block it mirrors: heads and width
        out = self.spec.block_out_channels[block]
        feats = {}
        for j, depth in enumerate(self.spec.up_depths[self.index]):
            h = jnp.concatenate([h, skips.pop()], axis=-1)
            h = feats[f"resnets.{j}"] = self.resnet(out, f"resnets_{j}")(h, temb)
            if depth:
                h = feats[f"attentions.{j}"] = self.transformer(block, depth, f"attentions_{j}")(h, context)
        if self.index < self.spec.num_blocks - 1:
            h = Upsample2D(dtype=self.dtype, param_dtype=self.param_dtype, name="upsamplers_0")(h)
        return h, feats


class UNet(_Ops):
    """diffusers' `UNet2DConditionModel` for SDXL-family specs, NHWC."""

    spec: UNetSpec
    dtype: jnp.dtype | type = jnp.float32  # compute
    param_dtype: jnp.dtype | type = jnp.float32  # storage
    remat: str = "none"  # none | full | dots: recomputation of resnets and transformer layers for backward
    scan_layers: bool = False  # scan over each attention module's layers: parameters in `stack_layers` layout
    attention: str = "auto"  # attention kernel: auto | xla | cudnn | splash (`layers.attention_kernel`)

    @nn.compact
    def __call__(self, sample: jax.Array, timesteps: jax.Array, encoder_hidden_states: jax.Array,
                 text_embeds: jax.Array | None = None, time_ids: jax.Array | None = None) -> UNetOutput:
        """sample [B, H, W, in_channels] (H, W divisible by 2^(blocks-1)); timesteps [B] or scalar;
        encoder_hidden_states [B, S, cross_attention_dim]; text_embeds [B, P] and time_ids [B, N]
        (SDXL: P=1280, N=6) when the spec has the `text_time` add-embedding."""
        s = self.spec
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, remat=self.remat, attention=self.attention)
        batch = sample.shape[0]
        factor = s.downscale
        if sample.shape[1] % factor or sample.shape[2] % factor:  # shapes are static: checked at trace time
            raise ValueError(f"sample of {sample.shape[1]}×{sample.shape[2]} latents: this UNet downsamples "
                             f"{factor}×, so both sides must be multiples of {factor} (images: of {8 * factor} "
                             "pixels with SDXL's VAE)")
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (batch,))

        t_emb = timestep_embedding(timesteps, s.block_out_channels[0], s.flip_sin_to_cos, s.freq_shift)
        emb = TimestepEmbedding(s.time_embed_dim, **kw, name="time_embedding")(t_emb.astype(self.dtype))
        if s.addition_embed_type == "text_time":
            if text_embeds is None or time_ids is None:
                raise ValueError("this UNet has SDXL's text_time conditioning: pass text_embeds [B, P] and "
                                 "time_ids [B, N] (SDXL: pooled text embedding and 6 size/crop ids).")
            width = text_embeds.shape[-1] + time_ids.shape[-1] * s.addition_time_embed_dim
            if width != s.projection_class_embeddings_input_dim:
                raise ValueError(f"text_embeds [.., {text_embeds.shape[-1]}] and time_ids [.., {time_ids.shape[-1]}] "
                                 f"give {width} add-embedding inputs; this UNet takes "
                                 f"{s.projection_class_embeddings_input_dim} (pooled width + time ids × "
                                 f"{s.addition_time_embed_dim})")
            # per row of text_embeds, as diffusers: a batch of one conditions every sample
            time_embeds = timestep_embedding(time_ids.reshape(-1), s.addition_time_embed_dim,
                                             s.flip_sin_to_cos, s.freq_shift).reshape(text_embeds.shape[0], -1)
            add = jnp.concatenate([text_embeds.astype(jnp.float32), time_embeds], axis=-1)
            emb = emb + TimestepEmbedding(s.time_embed_dim, **kw, name="add_embedding")(add.astype(self.dtype))

        context = encoder_hidden_states.astype(self.dtype)
        h = self.conv(s.block_out_channels[0], s.conv_in_kernel, "conv_in")(sample.astype(self.dtype))
        features: dict[str, jax.Array] = {}
        skips = [h]
        for i in range(s.num_blocks):
            h, block_skips, feats = DownBlock(spec=s, index=i, scan_layers=self.scan_layers, **kw,
                                              name=f"down_blocks_{i}")(h, emb, context)
            skips += block_skips
            features |= {f"down_blocks.{i}.{k}": v for k, v in feats.items()} | {f"down_blocks.{i}": h}
        if s.mid_block_type is not None:
            h = features["mid_block"] = MidBlock(spec=s, scan_layers=self.scan_layers, **kw, name="mid_block")(
                h, emb, context)
        for i in range(s.num_blocks):
            h, feats = UpBlock(spec=s, index=i, scan_layers=self.scan_layers, **kw,
                               name=f"up_blocks_{i}")(h, skips, emb, context)
            features |= {f"up_blocks.{i}.{k}": v for k, v in feats.items()} | {f"up_blocks.{i}": h}

        h = nn.silu(self.group_norm(s.norm_num_groups, s.norm_eps, "conv_norm_out")(h))
        h = self.conv(s.out_channels, s.conv_out_kernel, "conv_out")(h)
        return UNetOutput(sample=h, features=features)


def dummy_inputs(spec: UNetSpec, batch: int = 1, size: int | tuple[int, int] | None = None, seq_len: int = 77,
                 dtype=jnp.float32) -> dict[str, jax.ShapeDtypeStruct]:
    """Abstract inputs for `jax.eval_shape` / lowering: NHWC latents of `size` (side, or (height, width);
    default: the smallest the spec accepts), a `seq_len`-token context and SDXL's 6 time ids."""
    size = size or spec.downscale
    height, width = (size, size) if isinstance(size, int) else size
    inputs = {
        "sample": jax.ShapeDtypeStruct((batch, height, width, spec.in_channels), dtype),
        "timesteps": jax.ShapeDtypeStruct((batch,), jnp.float32),
        "encoder_hidden_states": jax.ShapeDtypeStruct((batch, seq_len, spec.cross_attention_dim), dtype),
    }
    if spec.addition_embed_type == "text_time":
        n_ids = 6
        pooled = spec.projection_class_embeddings_input_dim - n_ids * spec.addition_time_embed_dim
        if pooled <= 0:  # a config for fewer time ids than SDXL's: all but one of the input is text
            n_ids, pooled = 1, spec.projection_class_embeddings_input_dim - spec.addition_time_embed_dim
        inputs["text_embeds"] = jax.ShapeDtypeStruct((batch, pooled), dtype)
        inputs["time_ids"] = jax.ShapeDtypeStruct((batch, n_ids), jnp.float32)
    return inputs


@functools.lru_cache(maxsize=32)
def abstract_params(spec: UNetSpec, param_dtype=jnp.float32) -> dict:
    """The parameter tree's shapes and dtypes (`jax.ShapeDtypeStruct` leaves), with no memory used.
    Cached per spec: tracing a deep model's init takes seconds. Treat the result as read-only. Traced with
    scanned layers (each attention module's layer once: SDXL 3.6 → 1.7 s), then unstacked to the per-layer tree."""
    model = UNet(spec, param_dtype=param_dtype, scan_layers=True)
    return jax.eval_shape(lambda rng, inputs: unstack_layers(model.init(rng, **inputs)["params"]),
                          jax.random.key(0), dummy_inputs(spec))


def init_params(spec: UNetSpec, rng: jax.Array, param_dtype=jnp.float32) -> dict:
    """Random parameters: kernels normal with variance 1/fan_in (Flax's LeCun default), biases 0, norm
    scales 1. Drawn leaf by leaf on the host from the abstract tree (tracing the whole model's `init`
    under jit costs minutes of compilation on a CPU for nothing), each leaf from its own seed, in threads
    (numpy draws without the GIL: SDXL's 2.6 B weights take ~40 s on one core)."""
    seed = np.asarray(jax.random.key_data(rng)).ravel().tolist()
    leaves = sorted(flatten_dict(abstract_params(spec, param_dtype)).items())

    def draw(i: int) -> np.ndarray:
        path, leaf = leaves[i]
        if path[-1] == "kernel":
            std = 1.0 / math.sqrt(math.prod(leaf.shape[:-1]))
            value = np.random.default_rng([*seed, i]).standard_normal(leaf.shape, np.float32)
            value *= np.float32(std)
            return value
        return (np.ones if path[-1] == "scale" else np.zeros)(leaf.shape, np.float32)

    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        values = list(pool.map(draw, range(len(leaves))))
    out = {path: jnp.asarray(value, leaf.dtype) for (path, leaf), value in zip(leaves, values, strict=True)}
    return unflatten_dict(out)


def count_params(spec: UNetSpec) -> int:
    """Number of parameters of the UNet that `spec` describes (computed from shapes only)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(spec)))


@functools.lru_cache(maxsize=64)
def flops(spec: UNetSpec, batch: int = 1, size: int | tuple[int, int] = 128, seq_len: int = 77) -> float:
    """Forward FLOPs of one UNet call (size: latent side) from XLA's cost analysis of the forward lowered
    for the CPU with the plain attention, so that the count is the same on every platform and kernel (a
    fused attention is a custom call that cost analysis cannot see; GPU plugins give no cost analysis
    before compiling). Lowering compiles nothing, so this is cheap at full size (SDXL: ~5 s on a 2-core
    CPU, then cached); the compiled program's count differs by < 0.1 % (fusion)."""
    model = UNet(spec, attention="xla")
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    on_cpu = lambda tree: jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=cpu), tree)  # noqa: E731
    with jax.set_mesh(None):  # a caller's device mesh (the trainer's loop runs in one) is not this CPU's
        lowered = jax.jit(lambda p, x: model.apply({"params": p}, **x).sample).lower(
            on_cpu(abstract_params(spec)), on_cpu(dummy_inputs(spec, batch, size, seq_len)))
    cost = lowered.cost_analysis() or lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(np.asarray(cost["flops"]))
