"""UNetSpec ↔ diffusers config: presets, every SDXL-family field form, refusals, parameter counts."""

import json
import os

import pytest
import torch
from conftest import REFERENCE_CONFIGS, TINY
from diffusers import UNet2DConditionModel

from jaxdistill import UnsupportedConfigError, count_params, presets
from jaxdistill.spec import RESNET_MID, UNetSpec

REFERENCES = {"sdxl": "sdxl-base-1.0.json", "ssd1b": "ssd-1b.json", "vega": "segmind-vega.json"}
COUNTS = {"sdxl": 2_567_463_684, "ssd1b": 1_331_334_404, "vega": 745_225_604}


def reference_config(name: str) -> dict:
    with open(os.path.join(REFERENCE_CONFIGS, REFERENCES[name])) as f:
        return json.load(f)


def diffusers_count(config: dict) -> int:
    with torch.device("meta"):  # shapes only: no memory for 2.6 B parameters
        model = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_presets_equal_reference_configs(name):
    config = reference_config(name)
    assert UNetSpec.from_diffusers_config(config) == presets.PRESETS[name]
    assert presets.PRESETS[name].to_diffusers_config() == config  # every field, written back exactly


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_parameter_counts(name):
    assert count_params(presets.PRESETS[name]) == COUNTS[name] == diffusers_count(reference_config(name))


@pytest.mark.parametrize("name", sorted(TINY))
def test_round_trip_and_diffusers_builds_the_same_architecture(name):
    spec = TINY[name]
    config = spec.to_diffusers_config()
    assert UNetSpec.from_diffusers_config(json.loads(json.dumps(config))) == spec
    assert count_params(spec) == diffusers_count(config)


def test_spec_is_hashable_data():
    assert hash(presets.SDXL) == hash(UNetSpec.from_diffusers_config(reference_config("sdxl")))
    assert presets.SDXL != presets.SSD_1B
    assert UNetSpec(block_out_channels=[32, 64], down_depths=[[0], [1]], up_depths=[[1, 1], [0, 0]],
                    num_attention_heads=[1, 2], norm_num_groups=8, cross_attention_dim=8,
                    addition_time_embed_dim=4, projection_class_embeddings_input_dim=32).down_depths == ((0,), (1,))


def sdxl_with(**changes) -> dict:
    return reference_config("sdxl") | changes


@pytest.mark.parametrize("changes, down, up, mid", [
    # transformer_layers_per_block as one int for every block
    (dict(transformer_layers_per_block=3), ((0, 0), (3, 3), (3, 3)), ((3, 3, 3), (3, 3, 3), (0, 0, 0)), 3),
    # layers_per_block per block
    (dict(layers_per_block=[1, 2, 3]), ((0,), (2, 2), (10, 10, 10)),
     ((10, 10, 10, 10), (2, 2, 2), (0, 0)), 10),
    # per-resnet depths need the reverse list; the mid block takes the last entry's first element
    (dict(transformer_layers_per_block=[1, [1, 2], [3, 4]], reverse_transformer_layers_per_block=[[5, 6, 7], 2, 1]),
     ((0, 0), (1, 2), (3, 4)), ((5, 6, 7), (2, 2, 2), (0, 0, 0)), 3),
    (dict(mid_block_type=None), ((0, 0), (2, 2), (10, 10)), ((10, 10, 10), (2, 2, 2), (0, 0, 0)), 0),
])
def test_config_forms(changes, down, up, mid):
    spec = UNetSpec.from_diffusers_config(sdxl_with(**changes))
    assert (spec.down_depths, spec.up_depths, spec.mid_depth) == (down, up, mid)
    assert UNetSpec.from_diffusers_config(spec.to_diffusers_config()) == spec


def test_attention_head_dim_is_diffusers_head_count():
    spec = UNetSpec.from_diffusers_config(sdxl_with(attention_head_dim=8))
    assert spec.num_attention_heads == (8, 8, 8)  # diffusers' naming quirk: this field is the head count


