"""Our Flax VAE against diffusers' PyTorch AutoencoderKL: same config, same weights (written by diffusers,
read by `load_vae`), fresh random non-square inputs. Tolerance in float32, on the latent distribution,
the decoded images and the down/mid/up block outputs: max |ours − diffusers| ≤ 1e-4 · max |diffusers|.
Also: latent scaling and sampling, the logvar clamp, loading (pipeline folder, shards, fp16 variant,
pre-0.14 attention names, strict errors), config refusals and the SDXL preset's parameter count."""

import functools
import json
import shutil
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from safetensors.numpy import load_file, save_file
from test_unet_parity import SHRINK, group_norm_inputs_scaled, torch_group_norm_inputs_scaled

from jaxdistill.convert import WeightsError
from jaxdistill.reference import TOLERANCE, capture_features, relative_errors, write_random_vae
from jaxdistill.spec import UnsupportedConfigError
from jaxdistill.vae import (
    SDXL_VAE,
    AutoencoderKL,
    VAESpec,
    count_vae_params,
    decode,
    encode,
    encode_latents,
    load_vae,
    sample_latents,
    scale_latents,
    unscale_latents,
)

assert TOLERANCE == 1e-4

# Tiny VAEs with the variants the parity test must cover.
TINY = {
    # Three levels (a block without a width change), two resnets per down block, the mid attention.
    "three_levels": dict(block_out_channels=(16, 32, 32), layers_per_block=2),
    # No mid attention, no quant convs, a shift factor (SD3-style scaling), two levels.
    "plain": dict(block_out_channels=(16, 32), layers_per_block=1, mid_block_add_attention=False,
                  use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035),
}
HEIGHT, WIDTH = 24, 40  # non-square: catches a height/width mix-up; divisible by 2^(levels − 1)


@pytest.fixture(scope="session")
def vae_folders(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("vaes")
    return {name: str(write_random_vae(root / name, seed=i, **cfg)) for i, (name, cfg) in enumerate(TINY.items())}


def _torch_vae(folder: str) -> TorchAutoencoderKL:
    return TorchAutoencoderKL.from_pretrained(folder, low_cpu_mem_usage=False).eval()


def _images(name: str, batch: int = 2) -> np.ndarray:
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    return rng.uniform(-1, 1, (batch, HEIGHT, WIDTH, 3)).astype(np.float32)


def _nchw(x) -> torch.Tensor:
    return torch.from_numpy(np.array(x, np.float32)).permute(0, 3, 1, 2)


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).float().numpy()


def _block_names(spec: VAESpec) -> list[str]:
    """The block outputs compared, in diffusers' module names."""
    return ([f"encoder.down_blocks.{i}" for i in range(spec.num_blocks)] + ["encoder.mid_block", "decoder.mid_block"]
            + [f"decoder.up_blocks.{i}" for i in range(spec.num_blocks)])


def _our_outputs(spec, params, images, z, scale: float = 1.0) -> dict[str, np.ndarray]:
    """mean, logvar, decoded (from unscaled z) and every block's output, read with Flax's
    `capture_intermediates` (no sow in the model); every GroupNorm's input multiplied by `scale`."""
    outputs, enc, dec = _run_with_intermediates(spec, params, images, z, scale)
    trees = {"encoder": enc, "decoder": dec}
    out = {k: np.asarray(v) for k, v in outputs.items()}
    for name in _block_names(spec):
        part, *path = name.split(".")
        key = "_".join(path) if len(path) == 2 else path[0]  # down_blocks.1 → down_blocks_1
        out[name] = np.asarray(trees[part][key]["__call__"][0])
    return out


@functools.partial(jax.jit, static_argnums=0)
def _run_with_intermediates(spec, params, images, z, scale):  # scale traced: one compilation for all scales
    model = AutoencoderKL(spec)
    with nn.intercept_methods(group_norm_inputs_scaled(scale)):
        (mean, logvar), enc = model.apply({"params": params}, images, method=AutoencoderKL.encode,
                                          capture_intermediates=True)
        decoded, dec = model.apply({"params": params}, z, method=AutoencoderKL.decode, capture_intermediates=True)
    outputs = {"mean": mean, "logvar": logvar, "decoded": decoded}
    return outputs, enc["intermediates"]["encoder"], dec["intermediates"]["decoder"]


