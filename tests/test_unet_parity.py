"""Our Flax UNet against diffusers' PyTorch UNet2DConditionModel: same config, same weights (written by
diffusers, read by `load_unet`), fresh random inputs. Tolerance in float32, on the prediction and on
every feature tap: max |ours − diffusers| ≤ 1e-4 · max |diffusers|."""

import contextlib
import zlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY
from diffusers import UNet2DConditionModel

from jaxdistill import UNet, load_unet
from jaxdistill.reference import TOLERANCE, random_inputs, relative_errors, tap_names, torch_forward

assert TOLERANCE == 1e-4

# GroupNorm(s·x; eps) = GroupNorm(x; eps / s²). On random inputs the activations' variance is ~1, and an
# epsilon of 1e-5 instead of 1e-6 moves the outputs ~5e-6, under the tolerance; with every GroupNorm's
# input shrunk by SHRINK on both sides, each epsilon weighs 10⁴× more and that mistake moves them ~5 %.
SHRINK = 1e-2


def group_norm_inputs_scaled(scale):
    """A Flax method interceptor (`nn.intercept_methods`) that multiplies every GroupNorm's input by `scale`
    (a number or a traced scalar). Interceptors act while a function is traced: enter it inside the jit."""
    def interceptor(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.GroupNorm) and context.method_name == "__call__":
            args = (args[0] * scale, *args[1:])
        return next_fun(*args, **kwargs)
    return interceptor


@contextlib.contextmanager
def torch_group_norm_inputs_scaled(model, scale: float):
    """Inside the `with`, every `torch.nn.GroupNorm` of `model` multiplies its input by `scale` first."""
    import torch

    hooks = [m.register_forward_pre_hook(lambda _m, args: (args[0] * scale, *args[1:]))
             for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


@pytest.mark.parametrize("name", sorted(TINY))
def test_forward_and_every_feature_match_diffusers(name, unet_folders):
    """Also with every GroupNorm's input shrunk by SHRINK on both sides (resnets' norm1/norm2, each
    Transformer2DModel's norm, conv_norm_out), where a wrong epsilon shows."""
    spec, params = load_unet(unet_folders[name])
    assert spec == TINY[name]
    reference = UNet2DConditionModel.from_pretrained(unet_folders[name], low_cpu_mem_usage=False).eval()
    # Non-square latents catch a height/width mix-up; the seed differs per architecture.
    height, width = 2 ** (spec.num_blocks - 1) * 2, 2 ** (spec.num_blocks - 1) * 3
    inputs = random_inputs(spec, batch=2, size=(height, width), seq_len=7, seed=zlib.crc32(name.encode()))

    @jax.jit
    def forward(p, x, scale):  # scale traced: one compilation serves both runs
        with nn.intercept_methods(group_norm_inputs_scaled(scale)):
            return UNet(spec).apply({"params": p}, **x)

    out = forward(params, inputs, 1.0)  # × 1.0 is exact: the plain forward
    ref_sample, ref_features = torch_forward(reference, inputs)

    assert out.sample.shape == (2, height, width, spec.out_channels)
    assert set(out.features) == set(tap_names(reference)), "our taps are exactly diffusers' modules"
    assert np.max(np.abs(ref_sample)) > 0.1, "a degenerate (near-zero) output would make the check vacuous"
    errors = relative_errors({"sample": out.sample, **out.features}, {"sample": ref_sample, **ref_features})

    small = forward(params, inputs, SHRINK)
    with torch_group_norm_inputs_scaled(reference, SHRINK):
        small_sample, small_features = torch_forward(reference, inputs)
    # not vacuous: the epsilons now move diffusers' own prediction far beyond the tolerance
    assert relative_errors({"sample": ref_sample}, {"sample": small_sample})["sample"] > 100 * TOLERANCE
    errors |= {f"{k} (GroupNorm inputs × {SHRINK:g})": v for k, v in relative_errors(
        {"sample": small.sample, **small.features}, {"sample": small_sample, **small_features}).items()}
    bad = {k: v for k, v in errors.items() if v > TOLERANCE}
    assert not bad, f"beyond {TOLERANCE:g} relative: {bad}"


@pytest.mark.parametrize("flip_sin_to_cos", [True, False])
@pytest.mark.parametrize("freq_shift", [0, 1])
@pytest.mark.parametrize("dim", [16, 9])
def test_timestep_embedding_matches_diffusers(flip_sin_to_cos, freq_shift, dim):
    """SDXL has flip_sin_to_cos=True, freq_shift=0; a spec may say otherwise (diffusers' defaults are the
    opposite). Odd widths end in a zero column. Random float timesteps across [0, 1000): float32 arguments
    near 1000 round to ~6e-5 (XLA's and torch's exp differ by an ulp), which sin and cos pass on, so the
    tolerance is absolute, 1e-4 (measured 1.5e-5); a swapped half or a shifted frequency is O(1) off."""
    import torch
    from diffusers.models.embeddings import get_timestep_embedding

    from jaxdistill.layers import timestep_embedding

    t = np.random.default_rng(dim).uniform(0, 1000, 6).astype(np.float32)
    ref = get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip_sin_to_cos,
                                 downscale_freq_shift=freq_shift).numpy()
    ours = np.asarray(timestep_embedding(jnp.asarray(t), dim, flip_sin_to_cos, freq_shift))
    assert ours.shape == ref.shape == (6, dim)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


