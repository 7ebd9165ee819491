"""The layers of an SDXL UNet in Flax linen, one class per diffusers module, with diffusers' names.

Activations are NHWC (images) or [B, L, C] (token sequences). `dtype` is the compute dtype and
`param_dtype` the storage dtype of the parameters; normalisation statistics are always computed in
float32. Parity with diffusers is tested in `tests/test_unet_parity.py`.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdistill.sharding import BATCH

Dtype = jnp.dtype | type


NHWC = ("NHWC", "HWIO", "NHWC")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x: jax.Array, w: jax.Array, strides: tuple[int, int], padding: tuple[tuple[int, int], ...]) -> jax.Array:
    """An NHWC × HWIO convolution whose gradients are convolutions in that same canonical form.

    JAX's transpose rules give the backward pass convolutions with swapped kernel dimensions ("01oi") and
    a batch-as-feature weight gradient; XLA:CPU's `ConvCanonicalization` rewrites those only at a program's
    top level, so inside any loop (a `lax.scan` over micro-batches) they miss its YNNPACK kernels: 9x the
    convolution time on the CPU machine (bench/NOTES.md). Here they are written in the canonical form directly,
    with the kernel flip and the transposes XLA would insert. Reverse mode only: a `custom_vjp` has no
    forward-mode rule, so `jax.jvp` / `jacfwd` through the UNet fail on a CPU (where the UNet's convolutions
    take this path); accelerators use `lax.conv_general_dilated` and support both modes."""
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=NHWC)


def _conv2d_fwd(x, w, strides, padding):
    return conv2d(x, w, strides, padding), (x, w)


def _conv2d_bwd(strides, padding, residuals, dy):
    x, w = residuals
    n_in, n_out, k = x.shape[1:3], dy.shape[1:3], w.shape[:2]
    # input gradient: dy dilated by the stride, correlated with the flipped kernel (input/output swapped)
    dilated = [(m - 1) * s + 1 for m, s in zip(n_out, strides, strict=True)]
    before = [kk - 1 - lo for kk, (lo, _) in zip(k, padding, strict=True)]
    pad_x = [(b, n + kk - 1 - d - b) for b, n, kk, d in zip(before, n_in, k, dilated, strict=True)]
    dx = jax.lax.conv_general_dilated(dy, jnp.flip(w, (0, 1)).swapaxes(2, 3), (1, 1), pad_x,
                                      lhs_dilation=strides, dimension_numbers=NHWC)
    # weight gradient: input channels as the batch, the batch as features, dy as a dilated kernel
    pad_w = [(lo, kk - 1 + d - n - lo) for (lo, _), kk, d, n in zip(padding, k, dilated, n_in, strict=True)]
    dw = jax.lax.conv_general_dilated(x.transpose(3, 1, 2, 0), dy.transpose(1, 2, 0, 3), (1, 1), pad_w,
                                      rhs_dilation=strides, dimension_numbers=NHWC)
    return dx.astype(x.dtype), dw.transpose(1, 2, 0, 3).astype(w.dtype)


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


def cpu_conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides, padding, lhs_dilation=None,
                             rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                             precision=None) -> jax.Array:
    """`lax.conv_general_dilated` for `nn.Conv` on XLA:CPU: `conv2d` (canonical gradients) for the UNet's
    2-D, undilated, ungrouped convolutions with explicit padding, which are all of them."""
    plain = (lhs.ndim == 4 and not isinstance(padding, str) and feature_group_count == 1 and precision is None
             and all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))
             and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
             == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, NHWC))
    if not plain:
        return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                            dimension_numbers, feature_group_count, precision=precision)
    return conv2d(lhs, rhs, tuple(window_strides), tuple(map(tuple, padding)))


class _Ops(nn.Module):
    """Constructors for diffusers-named submodules in the module's `dtype` / `param_dtype`."""

    def dense(self, features: int, name: str, use_bias: bool = True) -> nn.Dense:
        return nn.Dense(features, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def conv(self, features: int, kernel: int, name: str, stride: int = 1,
             padding: tuple[tuple[int, int], tuple[int, int]] | None = None) -> nn.Conv:
        """`padding` ((top, bottom), (left, right)); None: (kernel − 1) // 2 on every side."""
        pad = (kernel - 1) // 2
        return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                       padding=padding if padding is not None else ((pad, pad), (pad, pad)),
                       dtype=self.dtype, param_dtype=self.param_dtype, name=name,
                       conv_general_dilated=cpu_conv_general_dilated if jax.default_backend() == "cpu" else None)

    def group_norm(self, groups: int, eps: float, name: str) -> nn.GroupNorm:
        # Two-pass variance, as PyTorch computes it: the fast E[x²]-E[x]² form loses digits.
        return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=self.dtype,
                            param_dtype=self.param_dtype, name=name)

    def layer_norm(self, eps: float, name: str) -> nn.LayerNorm:
        return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=self.dtype,
                            param_dtype=self.param_dtype, name=name)


