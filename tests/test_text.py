"""SDXL's CLIP text encoders in Flax (`jaxdistill.text`) against transformers' PyTorch CLIP models and
diffusers' `StableDiffusionXLPipeline.encode_prompt`, on a tiny random pipeline folder written by
transformers' own `save_pretrained` (`reference.write_random_text_encoders`).

Tolerance (float32): max |ours − reference| ≤ 1e-4 · max |reference|, per output.
"""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file, save_file

from jaxdistill import convert, text
from jaxdistill.reference import relative_errors, write_random_text_encoders
from jaxdistill.spec import UnsupportedConfigError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOLERANCE = 1e-4
WORDS = ("a photo of the cat dog sitting on mat red blue tree under sky painting oil portrait woman man city "
         "night neon rain highly detailed 4k sunset beach mountain river astronaut riding horse").split()


def random_captions(rng: np.random.Generator, n: int) -> list[str]:
    """Caption-like strings: common words (so BPE merges fire), mixed case, punctuation, accents, emoji.
    The tiny vocabulary spells most words letter by letter: 1–12 words leave padding in most rows."""
    extras = ["Café", "naïve", "☕", "🐱", "São Paulo", "!!", "(masterpiece)", "ünïcödé", "x,y", "  spaced\tout "]
    captions = []
    for _ in range(n):
        words = list(rng.choice(WORDS, size=rng.integers(1, 12)))
        for _ in range(rng.integers(0, 3)):
            words.insert(int(rng.integers(0, len(words) + 1)), str(rng.choice(extras)))
        captions.append(" ".join(w.upper() if rng.random() < 0.1 else w for w in words))
    return captions


@pytest.fixture(scope="session")
def pipeline_dir(tmp_path_factory):
    return write_random_text_encoders(tmp_path_factory.mktemp("sdxl_text"), seed=0)


@pytest.fixture(scope="session")
def encoders(pipeline_dir) -> text.TextEncoders:
    return text.load_text_encoders(pipeline_dir)


@pytest.fixture(scope="session")
def encode(encoders):
    """`encoders.encode`, jitted once for the session."""
    return jax.jit(encoders.encode)


@pytest.fixture(scope="session")
def torch_models(pipeline_dir):
    """transformers' own CLIPTextModel / CLIPTextModelWithProjection, loaded from the same folder."""
    return (transformers.CLIPTextModel.from_pretrained(pipeline_dir / "text_encoder").eval(),
            transformers.CLIPTextModelWithProjection.from_pretrained(pipeline_dir / "text_encoder_2").eval())


@pytest.fixture(scope="session")
def apply_fns(encoders):
    """A jitted forward per encoder: (params, ids, mask) → CLIPTextOutput."""
    return tuple(jax.jit(lambda p, ids, mask, m=m: m.apply({"params": p}, ids, mask)) for m in encoders.models)


def test_tokenize_matches_transformers(pipeline_dir, encoders):
    captions = ["", "a photo of a cat", "Thé naïve café ☕ in São Paulo 🐱", "the " * 200 + "end",
                "UPPER case, punctuation!?  and   spaces"]
    ids1, ids2 = encoders.tokenize(captions)
    for ids, folder in ((ids1, "tokenizer"), (ids2, "tokenizer_2")):
        tok = transformers.CLIPTokenizer.from_pretrained(pipeline_dir / folder)
        # The call diffusers' StableDiffusionXLPipeline.encode_prompt makes.
        expected = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                       return_tensors="pt").input_ids.numpy()
        assert ids.dtype == np.int32 and ids.shape == (len(captions), 77)
        np.testing.assert_array_equal(ids, expected)
        assert (ids[:, 0] == tok.bos_token_id).all()
        assert ids[3, -1] == tok.eos_token_id  # truncated to 77, EOS kept
        assert ids[0, 1] == tok.eos_token_id and (ids[0, 2:] == tok.pad_token_id).all()
    # SDXL's tokenizer pads with <|endoftext|>, tokenizer_2 with "!".
    assert (ids1[0, 2:] == ids1[0, 1]).all() and (ids2[0, 2:] != ids2[0, 1]).all()


