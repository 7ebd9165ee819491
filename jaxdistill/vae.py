"""SDXL's VAE in Flax linen: diffusers' `AutoencoderKL` (encoder and decoder), with diffusers' names.

The data pipeline uses it to turn images into the latents the UNet is distilled on, and sampling uses
it to turn latents back into images. diffusers dropped its Flax models in v0.40, so this one is checked
number for number against diffusers' PyTorch `AutoencoderKL` (`tests/test_vae.py`).

    spec, params = load_vae("path/to/sdxl")            # a `vae/` folder or a pipeline folder
    latents = encode_latents(spec, params, images)    # [B, H, W, 3] in [-1, 1] → [B, H/8, W/8, 4], scaled
    images = decode(spec, params, latents)            # and back

Arrays are NHWC. `latents` are always the *scaled* latents the UNet sees, `(z − shift) · scaling_factor`
(per channel `(z − latents_mean) · scaling_factor / latents_std` for VAEs whose config gives those);
`encode` returns the unscaled distribution the encoder predicts.

Precision: SDXL's VAE overflows in float16 (its config sets `force_upcast`; diffusers' pipelines upcast
it to float32). Run it with `dtype=jnp.float32` or `jnp.bfloat16` (bfloat16 has float32's range);
float16 compute is refused for a `force_upcast` VAE. Parameters may be stored in any dtype.

Not here: tiling and slicing for huge images, training the VAE (no KL loss, no discriminator).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill.convert import CONFIG_NAME, check_tree, read_safetensors, resolve_component, torch_to_flax
from jaxdistill.layers import Downsample2D, ResnetBlock2D, Upsample2D, _Layer, attention
from jaxdistill.records import read_json
from jaxdistill.spec import UnsupportedConfigError

DOWN_BLOCK = "DownEncoderBlock2D"
UP_BLOCK = "UpDecoderBlock2D"
EPS = 1e-6  # diffusers fixes every norm's epsilon in the VAE at 1e-6
LOGVAR_RANGE = (-30.0, 20.0)  # diffusers' DiagonalGaussianDistribution clamps logvar to this


# ---- the architecture ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class VAESpec:
    """A diffusers `AutoencoderKL`. Field names and defaults are diffusers' config fields and defaults;
    the down/up block types are implied (every block is a `DownEncoderBlock2D` / `UpDecoderBlock2D`).

    `scaling_factor`, `shift_factor`, `latents_mean` and `latents_std` do not change the network: they
    map the encoder's latents z to the UNet's, `(z − shift) · scaling_factor` (see `scale_latents`).
    `force_upcast` records that the VAE overflows in float16.
    """

    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, int] = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        # Lists (from JSON or user code) become tuples so the spec stays hashable (a static jit argument).
        object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
        for name in ("latents_mean", "latents_std"):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
        if not isinstance(self.sample_size, int):
            object.__setattr__(self, "sample_size", tuple(int(v) for v in self.sample_size))
        self._validate()

    @property
    def num_blocks(self) -> int:
        return len(self.block_out_channels)

    @property
    def downscale(self) -> int:
        """Image side ÷ latent side (8 for SDXL); image sides must be multiples of it."""
        return 2 ** (self.num_blocks - 1)

    @property
    def down_block_types(self) -> tuple[str, ...]:
        return (DOWN_BLOCK,) * self.num_blocks

    @property
    def up_block_types(self) -> tuple[str, ...]:
        return (UP_BLOCK,) * self.num_blocks

    def replace(self, **changes: Any) -> VAESpec:
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any] | str | os.PathLike) -> VAESpec:
        """Reads a diffusers `AutoencoderKL` config (a dict, or a path to `config.json`). Fields left out
        take diffusers' defaults; unknown fields and values we do not implement are refused."""
        if not isinstance(config, Mapping):
            config = read_json(config, error=UnsupportedConfigError, remedy="download or copy it again")
        return _spec_from_config(dict(config))

    def to_diffusers_config(self) -> dict[str, Any]:
        """The diffusers `AutoencoderKL` config that builds this architecture."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        config = {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}
        return {"_class_name": "AutoencoderKL", "act_fn": "silu", "down_block_types": list(self.down_block_types),
                "up_block_types": list(self.up_block_types), **config}

    def _validate(self):
        _check(self.num_blocks >= 1, "block_out_channels", self.block_out_channels, "at least one block")
        for name in ("in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, getattr(self, name),
                   "a positive int")
        _check(all(c % self.norm_num_groups == 0 for c in self.block_out_channels), "block_out_channels",
               self.block_out_channels, f"widths divisible by norm_num_groups={self.norm_num_groups}")
        _check(self.scaling_factor != 0, "scaling_factor", self.scaling_factor, "a non-zero number")
        _check((self.latents_mean is None) == (self.latents_std is None), "latents_mean",
               self.latents_mean, "latents_mean and latents_std given together (or neither)")
        for name in ("latents_mean", "latents_std"):
            value = getattr(self, name)
            _check(value is None or len(value) == self.latent_channels, name, value,
                   f"{self.latent_channels} values, one per latent channel")
        _check(self.latents_std is None or all(v != 0 for v in self.latents_std), "latents_std",
               self.latents_std, "non-zero values")
        _check(self.shift_factor is None or self.latents_mean is None, "shift_factor", self.shift_factor,
               "None when latents_mean is given (diffusers defines no way to apply both)")


def _check(ok: bool, field: str, value: Any, expected: str):
    if not ok:
        raise UnsupportedConfigError(f"VAESpec.{field}={value!r}: expected {expected}.")


_READ_FIELDS = frozenset(f.name for f in dataclasses.fields(VAESpec))
_ACT_FNS = ("silu", "swish")  # diffusers maps both to nn.SiLU


def _refuse(field: str, value: Any, supported: str):
    raise UnsupportedConfigError(
        f"diffusers AutoencoderKL config field {field}={value!r} is not supported by jaxdistill's VAE "
        f"(supported: {supported}).")


def _spec_from_config(cfg: dict[str, Any]) -> VAESpec:
    if cfg.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        _refuse("_class_name", cfg["_class_name"], "'AutoencoderKL'")
    # `_diffusers_version`, `_name_or_path` and other `_` keys are bookkeeping, not architecture.
    unknown = sorted(k for k in cfg if not k.startswith("_")
                     and k not in _READ_FIELDS | {"act_fn", "down_block_types", "up_block_types"})
    if unknown:
        raise UnsupportedConfigError(
            f"diffusers AutoencoderKL config has fields jaxdistill does not know: {unknown}. They may change "
            "the architecture, so the config is refused rather than read in part.")
    if cfg.get("act_fn", "silu") not in _ACT_FNS:
        _refuse("act_fn", cfg["act_fn"], " or ".join(map(repr, _ACT_FNS)))
    n = len(cfg.get("block_out_channels", VAESpec.block_out_channels))
    for field, allowed in (("down_block_types", DOWN_BLOCK), ("up_block_types", UP_BLOCK)):
        types = list(cfg.get(field, [allowed]))
        for t in types:
            if t != allowed:
                _refuse(field, types, f"only {allowed!r} blocks")
        if len(types) != n:
            _refuse(field, types, f"{n} block types, one per entry of block_out_channels")
    return VAESpec(**{k: v for k, v in cfg.items() if k in _READ_FIELDS})


# SDXL's VAE, as published in stabilityai/stable-diffusion-xl-base-1.0/vae (83,653,863 parameters).
SDXL_VAE = VAESpec(block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
                   norm_num_groups=32, sample_size=1024, scaling_factor=0.13025, force_upcast=True)


# ---- the modules --------------------------------------------------------------------------------

class Attention(_Layer):
    """The VAE's mid-block attention (diffusers' `Attention` as `UNetMidBlock2D` builds it): GroupNorm,
    one head as wide as the channels, to_q/to_k/to_v/to_out_0 all with bias, plus the input."""

    groups: int = 32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, C] → [B, H, W, C]."""
        b, hgt, wid, c = x.shape
        h = self.group_norm(self.groups, EPS, "group_norm")(x).reshape(b, hgt * wid, c)
        # [B, L, C] → [B, L, 1 head, C]; the logits and softmax are float32 (diffusers' upcast_softmax).
        q, k, v = (self.dense(c, name)(h)[:, :, None, :] for name in ("to_q", "to_k", "to_v"))
        out = attention(q, k, v, self.attention).astype(self.dtype).reshape(b, hgt * wid, c)
        return self.dense(c, "to_out_0")(out).reshape(b, hgt, wid, c) + x  # rescale_output_factor is 1