@pytest.mark.parametrize("field, value", [
    ("resnet_time_scale_shift", "scale_shift"),
    ("class_embed_type", "timestep"),
    ("attention_type", "gated"),
    ("act_fn", "gelu"),
    ("dropout", 0.1),
    ("only_cross_attention", True),
    ("time_embedding_type", "fourier"),
    ("num_attention_heads", [5, 10, 20]),
    ("encoder_hid_dim_type", "text_proj"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn"),
    ("down_block_types", ["DownBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D"]),
    ("up_block_types", ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]),
    ("cross_attention_dim", [2048, 1024, 2048]),
    ("addition_embed_type", "text_image"),
    ("norm_num_groups", None),
    ("_class_name", "UNet3DConditionModel"),
])
def test_unsupported_values_are_refused_by_name(field, value):
    with pytest.raises(UnsupportedConfigError) as info:
        UNetSpec.from_diffusers_config(sdxl_with(**{field: value}))
    assert field in str(info.value) and repr(value)[:20] in str(info.value)


def test_unknown_fields_are_refused():
    with pytest.raises(UnsupportedConfigError, match="fancy_new_option"):
        UNetSpec.from_diffusers_config(sdxl_with(fancy_new_option=True))


@pytest.mark.parametrize("changes, message", [
    (dict(transformer_layers_per_block=[1, [1, 2], [3, 4]]), "reverse_transformer_layers_per_block"),
    (dict(transformer_layers_per_block=[1, [1, 2, 3], 4], reverse_transformer_layers_per_block=[4, 2, 1]),
     "transformer_layers_per_block"),
    (dict(transformer_layers_per_block=[1, 0, 10]), "transformer_layers_per_block"),
    (dict(reverse_transformer_layers_per_block=[10, 2]), "reverse_transformer_layers_per_block"),
    (dict(attention_head_dim=[5, 7, 20]), "num_attention_heads"),
    (dict(layers_per_block=[2, 2]), "layers_per_block"),
])
def test_inconsistent_configs_are_refused(changes, message):
    with pytest.raises(UnsupportedConfigError, match=message):
        UNetSpec.from_diffusers_config(sdxl_with(**changes))


@pytest.mark.parametrize("changes, message", [
    (dict(up_depths=((10, 10), (2, 2, 2), (0, 0, 0))), "one resnet more"),
    (dict(down_depths=((0, 0), (2, 0), (10, 10))), "every resnet or after none"),
    (dict(mid_depth=0), "mid_depth"),
    (dict(num_attention_heads=(5, 10)), "num_attention_heads"),
    (dict(mid_block_type="UNetMidBlock2DSimpleCrossAttn"), "mid_block_type"),
])
def test_invalid_specs_are_refused(changes, message):
    with pytest.raises(UnsupportedConfigError, match=message):
        presets.SDXL.replace(**changes)


def test_a_mid_depth_diffusers_cannot_express_is_refused_on_export():
    spec = presets.SDXL.replace(mid_depth=4)  # valid for our model, not writable as a diffusers config
    with pytest.raises(UnsupportedConfigError, match="mid_depth"):
        spec.to_diffusers_config()


def test_an_up_block_with_attention_mirroring_one_without_keeps_its_own_depth():
    """Up block 0 has attention of depth 1, the last down block none (its config entry carries the mid
    block's depth 3): the config must spell up block 0 out, or diffusers gives it the mid block's 3."""
    spec = UNetSpec(block_out_channels=(32, 64), down_depths=((1, 1), (0, 0)), up_depths=((1, 1, 1), (1, 1, 1)),
                    num_attention_heads=(1, 2), mid_depth=3, cross_attention_dim=32, norm_num_groups=8,
                    addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 48, sample_size=8)
    config = spec.to_diffusers_config()
    assert config["reverse_transformer_layers_per_block"] == [1, 1]
    assert UNetSpec.from_diffusers_config(json.loads(json.dumps(config))) == spec
    assert count_params(spec) == diffusers_count(config)


def test_sample_size_given_as_height_and_width():
    spec = UNetSpec.from_diffusers_config(sdxl_with(sample_size=[96, 128]))  # diffusers accepts a list
    assert spec.sample_size == (96, 128) and hash(spec) == hash(presets.SDXL.replace(sample_size=(96, 128)))
    assert spec.to_diffusers_config()["sample_size"] == [96, 128]
    assert UNetSpec.from_diffusers_config(json.loads(json.dumps(spec.to_diffusers_config()))) == spec


def test_a_mid_block_without_attention_has_depth_zero():
    spec = presets.SDXL.replace(mid_block_type=RESNET_MID)  # mid_depth=10 left over from SDXL
    assert spec.mid_depth == 0 and presets.SDXL.replace(mid_block_type=None).mid_depth == 0
    back = UNetSpec.from_diffusers_config(spec.to_diffusers_config())
    assert back == spec and hash(back) == hash(spec)
