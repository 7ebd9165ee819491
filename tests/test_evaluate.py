"""Evaluation: SSIM equal to scikit-image's Gaussian SSIM, PSNR by hand, the report files, and the
evaluate command comparing a student with its teacher on a tiny pipeline."""

import csv
import json
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import cpu_env
from PIL import Image
from skimage.metrics import structural_similarity

from jaxdistill.evaluate import Evaluation, psnr, ssim, write_report
from jaxdistill.sample import read_prompts

ENV = cpu_env()


def _pair(seed, noise):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (40, 56, 3)).astype(np.uint8)
    return a, np.clip(a + rng.normal(0, noise, a.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("noise", [5.0, 40.0])
def test_ssim_equals_scikit_image(noise):
    a, b = _pair(int(noise), noise)
    reference = structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                      data_range=255, channel_axis=-1)
    assert abs(ssim(a, b) - reference) < 1e-12
    assert ssim(a, a) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="window"):  # scikit-image refuses these too
        ssim(a[:10], b[:10])


def test_psnr_by_hand():
    a, b = _pair(0, 10.0)
    mse = np.mean((a.astype(float) - b.astype(float)) ** 2)
    assert psnr(a, b) == pytest.approx(10 * np.log10(255 ** 2 / mse))
    assert psnr(a, a) == float("inf")


def test_report_files(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 16, 16, 3)).astype(np.uint8)
    rows = [{"prompt": f"p{i} | q", "seed": i, "latent_mse": 0.1 * i, "latent_rel_mse": 0.01 * i, "psnr": 20.0 + i,
             "ssim": 0.5} for i in range(2)]
    evaluation = Evaluation(rows, images[:2], images[2:])
    assert evaluation.means()["psnr"] == 20.5
    out = write_report(evaluation, tmp_path / "report", {"steps": 3})
    with open(out / "metrics.csv") as f:
        assert [r["prompt"] for r in csv.DictReader(f)] == ["p0 | q", "p1 | q"]
    table = [line for line in (out / "metrics.md").read_text().splitlines() if line.startswith("|")]
    assert "**mean**" in table[-1]
    # a | in a prompt is escaped: every row has the header's columns
    assert {len(re.split(r"(?<!\\)\|", line)) for line in table} == {len(rows[0]) + 2}
    assert json.loads((out / "summary.json").read_text())["means"]["psnr"] == 20.5
    assert (out / "grid.png").stat().st_size > 0


def test_means_leave_out_nan_images_and_identical_pairs(monkeypatch, tmp_path):
    """A student's NaN image is black: its PSNR / SSIM against the teacher looked like real figures. Its row is
    NaN now, left out of the means and named; one identical pair (PSNR inf) no longer makes the mean inf."""
    from jaxdistill import evaluate, sample

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 16, 16, 3)).astype(np.uint8)
    latents = rng.normal(size=(2, 2, 2, 4)).astype(np.float32)
    teacher = sample.SampleOutput(images, latents, images / 255.0, np.array([True, True]))
    student = sample.SampleOutput(images[::-1].copy(), latents * 1.1, images / 255.0, np.array([True, False]))

    class Pipe:
        def check_size(self, height, width):
            return 16, 16

    monkeypatch.setattr(sample, "generate", lambda *args, **kwargs: student)
    result = evaluate.compare(Pipe(), Pipe(), ["a cat"], [0, 1], teacher_output=teacher)
    assert np.isfinite([result.rows[0][k] for k in evaluate.METRICS]).all()
    assert np.isnan([result.rows[1][k] for k in evaluate.METRICS]).all()
    assert result.means() == {k: result.rows[0][k] for k in evaluate.METRICS}
    assert result.notes() == ["1 of 2 student images hold NaN or Inf (diverged weights, or overflow in this dtype): "
                              "their rows' figures are NaN, left out of the means ('a cat' seed 1)"]
    summary = _strict_json(write_report(result, tmp_path / "nan") / "summary.json")
    assert summary["non_finite"] == {"teacher": [], "student": [1]} and summary["rows"][1]["psnr"] is None
    rows = [{"prompt": "p", "seed": s, "latent_mse": 0.0, "latent_rel_mse": 0.0, "psnr": v, "ssim": 1.0}
            for s, v in enumerate((float("inf"), 12.0))]
    identical = Evaluation(rows, images, images)
    assert identical.means()["psnr"] == 12.0
    assert identical.notes() == ["1 of 2 image pairs are identical (PSNR inf): left out of the PSNR mean"]