def test_a_non_finite_output_fails_the_parity_check():
    errors = relative_errors({"a": np.array([np.nan, 1.0]), "b": np.array([1.0, 2.0])},
                             {"a": np.array([1.0, 1.0]), "b": np.array([1.0, 2.0])})
    assert errors == {"a": float("inf"), "b": 0.0}  # NaN > tolerance is False: it must not read as a pass


def test_compute_dtype_is_separate_from_parameter_dtype(unet_folders):
    spec, params = load_unet(unet_folders["ssd1b"])
    inputs = random_inputs(spec, batch=1, size=8, seed=3)
    full = UNet(spec).apply({"params": params}, **inputs).sample
    # float32 master weights, bf16 compute: the output is bf16, the weights untouched.
    half = UNet(spec, dtype=jnp.bfloat16).apply({"params": params}, **inputs).sample
    assert half.dtype == jnp.bfloat16
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    # bf16 storage too.
    bf16_params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
    both = UNet(spec, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16).apply({"params": bf16_params}, **inputs).sample
    scale = float(jnp.max(jnp.abs(full)))
    for lowp in (half, both):
        err = float(jnp.max(jnp.abs(lowp.astype(jnp.float32) - full))) / scale
        assert 0 < err < 5e-2, err  # bf16 has 8 mantissa bits: close, but not equal


def test_missing_sdxl_conditioning_is_a_clear_error(unet_folders):
    spec, params = load_unet(unet_folders["ssd1b"])
    inputs = random_inputs(spec, batch=1, size=8)
    with pytest.raises(ValueError, match="text_embeds"):
        UNet(spec).apply({"params": params}, inputs["sample"], inputs["timesteps"], inputs["encoder_hidden_states"])
    model = UNet(spec)
    with pytest.raises(ValueError, match="add-embedding inputs"):  # 3 time ids, not 6
        model.apply({"params": params}, **inputs | {"time_ids": inputs["time_ids"][:, :3]})
    factor = 2 ** (spec.num_blocks - 1)
    with pytest.raises(ValueError, match=f"multiples of {factor}"):
        model.apply({"params": params}, **inputs | {"sample": jnp.zeros((1, factor + 1, factor, spec.in_channels))})


def test_one_row_of_sdxl_conditioning_serves_the_batch(unet_folders):
    """diffusers broadcasts text_embeds / time_ids of batch 1 over the samples; so do we."""
    spec, params = load_unet(unet_folders["micro"])
    inputs = random_inputs(spec, batch=2, size=2 ** (spec.num_blocks - 1), seq_len=4)
    one = {k: inputs[k][:1] for k in ("text_embeds", "time_ids")}
    tiled = {k: np.repeat(v, 2, axis=0) for k, v in one.items()}
    apply = UNet(spec).apply
    np.testing.assert_allclose(apply({"params": params}, **inputs | one).sample,
                               apply({"params": params}, **inputs | tiled).sample, rtol=0, atol=1e-6)


