"""`python -m jaxdistill.train --config configs/ssd1b.py --workdir DIR`: distil a pruned student from its
teacher (or, with output and feature weights at 0 and no teacher, plain diffusion training).

The run resumes by itself from the latest checkpoint in the workdir and continues exactly as an
uninterrupted run would (batches and noise are functions of the step). SIGTERM or Ctrl-C saves a
checkpoint and exits cleanly; a non-finite loss stops the run naming the step and the term, and a step that
runs out of device memory stops it naming what to change, each keeping the last good checkpoint.
Progress: a console bar, TensorBoard scalars and `WORKDIR/metrics.jsonl`.
Each stage's student is written as a diffusers UNet folder to `WORKDIR/stages/NAME`.

Flags:
  --config FILE            a config file: configs/tiny.py, configs/ssd1b.py, configs/vega.py or your own
  --config.FIELD=VALUE     any field of it (every field, with its meaning: jaxdistill/config.py), e.g.
                           --config.teacher=SDXL_DIR --config.data.path=DATA_DIR --config.optimizer.lr=2e-5
  --workdir DIR            checkpoints, logs, TensorBoard and the students; a run's workdir resumes it
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import signal
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from jaxdistill import cli, presets
from jaxdistill.checkpoint import finished_steps
from jaxdistill.config import (
    PATH_FIELDS,
    absolute_path,
    absolute_paths,
    base_config,
    command_line_wins,
    fields_like,
    stages_of,
    tap_list,
    validate,
)
from jaxdistill.convert import CONFIG_NAME, load_unet, resolve_unet_folder, save_unet
from jaxdistill.data import check_same_data, make_data
from jaxdistill.layers import stack_layers, unstack_layers
from jaxdistill.prepare import load_encoders, make_encode
from jaxdistill.prune import PlanError, PrunePlan, feature_pairs, load_plan, prune
from jaxdistill.records import atomic_json, changes, describe
from jaxdistill.schedule import add_noise, alphas_cumprod, schedule_mismatches, timestep_bias_weights
from jaxdistill.sharding import (
    BATCH,
    agreed,
    any_process,
    attempt,
    batch_sharding,
    batch_shards,
    check_divided,
    gather_failures,
    gather_texts,
    global_batch,
    hold_folder,
    initialize_distributed,
    make_mesh,
    param_shardings,
    raise_failures,
    replicated,
    shard_params,
)
from jaxdistill.spec import UNetSpec
from jaxdistill.step import TrainState, init_state, make_optimizer, make_train_step
from jaxdistill.unet import UNet, abstract_params, count_params, flops, init_params

STAGE_MARKER = "jaxdistill_stage.json"  # beside a finished stage's diffusers files: what made it
MODELS = {**presets.PRESETS, **{f"tiny-{name}": presets.tiny(spec) for name, spec in presets.PRESETS.items()}}


class NonFiniteLoss(RuntimeError):
    """The loss (or one of its terms) became NaN or Inf."""


class OutOfDeviceMemory(RuntimeError):
    """The step does not fit the devices' memory (XLA's RESOURCE_EXHAUSTED), with what to change."""


def memory_advice(c: ml_collections.ConfigDict, mesh_shape: Mapping[str, int], backend: str) -> str:
    """What makes the step fit, most useful first: the same global batch in smaller micro-batches, remat, more
    of a GPU for JAX (`cli.more_gpu_memory`), parameters sharded over the devices."""
    shards = math.prod(mesh_shape.get(axis, 1) for axis in BATCH)
    micro = c.batch_size // c.optimizer.accumulation
    ways = []
    # the next accumulation whose micro-batch still splits over the batch shards (a smaller one per shard)
    more = next((a for a in range(c.optimizer.accumulation + 1, c.batch_size + 1)
                 if c.batch_size % a == 0 and (c.batch_size // a) % shards == 0), None)
    if more is not None:
        ways.append(f"smaller micro-batches, the same global batch (--config.optimizer.accumulation={more}: "
                    f"{c.batch_size // more // shards} per batch shard)")
    if c.remat == "none":
        ways.append("--config.remat=dots (matmul outputs kept, the rest recomputed in the backward; full: all)")
    elif c.remat == "dots":
        ways.append("--config.remat=full")
    ways += filter(None, [cli.more_gpu_memory(backend)])
    if mesh_shape.get("fsdp", 1) == 1 and math.prod(mesh_shape.values()) > 1:
        ways.append("parameters and optimizer state sharded over the devices (an fsdp axis in --config.mesh.sizes)")
    ways = ways or ["a smaller student, resolution or batch_size"]
    per_shard = f" ({micro // shards if micro % shards == 0 else micro} per batch shard)" if shards > 1 else ""
    return f"a micro-batch of {micro}{per_shard} does not fit the devices' memory; try {'; or '.join(ways)}"


@dataclasses.dataclass
class Model:
    spec: UNetSpec
    params: Any


def run(config: ml_collections.ConfigDict, workdir: str | Path) -> dict[str, Any]:
    """Runs (or resumes) every stage; returns a summary per stage."""
    validate(config)
    config = absolute_paths(config)  # what the run records names the same files from any working directory
    workdir = Path(workdir)
    blocked = next((p for p in (workdir, *workdir.parents) if p.exists() and not p.is_dir()), None)
    if blocked is not None:
        raise ValueError(f"--workdir {workdir}: {blocked} is a file; give a folder (new, or a run's to resume)")
    here = next(p for p in (workdir.absolute(), *workdir.absolute().parents) if p.exists())
    if not os.access(here, os.W_OK | os.X_OK):  # before hours of loading and compiling, not at the first write
        raise ValueError(f"--workdir {workdir}: {here} is not writable (read-only, or another user's); give a folder "
                         "this run can write")
    stages = stages_of(config)
    # hosts agree: one whose data or folders are missing stops them all, not only itself
    checked, notes = agreed(lambda: check_stages(stages, workdir), "could not check the stages before training")
    workdir.mkdir(parents=True, exist_ok=True)
    # One run per workdir: the same command started twice would resume twice and both write checkpoints. Process
    # 0 holds the lock (the workdir may be shared by the hosts); when it is taken, every host stops.
    with hold_folder(workdir, "a training run", first=jax.process_index() == 0):
        return _run_stages(config, stages, workdir, checked, notes)


def _run_stages(config, stages, workdir: Path, checked: dict[str, StageCheck], notes: list[str]) -> dict[str, Any]:
    """`run`'s stages, in order, once checked and with the workdir held."""
    # after the checks: a refused start leaves the record of the run that trained as it was, and so does a
    # start that trains nothing
    if not all(check.finished for check in checked.values()):
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2))
    for note in notes:
        print(note)
    previous, summary = None, {}
    for stage in stages:
        done = workdir / "stages" / stage.name
        if checked[stage.name].finished:
            previous = Model(*load_unet(done))
            trained = json.loads((done / STAGE_MARKER).read_text()).get("config") or {}
            changed = {k: v for k, v in _resume_changes({"config": trained}, stage).items()
                       if k.split(".")[0] not in NOT_TRAINING}
            print(f"stage {stage.name}: already finished ({done})" + (
                f"; not trained again with the changed {describe(changed)} (a new --workdir trains with them)"
                if changed else ""))
            continue
        previous, summary[stage.name] = run_stage(stage, workdir, previous, checked[stage.name])
    return summary