class _Layer(_Ops):
    _: dataclasses.KW_ONLY  # layer settings come first, positionally; dtypes by keyword
    dtype: Dtype = jnp.float32  # compute
    param_dtype: Dtype = jnp.float32  # storage
    remat: str = "none"  # rematerialise resnets and transformer layers in the backward pass: none|full|dots
    attention: str = "auto"  # the attention kernel: auto | xla | cudnn | splash (see `attention_kernel`)


REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


def rematted(cls: type[nn.Module], remat: str) -> type[nn.Module]:
    """`cls`, recomputed in the backward pass under `remat` ("full": save nothing; "dots": keep matmul
    outputs). Parameter names are unchanged."""
    if remat == "none":
        return cls
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}: expected 'none', 'full' or 'dots'")
    return nn.remat(cls, policy=REMAT_POLICIES[remat])


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal embedding of `timesteps` [N] → [N, dim] in float32 (diffusers' `get_timestep_embedding`)."""
    half = dim // 2
    exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    emb = jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(_Layer):
    """linear_1 → SiLU → linear_2."""

    features: int = 1280

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.silu(self.dense(self.features, "linear_1")(x))
        return self.dense(self.features, "linear_2")(x)


class ResnetBlock2D(_Layer):
    """GroupNorm → SiLU → conv → + time embedding → GroupNorm → SiLU → conv, plus the (1×1) shortcut.
    Without a time embedding (`temb=None`, the VAE's resnets) there is no `time_emb_proj`."""

    out_channels: int = 320
    groups: int = 32
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, temb: jax.Array | None = None) -> jax.Array:
        """x [B, H, W, Cin], temb [B, T] or None → [B, H, W, out_channels]."""
        h = nn.silu(self.group_norm(self.groups, self.eps, "norm1")(x))
        h = self.conv(self.out_channels, 3, "conv1")(h)
        if temb is not None:
            h = h + self.dense(self.out_channels, "time_emb_proj")(nn.silu(temb))[:, None, None, :]
        h = nn.silu(self.group_norm(self.groups, self.eps, "norm2")(h))
        h = self.conv(self.out_channels, 3, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = self.conv(self.out_channels, 1, "conv_shortcut")(x)
        return x + h


class Attention(_Layer):
    """Multi-head attention: to_q/to_k/to_v without bias, to_out_0 with bias."""

    heads: int = 8
    head_dim: int = 64
    upcast: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array | None = None) -> jax.Array:
        """x [B, L, C], context [B, S, D] (None: self-attention) → [B, L, C]."""
        context = x if context is None else context
        inner = self.heads * self.head_dim
        # [B, L, inner] → [B, L, heads, head_dim]
        q, k, v = (self.dense(inner, name, use_bias=False)(src).reshape(*src.shape[:2], self.heads, self.head_dim)
                   for name, src in (("to_q", x), ("to_k", context), ("to_v", context)))
        if self.upcast:
            q, k = q.astype(jnp.float32), k.astype(jnp.float32)
            v = v.astype(jnp.float32)
        out = attention(q, k, v, self.attention).astype(self.dtype)
        return self.dense(x.shape[-1], "to_out_0")(out.reshape(*x.shape[:2], inner))


ATTENTION = ("auto", "xla", "cudnn", "splash")
SPLASH_BLOCK = 128  # splash attention's default block: both lengths must be multiples of it