def test_parity_command_reads_an_fp16_only_folder(unet_folders, tmp_path):
    from jaxdistill import save_unet
    from jaxdistill.parity import check_folder

    spec, params = load_unet(unet_folders["micro"])
    folder = save_unet(tmp_path / "fp16", spec, params, dtype=jnp.float16, variant="fp16")
    assert [p.name for p in folder.glob("*.safetensors")] == ["diffusion_pytorch_model.fp16.safetensors"]
    errors = check_folder(folder, batch=1, size=2 ** (spec.num_blocks - 1))
    assert max(errors.values()) <= TOLERANCE


def test_scanned_layers_and_remat_compute_the_same_function():
    from jaxdistill import init_params
    from jaxdistill.layers import stack_layers, unstack_layers

    spec = TINY["micro"]
    params = init_params(spec, jax.random.key(0))
    inputs = random_inputs(spec, batch=2, size=8, seq_len=5, seed=4)

    def value_and_grad(model, p):
        loss = lambda p: jnp.mean(model.apply({"params": p}, **inputs).sample ** 2)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(p)

    loss, grads = value_and_grad(UNet(spec), params)
    stacked = stack_layers(params)
    assert jax.tree.structure(unstack_layers(stacked)) == jax.tree.structure(params)
    for remat in ("none", "full", "dots"):
        other_loss, other = value_and_grad(UNet(spec, remat=remat, scan_layers=True), stacked)
        np.testing.assert_allclose(other_loss, loss, rtol=1e-5)
        # float32 reassociation only: every gradient within 1e-5 of its tensor's largest entry
        for a, b in zip(jax.tree.leaves(unstack_layers(other)), jax.tree.leaves(grads), strict=True):
            assert float(jnp.max(jnp.abs(a - b))) <= 1e-5 * float(jnp.max(jnp.abs(b))) + 1e-12, remat


@pytest.mark.parametrize("size,kernel,stride,padding", [
    (9, 3, 1, ((1, 1), (1, 1))),  # resnet conv1/conv2, conv_in/out, upsamplers (odd size)
    (8, 3, 2, ((1, 1), (1, 1))),  # the UNet's downsamplers
    (9, 3, 2, ((1, 1), (1, 1))),  # ... on an odd size (the last row is never read)
    (8, 3, 2, ((0, 1), (0, 1))),  # the VAE encoder's downsamplers
    (8, 1, 1, ((0, 0), (0, 0))),  # shortcuts, proj_in / proj_out
])
def test_conv2d_gradients_are_lax_gradients(size, kernel, stride, padding):
    """`conv2d` writes its own backward (canonical convolutions, so XLA:CPU's fast kernels run them inside
    loops too): value and both gradients equal `lax.conv_general_dilated`'s on fresh random inputs (float32,
    1e-5 of the largest entry), also as the body of a `lax.scan`, as gradient accumulation runs it."""
    from jaxdistill.layers import NHWC, conv2d, cpu_conv_general_dilated

    kx, kw, kd = jax.random.split(jax.random.key(size * 10 + kernel + stride), 3)
    x = jax.random.normal(kx, (2, size, size + 3, 6))  # not square: height and width are not mixed up
    w = jax.random.normal(kw, (kernel, kernel, 6, 4))
    lax_conv = lambda x, w: jax.lax.conv_general_dilated(x, w, (stride,) * 2, padding, dimension_numbers=NHWC)  # noqa: E731
    ours = lambda x, w: conv2d(x, w, (stride,) * 2, padding)  # noqa: E731
    want, vjp = jax.vjp(lax_conv, x, w)
    dy = jax.random.normal(kd, want.shape)

    def in_scan(f):
        body = lambda c, _: (c, jax.vjp(f, x, w)[1](dy))  # noqa: E731
        return jax.jit(lambda: jax.lax.scan(body, 0, None, length=2)[1])()

    got, got_vjp = jax.vjp(ours, x, w)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    for grads in (got_vjp(dy), jax.tree.map(lambda g: g[1], in_scan(ours))):
        for a, b in zip(grads, vjp(dy), strict=True):
            assert a.shape == b.shape and float(jnp.max(jnp.abs(a - b))) <= 1e-5 * float(jnp.max(jnp.abs(b)))
    # nn.Conv's call on the CPU takes this path; what it does not cover (groups, dilation) goes to lax
    np.testing.assert_array_equal(cpu_conv_general_dilated(x, w, (stride,) * 2, padding, dimension_numbers=NHWC), got)
    grouped = cpu_conv_general_dilated(x, w[:, :, :3], (1, 1), "SAME", dimension_numbers=NHWC, feature_group_count=2)
    np.testing.assert_array_equal(grouped, jax.lax.conv_general_dilated(x, w[:, :, :3], (1, 1), "SAME", None, None,
                                                                        NHWC, feature_group_count=2))


