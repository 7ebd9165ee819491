"""Shared fixtures: tiny SDXL-shaped architectures and diffusers-written UNet folders built once per run."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tiny models: LLVM's optimisations cost more compile time than they save in run time (a training command
# 44 → 31 s); every parity test passes at its unchanged tolerance. The processes the tests start inherit it.
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()

import pytest  # noqa: E402

from jaxdistill import presets  # noqa: E402
from jaxdistill.reference import write_random_unet  # noqa: E402
from jaxdistill.spec import UNetSpec  # noqa: E402


def cpu_env(devices: int = 1) -> dict[str, str]:
    """The environment of a process a test starts: JAX on `devices` CPU devices, with this session's flags."""
    flags = os.environ["XLA_FLAGS"] + (f" --xla_force_host_platform_device_count={devices}" if devices > 1 else "")
    return os.environ | {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags}


# Copies of shared/reference/unet_configs: the published SDXL config and the rebuilt SSD-1B and Vega ones.
REFERENCE_CONFIGS = os.path.join(os.path.dirname(__file__), "reference_configs")

# Tiny architectures with the topologies the parity tests must cover.
TINY = {
    # SDXL's own depths (2/10 transformer layers, 10-deep mid attention) at tiny widths.
    "sdxl": presets.tiny(presets.SDXL),
    # SSD-1B: an up path that is not the mirror of the down path, a mid block of one resnet.
    "ssd1b": presets.tiny(presets.SSD_1B),
    # No mid block at all, conv projections instead of linear ones, one head count for all blocks.
    "no_mid_conv_proj": presets.tiny(presets.VEGA).replace(mid_block_type=None, use_linear_projection=False,
                                                           num_attention_heads=(2, 2, 2)),
    # Per-block resnet counts and per-resnet depths (a shape only reverse_transformer_layers_per_block
    # can express), four blocks, an upcast attention.
    "per_block": UNetSpec(
        block_out_channels=(32, 32, 64, 64), down_depths=((0,), (1, 2), (3, 1, 2), (0,)),
        up_depths=((0, 0), (2, 1, 1, 3), (1, 2, 1), (0, 0)), num_attention_heads=(1, 1, 2, 2),
        mid_block_type="UNetMidBlock2DCrossAttn", mid_depth=2, cross_attention_dim=48, norm_num_groups=8,
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 48, upcast_attention=True,
        sample_size=32),
    # The smallest UNet with every part (two blocks, two-layer attentions, a cross-attention mid block):
    # compiles in seconds, for the training tests.
    "micro": UNetSpec(
        block_out_channels=(32, 32), down_depths=((0,), (2,)), up_depths=((2, 2), (0, 0)),
        num_attention_heads=(1, 1), mid_block_type="UNetMidBlock2DCrossAttn", mid_depth=2, cross_attention_dim=32,
        norm_num_groups=8, addition_time_embed_dim=8, projection_class_embeddings_input_dim=16 + 48, sample_size=8),
}


@pytest.fixture(scope="session")
def unet_folders(tmp_path_factory) -> dict[str, str]:
    """Each TINY architecture with random weights, saved by diffusers' own `save_pretrained`."""
    root = tmp_path_factory.mktemp("unets")
    return {name: str(write_random_unet(root / name, spec, seed=i)) for i, (name, spec) in enumerate(TINY.items())}


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent XLA cache for the session (and its subprocesses): a step compiled once is reused."""
    import jax

    # pytest-xdist's workers share one (their base folders are siblings under the session's): a program one
    # worker compiled, the other reads back
    shared = tmp_path_factory.getbasetemp().parent / "xla_cache" if os.environ.get("PYTEST_XDIST_WORKER") else None
    if shared is not None:
        shared.mkdir(exist_ok=True)
    path = str(shared or tmp_path_factory.mktemp("xla_cache"))
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = path
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
    yield path