def _torch_outputs(model, ids, mask=None) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model(torch.from_numpy(ids).long(), attention_mask=None if mask is None else torch.from_numpy(mask),
                    output_hidden_states=True)
    ref = {"last_hidden_state": out.last_hidden_state, "penultimate": out.hidden_states[-2]}
    ref |= {f"hidden_states.{i}": h for i, h in enumerate(out.hidden_states)}
    if hasattr(out, "text_embeds"):
        ref["text_embeds"] = out.text_embeds
    else:
        ref["pooler_output"] = out.pooler_output
    return {k: v.float().numpy() for k, v in ref.items()}


def _our_outputs(out: text.CLIPTextOutput) -> dict[str, np.ndarray]:
    ours = {"last_hidden_state": out.last_hidden_state, "penultimate": out.hidden_states[-2],
            "pooler_output": out.pooler_output, "text_embeds": out.text_embeds}
    ours |= {f"hidden_states.{i}": h for i, h in enumerate(out.hidden_states)}
    return {k: np.asarray(v) for k, v in ours.items() if v is not None}


@pytest.mark.parametrize("index", [0, 1], ids=["text_encoder", "text_encoder_2"])
@pytest.mark.parametrize("inputs", ["captions", "captions_masked", "random_ids"])
def test_encoder_matches_transformers(encoders, torch_models, apply_fns, index, inputs):
    rng = np.random.default_rng(100 + index)
    spec = encoders.specs[index]
    mask = None
    if inputs == "random_ids":
        # Any ids, with or without EOS, shorter than 77: the two pooling rules (largest id for
        # eos_token_id=2, text_encoder; first EOS, text_encoder_2) pick different positions here.
        ids = rng.integers(0, spec.vocab_size, size=(3, 20)).astype(np.int32)
        ids[0, 5] = encoders.tokenizers[index].eos_token_id
    else:
        tok = encoders.tokenizers[index]
        captions = random_captions(rng, 4) + [" ".join(WORDS)]  # and one truncated
        enc = tok(captions, padding="max_length", max_length=77, truncation=True, return_tensors="np")
        ids = enc.input_ids.astype(np.int32)
        assert (enc.attention_mask[:-1, -1] == 0).any() and enc.attention_mask[-1].all()
        if inputs == "captions_masked":
            mask = enc.attention_mask.astype(np.int32)
    ref = _torch_outputs(torch_models[index], ids, mask)
    ours = _our_outputs(apply_fns[index](encoders.params[("text_encoder", "text_encoder_2")[index]], ids, mask))
    assert len(ref) == spec.num_hidden_layers + 1 + 3
    errors = relative_errors(ours, ref)
    assert max(errors.values()) <= TOLERANCE, errors