# Fields that do not change what a stage trains (a finished stage's are not reported as unapplied changes).
NOT_TRAINING = ("compilation_cache", "profile", "log_every", "checkpoint_every", "keep_checkpoints", "eval",
                "allow_resume_changes", "stages")

# Fields a resumed stage must share with its checkpoint to continue as the uninterrupted run would (noise,
# timesteps and batches are functions of them), unless config.allow_resume_changes says otherwise. The data
# itself is compared by its identity (`data.check_same_data`): a data set moved to another path is the same.
RESUME_FIXED = ("seed", "batch_size", "optimizer.accumulation", "schedule")


@dataclasses.dataclass
class StageCheck:
    """What `check_stages` found for one stage."""
    identity: dict  # what makes the stage that stage: plan, teacher, kept layers, the stage it distils from
    finished: bool
    data: Any = None  # its training data, opened and checked against the student (None when finished)


def check_stages(stages: list[ml_collections.ConfigDict], workdir: Path) -> tuple[dict[str, StageCheck], list[str]]:
    """Everything each stage will read, for every stage, before the first one trains (a full-size stage
    trains for days: a typo in the last stage's teacher must not wait for it): its folders, plan and
    sensitivity report, the student's architecture and feature pairs (from configs and plans only, no
    weights), the batch split over the mesh, its data, and, where the workdir holds the stage already,
    whether it was made (finished) or is being made (checkpoints) as this config would make it, on the same
    data. → (a `StageCheck` per stage name, notes on settings a resumed stage changes)."""
    # a workdir holding stages this config does not define is another run's (resumes compare stage by name)
    held = {p.name for d in ("stages", "checkpoints") if (workdir / d).is_dir() for p in (workdir / d).iterdir()
            if p.is_dir()}  # a stray file (.DS_Store) is no stage
    foreign = sorted(held - {c.name for c in stages})
    if foreign:
        raise ValueError(f"{workdir} holds stages this config does not define ({', '.join(foreign)}; it defines "
                         f"{', '.join(c.name for c in stages)}): the workdir of another run. Use a new --workdir")
    checked, notes = {}, []
    previous, previous_made = None, None  # the stage before's student (spec only) and {"stage", "steps"}
    for c in stages:
        marker = workdir / "stages" / c.name / STAGE_MARKER
        made = json.loads(marker.read_text()) if marker.is_file() else None
        identity = _as_recorded({"plan": c.plan, "teacher": c.teacher,
                                 "previous": previous_made if c.teacher == "previous" else None}, made)
        what = f"stage {c.name} in {workdir} was finished"
        remedy = (f"use a new --workdir, or delete {marker.parent} (and {workdir}/checkpoints/{c.name}) to train "
                  "that stage again")
        _refuse_changes(what, made, identity, remedy)  # before any folder is read: the old ones may be gone
        if made is not None and made["steps"] >= c.steps:  # finished: its own folder is all the run reads of it
            checked[c.name] = StageCheck(identity | {"kept_layers": made.get("kept_layers", {})}, finished=True)
            previous = Model(UNetSpec.from_diffusers_config(marker.parent / CONFIG_NAME), None)
            previous_made = {"stage": c.name, "steps": made["steps"]}
            continue
        _check_schedule(c)
        notes += _check_validation(c)
        try:
            teacher, student, kept = build_models(c, previous, weights=False)
        except PlanError as e:  # which stage's plan, where a run has several
            raise PlanError(f"stage {c.name}: {e}") from None
        distil = c.loss.output > 0 or c.loss.feature > 0
        if distil and teacher is None:
            raise ValueError(f"stage {c.name}: loss.output={c.loss.output} / loss.feature={c.loss.feature} distil "
                             "from a teacher, but there is none: give config.teacher, or set both to 0 for plain "
                             "diffusion training")
        if distil:
            feature_pairs(teacher.spec, student.spec, tap_list(c.loss.taps), kept)
        mesh = make_mesh(dict(c.mesh.sizes), dcn=dict(c.mesh.dcn))
        shards = batch_shards(mesh)
        if c.batch_size % shards:  # the nearest sizes whose every micro-batch splits too
            unit = shards * c.optimizer.accumulation
            near = sorted({max(unit, c.batch_size // unit * unit), (c.batch_size // unit + 1) * unit})
            raise ValueError(f"stage {c.name}: config.batch_size={c.batch_size} must be a multiple of the mesh's "
                             f"{shards} batch shards (mesh.sizes data × fsdp), e.g. "
                             f"{' or '.join(f'--config.batch_size={b}' for b in near)}"
                             + (f" ({c.optimizer.accumulation} micro-batches of a multiple of {shards})"
                                if c.optimizer.accumulation > 1 else ""))
        # the models as the run places them (teacher too: a whole bf16 SDXL per device does not fit small chips)
        models = {"student": abstract_params(student.spec)} | (
            {"teacher": abstract_params(teacher.spec)} if distil else {})
        try:
            notes += [f"stage {c.name}: {note}" for note in
                      check_divided(models, mesh.shape, [tuple(r) for r in c.mesh.rules])]
        except ValueError as e:
            raise ValueError(f"stage {c.name}: {e}") from None
        identity["kept_layers"] = _plain_kept(kept)
        _refuse_changes(what, made, identity, remedy)
        data = make_data(c, student.spec)
        resume_notes, resumed_at = _check_resume(c, workdir, student.spec, identity, data)
        notes += resume_notes
        checked[c.name] = StageCheck(identity, finished=False, data=data)
        # a checkpoint past c.steps is where the stage ends: what the next stage distils from
        previous, previous_made = student, {"stage": c.name, "steps": max(c.steps, resumed_at)}
    return checked, notes


def _plain_kept(kept) -> dict[str, list[int]]:
    return {k: list(v) for k, v in (kept or {}).items()}


def _as_recorded(identity: dict, made: dict | None) -> dict:
    """`identity` with each path (teacher, plan file) that names the same file as the record's written as the
    record wrote it: "tp/teacher", "tp/teacher/" and its absolute path are one teacher."""
    if made is None:
        return identity
    same = {k: made[k] for k in ("teacher", "plan") if k in made and k in identity and made[k] != identity[k]
            and _same_path(k, made[k], identity[k])}
    return identity | same


def _same_path(field: str, before: Any, now: Any) -> bool:
    """Whether two values of `config.PATH_FIELDS` entry `field` name the same file (a record written before paths
    were recorded in full holds them as typed: read from the working directory, as they were)."""
    before, now = absolute_path(field, before), absolute_path(field, now)
    return isinstance(before, str) and isinstance(now, str) and os.path.realpath(before) == os.path.realpath(now)


def _refuse_changes(what: str, made: dict | None, identity: dict, remedy: str):
    """Refuses when a stage's record (marker or checkpoint meta; None: there is none) says it was made
    otherwise than `identity` would make it (a record from before a field was kept does not count)."""
    if made is None:
        return
    changed = changes({k: made[k] for k in identity if k in made}, {k: identity[k] for k in identity if k in made})
    if changed:
        raise ValueError(f"{what} with other settings ({describe(changed)}); {remedy}")


def _check_resume(c: ml_collections.ConfigDict, workdir: Path, spec: UNetSpec, identity: dict,
                  data) -> tuple[list[str], int]:
    """A stage with checkpoints against the config it would now resume with (its meta only, no weights):
    the student, the teacher layers it was cut from, the stage it distils from and the data must be the
    same, and so must `RESUME_FIXED` (unless allowed) and the fields that shape the training state. →
    (notes on the other changes, the checkpoint's step; 0 without one)."""
    directory = workdir / "checkpoints" / c.name
    steps = finished_steps(directory)
    if not steps:
        return [], 0
    step, where = max(steps), directory / str(max(steps))
    # the meta item alone, by its handler: a manager's restore waits for every process, and this runs before
    # the processes agree that all of them passed their checks (`run`)
    try:
        meta = dict(ocp.JsonCheckpointHandler().restore(where / "meta"))
    except Exception as e:  # noqa: BLE001 (a missing or truncated file: orbax's and the OS's many kinds)
        raise ValueError(f"cannot read the checkpoint {where}: {type(e).__name__}: {str(e)[:300]}. "
                         f"{_damaged_remedy(directory, step)}") from e
    remedy = "use a new --workdir, or restore the old config"
    if UNetSpec.from_diffusers_config(meta["student_config"]) != spec:
        raise ValueError(f"the checkpoint {where} holds a different student architecture than this config builds "
                         f"(plan or teacher changed?); {remedy}")
    _refuse_changes(f"the checkpoint {where} was trained", meta, {k: identity[k] for k in ("kept_layers", "previous")},
                    remedy)
    changed = _resume_changes(meta, c)

    # on or off, these change what the training state holds (EMA weights, scanned layers, the clip's state)
    layout = [k for k in ("ema_decay", "optimizer.grad_clip", "scan_layers")
              if k in changed and bool(changed[k][0]) != bool(changed[k][1])]
    if layout:
        raise ValueError(f"the checkpoint {where} holds a training state of another layout than this config builds "
                         f"({describe(changed, layout)}); {remedy}")
    fixed = [k for k in changed if any(k == f or k.startswith(f + ".") for f in RESUME_FIXED)]
    if fixed and not c.allow_resume_changes:
        raise ValueError(f"stage {c.name} would resume from {where} with other {describe(changed, fixed)}: noise, "
                         "timesteps or batches would no longer be the uninterrupted run's. Restore the checkpoint's "
                         "values, use a new --workdir, or resume anyway with --config.allow_resume_changes=True")
    notes = []
    try:
        check_same_data(meta.get("data_identity"), data)
    except ValueError as e:
        if not c.allow_resume_changes:
            raise ValueError(f"stage {c.name}: {e}; or resume anyway with --config.allow_resume_changes=True") from None
        notes.append(f"stage {c.name}: resuming anyway (allow_resume_changes): {e}")
    if changed:
        notes.insert(0, f"stage {c.name}: resuming from step {step} with changed settings: {describe(changed)}")
    if step > c.steps:
        notes.append(f"stage {c.name}: its checkpoint is at step {step}, past steps={c.steps}: nothing is trained, "
                     f"and the stage ends with the student of step {step}")
    if "steps" in changed and c.optimizer.schedule != "constant":
        notes.append(f"stage {c.name}: the {c.optimizer.schedule} learning-rate schedule now spans {c.steps} steps, "
                     f"not {changed['steps'][0]}: from step {step} on the rate differs from the first run's plan")
    return notes, step


def _check_schedule(c: ml_collections.ConfigDict):
    """config.schedule against the scheduler config of a pipeline-folder teacher: a teacher trained for
    v-prediction or other betas would otherwise be distilled with epsilon targets on the wrong noise levels,
    silently. (data.pipeline and eval.pipeline only lend their VAE and text encoders: a run without a teacher
    may train onto another schedule.)"""
    from jaxdistill.sample import is_pipeline

    if c.teacher and c.teacher != "previous" and is_pipeline(c.teacher):
        file = Path(c.teacher) / "scheduler" / "scheduler_config.json"
        problems = schedule_mismatches(c.schedule, json.loads(file.read_text())) if file.is_file() else []
        if problems:
            raise ValueError(f"stage {c.name}: config.schedule does not match {file} ({'; '.join(problems)}). "
                             "Set the config's fields to the pipeline's (--config.schedule.FIELD=VALUE) to train "
                             "as that model was trained")


def build_models(c: ml_collections.ConfigDict, previous: Model | None, weights: bool = True
                 ) -> tuple[Model | None, Model, Any]:
    """(teacher or None, student, kept layers) for a stage. `weights` False: every folder, plan and report
    read as the run will, but the models as specs only (params None)."""
    def folder(path):
        if weights:
            return Model(*load_unet(path))
        return Model(UNetSpec.from_diffusers_config(resolve_unet_folder(path) / CONFIG_NAME), None)

    teacher = None
    if c.teacher == "previous" and previous is not None:
        teacher = previous
    elif c.teacher == "previous":
        raise ValueError(f"stage {c.name}: teacher 'previous' but there is no previous stage; "
                         "give --config.teacher=DIR")
    elif c.teacher:
        teacher = folder(c.teacher)
    kept = None
    if c.student:
        from jaxdistill.export import folder_provenance  # here: export imports this module

        student = folder(c.student)
        # which teacher layers the student kept: its prune plan, stage marker or export facts say
        kept = folder_provenance(Path(c.student), resolve_unet_folder(c.student)).get("kept_layers") or None
        if kept is None and student.spec != getattr(teacher, "spec", student.spec) and not weights:
            print(f"stage {c.name}: {c.student} does not say which teacher layers it kept (no prune_plan.json, "
                  "stage marker or export facts): resnet taps pair by position")
    elif teacher is not None and c.plan:
        plan = load_plan(c.plan)
        spec, params, kept = prune(teacher.spec, teacher.params, plan, sensitivity=_damage(c, plan, teacher))
        student = Model(spec, params)
    elif teacher is not None:
        student = Model(teacher.spec, teacher.params)  # fine-tune / distil into a copy of the teacher
    elif previous is not None:
        student = previous
    elif c.model:
        if c.model not in MODELS:
            raise ValueError(f"config.model={c.model!r}: expected one of {sorted(MODELS)}")
        student = Model(MODELS[c.model], init_params(MODELS[c.model], jax.random.key(c.seed)) if weights else None)
    else:
        raise ValueError(f"stage {c.name}: nothing to train — give config.teacher (a folder), config.student, "
                         "or config.model for training from scratch")
    if teacher is not None and weights:  # in host memory: the run places it on the mesh, never whole on one device
        teacher = Model(teacher.spec, jax.tree.map(lambda x: np.asarray(x, jnp.dtype(c.precision.teacher)),
                                                     teacher.params))
    return teacher, student, kept


def _stack_on_host(params: Any) -> Any:
    """`stack_layers` on the host's CPU device, where there is one: a whole model in float32 never passes
    through one accelerator on its way to the mesh."""
    try:
        host = jax.local_devices(backend="cpu")[0]
    except RuntimeError:  # JAX_PLATFORMS without cpu
        return jax.jit(stack_layers)(params)
    with jax.default_device(host):
        return jax.jit(stack_layers)(params)


def _damage(c: ml_collections.ConfigDict, plan: PrunePlan, teacher: Model) -> dict[str, list[float]] | None:
    """The layer damage of `config.sensitivity` (a `python -m jaxdistill.prune --sensitivity` report folder),
    for plans of strategy "sensitivity": measured on this stage's teacher (its architecture, and its weights
    where they are loaded and the report records them), as `prune --sensitivity` requires."""
    measure = f"python -m jaxdistill.prune --teacher TEACHER --sensitivity {c.sensitivity or 'REPORT_DIR'}"
    if not c.sensitivity:
        if plan.strategy == "sensitivity" and any(isinstance(t, int) for t in plan.attentions.values()):
            raise ValueError(f"stage {c.name}: plan {c.plan} picks layers by measured damage (strategy "
                             f"'sensitivity'): give --config.sensitivity=REPORT_DIR, a report measured on this "
                             f"stage's teacher ({measure})")
        return None
    from jaxdistill import sensitivity

    if not (Path(c.sensitivity) / "sensitivity.json").is_file():
        raise ValueError(f"config.sensitivity={c.sensitivity!r} holds no sensitivity.json: measure one with {measure}")
    report = sensitivity.read_report(c.sensitivity)
    sensitivity.check_teacher(report, teacher.spec, teacher.params, report_name=f"config.sensitivity={c.sensitivity}",
                              teacher_name=(f"stage {c.name}'s teacher "
                                            + ("(the previous stage)" if c.teacher == "previous" else c.teacher)),
                              remedy=("measure this teacher into another folder (python -m jaxdistill.prune "
                                      "--teacher TEACHER --sensitivity NEW_DIR) and give --config.sensitivity=NEW_DIR"
                                      + ("; TEACHER is the previous stage's student, WORKDIR/stages/ITS_NAME once it "
                                         "has finished: train the stages before this one first (the same config "
                                         "without the later stages, the same --workdir), measure it, then start "
                                         "the whole run again (finished stages are kept)"
                                         if c.teacher == "previous" else "")))
    return sensitivity.layer_damage(report)


def run_stage(c: ml_collections.ConfigDict, workdir: Path, previous: Model | None,
              checked: StageCheck) -> tuple[Model, dict]:
    """Trains (or resumes) one stage `check_stages` passed."""
    identity, data = checked.identity, checked.data
    distil = c.loss.output > 0 or c.loss.feature > 0

    def read_weights():  # each host reads its own copy (a TPU VM's local disk): one broken copy stops all
        teacher, student, kept = build_models(c, previous)
        # images are encoded inside the step with the frozen VAE and text encoders
        encoders = load_encoders(c.data.pipeline, c.precision.encoders) if c.data.source == "images" else None
        return teacher, student, kept, encoders, _validation(c, teacher, workdir) if distil else None

    teacher, student, kept, encoders, validation = agreed(read_weights, "could not read its weights")
    pairs = feature_pairs(teacher.spec, student.spec, tap_list(c.loss.taps), kept) if distil else []
    tx, lr_fn = make_optimizer(c.optimizer.lr, c.optimizer.warmup_steps, c.optimizer.weight_decay,
                               c.optimizer.b1, c.optimizer.b2, c.optimizer.eps, c.optimizer.grad_clip,
                               c.optimizer.schedule, c.steps)
    acp = alphas_cumprod(c.schedule.num_train_timesteps, c.schedule.beta_start, c.schedule.beta_end,
                         c.schedule.beta_schedule)
    # With scan_layers, training runs on the stacked layout (one compiled body per attention module);
    # saving converts back.
    layout = _stack_on_host if c.scan_layers else (lambda p: p)
    student_model = UNet(student.spec, dtype=c.precision.student_compute, remat=c.remat, scan_layers=c.scan_layers,
                         attention=c.attention)
    teacher_model = (UNet(teacher.spec, dtype=c.precision.teacher, scan_layers=c.scan_layers, attention=c.attention)
                     if distil else None)
    # Everything on one mesh: parameters by the rule table (FSDP / tensor), batches over data × fsdp; the
    # optimizer state inherits the parameters' placement from `init_state`.
    mesh = make_mesh(dict(c.mesh.sizes), dcn=dict(c.mesh.dcn))
    rules = [tuple(r) for r in c.mesh.rules]
    shards = batch_shards(mesh)
    if (c.batch_size // c.optimizer.accumulation) % shards:  # (batch_size itself splits: check_stages)
        print(f"stage {c.name}: a micro-batch of {c.batch_size // c.optimizer.accumulation} (batch_size / "
              f"optimizer.accumulation) does not split over {shards} batch shards (data × fsdp): every micro-batch "
              "is gathered across devices each step. It trains the same; make it a multiple for speed.")
    encode, encoder_params = None, None
    if encoders is not None:
        encode, encoder_params = make_encode(encoders, c.precision.encoders), encoders.params
    step_fn = make_train_step(student_model, teacher_model, tx, lr_fn, acp, pairs=pairs,
                              weights={"task": c.loss.task, "output": c.loss.output, "feature": c.loss.feature},
                              normalize=c.loss.normalize, prediction_type=c.schedule.prediction_type,
                              accumulation=c.optimizer.accumulation, ema_decay=c.ema_decay, encode=encode,
                              mesh=mesh, noise_offset=c.noise_offset, snr_gamma=c.loss.snr_gamma,
                              empty_prompt_rate=c.empty_prompt_rate,
                              timestep_weights=timestep_bias_weights(c.schedule.num_train_timesteps,
                                                                     **c.timestep_bias.to_dict()))
    teacher_params = shard_params(layout(teacher.params), mesh, rules) if distil else None
    frozen = {"teacher": teacher_params, "encoders": shard_params(encoder_params, mesh, rules)}

    if validation is not None:  # sharded as training holds them: a whole teacher per device may not fit
        validation.place(lambda p: shard_params(p, mesh, rules), None if c.scan_layers else teacher_params)
    manager = _checkpoint_manager(workdir / "checkpoints" / c.name, c)
    student_params = layout(student.params)
    if manager.latest_step() is not None:  # restored into its shapes alone: one training state on the devices
        shardings = param_shardings(student_params, mesh, rules)
        student_params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s),
                                      student_params, shardings)
    else:
        student_params = shard_params(student_params, mesh, rules)
    state = init_state(student_params, tx, ema=c.ema_decay > 0)
    state_sharding = jax.tree.map(lambda x: x.sharding, state)
    train_step = jax.jit(step_fn, donate_argnums=(0,),
                         in_shardings=(state_sharding, jax.tree.map(lambda x: x.sharding, frozen),
                                       batch_sharding(mesh), replicated(mesh)),
                         out_shardings=(state_sharding, replicated(mesh)))
    meta = {"stage": c.name, "student_config": student.spec.to_diffusers_config(), "config": c.to_dict(),
            "data_identity": data.identity} | identity
    start, saved = 0, {}
    if manager.latest_step() is not None:
        state, start, saved = _restore(manager, state)
        data.seek(start, saved.get("data_state"))
        # the checkpoints and the stage's record keep every resume's changed settings: the config alone would
        # claim the last start's values (its lr, say) for every step
        changed = _resume_changes(saved, c)
        meta["resumes"] = [*saved.get("resumes", []), *([{"step": start, "changed": changed}] if changed else [])]
        print(f"stage {c.name}: resumed from step {start} ({manager.directory})")
    print(f"stage {c.name}: student {count_params(student.spec):,} parameters"
          + (f", teacher {count_params(teacher.spec):,}, {len(pairs)} feature pairs" if distil else
             ", plain diffusion training (no teacher)"))

    rng = jax.random.key(c.seed)
    held_out = agreed(data.validation_batch, "could not read the validation batch") if distil else None
    agreement = (_agreement_fn(student_model, teacher_model, acp, held_out, c, mesh, encode, encoder_params) if distil
                 else None)
    # measured on the initial student: a resumed run reads it from its checkpoint
    before = agreement(state.params, teacher_params) if distil and start == 0 else saved.get("agreement_before")
    meta["agreement_before"] = before
    logger = _Logger(workdir, c.name, c.steps, start, c.batch_size)
    unstack = jax.jit(unstack_layers) if c.scan_layers else (lambda p: p)

    def validate_now(step):
        scalars = {"agreement": agreement(state.params, teacher_params)}
        if validation is not None:
            means, grid = validation(student.spec, unstack(state.params))
            scalars |= means
            logger.image(step, "validation", grid)
        logger.scalars(step, {f"eval/{k}": v for k, v in scalars.items()})

    stop = _StopFlag()
    step = start
    last_good = start if start else None  # the newest checkpoint known to be written whole
    saving = None  # the step whose checkpoint orbax is writing in the background

    def kept_at():
        return (f"the last good checkpoint is step {last_good} in {manager.directory}" if last_good
                else "no checkpoint was written before it")

    def confirm_save(wait: bool) -> Exception | None:
        """None, or what the background save failed with (a full disk): found at the first step after it ends,
        not at the next save, a whole checkpoint interval of training later."""
        nonlocal saving, last_good
        if saving is None or (not wait and manager.is_saving_in_progress()):
            return None
        written, saving = saving, None
        try:
            manager.wait_until_finished()  # re-raises the background save's error (once)
        except Exception as e:  # noqa: BLE001 (orbax raises ValueError, tensorstore's errors are others)
            return OSError(f"{SAVE_FAILED} {written} in {manager.directory}: {str(e).splitlines()[0][:500]}"
                           f"{_free_space(manager.directory)}")
        last_good = written
        logger.note(_saved_note(written, manager.directory / str(written)))
        return None

    def check_saved(wait: bool = False):
        """Every host stops when any host's checkpoint could not be written."""
        unsaved = confirm_save(wait)
        raise_failures(unsaved, gather_failures(unsaved)[0], "could not write a checkpoint",
                       then=f"stage {c.name}: {kept_at()}. Free space there or give another --workdir, then run "
                            "the same command to resume.")

    def save(step):  # at most once per step
        nonlocal saving
        if step not in (last_good, saving):
            check_saved(wait=True)  # orbax waits for the save before anyway
            # with every host's place in a stream of images (None: data read by index), so a resume goes on
            # from there instead of decoding the stream again up to `step`
            streams = [json.loads(text) for text in gather_texts(json.dumps(data.state(step)))]
            manager.save(step, args=_save_args(state, meta | {"data_position": step, "data_state": streams}))
            saving = step

    def stop_on(own, failures, what, remedy):
        """Every host saves the finished step, then all raise the same error (they agreed on `failures`)."""
        if failures:
            save(step)
            check_saved(wait=True)
            raise_failures(own, failures, what, then=f"stage {c.name}: the checkpoint of step {step} is saved in "
                                                     f"{manager.directory}; {remedy} run the same command to resume.")

    profiler = _Profiler(c.profile.first, c.profile.steps, workdir / "tensorboard" / c.name)
    try:
        # The mesh as context: layers that must place work per device themselves (splash attention) see it.
        with stop, jax.set_mesh(mesh):
            # One host can fail to read its share of a batch alone (a damaged copy of the data on its disk):
            # every host reads the next batch before the step's collective of flags, so all learn it there.
            # The last step's batch reads nothing ahead: there is no next step (and a run resumed at its last
            # step reads no batch at all).
            host_batch = (agreed(functools.partial(data.batch, step, step + 1 < c.steps),
                                 f"could not read its batch for step {step + 1}") if step < c.steps else None)
            while step < c.steps:
                flop = step_flops(teacher.spec if distil else None, student.spec, host_batch, c.batch_size)
                batch = global_batch(host_batch, mesh)
                profiler.before(step + 1)
                try:  # out of memory at compiling, or at running (found when the metrics are read)
                    state, metrics = train_step(state, frozen, batch, rng)
                    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                except jax.errors.JaxRuntimeError as e:
                    xla = cli.out_of_memory(e)
                    if xla is None:
                        raise
                    check_saved(wait=True)
                    advice = memory_advice(c, dict(mesh.shape), jax.default_backend())
                    resume = (f"; run again with the change: it resumes from step {last_good} (a changed "
                              "optimizer.accumulation with --config.allow_resume_changes=True, or a new --workdir)"
                              if last_good else "")
                    raise OutOfDeviceMemory(f"stage {c.name}, step {step + 1}: {advice}. The run stopped; "
                                            f"{kept_at()}{resume}. (XLA: {xla})") from None
                step += 1
                profiler.after(step)  # after the metrics came back: the step has finished on the device
                bad = [k for k, v in values.items() if not math.isfinite(v) and k not in ("lr",)]
                if bad:  # the same on every host (the metrics are global)
                    check_saved(wait=True)  # a save in flight is the last good checkpoint once written
                    raise NonFiniteLoss(
                        f"stage {c.name}, step {step}: non-finite {', '.join(f'{k}={values[k]}' for k in bad)}. "
                        f"The run stopped; {kept_at()}. Lower optimizer.lr, enable grad clipping, or check the data.")
                logger.step(step, values, log=step % c.log_every == 0 or step == c.steps, flop=flop)
                logger.note(data.skip_report())  # the inputs a streamed source skipped, once its first epoch is read
                waiting = time.perf_counter()
                host_batch, unread = (attempt(functools.partial(data.batch, step, step + 1 < c.steps))
                                      if step < c.steps else (None, None))
                logger.waited(time.perf_counter() - waiting)
                failures, stopping = gather_failures(unread, stop.requested is not None)  # the same on all hosts
                check_saved()
                if step % c.checkpoint_every == 0 or step == c.steps or stopping:
                    save(step)
                stop_on(unread, failures, f"could not read its batch for step {step + 1}", "once the data reads,")
                if stopping:
                    check_saved(wait=True)
                    print(f"\nstage {c.name}: stopped by {stop.requested or 'a signal to another process'} at step "
                          f"{step}; checkpoint saved. Run the same command to resume.")
                    raise SystemExit(0)
                # after the checkpoint: a failing validation costs no training; a stop request (a preemption
                # notice gives seconds) does not wait for one
                due = distil and c.eval.every and (step % c.eval.every == 0 or step == c.steps)
                if due and not any_process(stop.requested is not None):  # all hosts validate, or none
                    # process 0 alone writes the grid and scalars: a failure there stops every host with it
                    _, failed = attempt(functools.partial(validate_now, step))
                    stop_on(failed, gather_failures(failed)[0], f"could not validate step {step}",
                            "set eval.every=0 to train without validation or mend the cause, then")
                    logger.restart_clock()  # rates count training steps, not validation
            check_saved(wait=True)  # the last step's checkpoint
    finally:
        profiler.close()
        manager.wait_until_finished()
        logger.note(data.skip_report(final=True))
        logger.close()

    final = state.ema_params if state.ema_params is not None else state.params
    # every process gets the whole student (it may be spread over hosts); process 0 writes it
    result = Model(student.spec, jax.tree.map(np.asarray, multihost_utils.process_allgather(unstack(final),
                                                                                             tiled=True)))
    out = workdir / "stages" / c.name
    if jax.process_index() == 0:
        save_unet(out, student.spec, result.params)
    summary = {"steps": step, "params": count_params(student.spec)}
    if distil:
        after = agreement(final, teacher_params)
        summary |= {"agreement_before": before, "agreement_after": after}
        print(f"stage {c.name}: student vs teacher, relative MSE of the noise prediction on a fixed validation "
              f"batch: before {before if before is None else f'{before:.4f}'} → after {after:.4f}")
    if jax.process_index() == 0:  # the marker says the stage is finished: written whole or not at all
        atomic_json(out / STAGE_MARKER, summary | identity | {"stage": c.name, "config": meta["config"],
                                                               "resumes": meta.get("resumes", [])})
    print(f"stage {c.name}: student written to {out}")
    return result, summary


# ---- helpers ------------------------------------------------------------------------------------

class _Profiler:
    """A jax.profiler trace of steps first .. first + steps − 1 (1-based, as logged) on process 0, written
    where TensorBoard's profile tab finds it (DIR/plugins/profile/RUN/)."""

    def __init__(self, first: int, steps: int, directory: Path):
        self.first, self.last, self.directory = first, first + steps - 1, directory
        self.on = steps > 0 and jax.process_index() == 0
        self.tracing = False

    def before(self, step: int):
        if self.on and step == self.first:
            jax.profiler.start_trace(str(self.directory))
            self.tracing = True

    def after(self, step: int):
        if self.tracing and step == self.last:
            self.close()
            print(f"\nprofile of steps {self.first}–{self.last} written to {self.directory} (TensorBoard: profile tab)")

    def close(self):
        if self.tracing:
            jax.profiler.stop_trace()
            self.tracing = False


SAVE_FAILED = "could not write the checkpoint of step"


def _free_space(folder) -> str:
    """"; N GB free there" for a local folder (orbax's directory is an etils path), else ""."""
    free = _free_bytes(folder)
    return "" if free is None else f"; {_size(free)} free there"


def _free_bytes(folder) -> int | None:
    try:
        return shutil.disk_usage(str(folder)).free
    except OSError:
        return None


def _folder_bytes(folder) -> int | None:
    try:
        return sum(f.stat().st_size for f in Path(str(folder)).rglob("*") if f.is_file())
    except OSError:
        return None


def _size(n: int) -> str:
    return next(f"{n / scale:,.1f} {unit}" for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB"), (1, "B"))
                if n >= scale or unit == "B")


def _saved_note(step: int, folder) -> str:
    """The line that announces a written checkpoint: its size, the free disk, and a warning when the next one
    (about as large) will not fit, so the space is made before that save fails."""
    size, free = _folder_bytes(folder), _free_bytes(folder)
    note = f"checkpoint of step {step} written ({'size unknown' if size is None else _size(size)}{_free_space(folder)}"
    if size is not None and free is not None and free < 1.1 * size:
        note += "; the next checkpoint will not fit: free space there, or lower keep_checkpoints"
    return note + ")"


def _checkpoint_manager(directory: Path, c) -> ocp.CheckpointManager:
    # A save cut short (a second Ctrl-C, a killed job) leaves its STEP.orbax-checkpoint-tmp folder: removed here,
    # before this run saves anything (orbax's own cleanup_tmp_directories runs in a thread that can outlive the
    # manager and fail at exit).
    if jax.process_index() == 0 and directory.is_dir():
        for stale in directory.glob("*.orbax-checkpoint-tmp*"):
            print(f"{directory.name}: removed {stale.name}, a checkpoint cut short while being written")
            shutil.rmtree(stale, ignore_errors=True)
    options = ocp.CheckpointManagerOptions(max_to_keep=c.keep_checkpoints, enable_async_checkpointing=True)
    return ocp.CheckpointManager(directory.absolute(), options=options, item_names=("state", "meta"))


def _save_args(state: TrainState, meta: dict) -> ocp.args.Composite:
    return ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))