def test_prompt_files(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("# comment\na cat\n\n  a dog  \n")
    assert read_prompts(path) == ["a cat", "a dog"]
    path.write_bytes("\ufeff# a file a Windows editor wrote\r\na cat\r\n".encode())  # BOM and CRLF
    assert read_prompts(path) == ["a cat"]
    path.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(path)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    from jaxdistill.reference import write_random_pipeline

    return write_random_pipeline(tmp_path_factory.mktemp("pipeline") / "sdxl")


def _strict_json(path):
    def refuse(constant):
        raise AssertionError(f"{path}: {constant} is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_evaluate_command_compares_a_student_with_its_teacher(pipeline, tmp_path):
    """The teacher against a copy of itself is perfect (latent MSE 0, SSIM 1, PSNR inf: null in strict JSON);
    a perturbed student is not. The student's config names another sample size: both sample at the
    teacher's. Chunks of 3 for 4 image pairs (the last chunk padded). --overwrite replaces an earlier report
    as a whole: none of its files stays among the new ones."""
    import dataclasses
    import shutil

    from jaxdistill import load_unet, save_unet

    spec, params = load_unet(pipeline)
    copy = shutil.copytree(pipeline / "unet", tmp_path / "copy")  # the same folder twice is refused
    noisy = {k: v for k, v in params.items()}
    noisy["conv_out"] = {k: v + 0.05 for k, v in params["conv_out"].items()}
    student = save_unet(tmp_path / "student", dataclasses.replace(spec, sample_size=spec.sample_size // 2), noisy)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red square\na blue circle\na red square\n")  # a repeat is the same images: left out
    common = ["--teacher", str(pipeline), "--prompts", str(prompts), "--seeds", "0,3,3", "--steps", "3",
              "--batch-size", "3"]
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "old_metrics.csv").write_text("an earlier report's\n")
    for name, model, extra in (("self", str(copy), ["--height", "32", "--width", "48", "--dtype", "bfloat16"]),
                               ("report", str(student), ["--overwrite", "--scheduler", "dpm-karras"])):
        result = subprocess.run([sys.executable, "-m", "jaxdistill.evaluate", "--student", model, *common, *extra,
                                 "--out", str(tmp_path / name)], capture_output=True, text=True, env=ENV)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "1 repeated prompts left out" in result.stderr and "1 repeated seeds left out" in result.stderr
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == [
        "grid.png", "metrics.csv", "metrics.md", "summary.json"]
    same = _strict_json(tmp_path / "self" / "summary.json")
    different = _strict_json(tmp_path / "report" / "summary.json")
    assert len(same["rows"]) == 4 and {r["seed"] for r in same["rows"]} == {0, 3}
    assert same["means"]["latent_mse"] == 0 and same["means"]["ssim"] == pytest.approx(1.0)
    assert same["means"]["psnr"] is None and same["rows"][0]["psnr"] is None
    assert different["means"]["latent_rel_mse"] > 1e-4 and different["means"]["ssim"] < 1.0
    assert same["scheduler"] == "euler" and different["scheduler"] == "dpm-karras"  # the pipeline's own; as asked
    assert (same["dtype"], different["dtype"]) == ("bfloat16", "float32")
    assert same["notes"] == ["4 of 4 image pairs are identical (PSNR inf): left out of the PSNR mean"]
    assert (same["height"], same["width"], same["seeds"]) == (32, 48, [0, 3]) and same["pipeline"] == str(pipeline)
    assert (tmp_path / "report" / "grid.png").is_file()
    teacher_size = spec.sample_size * 2  # the tiny VAE's factor
    assert Image.open(tmp_path / "report" / "grid.png").size[1] > 4 * teacher_size


def test_evaluate_command_refuses_bad_input_before_sampling(pipeline, tmp_path, capsys, monkeypatch):
    """Argparse errors (exit 2) that name the problem, and nothing written; sampling that runs out of device
    memory ends with one line saying what to change (exit 1), nothing written."""
    import shutil

    import jax

    from jaxdistill import sample
    from jaxdistill.evaluate import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    student = shutil.copytree(pipeline / "unet", tmp_path / "student")
    common = ["--student", str(student), "--teacher", str(pipeline), "--prompts", str(prompts)]
    for args, reason in [(["--seeds", ","], "no seeds"), (["--seeds", str(2 ** 32)], "seeds are integers"),
                         (["--seeds", "0,a"], "argument --seeds: '0,a': expected comma-separated integers"),
                         (["--prompts", str(tmp_path / "none.txt")], "--prompts: cannot read"),
                         # the teacher is a UNet folder: the VAE and text encoders come from --pipeline
                         (["--teacher", str(pipeline / "unet")], "not a whole pipeline: give the SDXL pipeline "
                                                                  "folder whose VAE, text encoders and scheduler to "
                                                                  "use (--pipeline DIR"),
                         (["--steps", "0"], "--steps must be"), (["--height", "30"], "multiple of 4"),
                         (["--height", "8", "--width", "8"], "smaller than SSIM's 11×11 window"),
                         (["--teacher", str(tmp_path / "nothing")], "does not exist"),
                         (["--clip", str(tmp_path / "no-clip")], "no-clip"),
                         (["--steps", "1001"], "expected 1 … 1000"),
                         (["--ema"], "not known to be EMA weights")]:  # a folder has one set of weights
        with pytest.raises(SystemExit) as info:
            main([*common, *args, "--out", str(tmp_path / "out")])
        assert info.value.code == 2 and reason in capsys.readouterr().err, args
    assert not (tmp_path / "out").exists()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "summary.json").write_text("{}")  # an earlier report: kept unless --overwrite
    with pytest.raises(SystemExit) as info:
        main([*common, "--out", str(tmp_path / "out")])
    assert info.value.code == 2 and "not empty; choose another folder or add --overwrite" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["summary.json"]

    def too_big(*args, **kwargs):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 9.00GiB. [tag]")

    monkeypatch.setattr(sample, "generate", too_big)
    with pytest.raises(SystemExit) as info:
        main([*common, "--batch-size", "2", "--out", str(tmp_path / "oom")])
    err = capsys.readouterr().err
    assert info.value.code == 1 and "error: sampling" in err and "does not fit the device's memory" in err
    assert "a smaller --batch-size (now 2" in err and "--dtype bfloat16" in err and "9.00GiB" in err
    assert "[tag]" not in err and not (tmp_path / "oom").exists()


def test_evaluate_refuses_a_student_compared_with_itself(pipeline, tmp_path, capsys):
    """The same folder, the same checkpoint with the same weights chosen (--ema or not, or as the run hands
    them on), or a finished stage's folder and its last checkpoint, as student and teacher: refused before
    anything loads, naming the teacher the run records (for a progressive stage, the stage before's folder).
    The checkpoints here are only their folders: nothing is read from them."""
    from jaxdistill.config import base_config
    from jaxdistill.evaluate import main
    from jaxdistill.train import STAGE_MARKER

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    run = tmp_path / "run"
    c = base_config()
    c.ema_decay = 0.999
    c.stages = [dict(name="teacher", teacher=str(pipeline), steps=2), dict(name="ssd1b", teacher="previous", steps=4)]
    (run / "checkpoints" / "ssd1b" / "4").mkdir(parents=True)
    (run / "checkpoints" / "ssd1b" / "4" / "_CHECKPOINT_METADATA").write_text("{}")
    (run / "config.json").write_text(c.to_json_best_effort())
    stage = run / "stages" / "ssd1b"  # the finished stage: a UNet folder beside its marker
    stage.mkdir(parents=True)
    shutil.copy(pipeline / "unet" / "config.json", stage / "config.json")
    (stage / STAGE_MARKER).write_text(json.dumps({"stage": "ssd1b", "steps": 4, "teacher": "previous"}))
    common = ["--prompts", str(prompts), "--pipeline", str(pipeline), "--out", str(tmp_path / "out")]
    cases = [(pipeline, pipeline, "Give the teacher it was distilled from: --teacher (its SDXL pipeline"),
             (pipeline / "unet", pipeline, "same weights"),  # a pipeline's UNet is its unet/ folder
             (run, run, f"--teacher {run / 'stages' / 'teacher'} (as its run records it)"),
             (run / "checkpoints" / "ssd1b", run, "same weights"),  # the run's latest checkpoint
             (stage, run, "same weights"), (run, stage, "same weights")]  # the stage is its last checkpoint
    for student, teacher, reason in cases:
        with pytest.raises(SystemExit) as info:
            main(["--student", str(student), "--teacher", str(teacher), *common])
        err = capsys.readouterr().err
        assert info.value.code == 2 and "would be compared with itself" in err and reason in err, err
    # --ema asks for what the run hands on anyway (it kept EMA weights)
    with pytest.raises(SystemExit):
        main(["--student", str(run), "--ema", "--teacher", str(stage), *common])
    assert "would be compared with itself" in capsys.readouterr().err
    # the trained weights against the weights the run hands on (its EMA weights when it kept them): allowed
    with pytest.raises(SystemExit):
        main(["--student", str(run), "--no-ema", "--teacher", str(run), *common])
    err = capsys.readouterr().err
    assert "compared with itself" not in err and "cannot read checkpoint" in err, err  # no weights in this one
    c.ema_decay = 0.0  # a run without EMA hands on its trained weights: --no-ema names the same ones
    (run / "config.json").write_text(c.to_json_best_effort())
    with pytest.raises(SystemExit):
        main(["--student", str(run), "--no-ema", "--teacher", str(run), *common])
    assert "would be compared with itself" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_training_writes_a_validation_grid_and_agreement(pipeline, tmp_path):
    from jaxdistill.config import base_config
    from jaxdistill.prune import PrunePlan
    from jaxdistill.train import run

    plan = tmp_path / "plan.json"
    PrunePlan(name="test", attentions={"up_blocks.0.attentions.0": [1]}).save(plan)
    c = base_config()
    c.teacher, c.plan = str(pipeline), str(plan)
    c.batch_size, c.optimizer.accumulation, c.optimizer.lr = 2, 1, 1e-3
    c.precision.teacher = c.precision.student_compute = "float32"
    c.data.resolution, c.data.seq_len, c.data.num_examples = 32, 8, 4
    c.steps, c.log_every, c.checkpoint_every = 3, 1, 2
    c.eval.every, c.eval.steps, c.eval.prompts, c.eval.seeds = 1, 2, ["a cat"], [0, 1]
    # a validation that cannot write its grid (on a multi-host run, process 0's disk) stops the run (every host
    # stops with it: they meet in one collective after each validation), saving its step first, though step 1
    # is not a checkpoint step; once mended, the same command resumes there and validates every step after it
    blocked = tmp_path / "run" / "samples" / "main" / "validation_0000001.png"
    blocked.mkdir(parents=True)
    with pytest.raises(ValueError, match="IsADirectoryError") as info:
        run(c, tmp_path / "run")
    assert "the checkpoint of step 1 is saved" in str(info.value) and "eval.every=0" in str(info.value)
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "main").iterdir()) == ["1"]
    blocked.rmdir()
    assert run(c, tmp_path / "run")["main"]["steps"] == 3
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [line for line in lines if "eval/ssim" in line]
    assert [line["step"] for line in evals] == [2, 3]
    assert all(0 < line["eval/agreement"] and line["eval/ssim"] <= 1 for line in evals)
    assert sorted(p.name for p in (tmp_path / "run" / "samples" / "main").iterdir()) == [
        "validation_0000002.png", "validation_0000003.png"]


