"""Sensitivity analysis: how much the teacher's noise prediction suffers when one removable unit goes.

A *unit* is anything the pruner can take out of an SDXL-family UNet without changing the rest: one
transformer layer of an attention module, the mid block's whole attention, or its second resnet. Each is a
residual branch, so zeroing its output projection(s) turns it into the identity: the ablated teacher
computes exactly what the pruned student would, with the teacher's compiled forward and no new
architecture. `measure` ablates one unit at a time and records the damage

    damage(unit) = mean((eps_ablated − eps_teacher)²) / mean(eps_teacher²)

over a calibration batch spread across timesteps. `removable_units` also prices every unit: parameters
(from shapes) and forward FLOPs (XLA's cost analysis of the unit's module compiled alone at its input
shape). `auto_plan` turns a `Report` into a `PrunePlan` meeting a parameter or FLOP budget, greedily
removing what costs least damage per unit saved (LAPTOP-Diff style: damages are treated as additive).

    units = removable_units(spec)
    check_budget(priced(spec), budget_params=1e9)      # prices only: is the budget reachable at all?
    report = sensitivity_report(spec, params)          # measure + prices + teacher totals
    write_report(report, "out/sens")                   # .csv .md .png .json
    plan = auto_plan(spec, read_report("out/sens"), budget_params=1_300_000_000)
    prune(spec, params, PrunePlan(attentions={...: 4}, strategy="sensitivity"), sensitivity=layer_damage(report))
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill.convert import flax_path
from jaxdistill.layers import BasicTransformerBlock, ResnetBlock2D, Transformer2DModel
from jaxdistill.prune import KEEP, PlanError, PrunePlan, attention_modules, resolve_plan, student_spec
from jaxdistill.records import read_json
from jaxdistill.spec import CROSS_ATTN_MID, RESNET_MID, UNetSpec
from jaxdistill.unet import UNet, abstract_params, dummy_inputs, flops

LAYER, MID_ATTENTION, MID_RESNET = "layer", "mid_attention", "mid_resnet"
KINDS = (LAYER, MID_ATTENTION, MID_RESNET)
MID_ATTENTION_NAME = "mid_block.attentions.0"
MID_RESNET_NAME = "mid_block.resnets.1"
# Key under which `measure` reports the mid attention and the second mid resnet removed together (what
# `mid_block_type="UNetMidBlock2D"` does); the two do not add up exactly, so it is measured, not summed.
MID_BLOCK = "mid_block"
REPORT_FILES = ("sensitivity.csv", "sensitivity.md", "sensitivity.png", "sensitivity.json")


@dataclasses.dataclass(frozen=True)
class Unit:
    """A removable part of the teacher. `module`: the attention module a layer belongs to (for the mid
    units, their own name); `index`: the layer index (None otherwise); `params`: parameters it holds;
    `flops`: forward FLOPs it costs at the resolution it was priced at, batch 1."""

    name: str
    kind: str
    module: str
    index: int | None
    params: int
    flops: float

    @property
    def block(self) -> str:
        """`down_blocks.2`, `mid_block`, `up_blocks.0`: for grouping in tables and plots."""
        return self.name.split(".attentions")[0].split(".resnets")[0]


# ---- units and their prices -----------------------------------------------------------------------------


def _level(module: str, spec: UNetSpec) -> int:
    """Resolution level of a module (0: full latent resolution): down block i is at level i, up block k
    at the level of the down block it mirrors, the mid block at the last one. The level is also the index
    of the down block whose width and head count the module uses."""
    kind, _, rest = module.partition(".")
    if kind == "mid_block":
        return spec.num_blocks - 1
    i = int(rest.split(".")[0])
    return i if kind == "down_blocks" else spec.num_blocks - 1 - i


def _hw(size: int | tuple[int, int]) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


@functools.cache
def _module_flops(kind: str, config: tuple, shapes: tuple[tuple[int, ...], ...]) -> float:
    """FLOPs of one module compiled alone (XLA cost analysis). Cached: SDXL needs ~a dozen of these."""
    if kind == "layer":
        heads, head_dim, upcast = config
        module = BasicTransformerBlock(heads, head_dim, upcast)
    elif kind == "wrapper":  # a Transformer2DModel with no layers: norm, proj_in, proj_out, residual
        heads, head_dim, groups, linear, upcast = config
        module = Transformer2DModel(heads, head_dim, 0, groups, linear, upcast)
    elif kind == "resnet":
        channels, groups, eps = config
        module = ResnetBlock2D(channels, groups, eps)
    else:
        raise ValueError(kind)
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    variables = jax.eval_shape(module.init, jax.random.key(0), *args)
    # The compiled module's count, like `unet.flops` (the lowered, unoptimised one differs by ~0.1%).
    cost = jax.jit(module.apply).lower(variables, *args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost  # a list of one dict in older jax
    return float(np.asarray(cost["flops"]))


def _layer_flops(spec: UNetSpec, module: str, size: tuple[int, int], seq_len: int) -> float:
    block = _level(module, spec)
    heads = spec.num_attention_heads[block]
    head_dim = spec.block_out_channels[block] // heads
    scale = 2 ** _level(module, spec)
    tokens = (size[0] // scale) * (size[1] // scale)
    # After proj_in the tokens are heads·head_dim wide (= the block's width); the context is the text's.
    return _module_flops("layer", (heads, head_dim, spec.upcast_attention),
                         ((1, tokens, heads * head_dim), (1, seq_len, spec.cross_attention_dim)))


def _mid_shape(spec: UNetSpec, size: tuple[int, int]) -> tuple[int, int, int, int]:
    scale = spec.downscale
    return 1, size[0] // scale, size[1] // scale, spec.block_out_channels[-1]


def _shapes(spec: UNetSpec) -> dict:
    return abstract_params(spec)  # cached in unet.py


def _param_count(spec: UNetSpec) -> int:
    """`unet.count_params`, from the cached shapes."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(_shapes(spec)))