def attention_kernel(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = "auto") -> str:
    """The kernel `attention(q, k, v, implementation)` runs: "cudnn", "splash" or "xla".

    A fused kernel runs where it applies and the XLA path everywhere else (SDXL's cross-attention to 77
    text tokens, for one). "auto" is cudnn on GPUs and xla elsewhere: splash is opt-in until timed on a TPU.
    - cudnn (GPUs): bf16/fp16 inputs, head dim a multiple of 8 up to 128, even lengths (cuDNN's backward
      refuses odd ones).
    - splash (TPUs; Pallas' interpreter elsewhere, for tests): both lengths multiples of 128.
    """
    if implementation not in ATTENTION:
        raise ValueError(f"attention={implementation!r}: expected one of {ATTENTION}")
    backend = jax.default_backend()
    if implementation == "auto":
        implementation = "cudnn" if backend == "gpu" else "xla"
    if implementation == "cudnn":
        if backend != "gpu":
            raise ValueError(f"attention='cudnn' needs a GPU (this backend: {backend}): use 'auto' or 'xla'")
        fits = (q.dtype in (jnp.bfloat16, jnp.float16) and q.dtype == k.dtype == v.dtype
                and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128 and q.shape[1] % 2 == 0 and k.shape[1] % 2 == 0)
        return "cudnn" if fits else "xla"
    if implementation == "splash":
        return "splash" if q.shape[1] % SPLASH_BLOCK == 0 and k.shape[1] % SPLASH_BLOCK == 0 else "xla"
    return "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = "auto") -> jax.Array:
    """softmax(q kᵀ / √d) v, q [B, L, H, D], k and v [B, S, H, D] → [B, L, H, D]; logits and softmax in float32.

    "xla": two einsums and a float32 softmax, the reference on every platform (on XLA:CPU 1.7× forward and
    1.4× backward faster than `jax.nn.dot_product_attention`'s transposing path at 1024 tokens, same
    result: bench/NOTES.md). "cudnn": cuDNN's fused flash attention through `jax.nn.dot_product_attention`.
    "splash": Pallas splash attention (TPUs). "auto": see `attention_kernel`, which also says where each
    fused kernel applies (elsewhere the XLA path runs).
    """
    kernel = attention_kernel(q, k, v, implementation)
    if kernel == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    if kernel == "splash":
        return _splash(q, k, v)
    logits = jnp.einsum("blhd,bshd->bhls", q, k, preferred_element_type=jnp.float32) / math.sqrt(q.shape[-1])
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhls,bshd->blhd", weights, v)


