"""Pruning: a teacher UNet (spec, params) → a student, by a `PrunePlan`.

A plan says, for each attention module named in diffusers' dotted form (`down_blocks.2.attentions.0`,
`mid_block.attentions.0`), which transformer layers the student keeps — explicit indices, or a depth
chosen by a strategy (`first`, `even`, or `sensitivity`: the layers whose removal hurts most) — which
resnets each down/up block keeps (BK-SDM style; a resnet goes with the attention that follows it), and
the mid block's form (`UNetMidBlock2D` keeps its first resnet; None removes it). Names and indices are
always the teacher's. Modules the plan does not name are kept whole. Every kept module copies the
teacher's weights. `feature_pairs` lists the (student tap, teacher tap) pairs the distillation loss
compares.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jaxdistill.convert import check_params, flax_path
from jaxdistill.spec import CROSS_ATTN_MID, RESNET_MID, UNetSpec, UnsupportedConfigError

if TYPE_CHECKING:
    from jaxdistill.sensitivity import Report

KEEP = "keep"
STRATEGIES = ("first", "even", "sensitivity")


class PlanError(ValueError):
    """A prune plan that does not fit the teacher or would leave an invalid UNet."""


@dataclasses.dataclass(frozen=True)
class PrunePlan:
    """`attentions`: module name → kept layer indices (a list) or a depth (an int, picked by `strategy`).
    `resnets`: block name (`down_blocks.2`, `up_blocks.0`) → kept resnet indices; an up block keeps one
    resnet more than the down block it mirrors (diffusers' rule), and the resnet taking a skip of another
    width (the last of an up block) must stay.
    `mid_block_type`: "keep", "UNetMidBlock2D" (one resnet) or None (no mid block)."""

    attentions: Mapping[str, int | tuple[int, ...]] = dataclasses.field(default_factory=dict)
    resnets: Mapping[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    mid_block_type: str | None = KEEP
    strategy: str = "first"
    name: str = "custom"
    note: str = ""

    def __post_init__(self):
        for field in ("name", "note", "strategy"):
            if not isinstance(getattr(self, field), str):
                raise PlanError(f"plan field {field}={getattr(self, field)!r}: expected a string.")
        object.__setattr__(self, "attentions", _entries(self.attentions, "attentions", self.name))
        object.__setattr__(self, "resnets", _entries(self.resnets, "resnets", self.name))
        if self.strategy not in STRATEGIES:
            raise PlanError(f"plan {self.name}: strategy={self.strategy!r}; expected one of {STRATEGIES}.")
        if self.mid_block_type not in (KEEP, RESNET_MID, None):
            raise PlanError(f"plan {self.name}: mid_block_type={self.mid_block_type!r}; expected 'keep', "
                            f"'{RESNET_MID}' (keep the first resnet) or null (remove the mid block).")

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "note": self.note, "strategy": self.strategy, "mid_block_type": self.mid_block_type,
                "attentions": {k: v if isinstance(v, int) else list(v) for k, v in self.attentions.items()},
                "resnets": {k: list(v) for k, v in self.resnets.items()}}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PrunePlan:
        if not isinstance(data, Mapping):
            raise PlanError(f"a prune plan is a JSON object (name, note, strategy, mid_block_type, attentions, "
                            f"resnets), not {type(data).__name__}.")
        unknown = set(data) - {"name", "note", "strategy", "mid_block_type", "attentions", "resnets"}
        if unknown:
            raise PlanError(f"prune plan has unknown fields {sorted(unknown)}; expected name, note, strategy, "
                            "mid_block_type, attentions, resnets.")
        return cls(**data)

    def applied(self) -> dict[str, tuple[int, ...]]:
        """The kept indices of a plan as `prune` applied it (the `prune_plan.json` beside a pruned student),
        in `prune`'s form; used to pair the student's features with the teacher's."""
        if any(isinstance(v, int) for v in self.attentions.values()):
            raise PlanError(f"plan {self.name!r} gives depths, not indices: resolve it against a teacher first")
        return {**self.attentions, **{f"{block}.resnets": v for block, v in self.resnets.items()}}

    def save(self, path: str | os.PathLike):
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n")


def _entries(entries: Any, field: str, plan: str) -> dict[str, int | tuple[int, ...]]:
    """A plan's `attentions` (name → layer count or indices) or `resnets` (name → indices), normalised;
    anything else is refused by name: JSON's true is not a count, "10" is not the indices (1, 0)."""
    def is_int(v):
        return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    example = "down_blocks.2.attentions.0" if field == "attentions" else "down_blocks.2"
    if not isinstance(entries, Mapping):
        raise PlanError(f"plan {plan}: {field}={entries!r}; expected an object of names ({example}) to values.")
    out, bad = {}, []
    for name, v in entries.items():
        if field == "attentions" and is_int(v):
            out[name] = int(v)
        elif isinstance(v, (list, tuple)) and all(is_int(i) for i in v):
            out[name] = tuple(int(i) for i in v)
        else:
            bad.append(f"{name}: {v!r}")
        if not isinstance(name, str):
            bad.append(f"{name!r}: not a name like {example}")
    if bad:
        expected = "a layer count or a list of layer indices" if field == "attentions" else "a list of resnet indices"
        raise PlanError(f"plan {plan}: {field} needs {expected} (whole numbers) for each entry; got "
                        + "; ".join(bad))
    return out


# Segmind never published which layers SSD-1B kept; a third party estimated it by comparing SSD-1B's
# attention weights with SDXL's (cosine similarity): 10 → 4 kept layers 0, 1, 2, 6; 2 → 1 kept layer 0.
_SSD1B_10_TO_4 = (0, 1, 2, 6)
SSD1B = PrunePlan(
    name="ssd1b",
    note="SSD-1B (1,331,334,404 parameters on SDXL). Kept layer indices are a third-party estimate "
         "(attention-weight cosine similarity); Segmind never published them.",
    mid_block_type=RESNET_MID,
    attentions={
        "down_blocks.2.attentions.0": _SSD1B_10_TO_4, "down_blocks.2.attentions.1": _SSD1B_10_TO_4,
        "up_blocks.0.attentions.0": _SSD1B_10_TO_4, "up_blocks.0.attentions.1": _SSD1B_10_TO_4,
        "up_blocks.1.attentions.1": (0,), "up_blocks.1.attentions.2": (0,),
    },
)
VEGA = PrunePlan(
    name="vega",
    note="Segmind-Vega (745,225,604 parameters on SDXL); which layers Vega kept is unpublished: evenly spaced.",
    mid_block_type=RESNET_MID,
    strategy="even",
    attentions={
        "down_blocks.1.attentions.0": 1, "down_blocks.1.attentions.1": 1,
        "down_blocks.2.attentions.0": 2, "down_blocks.2.attentions.1": 2,
        "up_blocks.0.attentions.0": 2, "up_blocks.0.attentions.1": 2, "up_blocks.0.attentions.2": 2,
        "up_blocks.1.attentions.0": 1, "up_blocks.1.attentions.1": 1, "up_blocks.1.attentions.2": 1,
    },
)
PLANS = {"ssd1b": SSD1B, "vega": VEGA}


def load_plan(plan: str | os.PathLike | PrunePlan) -> PrunePlan:
    """A preset name (`ssd1b`, `vega`), a plan JSON file, or a plan."""
    if isinstance(plan, PrunePlan):
        return plan
    if str(plan) in PLANS:
        return PLANS[str(plan)]
    path = Path(plan)
    if not path.is_file():
        raise PlanError(f"prune plan {plan!r} is neither a preset ({', '.join(PLANS)}) nor a JSON file.")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PlanError(f"prune plan {path} is not valid JSON: {e}") from e
    return PrunePlan.from_json(data)


def attention_modules(spec: UNetSpec) -> dict[str, int]:
    """Every attention module of `spec` (diffusers' dotted name) → its transformer depth."""
    modules = {}
    for kind, blocks in (("down_blocks", spec.down_depths), ("up_blocks", spec.up_depths)):
        for i, depths in enumerate(blocks):
            modules |= {f"{kind}.{i}.attentions.{j}": d for j, d in enumerate(depths) if d}
    if spec.mid_block_type == CROSS_ATTN_MID:
        modules["mid_block.attentions.0"] = spec.mid_depth
    return modules


def choose_layers(depth: int, keep: int, strategy: str, damage: Sequence[float] | None = None) -> tuple[int, ...]:
    """Which `keep` of `depth` layers stay: the first ones, evenly spaced ones, or (with `damage[i]`, the
    measured harm of removing layer i alone) the ones whose removal hurts most."""
    if strategy == "first":
        return tuple(range(keep))
    if strategy == "even":
        return tuple(int(i) for i in np.round(np.linspace(0, depth - 1, keep)).astype(int)) if keep > 1 else (0,)
    if damage is None or len(damage) != depth:
        raise PlanError("strategy 'sensitivity' needs a sensitivity report covering every layer "
                        "(python -m jaxdistill.prune --sensitivity DIR, or pass sensitivity=).")
    return tuple(sorted(np.argsort(-np.asarray(damage), kind="stable")[:keep].tolist()))


def resolve_plan(spec: UNetSpec, plan: PrunePlan,
                 sensitivity: Mapping[str, Sequence[float]] | None = None) -> dict[str, tuple[int, ...]]:
    """Kept layer indices for every attention module the plan names, checked against the teacher.
    `sensitivity`: module name → damage of removing each of its layers (for strategy `sensitivity`)."""
    modules = attention_modules(spec)
    problems, kept = [], {}
    for name, target in plan.attentions.items():
        if name not in modules:
            problems.append(f"{name}: no such attention module in the teacher (it has: {', '.join(modules)})")
            continue
        depth = modules[name]
        if isinstance(target, int):
            if not 1 <= target <= depth:
                problems.append(f"{name}: keeps {target} layers, the teacher has {depth} (keep 1..{depth}; a whole "
                                "attention module goes only with its resnet: list the resnets to keep under "
                                "the plan's \"resnets\")")
                continue
            try:
                kept[name] = choose_layers(depth, target, plan.strategy, (sensitivity or {}).get(name))
            except PlanError as e:
                problems.append(f"{name}: {e}")
        else:
            bad = [i for i in target if not 0 <= i < depth]
            if bad or not target or len(set(target)) != len(target):
                problems.append(f"{name}: layer indices {list(target)} must be distinct, non-empty and within "
                                f"0..{depth - 1} (the teacher has {depth} layers"
                                + ("; indices name the teacher's layers: is this teacher pruned already?)" if bad
                                   else ")"))
                continue
            kept[name] = tuple(sorted(target))
    if plan.mid_block_type != KEEP and "mid_block.attentions.0" in plan.attentions:
        problems.append("mid_block.attentions.0: the plan also removes the mid block's attention "
                        f"(mid_block_type={plan.mid_block_type!r})")
    if plan.mid_block_type == RESNET_MID and spec.mid_block_type is None:
        problems.append(f"mid_block: the plan keeps a {RESNET_MID} (one resnet), but the teacher has no mid block "
                        "to take it from; use mid_block_type 'keep' or null")
    problems += _resolve_resnets(spec, plan, kept)
    if problems:
        raise PlanError(f"prune plan {plan.name!r} does not fit the teacher:\n  " + "\n  ".join(problems))
    return kept


def _resolve_resnets(spec: UNetSpec, plan: PrunePlan, kept: dict[str, tuple[int, ...]]) -> list[str]:
    """Adds `BLOCK.resnets` → kept resnet indices to `kept` for the blocks the plan names; → problems."""
    blocks = {f"{kind}.{i}": len(depths) for kind, all_depths in (("down_blocks", spec.down_depths),
                                                                     ("up_blocks", spec.up_depths))
              for i, depths in enumerate(all_depths)}
    problems = []
    for block, indices in plan.resnets.items():
        if block not in blocks:
            problems.append(f"resnets of {block}: no such block (the teacher has {', '.join(blocks)})")
        elif not indices or len(set(indices)) != len(indices) or not all(0 <= i < blocks[block] for i in indices):
            problems.append(f"resnets of {block}: indices {list(indices)} must be distinct, non-empty and within "
                            f"0..{blocks[block] - 1} (the teacher's block has {blocks[block]} resnets)")
        else:
            kept[f"{block}.resnets"] = tuple(sorted(indices))
            problems += [f"{block}.attentions.{j}: the plan prunes its layers but also removes resnet {j}, "
                         "which the attention belongs to" for j in range(blocks[block])
                         if j not in indices and f"{block}.attentions.{j}" in plan.attentions]
    if problems or not plan.resnets:
        return problems
    counts = {b: len(kept.get(f"{b}.resnets", range(n))) for b, n in blocks.items()}
    n = spec.num_blocks
    for i in range(n):
        down, up = f"down_blocks.{n - 1 - i}", f"up_blocks.{i}"
        if counts[up] != counts[down] + 1:
            problems.append(f"resnets of {up}: the student keeps {counts[up]}, but {down} keeps {counts[down]}; an "
                            f"up block has one resnet more than the down block it mirrors (diffusers' "
                            f"layers_per_block): keep {counts[down] + 1} in {up}")
    if problems:
        return problems
    # A block's first resnet takes the previous block's output: a kept resnet moved to the front must have
    # been built for that width.
    width = spec.block_out_channels
    for kind, widths in (("down_blocks", width), ("up_blocks", width[::-1])):
        for i in range(n):
            j = kept.get(f"{kind}.{i}.resnets", (0,))[0]
            if j and i and widths[i - 1] != widths[i]:
                problems.append(f"resnets of {kind}.{i}: teacher resnet {j} takes {widths[i]} channels from the "
                                f"previous resnet, but at the student's position 0 it would get the {widths[i - 1]}-"
                                f"channel output of {kind}.{i - 1}; keep resnet 0")
    # Each up resnet concatenates a skip connection: a kept resnet must see a skip of the width it was built for.
    teacher_skips = _skip_widths(spec, {b: range(m) for b, m in blocks.items()})
    student_skips = _skip_widths(spec, {b: range(c) for b, c in counts.items()})
    for i in range(n):
        chosen = kept.get(f"up_blocks.{i}.resnets", range(blocks[f"up_blocks.{i}"]))
        for k, j in enumerate(chosen):
            if teacher_skips[i][j] != student_skips[i][k]:
                problems.append(f"resnets of up_blocks.{i}: teacher resnet {j} was built for a {teacher_skips[i][j]}-"
                                f"channel skip connection, but in the student's position {k} it would get "
                                f"{student_skips[i][k]} channels; keep the up block's last resnet (it takes the "
                                "skip from the block below) and remove one of the others")
    return problems


def _skip_widths(spec: UNetSpec, counts: Mapping[str, Sequence[int]]) -> list[list[int]]:
    """Channels of the skip connection each up resnet takes, for resnet counts per block: [up block][resnet]."""
    n, width = spec.num_blocks, spec.block_out_channels
    skips = [width[0]]  # conv_in
    for i in range(n):
        skips += [width[i]] * len(counts[f"down_blocks.{i}"]) + ([width[i]] if i < n - 1 else [])  # + downsampler
    return [[skips.pop() for _ in counts[f"up_blocks.{i}"]] for i in range(n)]


def student_spec(spec: UNetSpec, plan: PrunePlan, kept: Mapping[str, tuple[int, ...]]) -> UNetSpec:
    """The student's architecture: the kept resnets of each block, teacher depths replaced by the kept
    counts, the mid block's new form."""
    def depths(kind, blocks):
        return tuple(tuple(len(kept.get(f"{kind}.{i}.attentions.{j}", range(block[j]))) if block[j] else 0
                           for j in kept.get(f"{kind}.{i}.resnets", range(len(block))))
                     for i, block in enumerate(blocks))

    mid = spec.mid_block_type if plan.mid_block_type == KEEP else plan.mid_block_type
    mid_depth = len(kept.get("mid_block.attentions.0", range(spec.mid_depth))) if mid == CROSS_ATTN_MID else 0
    try:
        student = spec.replace(down_depths=depths("down_blocks", spec.down_depths),
                               up_depths=depths("up_blocks", spec.up_depths), mid_block_type=mid, mid_depth=mid_depth)
        student.to_diffusers_config()
    except UnsupportedConfigError as e:
        advice = ""
        down = depths("down_blocks", spec.down_depths)[-1]
        if mid == CROSS_ATTN_MID and any(down) and down[0] != mid_depth:  # diffusers' one entry for both depths
            last = f"down_blocks.{spec.num_blocks - 1}.attentions.0"
            advice = (f" {last} ({down[0]} layers) and mid_block.attentions.0 ({mid_depth}) must keep the same depth: "
                      f"prune {last if 'mid_block.attentions.0' in kept else 'mid_block.attentions.0'} to "
                      f"{mid_depth if 'mid_block.attentions.0' in kept else down[0]} as well, or set mid_block_type "
                      f"to {RESNET_MID!r}.")
        raise PlanError(f"prune plan {plan.name!r} leaves a UNet that cannot be built or written as a diffusers "
                        f"folder: {e}{advice}") from e
    return student


Kept = dict[str, tuple[int, ...]]


def prune(spec: UNetSpec, params: Mapping | None, plan: PrunePlan | str,
          sensitivity: Mapping[str, Sequence[float]] | None = None) -> tuple[UNetSpec, dict, Kept]:
    """Teacher (spec, params) → (student spec, student params, kept indices per pruned module: transformer
    layers under the attention's name, resnets under `BLOCK.resnets`). The student's parameters are the
    teacher's arrays (no copies): every kept module is the teacher's. `params` None: the student's spec
    and kept indices only (params None), to check a plan before any weights are read."""
    plan = load_plan(plan)
    kept = resolve_plan(spec, plan, sensitivity)
    student = student_spec(spec, plan, kept)
    if params is None:
        return student, None, kept
    # transformer layer renumbering: (module path, teacher index) → student index
    renumber = {(tuple(flax_path(name)), i): k for name, indices in kept.items() for k, i in enumerate(indices)}
    out = {}
    for path, value in flatten_dict(dict(params)).items():
        if path[0] == "mid_block" and (student.mid_block_type is None or (
                student.mid_block_type == RESNET_MID and path[1] != "resnets_0")):
            continue
        layer = next((n for n, p in enumerate(path) if p.startswith("transformer_blocks_")), None)
        if layer is not None and (path[:layer], _index(path[layer])) in renumber:
            path = (*path[:layer], f"transformer_blocks_{renumber[path[:layer], _index(path[layer])]}",
                    *path[layer + 1:])
        elif layer is not None and tuple(path[:layer]) in {m for m, _ in renumber}:
            continue  # a layer the student drops
        if len(path) > 2 and path[1].startswith(("resnets_", "attentions_")) and path[0] != "mid_block":
            resnets = kept.get(".".join(path[0].rsplit("_", 1)) + ".resnets")  # down_blocks_2 → down_blocks.2
            if resnets is not None:
                if _index(path[1]) not in resnets:
                    continue  # a resnet the student drops, or the attention that follows it
                path = (path[0], f"{path[1].rpartition('_')[0]}_{resnets.index(_index(path[1]))}", *path[2:])
        out[path] = value
    out = unflatten_dict(out)
    check_params(student, out)
    return student, out, kept


def tap_names(spec: UNetSpec, taps: str | Sequence[str] = "all") -> list[str]:
    """Feature names of the UNet `spec` describes: `all` (every down/up resnet and attention, and the mid
    block — the SSD-1B recipe), `stages` (each down/up block's output, BK-SDM), or an explicit list."""
    if not isinstance(taps, str):
        return list(taps)
    names = []
    for kind, blocks in (("down_blocks", spec.down_depths), ("up_blocks", spec.up_depths)):
        for i, depths in enumerate(blocks):
            if taps == "stages":
                names.append(f"{kind}.{i}")
            elif taps == "all":
                for j, d in enumerate(depths):
                    names += [f"{kind}.{i}.resnets.{j}"] + ([f"{kind}.{i}.attentions.{j}"] if d else [])
            else:
                raise ValueError(f"taps={taps!r}: expected 'all', 'stages' or a list of feature names.")
        if kind == "down_blocks" and taps == "all" and spec.mid_block_type is not None:
            names.append("mid_block")
    return names


def feature_pairs(teacher: UNetSpec, student: UNetSpec, taps: str | Sequence[str] = "all",
                  kept: Mapping[str, Sequence[int]] | None = None) -> list[tuple[str, str]]:
    """(student tap, teacher tap) pairs. A student module pairs with the teacher module it was cut from:
    the same name, or, where `kept` (from `prune`) says a block's resnets were renumbered, the teacher's
    index. Taps of removed modules drop out; the teacher's whole mid block pairs with whatever the
    student's mid block is (one resnet for SSD-1B). `taps` names student taps."""
    teacher_taps = set(tap_names(teacher, "all") + tap_names(teacher, "stages"))
    student_taps = set(tap_names(student, "all") + tap_names(student, "stages"))
    wanted = tap_names(student, taps)
    unknown = [t for t in wanted if t not in student_taps]
    if unknown:
        raise ValueError(f"feature taps {unknown} do not exist in the student; it has {sorted(student_taps)}")
    pairs = [(t, _teacher_tap(t, kept or {})) for t in wanted]
    return [(s, t) for s, t in pairs if t in teacher_taps]


def _teacher_tap(name: str, kept: Mapping[str, Sequence[int]]) -> str:
    """`down_blocks.2.resnets.0` → `down_blocks.2.resnets.1` when the student kept only teacher resnet 1."""
    parts = name.split(".")
    if len(parts) == 4 and parts[2] in ("resnets", "attentions") and ".".join(parts[:2]) + ".resnets" in kept:
        parts[3] = str(kept[".".join(parts[:2]) + ".resnets"][int(parts[3])])
    return ".".join(parts)


def _index(name: str) -> int:
    return int(name.rpartition("_")[2])


ANOTHER_REPORT = "give another --sensitivity folder to measure this teacher"


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m jaxdistill.prune`: write a pruned student as a diffusers UNet folder; measure layer
    sensitivity; choose a plan for a parameter or FLOP budget."""

    from jaxdistill import cli

    parser = cli.parser("prune", main.__doc__)
    parser.add_argument("--teacher", required=True, help="diffusers UNet folder, or a pipeline folder with unet/")
    parser.add_argument("--plan", help=f"a preset ({', '.join(PLANS)}) or a plan JSON file")
    parser.add_argument("--out", help="where to write the student (a diffusers UNet folder; refused if not empty, "
                                      "see --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --out once the student is written")
    parser.add_argument("--sensitivity", metavar="REPORT_DIR",
                        help="measure each removable unit's damage and write the report here; a folder holding "
                             "sensitivity.json (or that file) is reused")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--budget-params", type=float, help="automatic plan: student parameters ≤ N")
    budget.add_argument("--budget-flops", type=float, help="automatic plan: student forward FLOPs ≤ N (batch 1)")
    parser.add_argument("--resolution", type=int, default=1024,
                        help="image side for FLOPs (latents: /8); for --budget-flops a reused report is re-priced")
    # None: the defaults below when measuring, whatever a reused report was measured with otherwise.
    parser.add_argument("--calibration-batch", type=int, help="calibration samples across timesteps (default 8)")
    parser.add_argument("--calibration-size", type=int, help="latent side of the calibration batch (default 32)")
    parser.add_argument("--seed", type=cli.seed, help="calibration batch seed (default 0)")
    args = parser.parse_args(argv)

    auto = args.budget_params is not None or args.budget_flops is not None
    if auto and args.plan:
        parser.error("give either --plan or a budget (--budget-params / --budget-flops), not both")
    if auto and not args.sensitivity:
        parser.error("an automatic plan needs measurements: add --sensitivity REPORT_DIR")
    if not (args.plan or auto or args.sensitivity):
        parser.error("nothing to do: give --plan, --sensitivity, or a budget")
    if args.plan and not args.out:
        parser.error("--plan needs --out DIR for the student")
    if args.out and not (args.plan or auto):
        parser.error("--out needs a plan: give --plan, or a budget (--budget-params / --budget-flops)")
    if args.overwrite and not args.out:
        parser.error("--overwrite needs --out")
    if args.resolution < 8 or args.resolution % 8:
        parser.error(f"--resolution {args.resolution}: expected a positive multiple of 8 (the VAE's factor)")
    for flag in ("calibration_batch", "calibration_size"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be ≥ 1")
    try:
        _run(args, auto)
    except (OSError, ValueError) as e:  # missing folders, refused plans, weights or reports that do not fit
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


def _run(args, auto: bool):
    """`main` after the arguments are checked: every refusal comes before the weights are read or measured."""
    from jaxdistill import sensitivity as sens
    from jaxdistill.convert import CONFIG_NAME, check_out, load_unet, resolve_unet_folder, save_unet, whole_folder
    from jaxdistill.unet import count_params

    spec = UNetSpec.from_diffusers_config(resolve_unet_folder(args.teacher) / CONFIG_NAME)
    factor = spec.downscale  # latent sides must be multiples of it
    if (args.resolution // 8) % factor:
        raise ValueError(f"--resolution {args.resolution}: this teacher needs a multiple of {8 * factor} pixels "
                         f"(the VAE's 8× times its {factor}× downsampling)")
    if args.calibration_size and args.calibration_size % factor:
        raise ValueError(f"--calibration-size {args.calibration_size}: latent sides of this teacher are multiples "
                         f"of {factor}")
    plan = load_plan(args.plan) if args.plan else None
    if args.out:
        check_out(args.out, args.overwrite, (args.teacher, args.sensitivity))
    report, report_dir, flops_size = None, None, (args.resolution // 8,) * 2
    if args.sensitivity:
        report, report_dir = _reused_report(Path(args.sensitivity), spec, args)
        if report is not None:
            print(f"sensitivity: reusing {args.sensitivity}")
            if args.budget_flops is not None and report.flops_size != flops_size:
                print(f"sensitivity: FLOPs re-priced at {args.resolution} px (the report counts them at "
                      f"{8 * report.flops_size[0]}×{8 * report.flops_size[1]} px); damages as measured")
                report = sens.repriced(report, flops_size)
    if plan is not None:  # its refusals before the weights are read; placeholder damages when still to measure
        pending = {m: [0.0] * d for m, d in attention_modules(spec).items()} if args.sensitivity else None
        student_spec(spec, plan, resolve_plan(spec, plan, sens.layer_damage(report) if report else pending))
    prices = None
    if auto:  # a reused report's prices, or the prices alone: an unreachable budget is refused before measuring
        prices = report or sens.priced(spec, flops_size)
        sens.check_budget(prices, budget_params=args.budget_params, budget_flops=args.budget_flops)

    spec, params = load_unet(args.teacher)
    print(f"teacher: {args.teacher} ({count_params(spec):,} parameters)")
    if report is not None and not sens.check_teacher(report, spec, params, report_name=args.sensitivity,
                                                     teacher_name=args.teacher, remedy=ANOTHER_REPORT):
        print(f"sensitivity: {args.sensitivity} does not record its teacher's weights (an older report): reused "
              "on the architecture alone")
    if args.sensitivity and report is None:
        report = sens.sensitivity_report(
            spec, params, batch=args.calibration_batch or 8, size=args.calibration_size or 32, seed=args.seed or 0,
            flops_size=flops_size, teacher_flops=prices.teacher_flops if prices else None)
        sens.write_report(report, report_dir)
        units = len(report.rows) + (report.mid_block_damage is not None)  # the bar's count: the mid block too
        print(f"sensitivity: {units} units measured → {report_dir}/sensitivity.{{csv,md,png,json}}")
    if auto:
        plan = sens.auto_plan(spec, report, budget_params=args.budget_params, budget_flops=args.budget_flops)
        path = report_dir / "plan.json"
        earlier = load_plan(path) if path.is_file() else None
        plan.save(path)
        print(f"automatic plan → {path}: {plan.note}")
        if earlier is not None and load_plan(path) != earlier:  # a run may train on the earlier one: say so
            print(f"  (it replaces the earlier automatic plan there: {earlier.note}; a training run that names "
                  f"{path} and resumes will refuse a student cut otherwise)")
    if not args.out:
        return

    damage = sens.layer_damage(report) if report is not None else None
    student, student_params, kept = prune(spec, params, plan, sensitivity=damage)
    resolved = dataclasses.replace(
        plan, attentions={k: v for k, v in kept.items() if not k.endswith(".resnets")},
        resnets={k.removesuffix(".resnets"): v for k, v in kept.items() if k.endswith(".resnets")},
        note=(plan.note + " Indices as applied.").strip())
    with whole_folder(args.out, args.overwrite) as tmp:
        save_unet(tmp, student, student_params)
        resolved.save(tmp / "prune_plan.json")
    print(f"student: {count_params(student):,} parameters → {args.out} (plan {plan.name}; kept layers in "
          "prune_plan.json)")
    for name, indices in kept.items():
        print(f"  {name}: {'kept' if name.endswith('.resnets') else 'layers'} {list(indices)}")
    if student.mid_block_type != spec.mid_block_type:
        print(f"  mid_block: {spec.mid_block_type} → {student.mid_block_type or 'none'}")


def _reused_report(path: Path, spec: UNetSpec, args) -> tuple[Report | None, Path]:
    """(the report at `path` — a folder holding sensitivity.json, or that file — or None when the folder has
    none yet; the report's folder). A report of another teacher or calibration is refused, not reused."""
    from jaxdistill import sensitivity as sens

    if path.is_file() or (path / "sensitivity.json").is_file():
        report = sens.read_report(path)
    elif path.exists() and not path.is_dir() or path.suffix == ".json":
        raise FileNotFoundError(f"--sensitivity {path}: no sensitivity report there; give a folder to measure into")
    else:
        return None, path
    sens.check_teacher(report, spec, report_name=str(path), teacher_name=args.teacher, remedy=ANOTHER_REPORT)
    cal = report.calibration
    asked = [("--calibration-batch", args.calibration_batch, args.calibration_batch, cal.get("batch")),
             ("--calibration-size", args.calibration_size, [args.calibration_size] * 2, cal.get("size")),
             ("--seed", args.seed, args.seed, cal.get("seed"))]
    differ = [f"{flag} {given} (the report's: {had})" for flag, given, value, had in asked
              if given is not None and value != had]
    if differ:
        raise ValueError(f"the sensitivity report {path} was measured with another calibration: {', '.join(differ)}; "
                         "drop the flags to reuse it, or give another --sensitivity folder to measure again")
    return report, path.parent if path.is_file() else path


if __name__ == "__main__":
    # Run the imported module's main: under `python -m` this file is `__main__`, and its PrunePlan class
    # would not be the one `sensitivity` returns.
    from jaxdistill.prune import main as _main

    raise SystemExit(_main())