def _torch_outputs(reference, spec, images, z) -> dict[str, np.ndarray]:
    """diffusers' mean, logvar, decoded (from unscaled z) and block outputs, NHWC."""
    with capture_features(reference, _block_names(spec)) as blocks, torch.no_grad():
        posterior = reference.encode(_nchw(images)).latent_dist
        decoded = reference.decode(_nchw(z)).sample
    return {"mean": _nhwc(posterior.mean), "logvar": _nhwc(posterior.logvar), "decoded": _nhwc(decoded),
            **{k: _nhwc(v) for k, v in blocks.items()}}


@pytest.mark.parametrize("name", sorted(TINY))
def test_encoder_decoder_and_blocks_match_diffusers(name, vae_folders):
    """Also with every GroupNorm's input shrunk by SHRINK on both sides, where a wrong epsilon shows
    (`test_unet_parity.SHRINK`)."""
    spec, params = load_vae(vae_folders[name])
    reference = _torch_vae(vae_folders[name])
    assert spec == VAESpec.from_diffusers_config(dict(reference.config))
    images = _images(name)
    latents = np.random.default_rng(1).standard_normal((2, HEIGHT // spec.downscale, WIDTH // spec.downscale,
                                                        spec.latent_channels)).astype(np.float32)
    z = latents / spec.scaling_factor + (spec.shift_factor or 0.0)  # what diffusers' decode takes

    mean, logvar = encode(spec, params, images)
    decoded = decode(spec, params, latents)
    reference_out = _torch_outputs(reference, spec, images, z)

    assert mean.shape == logvar.shape == (2, HEIGHT // spec.downscale, WIDTH // spec.downscale, 4)
    assert decoded.shape == (2, HEIGHT, WIDTH, 3)
    assert all(np.max(np.abs(reference_out[k])) > 0.1 for k in ("mean", "logvar", "decoded")), (
        "a near-zero output makes the check vacuous")
    ours = _our_outputs(spec, params, images, z) | {"mean": mean, "logvar": logvar, "decoded": decoded}
    errors = relative_errors(ours, reference_out)
    assert set(errors) == {"mean", "logvar", "decoded", *_block_names(spec)}

    with torch_group_norm_inputs_scaled(reference, SHRINK):
        small_reference = _torch_outputs(reference, spec, images, z)
    # not vacuous: the epsilons now move diffusers' own outputs far beyond the tolerance
    moved = relative_errors(reference_out, {k: small_reference[k] for k in ("mean", "decoded")})
    assert min(moved.values()) > 100 * TOLERANCE, moved
    errors |= {f"{k} (GroupNorm inputs × {SHRINK:g})": v for k, v in relative_errors(
        _our_outputs(spec, params, images, z, SHRINK), small_reference).items()}
    bad = {k: v for k, v in errors.items() if v > TOLERANCE}
    assert not bad, f"beyond {TOLERANCE:g} relative: {bad}"


@pytest.mark.parametrize("name", sorted(TINY))
def test_scaled_latents_and_sampling(name, vae_folders):
    spec, params = load_vae(vae_folders[name])
    reference = _torch_vae(vae_folders[name])
    images = _images(name)  # the parity test's shapes: its compiled `encode` is reused
    with torch.no_grad():
        posterior = reference.encode(_nchw(images)).latent_dist
    ref_mode = (_nhwc(posterior.mode()) - (spec.shift_factor or 0.0)) * spec.scaling_factor
    ref_mean, ref_std = _nhwc(posterior.mean), _nhwc(posterior.std)

    mode = encode_latents(spec, params, images)
    assert relative_errors({"mode": mode}, {"mode": ref_mode})["mode"] <= TOLERANCE

    rng = jax.random.key(7)
    mean, logvar = encode(spec, params, images)
    eps = np.asarray(jax.random.normal(rng, mean.shape))
    drawn = sample_latents(mean, logvar, rng)
    assert relative_errors({"z": drawn}, {"z": ref_mean + ref_std * eps})["z"] <= TOLERANCE
    np.testing.assert_allclose(encode_latents(spec, params, images, rng), scale_latents(spec, drawn), rtol=1e-6,
                               atol=1e-6)
    assert not np.allclose(drawn, mean), "a draw differs from the mode"


def test_logvar_is_clamped_as_diffusers_does(vae_folders):
    spec, params = load_vae(vae_folders["three_levels"])
    reference = _torch_vae(vae_folders["three_levels"])
    # Push two logvar channels far above 20 and two far below -30 through quant_conv's bias.
    push = np.array([0, 0, 0, 0, 500, 500, -500, -500], np.float32)
    params = jax.tree.map(lambda x: x, params)  # new dicts: the loaded tree stays as it was
    params["quant_conv"]["bias"] = params["quant_conv"]["bias"] + push
    with torch.no_grad():
        reference.quant_conv.bias += torch.from_numpy(push)
        ref_logvar = _nhwc(reference.encode(_nchw(_images("clamp"))).latent_dist.logvar)
    _, logvar = encode(spec, params, _images("clamp"))
    expected = np.broadcast_to(np.array([20, 20, -30, -30], np.float32), logvar.shape)
    np.testing.assert_array_equal(logvar, expected)
    np.testing.assert_array_equal(ref_logvar, expected)


def test_scaling_with_per_channel_statistics():
    spec = SDXL_VAE.replace(latents_mean=(0.1, -0.2, 0.3, 0.0), latents_std=(2.0, 0.5, 1.0, 4.0), scaling_factor=0.5)
    z = np.random.default_rng(0).standard_normal((2, 3, 5, 4)).astype(np.float32)
    mean, std = np.array(spec.latents_mean, np.float32), np.array(spec.latents_std, np.float32)
    # diffusers' SDXL img2img pipeline: (z − mean) · scaling / std; its decode inverts it.
    np.testing.assert_allclose(scale_latents(spec, z), (z - mean) * 0.5 / std, rtol=1e-6)
    np.testing.assert_allclose(unscale_latents(spec, scale_latents(spec, z)), z, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scale_latents(SDXL_VAE, z), z * 0.13025, rtol=1e-7)


def test_compute_dtype_and_the_float16_guard(vae_folders):
    spec, params = load_vae(vae_folders["plain"])
    images = _images("bf16", batch=1)
    full, _ = encode(spec, params, images)
    half, _ = encode(spec, params, images, dtype=jnp.bfloat16)
    assert half.dtype == jnp.float32 and all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    err = float(jnp.max(jnp.abs(half - full)) / jnp.max(jnp.abs(full)))
    assert 0 < err < 5e-2, err  # bf16 has 8 mantissa bits: close, but not equal
    with pytest.raises(ValueError, match="force_upcast"):
        encode(spec, params, images, dtype=jnp.float16)
    with pytest.raises(ValueError, match="force_upcast"):
        decode(spec, params, np.zeros((1, 3, 5, 4), np.float32), dtype=jnp.float16)


def test_loads_pipeline_folders_shards_variants_and_old_attention_names(vae_folders, tmp_path):
    spec, params = load_vae(vae_folders["three_levels"])
    flat = lambda p: dict(jax.tree_util.tree_leaves_with_path(p))  # noqa: E731

    pipeline = tmp_path / "pipeline"
    write_random_vae(pipeline / "vae", seed=0, max_shard_size="40KB", **TINY["three_levels"])
    assert len(list((pipeline / "vae").glob("*.safetensors"))) > 1, "the weights should be sharded"
    sharded_spec, sharded = load_vae(pipeline)
    assert sharded_spec == spec
    assert all(np.array_equal(v, flat(params)[k]) for k, v in flat(sharded).items())

    # An fp16-only folder, as diffusers' `variant="fp16"` writes it.
    half = tmp_path / "fp16"
    half.mkdir()
    shutil.copy(f"{vae_folders['three_levels']}/config.json", half)
    state = load_file(f"{vae_folders['three_levels']}/diffusion_pytorch_model.safetensors")
    save_file({k: v.astype(np.float16) for k, v in state.items()}, half / "diffusion_pytorch_model.fp16.safetensors")
    _, half_params = load_vae(half, dtype=jnp.float32)  # no variant given: the fp16 file is found
    assert all(v.dtype == jnp.float32 and np.array_equal(v, flat(params)[k].astype(jnp.float16).astype(jnp.float32))
               for k, v in flat(half_params).items())

    old = tmp_path / "old_names"
    old.mkdir()
    shutil.copy(f"{vae_folders['three_levels']}/config.json", old)
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}

    def rename(key):
        for new, former in renames.items():
            key = key.replace(new, former) if ".mid_block.attentions." in key else key
        return key

    old_state = {rename(k): v for k, v in state.items()}
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in old_state
    save_file(old_state, old / "diffusion_pytorch_model.safetensors")
    _, old_params = load_vae(old)
    assert all(np.array_equal(v, flat(params)[k]) for k, v in flat(old_params).items())


