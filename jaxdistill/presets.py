"""Architectures of the SDXL family as `UNetSpec`s, and a shrink that keeps a topology at tiny widths.

`SDXL`, `SSD_1B` and `VEGA` equal the diffusers configs in `shared/reference/unet_configs/`
(2,567,463,684 / 1,331,334,404 / 745,225,604 parameters). `tiny(spec)` keeps every depth, block type
and the mid block's form and shrinks the widths, for tests and CPU runs.
"""

from __future__ import annotations

from jaxdistill.spec import CROSS_ATTN_MID, RESNET_MID, UNetSpec

SDXL = UNetSpec(
    block_out_channels=(320, 640, 1280),
    down_depths=((0, 0), (2, 2), (10, 10)),
    up_depths=((10, 10, 10), (2, 2, 2), (0, 0, 0)),
    num_attention_heads=(5, 10, 20),
    mid_block_type=CROSS_ATTN_MID,
    mid_depth=10,
)

# Segmind's SSD-1B: deep blocks cut from 10 to 4 layers on the way down, an up path that is not the
# mirror of the down path, and the mid block reduced to one resnet.
SSD_1B = SDXL.replace(
    down_depths=((0, 0), (2, 2), (4, 4)),
    up_depths=((4, 4, 10), (2, 1, 1), (0, 0, 0)),
    mid_block_type=RESNET_MID,
)

# Segmind-Vega: every attention block halved again, mid block one resnet.
VEGA = SDXL.replace(
    down_depths=((0, 0), (1, 1), (2, 2)),
    up_depths=((2, 2, 2), (1, 1, 1), (0, 0, 0)),
    mid_block_type=RESNET_MID,
)

PRESETS = {"sdxl": SDXL, "ssd1b": SSD_1B, "vega": VEGA}


def tiny(spec: UNetSpec = SDXL, block_out_channels: tuple[int, ...] = (32, 64, 64),
         num_attention_heads: tuple[int, ...] = (1, 2, 2), cross_attention_dim: int = 64,
         text_embeds_dim: int = 32, addition_time_embed_dim: int = 8, norm_num_groups: int = 8) -> UNetSpec:
    """`spec`'s topology (depths, block types, mid block) at tiny widths; SDXL's 6 time ids."""
    return spec.replace(
        block_out_channels=block_out_channels, num_attention_heads=num_attention_heads,
        cross_attention_dim=cross_attention_dim, addition_time_embed_dim=addition_time_embed_dim,
        projection_class_embeddings_input_dim=text_embeds_dim + 6 * addition_time_embed_dim,
        norm_num_groups=norm_num_groups, sample_size=32)
