"""Pruning: preset plans give SSD-1B and Vega exactly, kept weights are the teacher's, the pruned folder
loads in diffusers and matches our forward, feature pairing, refused plans."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import TINY, cpu_env
from diffusers import UNet2DConditionModel
from flax.traverse_util import flatten_dict

from jaxdistill import count_params, load_unet, presets, save_unet
from jaxdistill.parity import check_folder
from jaxdistill.prune import (
    PLANS,
    PlanError,
    PrunePlan,
    choose_layers,
    feature_pairs,
    load_plan,
    main,
    prune,
    resolve_plan,
    student_spec,
)
from jaxdistill.reference import TOLERANCE
from jaxdistill.sensitivity import read_report
from jaxdistill.unet import flops


@pytest.mark.parametrize("plan, preset, count", [("ssd1b", presets.SSD_1B, 1_331_334_404),
                                                 ("vega", presets.VEGA, 745_225_604)])
def test_presets_give_segmind_architectures_on_full_size_sdxl(plan, preset, count):
    spec = student_spec(presets.SDXL, PLANS[plan], resolve_plan(presets.SDXL, PLANS[plan]))
    assert spec == preset
    assert count_params(spec) == count  # jax.eval_shape: no memory


def test_presets_keep_the_documented_teacher_layers():
    """Which of SDXL's layers each preset keeps, not only how many. SSD-1B: the third-party estimate the
    design doc gives (10 → 4 keeps layers 0, 1, 2, 6; 2 → 1 keeps layer 0). Vega: unpublished, so evenly
    spaced over the teacher's layers, both ends included as in `choose_layers` (4 of 10: 0, 3, 6, 9):
    10 → 2 keeps layers 0 and 9; 2 → 1 keeps layer 0."""
    assert resolve_plan(presets.SDXL, PLANS["ssd1b"]) == {
        **{f"{block}.attentions.{j}": (0, 1, 2, 6) for block in ("down_blocks.2", "up_blocks.0") for j in (0, 1)},
        "up_blocks.1.attentions.1": (0,), "up_blocks.1.attentions.2": (0,)}
    assert resolve_plan(presets.SDXL, PLANS["vega"]) == {
        **{f"down_blocks.1.attentions.{j}": (0,) for j in (0, 1)},
        **{f"down_blocks.2.attentions.{j}": (0, 9) for j in (0, 1)},
        **{f"up_blocks.0.attentions.{j}": (0, 9) for j in (0, 1, 2)},
        **{f"up_blocks.1.attentions.{j}": (0,) for j in (0, 1, 2)}}


def test_presets_apply_to_tiny_teachers_of_the_same_topology():
    for name, preset in (("ssd1b", presets.SSD_1B), ("vega", presets.VEGA)):
        spec = student_spec(TINY["sdxl"], PLANS[name], resolve_plan(TINY["sdxl"], PLANS[name]))
        assert spec == presets.tiny(preset)


def test_every_kept_weight_is_the_chosen_teacher_weight(unet_folders):
    teacher_spec, teacher = load_unet(unet_folders["sdxl"])
    spec, params, kept = prune(teacher_spec, teacher, "ssd1b")
    assert kept["down_blocks.2.attentions.0"] == (0, 1, 2, 6) and kept["up_blocks.1.attentions.2"] == (0,)
    teacher_flat, student_flat = flatten_dict(teacher), flatten_dict(params)
    moved = {(f"{block}", f"attentions_{j}"): layers
             for block, js, layers in (("down_blocks_2", (0, 1), (0, 1, 2, 6)), ("up_blocks_0", (0, 1), (0, 1, 2, 6)),
                                       ("up_blocks_1", (1, 2), (0,)))
             for j in js}
    for path, value in student_flat.items():
        source = path
        if path[:2] in moved and path[2].startswith("transformer_blocks_"):
            k = int(path[2].rpartition("_")[2])
            source = (*path[:2], f"transformer_blocks_{moved[path[:2]][k]}", *path[3:])
        assert np.array_equal(np.asarray(value), np.asarray(teacher_flat[source])), path
    # layer 6 really is the teacher's layer 6 (and not layer 3): they differ in the teacher
    a = teacher_flat["down_blocks_2", "attentions_0", "transformer_blocks_6", "attn1", "to_q", "kernel"]
    b = teacher_flat["down_blocks_2", "attentions_0", "transformer_blocks_3", "attn1", "to_q", "kernel"]
    assert not np.array_equal(a, b)
    assert ("mid_block", "attentions_0", "norm", "scale") not in student_flat
    assert ("mid_block", "resnets_1", "conv1", "kernel") not in student_flat


def test_prune_command_writes_a_diffusers_folder_that_matches_our_forward(unet_folders, tmp_path):
    out = tmp_path / "student"
    printed = subprocess.run([sys.executable, "-m", "jaxdistill.prune", "--teacher", unet_folders["sdxl"], "--plan",
                              "ssd1b", "--out", str(out)], check=True, env=cpu_env(), capture_output=True,
                             text=True).stdout
    assert "  mid_block: UNetMidBlock2DCrossAttn → UNetMidBlock2D" in printed, printed  # said beside the layers
    model = UNet2DConditionModel.from_pretrained(out, low_cpu_mem_usage=False)
    assert model.config.reverse_transformer_layers_per_block == [[4, 4, 10], [2, 1, 1], 1]
    assert model.config.mid_block_type == "UNetMidBlock2D"
    assert sum(p.numel() for p in model.parameters()) == count_params(presets.tiny(presets.SSD_1B))
    errors = check_folder(out, batch=2, size=(8, 12), seed=11)
    assert max(errors.values()) <= TOLERANCE, errors
    applied = load_plan(out / "prune_plan.json")
    assert applied.attentions["down_blocks.2.attentions.1"] == (0, 1, 2, 6)


def test_pairing_for_the_ssd1b_plan_has_exactly_the_recipe_taps():
    pairs = feature_pairs(presets.SDXL, presets.SSD_1B)
    names = [s for s, _ in pairs]
    assert all(s == t for s, t in pairs)
    expected = (
        [f"down_blocks.0.resnets.{j}" for j in range(2)]
        + [f"down_blocks.{i}.{kind}.{j}" for i in (1, 2) for j in range(2) for kind in ("resnets", "attentions")]
        + ["mid_block"]  # the teacher's whole mid block ↔ the student's single mid resnet
        + [f"up_blocks.{i}.{kind}.{j}" for i in (0, 1) for j in range(3) for kind in ("resnets", "attentions")]
        + [f"up_blocks.2.resnets.{j}" for j in range(3)]
    )
    assert sorted(names) == sorted(expected) and len(names) == 26
    assert feature_pairs(presets.SDXL, presets.SSD_1B, "stages") == [
        (f"{k}.{i}", f"{k}.{i}") for k in ("down_blocks", "up_blocks") for i in range(3)]
    no_mid = presets.SSD_1B.replace(mid_block_type=None)
    assert "mid_block" not in [s for s, _ in feature_pairs(presets.SDXL, no_mid)]


def test_layer_choice_strategies():
    assert choose_layers(10, 4, "first") == (0, 1, 2, 3)
    assert choose_layers(10, 4, "even") == (0, 3, 6, 9)
    assert choose_layers(10, 1, "even") == (0,)
    damage = [0.1, 5, 0.2, 3, 0.0, 0.0, 4, 0.0, 0.0, 0.0]
    assert choose_layers(10, 3, "sensitivity", damage) == (1, 3, 6)


@pytest.mark.parametrize("plan, message", [
    (PrunePlan(attentions={"down_blocks.0.attentions.0": 1}), "no such attention module"),
    (PrunePlan(attentions={"down_blocks.2.attentions.0": 12}), "keeps 12 layers, the teacher has 10"),
    (PrunePlan(attentions={"down_blocks.2.attentions.0": [0, 10]}), "within 0..9.*pruned already"),
    (PrunePlan(attentions={"down_blocks.2.attentions.0": [1, 1]}), "distinct"),
    (PrunePlan(attentions={"down_blocks.2.attentions.0": 0}), "goes only with its resnet"),
    # diffusers writes one depth for the last down block's first attention and the mid block's: the advice
    # names the side the plan left alone
    (PrunePlan(attentions={"down_blocks.2.attentions.0": 4}), "cannot be built or written as a diffusers.*"
                                                             "prune mid_block.attentions.0 to 4 as well"),
    (PrunePlan(attentions={"mid_block.attentions.0": 3}), "prune down_blocks.2.attentions.0 to 3 as well"),
    (PrunePlan(attentions={"mid_block.attentions.0": 2}, mid_block_type="UNetMidBlock2D"), "also removes"),
    (PrunePlan(attentions={"down_blocks.2.attentions.0": 4}, strategy="sensitivity",
               mid_block_type="UNetMidBlock2D"), "needs a sensitivity report"),
])
def test_refused_plans(plan, message):
    with pytest.raises(PlanError, match=message):
        student_spec(presets.SDXL, plan, resolve_plan(presets.SDXL, plan))


def test_plan_files(tmp_path):
    path = tmp_path / "plan.json"
    PLANS["ssd1b"].save(path)
    assert load_plan(path) == PLANS["ssd1b"]
    path.write_text(json.dumps({"attentions": {}, "keep_everything": True}))
    with pytest.raises(PlanError, match="unknown fields"):
        load_plan(path)
    path.write_text("{not json")
    with pytest.raises(PlanError, match="not valid JSON"):
        load_plan(path)
    with pytest.raises(PlanError, match="neither a preset"):
        load_plan(tmp_path / "missing.json")
    with pytest.raises(PlanError, match="strategy"):
        PrunePlan(strategy="random")


@pytest.mark.parametrize("data, message", [
    ([1, 2], "a prune plan is a JSON object"),
    ({"attentions": ["down_blocks.2.attentions.0"]}, "attentions=.*expected an object"),
    ({"attentions": None}, "attentions=None"),
    ({"attentions": {"down_blocks.2.attentions.0": 4.0}}, "whole numbers.*4.0"),
    ({"attentions": {"down_blocks.2.attentions.0": "4"}}, "whole numbers.*'4'"),  # not the indices (4,)
    ({"attentions": {"down_blocks.2.attentions.0": True}}, "whole numbers.*True"),
    ({"resnets": {"down_blocks.1": 0}}, "resnets needs a list of resnet indices"),
    ({"resnets": {"down_blocks.1": [0.0]}}, "resnets needs a list"),
    ({"name": 3}, "name=3: expected a string"),
])
def test_plan_files_of_the_wrong_types_are_refused(data, message):
    with pytest.raises(PlanError, match=message):
        PrunePlan.from_json(data)


def test_a_mid_block_the_teacher_lacks_is_refused():
    teacher = presets.SDXL.replace(mid_block_type=None)
    plan = PrunePlan(mid_block_type="UNetMidBlock2D")
    with pytest.raises(PlanError, match="the teacher has no mid block"):
        resolve_plan(teacher, plan)
    assert student_spec(teacher, PrunePlan(mid_block_type=None), {}) == teacher


def test_prune_command_out_folder_rules(unet_folders, tmp_path, capsys):
    """Like export: the teacher and a non-empty --out (without --overwrite) are never written over, and the
    refusal comes before anything is read; the student appears whole."""
    teacher = shutil.copytree(unet_folders["micro"], tmp_path / "teacher")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in teacher.iterdir())
    plan = tmp_path / "plan.json"
    PrunePlan(attentions={"up_blocks.0.attentions.0": [1]}).save(plan)
    args = ["--teacher", str(teacher), "--plan", str(plan)]
    assert main(args + ["--out", str(teacher), "--overwrite"]) == 2
    assert "holds" in capsys.readouterr().err
    assert sorted((p.name, p.stat().st_mtime_ns) for p in teacher.iterdir()) == before

    out = tmp_path / "student"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert main(args + ["--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and [p.name for p in out.iterdir()] == ["mine.txt"]
    assert main(args + ["--out", str(out), "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors",
                                                     "prune_plan.json"]
    assert load_unet(out)[0].up_depths[0] == (1, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plan.json", "student", "teacher"]  # nothing left beside


def test_prune_command_refuses_bad_input_before_the_slow_part(unet_folders, tmp_path, capsys):
    teacher, report = unet_folders["micro"], tmp_path / "report"
    assert main(["--teacher", str(tmp_path / "missing"), "--plan", "vega", "--out", str(tmp_path / "s")]) == 2
    assert "not a diffusers UNet folder" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):  # --out with nothing to write
        main(["--teacher", teacher, "--sensitivity", str(report), "--out", str(tmp_path / "s")])
    assert "--out needs a plan" in capsys.readouterr().err
    # an unreachable budget is known from the prices alone: nothing is measured
    assert main(["--teacher", teacher, "--sensitivity", str(report), "--budget-params", "0", "--resolution", "64"]) == 2
    assert "cannot be met" in capsys.readouterr().err and not report.exists()
    assert main(["--teacher", teacher, "--sensitivity", str(tmp_path / "none.json"), "--budget-params", "1"]) == 2
    assert "no sensitivity report" in capsys.readouterr().err
    # the teacher's downsampling decides the sizes (micro: 2 blocks, 2×: images of multiples of 16 pixels)
    assert main(["--teacher", teacher, "--sensitivity", str(report), "--resolution", "72"]) == 2
    assert "needs a multiple of 16 pixels" in capsys.readouterr().err and not report.exists()


def test_prune_command_refuses_a_bad_plan_clearly(unet_folders, tmp_path):
    plan = tmp_path / "plan.json"
    PrunePlan(attentions={"up_blocks.0.attentions.0": 11}).save(plan)
    result = subprocess.run([sys.executable, "-m", "jaxdistill.prune", "--teacher", unet_folders["sdxl"], "--plan",
                             str(plan), "--out", str(tmp_path / "out")], capture_output=True, text=True,
                            env=cpu_env())
    assert result.returncode == 2
    assert "up_blocks.0.attentions.0: keeps 11 layers, the teacher has 10" in result.stdout + result.stderr
    assert not (tmp_path / "out").exists()


def test_prune_command_measures_sensitivity_and_meets_a_budget(unet_folders, tmp_path, capsys):
    teacher = count_params(TINY["micro"])
    report, out = tmp_path / "report", tmp_path / "student"
    subprocess.run([sys.executable, "-m", "jaxdistill.prune", "--teacher", unet_folders["micro"], "--sensitivity",
                    str(report), "--budget-params", str(teacher - 20_000), "--out", str(out), "--resolution", "64",
                    "--calibration-batch", "2", "--calibration-size", "8"], check=True,
                   env=cpu_env())
    assert {p.name for p in report.iterdir()} >= {"sensitivity.csv", "sensitivity.md", "sensitivity.png",
                                                  "sensitivity.json", "plan.json"}
    plan = load_plan(report / "plan.json")
    assert plan.attentions  # something was removed
    model = UNet2DConditionModel.from_pretrained(out, low_cpu_mem_usage=False)
    assert sum(p.numel() for p in model.parameters()) <= teacher - 20_000
    assert load_plan(out / "prune_plan.json").attentions == resolve_plan(TINY["micro"], plan)

    # Reused (the file itself may be named): FLOPs re-priced at the asked resolution, damages as measured.
    teacher_flops = flops(TINY["micro"], 1, 16)
    again = ["--teacher", unet_folders["micro"], "--sensitivity", str(report / "sensitivity.json")]
    budget = 0.9 * teacher_flops
    assert main(again + ["--budget-flops", str(budget), "--resolution", "128"]) == 0
    plan = load_plan(report / "plan.json")
    assert "16×16 latents" in plan.note
    assert "it replaces the earlier automatic plan there: " in capsys.readouterr().out  # the params budget's
    assert flops(student_spec(TINY["micro"], plan, resolve_plan(TINY["micro"], plan)), 1, 16) <= budget
    assert read_report(report).flops_size == (8, 8)  # the measurement's record is left as it was
    # another calibration, or another teacher: refused, not silently reused
    assert main(again + ["--budget-params", str(teacher - 20_000), "--calibration-batch", "4"]) == 2
    assert "--calibration-batch 4 (the report's: 2)" in capsys.readouterr().err
    assert main(["--teacher", unet_folders["sdxl"], "--sensitivity", str(report), "--budget-params", "1e9"]) == 2
    assert "another teacher architecture" in capsys.readouterr().err
    # the same architecture with other weights (a fine-tune of the teacher) is another teacher too
    spec, weights = load_unet(unet_folders["micro"])
    weights["conv_out"]["bias"] = weights["conv_out"]["bias"] + 1e-3
    tuned = save_unet(tmp_path / "tuned", spec, weights)
    assert main(["--teacher", str(tuned), "--sensitivity", str(report), "--budget-params", "1e9"]) == 2
    assert "another teacher of the same architecture" in capsys.readouterr().err


# BK-SDM's cut on SDXL: one resnet (with its attention) out of every down block and every up block. Each
# block's first resnet stays: it takes the previous block's width.
BK_SDXL = PrunePlan(name="bk", resnets={"down_blocks.0": [0], "down_blocks.1": [0], "down_blocks.2": [0],
                                        "up_blocks.0": [0, 2], "up_blocks.1": [0, 2], "up_blocks.2": [0, 2]})


def test_removing_resnets_gives_the_diffusers_architecture_with_fewer_layers_per_block(unet_folders):
    spec = student_spec(presets.SDXL, BK_SDXL, resolve_plan(presets.SDXL, BK_SDXL))
    assert spec.down_depths == ((0,), (2,), (10,)) and spec.up_depths == ((10, 10), (2, 2), (0, 0))
    config = spec.to_diffusers_config()
    assert config["layers_per_block"] == 1
    with torch.device("meta"):  # diffusers builds it itself; shapes only
        reference = UNet2DConditionModel.from_config(config | {"layers_per_block": 1})
    assert count_params(spec) == sum(p.numel() for p in reference.parameters())
    # and the plan applies to weights: every kept resnet gets the widths it was built for
    teacher_spec, teacher = load_unet(unet_folders["sdxl"])
    student, _, kept = prune(teacher_spec, teacher, BK_SDXL)
    assert student == presets.tiny(spec) and kept["up_blocks.2.resnets"] == (0, 2)


def test_removed_resnets_take_their_attention_and_renumber(unet_folders, tmp_path):
    """Per-block topology: down block 2 (depths 3,1,2) keeps resnets 0 and 2, its mirror up block 1
    (depths 2,1,1,3) keeps 0, 1 and 3; every student weight is the teacher's at the renumbered place,
    diffusers loads the folder and its forward equals ours."""
    teacher_spec, teacher = load_unet(unet_folders["per_block"])
    plan = PrunePlan(resnets={"down_blocks.2": [0, 2], "up_blocks.1": [0, 1, 3]},
                     attentions={"down_blocks.2.attentions.2": [1]})
    spec, params, kept = prune(teacher_spec, teacher, plan)
    assert spec.down_depths[2] == (3, 1) and spec.up_depths[1] == (2, 1, 3)
    assert kept == {"down_blocks.2.attentions.2": (1,), "down_blocks.2.resnets": (0, 2),
                    "up_blocks.1.resnets": (0, 1, 3)}
    source = {("down_blocks_2", "resnets_1"): ("down_blocks_2", "resnets_2"),
              ("down_blocks_2", "attentions_1"): ("down_blocks_2", "attentions_2"),
              ("up_blocks_1", "resnets_2"): ("up_blocks_1", "resnets_3"),
              ("up_blocks_1", "attentions_2"): ("up_blocks_1", "attentions_3")}
    teacher_flat = flatten_dict(teacher)
    for path, value in flatten_dict(params).items():
        origin = (*source.get(path[:2], path[:2]), *path[2:])
        if origin[:2] == ("down_blocks_2", "attentions_2") and origin[2] == "transformer_blocks_0":
            origin = (*origin[:2], "transformer_blocks_1", *origin[3:])
        assert np.array_equal(np.asarray(value), np.asarray(teacher_flat[origin])), path
    pairs = dict(feature_pairs(teacher_spec, spec, "all", kept))
    assert pairs["down_blocks.2.resnets.1"] == "down_blocks.2.resnets.2"
    assert pairs["up_blocks.1.attentions.2"] == "up_blocks.1.attentions.3"
    assert pairs["up_blocks.1.resnets.1"] == "up_blocks.1.resnets.1" and pairs["down_blocks.1.resnets.1"] == (
        "down_blocks.1.resnets.1")
    # what `python -m jaxdistill.prune` writes beside the student, and the trainer reads back for pairing
    applied = PrunePlan(attentions={"down_blocks.2.attentions.2": (1,)},
                        resnets={"down_blocks.2": (0, 2), "up_blocks.1": (0, 1, 3)})
    assert applied.applied() == kept
    with pytest.raises(PlanError, match="resolve it"):
        PrunePlan(attentions={"down_blocks.2.attentions.2": 1}).applied()
    out = save_unet(tmp_path / "student", spec, params)
    errors = check_folder(out, batch=2, size=(8, 16), seed=3)
    assert max(errors.values()) <= TOLERANCE, errors


@pytest.mark.parametrize("plan, message", [
    (PrunePlan(resnets={"down_blocks.3": [0]}), "no such block"),
    (PrunePlan(resnets={"down_blocks.1": [0, 2]}), "within 0..1"),
    (PrunePlan(resnets={"down_blocks.1": []}), "non-empty"),
    (PrunePlan(resnets={"down_blocks.1": [0]}), "keep 2 in up_blocks.1"),
    (PrunePlan(resnets={"down_blocks.1": [0], "up_blocks.1": [0, 1]}), "keep the up block's last resnet"),
    (PrunePlan(resnets={"down_blocks.2": [1], "up_blocks.0": [0, 2]},
               attentions={"down_blocks.2.attentions.0": [0, 1, 2, 6]}), "but also removes resnet 0"),
    # a block's first resnet takes the previous block's width: 640 into up_blocks.2, 320 into down_blocks.1
    (PrunePlan(resnets={"up_blocks.1": [0, 2], "down_blocks.1": [0], "up_blocks.2": [1, 2], "down_blocks.0": [0]}),
     "up_blocks.2: teacher resnet 1 takes 320 channels .* the 640-channel output of up_blocks.1; keep resnet 0"),
    (PrunePlan(resnets={"down_blocks.1": [1], "up_blocks.1": [0, 2]}),
     "down_blocks.1: teacher resnet 1 takes 640 channels .* the 320-channel output of down_blocks.0"),
])
def test_refused_resnet_plans(plan, message):
    with pytest.raises(PlanError, match=message):
        student_spec(presets.SDXL, plan, resolve_plan(presets.SDXL, plan))