def test_strict_load_lists_every_problem(vae_folders, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(vae_folders["three_levels"], folder)
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    del state["encoder.conv_in.bias"]
    state["decoder.extra.weight"] = np.zeros(3, np.float32)
    state["decoder.conv_out.weight"] = np.zeros((3, 16, 1, 1), np.float32)
    save_file(state, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(WeightsError) as info:
        load_vae(folder)
    message = str(info.value)
    assert "3 problems" in message
    assert "missing: encoder.conv_in.bias" in message
    assert "unexpected: decoder.extra.weight" in message
    assert "shape mismatch: decoder.conv_out.weight has (3, 16, 1, 1), the architecture needs (3, 16, 3, 3)" in message


# stabilityai/stable-diffusion-xl-base-1.0/vae/config.json as published.
SDXL_VAE_CONFIG = {
    "_class_name": "AutoencoderKL", "_diffusers_version": "0.20.0.dev0", "_name_or_path": "../sdxl-vae/",
    "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4, "force_upcast": True, "in_channels": 3, "latent_channels": 4,
    "layers_per_block": 2, "norm_num_groups": 32, "out_channels": 3, "sample_size": 1024,
    "scaling_factor": 0.13025, "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def test_sdxl_preset_config_and_parameter_count():
    assert VAESpec.from_diffusers_config(SDXL_VAE_CONFIG) == SDXL_VAE
    assert VAESpec.from_diffusers_config(json.loads(json.dumps(SDXL_VAE.to_diffusers_config()))) == SDXL_VAE
    with torch.device("meta"):  # shapes only: no memory, no init
        model = TorchAutoencoderKL.from_config(SDXL_VAE.to_diffusers_config())
    assert sum(p.numel() for p in model.parameters()) == count_vae_params(SDXL_VAE) == 83_653_863


@pytest.mark.parametrize("change, match", [
    ({"down_block_types": ["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]},
     r"down_block_types=.*AttnDownEncoderBlock2D"),
    ({"up_block_types": ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"]}, r"up_block_types=.*AttnUpDecoderBlock2D"),
    ({"up_block_types": ["UpDecoderBlock2D"]}, r"up_block_types=.*2 block types"),
    ({"act_fn": "gelu"}, r"act_fn='gelu'"),
    ({"norm_type": "spatial"}, r"fields jaxdistill does not know: \['norm_type'\]"),
    ({"_class_name": "VQModel"}, r"_class_name='VQModel'"),
    ({"norm_num_groups": 12}, r"block_out_channels=.*divisible by norm_num_groups=12"),
    ({"latents_mean": [0.0] * 4}, r"latents_mean.*latents_std given together"),
    ({"latents_mean": [0.0] * 4, "latents_std": [1.0] * 4, "shift_factor": 0.1}, r"shift_factor=0.1"),
])
def test_config_refusals_name_the_field(change, match):
    base = {"block_out_channels": [16, 32], "down_block_types": ["DownEncoderBlock2D"] * 2,
            "up_block_types": ["UpDecoderBlock2D"] * 2, "norm_num_groups": 8, "_diffusers_version": "0.42.0"}
    assert VAESpec.from_diffusers_config(base).block_out_channels == (16, 32)
    with pytest.raises(UnsupportedConfigError, match=match):
        VAESpec.from_diffusers_config(base | change)


def test_a_damaged_config_file_is_named(tmp_path):
    (tmp_path / "config.json").write_text('{"block_out_channels": [16, ')  # a truncated download
    with pytest.raises(UnsupportedConfigError, match=f"cannot read {tmp_path / 'config.json'}"):
        VAESpec.from_diffusers_config(tmp_path / "config.json")