def test_validation_holds_its_models_where_the_trainer_places_them(pipeline, monkeypatch):
    """The trainer places the validation's VAE, text encoders and teacher UNet on its mesh (sharded as
    training holds them; whole on every device, a teacher may not fit beside the training state): the
    samples are drawn with the placed trees, the teacher placed only to draw its samples, once."""
    from jaxdistill import load_unet, sample
    from jaxdistill.evaluate import Validation

    spec, params = load_unet(pipeline)
    placed = []

    def put(tree):
        placed.append(jax.tree.map(jnp.array, tree))
        return placed[-1]

    class Drawn(Exception):
        pass

    def generate(pipe, *args, **kwargs):
        seen.append((pipe.unet_params, pipe.vae_params, pipe.text_encoders.params))
        raise Drawn

    seen = []
    monkeypatch.setattr(sample, "generate", generate)
    validation = Validation(str(pipeline), spec, params, prompts=["a cat"], seeds=[0], steps=1)
    validation.place(put)
    encoders, vae = placed
    assert validation.parts.text_encoders.params is encoders and validation.parts.vae_params is vae
    with pytest.raises(Drawn):
        validation(spec, params)
    assert seen[0][0] is placed[2] and seen[0][1:] == (vae, encoders) and len(placed) == 3
    # the trainer's own teacher arrays, where their layout is the UNet's: used as they are, nothing copied
    own = jax.tree.map(jnp.array, params)
    validation.place(put, teacher_params=own)
    with pytest.raises(Drawn):
        validation(spec, params)
    assert seen[1][0] is own and len(placed) == 5