def test_attention_paths():
    """The plain path is jax.nn.dot_product_attention's XLA path on fresh random inputs (float32 and bf16,
    cross-attention lengths); "auto" is that path off GPUs; a bad name is refused with the choices."""
    from jaxdistill.layers import attention

    keys = jax.random.split(jax.random.key(7), 3)
    for dtype, tol in ((jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)):
        q = jax.random.normal(keys[0], (2, 48, 3, 16), dtype)
        k, v = (jax.random.normal(key, (2, 7, 3, 16), dtype) for key in keys[1:])
        ours = np.asarray(attention(q, k, v, "xla"), np.float32)
        ref = np.asarray(jax.nn.dot_product_attention(q, k, v, implementation="xla"), np.float32)
        assert np.max(np.abs(ours - ref)) <= tol * np.max(np.abs(ref))
        if jax.default_backend() != "gpu":
            np.testing.assert_array_equal(np.asarray(attention(q, k, v, "auto"), np.float32), ours)
    with pytest.raises(ValueError, match="'auto', 'xla', 'cudnn'"):
        attention(q, k, v, "flash")


def test_attention_kernel_choice(monkeypatch):
    """Each fused kernel only where it applies, the XLA path elsewhere. On a GPU "auto" is cuDNN for
    bf16/fp16 self-attention with even lengths and heads ≤ 128 wide (measured on an H200,
    bench/NOTES.md); XLA for float32, SDXL's 77-token cross-attention (cuDNN's backward refuses odd
    lengths) and the VAE's 512-wide head. Off GPUs "auto" is XLA and "cudnn" a clear error; "splash"
    wherever both lengths are multiples of 128."""
    from jaxdistill.layers import attention_kernel

    def qkv(lq, lk, dim=64, dtype=jnp.bfloat16):
        return (jax.ShapeDtypeStruct((2, lq, 4, dim), dtype), *[jax.ShapeDtypeStruct((2, lk, 4, dim), dtype)] * 2)

    assert attention_kernel(*qkv(4096, 4096)) == "xla"  # this machine has no GPU
    with pytest.raises(ValueError, match="'cudnn' needs a GPU"):
        attention_kernel(*qkv(4096, 4096), "cudnn")
    assert attention_kernel(*qkv(4096, 4096), "splash") == "splash"
    assert attention_kernel(*qkv(4096, 77), "splash") == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attention_kernel(*qkv(4096, 4096)) == "cudnn"
    assert attention_kernel(*qkv(988, 988, dtype=jnp.float16), "cudnn") == "cudnn"
    assert attention_kernel(*qkv(4096, 77)) == "xla"
    assert attention_kernel(*qkv(4096, 4096, dtype=jnp.float32)) == "xla"
    assert attention_kernel(*qkv(16384, 16384, dim=512)) == "xla"


def test_splash_attention_matches_the_xla_path():
    """Pallas splash attention (Pallas' interpreter on this CPU: the numbers, not the TPU speed) against
    the XLA path on fresh random inputs: output and q/k/v gradients, self- and cross-attention lengths
    that are multiples of 128, heads of 64 (padded to 128 inside); float32, max error ≤ 1e-5 relative."""
    from jaxdistill.layers import attention

    keys = jax.random.split(jax.random.key(3), 4)
    for lk in (256, 128):
        q = jax.random.normal(keys[0], (2, 256, 2, 64))
        k, v = (jax.random.normal(key, (2, lk, 2, 64)) for key in keys[1:3])
        cot = jax.random.normal(keys[3], q.shape)

        def both(impl, q=q, k=k, v=v, cot=cot):
            out, vjp = jax.vjp(lambda *x: attention(*x, impl), q, k, v)
            return (out, *vjp(cot))

        for ours, ref in zip(jax.jit(lambda: both("splash"))(), jax.jit(lambda: both("xla"))(), strict=True):
            assert np.max(np.abs(ours - ref)) <= 1e-5 * np.max(np.abs(ref))