def _restore(manager: ocp.CheckpointManager, state: TrainState) -> tuple[TrainState, int, dict]:
    """(state, step, the checkpoint's meta) of the latest checkpoint (`check_stages` compared its meta with
    the config)."""
    step = manager.latest_step()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    try:
        restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                 meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 (orbax's tree or shape mismatch; a damaged file: tensorstore's errors)
        raise ValueError(f"cannot restore the checkpoint {manager.directory / str(step)}: {type(e).__name__}: "
                         f"{str(e)[:300]}. Either the config builds another training state than it holds "
                         "(ema_decay, scan_layers, the plan or the optimizer changed: restore the old config, or use "
                         f"a new --workdir), or it is damaged: {_damaged_remedy(manager.directory, step)}") from e
    return restored.state, int(restored.meta["data_position"]), dict(restored.meta)


def _resume_changes(meta: dict, c: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
    """The settings a stage resumes from its checkpoint (`meta`) with changed (`records.changes`), nor a path
    written another way. A field the checkpoint's version of the config did not have counts as its default
    (every option added since is off by default: what that version did), so turning it on is a change."""
    changed = changes(_with_defaults(base_config().to_dict(), meta.get("config") or {}), c.to_dict(),
                      shared_only=True)
    return {k: v for k, v in changed.items() if not (k == "stages" or k.startswith("stages.")
                                                     or k in PATH_FIELDS and _same_path(k, *v))}


def _with_defaults(defaults: dict, recorded: dict) -> dict:
    """`recorded` (a config as a checkpoint holds it), with the fields it lacks taken from `defaults`."""
    return defaults | {k: _with_defaults(defaults[k], v) if isinstance(v, dict) and isinstance(defaults.get(k), dict)
                       else v for k, v in recorded.items()}


def _damaged_remedy(directory: Path, step: int) -> str:
    """What to do about a damaged newest checkpoint: set it aside, so the run resumes from the one before."""
    earlier = [s for s in finished_steps(directory) if s < step]
    then = (f"the same command resumes from step {max(earlier)}, the newest before it" if earlier else
            "no earlier checkpoint is left: the stage starts again")
    return f"move it aside (mv {directory / str(step)} {directory / f'{step}.damaged'}) and {then}."


def _agreement_fn(student: UNet, teacher: UNet, acp, validation_batch: dict[str, np.ndarray], c, mesh, encode=None,
                  encoder_params=None):
    """Relative MSE between student and teacher predictions on a fixed validation batch spread over timesteps:
    one micro-batch of the global batch (what a training step holds at once), split over the mesh as in
    training."""
    micro = c.batch_size // c.optimizer.accumulation
    batch = {k: v[:micro] for k, v in validation_batch.items()}  # fixed for the whole run, at fixed noise
    if encode is not None:  # on-the-fly data: pixels and token ids → latents (the mean) and embeddings
        batch = dict(jax.jit(encode)(encoder_params, batch["pixels"], batch["input_ids"], batch["input_ids_2"])) | {
            "time_ids": batch["time_ids"]}
    rng = np.random.default_rng(c.seed + 1)
    n = batch["latents"].shape[0]
    timesteps = np.linspace(0, c.schedule.num_train_timesteps - 1, n).astype(np.int32)
    noisy = add_noise(jnp.asarray(acp), batch["latents"], rng.standard_normal(batch["latents"].shape, np.float32),
                      timesteps)
    inputs = {k: v for k, v in batch.items() if k != "latents"} | {"sample": noisy, "timesteps": timesteps}
    # every host holds the whole batch: each device takes its rows (all of them where n does not split)
    split = n % (mesh.shape["data"] * mesh.shape["fsdp"]) == 0
    sharding = batch_sharding(mesh) if split else replicated(mesh)
    inputs = {k: jax.make_array_from_callback(np.shape(v), sharding, lambda i, v=v: np.asarray(v)[i])
              for k, v in inputs.items()}

    @jax.jit
    def agreement(params, teacher_params, inputs):
        s = student.apply({"params": params}, **inputs).sample.astype(jnp.float32)
        t = teacher.apply({"params": teacher_params}, **inputs).sample.astype(jnp.float32)
        return jnp.mean(jnp.square(s - t)) / jnp.mean(jnp.square(t))

    return lambda p, tp: float(agreement(p, tp, inputs))


class _StopFlag:
    """Turns SIGTERM / SIGINT / SIGHUP into a request to checkpoint and stop at the end of the current step (a
    closed terminal or ssh session sends SIGHUP: its default would end the run unsaved)."""

    def __init__(self):
        self.requested, self.ctrl_c = None, False

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        # asked now: once the terminal has hung up, isatty() is already False when SIGHUP arrives
        self._ttys = [fd for fd in (1, 2) if os.isatty(fd)]
        return self

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)

    def _handle(self, signum, _frame):
        # a second Ctrl-C: stop now, unsaved (a SIGTERM beside the first one — launch/local.sh forwards Ctrl-C
        # as SIGTERM to processes that also got it from the terminal — is not a second request)
        if signum == signal.SIGINT and self.ctrl_c:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        if signum == signal.SIGHUP:  # the terminal is gone: writing to it would fail (EIO) before the checkpoint
            for fd in self._ttys:
                os.dup2(os.open(os.devnull, os.O_WRONLY), fd)
        self.ctrl_c |= signum == signal.SIGINT  # kept apart: the SIGTERM after a Ctrl-C must not hide it
        self.requested = signal.Signals(signum).name
        if signum == signal.SIGINT:
            print(f"\n{self.requested}: checkpointing after this step; Ctrl-C again to stop at once, unsaved",
                  file=sys.stderr)


