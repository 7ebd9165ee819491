"""Weights in and out: diffusers folders (single file, fp16 variant, sharded), strict loading, refusals."""

import json
import os
import pickle
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import TINY, cpu_env
from diffusers import UNet2DConditionModel
from flax.traverse_util import flatten_dict
from safetensors.numpy import load_file, save_file

from jaxdistill import WeightsError, load_unet, save_unet
from jaxdistill.convert import to_diffusers_state_dict
from jaxdistill.reference import random_diffusers_unet


def flat(params):
    return {k: np.asarray(v) for k, v in flatten_dict(params).items()}


def assert_bit_exact(a, b):
    a, b = flat(a), flat(b)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]), k


def test_load_save_load_is_bit_exact_and_keeps_diffusers_files(unet_folders, tmp_path):
    spec, params = load_unet(unet_folders["ssd1b"])
    save_unet(tmp_path / "copy", spec, params)
    spec2, params2 = load_unet(tmp_path / "copy")
    assert spec2 == spec
    assert_bit_exact(params, params2)
    # Our file holds exactly diffusers' tensors, under diffusers' names.
    original = load_file(os.path.join(unet_folders["ssd1b"], "diffusion_pytorch_model.safetensors"))
    ours = load_file(tmp_path / "copy" / "diffusion_pytorch_model.safetensors")
    assert original.keys() == ours.keys()
    assert all(np.array_equal(original[k], ours[k]) for k in original)
    # and the config is one diffusers reads back to the same model.
    model = UNet2DConditionModel.from_pretrained(tmp_path / "copy", low_cpu_mem_usage=False)
    assert model.config.reverse_transformer_layers_per_block == [[4, 4, 10], [2, 1, 1], 1]


def test_fp16_variant_read_and_written(tmp_path):
    spec = TINY["ssd1b"]
    model = random_diffusers_unet(spec, seed=5).half()
    model.save_pretrained(tmp_path / "hf", variant="fp16")
    assert (tmp_path / "hf" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    for kwargs in ({"variant": "fp16"}, {}):  # explicit, and found when it is the only file
        _, params = load_unet(tmp_path / "hf", **kwargs)
        assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(jnp.float16)}
    expected = {k: v.numpy() for k, v in model.state_dict().items()}
    got = to_diffusers_state_dict(params)
    assert all(np.array_equal(expected[k], got[k]) for k in expected) and expected.keys() == got.keys()

    save_unet(tmp_path / "ours", spec, params, variant="fp16")
    back = UNet2DConditionModel.from_pretrained(tmp_path / "ours", variant="fp16", torch_dtype=torch.float16,
                                                low_cpu_mem_usage=False)
    written = back.state_dict()
    assert all(torch.equal(written[k], v) for k, v in model.state_dict().items())


def test_sharded_folders_both_ways(unet_folders, tmp_path):
    spec, params = load_unet(unet_folders["sdxl"])
    model = UNet2DConditionModel.from_pretrained(unet_folders["sdxl"], low_cpu_mem_usage=False)
    model.save_pretrained(tmp_path / "hf", max_shard_size="2MB")
    assert (tmp_path / "hf" / "diffusion_pytorch_model.safetensors.index.json").is_file()
    _, from_shards = load_unet(tmp_path / "hf")
    assert_bit_exact(params, from_shards)

    save_unet(tmp_path / "ours", spec, params, max_shard_size=2_000_000, dtype=jnp.bfloat16, variant="bf16")
    index = json.loads((tmp_path / "ours" / "diffusion_pytorch_model.safetensors.index.bf16.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    back = UNet2DConditionModel.from_pretrained(tmp_path / "ours", variant="bf16", torch_dtype=torch.bfloat16,
                                                low_cpu_mem_usage=False)
    written = back.state_dict()  # once: state_dict() walks every module (1700 calls took 30 s)
    for k, v in model.state_dict().items():
        assert torch.equal(written[k], v.to(torch.bfloat16)), k
    _, bf16 = load_unet(tmp_path / "ours", variant="bf16", dtype=jnp.float32)
    assert {x.dtype for x in jax.tree.leaves(bf16)} == {np.dtype(jnp.float32)}


def test_pipeline_folder_and_dtype_cast(unet_folders, tmp_path):
    shutil.copytree(unet_folders["sdxl"], tmp_path / "pipe" / "unet")
    spec, params = load_unet(tmp_path / "pipe", dtype=jnp.bfloat16)
    assert spec == TINY["sdxl"]
    assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(jnp.bfloat16)}