class UNetMidBlock2D(_Layer):
    """resnet, attention (unless `add_attention` is off), resnet; no time embedding."""

    groups: int = 32
    add_attention: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, C] → [B, H, W, C]."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        c = x.shape[-1]
        x = ResnetBlock2D(c, self.groups, EPS, **kw, name="resnets_0")(x)
        if self.add_attention:
            x = Attention(self.groups, **kw, name="attentions_0")(x)
        return ResnetBlock2D(c, self.groups, EPS, **kw, name="resnets_1")(x)


class DownEncoderBlock2D(_Layer):
    """`num_layers` resnets, then (except in the last block) a stride-2 conv padded bottom/right only."""

    out_channels: int = 128
    num_layers: int = 2
    groups: int = 32
    add_downsample: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, Cin] → [B, H/2, W/2, out_channels] (H, W without the downsample)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, EPS, **kw, name=f"resnets_{j}")(x)
        if self.add_downsample:
            x = Downsample2D(padding=0, **kw, name="downsamplers_0")(x)
        return x


class UpDecoderBlock2D(_Layer):
    """`num_layers` resnets, then (except in the last block) nearest ×2 and a conv."""

    out_channels: int = 128
    num_layers: int = 3
    groups: int = 32
    add_upsample: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """x [B, H, W, Cin] → [B, 2H, 2W, out_channels] (H, W without the upsample)."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        for j in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, EPS, **kw, name=f"resnets_{j}")(x)
        if self.add_upsample:
            x = Upsample2D(**kw, name="upsamplers_0")(x)
        return x


class Encoder(_Layer):
    """conv_in → down blocks → mid block → GroupNorm → SiLU → conv_out to 2·latent_channels (mean, logvar)."""

    spec: VAESpec = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """images [B, H, W, in_channels] → [B, H/f, W/f, 2·latent_channels], f = spec.downscale."""
        s, kw = self.spec, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = self.conv(s.block_out_channels[0], 3, "conv_in")(x.astype(self.dtype))
        for i, width in enumerate(s.block_out_channels):
            x = DownEncoderBlock2D(width, s.layers_per_block, s.norm_num_groups, i < s.num_blocks - 1, **kw,
                                   name=f"down_blocks_{i}")(x)
        x = UNetMidBlock2D(s.norm_num_groups, s.mid_block_add_attention, **kw, name="mid_block")(x)
        x = nn.silu(self.group_norm(s.norm_num_groups, EPS, "conv_norm_out")(x))
        return self.conv(2 * s.latent_channels, 3, "conv_out")(x)


class Decoder(_Layer):
    """conv_in → mid block → up blocks (one resnet more than the down blocks) → GroupNorm → SiLU → conv_out."""

    spec: VAESpec = None

    @nn.compact
    def __call__(self, z: jax.Array) -> jax.Array:
        """z [B, h, w, latent_channels] (unscaled) → images [B, h·f, w·f, out_channels]."""
        s, kw = self.spec, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = self.conv(s.block_out_channels[-1], 3, "conv_in")(z.astype(self.dtype))
        x = UNetMidBlock2D(s.norm_num_groups, s.mid_block_add_attention, **kw, name="mid_block")(x)
        for i, width in enumerate(reversed(s.block_out_channels)):
            x = UpDecoderBlock2D(width, s.layers_per_block + 1, s.norm_num_groups, i < s.num_blocks - 1, **kw,
                                 name=f"up_blocks_{i}")(x)
        x = nn.silu(self.group_norm(s.norm_num_groups, EPS, "conv_norm_out")(x))
        return self.conv(s.out_channels, 3, "conv_out")(x)


class AutoencoderKL(_Layer):
    """diffusers' `AutoencoderKL`, NHWC. `encode` gives the latent distribution, `decode` takes unscaled
    latents z (as diffusers' `vae.decode`); `__call__` is encode → mode → decode."""

    spec: VAESpec = None

    def setup(self):
        s, kw = self.spec, dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.encoder = Encoder(s, **kw)
        self.decoder = Decoder(s, **kw)
        self.quant_conv = nn.Conv(2 * s.latent_channels, (1, 1), **kw) if s.use_quant_conv else None
        self.post_quant_conv = nn.Conv(s.latent_channels, (1, 1), **kw) if s.use_post_quant_conv else None

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """images [B, H, W, in_channels] in [-1, 1] → (mean, logvar) [B, H/f, W/f, latent_channels],
        float32, logvar clamped to [-30, 20]."""
        h = self.encoder(images)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)  # channels: mean first, then logvar
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z: jax.Array) -> jax.Array:
        """z [B, h, w, latent_channels], unscaled → images [B, h·f, w·f, out_channels], float32, unclipped."""
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, images: jax.Array) -> jax.Array:
        return self.decode(self.encode(images)[0])