def _validation_pipeline(c) -> str:
    """The SDXL pipeline folder of a stage's image validation ("" when there is none to run)."""
    from jaxdistill.sample import is_pipeline

    pipeline = c.eval.pipeline or c.data.pipeline or (c.teacher if c.teacher and is_pipeline(c.teacher) else "")
    return pipeline if c.eval.every else ""


def _check_validation(c) -> list[str]:
    """A stage's image validation, checked before any stage trains: its pipeline folder, and the steps its
    scheduler can take (else the first validation, `eval.every` steps in, would fail). → notes."""
    from jaxdistill.sample import make_scheduler, scheduler_config
    from jaxdistill.text import check_pipeline_folder

    pipeline = _validation_pipeline(c)
    if not pipeline:
        return [f"stage {c.name}: config.eval.pipeline is set, but eval.every=0: no image validation"
                ] if c.eval.pipeline else []
    try:
        check_pipeline_folder(pipeline)
        config = scheduler_config(pipeline)
        make_scheduler(c.eval.scheduler or None, config).set_timesteps(c.eval.steps)  # None: the pipeline's own
    except (OSError, ValueError) as e:
        raise ValueError(f"stage {c.name}: image validation (config.eval): {e}") from None
    return []


def _validation(c, teacher: Model, workdir: Path):
    """The image validation of a distillation stage, when an SDXL pipeline folder is at hand (else None)."""
    from jaxdistill.evaluate import Validation

    pipeline = _validation_pipeline(c)
    if not pipeline:
        return None
    size = {k: c.eval[k] for k in ("height", "width") if c.eval[k]}
    return Validation(pipeline, teacher.spec, teacher.params, prompts=list(c.eval.prompts), seeds=list(c.eval.seeds),
                      steps=c.eval.steps, guidance=c.eval.guidance, scheduler=c.eval.scheduler,
                      batch_size=c.eval.batch_size, **size)


