"""Pruning: preset plans give SSD-1B and Vega exactly, kept weights are the teacher's, the pruned folder
loads in diffusers and matches our forward, feature pairing, refused plans."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import TINY
from diffusers import UNet2DConditionModel
from flax.traverse_util import flatten_dict

from jaxdistill import count_params, load_unet, presets
from jaxdistill.parity import check_folder
from jaxdistill.prune import (
    PLANS,
    PlanError,
    PrunePlan,
    choose_layers,
    feature_pairs,
    load_plan,
    prune,
    resolve_plan,
    student_spec,
)
from jaxdistill.reference import TOLERANCE


@pytest.mark.parametrize("plan, preset, count", [("ssd1b", presets.SSD_1B, 1_331_334_404),
                                                 ("vega", presets.VEGA, 745_225_604)])
def test_presets_give_segmind_architectures_on_full_size_sdxl(plan, preset, count):
    spec = student_spec(presets.SDXL, PLANS[plan], resolve_plan(presets.SDXL, PLANS[plan]))
    assert spec == preset
    assert count_params(spec) == count  # jax.eval_shape: no memory


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
    subprocess.run([sys.executable, "-m", "jaxdistill.prune", "--teacher", unet_folders["sdxl"], "--plan", "ssd1b",
                    "--out", str(out)], check=True, env=os.environ | {"JAX_PLATFORMS": "cpu"})
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
    (PrunePlan(attentions={"down_blocks.2.attentions.0": [0, 10]}), "within 0..9"),
    (PrunePlan(attentions={"down_blocks.2.attentions.0": [1, 1]}), "distinct"),
    (PrunePlan(attentions={"down_blocks.2.attentions.0": 0}), "removing a whole attention module"),
    (PrunePlan(attentions={"down_blocks.2.attentions.0": 4}), "cannot be built or written as a diffusers"),
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


def test_prune_command_refuses_a_bad_plan_clearly(unet_folders, tmp_path):
    plan = tmp_path / "plan.json"
    PrunePlan(attentions={"up_blocks.0.attentions.0": 11}).save(plan)
    result = subprocess.run([sys.executable, "-m", "jaxdistill.prune", "--teacher", unet_folders["sdxl"], "--plan",
                             str(plan), "--out", str(tmp_path / "out")], capture_output=True, text=True,
                            env=os.environ | {"JAX_PLATFORMS": "cpu"})
    assert result.returncode == 2
    assert "up_blocks.0.attentions.0: keeps 11 layers, the teacher has 10" in result.stdout + result.stderr
    assert not (tmp_path / "out").exists()


def test_prune_command_measures_sensitivity_and_meets_a_budget(unet_folders, tmp_path):
    teacher = count_params(TINY["micro"])
    report, out = tmp_path / "report", tmp_path / "student"
    subprocess.run([sys.executable, "-m", "jaxdistill.prune", "--teacher", unet_folders["micro"], "--sensitivity",
                    str(report), "--budget-params", str(teacher - 20_000), "--out", str(out), "--resolution", "64",
                    "--calibration-batch", "2", "--calibration-size", "8"], check=True,
                   env=os.environ | {"JAX_PLATFORMS": "cpu"})
    assert {p.name for p in report.iterdir()} >= {"sensitivity.csv", "sensitivity.md", "sensitivity.png",
                                                  "sensitivity.json", "plan.json"}
    plan = load_plan(report / "plan.json")
    assert plan.attentions  # something was removed
    model = UNet2DConditionModel.from_pretrained(out, low_cpu_mem_usage=False)
    assert sum(p.numel() for p in model.parameters()) <= teacher - 20_000
    assert load_plan(out / "prune_plan.json").attentions == resolve_plan(TINY["micro"], plan)