# ---- pure functions -----------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("spec", "dtype"))
def encode(spec: VAESpec, params: Mapping, images: jax.Array, *,
           dtype: jnp.dtype | type = jnp.float32) -> tuple[jax.Array, jax.Array]:
    """images [B, H, W, in_channels] in [-1, 1] (H, W multiples of `spec.downscale`) → the latent
    distribution (mean, logvar), each [B, H/f, W/f, latent_channels] in float32, after `quant_conv`, logvar
    clamped to [-30, 20] as diffusers does. Unscaled: `scale_latents` maps a draw to the UNet's latents.
    `dtype` is the compute dtype."""
    _check_dtype(spec, dtype)
    return AutoencoderKL(spec, dtype=dtype).apply({"params": params}, images, method=AutoencoderKL.encode)


def sample_latents(mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
    """One draw z = mean + exp(logvar / 2) · ε, ε ~ N(0, 1) from `rng` (diffusers'
    `DiagonalGaussianDistribution.sample`). [B, h, w, C] → [B, h, w, C], float32."""
    eps = jax.random.normal(rng, mean.shape, jnp.float32)
    return mean + jnp.exp(0.5 * logvar) * eps


def scale_latents(spec: VAESpec, z: jax.Array) -> jax.Array:
    """The encoder's latents z → the UNet's: (z − shift) · scaling_factor, shift = `shift_factor` (0 when
    None); or, for a VAE whose config gives per-channel statistics, (z − latents_mean) · scaling_factor /
    latents_std (diffusers' SDXL pipelines). [B, h, w, C], channels last."""
    shift, std = _latent_stats(spec)
    return (z - shift) * (spec.scaling_factor / std)


def unscale_latents(spec: VAESpec, latents: jax.Array) -> jax.Array:
    """The inverse of `scale_latents`: the UNet's latents → the decoder's z."""
    shift, std = _latent_stats(spec)
    return latents * (std / spec.scaling_factor) + shift


@functools.partial(jax.jit, static_argnames=("spec", "dtype"))
def encode_latents(spec: VAESpec, params: Mapping, images: jax.Array, rng: jax.Array | None = None, *,
                   dtype: jnp.dtype | type = jnp.float32) -> jax.Array:
    """images [B, H, W, in_channels] in [-1, 1] → the UNet's latents [B, H/f, W/f, latent_channels],
    float32: the distribution's mode (its mean) when `rng` is None, else one draw with `rng`, then
    `scale_latents`. SDXL: f = 8, `vae.encode(x).latent_dist.mode() * 0.13025`."""
    mean, logvar = encode(spec, params, images, dtype=dtype)
    z = mean if rng is None else sample_latents(mean, logvar, rng)
    return scale_latents(spec, z)


@functools.partial(jax.jit, static_argnames=("spec", "dtype"))
def decode(spec: VAESpec, params: Mapping, latents: jax.Array, *,
           dtype: jnp.dtype | type = jnp.float32) -> jax.Array:
    """The UNet's (scaled) latents [B, h, w, latent_channels] → images [B, h·f, w·f, out_channels] in about
    [-1, 1], float32, not clipped (clip and map to [0, 1] for display, as diffusers' image processor does)."""
    _check_dtype(spec, dtype)
    z = unscale_latents(spec, latents.astype(jnp.float32))
    return AutoencoderKL(spec, dtype=dtype).apply({"params": params}, z, method=AutoencoderKL.decode)


# ---- weights ------------------------------------------------------------------------------------

def load_vae(path: str | os.PathLike, dtype: jnp.dtype | type | None = None,
             variant: str | None = None) -> tuple[VAESpec, dict]:
    """Reads a diffusers `AutoencoderKL` folder (or a pipeline folder with `vae/`) → (spec, params).

    Weights: `diffusion_pytorch_model[.<variant>].safetensors`, single or sharded; with no variant given
    and only an fp16 file present, that file is read. The mid-block attentions' pre-0.14 names
    (`query`, `key`, `value`, `proj_attn`) are renamed as diffusers does. The check is strict: one
    `WeightsError` lists every missing, unexpected and misshaped tensor. `dtype` casts every parameter
    (None keeps the file's). Parameters come back as jax arrays on the default device.
    """
    folder = resolve_component(path, "vae", "VAE")
    spec = VAESpec.from_diffusers_config(folder / CONFIG_NAME)
    state = _rename_deprecated_attention(read_safetensors(folder, variant))
    params = torch_to_flax(state)
    check_vae_params(spec, params)
    if dtype is not None:
        params = jax.tree.map(lambda x: np.asarray(x).astype(dtype), params)
    return spec, jax.tree.map(jnp.asarray, params)


@functools.lru_cache(maxsize=16)
def abstract_vae_params(spec: VAESpec, param_dtype=jnp.float32) -> dict:
    """The parameter tree's shapes and dtypes (`jax.ShapeDtypeStruct` leaves), with no memory used.
    Cached per spec; treat the result as read-only."""
    images = jax.ShapeDtypeStruct((1, spec.downscale, spec.downscale, spec.in_channels), jnp.float32)
    model = AutoencoderKL(spec, param_dtype=param_dtype)
    return jax.eval_shape(lambda rng, x: model.init(rng, x)["params"], jax.random.key(0), images)


def count_vae_params(spec: VAESpec) -> int:
    """Number of parameters of the VAE that `spec` describes (from shapes only)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_vae_params(spec)))


def check_vae_params(spec: VAESpec, params: Mapping):
    """Raises one `WeightsError` listing every missing, unexpected and misshaped parameter."""
    check_tree(abstract_vae_params(spec), params, "VAE")


# ---- helpers ------------------------------------------------------------------------------------

_DEPRECATED_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _rename_deprecated_attention(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """`{encoder,decoder}.mid_block.attentions.N.query.weight` → `...to_q.weight` and so on, unless the
    new name is there too (diffusers' `_convert_deprecated_attention_blocks`)."""
    out = dict(state)
    for key in state:
        parts = key.split(".")
        if (len(parts) == 6 and parts[0] in ("encoder", "decoder") and parts[1:3] == ["mid_block", "attentions"]
                and parts[4] in _DEPRECATED_ATTENTION_NAMES):
            new = ".".join([*parts[:4], _DEPRECATED_ATTENTION_NAMES[parts[4]], parts[5]])
            if new not in state:
                out[new] = out.pop(key)
    return out


def _latent_stats(spec: VAESpec) -> tuple[jax.Array | float, jax.Array | float]:
    """(shift, std) of `scale_latents`, broadcasting over the channel (last) axis."""
    if spec.latents_mean is not None:
        return jnp.asarray(spec.latents_mean, jnp.float32), jnp.asarray(spec.latents_std, jnp.float32)
    return (spec.shift_factor or 0.0), 1.0


def _check_dtype(spec: VAESpec, dtype):
    if spec.force_upcast and jnp.dtype(dtype) == jnp.float16:
        raise ValueError("this VAE's config sets force_upcast: it overflows in float16 (SDXL's does). Compute in "
                         "jnp.float32 or jnp.bfloat16, or use a VAE fine-tuned for float16 whose config sets "
                         "force_upcast false (e.g. madebyollin/sdxl-vae-fp16-fix).")