@functools.lru_cache
def _splash_kernel(heads: int, q_len: int, kv_len: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel, splash_attention_mask

    mask = splash_attention_mask.MultiHeadMask([splash_attention_mask.FullMask((q_len, kv_len))] * heads)
    with jax.ensure_compile_time_eval():  # concrete mask tables: the kernel is cached across traces
        return splash_attention_kernel.make_splash_mha(mask, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Splash attention per example. The head dim is zero-padded to the TPU's 128 lanes (zeros change
    neither q·k nor the kept columns of the output). Under a mesh set with `jax.set_mesh` (the trainer
    does), each device runs the kernel on its share of the batch (shard_map over data × fsdp): XLA cannot
    split a Pallas call itself."""
    d = q.shape[-1]
    pad = ((0, 0), (0, 0), (0, 0), (0, -d % 128))
    q = (q / math.sqrt(d)).astype(k.dtype)
    q, k, v = (jnp.pad(x, pad).transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, H, L, D']

    # built here, not inside shard_map: its tables must not belong to one mesh's manual context
    kernel = _splash_kernel(q.shape[1], q.shape[2], k.shape[2], jax.default_backend() != "tpu")
    local = jax.vmap(kernel)
    mesh = jax.sharding.get_abstract_mesh()
    batch = tuple(a for a in BATCH if not mesh.empty and a in mesh.axis_names)
    shards = math.prod(mesh.shape[a] for a in batch)
    if shards > 1 and q.shape[0] % shards == 0:  # else (e.g. a small eval batch) XLA places it, replicated
        spec = jax.sharding.PartitionSpec(batch)
        local = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
    return local(q, k, v)[..., :d].transpose(0, 2, 1, 3)


class GEGLU(_Layer):
    """proj to 2×inner, then value * GELU(gate) (exact GELU, as diffusers)."""

    features: int = 5120

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        value, gate = jnp.split(self.dense(2 * self.features, "proj")(x), 2, axis=-1)
        return value * nn.gelu(gate, approximate=False)


class FeedForward(_Layer):
    """net_0 (GEGLU to 4×dim) → net_2 (linear back to dim)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        h = GEGLU(4 * dim, dtype=self.dtype, param_dtype=self.param_dtype, name="net_0")(x)
        return self.dense(dim, "net_2")(h)


class BasicTransformerBlock(_Layer):
    """Pre-norm self-attention, cross-attention and GEGLU feed-forward, each with a residual."""

    heads: int = 8
    head_dim: int = 64
    upcast_attention: bool = False
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """x [B, L, C], context [B, S, D] → [B, L, C]."""
        kw = dict(heads=self.heads, head_dim=self.head_dim, upcast=self.upcast_attention,
                  dtype=self.dtype, param_dtype=self.param_dtype, attention=self.attention)
        x = x + Attention(**kw, name="attn1")(self.layer_norm(self.eps, "norm1")(x))
        x = x + Attention(**kw, name="attn2")(self.layer_norm(self.eps, "norm2")(x), context)
        return x + FeedForward(dtype=self.dtype, param_dtype=self.param_dtype, name="ff")(
            self.layer_norm(self.eps, "norm3")(x))


class _ScannedBlock(BasicTransformerBlock):
    """A transformer layer in `nn.scan`'s (carry, x) → (carry, y) form."""

    def __call__(self, x: jax.Array, context: jax.Array):
        return super().__call__(x, context), None


def stack_layers(params: dict) -> dict:
    """Per-layer tree (`transformer_blocks_0`, `_1`, ...) → the scanned layout (`transformer_blocks`, every
    leaf stacked on a leading layer axis). Other parameters are unchanged."""
    if not isinstance(params, dict):
        return params
    layers = sorted((k for k in params if k.startswith("transformer_blocks_")), key=lambda k: int(k.rpartition("_")[2]))
    out = {k: stack_layers(v) for k, v in params.items() if k not in layers}
    if layers:
        out["transformer_blocks"] = jax.tree.map(lambda *xs: jnp.stack(xs), *(params[k] for k in layers))
    return out


def unstack_layers(params: dict) -> dict:
    """The scanned layout → the per-layer tree that mirrors diffusers' names."""
    if not isinstance(params, dict):
        return params
    out = {k: unstack_layers(v) for k, v in params.items() if k != "transformer_blocks"}
    if "transformer_blocks" in params:
        stacked = params["transformer_blocks"]
        depth = jax.tree.leaves(stacked)[0].shape[0]
        out |= {f"transformer_blocks_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(depth)}
    return out


class Transformer2DModel(_Layer):
    """GroupNorm → proj_in → `depth` transformer blocks → proj_out, plus the input (diffusers'
    `Transformer2DModel` as used in SDXL's UNet)."""

    heads: int = 8
    head_dim: int = 64
    depth: int = 1
    groups: int = 32
    use_linear_projection: bool = True
    upcast_attention: bool = False
    scan_layers: bool = False

    @nn.compact
    def __call__(self, x: jax.Array, context: jax.Array) -> jax.Array:
        """x [B, H, W, C], context [B, S, D] → [B, H, W, C]."""
        b, hgt, wid, c = x.shape
        inner = self.heads * self.head_dim
        h = self.group_norm(self.groups, 1e-6, "norm")(x)  # diffusers fixes this eps at 1e-6
        if self.use_linear_projection:
            h = self.dense(inner, "proj_in")(h.reshape(b, hgt * wid, c))
        else:
            h = self.conv(inner, 1, "proj_in")(h).reshape(b, hgt * wid, inner)
        layer = dict(heads=self.heads, head_dim=self.head_dim, upcast_attention=self.upcast_attention,
                     dtype=self.dtype, param_dtype=self.param_dtype, attention=self.attention)
        if self.scan_layers:
            # One compiled body for all layers; parameters stacked under `transformer_blocks` [depth, ...]
            # (`stack_layers` / `unstack_layers` convert from and to the per-layer tree).
            scanned = nn.scan(rematted(_ScannedBlock, self.remat), variable_axes={"params": 0},
                              split_rngs={"params": True}, in_axes=nn.broadcast, length=self.depth)
            h, _ = scanned(**layer, name="transformer_blocks")(h, context)
        else:
            for i in range(self.depth):
                h = rematted(BasicTransformerBlock, self.remat)(**layer, name=f"transformer_blocks_{i}")(h, context)
        if self.use_linear_projection:
            h = self.dense(c, "proj_out")(h).reshape(b, hgt, wid, c)
        else:
            h = self.conv(c, 1, "proj_out")(h.reshape(b, hgt, wid, inner))
        return h + x


class Downsample2D(_Layer):
    """A 3×3 convolution with stride 2. `padding=1` (the UNet's) pads every side by 1; `padding=0` (the
    VAE encoder's) pads only the bottom and right by 1, as diffusers' explicit (0, 1, 0, 1) pad does."""

    padding: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        pad = ((0, 1), (0, 1)) if self.padding == 0 else ((self.padding, self.padding),) * 2
        return self.conv(x.shape[-1], 3, "conv", stride=2, padding=pad)(x)


class Upsample2D(_Layer):
    """Nearest-neighbour ×2, then a 3×3 convolution."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x.shape[-1], 3, "conv")(x)
