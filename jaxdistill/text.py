"""SDXL's two CLIP text encoders in Flax linen, for caption conditioning inside a jitted train step.

`CLIPTextModel(spec)` is transformers' `CLIPTextModel` (spec without projection: SDXL's `text_encoder`,
CLIP ViT-L) or `CLIPTextModelWithProjection` (spec with `projection_dim`: SDXL's `text_encoder_2`, OpenCLIP
bigG), number for number; parameter paths mirror transformers' module names
(`text_model/encoder/layers_3/self_attn/q_proj/kernel`, `text_projection/kernel`), so loading is
`convert.torch_to_flax` plus the embedding tables. transformers v5 has no Flax CLIP, hence this module;
parity with its PyTorch models and with diffusers' `StableDiffusionXLPipeline.encode_prompt` is tested in
`tests/test_text.py`.

    encoders = load_text_encoders("path/to/sdxl")            # a diffusers pipeline folder
    ids1, ids2 = encoders.tokenize(["a photo of a cat"])     # numpy int32 [B, 77] each
    prompt_embeds, pooled = encoders.encode(encoders.params, ids1, ids2)   # pure, jittable

Tokenization is transformers' own `CLIPTokenizer`, read from the pipeline's `tokenizer/` and `tokenizer_2/`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill import convert
from jaxdistill.layers import _Ops
from jaxdistill.records import read_json
from jaxdistill.spec import UnsupportedConfigError

Dtype = jnp.dtype | type
WEIGHTS_NAME = "model.safetensors"  # transformers' file name (diffusers' is diffusion_pytorch_model.safetensors)
ENCODERS = (("text_encoder", "tokenizer", False), ("text_encoder_2", "tokenizer_2", True))  # SDXL's layout

# transformers' ACT2FN entries that CLIP text configs use. quick_gelu: OpenAI CLIP (SDXL's text_encoder);
# gelu (exact, erf): OpenCLIP bigG (text_encoder_2).
ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
}


@dataclasses.dataclass(frozen=True)
class TextEncoderSpec:
    """A CLIP text encoder: transformers' `CLIPTextConfig` fields that change the computation.

    `projection_dim` is None for `CLIPTextModel` and the output width of `text_projection` for
    `CLIPTextModelWithProjection` (the config of a `CLIPTextModel` often holds a projection_dim it does not
    use, so the spec says which model it is). `eos_token_id` picks the pooled position exactly as
    transformers does: 2 (the value in SDXL's configs, from before transformers PR #24773) means "the
    largest id", anything else "the first position holding eos_token_id".
    """

    # Defaults: transformers' CLIPTextConfig, so that a config.json missing a field means what it means there.
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None
    eos_token_id: int = 49407
    pad_token_id: int | None = 1
    bos_token_id: int | None = 49406

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise UnsupportedConfigError(
                f"hidden_act={self.hidden_act!r}: jaxdistill's CLIP text encoder implements {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise UnsupportedConfigError(f"hidden_size={self.hidden_size} is not divisible by "
                                         f"num_attention_heads={self.num_attention_heads}")
        if not isinstance(self.eos_token_id, int):
            raise UnsupportedConfigError(f"eos_token_id={self.eos_token_id!r}: expected one integer")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_transformers_config(cls, config: Mapping[str, Any] | str | os.PathLike,
                                 with_projection: bool | None = None) -> TextEncoderSpec:
        """Reads transformers' `CLIPTextConfig` (a dict, or a path to `config.json`). `with_projection`:
        whether the model is `CLIPTextModelWithProjection`; None reads it from the config's `architectures`."""
        if not isinstance(config, Mapping):
            config = read_json(config, error=UnsupportedConfigError, remedy="download or copy it again")
        if with_projection is None:
            with_projection = "CLIPTextModelWithProjection" in (config.get("architectures") or ())
        fields = {f.name for f in dataclasses.fields(cls)} - {"projection_dim"}
        kwargs = {k: config[k] for k in fields if k in config}
        if with_projection:
            kwargs["projection_dim"] = config.get("projection_dim", 512)  # CLIPTextConfig's default
        return cls(**kwargs)


class CLIPTextOutput(flax.struct.PyTreeNode):
    last_hidden_state: jax.Array  # [B, L, hidden] after final_layer_norm
    pooler_output: jax.Array  # [B, hidden]: last_hidden_state at the EOS position
    hidden_states: tuple[jax.Array, ...]  # embeddings, then each layer's output (not final-normed): layers + 1
    text_embeds: jax.Array | None  # [B, projection_dim]: text_projection(pooler_output), WithProjection only


class _TextLayer(_Ops):
    _: dataclasses.KW_ONLY
    dtype: Dtype = jnp.float32  # compute
    param_dtype: Dtype = jnp.float32  # storage


class CLIPTextEmbeddings(_TextLayer):
    """token_embedding(ids) + position_embedding(0 … L-1). Ids are not checked under jit (an id past the
    table gives NaN): `load_text_encoders` checks that the tokenizers' vocabularies fit the tables."""

    spec: TextEncoderSpec

    @nn.compact
    def __call__(self, input_ids: jax.Array) -> jax.Array:
        """input_ids [B, L] → [B, L, hidden]."""
        s = self.spec
        if input_ids.shape[-1] > s.max_position_embeddings:
            raise ValueError(f"{input_ids.shape[-1]} tokens: the encoder has {s.max_position_embeddings} positions")
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        tokens = nn.Embed(s.vocab_size, s.hidden_size, **kw, name="token_embedding")(input_ids)
        positions = nn.Embed(s.max_position_embeddings, s.hidden_size, **kw, name="position_embedding")(
            jnp.arange(input_ids.shape[-1]))
        return tokens + positions[None]


class CLIPAttention(_TextLayer):
    """q_proj/k_proj/v_proj/out_proj, all with biases; causal, plus the padding mask when given."""

    heads: int = 12

    @nn.compact
    def __call__(self, x: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """x [B, L, C], attention_mask [B, L] (1: token, 0: padding; right padding, as CLIP's tokenizer
        pads) or None → [B, L, C]."""
        b, length, dim = x.shape
        q, k, v = (self.dense(dim, name)(x).reshape(b, length, self.heads, dim // self.heads)
                   for name in ("q_proj", "k_proj", "v_proj"))
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        # Scale 1/sqrt(head_dim), softmax in float32, as transformers' attention.
        out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True).astype(self.dtype)
        return self.dense(dim, "out_proj")(out.reshape(b, length, dim))


class CLIPMLP(_TextLayer):
    """fc1 → hidden_act → fc2."""

    spec: TextEncoderSpec

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = ACTIVATIONS[self.spec.hidden_act](self.dense(self.spec.intermediate_size, "fc1")(x))
        return self.dense(self.spec.hidden_size, "fc2")(h)


class CLIPEncoderLayer(_TextLayer):
    """layer_norm1 → self_attn → residual; layer_norm2 → mlp → residual."""

    spec: TextEncoderSpec

    @nn.compact
    def __call__(self, x: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """x [B, L, hidden] → [B, L, hidden]."""
        s = self.spec
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = self.layer_norm(s.layer_norm_eps, "layer_norm1")(x)
        x = x + CLIPAttention(heads=s.num_attention_heads, **kw, name="self_attn")(h, attention_mask)
        h = self.layer_norm(s.layer_norm_eps, "layer_norm2")(x)
        return x + CLIPMLP(spec=s, **kw, name="mlp")(h)


class CLIPEncoder(_TextLayer):
    """`num_hidden_layers` encoder layers (`layers_0`, `layers_1`, ...)."""

    spec: TextEncoderSpec

    @nn.compact
    def __call__(self, h: jax.Array, attention_mask: jax.Array | None = None) -> list[jax.Array]:
        """h [B, L, hidden] → every layer's output, [B, L, hidden] each."""
        outputs = []
        for i in range(self.spec.num_hidden_layers):
            h = CLIPEncoderLayer(spec=self.spec, dtype=self.dtype, param_dtype=self.param_dtype,
                                 name=f"layers_{i}")(h, attention_mask)
            outputs.append(h)
        return outputs


class CLIPTextTransformer(_TextLayer):
    """embeddings → encoder → final_layer_norm, and the final-normed state at the EOS position."""

    spec: TextEncoderSpec

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None):
        """input_ids [B, L] → (last_hidden_state [B, L, hidden], pooled [B, hidden], hidden_states:
        embeddings and each layer's output)."""
        s = self.spec
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = CLIPTextEmbeddings(spec=s, **kw, name="embeddings")(input_ids)
        hidden_states = [h, *CLIPEncoder(spec=s, **kw, name="encoder")(h, attention_mask)]
        last = self.layer_norm(s.layer_norm_eps, "final_layer_norm")(hidden_states[-1])
        if s.eos_token_id == 2:  # transformers' legacy rule: EOS is the largest id of each row
            eos = jnp.argmax(input_ids, axis=-1)
        else:  # the first position holding eos_token_id (padding may be EOS too); 0 when there is none
            eos = jnp.argmax(input_ids == s.eos_token_id, axis=-1)
        pooled = jnp.take_along_axis(last, eos[:, None, None], axis=1)[:, 0]
        return last, pooled, tuple(hidden_states)


class CLIPTextModel(_TextLayer):
    """transformers' `CLIPTextModel`, or `CLIPTextModelWithProjection` when `spec.projection_dim` is set."""

    spec: TextEncoderSpec

    @nn.compact
    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> CLIPTextOutput:
        """input_ids [B, L] integer (L ≤ max_position_embeddings), attention_mask [B, L] or None (SDXL's
        pipelines pass none: padding is attended, causally) → `CLIPTextOutput`."""
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        last, pooled, hidden_states = CLIPTextTransformer(spec=self.spec, **kw, name="text_model")(
            input_ids, attention_mask)
        text_embeds = None
        if self.spec.projection_dim is not None:
            text_embeds = self.dense(self.spec.projection_dim, "text_projection", use_bias=False)(pooled)
        return CLIPTextOutput(last_hidden_state=last, pooler_output=pooled, hidden_states=hidden_states,
                              text_embeds=text_embeds)


# ---- weights ------------------------------------------------------------------------------------

def abstract_params(spec: TextEncoderSpec, param_dtype: Dtype = jnp.float32) -> dict:
    """The parameter tree's shapes and dtypes (`jax.ShapeDtypeStruct` leaves), with no memory used."""
    model = CLIPTextModel(spec=spec, param_dtype=param_dtype)
    ids = jax.ShapeDtypeStruct((1, spec.max_position_embeddings), jnp.int32)
    return jax.eval_shape(lambda rng, x: model.init(rng, x)["params"], jax.random.key(0), ids)


def state_dict_shapes(spec: TextEncoderSpec) -> dict[str, tuple[int, ...]]:
    """transformers' state dict for `spec` (as SDXL's files hold it: `text_model.`-prefixed), name → shape."""
    d, f = spec.hidden_size, spec.intermediate_size
    shapes = {"text_model.embeddings.token_embedding.weight": (spec.vocab_size, d),
              "text_model.embeddings.position_embedding.weight": (spec.max_position_embeddings, d)}
    for i in range(spec.num_hidden_layers):
        p = f"text_model.encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes |= {f"{p}self_attn.{name}.weight": (d, d), f"{p}self_attn.{name}.bias": (d,)}
        for name in ("layer_norm1", "layer_norm2"):
            shapes |= {f"{p}{name}.weight": (d,), f"{p}{name}.bias": (d,)}
        shapes |= {f"{p}mlp.fc1.weight": (f, d), f"{p}mlp.fc1.bias": (f,),
                   f"{p}mlp.fc2.weight": (d, f), f"{p}mlp.fc2.bias": (d,)}
    shapes |= {"text_model.final_layer_norm.weight": (d,), "text_model.final_layer_norm.bias": (d,)}
    if spec.projection_dim is not None:
        shapes["text_projection.weight"] = (spec.projection_dim, d)
    return shapes


def from_transformers_state_dict(state: Mapping[str, np.ndarray], spec: TextEncoderSpec) -> dict:
    """transformers' CLIP text state dict (numpy) → Flax parameter tree, checked strictly against `spec`.

    Accepts both key layouts: `text_model.`-prefixed (SDXL's files; transformers ≤ 4 and every
    `CLIPTextModelWithProjection`) and unprefixed (`CLIPTextModel` saved by transformers 5). The
    `position_ids` buffer that older files hold is dropped."""
    unprefixed = ("embeddings.", "encoder.", "final_layer_norm.")
    state = {f"text_model.{k}" if k.startswith(unprefixed) else k: v
             for k, v in state.items() if not k.endswith("embeddings.position_ids")}
    check_state_dict(state, spec)
    # nn.Embed's table is `embedding`, vocab × hidden like PyTorch's weight: renamed, never transposed.
    state = {k.removesuffix(".weight") + ".embedding" if k.endswith("_embedding.weight") else k: v
             for k, v in state.items()}
    return convert.torch_to_flax(state, lists=convert.MODULE_LISTS | {"layers"})


def check_state_dict(state: Mapping[str, np.ndarray], spec: TextEncoderSpec):
    """Raises one `WeightsError` listing every missing, unexpected and misshaped tensor."""
    convert.check_shapes(state_dict_shapes(spec), {k: tuple(np.shape(v)) for k, v in state.items()},
                         "CLIP text encoder")


def load_text_encoder(folder: str | os.PathLike, with_projection: bool | None = None,
                      param_dtype: Dtype | None = None, variant: str | None = None) -> tuple[TextEncoderSpec, dict]:
    """Reads a transformers CLIP text model folder (`config.json`, `model[.variant].safetensors`, possibly
    sharded) → (spec, params). `param_dtype` casts every parameter (None keeps the file's dtype)."""
    folder = Path(folder)
    spec = TextEncoderSpec.from_transformers_config(folder / "config.json", with_projection)
    params = from_transformers_state_dict(convert.read_safetensors(folder, variant, name=WEIGHTS_NAME), spec)
    if param_dtype is not None:
        params = jax.tree.map(lambda x: x.astype(param_dtype), params)
    return spec, jax.tree.map(jnp.asarray, params)


# ---- SDXL's conditioning ------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class TextEncoders:
    """SDXL's two text encoders with their tokenizers: captions → (prompt_embeds, pooled_prompt_embeds), as
    `StableDiffusionXLPipeline.encode_prompt` computes them (no classifier-free guidance, no clip_skip)."""

    specs: tuple[TextEncoderSpec, TextEncoderSpec]
    params: dict  # {"text_encoder": tree, "text_encoder_2": tree}
    tokenizers: tuple[Any, Any]  # transformers CLIPTokenizers
    dtype: Dtype = jnp.float32  # compute

    @property
    def models(self) -> tuple[CLIPTextModel, CLIPTextModel]:
        return tuple(CLIPTextModel(spec=s, dtype=self.dtype) for s in self.specs)

    def tokenize(self, captions: str | Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """captions → (ids for text_encoder, ids for text_encoder_2), int32 [B, 77] each (`tokenize`)."""
        return tokenize(self.tokenizers, captions)

    def encode(self, params: Mapping, ids1: jax.Array, ids2: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Pure and jittable: ids [B, L] of each tokenizer → (prompt_embeds [B, L, D1 + D2]: the penultimate
        layer outputs (`hidden_states[-2]`) of both encoders, concatenated; pooled [B, P]: text_encoder_2's
        projected EOS embedding), in the compute dtype."""
        model1, model2 = self.models
        out1 = model1.apply({"params": params["text_encoder"]}, ids1)
        out2 = model2.apply({"params": params["text_encoder_2"]}, ids2)
        prompt_embeds = jnp.concatenate([out1.hidden_states[-2], out2.hidden_states[-2]], axis=-1)
        return prompt_embeds, out2.text_embeds

    def __call__(self, captions: Sequence[str]) -> tuple[jax.Array, jax.Array]:
        """Convenience: `encode(self.params, *tokenize(captions))`, eagerly."""
        return self.encode(self.params, *self.tokenize(captions))


def load_text_encoders(pipeline_dir: str | os.PathLike, dtype: Dtype = jnp.float32, *,
                       param_dtype: Dtype | None = None, variant: str | None = None) -> TextEncoders:
    """Reads `text_encoder/` (CLIPTextModel), `text_encoder_2/` (CLIPTextModelWithProjection), `tokenizer/`
    and `tokenizer_2/` of a diffusers SDXL pipeline folder. `dtype` is the compute dtype of `encode`;
    `param_dtype` casts the stored parameters (None keeps the files' dtype); `variant` picks
    `model.<variant>.safetensors` (e.g. "fp16")."""
    root = Path(pipeline_dir)
    specs, params = [], {}
    for encoder, _, with_projection in ENCODERS:
        spec, params[encoder] = load_text_encoder(root / encoder, with_projection, param_dtype, variant)
        specs.append(spec)
    tokenizers = load_tokenizers(root)
    for (encoder, tokenizer_name, _), spec, tokenizer in zip(ENCODERS, specs, tokenizers, strict=True):
        # an id past the embedding table gives NaN (jnp.take), a negative one wraps: nothing would say so
        if len(tokenizer) > spec.vocab_size:
            raise UnsupportedConfigError(
                f"{root / tokenizer_name} has {len(tokenizer)} tokens, but {root / encoder} embeds {spec.vocab_size} "
                "(tokens added to the tokenizer, e.g. by textual inversion, without resizing the encoder's "
                "embeddings?); give the pipeline folder whose tokenizer and text encoder belong together")
    return TextEncoders(specs=tuple(specs), params=params, tokenizers=tokenizers, dtype=dtype)


# What encoding reads from an SDXL pipeline folder (prepare, the trainer's image source, sampling)
PIPELINE_PARTS = ("vae/config.json", "text_encoder/config.json", "text_encoder_2/config.json", "tokenizer",
                  "tokenizer_2")


def check_pipeline_folder(pipeline_dir: str | os.PathLike) -> None:
    """FileNotFoundError naming what an SDXL pipeline folder lacks of the VAE, text encoders and tokenizers
    (checked before anything is loaded: transformers' own error for a missing folder speaks of Hub repo ids)."""
    folder = Path(pipeline_dir)
    missing = [part for part in PIPELINE_PARTS if not (folder / part).exists()]
    if missing:
        what = "no " + ", ".join(missing) if folder.is_dir() else "no such folder"
        raise FileNotFoundError(f"{pipeline_dir}: {what}; expected a diffusers SDXL pipeline folder (vae/, "
                                "text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/)")


def load_tokenizers(pipeline_dir: str | os.PathLike) -> tuple[Any, Any]:
    """transformers' CLIP tokenizers of a diffusers SDXL pipeline folder (`tokenizer/`, `tokenizer_2/`)."""
    from transformers import CLIPTokenizer

    return tuple(CLIPTokenizer.from_pretrained(str(Path(pipeline_dir) / tokenizer)) for _, tokenizer, _ in ENCODERS)


def truncated(tokenizers: Sequence[Any], captions: Sequence[str]) -> list[str]:
    """The captions longer than a tokenizer's model_max_length (77 for CLIP): `tokenize` cuts them, as diffusers
    does (which logs the part cut)."""
    return [c for c in captions if any(len(t(c, truncation=False).input_ids) > t.model_max_length for t in tokenizers)]


def tokenize(tokenizers: Sequence[Any], captions: str | Sequence[str]) -> tuple[np.ndarray, ...]:
    """captions (one string: a batch of one) → one int32 [B, model_max_length (77)] id array per tokenizer:
    padded to max length and truncated, exactly as diffusers' encode_prompt calls the tokenizers."""
    captions = [captions] if isinstance(captions, str) else list(captions)
    return tuple(np.asarray(t(captions, padding="max_length", max_length=t.model_max_length,
                              truncation=True, return_tensors="np").input_ids, np.int32) for t in tokenizers)

