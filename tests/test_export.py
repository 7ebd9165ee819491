"""Export: a trained student → a diffusers UNet folder or a complete SDXL pipeline folder that diffusers loads
and runs, weights equal to the checkpoint's per dtype, a model card; SSD-1B's asymmetric up path; refusals
that leave everything as it was. One tiny distillation run (2 steps, the tiny pipeline's UNet as teacher,
one layer pruned) is shared by the module."""

import json
import os
import re
import shutil
import subprocess
import sys

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
import yaml
from conftest import cpu_env
from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

from jaxdistill import abstract_params, count_params, load_unet, presets, save_unet
from jaxdistill.checkpoint import CheckpointError, load_checkpoint
from jaxdistill.config import base_config
from jaxdistill.convert import OutFolderError, read_safetensors, to_diffusers_state_dict
from jaxdistill.export import ExportError, export, main
from jaxdistill.prune import PrunePlan
from jaxdistill.reference import PIPELINE_UNET, write_random_pipeline
from jaxdistill.train import run

ENV = cpu_env()
KEPT = [1]  # of up_blocks.0.attentions.0's two layers


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return write_random_pipeline(tmp_path_factory.mktemp("teacher") / "sdxl")


@pytest.fixture(scope="module")
def workdir(pipeline, tmp_path_factory):
    """Distils a student (the teacher's UNet less one layer) for 2 steps, a checkpoint after each."""
    root = tmp_path_factory.mktemp("run")
    plan = root / "plan.json"
    PrunePlan(name="one-less", attentions={"up_blocks.0.attentions.0": KEPT}).save(plan)
    c = base_config()
    c.teacher, c.plan = str(pipeline), str(plan)
    c.batch_size, c.optimizer.accumulation, c.optimizer.lr = 2, 1, 1e-3
    c.precision.teacher = c.precision.student_compute = "float32"
    c.data.resolution, c.data.seq_len, c.data.num_examples = 32, 8, 4
    c.steps, c.log_every, c.checkpoint_every = 2, 1, 1
    run(c, root / "work")
    return root / "work"


@pytest.fixture(scope="module")
def ema_workdir(workdir, tmp_path_factory):
    """`workdir` as a run with EMA would have left it: its last checkpoint with EMA weights (2 × w + 1, easy to
    tell apart) beside the trained weights, its config with ema_decay > 0, and its finished stage folder
    holding the EMA weights. Returns (workdir, trained weights, EMA weights)."""
    import orbax.checkpoint as ocp

    root = tmp_path_factory.mktemp("ema_run")
    spec, params, meta = load_checkpoint(workdir)
    ema_params = jax.tree.map(lambda x: x * 2 + 1, params)
    meta = {k: v for k, v in meta.items() if k not in ("step", "checkpoint", "ema")}
    meta["config"]["ema_decay"] = 0.99
    manager = ocp.CheckpointManager((root / "checkpoints" / "main").absolute(), item_names=("state", "meta"))
    manager.save(2, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params, "ema_params": ema_params}),
                                            meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()
    manager.close()
    config = json.loads((workdir / "config.json").read_text())
    (root / "config.json").write_text(json.dumps(config | {"ema_decay": 0.99}))
    save_unet(root / "stages" / "main", spec, ema_params)
    marker = json.loads((workdir / "stages" / "main" / "jaxdistill_stage.json").read_text())
    marker["config"]["ema_decay"] = 0.99  # the config the stage trained with
    (root / "stages" / "main" / "jaxdistill_stage.json").write_text(json.dumps(marker))
    return root, to_diffusers_state_dict(params), to_diffusers_state_dict(ema_params)


def diffusers_state(folder, dtype=torch.float32) -> dict[str, np.ndarray]:
    model = UNet2DConditionModel.from_pretrained(folder, torch_dtype=dtype)
    return {k: v.float().numpy() if dtype == torch.bfloat16 else v.numpy() for k, v in model.state_dict().items()}


