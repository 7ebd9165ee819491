"""Reading the student out of a training checkpoint, for sampling, evaluation and export.

`python -m jaxdistill.train` writes orbax checkpoints to `WORKDIR/checkpoints/STAGE/STEP`, each with the
training state (float32 master weights, optimizer state, EMA weights when on) and a JSON `meta` item that
carries the student's architecture (its diffusers config), the run's config, the teacher and the plan.
`load_checkpoint` accepts the workdir, a stage folder or a step folder and returns the student as
(UNetSpec, params) in the plain (unscanned) layout that `convert.save_unet` writes: by default the weights
the run itself hands on (its EMA weights when it kept them, as in WORKDIR/stages/NAME), else as asked. It
reads only those weights, as host numpy arrays, so a checkpoint of a run on a pod or a GPU mesh loads on any
machine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jaxdistill.convert import check_params
from jaxdistill.layers import unstack_layers
from jaxdistill.spec import UNetSpec


class CheckpointError(ValueError):
    """A checkpoint path that does not exist, is incomplete, or holds something else."""


def resolve_checkpoint(path: str | os.PathLike, stage: str | None = None) -> tuple[Path, int]:
    """(stage folder, step) for a workdir (its latest stage and step: `stage` picks another), a stage folder
    (`WORKDIR/checkpoints/NAME`, its latest step) or a step folder. Only finished checkpoints count."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist")
    # a step: not a workdir named by a date, nor the folder of a stage named by a number (it holds steps)
    if path.name.isdigit() and not (path / "checkpoints").is_dir() and not finished_steps(path):
        stage_dir, step = path.parent, int(path.name)
        if step not in finished_steps(stage_dir):
            raise CheckpointError(f"checkpoint {path} is incomplete (the run was stopped while writing it, or the "
                                  f"files are partly copied); finished steps in {stage_dir}: "
                                  f"{finished_steps(stage_dir) or 'none'}")
        return stage_dir, step
    if (path / "checkpoints").is_dir():
        stages = sorted((d for d in (path / "checkpoints").iterdir() if d.is_dir() and finished_steps(d)),
                        key=lambda d: max(os.path.getmtime(d / str(s)) for s in finished_steps(d)))
        if stage is not None:
            stages = [d for d in stages if d.name == stage]
        if not stages:
            raise CheckpointError(f"{path} holds no finished checkpoint" + (f" of stage {stage!r}" if stage else ""))
        path = stages[-1]  # the most recently written stage
    steps = finished_steps(path)
    if not steps:
        raise CheckpointError(f"{path} holds no finished checkpoint (expected WORKDIR, WORKDIR/checkpoints/STAGE "
                              "or WORKDIR/checkpoints/STAGE/STEP of python -m jaxdistill.train)")
    return path, max(steps)


def load_checkpoint(path: str | os.PathLike, *, ema: bool | None = None,
                    stage: str | None = None) -> tuple[UNetSpec, dict, dict[str, Any]]:
    """The student of a checkpoint → (spec, params as numpy float32 in the diffusers-mirroring layout, meta).
    `ema`: None follows the run — its EMA weights when it kept them (what it wrote to WORKDIR/stages/NAME and
    handed to the next stage), else the trained weights; True the EMA weights (refused when the run kept
    none); False the trained weights. meta gains "step", "checkpoint" and "ema" (whether EMA weights were
    taken)."""
    stage_dir, step = resolve_checkpoint(path, stage)
    folder = stage_dir / str(step)
    keys = {None: ("ema_params", "params"), True: ("ema_params",), False: ("params",)}[ema]
    # PyTreeCheckpointHandler reads the files StandardSave wrote and, unlike the Standard one, restores a part.
    manager = ocp.CheckpointManager(stage_dir.absolute(), item_handlers={"state": ocp.PyTreeCheckpointHandler(),
                                                                         "meta": ocp.JsonCheckpointHandler()})
    try:
        key, params, meta = _restore_weights(manager, step, keys)
    except Exception as e:  # orbax raises many kinds for damaged folders; name the folder and the cause
        raise CheckpointError(f"cannot read checkpoint {folder}: {type(e).__name__}: {e}") from e
    finally:
        manager.close()
    if params is None and ema:
        raise CheckpointError(f"checkpoint {folder} has no EMA weights (the run had ema_decay=0); take its "
                              "trained weights: leave out --ema (or pass --no-ema)")
    if params is None:
        raise CheckpointError(f"checkpoint {folder} holds no student weights (`params`); is it a checkpoint of "
                              "python -m jaxdistill.train?")
    meta = meta | {"step": step, "checkpoint": str(folder), "ema": key == "ema_params"}
    params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
    spec = UNetSpec.from_diffusers_config(meta["student_config"])
    if meta.get("config", {}).get("scan_layers", False):
        params = jax.tree.map(np.asarray, unstack_layers(params))
    check_params(spec, params)
    return spec, params, meta


def checkpoint_spec(path: str | os.PathLike, stage: str | None = None) -> UNetSpec:
    """The student's architecture in a checkpoint (`resolve_checkpoint`'s), from its meta alone: no weights read."""
    stage_dir, step = resolve_checkpoint(path, stage)
    manager = ocp.CheckpointManager(stage_dir.absolute(), item_handlers={"meta": ocp.JsonCheckpointHandler()})
    try:
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        return UNetSpec.from_diffusers_config(meta["student_config"])
    except Exception as e:  # orbax raises many kinds for damaged folders; name the folder and the cause
        raise CheckpointError(f"cannot read checkpoint {stage_dir / str(step)}: {type(e).__name__}: {e}") from e
    finally:
        manager.close()


def _restore_weights(manager: ocp.CheckpointManager, step: int,
                     keys: tuple[str, ...]) -> tuple[str | None, dict | None, dict]:
    """(the first of `keys` the state holds, that subtree as host numpy arrays, meta); (None, None, {}) when
    it holds none of them. Only that subtree is read: the optimizer moments (twice the weights) and the other
    weights stay on disk. Without a target orbax would place every array as it was saved, on the training
    run's mesh, which fails on a machine with other devices ("Topology mismatch"); numpy arrays fit any
    machine."""
    metadata = manager.item_metadata(step).state
    if metadata is None:
        raise ValueError("the training state's metadata is missing (files deleted or partly copied?)")
    saved = metadata.tree
    key = next((k for k in keys if saved.get(k) is not None), None)  # EMA off: the state saved ema_params=None
    if key is None:
        return None, None, {}
    target = {key: jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved[key])}
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(target, restore_args=as_numpy, partial_restore=True),
        meta=ocp.args.JsonRestore()))
    return key, restored.state[key], dict(restored.meta)


def finished_steps(stage_dir: Path) -> list[int]:
    """Steps orbax finished writing (it writes to a temporary name and renames at the end)."""
    if not stage_dir.is_dir():
        return []
    return sorted(int(d.name) for d in stage_dir.iterdir() if d.is_dir() and d.name.isdigit()
                  and (d / "_CHECKPOINT_METADATA").is_file())