def _subtree_size(tree: Mapping, path: Sequence[str]) -> int:
    for part in path:
        tree = tree[part]
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def removable_units(spec: UNetSpec, size: int | tuple[int, int] | None = None, seq_len: int = 77) -> list[Unit]:
    """Every removable unit of `spec`, in architectural order (down blocks, mid block, up blocks): each
    transformer layer of every attention module, the mid block's included, and for `UNetMidBlock2DCrossAttn`
    the mid attention as a whole and the second mid resnet. FLOPs at latent side `size` (default:
    `spec.sample_size`, else 128), batch 1, a `seq_len`-token context. The mid attention's FLOPs and parameters
    include its layers and its wrapper (norm, proj_in, proj_out): removing it removes all of that."""
    hw = _hw(size or spec.sample_size or 128)
    scale = spec.downscale
    if hw[0] % scale or hw[1] % scale:
        raise ValueError(f"latent size {hw} must be divisible by {scale} for a UNet of {spec.num_blocks} blocks")
    shapes = _shapes(spec)
    down, mid, up = [], [], []  # architectural order: down blocks, mid block, up blocks
    for module, depth in attention_modules(spec).items():
        layer_flops = _layer_flops(spec, module, hw, seq_len)
        group = down if module.startswith("down") else up if module.startswith("up") else mid
        for i in range(depth):
            name = f"{module}.transformer_blocks.{i}"
            group.append(Unit(name, LAYER, module, i, _subtree_size(shapes, flax_path(name)), layer_flops))
    if spec.mid_block_type == CROSS_ATTN_MID:
        shape = _mid_shape(spec, hw)
        block = spec.num_blocks - 1
        heads = spec.num_attention_heads[block]
        wrapper = _module_flops("wrapper", (heads, spec.block_out_channels[block] // heads, spec.norm_num_groups,
                                            spec.use_linear_projection, spec.upcast_attention),
                                (shape, (1, seq_len, spec.cross_attention_dim)))
        attn_flops = wrapper + spec.mid_depth * _layer_flops(spec, MID_ATTENTION_NAME, hw, seq_len)
        mid.append(Unit(MID_ATTENTION_NAME, MID_ATTENTION, MID_ATTENTION_NAME, None,
                        _subtree_size(shapes, flax_path(MID_ATTENTION_NAME)), attn_flops))
        resnet_flops = _module_flops("resnet", (shape[-1], spec.norm_num_groups, spec.norm_eps),
                                     (shape, (1, spec.time_embed_dim)))
        mid.append(Unit(MID_RESNET_NAME, MID_RESNET, MID_RESNET_NAME, None,
                        _subtree_size(shapes, flax_path(MID_RESNET_NAME)), resnet_flops))
    units = down + mid + up
    return units


# ---- ablation and measurement ---------------------------------------------------------------------------


def _zeroed_paths(unit: Unit) -> list[tuple[str, ...]]:
    """Parameter paths (down to the kernel/bias dict) whose zeroing makes `unit` the identity."""
    base = tuple(flax_path(unit.name))
    if unit.kind == LAYER:  # x + attn1(.) + attn2(.) + ff(.): each residual branch ends in one projection
        return [base + ("attn1", "to_out_0"), base + ("attn2", "to_out_0"), base + ("ff", "net_2")]
    if unit.kind == MID_ATTENTION:  # proj_out(...) + x
        return [base + ("proj_out",)]
    if unit.kind == MID_RESNET:  # x + conv2(...); equal widths, so no shortcut conv
        return [base + ("conv2",)]
    raise ValueError(f"unit {unit.name}: unknown kind {unit.kind!r}")