def test_unet_folder_from_a_checkpoint_equals_its_weights_per_dtype(workdir, tmp_path):
    spec, params, _ = load_checkpoint(workdir)
    want = to_diffusers_state_dict(params)
    out = export(workdir, tmp_path / "fp32", dtype="fp32")
    got = diffusers_state(out)
    assert set(got) == set(want)
    assert all(np.array_equal(got[k], want[k]) for k in want)  # fp32: exact

    out = export(workdir / "checkpoints" / "main", tmp_path / "fp16")  # fp16 is the default
    files = read_safetensors(out)
    assert all(files[k].dtype == np.float16 and np.array_equal(files[k], want[k].astype(np.float16)) for k in want)
    got = diffusers_state(out, torch.float16)
    assert all(np.array_equal(got[k], want[k].astype(np.float16)) for k in want)

    out = export(workdir / "checkpoints" / "main" / "2", tmp_path / "bf16", dtype="bf16")
    files = read_safetensors(out)
    assert all(np.array_equal(files[k].view(np.uint16), want[k].astype(ml_dtypes.bfloat16).view(np.uint16))
               for k in want)
    got = diffusers_state(out, torch.bfloat16)
    assert all(np.array_equal(got[k], want[k].astype(ml_dtypes.bfloat16).astype(np.float32)) for k in want)

    facts = json.loads((out / "jaxdistill_export.json").read_text())
    assert facts["params"] == count_params(spec) and facts["teacher_params"] == count_params(PIPELINE_UNET)
    assert facts["params_ratio"] == pytest.approx(count_params(spec) / count_params(PIPELINE_UNET))
    assert (facts["stage"], facts["step"], facts["ema"], facts["dtype"]) == ("main", 2, False, "bf16")
    assert facts["kept_layers"]["up_blocks.0.attentions.0"] == KEPT and facts["plan"].endswith("plan.json")
    assert facts["architecture"]["transformer_depths"] == {"down": [[0], [2]], "mid": 2, "up": [[1, 2], [0, 0]]}
    assert facts["training"]["lr"] == 1e-3 and facts["training"]["resolution"] == 32
    assert facts["training"]["loss_weights"]["output"] == 0.5
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out / "config.json").st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_pipeline_from_the_command_line_loads_and_generates(workdir, pipeline, tmp_path):
    out = tmp_path / "student-pipeline"
    result = subprocess.run([sys.executable, "-m", "jaxdistill.export", "--checkpoint", str(workdir), "--out",
                             str(out), "--pipeline-from", str(pipeline)], capture_output=True, text=True, env=ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "SDXL pipeline" in result.stdout and not list(tmp_path.glob(".*"))  # no temporary folder left
    for component in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        for f in (pipeline / component).iterdir():  # copied byte for byte
            assert (out / component / f.name).read_bytes() == f.read_bytes()
    assert not list(out.rglob("*.bin"))

    pipe = StableDiffusionXLPipeline.from_pretrained(out, torch_dtype=torch.float32)
    assert pipe.unet.config.reverse_transformer_layers_per_block == [[1, 2], 1]
    images = pipe("a photo of the moon", height=32, width=32, num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()

    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "diffusers" and front["tags"] == ["stable-diffusion-xl", "text-to-image",
                                                                      "distillation"]
    assert "base_model" not in front  # the teacher is a local folder, not a Hub id
    spec, _, _ = load_checkpoint(workdir)
    assert f"{count_params(spec):,}" in card and f"{count_params(PIPELINE_UNET):,}" in card
    assert "StableDiffusionXLPipeline.from_pretrained" in card and "VAE is kept as the teacher pipeline ships" in card
    assert "up_blocks.0.attentions.0" in card and "fp16" in card


def test_reexport_of_a_finished_stage_keeps_weights_and_facts(workdir, tmp_path):
    _, params, _ = load_checkpoint(workdir)  # no EMA: the stage folder holds the last step's weights
    out = export(workdir / "stages" / "main", tmp_path / "again", dtype="fp32", base_model="org/sdxl-teacher")
    got, want = diffusers_state(out), to_diffusers_state_dict(params)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    facts = json.loads((out / "jaxdistill_export.json").read_text())
    assert (facts["stage"], facts["step"], facts["ema"]) == ("main", 2, False)
    assert facts["training"]["batch_size"] == 2 and facts["agreement"]["after"] >= 0
    assert facts["teacher_params"] == count_params(PIPELINE_UNET)
    assert yaml.safe_load((out / "README.md").read_text().split("---")[1])["base_model"] == "org/sdxl-teacher"
    # An export is itself a UNet folder: exporting it again carries its facts forward.
    facts2 = json.loads((export(out, tmp_path / "third") / "jaxdistill_export.json").read_text())
    assert facts2["training"] == facts["training"] and facts2["base_model"] == "org/sdxl-teacher"


def test_the_weights_follow_the_run_unless_asked(ema_workdir, tmp_path):
    """A run with EMA hands on its EMA weights (its stage folder, the next stage's teacher): export takes them
    by default too; --no-ema takes the trained weights; the facts and the card say which were taken."""
    root, trained, ema = ema_workdir
    for name, kwargs, want, taken in (("default", {}, ema, True), ("ema", {"ema": True}, ema, True),
                                      ("trained", {"ema": False}, trained, False)):
        out = export(root, tmp_path / name, dtype="fp32", **kwargs)
        got = read_safetensors(out)
        assert all(np.array_equal(got[k], want[k]) for k in want), name
        assert json.loads((out / "jaxdistill_export.json").read_text())["ema"] is taken
        card = (out / "README.md").read_text()
        assert ("| weights | EMA of the trained weights |" if taken else "| weights | the trained weights (no EMA) |"
                ) in card
    assert main(["--checkpoint", str(root), "--out", str(tmp_path / "cli"), "--dtype", "fp32", "--no-ema"]) == 0
    got = read_safetensors(tmp_path / "cli")
    assert all(np.array_equal(got[k], trained[k]) for k in trained)
    assert json.loads((tmp_path / "cli" / "jaxdistill_export.json").read_text())["ema"] is False
    # the stage folder holds the EMA weights: that is what its export says, and --no-ema cannot be had from it
    stage = export(root / "stages" / "main", tmp_path / "stage", dtype="fp32")
    assert json.loads((stage / "jaxdistill_export.json").read_text())["ema"] is True
    with pytest.raises(ExportError, match="--no-ema: .* holds EMA weights"):
        export(root / "stages" / "main", tmp_path / "stage-trained", ema=False)


def test_the_model_card_claims_only_what_is_known():
    """A pruned student never trained, a UNet folder of unknown making, a student trained without a teacher:
    the card says so, and names no teacher it does not know."""
    from jaxdistill.export import Student, describe, model_card

    kept = {"up_blocks.0.attentions.0": KEPT}
    cases = {
        "pruned": ({"source": "pruned", "plan": "one-less", "kept_layers": kept},
                   "A pruned Stable Diffusion XL UNet, not trained by jaxdistill (pruned only),",
                   "| teacher | unknown |"),
        "foreign": ({"source": "unet"}, "A Stable Diffusion XL-family UNet of unknown making (no jaxdistill training "
                    "record),", "| teacher | unknown |"),
        "no teacher": ({"source": "run", "step": 5, "plan": "one-less", "kept_layers": kept},
                       "A pruned Stable Diffusion XL UNet, trained by jaxdistill without a teacher,",
                       "| teacher | none (trained without a teacher) |"),
        "distilled": ({"source": "run", "step": 5, "teacher": "/models/sdxl"},
                      "A distilled Stable Diffusion XL UNet, exported", "| teacher | /models/sdxl |"),
    }
    for name, (prov, opening, teacher) in cases.items():
        card = model_card(describe(Student(PIPELINE_UNET, {}, prov), "fp32"))
        assert opening in card and teacher in card, (name, card)
        assert ("- distillation" in card) is (name == "distilled"), name
        if prov.get("kept_layers"):
            assert "Kept from the pruned teacher (its layer indices):" in card, name


def test_an_ssd1b_shaped_student_keeps_its_asymmetric_up_path(pipeline, tmp_path):
    spec = presets.tiny(presets.SSD_1B).replace(cross_attention_dim=80,
                                                projection_class_embeddings_input_dim=40 + 6 * 8)
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(np.float32), abstract_params(spec))
    save_unet(tmp_path / "ssd1b", spec, params)
    out = export(tmp_path / "ssd1b", tmp_path / "out", pipeline_from=pipeline)
    config = json.loads((out / "unet" / "config.json").read_text())
    assert config["reverse_transformer_layers_per_block"] == [[4, 4, 10], [2, 1, 1], 1]
    unet = StableDiffusionXLPipeline.from_pretrained(out).unet
    assert [[len(a.transformer_blocks) for a in b.attentions] for b in unet.up_blocks[:2]] == [[4, 4, 10], [2, 1, 1]]
    assert type(unet.mid_block).__name__ == "UNetMidBlock2D"
    card = (out / "README.md").read_text()
    assert f"{count_params(spec):,}" in card and "[[4, 4, 10], [2, 1, 1], [0, 0, 0]]" in card


def test_refusals_leave_everything_as_it_was(workdir, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="does not exist"):
        export(tmp_path / "nowhere", out)
    with pytest.raises(CheckpointError, match="no EMA weights"):
        export(workdir, out, ema=True)
    copy = shutil.copytree(workdir / "checkpoints" / "main", tmp_path / "copy")
    (copy / "2" / "_CHECKPOINT_METADATA").unlink()  # as if the run stopped while writing step 2
    with pytest.raises(CheckpointError, match="incomplete"):
        export(copy / "2", out)
    damaged = [f for f in (copy / "1" / "state").rglob("*") if f.is_file() and f.stat().st_size > 0]
    for f in damaged:
        f.unlink()
    with pytest.raises(CheckpointError, match="cannot read"):
        export(copy / "1", out)
    assert not out.exists()

    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    with pytest.raises(OutFolderError, match="not empty.*--overwrite"):
        export(workdir, out)
    with pytest.raises(CheckpointError):
        export(tmp_path / "nowhere", out, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and (out / "mine.txt").read_text() == "keep me"
    assert main(["--checkpoint", str(workdir), "--out", str(out)]) == 2
    for source, target in ((workdir, workdir), (workdir / "stages" / "main", workdir / "stages")):
        with pytest.raises(OutFolderError, match="which is read to make it"):  # --overwrite would delete the source
            export(source, target, overwrite=True)
    export(workdir, out, overwrite=True)
    assert not (out / "mine.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy", "out"]  # nothing half-written beside it


@pytest.mark.parametrize("damage, message", [
    ("text_encoder_2 wider", "cross_attention_dim is 80, the text encoders give 32 \\+ 64 = 96"),
    ("pooled narrower", "projection_class_embeddings_input_dim is 88, .* pooled 24"),
    ("no tokenizer_2", "lacks tokenizer_2/"),
    ("pickled text encoder", "only pickled weights \\(pytorch_model.bin\\)"),
    ("fp16 variant only", "text_encoder/ has only variant weights \\(model.fp16.safetensors\\)"),
    ("truncated model_index.json", "cannot read .*model_index.json \\(Unterminated string"),
])
def test_a_pipeline_that_does_not_fit_is_refused(workdir, pipeline, tmp_path, damage, message, monkeypatch):
    import jaxdistill.export

    # refused from the configs and the checkpoint's record, before the weights are read
    monkeypatch.setattr(jaxdistill.export, "load_student", lambda *a, **k: pytest.fail("weights read first"))
    broken = shutil.copytree(pipeline, tmp_path / "broken")
    te2 = broken / "text_encoder_2" / "config.json"
    if damage == "text_encoder_2 wider":
        te2.write_text(json.dumps(json.loads(te2.read_text()) | {"hidden_size": 64}))
    elif damage == "pooled narrower":
        te2.write_text(json.dumps(json.loads(te2.read_text()) | {"projection_dim": 24}))
    elif damage == "no tokenizer_2":
        shutil.rmtree(broken / "tokenizer_2")
    elif damage == "truncated model_index.json":
        index = broken / "model_index.json"
        index.write_text(index.read_text()[:40])
    else:
        name = "pytorch_model.bin" if damage == "pickled text encoder" else "model.fp16.safetensors"
        (broken / "text_encoder" / "model.safetensors").rename(broken / "text_encoder" / name)
    with pytest.raises(ExportError, match=message):
        export(workdir, tmp_path / "out", pipeline_from=broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken"]


def test_a_variant_export_loads_as_diffusers_loads_variants(workdir, pipeline, tmp_path, capsys):
    """--variant fp16: the UNet as diffusion_pytorch_model.fp16.safetensors, each component's fp16 files where it
    has them (else its plain ones), one set each; the teacher's license goes on the card, its LICENSE is copied."""
    from safetensors.numpy import load_file, save_file

    teacher = shutil.copytree(pipeline, tmp_path / "teacher")
    plain = teacher / "text_encoder" / "model.safetensors"
    save_file({k: v.astype(np.float16) for k, v in load_file(plain).items()},
              teacher / "text_encoder" / "model.fp16.safetensors", metadata={"format": "pt"})
    (teacher / "README.md").write_text("---\nlicense: other\nlicense_name: sdxl-community\nlicense_link: LICENSE.md\n"
                                       "library_name: diffusers\n---\n# teacher\n")
    (teacher / "LICENSE.md").write_text("the teacher's license\n")

    out = tmp_path / "fp16"
    assert main(["--checkpoint", str(workdir), "--out", str(out), "--pipeline-from", str(teacher),
                 "--variant", "fp16"]) == 0
    printed = capsys.readouterr().out
    step = workdir / "checkpoints" / "main" / "2"
    assert f"(stage main, step 2, the trained weights (no EMA)) from {step}" in printed
    assert sorted(p.name for p in (out / "unet").iterdir()) == ["config.json",
                                                                "diffusion_pytorch_model.fp16.safetensors"]
    assert [p.name for p in (out / "text_encoder").glob("*.safetensors")] == ["model.fp16.safetensors"]
    assert [p.name for p in (out / "vae").glob("*.safetensors")] == ["diffusion_pytorch_model.safetensors"]
    assert (out / "LICENSE.md").read_text() == "the teacher's license\n"
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert (front["license"], front["license_name"], front["license_link"]) == ("other", "sdxl-community", "LICENSE.md")
    assert 'variant="fp16"' in card
    pipe = StableDiffusionXLPipeline.from_pretrained(out, variant="fp16", torch_dtype=torch.float32)
    fp16 = load_file(out / "text_encoder" / "model.fp16.safetensors")
    embedding = next(v for k, v in fp16.items() if k.endswith("token_embedding.weight"))
    assert np.array_equal(pipe.text_encoder.get_input_embeddings().weight.detach().numpy(), embedding)
    with pytest.raises(OSError, match="no file named"):  # named as diffusers names variants: plain loads miss it
        UNet2DConditionModel.from_pretrained(out / "unet")

    # no variant: the plain files only (the fp16 copy is not carried along); --license wins over the card's
    out = export(workdir, tmp_path / "plain", pipeline_from=teacher, license="other")
    assert [p.name for p in (out / "text_encoder").glob("*.safetensors")] == ["model.safetensors"]
    assert yaml.safe_load((out / "README.md").read_text().split("---")[1])["license"] == "other"
    # a teacher with only fp16 text-encoder weights: refused without --variant, saying which to give
    plain.unlink()
    with pytest.raises(ExportError, match="only variant weights \\(model.fp16.safetensors\\).*--variant fp16"):
        export(workdir, tmp_path / "refused", pipeline_from=teacher)
    export(workdir, tmp_path / "fp16-only", pipeline_from=teacher, variant="fp16")
    # another variant: our own loader reads it back (it looked for plain and fp16 names only)
    out = export(workdir, tmp_path / "bf16", dtype="bf16", variant="bf16")
    spec, params = load_unet(out)
    assert [p.name for p in out.glob("*.safetensors")] == ["diffusion_pytorch_model.bf16.safetensors"]
    assert spec == load_checkpoint(workdir)[0] and str(jax.tree.leaves(params)[0].dtype) == "bfloat16"
    for kwargs, message in [(dict(variant="fp.16"), "--variant 'fp.16': expected a plain name"),
                            (dict(base_model="../my sdxl"), "--base-model '../my sdxl': expected a Hub id")]:
        with pytest.raises(ExportError, match=re.escape(message)):
            export(workdir, tmp_path / "refused", **kwargs)


def test_out_inside_a_source_and_other_paths(workdir, pipeline, tmp_path, monkeypatch, capsys):
    """--out inside a component of the pipeline read (its vae/, unet/) is refused, --overwrite or not; a
    workdir holding an export in unet/ is still read as the run; --out . works; unreadable configs are named."""
    teacher = shutil.copytree(pipeline, tmp_path / "teacher")
    vae = sorted(p.name for p in (teacher / "vae").iterdir())
    with pytest.raises(OutFolderError, match="is inside .*teacher/vae, which is read to make it"):
        export(workdir, teacher / "vae", pipeline_from=teacher, overwrite=True)
    with pytest.raises(OutFolderError, match="is inside .*teacher/unet, which is read to make it"):
        export(teacher, teacher / "unet", overwrite=True)
    export(workdir, teacher / "students" / "one", pipeline_from=teacher)  # a new folder beside its parts is fine
    assert sorted(p.name for p in (teacher / "vae").iterdir()) == vae

    run_copy = shutil.copytree(workdir, tmp_path / "work")
    export(run_copy, run_copy / "unet", stage="main")  # a new subfolder of a workdir is fine
    out = export(run_copy, tmp_path / "again")
    facts = json.loads((out / "jaxdistill_export.json").read_text())
    assert (facts["stage"], facts["step"]) == ("main", 2)  # the run, not the export in its unet/

    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    assert main(["--checkpoint", str(workdir), "--out", "."]) == 0
    # filled in place: the folder the command ran in is still there (replaced, it left the shell in a deleted one)
    assert (here / "config.json").is_file() and not list(tmp_path.glob(".here.*")) and os.path.samefile(".", here)
    assert main(["--checkpoint", str(workdir), "--out", ".", "--overwrite"]) == 2  # the folder it runs in, whole
    assert "is the folder you are in" in capsys.readouterr().err and (here / "config.json").is_file()
    # an unfinished newer step is named
    (run_copy / "checkpoints" / "main" / "3").mkdir()
    assert main(["--checkpoint", str(run_copy), "--out", str(tmp_path / "newest")]) == 0
    assert "newer step folders 3 are unfinished" in capsys.readouterr().out

    (teacher / "text_encoder" / "config.json").write_bytes(bytes(range(200, 256)) * 4)
    with pytest.raises(ExportError, match="cannot read .*text_encoder/config.json"):
        export(workdir, tmp_path / "x", pipeline_from=teacher)
    (teacher / "unet" / "config.json").write_text('{"_class_name": "UNet2DCondition')
    with pytest.raises(ExportError, match="cannot read .*unet/config.json"):
        export(teacher, tmp_path / "x")


def test_a_progressive_stage_names_the_stage_before_and_the_first_teacher(tmp_path, monkeypatch):
    """A stage distilled from "previous": the card names that stage's student and the run's first teacher,
    whose Hub id becomes base_model when it has one."""
    from jaxdistill import presets
    from jaxdistill.config import base_config
    from jaxdistill.export import Student, describe, model_card

    c = base_config()
    c.stages = [dict(name="a", teacher="org/sdxl", plan="ssd1b", steps=2),
                dict(name="b", teacher="previous", plan="vega", steps=2)]
    (tmp_path / "config.json").write_text(c.to_json_best_effort())
    (tmp_path / "stages" / "a").mkdir(parents=True)  # stage a's student: its config is enough to count it
    stage_a = presets.tiny(presets.SSD_1B)
    (tmp_path / "stages" / "a" / "config.json").write_text(json.dumps(stage_a.to_diffusers_config()))
    monkeypatch.chdir(tmp_path.parent)  # the workdir given relative: the card still names the folder in full
    prov = {"source": str(tmp_path / "stages" / "b"), "stage": "b", "teacher": "previous", "workdir": tmp_path.name}
    facts = describe(Student(presets.tiny(presets.VEGA), {}, prov), "fp32")
    assert facts["teacher"] == f"stage a's student ({tmp_path / 'stages' / 'a'})"
    assert facts["teacher_params"] == count_params(stage_a)
    # The trainer reads teachers from folders only: "org/sdxl" was a relative path there, not a Hub id
    assert facts["first_teacher"] == "org/sdxl" and facts["base_model"] is None
    card = model_card(facts)
    assert "| first stage's teacher | org/sdxl |" in card and "base_model" not in card
    # a teacher read from the Hugging Face cache names its Hub id
    cached = "/home/me/.cache/huggingface/hub/models--stabilityai--stable-diffusion-xl-base-1.0/snapshots/462165"
    c.stages[0]["teacher"] = cached
    (tmp_path / "config.json").write_text(c.to_json_best_effort())
    facts = describe(Student(presets.tiny(presets.VEGA), {}, prov), "fp32")
    assert facts["first_teacher"] == cached and facts["base_model"] == "stabilityai/stable-diffusion-xl-base-1.0"
    assert "base_model: stabilityai/stable-diffusion-xl-base-1.0" in model_card(facts)


def test_a_missing_stage_or_step_names_those_there_are(tmp_path, capsys):
    """--stage or --checkpoint naming a stage or step the workdir lacks: refused, listing the finished ones.
    The checkpoints are only their folders, as orbax marks them finished: nothing is read from them."""
    work = tmp_path / "work"
    for stage, steps in (("teacher", (20,)), ("ssd1b", (50, 100, 150))):
        for step in steps:
            (work / "checkpoints" / stage / str(step)).mkdir(parents=True)
            (work / "checkpoints" / stage / str(step) / "_CHECKPOINT_METADATA").write_text("{}")
    (work / "checkpoints" / "ssd1b" / "200").mkdir()  # unfinished: not offered
    (work / "config.json").write_text(base_config().to_json_best_effort())
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match="--stage bogus: .*; stages in .*checkpoints: ssd1b, teacher$"):
        export(work, out, stage="bogus")
    with pytest.raises(CheckpointError, match="999 does not exist; finished steps in .*ssd1b: 50, 100, 150$"):
        export(work / "checkpoints" / "ssd1b" / "999", out)
    assert main(["--checkpoint", str(work / "checkpoints" / "bogus"), "--out", str(out)]) == 2
    assert "does not exist; stages in" in capsys.readouterr().err and not out.exists()


def test_commands_say_how_they_are_run_and_parity_refuses_a_missing_unet(tmp_path, capsys):
    import importlib

    for name in ("sample", "evaluate", "export", "parity", "prune", "prepare"):
        with pytest.raises(SystemExit):
            importlib.import_module(f"jaxdistill.{name}").main(["--help"])
        assert capsys.readouterr().out.startswith(f"usage: python -m jaxdistill.{name} "), name
    from jaxdistill import parity

    with pytest.raises(SystemExit) as info:  # was a FileNotFoundError traceback
        parity.main(["--unet", str(tmp_path / "nope")])
    assert info.value.code == 2
    assert f"--unet: {tmp_path / 'nope'} is not a diffusers UNet folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # was a traceback (no --unet) or blamed on --unet
        parity.main(["--size", "6"])
    assert info.value.code == 2
    assert "--size 6: this UNet downsamples 4×" in capsys.readouterr().err
