"""`python -m jaxdistill.export`: hand a trained student to diffusers users.

Writes the student of a training checkpoint (`WORKDIR`, `WORKDIR/checkpoints/STAGE[/STEP]`), of a finished
stage (`WORKDIR/stages/NAME`) or of any UNet folder as a diffusers UNet folder in fp16, bf16 or fp32 — or,
with `--pipeline-from`, as a complete SDXL pipeline folder: the teacher pipeline's VAE, text encoders,
tokenizers and scheduler copied file by file (safetensors, JSON and text only; pickled weights are refused,
never read) around the new `unet/`. Beside the weights: a Hugging Face model card (`README.md`) and the same
facts as JSON (`jaxdistill_export.json`), which a later re-export of the folder carries forward.

The output appears as a whole or not at all: it is built in a hidden sibling folder and renamed into place;
a non-empty `--out` is replaced only with `--overwrite`, and only once the new folder is complete. Every
refusal (missing or incomplete checkpoint, a pipeline missing a component, text encoders whose widths do
not fit the student, weights that do not fit the dtype) comes before anything is written.
Not here: sampling or evaluation, pushing to the Hub, converting the VAE or text encoders.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
import ml_dtypes
import numpy as np

from jaxdistill import records
from jaxdistill.checkpoint import (
    CheckpointError,
    checkpoint_spec,
    finished_steps,
    load_checkpoint,
    resolve_checkpoint,
)
from jaxdistill.config import stages_of
from jaxdistill.convert import (
    CONFIG_NAME,
    OutFolderError,
    check_out,
    is_workdir,
    load_unet,
    resolve_unet_folder,
    save_unet,
    to_diffusers_state_dict,
    weights_variant,
    whole_folder,
)
from jaxdistill.prune import PlanError, load_plan
from jaxdistill.records import read_json
from jaxdistill.spec import CROSS_ATTN_MID, UNetSpec, UnsupportedConfigError
from jaxdistill.train import STAGE_MARKER
from jaxdistill.unet import count_params

DTYPES = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16, "fp32": np.float32}
FACTS_NAME = "jaxdistill_export.json"
CARD_NAME = "README.md"
PLAN_NAME = "prune_plan.json"  # beside a student written by `python -m jaxdistill.prune`
# What StableDiffusionXLPipeline needs besides the UNet; the first three carry weights.
SDXL_CONDITIONING = (2048, 1280)  # cross-attention width of both text encoders, pooled width of the second
PIPELINE_COMPONENTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
WEIGHTED_COMPONENTS = ("vae", "text_encoder", "text_encoder_2")
COPIED_SUFFIXES = (".safetensors", ".json", ".txt")
PICKLED_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
SDXL_TIME_IDS = 6  # original size, crop top-left, target size: what StableDiffusionXLPipeline feeds the UNet
TAGS = ("stable-diffusion-xl", "text-to-image")  # and "distillation" for a student distilled from a known teacher


class ExportError(ValueError):
    """An export that cannot be done as asked; nothing was written."""


@dataclasses.dataclass
class Student:
    """A student to export: architecture, float32 weights (numpy, the layout `save_unet` writes) and what is
    known of how it was made (`provenance`: source, stage, step, ema, teacher, plan, kept_layers, config)."""

    spec: UNetSpec
    params: dict
    provenance: dict[str, Any]


def load_student(path: str | os.PathLike, *, ema: bool | None = None, stage: str | None = None) -> Student:
    """The student behind `path`: a training checkpoint (workdir, stage or step folder; `stage` picks a stage
    of a workdir; `ema` as `load_checkpoint`: None follows the run, True / False ask for the EMA / trained
    weights), or a UNet / pipeline folder (a finished stage, a pruned student, an earlier export: one set of
    weights, refused when `ema` asks for what it is known not to be). Raises CheckpointError or ExportError
    naming the problem."""
    path = Path(path)
    folder = _unet_folder(path)
    if folder is None:
        _check_stage_and_step(path, stage)
        spec, params, meta = load_checkpoint(path, ema=ema, stage=stage)
        checkpoint = Path(meta["checkpoint"])
        return Student(spec, params, {
            "source": str(checkpoint.absolute()), "stage": meta.get("stage"), "step": meta["step"],
            "ema": meta["ema"], "teacher": meta.get("teacher") or None, "plan": meta.get("plan") or None,
            "kept_layers": meta.get("kept_layers") or {}, "config": meta.get("config") or None,
            "resumes": meta.get("resumes") or [],
            "workdir": str(checkpoint.parents[2])})  # WORKDIR/checkpoints/STAGE/STEP
    if stage is not None:
        raise ExportError(f"--stage picks a stage of a training workdir; {path} is a model folder (one model)")
    provenance = folder_provenance(path, folder)
    check_weights_choice(path, provenance, ema)
    try:
        spec, params = load_unet(folder)
    except (OSError, ValueError) as e:  # WeightsError, UnsupportedConfigError, missing weights
        raise ExportError(f"cannot read the UNet in {folder}: {e}") from e
    return Student(spec, jax.tree.map(lambda x: np.asarray(x, np.float32), params), provenance)


def which_weights(path: str | os.PathLike, *, ema: bool | None = None,
                  stage: str | None = None) -> tuple[Path, bool | None]:
    """Which weights `load_student(path, ema=, stage=)` reads, without reading them, so that two equal answers
    are the same weights: (the training checkpoint's step folder, whether its EMA weights) for a checkpoint
    (`ema` None: as its run hands them on) and for a finished stage's folder (its run's last checkpoint, while
    that is there: the stage folder is those weights); (the UNet folder, None) for any other model folder.
    Paths resolved. Raises CheckpointError as `load_student`."""
    path = Path(path)
    folder = _unet_folder(path)
    if folder is not None:
        prov = folder_provenance(path, folder)
        if (folder / STAGE_MARKER).is_file() and prov.get("stage") and prov.get("step"):
            stage_dir = Path(prov["workdir"]) / "checkpoints" / prov["stage"]
            if prov["step"] in finished_steps(stage_dir):
                return (stage_dir / str(prov["step"])).resolve(), bool(prov.get("ema"))
        return folder.resolve(), None
    _check_stage_and_step(path, stage)
    stage_dir, step = resolve_checkpoint(path, stage)
    if ema is None:  # the weights its run handed on: EMA when it kept them
        ema = (_stage_config(stage_dir.parents[1], stage_dir.name) or {}).get("ema_decay", 0) > 0
    return (stage_dir / str(step)).resolve(), ema


def recorded_teacher(path: str | os.PathLike) -> str | None:
    """The teacher that the student of `path` (a training checkpoint, a finished stage or its export) was
    distilled from, as its run recorded it; for a progressive stage the stage before's student folder. None
    when nothing is recorded (a foreign UNet folder, a stage trained without a teacher)."""
    path = Path(path)
    folder = _unet_folder(path)
    if folder is not None:
        prov = folder_provenance(path, folder)
    else:
        try:
            stage_dir, _ = resolve_checkpoint(path)
        except CheckpointError:
            return None
        workdir, name = stage_dir.parents[1], stage_dir.name  # WORKDIR/checkpoints/STAGE
        prov = {"workdir": str(workdir), "stage": name, "teacher": (_stage_config(workdir, name) or {}).get("teacher")}
    if prov.get("teacher") == "previous":
        _, _, before = _previous_teachers(prov.get("workdir"), prov.get("stage"))
        return str(before) if before else None
    return prov.get("teacher") or None


def checkpoint_hint(path: str | os.PathLike) -> str:
    """For an error about a checkpoint `path` that is not there: what its workdir does hold ("; finished steps
    in WORKDIR/checkpoints/STAGE: 50, 100", "; stages in WORKDIR/checkpoints: teacher, ssd1b"), else ""."""
    path = Path(path)
    parent = path.parent
    if parent.name == "checkpoints" and parent.is_dir():
        stages = sorted(d.name for d in parent.iterdir() if d.is_dir() and finished_steps(d))
        return f"; stages in {parent}: {', '.join(stages) or 'none finished'}"
    if path.name.isdigit() and parent.parent.name == "checkpoints" and parent.is_dir():
        steps = finished_steps(parent)
        return f"; finished steps in {parent}: {', '.join(map(str, steps)) or 'none'}"
    return ""


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON record of a folder (model_index.json, a stage marker, earlier export facts); ExportError naming
    the file when it cannot be read or is not a JSON object (a truncated copy, say)."""
    data = read_json(path, error=ExportError, remedy="restore it from the original folder")
    if not isinstance(data, dict):
        raise ExportError(f"{path} holds {type(data).__name__}, not a JSON object; restore it from the original folder")
    return data


def pipeline_files(pipeline_dir: str | os.PathLike, variant: str | None = None) -> dict[str, list[Path]]:
    """The files to copy from an SDXL pipeline folder, per component: everything model_index.json lists but
    the UNet, and at least SDXL's six components; each must be there, with safetensors weights where it has
    weights. Of a component's weights, one set: the `variant`'s (e.g. "fp16") where it has them, else the
    plain ones, as diffusers' `from_pretrained(variant=)` picks them. Together with `check_conditioning` the
    whole check of `--pipeline-from` (configs only)."""
    root = Path(pipeline_dir)
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise ExportError(f"--pipeline-from {root} is not a diffusers pipeline folder (no model_index.json)")
    index = _read_json(index_file)
    listed = [k for k, v in index.items() if not k.startswith("_") and k != "unet"
              and isinstance(v, list) and v and v[0] is not None]
    components = list(dict.fromkeys((*PIPELINE_COMPONENTS, *listed)))
    missing = [c for c in components if not (root / c).is_dir()]
    if missing:
        raise ExportError(f"--pipeline-from {root} lacks {', '.join(f'{c}/' for c in missing)}: an SDXL pipeline "
                          f"needs {', '.join(PIPELINE_COMPONENTS)} (and whatever model_index.json lists)")
    files = {}
    for component in components:
        found = sorted(p for p in (root / component).rglob("*") if p.is_file() and not p.name.startswith("."))
        kept = [p for p in found if p.suffix in COPIED_SUFFIXES]
        pickled = [p.name for p in found if p.suffix in PICKLED_SUFFIXES]
        sets: dict[str | None, list[Path]] = {}
        for p in kept:
            if ".safetensors" in p.name:  # weights, or the index of sharded ones
                sets.setdefault(weights_variant(p.name), []).append(p)
        chosen = sets.get(variant) if variant in sets else sets.get(None, [])
        if sets and not chosen:
            names = ", ".join(p.name for paths in sets.values() for p in paths)
            others = sorted(v for v in sets if v)
            raise ExportError(f"--pipeline-from {root}: {component}/ has only variant weights ({names}), which "
                              f"diffusers loads only when asked for that variant; export with --variant "
                              f"{others[0]}, or save the component once without a variant: "
                              f"`from_pretrained('{root}', subfolder='{component}', variant=...).save_pretrained("
                              f"'{root / component}')`")
        safetensors = [p for p in chosen if p.suffix == ".safetensors"]
        if (pickled or component in WEIGHTED_COMPONENTS) and not safetensors:
            what = f"only pickled weights ({', '.join(pickled)})" if pickled else "no safetensors weights"
            raise ExportError(f"--pipeline-from {root}: {component}/ has {what}. jaxdistill copies safetensors only "
                              "(unpickling can run code from the file); convert the component once with "
                              f"`from_pretrained(...).save_pretrained('{root / component}', safe_serialization=True)` "
                              "if you trust it")
        files[component] = [p for p in kept if ".safetensors" not in p.name] + chosen
    return files


def check_conditioning(pipeline_dir: str | os.PathLike, spec: UNetSpec) -> None:
    """Refuses a student whose conditioning does not fit the pipeline's text encoders and VAE: context width =
    the two encoders' hidden sizes together; text_encoder_2's pooled width + 6 time ids ×
    addition_time_embed_dim = projection_class_embeddings_input_dim; latent channels."""
    root = Path(pipeline_dir)

    def config(component):
        cfg = _read_json(root / component / "config.json")  # ExportError naming it when unreadable
        return cfg.get("text_config", cfg)  # a full CLIPConfig nests the text model's

    try:
        te1, te2, vae = config("text_encoder"), config("text_encoder_2"), config("vae")
        context, pooled = te1["hidden_size"] + te2["hidden_size"], te2["projection_dim"]
    except (OSError, KeyError, TypeError) as e:
        raise ExportError(f"--pipeline-from {root}: cannot read the text encoders' or the VAE's config ({e!r})") from e
    problems = []
    if spec.cross_attention_dim != context:
        problems.append(f"the student's cross_attention_dim is {spec.cross_attention_dim}, the text encoders give "
                        f"{te1['hidden_size']} + {te2['hidden_size']} = {context}")
    if spec.addition_embed_type != "text_time":
        problems.append("the student has no text_time embedding (addition_embed_type), which SDXL pipelines feed")
    elif spec.projection_class_embeddings_input_dim != pooled + SDXL_TIME_IDS * spec.addition_time_embed_dim:
        problems.append(f"the student's projection_class_embeddings_input_dim is "
                        f"{spec.projection_class_embeddings_input_dim}, the pipeline gives text_encoder_2's pooled "
                        f"{pooled} + {SDXL_TIME_IDS} time ids × {spec.addition_time_embed_dim} = "
                        f"{pooled + SDXL_TIME_IDS * spec.addition_time_embed_dim}")
    latent = vae.get("latent_channels", 4)
    if (spec.in_channels, spec.out_channels) != (latent, latent):
        problems.append(f"the student takes {spec.in_channels} and returns {spec.out_channels} latent channels, "
                        f"the VAE has {latent}")
    if problems:
        raise ExportError(f"the student does not fit the pipeline {root}: " + "; ".join(problems))


def export(checkpoint: str | os.PathLike, out: str | os.PathLike, *, ema: bool | None = None, dtype: str = "fp16",
           pipeline_from: str | os.PathLike | None = None, stage: str | None = None, overwrite: bool = False,
           base_model: str | None = None, variant: str | None = None, license: str | None = None) -> Path:
    """Writes the student of `checkpoint` to `out` (a UNet folder, or with `pipeline_from` an SDXL pipeline
    folder) with a model card and `jaxdistill_export.json`; see the module docstring. `variant` (e.g. "fp16")
    names the UNet's weights file as diffusers' `save_pretrained(variant=)` does, and picks that variant of the
    pipeline's components where they have it. `license`: the card's (default: the teacher pipeline's card's).
    Returns `out`."""
    out = Path(os.path.abspath(out))  # "." has no parent to write beside
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if variant is not None and not re.fullmatch(r"[A-Za-z0-9_]+", variant):
        raise ExportError(f"--variant {variant!r}: expected a plain name such as fp16 (letters, digits, _)")
    if base_model is not None and not re.fullmatch(r"[\w.-]+/[\w.-]+", base_model):
        raise ExportError(f"--base-model {base_model!r}: expected a Hub id, ORG/NAME (the Hub refuses a card whose "
                          "base_model is a path)")
    check_out(out, overwrite, (checkpoint, pipeline_from))  # before the slow part: a refusal costs nothing
    files = pipeline_files(pipeline_from, variant) if pipeline_from else None  # before the weights: can be large
    if pipeline_from:  # the architecture from configs alone: a misfit is refused before gigabytes are read
        folder = _unet_folder(Path(checkpoint))
        if folder is None:
            _check_stage_and_step(Path(checkpoint), stage)  # its refusal names the stages and steps there are
        spec = UNetSpec.from_diffusers_config(folder / CONFIG_NAME) if folder else checkpoint_spec(checkpoint, stage)
        check_conditioning(pipeline_from, spec)
    student = load_student(checkpoint, ema=ema, stage=stage)
    _check_weights(student.params, dtype)
    licence = {"license": license} if license else _card_license(pipeline_from) if pipeline_from else {}
    facts = describe(student, dtype, pipeline_from, files, base_model) | {"variant": variant, "license": licence}

    with whole_folder(out, overwrite) as tmp:
        save_unet(tmp / "unet" if files else tmp, student.spec, student.params, dtype=DTYPES[dtype], variant=variant)
        if files:
            src = Path(pipeline_from)
            for p in (p for paths in files.values() for p in paths):
                target = tmp / p.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, target)
            for p in sorted(src.glob("LICENSE*")):  # the teacher's license covers what is derived from it
                if p.is_file():
                    shutil.copyfile(p, tmp / p.name)
            index = json.loads((src / "model_index.json").read_text())
            index["unet"] = ["diffusers", "UNet2DConditionModel"]
            (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        (tmp / FACTS_NAME).write_text(json.dumps(facts, indent=2))
        (tmp / CARD_NAME).write_text(model_card(facts, out.name))
    return out


def describe(student: Student, dtype: str, pipeline_from: str | os.PathLike | None = None,
             files: dict[str, list[Path]] | None = None, base_model: str | None = None) -> dict[str, Any]:
    """The facts of an export (written as `jaxdistill_export.json` and rendered into the model card)."""
    spec, prov = student.spec, student.provenance
    n = count_params(spec)
    teacher = prov.get("teacher")
    first_teacher, folder = prov.get("first_teacher") or teacher, teacher
    if teacher == "previous":  # a progressive stage: its teacher is the stage before's student
        teacher, first_teacher, folder = _previous_teachers(prov.get("workdir"), prov.get("stage"))
    teacher_params = prov.get("teacher_params") or _teacher_params(folder)
    config = prov.get("config")
    if base_model is None:
        base_model = prov.get("base_model") or _hub_id(first_teacher)
    return {
        "format": "jaxdistill-export/1",
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "source": prov.get("source"),
        "stage": prov.get("stage"),
        "step": prov.get("step"),
        "ema": prov.get("ema"),
        "dtype": dtype,
        "params": n,
        "architecture": _architecture(spec),
        "teacher": teacher,
        "first_teacher": first_teacher,
        "teacher_params": teacher_params,
        "params_ratio": n / teacher_params if teacher_params else None,
        "base_model": base_model,
        "plan": prov.get("plan"),
        "kept_layers": prov.get("kept_layers") or {},
        "training": _training(config, prov.get("step"), prov.get("resumes")) if config else prov.get("training"),
        "agreement": prov.get("agreement"),
        "pipeline_from": str(pipeline_from) if pipeline_from else None,
        "components": sorted(files) if files else None,
    }


def model_card(facts: dict[str, Any], name: str = "student") -> str:
    """A Hugging Face model card (README.md with YAML front matter) from `describe`'s facts."""
    arch, training = facts["architecture"], facts.get("training")
    # Only a training record (a checkpoint, a finished stage, or an export of them: a step) tells whether there
    # was a teacher; a pruned-only student or a foreign UNet folder says nothing of it.
    trained = facts.get("step") is not None
    distilled = trained and bool(facts.get("teacher"))
    tags = [*TAGS, "distillation"] if distilled else list(TAGS)
    front = ["---", "library_name: diffusers", "tags:", *(f"- {t}" for t in tags)]
    front += [f"{k}: {v}" for k, v in (facts.get("license") or {}).items()]
    if facts.get("base_model"):
        front.append(f"base_model: {facts['base_model']}")
    if facts.get("components"):
        front.append("pipeline_tag: text-to-image")
    lines = [*front, "---", "", f"# {name}", ""]
    kind = "an SDXL pipeline" if facts.get("components") else "an SDXL-family UNet"
    lines += [f"{_making(facts.get('plan'), trained, distilled)}, exported by jaxdistill as {kind} "
              f"(diffusers format, UNet weights in {facts['dtype']}).", ""]
    lines += ["| | |", "|---|---|", f"| parameters (UNet) | {_count(facts['params'])} |"]
    if facts.get("teacher_params"):
        lines += [f"| teacher parameters | {_count(facts['teacher_params'])} |",
                  f"| student / teacher | {facts['params_ratio']:.3f} ({1 / facts['params_ratio']:.2f}× smaller) |"]
    no_teacher = "none (trained without a teacher)" if trained else "unknown"
    lines += [f"| teacher | {facts.get('teacher') or no_teacher} |"]
    if facts.get("first_teacher") and facts["first_teacher"] != facts.get("teacher"):
        lines += [f"| first stage's teacher | {facts['first_teacher']} |"]
    lines += [
              f"| prune plan | {facts.get('plan') or 'none'} |",
              f"| stage | {facts.get('stage') or 'unknown'} |",
              f"| training steps | {_or_unknown(facts.get('step'))} |",
              f"| weights | {_ema_text(facts.get('ema'))} |",
              f"| UNet dtype | {facts['dtype']} |",
              f"| source | `{facts.get('source')}` |", ""]
    mid_resnets = {CROSS_ATTN_MID: 2, None: 0}.get(arch["mid_block_type"], 1)
    lines += ["## Architecture", "",
              "Down blocks from the input, up blocks from the bottom; transformer layers after each resnet:", "",
              "| | widths | block types | transformer layers | resnets per block |", "|---|---|---|---|---|",
              f"| down | {arch['block_out_channels']} | {', '.join(arch['down_block_types'])} | "
              f"{arch['transformer_depths']['down']} | {arch['layers_per_block']} |",
              f"| mid | {arch['block_out_channels'][-1]} | {arch['mid_block_type'] or 'none'} | "
              f"{arch['transformer_depths']['mid']} | {mid_resnets} |",
              f"| up | {arch['block_out_channels'][::-1]} | {', '.join(arch['up_block_types'])} | "
              f"{arch['transformer_depths']['up']} | {[n + 1 for n in arch['layers_per_block'][::-1]]} |", "",
              f"Attention heads per block {arch['attention_heads']}, cross-attention width "
              f"{arch['cross_attention_dim']}, pooled text embedding {arch['pooled_dim']}.", ""]
    if facts.get("kept_layers"):
        lines += ["Kept from the teacher (indices of the teacher named above):" if facts.get("teacher") else
                  "Kept from the pruned teacher (its layer indices):", ""]
        lines += [f"- `{k}`: {list(v)}" for k, v in facts["kept_layers"].items()] + [""]
    if training:
        lines += ["## Training", "", "| | |", "|---|---|"]
        lines += [f"| {k.replace('_', ' ')} | {_value(v)} |" for k, v in training.items()] + [""]
    if facts.get("agreement"):
        a = facts["agreement"]
        lines += [f"Student vs teacher, relative MSE of the noise prediction on the run's validation batch: "
                  f"{_value(a.get('before'))} before, {_value(a.get('after'))} after distillation.", ""]
    lines += ["## Usage", "", "```python", "import torch"]
    variant = f', variant="{facts["variant"]}"' if facts.get("variant") else ""
    if facts.get("components"):
        lines += ["from diffusers import StableDiffusionXLPipeline", "",
                  f'pipe = StableDiffusionXLPipeline.from_pretrained("{name}", torch_dtype=torch.float16{variant})',
                  'pipe = pipe.to("cuda")']
    else:
        arch = facts["architecture"]
        base = facts.get("base_model")
        if base is None and (arch["cross_attention_dim"], arch["pooled_dim"]) == SDXL_CONDITIONING:
            base = "stabilityai/stable-diffusion-xl-base-1.0"
        if base is None:  # not SDXL's text encoders: say what the pipeline must give
            lines += [f"# PIPELINE: an SDXL-family pipeline whose text encoders give {arch['cross_attention_dim']} "
                      f"(both together) and a pooled {arch['pooled_dim']}"]
        lines += ["from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel", "",
                  f'unet = UNet2DConditionModel.from_pretrained("{name}", torch_dtype=torch.float16{variant})',
                  f'pipe = StableDiffusionXLPipeline.from_pretrained("{base or "PIPELINE"}", unet=unet, '
                  'torch_dtype=torch.float16)', 'pipe = pipe.to("cuda")']
    lines += ['image = pipe("an astronaut riding a horse on the moon", num_inference_steps=25).images[0]', "```", ""]
    if facts.get("components"):
        lines += [f"The VAE, text encoders, tokenizers and scheduler are the teacher pipeline's "
                  f"(`{facts['pipeline_from']}`), copied unchanged: the VAE is kept as the teacher pipeline ships "
                  "it. SDXL's original VAE overflows in float16; diffusers upcasts it to float32 for decoding when "
                  "its config says `force_upcast`.", ""]
    lines += [f"Facts as JSON: `{FACTS_NAME}`. In JAX: `jaxdistill.load_unet(\"{name}\")`.", ""]
    return "\n".join(lines)


# ---- helpers ------------------------------------------------------------------------------------

def _card_license(folder: str | os.PathLike) -> dict[str, str]:
    """The license fields (`license`, and for "other" its `license_name` / `license_link`) of the model card's
    front matter (README.md) in `folder`; {} when it has none."""
    import yaml
    from huggingface_hub.repocard import metadata_load

    try:
        meta = metadata_load(Path(folder) / CARD_NAME) or {}
    except (OSError, ValueError, yaml.YAMLError):  # no card, or front matter that is not YAML
        return {}
    return {k: meta[k] for k in ("license", "license_name", "license_link") if isinstance(meta.get(k), str)}


def _unet_folder(path: Path) -> Path | None:
    """The UNet folder of a UNet or pipeline folder; None for anything else, a training workdir first (it has a
    config.json too, the run's, without `_class_name`, and may hold an export in a `unet/` subfolder).
    ExportError naming a model config that cannot be read."""
    if is_workdir(path):
        return None
    for folder in (path, path / "unet"):
        if (folder / CONFIG_NAME).is_file() and "_class_name" in _read_json(folder / CONFIG_NAME):
            return folder
    return None


def check_weights_choice(path: Path, provenance: dict[str, Any], ema: bool | None):
    """A model folder holds one set of weights: `ema` True / False (--ema / --no-ema) may only ask for what its
    record (`folder_provenance`: a stage marker, export facts) says they are; None takes them as they are."""
    if ema and not provenance.get("ema"):
        raise ExportError(f"--ema: {path} is a model folder with one set of weights, not known to be EMA weights; "
                          "--ema picks the EMA weights of a training checkpoint (WORKDIR/checkpoints/STAGE)")
    if ema is False and provenance.get("ema"):
        raise ExportError(f"--no-ema: {path} holds EMA weights (its run had ema_decay > 0); the trained weights "
                          "are in the run's training checkpoint (WORKDIR/checkpoints/STAGE)")


def _check_stage_and_step(path: Path, stage: str | None):
    """Refuses a stage (`--stage`) or a stage / step folder that is not there, naming those that are."""
    if stage is not None and (path / "checkpoints").is_dir():
        if not finished_steps(path / "checkpoints" / stage):
            raise CheckpointError(f"--stage {stage}: {path} holds no finished checkpoint of that stage"
                                  + checkpoint_hint(path / "checkpoints" / stage))
    elif not path.exists() and checkpoint_hint(path):
        raise CheckpointError(f"checkpoint {path} does not exist{checkpoint_hint(path)}")


def folder_provenance(path: Path, folder: Path) -> dict[str, Any]:
    """What a model folder tells about its making: an earlier export's facts, a finished stage's marker
    (with the config the stage trained with; an older marker: the run's config.json two levels up), or a
    pruned student's plan."""
    prov: dict[str, Any] = {"source": str(path.absolute())}  # records name files in full
    for facts_file in (path / FACTS_NAME, folder / FACTS_NAME):
        if facts_file.is_file():  # re-export: carry the provenance forward
            old = _read_json(facts_file)
            keep = ("stage", "step", "ema", "teacher", "first_teacher", "teacher_params", "base_model", "plan",
                    "kept_layers", "training", "agreement")
            return prov | {k: old.get(k) for k in keep} | {"source": f"{path} (exported from {old.get('source')})"}
    marker = folder / STAGE_MARKER
    if marker.is_file():  # WORKDIR/stages/NAME, written by python -m jaxdistill.train
        done = _read_json(marker)
        workdir = folder.parent.parent
        config = done.get("config") or _stage_config(workdir, done.get("stage"))
        prov |= {"stage": done.get("stage"), "step": done.get("steps"), "teacher": done.get("teacher") or None,
                 "plan": done.get("plan") or None, "kept_layers": done.get("kept_layers") or {}, "config": config,
                 "resumes": done.get("resumes") or [],
                 "workdir": str(workdir), "ema": bool(config.get("ema_decay", 0) > 0) if config else None}
        if "agreement_after" in done:
            prov["agreement"] = {"before": done.get("agreement_before"), "after": done["agreement_after"]}
        return prov
    if (folder / PLAN_NAME).is_file():
        try:
            plan = load_plan(folder / PLAN_NAME)
            prov |= {"plan": plan.name, "kept_layers": {k: list(v) for k, v in plan.applied().items()}}
        except PlanError:
            pass  # a plan we cannot read is no reason to refuse the weights
    return prov


def _run_stages(workdir: str | os.PathLike | None) -> list[dict]:
    """The stage configs of the run in `WORKDIR/config.json`, rebuilt by the trainer's own rule; [] if unreadable."""
    if not workdir:
        return []
    try:
        return [s.to_dict() for s in stages_of(ml_collections.ConfigDict(
            json.loads((Path(workdir) / "config.json").read_text())))]
    except (OSError, ValueError, KeyError, AttributeError):
        return []


def _stage_config(workdir: Path, stage: str | None) -> dict | None:
    return next((s for s in _run_stages(workdir) if s["name"] == stage), None)


def _previous_teachers(workdir: str | None, stage: str | None) -> tuple[str, str | None, Path | None]:
    """For a stage whose teacher is "previous": (its teacher, described; the teacher of the run's first
    distillation in that chain, what the whole run started from; the stage before's student folder)."""
    stages = {s["name"]: s for s in _run_stages(workdir)}
    names = list(stages)
    if stage not in names[1:]:
        return "previous (the stage before in the same run)", None, None
    before = names[names.index(stage) - 1]
    folder = Path(workdir).absolute() / "stages" / before
    direct = f"stage {before}'s student ({folder})"
    i = names.index(stage)
    while i > 0 and stages[names[i]].get("teacher") == "previous":
        i -= 1
    first = stages[names[i]].get("teacher") or None
    if first is None and stages[names[i]].get("model"):
        first = f"stage {names[i]}'s model, trained from scratch ({stages[names[i]]['model']})"
    return direct, first, folder


def _hub_id(teacher: str | None) -> str | None:
    """The Hub id of a teacher read from the Hugging Face cache (…/models--ORG--NAME/snapshots/REVISION), else
    None. The trainer reads teachers from local folders only: a recorded `org/name` was a relative path (which
    may not exist from here, or may be something else on the Hub), so it is never taken for a Hub id."""
    found = re.search(r"models--([^/]+?)--([^/]+)/snapshots/", teacher or "")
    return f"{found[1]}/{found[2]}" if found else None


def _teacher_params(folder: str | os.PathLike | None) -> int | None:
    """The teacher's parameter count, when its UNet config can be found in `folder`."""
    if not folder:
        return None
    try:
        return count_params(UNetSpec.from_diffusers_config(resolve_unet_folder(folder) / CONFIG_NAME))
    except (OSError, ValueError):  # not at hand here, or not a config we read
        return None


def _check_weights(params: dict, dtype: str):
    """Refuses non-finite weights, and weights beyond float16's range for fp16 (they would become inf)."""
    limit = float(np.finfo(np.float16).max) if dtype == "fp16" else np.inf
    bad = []
    for key, value in to_diffusers_state_dict(params).items():
        if not np.isfinite(value).all():
            bad.append(f"{key} has NaN or Inf values")
        elif np.abs(value).max(initial=0) > limit:
            bad.append(f"{key} reaches {np.abs(value).max():.4g}, beyond float16's {limit:.0f}")
    if bad:
        hint = "; export with --dtype bf16 or fp32" if dtype == "fp16" else ""
        raise ExportError(f"the weights cannot be exported as {dtype}: " + "; ".join(bad[:10])
                          + (f" (and {len(bad) - 10} more)" if len(bad) > 10 else "") + hint)


def _architecture(spec: UNetSpec) -> dict[str, Any]:
    return {
        "block_out_channels": list(spec.block_out_channels),
        "down_block_types": list(spec.down_block_types),
        "up_block_types": list(spec.up_block_types),
        "layers_per_block": list(spec.layers_per_block),
        "transformer_depths": {"down": [list(d) for d in spec.down_depths],
                               "mid": spec.mid_depth if spec.mid_block_type == CROSS_ATTN_MID else 0,
                               "up": [list(d) for d in spec.up_depths]},
        "mid_block_type": spec.mid_block_type,
        "attention_heads": list(spec.num_attention_heads),
        "cross_attention_dim": spec.cross_attention_dim,
        "pooled_dim": (spec.projection_class_embeddings_input_dim - SDXL_TIME_IDS * spec.addition_time_embed_dim
                       if spec.addition_embed_type == "text_time" else None),
    }


def _training(c: dict[str, Any], step: int | None, resumes: list[dict] | None = None) -> dict[str, Any]:
    """The run config's facts a reader of the card wants (`c` is the stage's config as a dict, as the stage
    last resumed; `resumes`: the settings each resume changed)."""
    data, opt = c.get("data", {}), c.get("optimizer", {})
    resolution = data.get("resolution")
    if data.get("source") == "prepared":  # the prepared set's resolution, not the config's default
        try:
            info = json.loads((Path(data["path"]) / "jaxdistill_data.json").read_text())
            resolution = info["preprocessing"]["resolution"]
        except (OSError, KeyError, ValueError):
            resolution = None
    return {"steps": step, "planned_steps": c.get("steps"), "loss_weights": c.get("loss"),
            "resolution": resolution, "batch_size": c.get("batch_size"), "accumulation": opt.get("accumulation"),
            "lr": opt.get("lr"), "lr_schedule": opt.get("schedule"), "warmup_steps": opt.get("warmup_steps"),
            "weight_decay": opt.get("weight_decay"), "ema_decay": c.get("ema_decay"),
            "noise_offset": c.get("noise_offset"), "empty_prompt_rate": c.get("empty_prompt_rate"),
            "timestep_bias": c.get("timestep_bias"),
            "data": data.get("source") + (f" ({data['path']})" if data.get("path") else "") if data else None,
            "precision": c.get("precision"), "seed": c.get("seed")} | ({
            "changed_on_resume": "; ".join(f"from step {r['step']}: {records.describe(r['changed'])}" for r in resumes)}
        if resumes else {})


def _making(plan: str | None, trained: bool, distilled: bool) -> str:
    """The card's opening words, from what is known: pruned only with a plan, distilled only from a known
    teacher."""
    done = [word for word, known in (("pruned", plan), ("distilled", distilled)) if known]
    what = f"A {' and '.join(done)} Stable Diffusion XL UNet" if done else "A Stable Diffusion XL-family UNet"
    if plan and not trained:
        return what + ", not trained by jaxdistill (pruned only)"
    if trained and not distilled:
        return what + ", trained by jaxdistill without a teacher"
    return what if trained else what + " of unknown making (no jaxdistill training record)"


def _count(n: int) -> str:
    return f"{n:,} ({n / 1e9:.3g} B)" if n >= 1e8 else f"{n:,} ({n / 1e6:.3g} M)"


def _value(v: Any) -> str:
    if isinstance(v, dict):
        return ", ".join(f"{k} {_value(x)}" for k, x in v.items())
    if isinstance(v, float):
        return f"{v:.4g}"
    return _or_unknown(v)


def _or_unknown(v: Any) -> str:
    return "unknown" if v is None else str(v)


def _ema_text(ema: bool | None) -> str:
    return {True: "EMA of the trained weights", False: "the trained weights (no EMA)"}.get(ema, "unknown (EMA or not)")


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m jaxdistill.export`: write a trained student as a diffusers UNet folder, or with
    --pipeline-from as a complete SDXL pipeline folder, with a model card."""
    import argparse

    from jaxdistill import cli

    parser = cli.parser("export", main.__doc__)
    parser.add_argument("--checkpoint", required=True,
                        help="WORKDIR, WORKDIR/checkpoints/STAGE[/STEP], WORKDIR/stages/NAME, or any UNet folder")
    parser.add_argument("--out", required=True, help="the folder to write (refused if not empty, see --overwrite)")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                        help="a checkpoint's EMA weights (--ema) or trained weights (--no-ema); default: as the run "
                             "hands them on, its EMA weights when it kept them")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="fp16", help="UNet weight dtype (default fp16)")
    parser.add_argument("--pipeline-from", metavar="TEACHER_PIPELINE_DIR",
                        help="write a complete SDXL pipeline: VAE, text encoders, tokenizers, scheduler from here")
    parser.add_argument("--stage", help="with a workdir: the stage to export (default: the latest)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out once the export is done")
    parser.add_argument("--base-model", help="the model card's base_model, a Hub id (default: the teacher's, when it "
                                             "was read from the Hugging Face cache)")
    parser.add_argument("--variant", help="name the weights as diffusers' save_pretrained(variant=) does, e.g. fp16 "
                                          "(unet/diffusion_pytorch_model.fp16.safetensors; load with variant='fp16'); "
                                          "with --pipeline-from, the components' files of that variant where they "
                                          "have them (default: plain names, the components' plain files)")
    parser.add_argument("--license", help="the model card's license (default: the one in --pipeline-from's card, "
                                          "e.g. openrail++ for SDXL; its LICENSE files are copied)")
    args = parser.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out, ema=args.ema, dtype=args.dtype, pipeline_from=args.pipeline_from,
                     stage=args.stage, overwrite=args.overwrite, base_model=args.base_model, variant=args.variant,
                     license=args.license)
    except (CheckpointError, ExportError, OutFolderError, UnsupportedConfigError) as e:
        print(f"error: {e}", flush=True, file=sys.stderr)
        return 2
    facts = json.loads((out / FACTS_NAME).read_text())
    what = "SDXL pipeline with a" if facts["components"] else "a"
    made = ", ".join(x for x in (facts.get("stage") and f"stage {facts['stage']}",
                                 facts.get("step") is not None and f"step {facts['step']}",
                                 facts.get("ema") is not None and _ema_text(facts["ema"])) if x)
    print(f"export: {what} {facts['params']:,}-parameter {facts['dtype']} UNet"
          f"{f' ({made})' if made else ''} from {facts['source']} → {out} (model card {out / CARD_NAME})")
    source = Path(str(facts.get("source")))
    if source.parent.parent.name == "checkpoints" and facts.get("step") is not None:  # WORKDIR/checkpoints/STAGE/STEP
        done = set(finished_steps(source.parent))
        newer = sorted(int(d.name) for d in source.parent.iterdir()
                       if d.is_dir() and d.name.isdigit() and int(d.name) > facts["step"] and int(d.name) not in done)
        if newer:
            print(f"note: step {facts['step']} is the latest finished checkpoint; newer step folders "
                  f"{', '.join(map(str, newer))} are unfinished (a save still running, or cut short)")
    return 0


if __name__ == "__main__":
    # Run the imported module's main: under `python -m` this file is `__main__`, and its error classes would
    # not be the ones the library raises.
    from jaxdistill.export import main as _main

    raise SystemExit(_main())