def ablate(params: Mapping, units: Unit | Sequence[Unit]) -> dict:
    """`params` with `units` made the identity (their output projections' kernel and bias zeroed). Only the
    dicts on the changed paths are copied; every other array is shared with `params`."""
    units = [units] if isinstance(units, Unit) else units
    out = dict(params)
    for unit in units:
        for path in _zeroed_paths(unit):
            node = out
            for part in path[:-1]:
                node[part] = dict(node[part])
                node = node[part]
            node[path[-1]] = {k: jnp.zeros_like(v) for k, v in node[path[-1]].items()}
    return out


def calibration_inputs(spec: UNetSpec, batch: int = 4, size: int = 32, seq_len: int = 77, seed: int = 0) -> dict:
    """Default calibration batch: standard-normal latents (what x_t looks like at high noise), context and
    pooled embedding; timesteps evenly spread over [0, 1000) (bin centres); SDXL-like time ids (original
    size = target size = the latents' pixel size, no crop)."""
    rng = np.random.default_rng(seed)
    shapes = dummy_inputs(spec, batch, size, seq_len)
    inputs = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in shapes.items()}
    inputs["timesteps"] = _timesteps(batch)
    if "time_ids" in inputs:
        height, width = 8 * shapes["sample"].shape[1], 8 * shapes["sample"].shape[2]
        n_ids = shapes["time_ids"].shape[1]
        ids = [height, width, 0, 0, height, width] if n_ids == 6 else [height] * n_ids
        inputs["time_ids"] = np.tile(np.asarray(ids, np.float32), (batch, 1))
    return inputs


def _timesteps(batch: int) -> np.ndarray:
    """`batch` timesteps evenly spread over [0, 1000): the centres of equal bins, so both ends are sampled."""
    return ((np.arange(batch) + 0.5) * 1000 / batch).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _forward(spec: UNetSpec):
    """Jitted (params, inputs, reference) → (relative MSE against `reference`, prediction): the teacher's
    prediction and every ablation's damage from one compilation (cached per spec, so repeated `measure`
    calls compile nothing); per unit only a scalar is read back."""
    model = UNet(spec)

    def forward(params, inputs, reference):
        eps = model.apply({"params": params}, **inputs).sample.astype(jnp.float32)
        return jnp.mean((eps - reference) ** 2) / jnp.mean(reference**2), eps

    return jax.jit(forward)


def measure(spec: UNetSpec, params: Mapping, units: Sequence[Unit], *, batch: int = 4, size: int = 32,
            seq_len: int = 77, seed: int = 0, inputs: Mapping[str, Any] | None = None,
            progress: bool = True) -> dict[str, float]:
    """Damage of removing each unit alone: mean((eps_ablated − eps_teacher)²) / mean(eps_teacher²) on one
    calibration batch (`inputs`, e.g. from `reference.random_inputs`, or `calibration_inputs(spec, batch,
    size, seq_len, seed)`). When both the mid attention and the second mid resnet are among `units`, the
    result also holds `MID_BLOCK` ("mid_block"): the damage of removing the two together.
    One compiled forward serves every unit (the ablated parameters have the teacher's shapes)."""
    inputs = dict(inputs) if inputs is not None else calibration_inputs(spec, batch, size, seq_len, seed)
    inputs = {k: jnp.asarray(v) for k, v in inputs.items()}
    forward = _forward(spec)
    shape = (*inputs["sample"].shape[:3], spec.out_channels)
    _, reference = forward(params, inputs, jnp.ones(shape, jnp.float32))
    if not float(jnp.mean(reference**2)) > 0:
        raise ValueError("the teacher's prediction is all zeros on the calibration batch: damage is undefined")
    jobs: list[tuple[str, list[Unit]]] = [(u.name, [u]) for u in units]
    mids = {u.kind: u for u in units if u.kind in (MID_ATTENTION, MID_RESNET)}
    if len(mids) == 2:
        jobs.append((MID_BLOCK, [mids[MID_ATTENTION], mids[MID_RESNET]]))
    bar = _progress(jobs, progress)
    out = {}
    for name, removed in bar:
        if progress:
            bar.set_postfix_str(name, refresh=False)
        out[name] = float(forward(ablate(params, removed), inputs, reference)[0])
    return out


def _progress(items: Sequence, enabled: bool):
    if not enabled:
        return items
    from tqdm.auto import tqdm  # tqdm ships with tensorflow-datasets (a dependency)

    return tqdm(items, desc="sensitivity", unit="unit", smoothing=0.1)