def test_every_problem_is_reported_at_once(unet_folders, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(unet_folders["ssd1b"], folder)
    path = folder / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    del state["down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"]
    del state["conv_out.bias"]
    state["mid_block.attentions.0.proj_in.weight"] = np.zeros((64, 64), np.float32)
    state["up_blocks.0.resnets.1.conv1.weight"] = np.zeros((64, 128, 1, 1), np.float32)
    save_file(state, path)
    with pytest.raises(WeightsError) as info:
        load_unet(folder)
    message = str(info.value)
    assert "4 problems" in message
    assert "missing: down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight" in message
    assert "missing: conv_out.bias" in message
    assert "unexpected: mid_block.attentions.0.proj_in.weight" in message
    assert "shape mismatch: up_blocks.0.resnets.1.conv1.weight has (64, 128, 1, 1)" in message
    assert "(64, 128, 3, 3)" in message
    # parameters of a scanned-layers UNet: said so, with the conversion, and nothing written
    from jaxdistill.layers import stack_layers

    spec, params = load_unet(unet_folders["ssd1b"])
    with pytest.raises(WeightsError, match="unstack_layers"):
        save_unet(tmp_path / "scanned", spec, stack_layers(params))
    assert not (tmp_path / "scanned").exists()


class _Payload:
    """Unpickling this writes a marker file: proof that a loader executed code from the file."""

    marker = ""

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_weights_are_refused_and_never_opened(unet_folders, tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(os.path.join(unet_folders["ssd1b"], "config.json"), folder)
    payload = _Payload()
    payload.marker = str(tmp_path / "executed")
    (folder / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(payload))
    with pytest.raises(WeightsError, match="safetensors") as info:
        load_unet(folder)
    assert "save_pretrained" in str(info.value) and "diffusion_pytorch_model.bin" in str(info.value)
    assert not (tmp_path / "executed").exists()


def test_a_truncated_weights_file_is_named(unet_folders, tmp_path):
    """A partial download or copy: a WeightsError (the commands' clear-error type) naming the file."""
    folder = tmp_path / "partial"
    shutil.copytree(unet_folders["micro"], folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(WeightsError, match=f"cannot read {weights}: .*truncated or damaged"):
        load_unet(folder)


def test_missing_folder_or_weights(tmp_path, unet_folders):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_unet(tmp_path / "nowhere")
    workdir = tmp_path / "run"  # python -m jaxdistill.train's: the run's config.json, checkpoints/
    (workdir / "checkpoints").mkdir(parents=True)
    (workdir / "config.json").write_text('{"batch_size": 8}')
    with pytest.raises(FileNotFoundError, match="training workdir"):
        load_unet(workdir)
    model = tmp_path / "model"  # a UNet folder that happens to hold a checkpoints/ folder is still one
    shutil.copytree(unet_folders["micro"], model)
    (model / "checkpoints").mkdir()
    assert load_unet(model)[0] == load_unet(unet_folders["micro"])[0]
    (tmp_path / "empty").mkdir()
    shutil.copy(os.path.join(unet_folders["ssd1b"], "config.json"), tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        load_unet(tmp_path / "empty")


def test_loading_and_saving_need_no_pytorch(unet_folders, tmp_path):
    script = (f"import sys, jaxdistill; s, p = jaxdistill.load_unet({unet_folders['no_mid_conv_proj']!r}); "
              f"jaxdistill.save_unet({str(tmp_path / 'out')!r}, s, p); "
              "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", script], check=True, env=cpu_env())


def test_a_folder_holds_one_set_of_weights(unet_folders, tmp_path):
    """Rewriting a folder in the other layout removes the old one's files (readers take an index first, so
    a stale one would shadow the new weights); other variants are left alone."""
    spec, params = load_unet(unet_folders["micro"])
    other = jax.tree.map(lambda x: x + 1, params)
    out = tmp_path / "unet"
    save_unet(out, spec, params, variant="fp16")
    save_unet(out, spec, params, max_shard_size=100_000)
    assert len(list(out.glob("diffusion_pytorch_model-*-of-*.safetensors"))) > 1
    save_unet(out, spec, other)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors"]
    assert_bit_exact(load_unet(out)[1], other)
    save_unet(out, spec, params, max_shard_size=200_000)
    index = json.loads((out / "diffusion_pytorch_model.safetensors.index.json").read_text())
    assert {p.name for p in out.glob("diffusion_pytorch_model*.safetensors")} == {
        *index["weight_map"].values(), "diffusion_pytorch_model.fp16.safetensors"}
    assert_bit_exact(load_unet(out)[1], params)


def test_unreadable_records_and_an_out_below_a_file_are_named(tmp_path):
    """A truncated config.json or shard index (an interrupted download) names its file; an --out whose
    parent is a file is refused before anything is read."""
    from jaxdistill.convert import OutFolderError, check_out, read_safetensors
    from jaxdistill.spec import UNetSpec, UnsupportedConfigError

    (tmp_path / "config.json").write_text('{"_class_name": "UNet2DCon')
    with pytest.raises(UnsupportedConfigError, match=f"cannot read {tmp_path / 'config.json'}"):
        UNetSpec.from_diffusers_config(tmp_path / "config.json")
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text('{"metadata": {}}')  # no weight_map
    with pytest.raises(WeightsError, match="cannot read the shard index .*index.json \\(KeyError"):
        read_safetensors(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(OutFolderError, match="notes.txt is a file"):
        check_out(tmp_path / "notes.txt" / "student", overwrite=False)


def test_no_out_folder_replaces_a_training_run_or_lands_in_its_own_folders(tmp_path):
    """export / sample / evaluate / prune --out --overwrite: a workdir's checkpoints/ and stages/ are the trainer's
    (`--out WORKDIR/stages --overwrite` deleted a finished stage), the workdir itself too; a new subfolder is fine."""
    from jaxdistill.convert import OutFolderError, check_out

    run = tmp_path / "runs" / "ssd1b"
    (run / "stages" / "main").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    for out in (run / "stages", run / "stages" / "main", run / "checkpoints" / "new"):
        with pytest.raises(OutFolderError, match=f"inside {run / out.relative_to(run).parts[0]}, where the training "
                                                 f"run in {run} keeps"):
            check_out(out, overwrite=True)
    with pytest.raises(OutFolderError, match="is a training run's workdir"):
        check_out(run, overwrite=True)
    check_out(run / "export", overwrite=False)
    check_out(tmp_path / "runs", overwrite=True)  # not itself a run (what it holds is not looked through)


def test_an_out_taken_while_writing_keeps_the_new_output_and_overwrite_spares_the_working_folder(
        tmp_path, monkeypatch, capsys):
    """Another run filling --out while this one sampled used to delete this one's finished images; now they are
    kept beside it and named. --overwrite never replaces the folder the command runs in, one above it, or home;
    a replaced folder that an interrupted --overwrite left aside is named."""
    from jaxdistill.convert import OutFolderError, check_out, whole_folder

    out = tmp_path / "report"
    with pytest.raises(OutFolderError, match="not empty.*Nothing was lost: the new output is in .*report.new-"):
        with whole_folder(out, overwrite=False) as tmp:
            (tmp / "result.txt").write_text("hours of sampling")
            out.mkdir()
            (out / "other.txt").write_text("another run's")
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("report.new-")]
    assert len(kept) == 1 and (kept[0] / "result.txt").read_text() == "hours of sampling"
    assert [p.name for p in out.iterdir()] == ["other.txt"] and not list(tmp_path.glob(".report.*"))
    (tmp_path / ".report.x1.old" / "report").mkdir(parents=True)
    with whole_folder(out, overwrite=True) as tmp:
        (tmp / "result.txt").write_text("new")
    assert "note: " + str(tmp_path / ".report.x1.old") + " holds the report" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["result.txt"]
    monkeypatch.chdir(out)
    for folder in (".", tmp_path):
        with pytest.raises(OutFolderError, match="is the folder you are in, one above it or your home"):
            check_out(folder, overwrite=True)
    check_out(tmp_path / "fresh", overwrite=True)
    check_out(out / "sub", overwrite=True)