def step_flops(teacher: UNetSpec | None, student: UNetSpec, batch: dict[str, np.ndarray], batch_size: int) -> float:
    """Model FLOPs of one step of `batch_size` samples shaped like `batch` (this host's part): per sample the
    teacher's forward (when there is one) + 3 × the student's (forward and backward), from XLA's cost
    analysis (`unet.flops`, cached per shape) — the count `bench/distill_step.py` and maxtext's TFLOP/s use."""
    if "latents" in batch:
        size, seq_len = batch["latents"].shape[1:3], batch["encoder_hidden_states"].shape[1]
    else:  # pixels and token ids, encoded inside the step
        size, seq_len = tuple(s // 8 for s in batch["pixels"].shape[1:3]), batch["input_ids"].shape[1]
    per_sample = 3 * flops(student, 1, tuple(size), seq_len) + (flops(teacher, 1, tuple(size), seq_len) if teacher
                                                                 else 0.0)
    return per_sample * batch_size


class _Logger:
    """Console progress bar, TensorBoard scalars and metrics.jsonl (written by process 0 only)."""

    def __init__(self, workdir: Path, stage: str, total: int, start: int, batch_size: int):
        from tqdm import tqdm

        # tensorboardX imports PyTorch where it is installed (~2 s of every start) only to accept its tensors;
        # ours are numpy: it is kept from importing it
        blocked = "torch" not in sys.modules
        if blocked:
            sys.modules["torch"] = None
        try:
            from tensorboardX import SummaryWriter
        finally:
            if blocked:
                del sys.modules["torch"]

        self.primary = jax.process_index() == 0
        self.batch_size, self.stage, self.workdir = batch_size, stage, workdir
        self.bar = tqdm(total=total, initial=start, desc=f"{stage}", unit="step", dynamic_ncols=True,
                        disable=not self.primary)
        # this stage logs again what came after `start` (its checkpoint, or 0 after a run killed before its
        # first one): drop those records of the earlier run, and a torn last line
        self.writer = (SummaryWriter(str(workdir / "tensorboard" / stage), purge_step=start + 1) if self.primary
                       else None)
        if self.primary and (workdir / "metrics.jsonl").is_file():
            lines = (workdir / "metrics.jsonl").read_text().splitlines(keepends=True)
            kept = [line for line in lines if not _after(line, stage, start)]
            if len(kept) < len(lines):
                (workdir / "metrics.tmp").write_text("".join(kept))
                os.replace(workdir / "metrics.tmp", workdir / "metrics.jsonl")
        self.jsonl = open(workdir / "metrics.jsonl", "a") if self.primary else None  # noqa: SIM115
        self.timing, self.rates_text = False, {}
        self.restart_clock()

    def restart_clock(self):
        """Rates count from here (after validation or the first step, which includes compilation)."""
        self.t0, self.steps, self.flop, self.wait = time.perf_counter(), 0, 0.0, 0.0

    def waited(self, seconds: float):
        """The loop waited `seconds` for its next batch (read ahead: nothing, unless the input is slower)."""
        self.wait += seconds

    def step(self, step: int, values: dict[str, float], log: bool, flop: float):
        """After `step` (of `flop` model FLOPs) finished: the bar, and on `log` the scalars, with samples/s,
        model TFLOP/s per device and the share of the time spent waiting for batches over the steps since
        the last log (the first step's compilation, and validation, excluded)."""
        self.bar.update(1)
        if not self.timing:
            self.timing = True
            self.restart_clock()
        else:
            self.steps, self.flop = self.steps + 1, self.flop + flop
        if not (log and self.primary):
            return
        rates = {}
        if self.steps:
            elapsed = max(time.perf_counter() - self.t0, 1e-9)
            rates = {"samples_per_s": self.steps * self.batch_size / elapsed,
                     "tflop_per_s_per_device": self.flop / elapsed / jax.device_count() / 1e12,
                     "data_wait": self.wait / elapsed}  # > 0.1: the input pipeline holds the device back
            self.rates_text = {"samples_s": f"{rates['samples_per_s']:.1f}",
                               "tflop_s": f"{rates['tflop_per_s_per_device']:.3g}"}
            self.restart_clock()
        features = sorted(((v, k) for k, v in values.items() if k.startswith("feature/")), reverse=True)[:1]
        self.bar.set_postfix(loss=f"{values['loss']:.4f}", **self.rates_text,
                             **{k.split("/", 1)[1]: f"{v:.3g}" for v, k in features})
        for k, v in (values | rates).items():
            self.writer.add_scalar(f"{self.stage}/{k}", v, step)
        self.jsonl.write(json.dumps({"stage": self.stage, "step": step, **values, **rates}) + "\n")
        self.jsonl.flush()

    def note(self, text: str | None):
        """A line above the progress bar (process 0), when there is one."""
        if text and self.primary:
            self.bar.write(f"{self.stage}: {text}")

    def scalars(self, step: int, values: dict[str, float]):
        if self.primary:
            for k, v in values.items():
                self.writer.add_scalar(f"{self.stage}/{k}", v, step)
            self.jsonl.write(json.dumps({"stage": self.stage, "step": step, **values}) + "\n")
            self.jsonl.flush()

    def image(self, step: int, tag: str, image):
        """A PIL image to TensorBoard and to WORKDIR/samples/STAGE/TAG_STEP.png."""
        if self.primary:
            self.writer.add_image(f"{self.stage}/{tag}", np.asarray(image.convert("RGB")), step, dataformats="HWC")
            folder = self.workdir / "samples" / self.stage
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{tag}_{step:07d}.png")

    def close(self):
        self.bar.close()
        if self.primary:
            self.writer.close()
            self.jsonl.close()


def _after(line: str, stage: str, step: int) -> bool:
    """Whether a metrics.jsonl line is a record of `stage` after `step` (a torn last line counts as one)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return True
    return record.get("stage") == stage and record.get("step", 0) > step


def enable_compilation_cache(setting: str, workdir: str | Path) -> None:
    """Turns on XLA's persistent compilation cache for this process ("auto": WORKDIR/xla_cache; a folder;
    "": off; gs:// folders work, as jax reads them), so a restarted run loads its compiled programs instead of
    compiling them again. A process setting, hence here and not in `run`."""
    if setting:
        path = str(Path(workdir) / "xla_cache") if setting == "auto" else os.path.expanduser(setting)
        jax.config.update("jax_compilation_cache_dir", path)


def main(argv=None) -> int:
    from absl import app, flags
    from absl import logging as absl_logging
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "a config file, e.g. configs/ssd1b.py", lock_config=True)
    flags.DEFINE_string("workdir", None, "where checkpoints, logs and the student go (resumes if present)")
    flags.mark_flags_as_required(["config", "workdir"])
    args = list(sys.argv if argv is None else argv)
    given = [b for a, b in zip(args, args[1:] + [""], strict=True) if a == "--config"] + [
        a.split("=", 1)[1] for a in args if a.startswith("--config=")]
    for path in given:  # ml_collections reports a missing file as a chain of load failures
        if not os.path.isfile(path.split(":")[0]):
            print(f"error: --config {path}: no such file (the configs that come with jaxdistill: configs/tiny.py, "
                  "configs/ssd1b.py, configs/vega.py)", file=sys.stderr)
            sys.exit(2)

    started = False

    def _main(rest):
        nonlocal started
        started = True
        if len(rest) > 1:  # absl hands on what is not a flag (a stray word): ignored, it would hide a mistake
            print(f"error: unexpected arguments {rest[1:]}: every setting is a flag, --config.FIELD=VALUE",
                  file=sys.stderr)
            sys.exit(2)
        absl_logging.set_verbosity(absl_logging.WARNING)  # orbax logs every save at INFO
        config = flags.FLAGS.config
        # --config.steps=4 means 4 steps in every stage, also where the file's stages set their own
        for note in command_line_wins(config, list(config_flags.get_override_values(flags.FLAGS["config"]))):
            print(note)
        try:  # multi-host: TPU VM slices, SLURM, or JAX_COORDINATOR_ADDRESS & co.
            initialize_distributed()
        except (ValueError, RuntimeError) as e:  # an incomplete JAX_* description, a task short of its GPUs
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)
        enable_compilation_cache(config.compilation_cache, flags.FLAGS.workdir)
        try:
            run(config, flags.FLAGS.workdir)
        except (ValueError, OSError, NonFiniteLoss, OutOfDeviceMemory) as e:  # OSError: a disk filled mid-run
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    try:
        # outside the loop (_StopFlag's) there is nothing to save; an unfinished save is removed at the next start
        with cli.stop_on_sigterm("stopped outside the training loop (loading, compiling or writing results); run "
                                 "the same command to resume from the last finished checkpoint"):
            app.run(_main, argv=argv)
    except KeyboardInterrupt:  # a second Ctrl-C (_StopFlag): one line, not tracebacks of the save in flight
        print("\nstopped at once, unsaved: the run resumes from its last finished checkpoint", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(130)  # orbax's save threads would raise at the interpreter's exit, each with its own traceback
    except (KeyError, AttributeError) as e:
        message = e
        while isinstance(message, BaseException) and message.args:  # ml_collections wraps a KeyError's text
            message = message.args[0]
        message = str(message)
        field = message.split("\n")[0].strip("'\"")
        named = [a for a in (argv or sys.argv) if a.startswith("--config.") and field in a.split("=")[0].split(".")]
        if started or not named:  # a bug, or a mistake inside the config file: the traceback says where
            raise
        message = message.replace("\n", ": ")
        like = fields_like(named[0].split("=")[0].removeprefix("--config.")) if "Did you mean" not in message else []
        if like:
            message += f"; did you mean {' or '.join(f'--config.{p}' for p in like[:3])}?"
        print(f"error: unknown config field on the command line: {message} (every field: jaxdistill/config.py)",
              file=sys.stderr)
        sys.exit(2)
    return 0


if __name__ == "__main__":
    from jaxdistill.train import main as _main  # the imported module's classes, not __main__'s copies

    _main()