# ---- the report -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
    unit: Unit
    damage: float

    @property
    def damage_per_param(self) -> float:
        """Damage per parameter saved."""
        return self.damage / self.unit.params if self.unit.params else math.inf

    @property
    def damage_per_gflop(self) -> float:
        """Damage per GFLOP saved."""
        return self.damage / (self.unit.flops / 1e9) if self.unit.flops else math.inf


@dataclasses.dataclass(frozen=True)
class Report:
    """A sensitivity measurement of one teacher. FLOPs are counted at latent side `flops_size` (batch 1, a
    `seq_len`-token context); `calibration` records how damage was measured; `mid_block_damage` is the
    damage of removing the mid attention and the second mid resnet together (None without them)."""

    spec: UNetSpec
    rows: tuple[Row, ...]
    teacher_params: int
    teacher_flops: float
    flops_size: tuple[int, int]
    seq_len: int
    calibration: Mapping[str, Any]
    mid_block_damage: float | None = None
    teacher_digest: str | None = None  # `weights_digest` of the measured teacher (None: priced only, or older)

    def __post_init__(self):
        object.__setattr__(self, "rows", tuple(self.rows))
        object.__setattr__(self, "flops_size", _hw(self.flops_size))

    @property
    def units(self) -> list[Unit]:
        return [r.unit for r in self.rows]

    @property
    def damage(self) -> dict[str, float]:
        return {r.unit.name: r.damage for r in self.rows}

    def to_json(self) -> dict[str, Any]:
        return {
            "format": "jaxdistill.sensitivity/1",
            "spec": dataclasses.asdict(self.spec),
            "teacher_params": self.teacher_params, "teacher_flops": self.teacher_flops,
            "flops_size": list(self.flops_size), "seq_len": self.seq_len,
            "calibration": dict(self.calibration), "mid_block_damage": self.mid_block_damage,
            "teacher_digest": self.teacher_digest,
            "rows": [dataclasses.asdict(r.unit) | {"damage": r.damage} for r in self.rows],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Report:
        if data.get("format") != "jaxdistill.sensitivity/1":
            raise ValueError(f"not a jaxdistill sensitivity report (format={data.get('format')!r})")
        unit_fields = {f.name for f in dataclasses.fields(Unit)}
        rows = tuple(Row(Unit(**{k: v for k, v in r.items() if k in unit_fields}), float(r["damage"]))
                     for r in data["rows"])
        return cls(spec=UNetSpec(**data["spec"]), rows=rows, teacher_params=int(data["teacher_params"]),
                   teacher_flops=float(data["teacher_flops"]), flops_size=tuple(data["flops_size"]),
                   seq_len=int(data["seq_len"]), calibration=data["calibration"],
                   mid_block_damage=data["mid_block_damage"], teacher_digest=data.get("teacher_digest"))


def priced(spec: UNetSpec, flops_size: int | tuple[int, int] | None = None, flops_seq_len: int = 77,
           teacher_flops: float | None = None) -> Report:
    """A report with every removable unit priced and nothing measured yet (damages NaN, no calibration):
    enough for `check_budget`, so that an unreachable budget is refused before `measure` spends its time.
    FLOPs are counted for the deployment shape: latent side `flops_size` (default `spec.sample_size`, else
    128) and a `flops_seq_len`-token context. `teacher_flops`: the teacher's forward FLOPs at that shape if
    already known (else `unet.flops` lowers the whole forward to count them)."""
    flops_hw = _hw(flops_size or spec.sample_size or 128)
    units = removable_units(spec, flops_hw, flops_seq_len)
    if teacher_flops is None:
        teacher_flops = flops(spec, 1, flops_hw, flops_seq_len)
    return Report(spec=spec, rows=tuple(Row(u, math.nan) for u in units), teacher_params=_param_count(spec),
                  teacher_flops=float(teacher_flops), flops_size=flops_hw, seq_len=flops_seq_len, calibration={})


def sensitivity_report(spec: UNetSpec, params: Mapping, *, batch: int = 4, size: int = 32, seq_len: int = 77,
                       seed: int = 0, inputs: Mapping[str, Any] | None = None,
                       flops_size: int | tuple[int, int] | None = None, flops_seq_len: int = 77,
                       teacher_flops: float | None = None, progress: bool = True) -> Report:
    """Prices every removable unit (see `priced`, which takes `flops_size`, `flops_seq_len`, `teacher_flops`)
    and measures its damage (see `measure`)."""
    prices = priced(spec, flops_size, flops_seq_len, teacher_flops)
    damage = measure(spec, params, prices.units, batch=batch, size=size, seq_len=seq_len, seed=seed, inputs=inputs,
                     progress=progress)
    if inputs is not None:
        sample, t = np.asarray(inputs["sample"]), np.asarray(inputs["timesteps"])
        calibration = {"inputs": "given", "batch": int(sample.shape[0]), "size": list(sample.shape[1:3]),
                       "seq_len": int(np.asarray(inputs["encoder_hidden_states"]).shape[1]),
                       "timesteps": np.atleast_1d(t).astype(float).round(3).tolist()}
    else:
        calibration = {"inputs": "random normal latents/context/pooled, SDXL-like time ids", "batch": batch,
                       "size": [size, size], "seq_len": seq_len, "seed": seed,
                       "timesteps": _timesteps(batch).astype(float).round(3).tolist()}
    report = _with_damage(prices, damage, calibration, damage.get(MID_BLOCK))
    return dataclasses.replace(report, teacher_digest=weights_digest(params))


def weights_digest(params: Mapping) -> str:
    """A fingerprint of a teacher's weights, to tell a report's teacher from another of the same architecture (a
    fine-tune): per tensor, its name, shape, and float64 sum and sum of squares to 10 significant digits."""
    import hashlib

    from flax.traverse_util import flatten_dict

    h = hashlib.sha256()
    for name, x in sorted(flatten_dict(dict(params), sep="/").items()):
        x = np.asarray(x)
        h.update(f"{name} {x.shape} {np.sum(x, dtype=np.float64):.10g} {np.sum(np.square(x, dtype=np.float64)):.10g}\n"
                 .encode())
    return h.hexdigest()[:16]


def check_teacher(report: Report, spec: UNetSpec, params: Mapping | None = None, *, report_name: str,
                  teacher_name: str, remedy: str) -> bool:
    """Refuses (PlanError, ending in `remedy`) a report measured on another teacher: another architecture, or
    (`params` given) other weights — a fine-tune's layers hurt differently. True when the weights were
    compared; False when they were not given or the report (an older one) does not record them."""
    if report.spec != spec:
        fields = [f.name for f in dataclasses.fields(spec) if getattr(spec, f.name) != getattr(report.spec, f.name)]
        raise PlanError(f"the sensitivity report {report_name} was measured on another teacher architecture than "
                        f"{teacher_name} (it differs in {', '.join(fields)}); {remedy}")
    if params is None or report.teacher_digest is None:
        return False
    if report.teacher_digest != weights_digest(params):
        raise PlanError(f"the sensitivity report {report_name} was measured on another teacher of the same "
                        f"architecture (its weights differ from {teacher_name}'s); {remedy}")
    return True


def repriced(report: Report, flops_size: int | tuple[int, int]) -> Report:
    """`report` with its units' FLOPs and the teacher's counted at latent side `flops_size` instead; the
    measured damages stay (they do not depend on the deployment resolution)."""
    if _hw(flops_size) == report.flops_size:
        return report
    return dataclasses.replace(_with_damage(priced(report.spec, flops_size, report.seq_len), report.damage,
                                            report.calibration, report.mid_block_damage),
                               teacher_digest=report.teacher_digest)  # still that teacher's measurement


def _with_damage(prices: Report, damage: Mapping[str, float], calibration: Mapping[str, Any],
                 mid_block_damage: float | None) -> Report:
    rows = tuple(Row(u, damage[u.name]) for u in prices.units)
    return dataclasses.replace(prices, rows=rows, calibration=calibration, mid_block_damage=mid_block_damage)


def layer_damage(report: Report) -> dict[str, list[float]]:
    """Attention module → damage of removing each of its layers (index order), for
    `prune(..., sensitivity=layer_damage(report))` with a plan of strategy "sensitivity"."""
    out: dict[str, dict[int, float]] = {}
    for r in report.rows:
        if r.unit.kind == LAYER:
            out.setdefault(r.unit.module, {})[r.unit.index] = r.damage
    return {m: [d[i] for i in range(len(d))] for m, d in out.items()}


def _human(n: float, unit: str = "", giga: str = "G") -> str:
    """1.331e9 → "1.331G" (or "1.331B" with giga="B", for parameter counts; "1.331 GFLOPs" with a unit)."""
    for scale, suffix in ((1e12, "T"), (1e9, giga), (1e6, "M"), (1e3, "k")):
        if abs(n) >= scale:
            return f"{n / scale:.4g}{' ' if unit else ''}{suffix}{unit}"
    return f"{n:.4g}{' ' if unit else ''}{unit}"


def write_report(report: Report, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Writes sensitivity.csv, .md (table sorted by damage, least damaging first), .png (bar chart) and
    .json (everything, for `read_report`) into `out_dir`; returns their paths by suffix."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {name.rpartition(".")[2]: out / name for name in REPORT_FILES}
    paths["json"].write_text(json.dumps(report.to_json(), indent=1) + "\n")

    columns = ["unit", "kind", "module", "index", "damage", "params", "flops", "damage_per_param",
               "damage_per_gflop"]
    with paths["csv"].open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for r in report.rows:
            u = r.unit
            writer.writerow([u.name, u.kind, u.module, "" if u.index is None else u.index, f"{r.damage:.6e}",
                             u.params, f"{u.flops:.6e}", f"{r.damage_per_param:.6e}", f"{r.damage_per_gflop:.6e}"])

    h, w = report.flops_size
    cal = report.calibration
    lines = [
        "# Sensitivity report",
        "",
        f"- teacher: {report.teacher_params:,} parameters, {_human(report.teacher_flops, 'FLOPs')} per forward "
        f"at {h}×{w} latents ({8 * h}×{8 * w} px), batch 1, {report.seq_len}-token context",
        "- damage: mean((eps_ablated − eps_teacher)²) / mean(eps_teacher²), one unit removed at a time "
        "(output projections zeroed)",
        f"- calibration: {cal.get('inputs')}; batch {cal.get('batch')}, latents {cal.get('size')}, "
        f"context {cal.get('seq_len')} tokens, seed {cal.get('seed', '—')}, timesteps {cal.get('timesteps')}",
    ]
    if report.mid_block_damage is not None:
        lines.append(f"- mid attention + second mid resnet removed together (→ UNetMidBlock2D): damage "
                     f"{report.mid_block_damage:.4e}")
    lines += ["", "Sorted by damage, least damaging first.", "",
              "| # | unit | kind | damage | params | GFLOPs | damage / M params | damage / GFLOP |",
              "|--:|------|------|-------:|-------:|-------:|------------------:|---------------:|"]
    for k, r in enumerate(sorted(report.rows, key=lambda r: r.damage), 1):
        u = r.unit
        lines.append(f"| {k} | `{u.name}` | {u.kind} | {r.damage:.4e} | {u.params:,} | {u.flops / 1e9:.4g} | "
                     f"{r.damage_per_param * 1e6:.4e} | {r.damage_per_gflop:.4e} |")
    paths["md"].write_text("\n".join(lines) + "\n")
    _plot(report, paths["png"])
    return paths


def _short(unit: Unit) -> str:
    """`down_blocks.2.attentions.0.transformer_blocks.3` → `d2.a0.3`; `mid_block.resnets.1` → `mid.r1`."""
    s = (unit.name.replace("down_blocks.", "d").replace("up_blocks.", "u").replace("mid_block", "mid")
         .replace("attentions.", "a").replace("resnets.", "r").replace(".transformer_blocks.", "."))
    return s + " (all)" if unit.kind == MID_ATTENTION else s


def _plot(report: Report, path: Path):
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    bars = [(_short(r.unit), r.unit.block, r.damage, r.unit.kind != LAYER) for r in report.rows]
    if report.mid_block_damage is not None:  # the two mid units removed together, as a plan does it
        at = max(i for i, b in enumerate(bars) if b[1] == "mid_block") + 1
        bars.insert(at, ("mid.a0+r1", "mid_block", report.mid_block_damage, True))
    damage = np.array([b[2] for b in bars], dtype=float)
    blocks = list(dict.fromkeys(b[1] for b in bars))
    colours = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(blocks)}
    fig, ax = plt.subplots(figsize=(max(6.0, 0.2 * len(bars) + 3), 4.5), layout="constrained")
    positive = damage[damage > 0]
    log = positive.size > 0 and positive.max() / positive.min() > 100
    floor = positive.min() / 2 if log else 0.0  # zero-damage bars stay visible on a log axis
    x = np.arange(len(bars))
    ax.bar(x, np.maximum(damage, floor) if log else damage, color=[colours[b[1]] for b in bars],
           edgecolor=["black" if b[3] else "none" for b in bars], linewidth=0.8)  # outlined: mid-block units
    if log:
        ax.set_yscale("log")
    ax.set_xticks(x, [b[0] for b in bars], rotation=90, fontsize=6 if len(bars) > 40 else 8)
    ax.set_xlim(-0.7, len(bars) - 0.3)
    ax.set_ylabel("damage: relative MSE of ε" + (" (log scale)" if log else ""))
    ax.set_title(f"Removing one unit at a time — teacher {_human(report.teacher_params, giga='B')} params; "
                 f"calibration batch {report.calibration.get('batch')}, latents {report.calibration.get('size')}",
                 fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.legend(handles=[Patch(color=colours[b], label=b) for b in blocks], fontsize=7, loc="outside right upper")
    fig.savefig(path, dpi=150)
    plt.close(fig)


def read_report(path: str | os.PathLike) -> Report:
    """The report `write_report` wrote into directory `path` (or the `sensitivity.json` itself)."""
    path = Path(path)
    if path.is_dir():
        path = path / "sensitivity.json"
    if not path.is_file():
        raise FileNotFoundError(f"no sensitivity report at {path} (write one with write_report)")
    return Report.from_json(read_json(path, remedy="delete it to measure again"))


# ---- automatic plan -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _State:
    """Kept layers per attention module (mid block's included while it stays) and whether the mid block
    keeps its attention and second resnet."""

    kept: Mapping[str, frozenset[int]]
    mid: bool


class _Planner:
    """Costs, damages and legal moves of the greedy search over student architectures."""

    def __init__(self, spec: UNetSpec, report: Report, metric: str):
        self.units = {u.name: u for u in report.units}
        self.modules = attention_modules(spec)
        self.damage = report.damage
        self.cost = {name: float(u.params if metric == "params" else u.flops) for name, u in self.units.items()}
        self.total = float(report.teacher_params if metric == "params" else report.teacher_flops)
        self.has_mid = MID_ATTENTION_NAME in self.units and MID_RESNET_NAME in self.units
        self.mid_pair = (report.mid_block_damage if report.mid_block_damage is not None
                         else (self.damage[MID_ATTENTION_NAME] + self.damage[MID_RESNET_NAME]) if self.has_mid else 0)
        # diffusers derives the mid attention's depth from the last down block's first attention.
        last = f"down_blocks.{spec.num_blocks - 1}.attentions.0"
        self.coupled = last if self.has_mid and last in self.modules else None
        missing = [f"{m}.transformer_blocks.{i}" for m, d in self.modules.items() for i in range(d)
                   if f"{m}.transformer_blocks.{i}" not in self.units]
        if spec.mid_block_type == CROSS_ATTN_MID and not self.has_mid:
            missing += [n for n in (MID_ATTENTION_NAME, MID_RESNET_NAME) if n not in self.units]
        if missing:
            raise PlanError(f"the sensitivity report does not cover every removable unit of the teacher: missing "
                            f"{', '.join(missing[:6])}{' …' if len(missing) > 6 else ''} ({len(missing)} in all)")

    def layer(self, module: str, i: int) -> str:
        return f"{module}.transformer_blocks.{i}"

    def teacher(self) -> _State:
        return self.fix(_State({m: frozenset(range(d)) for m, d in self.modules.items()}, self.has_mid))

    def fix(self, s: _State) -> _State:
        """Enforce the coupling: with the mid attention kept, its depth = the last down block's first
        attention's depth, keeping the mid layers whose removal hurts most."""
        if not (s.mid and self.coupled):
            return s
        order = sorted(range(self.modules[MID_ATTENTION_NAME]),
                       key=lambda i: (-self.damage[self.layer(MID_ATTENTION_NAME, i)], i))
        return _State({**s.kept, MID_ATTENTION_NAME: frozenset(order[:len(s.kept[self.coupled])])}, s.mid)

    def removed(self, s: _State) -> list[str]:
        names = [self.layer(m, i) for m, d in self.modules.items() if m != MID_ATTENTION_NAME or s.mid
                 for i in range(d) if i not in s.kept[m]]
        return names if s.mid or not self.has_mid else names + [MID_ATTENTION_NAME, MID_RESNET_NAME]

    def size(self, s: _State) -> float:
        return self.total - sum(self.cost[n] for n in self.removed(s))

    def predicted_damage(self, s: _State) -> float:
        removed = [n for n in self.removed(s) if n not in (MID_ATTENTION_NAME, MID_RESNET_NAME)]
        return sum(self.damage[n] for n in removed) + (0.0 if s.mid else self.mid_pair)

    def removals(self, s: _State) -> list[_State]:
        out = []
        for m, kept in s.kept.items():
            if len(kept) < 2 or (m == MID_ATTENTION_NAME and (self.coupled or not s.mid)):
                continue  # ≥ 1 layer per module; a coupled mid attention follows its down block
            # layers of one module cost the same: only the least damaging one is a candidate
            i = min(kept, key=lambda i: (self.damage[self.layer(m, i)], i))
            out.append(self.fix(_State({**s.kept, m: kept - {i}}, s.mid)))
        if s.mid:
            out.append(_State({**s.kept, MID_ATTENTION_NAME: frozenset(range(self.modules[MID_ATTENTION_NAME]))},
                              False))
        return out

    def restorations(self, s: _State) -> list[_State]:
        out = []
        for m, kept in s.kept.items():
            gone = set(range(self.modules[m])) - kept
            if not gone or (m == MID_ATTENTION_NAME and (self.coupled or not s.mid)):
                continue
            i = max(gone, key=lambda i: (self.damage[self.layer(m, i)], -i))
            out.append(self.fix(_State({**s.kept, m: kept | {i}}, s.mid)))
        if self.has_mid and not s.mid:
            out.append(self.fix(_State(s.kept, True)))
        return out

    def minimum(self) -> _State:
        return self.fix(_State({m: frozenset({0}) for m in self.modules}, False))


def check_budget(report: Report, *, budget_params: float | None = None,
                 budget_flops: float | None = None) -> tuple[str, float]:
    """("params" or "flops", the budget) for exactly one budget; `PlanError` when even the smallest student
    `auto_plan` can reach (every attention module at 1 layer, the mid block one resnet) exceeds it. Reads
    only the report's prices: a `priced` report checks a budget before measuring."""
    if (budget_params is None) == (budget_flops is None):
        raise PlanError("auto_plan needs exactly one budget: budget_params= or budget_flops=")
    metric, budget = ("params", float(budget_params)) if budget_params is not None else ("flops", float(budget_flops))
    planner = _Planner(report.spec, report, metric)
    smallest = planner.size(planner.minimum())
    if smallest > budget:
        h, w = report.flops_size
        at = f" at {h}×{w} latents" if metric == "flops" else ""
        raise PlanError(f"budget {_human(budget)} {metric} cannot be met: the smallest reachable student (every "
                        f"attention module at 1 layer, mid block of one resnet) has {_human(smallest)} "
                        f"({smallest:,.0f}) {metric}{at}; the teacher has {_human(planner.total)}.")
    return metric, budget


def auto_plan(spec: UNetSpec, report: Report, *, budget_params: int | None = None,
              budget_flops: float | None = None) -> PrunePlan:
    """A plan whose student has at most `budget_params` parameters or `budget_flops` forward FLOPs (at the
    report's resolution, batch 1) — exactly one budget. Greedy and additive: repeatedly take the removal
    with the least damage per parameter/FLOP saved (a transformer layer; or the mid attention with the
    second mid resnet, as one candidate) until the student fits, then put back whatever the last steps made
    unnecessary, most damaging first. Every attention module keeps ≥ 1 layer. While the mid block keeps its
    attention, diffusers ties that attention's depth to the last down block's first attention: changing
    one changes the other (the mid attention keeps its most damaging layers), costs and damage included."""
    if report.spec != spec:
        raise PlanError("the sensitivity report was measured on a different teacher architecture")
    metric, budget = check_budget(report, budget_params=budget_params, budget_flops=budget_flops)
    planner = _Planner(spec, report, metric)
    state = planner.teacher()

    def ratio(new: _State, old: _State) -> float:
        saved = planner.size(old) - planner.size(new)
        grown = planner.predicted_damage(new) - planner.predicted_damage(old)
        return grown / saved if saved > 0 else math.inf

    while planner.size(state) > budget:
        state = min(planner.removals(state), key=lambda new: ratio(new, state))
    # The last removal may overshoot: undo the most damaging removals that still fit.
    while True:
        fits = [new for new in planner.restorations(state) if planner.size(new) <= budget]
        if not fits:
            break
        best = max(fits, key=lambda new: planner.predicted_damage(state) - planner.predicted_damage(new))
        if planner.predicted_damage(best) >= planner.predicted_damage(state):
            break
        state = best

    attentions = {m: tuple(sorted(kept)) for m, kept in state.kept.items()
                  if len(kept) < planner.modules[m] and (m != MID_ATTENTION_NAME or state.mid)}
    mid = KEEP if state.mid or not planner.has_mid else RESNET_MID
    size, damage = planner.size(state), planner.predicted_damage(state)
    h, w = report.flops_size
    name = f"auto-{metric}-{_human(budget, giga='B' if metric == 'params' else 'G')}"
    note = (f"Greedy sensitivity plan for a budget of {budget:,.0f} {metric}: student {size:,.0f} {metric} "
            f"(teacher {planner.total:,.0f}); FLOPs at {h}×{w} latents, batch 1, {report.seq_len}-token context; "
            f"predicted damage {damage:.4g} (sum of per-unit relative MSE of ε; calibration batch "
            f"{report.calibration.get('batch')}, latents {report.calibration.get('size')}).")
    plan = PrunePlan(attentions=attentions, mid_block_type=mid, strategy="first", name=name, note=note)

    # Check against the model itself: the plan resolves, diffusers can build it, and it fits.
    student = student_spec(spec, plan, resolve_plan(spec, plan))
    if metric == "params" and _param_count(student) != round(size):
        raise AssertionError(f"auto_plan: predicted {size:,.0f} parameters, the student has {_param_count(student):,}")
    if size > budget:
        raise AssertionError(f"auto_plan: student {size:,.0f} {metric} exceeds the budget {budget:,.0f}")
    return plan