def test_sdxl_conditioning_matches_diffusers_encode_prompt(encoders, encode, torch_models):
    """Our (prompt_embeds, pooled) against diffusers' own encode_prompt, on a StableDiffusionXLPipeline
    built from the same tiny encoders and tokenizers (no VAE, UNet or scheduler: encode_prompt needs none)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(
        vae=None, unet=None, scheduler=None, text_encoder=torch_models[0], text_encoder_2=torch_models[1],
        tokenizer=encoders.tokenizers[0], tokenizer_2=encoders.tokenizers[1], add_watermarker=False)
    captions = random_captions(np.random.default_rng(7), 3) + ["", "the " * 100]
    with torch.no_grad():
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(captions, device=torch.device("cpu"),
                                                         do_classifier_free_guidance=False)
    ours = encode(encoders.params, *encoders.tokenize(captions))
    d1, d2 = (s.hidden_size for s in encoders.specs)
    assert ours[0].shape == (len(captions), 77, d1 + d2) and ours[1].shape == (len(captions), 40)
    errors = relative_errors({"prompt_embeds": ours[0], "pooled": ours[1]},
                             {"prompt_embeds": prompt_embeds.numpy(), "pooled": pooled.numpy()})
    assert max(errors.values()) <= TOLERANCE, errors


def test_bfloat16_compute_runs_close(encoders, encode):
    captions = random_captions(np.random.default_rng(3), 3) + ["", "the " * 100]  # the shapes of the test above
    ids = encoders.tokenize(captions)
    ref = encode(encoders.params, *ids)
    bf16 = text.TextEncoders(encoders.specs, encoders.params, encoders.tokenizers, dtype=jnp.bfloat16)
    ours = jax.jit(bf16.encode)(jax.tree.map(lambda x: x.astype(jnp.bfloat16), bf16.params), *ids)
    assert ours[0].dtype == jnp.bfloat16 and ours[1].dtype == jnp.bfloat16
    errors = relative_errors({"e": ours[0], "p": ours[1]}, {"e": np.asarray(ref[0]), "p": np.asarray(ref[1])})
    assert max(errors.values()) < 5e-2, errors


def test_param_tree_is_the_models(encoders):
    """The loaded tree has exactly the paths and shapes that the Flax model initialises."""
    for spec, params in zip(encoders.specs, encoders.params.values(), strict=True):
        expected = {k: v.shape for k, v in flatten_dict(text.abstract_params(spec)).items()}
        assert {k: v.shape for k, v in flatten_dict(params).items()} == expected
    assert ("text_model", "encoder", "layers_0", "self_attn", "q_proj", "kernel") in expected
    assert ("text_model", "embeddings", "token_embedding", "embedding") in expected
    assert ("text_projection", "kernel") in expected


def test_sdxl_file_layout_fp16_sharded(pipeline_dir, encoders, tmp_path):
    """SDXL's published files: `text_model.`-prefixed keys (transformers 4), a `position_ids` buffer,
    fp16 variant, sharded with an index."""
    state = load_file(pipeline_dir / "text_encoder" / "model.safetensors")
    assert not any(k.startswith("text_model.") for k in state)  # transformers 5 saves CLIPTextModel unprefixed
    state = {f"text_model.{k}": v.astype(np.float16) for k, v in state.items()}
    state["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    keys = sorted(state)
    shards = {"model.fp16-00001-of-00002.safetensors": keys[::2], "model.fp16-00002-of-00002.safetensors": keys[1::2]}
    for name, names in shards.items():
        save_file({k: state[k] for k in names}, tmp_path / name, {"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: name for name, names in shards.items() for k in names}}
    (tmp_path / "model.safetensors.index.fp16.json").write_text(json.dumps(index))
    (tmp_path / "config.json").write_text((pipeline_dir / "text_encoder" / "config.json").read_text())

    spec, params = text.load_text_encoder(tmp_path, with_projection=False, variant="fp16")
    assert spec == encoders.specs[0]
    expected = jax.tree.map(lambda x: np.asarray(x).astype(np.float16), encoders.params["text_encoder"])
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, params), expected)


def test_weights_errors(pipeline_dir, encoders, tmp_path):
    spec = encoders.specs[1]
    state = load_file(pipeline_dir / "text_encoder_2" / "model.safetensors")
    del state["text_projection.weight"]
    state["text_model.encoder.layers.0.mlp.fc3.weight"] = np.zeros((2, 2), np.float32)
    state["text_model.final_layer_norm.bias"] = np.zeros(7, np.float32)
    with pytest.raises(convert.WeightsError) as info:
        text.from_transformers_state_dict(state, spec)
    message = str(info.value)
    assert "3 problems" in message
    for needle in ("missing: text_projection.weight", "unexpected: text_model.encoder.layers.0.mlp.fc3.weight",
                   "shape mismatch: text_model.final_layer_norm.bias has (7,)"):
        assert needle in message

    (tmp_path / "config.json").write_text((pipeline_dir / "text_encoder_2" / "config.json").read_text())
    (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(convert.WeightsError, match="pickled"):
        text.load_text_encoder(tmp_path)


def test_spec_from_config(pipeline_dir, tmp_path):
    config = json.loads((pipeline_dir / "text_encoder_2" / "config.json").read_text())
    assert text.TextEncoderSpec.from_transformers_config(config).projection_dim == 40  # from `architectures`
    assert text.TextEncoderSpec.from_transformers_config(config, with_projection=False).projection_dim is None
    with pytest.raises(UnsupportedConfigError, match="hidden_act='silu'"):
        text.TextEncoderSpec.from_transformers_config(config | {"hidden_act": "silu"})
    truncated = tmp_path / "config.json"
    truncated.write_text(json.dumps(config)[:40])
    with pytest.raises(UnsupportedConfigError, match=f"cannot read {truncated}.*download or copy it again"):
        text.TextEncoderSpec.from_transformers_config(truncated)


def test_a_tokenizer_with_more_tokens_than_its_encoder_embeds_is_refused(pipeline_dir, tmp_path):
    """Tokens added to a tokenizer (textual inversion) without resizing the encoder's table: its ids would
    embed as NaN under jit, silently; loading the pair says so instead."""
    copy = tmp_path / "pipeline"
    shutil.copytree(pipeline_dir, copy)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(copy / "tokenizer_2"))
    tokenizer.add_tokens(["<cat-toy>"])
    tokenizer.save_pretrained(str(copy / "tokenizer_2"))
    with pytest.raises(UnsupportedConfigError, match=f"{copy / 'tokenizer_2'} has 527 tokens, but "
                                                     f"{copy / 'text_encoder_2'} embeds 526"):
        text.load_text_encoders(copy)


def test_spec_defaults_are_transformers_defaults(encoders):
    """A config.json that leaves a field out means CLIPTextConfig's default (eos 49407: first-EOS pooling)."""
    defaults = transformers.CLIPTextConfig()
    spec = text.TextEncoderSpec()
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "max_position_embeddings", "hidden_act", "layer_norm_eps", "eos_token_id", "pad_token_id",
                  "bos_token_id"):
        assert getattr(spec, field) == getattr(defaults, field), field
    # one string is one caption, as in diffusers' encode_prompt
    assert [ids.shape for ids in encoders.tokenize("a cat")] == [(1, 77), (1, 77)]
    np.testing.assert_array_equal(encoders.tokenize("a cat")[1], encoders.tokenize(["a cat"])[1])