def test_clip_score_from_a_clip_folder(tmp_path):
    """A tiny random CLIPModel saved as safetensors with its processor: scores are 100·max(cos, 0) of the
    image and text embeddings, computed here by hand from the same model."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from jaxdistill.evaluate import ClipScore
    from jaxdistill.reference import write_tiny_clip_tokenizer

    tokenizer = write_tiny_clip_tokenizer(tmp_path / "tok")
    torch.manual_seed(0)
    config = CLIPConfig(text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=2,
                                         eos_token_id=tokenizer.eos_token_id),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8), projection_dim=16)
    CLIPModel(config).eval().save_pretrained(tmp_path / "clip", safe_serialization=True)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    processor.save_pretrained(tmp_path / "clip")
    images = np.random.default_rng(0).integers(0, 256, (3, 40, 48, 3)).astype(np.uint8)
    prompts = ["a cat", "a dog on a hill", "two red cars"]
    scores = ClipScore(tmp_path / "clip")(images, prompts)
    model = CLIPModel.from_pretrained(tmp_path / "clip")
    inputs = processor(text=prompts, images=list(images), return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**inputs)
    cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).numpy()
    np.testing.assert_allclose(scores, 100 * np.maximum(cos, 0), rtol=1e-5, atol=1e-4)
    assert scores.shape == (3,) and np.all((scores >= 0) & (scores <= 100))
    done = []  # in batches (of 2 and 1 here), each told to the progress bar: the same scores
    np.testing.assert_allclose(ClipScore(tmp_path / "clip")(images, prompts, batch_size=2, done=done.append), scores,
                               rtol=1e-5, atol=1e-4)
    assert done == [2, 1]
