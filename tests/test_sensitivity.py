"""Sensitivity analysis and the automatic plan on tiny SDXL-shaped UNets with random weights: ablation by
zeroed projections is exact removal, unit prices add up to the whole model's, the greedy plan meets its
budget and keeps what hurts, reports round-trip through their files.

Compilation dominates on a CPU, so the prices are checked on the tiny SDXL itself (the SSD-1B plan needs its
10-deep modules) and everything that runs the model uses a shallower copy of the same topology."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxdistill import sensitivity as S
from jaxdistill import unet
from jaxdistill.convert import flax_path
from jaxdistill.prune import SSD1B, PlanError, PrunePlan, prune, resolve_plan, student_spec
from jaxdistill.spec import CROSS_ATTN_MID, RESNET_MID
from jaxdistill.unet import UNet, flops

SDXL = TINY["sdxl"]  # SDXL's depths (2/10 layers, 10-deep mid attention) at tiny widths
# SDXL's topology with 2/4-deep attention: mid attention tied to down_blocks.2.attentions.0, 4 + 8 + 12 + 6 + 4
# layers.
SPEC = SDXL.replace(down_depths=((0, 0), (2, 2), (4, 4)), up_depths=((4, 4, 4), (2, 2, 2), (0, 0, 0)), mid_depth=4)
FLOPS_SIZE = 16  # latent side the FLOPs are counted at (tiny: compile time, not size, dominates)
CALIBRATION = dict(batch=2, size=8, seq_len=8)
SCALED = "up_blocks.0.attentions.0.transformer_blocks.2"  # made to matter much more than its neighbours
count_params = functools.cache(unet.count_params)  # each call traces the model's init: seconds on this CPU


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def teacher():
    """Random weights drawn in numpy (`init_params` spends minutes compiling a many-layer random init on a
    small CPU): fan-in-scaled kernels, residual branches ending smaller (as in trained nets: a unit-scale
    branch in every layer saturates the stream), norm scales around 1, non-zero biases (so zeroing biases
    matters)."""
    rng = np.random.default_rng(0)

    def draw(path, x):
        if path[-1] == "scale":
            return 1 + 0.2 * rng.standard_normal(x.shape)
        if path[-1] == "bias":
            return 0.1 * rng.standard_normal(x.shape)
        kernel = rng.standard_normal(x.shape) / np.sqrt(math.prod(x.shape[:-1]))
        return 0.3 * kernel if path[-2] in ("to_out_0", "net_2", "proj_out", "conv2") else kernel

    return unflatten_dict({p: jnp.asarray(draw(p, x), jnp.float32)
                           for p, x in flatten_dict(S._shapes(SPEC)).items()})


@pytest.fixture(scope="module")
def report(teacher):
    # One layer's output projections scaled up: removing that layer must hurt most in its module.
    flat, prefix = flatten_dict(teacher), tuple(flax_path(SCALED))
    for path in flat:
        if path[:len(prefix)] == prefix and path[-2] in ("to_out_0", "net_2"):
            flat[path] = 30 * flat[path]
    return S.sensitivity_report(SPEC, unflatten_dict(flat), **CALIBRATION, flops_size=FLOPS_SIZE, progress=False)


def _units_by_name(report):
    return {u.name: u for u in report.units}


def _student_flops(report, plan) -> float:
    """Teacher FLOPs minus the units the plan removes."""
    kept = resolve_plan(SPEC, plan)
    mid_removed = student_spec(SPEC, plan, kept).mid_block_type != CROSS_ATTN_MID
    removed = [u for u in report.units if (u.kind != S.LAYER and mid_removed) or (
        u.kind == S.LAYER and u.module in kept and u.index not in kept[u.module])]
    return report.teacher_flops - sum(u.flops for u in removed)


def test_units_cover_every_layer_and_the_mid_block():
    units = S.removable_units(SDXL, FLOPS_SIZE)
    by_name = {u.name: u for u in units}
    layers = [u for u in units if u.kind == S.LAYER]
    assert len(layers) == 4 + 20 + 10 + 30 + 6  # down 1, down 2, mid, up 0, up 1
    assert by_name["down_blocks.2.attentions.0.transformer_blocks.3"].module == "down_blocks.2.attentions.0"
    assert by_name["mid_block.attentions.0.transformer_blocks.9"].index == 9
    assert [u.name for u in units if u.kind != S.LAYER] == [S.MID_ATTENTION_NAME, S.MID_RESNET_NAME]
    mid_layers = [u for u in layers if u.module == S.MID_ATTENTION_NAME]
    # the mid attention is its layers plus the wrapper (norm, proj_in, proj_out)
    mid = by_name[S.MID_ATTENTION_NAME]
    assert mid.flops > sum(u.flops for u in mid_layers) and mid.params > sum(u.params for u in mid_layers)
    # block 1 runs 4× the tokens of block 2 at the same width: its layers cost more
    deep = by_name["down_blocks.2.attentions.0.transformer_blocks.0"]
    assert by_name["down_blocks.1.attentions.0.transformer_blocks.0"].flops > deep.flops > 0
    # architectural order: down blocks, mid block, up blocks
    blocks = [u.block for u in units]
    assert blocks.index("mid_block") > blocks.index("down_blocks.2") and blocks.index("up_blocks.0") > blocks.index(
        "mid_block")


def test_unit_params_add_up_to_the_ssd1b_student():
    units = S.removable_units(SDXL, FLOPS_SIZE)
    kept = resolve_plan(SDXL, SSD1B)
    student = student_spec(SDXL, SSD1B, kept)
    removed = [u for u in units if u.kind != S.LAYER or (u.module in kept and u.index not in kept[u.module])]
    assert len(removed) == 4 * 6 + 2 * 1 + 2
    assert sum(u.params for u in removed) == count_params(SDXL) - count_params(student)


def test_unit_flops_add_up_to_the_whole_model(report):
    # SSD-1B's recipe on the shallow copy: deep modules halved, two up-block-1 modules to one layer, mid block
    # to one resnet. The FLOPs the units are priced at must add up to what the compiled models count.
    halve, single = (0, 1), (0,)
    plan = PrunePlan(mid_block_type=RESNET_MID, attentions={
        "down_blocks.2.attentions.0": halve, "down_blocks.2.attentions.1": halve, "up_blocks.0.attentions.0": halve,
        "up_blocks.0.attentions.1": halve, "up_blocks.1.attentions.1": single, "up_blocks.1.attentions.2": single})
    student = student_spec(SPEC, plan, resolve_plan(SPEC, plan))
    saved = report.teacher_flops - _student_flops(report, plan)  # the report counted the teacher with `flops`
    assert saved > 0.2 * report.teacher_flops
    assert saved == pytest.approx(report.teacher_flops - flops(student, size=FLOPS_SIZE), rel=0.01)


def test_zeroed_projections_equal_the_pruned_student(teacher):
    module, drop = "up_blocks.0.attentions.1", 1
    unit = next(u for u in S.removable_units(SPEC, FLOPS_SIZE) if u.name == f"{module}.transformer_blocks.{drop}")
    plan = PrunePlan(attentions={module: (0, 2, 3)})
    student, student_params, _ = prune(SPEC, teacher, plan)
    inputs = {k: jnp.asarray(v) for k, v in S.calibration_inputs(SPEC, **CALIBRATION).items()}
    forward = lambda params: S._forward(SPEC)(params, inputs, jnp.ones(inputs["sample"].shape))[1]
    ablated, full = forward(S.ablate(teacher, unit)), forward(teacher)
    pruned = jax.jit(lambda p, x: UNet(student).apply({"params": p}, **x).sample)(student_params, inputs)
    assert _rel(ablated, pruned) < 1e-5
    assert _rel(full, pruned) > 1e-4, "the layer must matter, or the check proves nothing"


def test_no_op_removal_has_zero_damage_and_real_removals_hurt(teacher, report):
    units = _units_by_name(report)
    picked = [units["down_blocks.2.attentions.1.transformer_blocks.1"], units[S.MID_RESNET_NAME]]
    # a unit whose projections are already zero is the identity: removing it again changes nothing
    for unit in picked:
        assert S.measure(SPEC, S.ablate(teacher, unit), [unit], **CALIBRATION, progress=False) == {unit.name: 0.0}
    assert all(r.damage > 0 for r in report.rows)
    assert report.mid_block_damage > 0
    assert int(np.argmax(S.layer_damage(report)["up_blocks.0.attentions.0"])) == 2


def test_auto_plan_meets_a_params_budget_and_keeps_what_hurts(report):
    units = _units_by_name(report)
    minimum = PrunePlan(attentions={m: 1 for m in S.layer_damage(report) if m != S.MID_ATTENTION_NAME},
                        mid_block_type=RESNET_MID)
    smallest = count_params(student_spec(SPEC, minimum, resolve_plan(SPEC, minimum)))
    # At the smallest reachable size every module keeps one layer: its most damaging one.
    plan = S.auto_plan(SPEC, report, budget_params=smallest)
    assert count_params(student_spec(SPEC, plan, resolve_plan(SPEC, plan))) == smallest
    assert plan.mid_block_type == RESNET_MID
    damage = S.layer_damage(report)
    assert plan.attentions == {m: (int(np.argmax(d)),) for m, d in damage.items() if m != S.MID_ATTENTION_NAME}
    assert plan.attentions["up_blocks.0.attentions.0"] == (2,), "the layer that matters is the one kept"
    assert plan.name.startswith("auto-params-") and "predicted damage" in plan.note

    # A loose budget: each module loses its least damaging layers first.
    budget = count_params(SPEC) - 6 * units[SCALED].params
    plan = S.auto_plan(SPEC, report, budget_params=budget)
    assert count_params(student_spec(SPEC, plan, resolve_plan(SPEC, plan))) <= budget
    assert plan.attentions, "something was pruned"
    for module, kept in plan.attentions.items():
        dropped = [d for i, d in enumerate(damage[module]) if i not in kept]
        assert max(dropped) <= min(damage[module][i] for i in kept)


def test_auto_plan_meets_a_flops_budget(report):
    budget = 0.7 * report.teacher_flops
    plan = S.auto_plan(SPEC, report, budget_flops=budget)
    assert budget - 0.05 * report.teacher_flops < _student_flops(report, plan) <= budget
    assert plan.name.startswith("auto-flops-")


def test_auto_plan_ties_the_mid_attention_to_the_last_down_block(report):
    # The mid block made precious: it stays UNetMidBlock2DCrossAttn, so pruning down_blocks.2.attentions.0
    # must prune the mid attention to the same depth, keeping its most damaging layers.
    damage = {name: 1.0 for name in report.damage}
    damage |= {f"down_blocks.2.attentions.0.transformer_blocks.{i}": 1e-6 for i in range(4)}
    damage |= {f"mid_block.attentions.0.transformer_blocks.{i}": 1e-6 * (i + 1) for i in range(4)}
    precious = dataclasses.replace(report, rows=tuple(S.Row(r.unit, damage[r.unit.name]) for r in report.rows),
                                   mid_block_damage=1e3)
    layer = _units_by_name(report)["down_blocks.2.attentions.0.transformer_blocks.0"].params
    plan = S.auto_plan(SPEC, precious, budget_params=count_params(SPEC) - 3 * layer)
    student = student_spec(SPEC, plan, resolve_plan(SPEC, plan))
    assert student.mid_block_type == CROSS_ATTN_MID
    depth = len(plan.attentions["down_blocks.2.attentions.0"])
    assert depth < 4 and student.mid_depth == depth
    assert plan.attentions["mid_block.attentions.0"] == tuple(range(4 - depth, 4))


def test_unreachable_budgets_and_bad_arguments_raise(report):
    with pytest.raises(PlanError, match="smallest reachable student"):
        S.auto_plan(SPEC, report, budget_params=1000)
    with pytest.raises(PlanError, match="exactly one budget"):
        S.auto_plan(SPEC, report, budget_params=1, budget_flops=1)
    with pytest.raises(PlanError, match="different teacher"):
        S.auto_plan(SDXL, report, budget_params=10**9)


def test_budgets_are_checked_on_prices_alone_and_a_report_repriced_keeps_its_damages(report):
    prices = S.priced(SPEC, FLOPS_SIZE)  # no forward run: what the CLI checks before measuring
    assert prices.units == report.units and prices.teacher_flops == report.teacher_flops
    assert S.check_budget(prices, budget_flops=0.8 * report.teacher_flops) == ("flops", 0.8 * report.teacher_flops)
    with pytest.raises(PlanError, match="smallest reachable student"):
        S.check_budget(prices, budget_params=1000)
    half = S.repriced(report, FLOPS_SIZE // 2)
    assert half.flops_size == (8, 8) and half.damage == report.damage and half.calibration == report.calibration
    # still the measurement of its teacher: another teacher of that architecture is refused at any resolution
    assert half.teacher_digest == report.teacher_digest is not None
    assert half.teacher_flops == flops(SPEC, size=FLOPS_SIZE // 2) < report.teacher_flops / 3
    assert [u.flops for u in half.units] == [u.flops for u in S.removable_units(SPEC, FLOPS_SIZE // 2)]
    plan = S.auto_plan(SPEC, half, budget_flops=0.8 * half.teacher_flops)
    assert _student_flops(half, plan) <= 0.8 * half.teacher_flops and "8×8 latents" in plan.note


def test_write_report_round_trips(report, teacher, tmp_path):
    paths = S.write_report(report, tmp_path / "sens")
    assert sorted(p.name for p in paths.values()) == sorted(S.REPORT_FILES)
    assert all(p.stat().st_size > 0 for p in paths.values())
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(paths["csv"].read_text().splitlines()) == 1 + len(report.rows)
    md = paths["md"].read_text()
    assert f"{count_params(SPEC):,} parameters" in md and "calibration" in md and SCALED in md
    back = S.read_report(tmp_path / "sens")
    assert back == report
    assert S.layer_damage(back) == S.layer_damage(report)
    # the report drives prune's "sensitivity" strategy: keep the most damaging layer of each module
    plan = PrunePlan(attentions={"up_blocks.0.attentions.0": 1}, strategy="sensitivity")
    _, _, kept = prune(SPEC, teacher, plan, sensitivity=S.layer_damage(back))
    assert kept == {"up_blocks.0.attentions.0": (2,)}
    assert math.isclose(back.rows[0].damage_per_gflop, back.rows[0].damage / back.rows[0].unit.flops * 1e9)
