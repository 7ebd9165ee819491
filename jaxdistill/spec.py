"""`UNetSpec`: the architecture of an SDXL-family UNet as plain, hashable data.

The spec converts to and from a diffusers `UNet2DConditionModel` `config.json`. It describes what the
Flax model in `unet.py` builds; it holds no weights. Every diffusers field is either expressed by the
spec or checked to have the one value our model implements: a config we cannot build exactly is refused
with an error that names the field, never half-read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from jaxdistill.records import read_json

CROSS_ATTN_MID = "UNetMidBlock2DCrossAttn"
RESNET_MID = "UNetMidBlock2D"
MID_BLOCK_TYPES = (CROSS_ATTN_MID, RESNET_MID, None)


class UnsupportedConfigError(ValueError):
    """A diffusers config holds a value that jaxdistill's UNet does not implement."""


@dataclasses.dataclass(frozen=True)
class UNetSpec:
    """An SDXL-family UNet.

    `down_depths[i][j]` is the transformer depth after resnet `j` of down block `i` (0: no attention);
    `up_depths` likewise for the up blocks, which have one resnet more than their mirrored down block.
    A block with attention is diffusers' `CrossAttn{Down,Up}Block2D`, one without is `{Down,Up}Block2D`.
    `mid_depth` is the depth of the mid block's attention (only for `UNetMidBlock2DCrossAttn`; 0 otherwise).
    `num_attention_heads[i]` is the head count of block `i` (diffusers' config calls it
    `attention_head_dim`); the head size is the block's width divided by it.
    """

    block_out_channels: tuple[int, ...]
    down_depths: tuple[tuple[int, ...], ...]
    up_depths: tuple[tuple[int, ...], ...]
    num_attention_heads: tuple[int, ...]
    mid_block_type: str | None = CROSS_ATTN_MID
    mid_depth: int = 1
    cross_attention_dim: int = 2048
    in_channels: int = 4
    out_channels: int = 4
    use_linear_projection: bool = True
    addition_embed_type: str | None = "text_time"
    addition_time_embed_dim: int | None = 256
    projection_class_embeddings_input_dim: int | None = 2816
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    upcast_attention: bool = False
    sample_size: int | tuple[int, int] | None = 128

    def __post_init__(self):
        # Normalise lists (from JSON or user code) to tuples so the spec stays hashable.
        for name in ("block_out_channels", "num_attention_heads"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        for name in ("down_depths", "up_depths"):
            object.__setattr__(self, name, tuple(tuple(int(d) for d in b) for b in getattr(self, name)))
        if isinstance(self.sample_size, (list, tuple)):  # diffusers accepts [height, width]
            object.__setattr__(self, "sample_size", tuple(int(v) for v in self.sample_size))
        if self.mid_block_type != CROSS_ATTN_MID:  # no mid attention: one architecture, one spec
            object.__setattr__(self, "mid_depth", 0)
        self._validate()

    # ---- derived facts --------------------------------------------------------------------------

    @property
    def num_blocks(self) -> int:
        return len(self.block_out_channels)

    @property
    def downscale(self) -> int:
        """How much the UNet downsamples its latents (2^(blocks − 1)): their sides must be multiples of it."""
        return 2 ** (self.num_blocks - 1)

    @property
    def layers_per_block(self) -> tuple[int, ...]:
        return tuple(len(d) for d in self.down_depths)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    @property
    def down_block_types(self) -> tuple[str, ...]:
        return tuple("CrossAttnDownBlock2D" if any(d) else "DownBlock2D" for d in self.down_depths)

    @property
    def up_block_types(self) -> tuple[str, ...]:
        return tuple("CrossAttnUpBlock2D" if any(d) else "UpBlock2D" for d in self.up_depths)

    def replace(self, **changes: Any) -> UNetSpec:
        return dataclasses.replace(self, **changes)

    # ---- diffusers config -----------------------------------------------------------------------

    @classmethod
    def from_diffusers_config(cls, config: Mapping[str, Any] | str | Path) -> UNetSpec:
        """Reads a diffusers `UNet2DConditionModel` config (a dict, or a path to `config.json`)."""
        if not isinstance(config, Mapping):
            config = read_json(config, error=UnsupportedConfigError, remedy="download or copy it again")
        return _spec_from_config(dict(config))

    def to_diffusers_config(self) -> dict[str, Any]:
        """The diffusers `UNet2DConditionModel` config that builds this architecture."""
        return _config_from_spec(self)

    def _validate(self):
        n = self.num_blocks
        _check(n >= 1, "block_out_channels", self.block_out_channels, "at least one block")
        for name in ("down_depths", "up_depths", "num_attention_heads"):
            _check(len(getattr(self, name)) == n, name, getattr(self, name), f"{n} entries, one per block")
        for i, (down, up) in enumerate(zip(self.down_depths, self.up_depths[::-1], strict=True)):
            _check(len(down) >= 1, "down_depths", self.down_depths, "at least one resnet per block")
            _check(len(up) == len(down) + 1, "up_depths", self.up_depths,
                   "each up block to have one resnet more than its mirrored down block "
                   f"(down block {i} has {len(down)}, so up block {n - 1 - i} needs {len(down) + 1})")
        for name, blocks in (("down_depths", self.down_depths), ("up_depths", self.up_depths)):
            for i, depths in enumerate(blocks):
                _check(all(d >= 0 for d in depths), name, blocks, "depths ≥ 0")
                _check(all(depths) or not any(depths), name, blocks,
                       f"block {i} to have attention after every resnet or after none "
                       "(diffusers' blocks cannot mix)")
        _check(self.mid_block_type in MID_BLOCK_TYPES, "mid_block_type", self.mid_block_type,
               f"one of {MID_BLOCK_TYPES}")
        if self.mid_block_type == CROSS_ATTN_MID:
            _check(self.mid_depth >= 1, "mid_depth", self.mid_depth, "≥ 1 for UNetMidBlock2DCrossAttn")
        for i, (c, h) in enumerate(zip(self.block_out_channels, self.num_attention_heads, strict=True)):
            _check(c % self.norm_num_groups == 0, "block_out_channels", self.block_out_channels,
                   f"widths divisible by norm_num_groups={self.norm_num_groups}")
            _check(h >= 1 and c % h == 0, "num_attention_heads", self.num_attention_heads,
                   f"a head count that divides block {i}'s width {c}")
        _check(self.addition_embed_type in ("text_time", None), "addition_embed_type",
               self.addition_embed_type, "'text_time' or None")
        if self.addition_embed_type == "text_time":
            _check(self.addition_time_embed_dim is not None and self.addition_time_embed_dim > 0,
                   "addition_time_embed_dim", self.addition_time_embed_dim, "a positive int for text_time")
            _check(self.projection_class_embeddings_input_dim is not None
                   and self.projection_class_embeddings_input_dim > self.addition_time_embed_dim,
                   "projection_class_embeddings_input_dim", self.projection_class_embeddings_input_dim,
                   "the pooled text embedding's width + (number of time ids) * addition_time_embed_dim")
        for name in ("conv_in_kernel", "conv_out_kernel"):
            _check(getattr(self, name) % 2 == 1, name, getattr(self, name), "an odd kernel size")


def _check(ok: bool, field: str, value: Any, expected: str):
    if not ok:
        raise UnsupportedConfigError(f"UNetSpec.{field}={value!r}: expected {expected}.")


# diffusers fields that jaxdistill's UNet implements only at one setting (SDXL's), with the accepted
# values. Anything else is refused rather than built wrong.
_FIXED_FIELDS: dict[str, tuple[Any, ...]] = {
    "act_fn": ("silu",),
    "attention_type": ("default",),
    "center_input_sample": (False,),
    "class_embed_type": (None,),
    "class_embeddings_concat": (False,),
    "cross_attention_norm": (None,),
    "downsample_padding": (1,),
    "dropout": (0.0,),
    "dual_cross_attention": (False,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "mid_block_only_cross_attention": (None, False),
    "mid_block_scale_factor": (1.0,),
    "num_attention_heads": (None,),
    "num_class_embeds": (None,),
    "resnet_out_scale_factor": (1.0,),
    "resnet_skip_time_act": (False,),
    "resnet_time_scale_shift": ("default",),
    "time_cond_proj_dim": (None,),
    "time_embedding_act_fn": (None,),
    "time_embedding_dim": (None,),
    "time_embedding_type": ("positional",),
    "timestep_post_act": (None,),
}
# Fields the spec reads (or that have no effect on an SDXL-family model: the head count of the
# unused "text" add-embedding).
_READ_FIELDS = {
    "block_out_channels", "down_block_types", "up_block_types", "layers_per_block",
    "transformer_layers_per_block", "reverse_transformer_layers_per_block", "mid_block_type",
    "attention_head_dim", "cross_attention_dim", "in_channels", "out_channels",
    "use_linear_projection", "addition_embed_type", "addition_time_embed_dim",
    "projection_class_embeddings_input_dim", "norm_num_groups", "norm_eps", "flip_sin_to_cos",
    "freq_shift", "conv_in_kernel", "conv_out_kernel", "upcast_attention", "sample_size",
    "only_cross_attention", "addition_embed_type_num_heads",
}
_DOWN_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
_UP_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")


def _refuse(field: str, value: Any, supported: str):
    raise UnsupportedConfigError(
        f"diffusers config field {field}={value!r} is not supported by jaxdistill's UNet "
        f"(supported: {supported}). Use an SDXL-family UNet2DConditionModel config.")


def _per_block(cfg: dict, field: str, n: int) -> list:
    value = cfg[field]
    if isinstance(value, (int, float)) or value is None:
        return [value] * n
    if len(value) != n:
        _refuse(field, value, f"a single value or a list of {n}, one per block")
    return list(value)


def _block_depths(field: str, entry: Any, block_type: str, num: int, attn_type: str) -> tuple[int, ...]:
    """Per-resnet transformer depths of one block from a `transformer_layers_per_block` entry."""
    if block_type != attn_type:
        return (0,) * num
    depths = [entry] * num if isinstance(entry, int) else list(entry)
    if len(depths) != num or not all(isinstance(d, int) and d >= 1 for d in depths):
        _refuse(field, entry, f"an int ≥ 1 or a list of {num} ints ≥ 1 for a {block_type} of {num} resnets")
    return tuple(depths)


def _spec_from_config(cfg: dict[str, Any]) -> UNetSpec:
    if cfg.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        _refuse("_class_name", cfg["_class_name"], "'UNet2DConditionModel'")
    unknown = sorted(k for k in cfg if not k.startswith("_") and k not in _READ_FIELDS | set(_FIXED_FIELDS))
    if unknown:
        raise UnsupportedConfigError(
            f"diffusers config has fields jaxdistill does not know: {unknown}. They may change the "
            "architecture, so the config is refused rather than read in part.")
    for field, allowed in _FIXED_FIELDS.items():
        if field in cfg and cfg[field] not in allowed:
            _refuse(field, cfg[field], " or ".join(repr(a) for a in allowed))
    if cfg.get("only_cross_attention", False) not in (False,) and not (
            isinstance(cfg["only_cross_attention"], list) and not any(cfg["only_cross_attention"])):
        _refuse("only_cross_attention", cfg["only_cross_attention"], "False")

    # diffusers' defaults for the fields SDXL configs always spell out.
    cfg = {"in_channels": 4, "out_channels": 4, "flip_sin_to_cos": True, "freq_shift": 0,
           "layers_per_block": 2, "norm_num_groups": 32, "norm_eps": 1e-5, "cross_attention_dim": 1280,
           "transformer_layers_per_block": 1, "reverse_transformer_layers_per_block": None,
           "attention_head_dim": 8, "use_linear_projection": False, "addition_embed_type": None,
           "addition_time_embed_dim": None, "projection_class_embeddings_input_dim": None,
           "upcast_attention": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
           "mid_block_type": CROSS_ATTN_MID, "sample_size": None,
           "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
           "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
           "block_out_channels": (320, 640, 1280, 1280)} | cfg

    down_types, up_types = list(cfg["down_block_types"]), list(cfg["up_block_types"])
    n = len(cfg["block_out_channels"])
    for field, types, allowed in (("down_block_types", down_types, _DOWN_TYPES),
                                  ("up_block_types", up_types, _UP_TYPES)):
        if len(types) != n:
            _refuse(field, types, f"{n} block types, one per entry of block_out_channels")
        for t in types:
            if t not in allowed:
                _refuse(field, types, f"blocks of types {allowed}")
    if cfg["mid_block_type"] not in MID_BLOCK_TYPES:
        _refuse("mid_block_type", cfg["mid_block_type"], f"one of {MID_BLOCK_TYPES}")
    if cfg["norm_num_groups"] is None:
        _refuse("norm_num_groups", None, "an int")
    cross = cfg["cross_attention_dim"]
    if not isinstance(cross, int):
        if len(set(cross)) != 1:
            _refuse("cross_attention_dim", cross, "one width for every block")
        cross = cross[0]

    layers = _per_block(cfg, "layers_per_block", n)
    heads = _per_block(cfg, "attention_head_dim", n)
    tlpb = _per_block(cfg, "transformer_layers_per_block", n)
    reverse = cfg["reverse_transformer_layers_per_block"]
    if reverse is None:
        if any(isinstance(t, list) for t in tlpb):
            _refuse("reverse_transformer_layers_per_block", None,
                    "a list whenever transformer_layers_per_block is given per resnet (as diffusers requires)")
        reverse = tlpb[::-1]
    elif len(reverse) != n:
        _refuse("reverse_transformer_layers_per_block", reverse, f"a list of {n}, one per up block")

    down = tuple(_block_depths("transformer_layers_per_block", tlpb[i], down_types[i], layers[i],
                               "CrossAttnDownBlock2D") for i in range(n))
    up = tuple(_block_depths("reverse_transformer_layers_per_block", reverse[i], up_types[i],
                             layers[::-1][i] + 1, "CrossAttnUpBlock2D") for i in range(n))
    mid_depth = 0
    if cfg["mid_block_type"] == CROSS_ATTN_MID:
        # diffusers hands the mid block `transformer_layers_per_block[-1]`; its one attention takes
        # the first entry when that is a list.
        last = tlpb[-1]
        mid_depth = last if isinstance(last, int) else last[0]

    return UNetSpec(
        block_out_channels=tuple(cfg["block_out_channels"]), down_depths=down, up_depths=up,
        num_attention_heads=tuple(heads), mid_block_type=cfg["mid_block_type"], mid_depth=mid_depth,
        cross_attention_dim=cross, in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
        use_linear_projection=cfg["use_linear_projection"], addition_embed_type=cfg["addition_embed_type"],
        addition_time_embed_dim=cfg["addition_time_embed_dim"],
        projection_class_embeddings_input_dim=cfg["projection_class_embeddings_input_dim"],
        norm_num_groups=cfg["norm_num_groups"], norm_eps=cfg["norm_eps"],
        flip_sin_to_cos=cfg["flip_sin_to_cos"], freq_shift=cfg["freq_shift"],
        conv_in_kernel=cfg["conv_in_kernel"], conv_out_kernel=cfg["conv_out_kernel"],
        upcast_attention=cfg["upcast_attention"], sample_size=cfg["sample_size"])


def _depth_entry(depths: Sequence[int]) -> int | list[int]:
    """A `transformer_layers_per_block` entry: an int for a uniform block, 1 for a block without
    attention (diffusers ignores it there, and SDXL's config writes 1), else the per-resnet list."""
    if not any(depths):
        return 1
    return depths[0] if len(set(depths)) == 1 else list(depths)


def _config_from_spec(spec: UNetSpec) -> dict[str, Any]:
    down = [_depth_entry(d) for d in spec.down_depths]
    up = [_depth_entry(d) for d in spec.up_depths]
    if spec.mid_block_type == CROSS_ATTN_MID:
        last = down[-1] if isinstance(down[-1], int) else down[-1][0]
        if not any(spec.down_depths[-1]):
            down[-1] = spec.mid_depth  # the last down block has no attention: its entry is free
        elif last != spec.mid_depth:
            raise UnsupportedConfigError(
                f"UNetSpec.mid_depth={spec.mid_depth} cannot be written as a diffusers config: diffusers "
                f"takes the mid block's depth from the last down block's ({last}).")
    # After the mid block's entry: without reverse_transformer_layers_per_block diffusers reads up block 0's
    # depth from it too.
    mirrored = all(isinstance(e, int) for e in down) and all(
        not any(u) or set(u) == {down[::-1][i]} for i, u in enumerate(spec.up_depths))
    layers = spec.layers_per_block
    return {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "addition_embed_type": spec.addition_embed_type,
        "addition_embed_type_num_heads": 64,
        "addition_time_embed_dim": spec.addition_time_embed_dim,
        "attention_head_dim": list(spec.num_attention_heads),
        "attention_type": "default",
        "block_out_channels": list(spec.block_out_channels),
        "center_input_sample": False,
        "class_embed_type": None,
        "class_embeddings_concat": False,
        "conv_in_kernel": spec.conv_in_kernel,
        "conv_out_kernel": spec.conv_out_kernel,
        "cross_attention_dim": spec.cross_attention_dim,
        "cross_attention_norm": None,
        "down_block_types": list(spec.down_block_types),
        "downsample_padding": 1,
        "dropout": 0.0,
        "dual_cross_attention": False,
        "encoder_hid_dim": None,
        "encoder_hid_dim_type": None,
        "flip_sin_to_cos": spec.flip_sin_to_cos,
        "freq_shift": spec.freq_shift,
        "in_channels": spec.in_channels,
        "layers_per_block": layers[0] if len(set(layers)) == 1 else list(layers),
        "mid_block_only_cross_attention": None,
        "mid_block_scale_factor": 1,
        "mid_block_type": spec.mid_block_type,
        "norm_eps": spec.norm_eps,
        "norm_num_groups": spec.norm_num_groups,
        "num_attention_heads": None,
        "num_class_embeds": None,
        "only_cross_attention": False,
        "out_channels": spec.out_channels,
        "projection_class_embeddings_input_dim": spec.projection_class_embeddings_input_dim,
        "resnet_out_scale_factor": 1.0,
        "resnet_skip_time_act": False,
        "resnet_time_scale_shift": "default",
        "reverse_transformer_layers_per_block": None if mirrored else up,
        "sample_size": list(spec.sample_size) if isinstance(spec.sample_size, tuple) else spec.sample_size,
        "time_cond_proj_dim": None,
        "time_embedding_act_fn": None,
        "time_embedding_dim": None,
        "time_embedding_type": "positional",
        "timestep_post_act": None,
        "transformer_layers_per_block": down,
        "up_block_types": list(spec.up_block_types),
        "upcast_attention": spec.upcast_attention,
        "use_linear_projection": spec.use_linear_projection,
    }