def test_activations_match_transformers():
    x = np.linspace(-6, 6, 1001, dtype=np.float32)
    for name, fn in text.ACTIVATIONS.items():
        ref = transformers.activations.ACT2FN[name](torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(np.asarray(fn(jnp.asarray(x))), ref, atol=1e-6, err_msg=name)


def test_sdxl_sizes():
    """SDXL's own text encoder configs (the fields that matter, as in its config.json files) build models
    with the published parameter counts: CLIP ViT-L 123,060,480 and OpenCLIP bigG (with projection)
    694,659,840; conditioning widths 768 + 1280 = 2048, pooled 1280."""
    common = dict(vocab_size=49408, max_position_embeddings=77, layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=2,
                  pad_token_id=1)
    vit_l = common | dict(architectures=["CLIPTextModel"], hidden_size=768, intermediate_size=3072,
                          num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu", projection_dim=768)
    big_g = common | dict(architectures=["CLIPTextModelWithProjection"], hidden_size=1280, intermediate_size=5120,
                          num_hidden_layers=32, num_attention_heads=20, hidden_act="gelu", projection_dim=1280)
    for config, count in ((vit_l, 123_060_480), (big_g, 694_659_840)):
        spec = text.TextEncoderSpec.from_transformers_config(config)
        assert sum(int(np.prod(s)) for s in text.state_dict_shapes(spec).values()) == count
        assert sum(x.size for x in jax.tree.leaves(text.abstract_params(spec))) == count


def test_random_pipeline_is_sized_to_the_unet_it_is_for(tmp_path):
    """The README's tiny pipeline for sampling the tiny run: text encoders that fit its UNet (the default
    test pipeline's 80-wide context does not)."""
    from jaxdistill import presets
    from jaxdistill.reference import write_random_pipeline
    from jaxdistill.sample import load_pipeline

    spec = presets.tiny()
    pipe = load_pipeline(write_random_pipeline(tmp_path / "pipeline", spec))  # refuses encoders that do not fit
    e1, e2 = pipe.text_encoders.specs
    assert (e1.hidden_size + e2.hidden_size, e2.projection_dim) == (spec.cross_attention_dim, 32)
