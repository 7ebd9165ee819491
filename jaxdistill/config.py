"""Training configuration: the defaults every config file starts from, and validation at start-up.

Config files are small Python files in `configs/` (`get_config()` returns an `ml_collections.ConfigDict`);
any field can be overridden on the command line (`--config.optimizer.lr=2e-5`). `validate` reports every
bad field by its dotted name before anything heavy runs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from jaxdistill.layers import ATTENTION
from jaxdistill.losses import NORMALIZATIONS
from jaxdistill.sample import SCHEDULER_NAMES
from jaxdistill.schedule import PREDICTION_TYPES, TIMESTEP_BIAS, TIMESTEP_BIAS_DEFAULTS
from jaxdistill.sharding import AXES, DEFAULT_RULES, rule_errors
from jaxdistill.step import LR_SCHEDULES

DTYPES = ("float32", "bfloat16")
REMAT = ("none", "full", "dots")


def base_config() -> ml_collections.ConfigDict:
    """SSD-1B's recipe, as far as it was published: 1024², lr 1e-5, batch 32 × 4 accumulation, SDXL's
    noise schedule, loss = task + 0.5 output + 0.5 feature (every resnet and attention tap)."""
    c = ml_collections.ConfigDict()
    c.teacher = ""  # diffusers UNet or pipeline folder
    c.student = ""  # an existing student folder; empty: the plan applied to the teacher
    c.plan = "ssd1b"  # preset name or plan JSON (see `python -m jaxdistill.prune`)
    c.sensitivity = ""  # a sensitivity report folder, for plans with strategy "sensitivity"
    c.model = ""  # with no teacher: a preset to train from scratch ("tiny-sdxl", "sdxl", ...)

    # snr_gamma: min-SNR-γ weights on the task term (diffusers' --snr_gamma; 5.0 is the paper's), 0: off
    c.loss = ml_collections.ConfigDict(dict(task=1.0, output=0.5, feature=0.5, taps="all", normalize="none",
                                            snr_gamma=0.0))
    c.schedule = ml_collections.ConfigDict(dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                                beta_schedule="scaled_linear", prediction_type="epsilon"))
    # optimizer.schedule: constant | cosine | linear (cosine and linear reach 0 at `steps`), after a linear warmup
    c.optimizer = ml_collections.ConfigDict(dict(lr=1e-5, warmup_steps=0, weight_decay=1e-2, b1=0.9, b2=0.999,
                                                 eps=1e-8, grad_clip=1.0, schedule="constant", accumulation=4))
    c.ema_decay = 0.0  # 0: no EMA of the student
    # diffusers' --noise_offset: noise + noise_offset · N(0, 1) per example and channel (e.g. 0.0357), 0: off
    c.noise_offset = 0.0
    # diffusers' --proportion_empty_prompts: that share of the examples trains with the empty prompt (zero text
    # embeddings, as SDXL pipelines sample it), student and teacher alike: the unconditional prediction that
    # classifier-free guidance uses is distilled too. 0: off
    c.empty_prompt_rate = 0.0
    # diffusers' --timestep_bias_*: some timesteps drawn `multiplier` times as often as the rest — strategy
    # earlier: the first `portion` of them (low noise, detail), later: the last (high noise, composition),
    # range: [begin, end); none: uniform
    c.timestep_bias = ml_collections.ConfigDict(dict(strategy="none") | TIMESTEP_BIAS_DEFAULTS)
    c.precision = ml_collections.ConfigDict(dict(teacher="bfloat16", student_compute="bfloat16",
                                                 encoders="float32"))  # SDXL's VAE overflows in float16
    # The device mesh (jaxdistill/sharding.py): sizes of data / fsdp / tensor (one may be -1: the rest of
    # the devices), slices per axis for multi-slice TPU (dcn), and the logical-axis → mesh-axis rules.
    c.mesh = ml_collections.ConfigDict(dict(sizes=dict(data=1, fsdp=-1, tensor=1),
                                            dcn=dict(data=1, fsdp=1, tensor=1),
                                            rules=tuple(tuple(r) for r in DEFAULT_RULES)))
    c.remat = "none"  # none | full | dots (keep matmul outputs)
    c.scan_layers = True  # scan over each attention module's layers: much faster compilation
    c.attention = "auto"  # fused kernel where it applies: auto (cuDNN on GPUs, else none) | xla | cudnn | splash (TPU)
    # XLA's persistent compilation cache (`python -m jaxdistill.train`): "auto" = WORKDIR/xla_cache, so a resumed
    # or restarted run reads its compiled step back instead of compiling again (80–140 s on an H100 at full
    # size); a folder shared by runs; "" = off.
    c.compilation_cache = "auto"

    # source "prepared": the TFDS set `python -m jaxdistill.prepare` wrote to `path`; "images": an image–
    # caption source spec in `path` (folder:, tar:, tfds:), encoded inside the train step by the VAE and
    # text encoders of the SDXL pipeline folder `pipeline`; "synthetic": a generated latent set (seq_len
    # and num_examples apply to it only). resolution: pixels (images, synthetic).
    # data.workers: threads decoding images for source "images" (0: one per CPU core, up to 16)
    c.data = ml_collections.ConfigDict(dict(source="synthetic", path="", pipeline="", resolution=1024, seq_len=77,
                                            num_examples=64, center_crop=False, random_flip=False, workers=0))
    # Validation during training: the student-vs-teacher agreement on a fixed batch before and after each stage,
    # and with `every` > 0 every `every` steps too, and then — with an SDXL pipeline folder for the VAE and
    # text encoders (`pipeline`, default data.pipeline or the teacher when it is one) — a teacher | student
    # image grid for `prompts` × `seeds` with latent MSE, PSNR and SSIM, in TensorBoard and WORKDIR/samples/STAGE/.
    c.eval = ml_collections.ConfigDict(dict(every=0, pipeline="", prompts=("a photo of an astronaut riding a horse",
                                                                           "a watercolor painting of a lighthouse"),
                                            seeds=(0,), steps=20, guidance=5.0, scheduler="", height=0, width=0,
                                            batch_size=4))
    c.batch_size = 128  # global, all micro-batches of one step together (32 × 4 accumulation)
    c.steps = 251_000
    c.log_every = 50
    # A jax.profiler trace of steps first..first + steps − 1 of each stage (0 steps: off), from process 0, into
    # WORKDIR/tensorboard/STAGE (TensorBoard's profile tab, with tensorboard-plugin-profile installed).
    c.profile = ml_collections.ConfigDict(dict(first=10, steps=0))
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    # A resumed run refuses another seed, batch_size, optimizer.accumulation, schedule or data than its
    # checkpoint's (its continuation would not be the uninterrupted run's); True resumes anyway.
    c.allow_resume_changes = False
    c.seed = 0
    # Progressive runs: a list of stages, each a dict overriding name / plan / teacher / steps / loss / lr.
    # teacher "previous" distils from the previous stage's student; each stage starts from that student.
    c.stages = []
    return c


def fields_like(written: str) -> list[str]:
    """What a command line that wrote the unknown field `written` ("resolution", "stages[1].stesp",
    "optimizer.lrr") probably meant: the fields whose last part is that name or close to it, those beside
    where it was written first, as dotted names written the same way ("data.resolution", "stages[1].steps")."""
    import difflib

    def leaves(node, prefix=""):
        for key, value in node.items():
            path = f"{prefix}{key}"
            yield from leaves(value, f"{path}.") if isinstance(value, ml_collections.ConfigDict) else [path]

    stage = written.partition("]")[0] + "]." if written.startswith("stages[") else ""  # a stage sets top fields
    parent, _, name = written.removeprefix(stage).rpartition(".")
    paths = list(leaves(base_config()))
    like = [p for p in paths if p.rpartition(".")[2] == name] or [
        p for p in paths if difflib.get_close_matches(name, [p.rpartition(".")[2]], cutoff=0.8)]
    like = [p for p in like if p.rpartition(".")[0] == parent] or like
    return [stage + p for p in like]


def validate(c: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming every invalid field, of the run and of each of its stages (a bad value in the
    last stage is reported before the first one trains)."""
    errors = [f"config.{e}" for e in _field_errors(c)]
    if not c.stages:
        if not (c.teacher or c.model):
            errors.append(f"config.teacher={c.teacher!r}: expected a diffusers UNet/pipeline folder "
                          "(--config.teacher=DIR)")
    bad = [i for i, stage in enumerate(c.stages) if not isinstance(stage, (Mapping, ml_collections.ConfigDict))]
    if bad:  # nothing else about the stages can be read
        raise ValueError("invalid config:\n  " + "\n  ".join(
            errors + [f"config.stages[{i}]={c.stages[i]!r}: expected a dict (name, plan, teacher, steps, ...)"
                      for i in bad]))
    names = [stage.get("name") for stage in c.stages]
    for i, stage in enumerate(c.stages):
        unknown = set(stage) - set(c) - {"name", "lr"}
        if unknown:
            errors.append(f"config.stages[{i}] has unknown fields {sorted(unknown)}; a stage sets name, lr, or any "
                          "top-level field (plan, teacher, steps, loss, optimizer, ...)")
        if "name" not in stage:
            errors.append(f"config.stages[{i}] needs a name (its results go to WORKDIR/stages/NAME)")
        elif names.count(stage["name"]) > 1:
            errors.append(f"config.stages[{i}] repeats the name {stage['name']!r}; each stage needs its own")
    if not errors:
        try:
            for stage in stages_of(c):
                errors += [f"config.stages[{stage.name}].{e}" for e in _field_errors(stage)
                           if f"config.{e}" not in errors]
        except ValueError as e:
            errors.append(str(e))
    if errors:
        raise ValueError("invalid config:\n  " + "\n  ".join(errors))


def _field_errors(c: ml_collections.ConfigDict) -> list[str]:
    """"FIELD=VALUE: expected ..." for each bad field of one run or stage config."""
    errors = []

    def check(ok, field, expected):
        if not ok:
            errors.append(f"{field}={_get(c, field)!r}: expected {expected}")

    check(c.steps >= 0, "steps", "≥ 0")
    check(c.batch_size >= 1, "batch_size", "≥ 1")
    check(c.optimizer.accumulation >= 1 and c.batch_size % c.optimizer.accumulation == 0, "optimizer.accumulation",
          f"≥ 1 and dividing batch_size={c.batch_size}")
    check(c.optimizer.lr > 0, "optimizer.lr", "> 0")
    # a negative clip would flip the update's sign (gradient ascent); a negative warmup would hold lr at 0
    check(c.optimizer.grad_clip >= 0, "optimizer.grad_clip", "≥ 0 (0: no clipping)")
    check(c.optimizer.warmup_steps >= 0, "optimizer.warmup_steps", "≥ 0")
    check(c.optimizer.weight_decay >= 0, "optimizer.weight_decay", "≥ 0")
    check(0 <= c.optimizer.b1 < 1, "optimizer.b1", "in [0, 1)")
    check(0 <= c.optimizer.b2 < 1, "optimizer.b2", "in [0, 1)")
    check(c.optimizer.eps > 0, "optimizer.eps", "> 0")
    check(isinstance(c.seed, int) and 0 <= c.seed < 2**32, "seed", "0 … 2**32 − 1 (jax keeps 32 bits of it)")
    check(c.optimizer.schedule in LR_SCHEDULES, "optimizer.schedule", f"one of {LR_SCHEDULES}")
    check(0 <= c.ema_decay < 1, "ema_decay", "in [0, 1)")
    check(c.noise_offset >= 0, "noise_offset", "≥ 0 (0: off)")
    check(0 <= c.empty_prompt_rate <= 1, "empty_prompt_rate", "in [0, 1] (the share of examples; 0: off)")
    check(c.loss.snr_gamma >= 0, "loss.snr_gamma", "≥ 0 (0: off; 5.0 is the min-SNR paper's)")
    bias, steps = c.timestep_bias, c.schedule.num_train_timesteps
    check(bias.strategy in TIMESTEP_BIAS, "timestep_bias.strategy", f"one of {tuple(TIMESTEP_BIAS)}")
    check(bias.multiplier > 0, "timestep_bias.multiplier", "> 0 (below 1: those timesteps less often)")
    if bias.strategy in ("earlier", "later"):
        check(1 <= int(bias.portion * steps) and bias.portion <= 1, "timestep_bias.portion",
              f"in [1/{steps}, 1] (the share of the {steps} timesteps the {bias.strategy} strategy favours)")
    if bias.strategy == "range":
        check(0 <= bias.begin < steps, "timestep_bias.begin", f"in [0, {steps}) (the favoured timesteps: [begin, end))")
        check(bias.begin < bias.end <= steps, "timestep_bias.end", f"in (begin={bias.begin}, {steps}]")
    # a field the strategy does not read would bias nothing, silently
    used = TIMESTEP_BIAS.get(bias.strategy, tuple(TIMESTEP_BIAS_DEFAULTS))  # an unknown one: said above
    for field, default in TIMESTEP_BIAS_DEFAULTS.items():
        check(field in used or bias[field] == default, f"timestep_bias.{field}",
              f"{default!r} where timestep_bias.strategy is {bias.strategy!r}, which does not use it (strategies: "
              "earlier and later use multiplier and portion, range multiplier, begin and end)")
    for name in ("task", "output", "feature"):
        check(c.loss[name] >= 0, f"loss.{name}", "≥ 0")
    # all three 0: a zero loss, and a run that only decays the weights
    check(c.loss.task + c.loss.output + c.loss.feature > 0, "loss.task", "> 0 where loss.output and loss.feature "
          "are 0 (some term must train the student)")
    check(c.loss.normalize in NORMALIZATIONS, "loss.normalize", f"one of {NORMALIZATIONS}")
    check(bool(tap_list(c.loss.taps)), "loss.taps", "'all', 'stages' or comma-separated feature names")
    check(c.schedule.prediction_type in PREDICTION_TYPES, "schedule.prediction_type", f"one of {PREDICTION_TYPES}")
    check(c.schedule.beta_schedule in ("scaled_linear", "linear"), "schedule.beta_schedule",
          "'scaled_linear' or 'linear'")
    check(c.precision.teacher in DTYPES, "precision.teacher", f"one of {DTYPES}")
    check(c.precision.student_compute in DTYPES, "precision.student_compute", f"one of {DTYPES}")
    check(c.remat in REMAT, "remat", f"one of {REMAT}")
    check(c.attention in ATTENTION, "attention", f"one of {ATTENTION}")
    check(isinstance(c.compilation_cache, str), "compilation_cache", "'auto', a folder, or '' (off)")
    check(c.data.source in ("prepared", "images", "synthetic"), "data.source",
          "'prepared' (data.path from python -m jaxdistill.prepare), 'images' (data.path a source, data.pipeline "
          "an SDXL pipeline folder) or 'synthetic'")
    check(c.data.source == "synthetic" or bool(c.data.path), "data.path", "the prepared folder or an image source "
          "spec (--config.data.path=...)")
    # a data.path with the synthetic source would train on generated latents without a word
    check(c.data.source != "synthetic" or not c.data.path, "data.source", "'prepared' or 'images' to read "
          f"data.path={c.data.path!r} (the synthetic source reads no data)")
    check(c.data.source == "prepared" or (isinstance(c.data.resolution, int) and c.data.resolution >= 8
                                          and c.data.resolution % 8 == 0),
          "data.resolution", "a positive multiple of 8 pixels (the VAE's factor; e.g. 1024)")
    check(c.data.source != "images" or bool(c.data.pipeline), "data.pipeline", "an SDXL pipeline folder with vae/, "
          "text_encoder*/ and tokenizer*/ (--config.data.pipeline=DIR)")
    check(c.precision.encoders in DTYPES, "precision.encoders", f"one of {DTYPES}")
    check(c.log_every >= 1, "log_every", "≥ 1")
    check(c.profile.first >= 1, "profile.first", "≥ 1 (the first traced step, as logged)")
    check(c.profile.steps >= 0, "profile.steps", "≥ 0 (0: no trace)")
    check(set(c.mesh.sizes) == set(AXES) and set(c.mesh.dcn) == set(AXES), "mesh.sizes",
          f"sizes and dcn for each of {AXES}")
    check(all(isinstance(v, int) and v >= 1 for v in c.mesh.dcn.values()), "mesh.dcn",
          "≥ 1 slices per axis (1 everywhere but on multi-slice TPU)")
    errors += [f"mesh.rules: {problem}" for problem in rule_errors(c.mesh.rules)]
    check(c.eval.every >= 0, "eval.every", "≥ 0 (0: the agreement only before and after, no image grids)")
    check(c.eval.steps >= 1, "eval.steps", "≥ 1 (denoising steps of the validation images)")
    check(c.eval.scheduler in ("", *SCHEDULER_NAMES), "eval.scheduler",
          f"one of {list(SCHEDULER_NAMES)}, or '' for the pipeline's own")
    check(c.eval.batch_size >= 1, "eval.batch_size", "≥ 1 (images denoised and decoded together)")
    check(c.checkpoint_every >= 1, "checkpoint_every", "≥ 1")
    # orbax's max_to_keep=0 deletes every checkpoint as it is written
    check(c.keep_checkpoints >= 1, "keep_checkpoints", "≥ 1 (the latest checkpoints kept; resuming needs one)")
    check(c.data.source != "synthetic" or c.data.num_examples >= 1, "data.num_examples", "≥ 1")
    check(isinstance(c.data.workers, int) and c.data.workers >= 0, "data.workers", "≥ 0 (0: one per CPU core)")
    check(c.data.source != "synthetic" or c.data.seq_len >= 1, "data.seq_len", "≥ 1")
    return errors


def tap_list(taps: str) -> str | list[str]:
    """config.loss.taps → what `prune.feature_pairs` takes: "all", "stages", or the comma-separated names as a
    list (empty: none given)."""
    if taps in ("all", "stages"):
        return taps
    return [t.strip() for t in str(taps).split(",") if t.strip()]


def stages_of(config: ml_collections.ConfigDict) -> list[ml_collections.ConfigDict]:
    """The run as a list of stage configs (a plain run is one stage named "main"). A stage that trains a
    model from scratch (`model`) is skipped when `config.teacher` is given: that teacher takes its place."""
    if not config.stages:
        return [_stage(config, {"name": "main"})]
    stages = [dict(s) for s in config.stages]
    if config.teacher:
        stages = [s for s in stages if not s.get("model")]
        if stages and stages[0].get("teacher") == "previous":
            stages[0]["teacher"] = config.teacher
    return [_stage(config, s) for s in stages]


# Fields that name files or folders. `absolute_paths` writes them out in full before a run records them (config.json,
# checkpoint meta, stage markers), so that a record read from another working directory names the same files.
PATH_FIELDS = ("teacher", "student", "plan", "sensitivity", "data.path", "data.pipeline", "eval.pipeline")


def absolute_path(field: str, value: Any) -> Any:
    """`value` of `PATH_FIELDS` entry `field` with a local path made absolute: one that exists, or the folder /
    glob of a "folder:" / "tar:" source. Empty values, "previous", preset plan names, "tfds:" sources, URLs
    (gs://) and paths that do not exist (their error names them as typed) stay as they are."""
    if not isinstance(value, str) or not value or value == "previous" or "://" in value:
        return value
    if field == "plan":
        from jaxdistill.prune import PLANS

        if value in PLANS:
            return value
    if field == "data.path":
        kind, colon, rest = value.partition(":")
        if colon and kind in ("folder", "tar") and rest and "://" not in rest:
            return f"{kind}:{os.path.abspath(rest)}"
        if colon and kind == "tfds":
            return value
    return os.path.abspath(value) if os.path.exists(value) else value


def absolute_paths(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A copy of `config` with `absolute_path` applied to its `PATH_FIELDS` and to those its stages set."""
    config = config.copy_and_resolve_references()
    stages = [_plain(stage) if isinstance(stage, (Mapping, ml_collections.ConfigDict)) else stage
              for stage in config.stages or []]
    for node in [config, *[stage for stage in stages if isinstance(stage, dict)]]:
        for field in PATH_FIELDS:
            *parents, leaf = field.split(".")
            holder = node
            for part in parents:
                holder = holder.get(part) if isinstance(holder, (dict, ml_collections.ConfigDict)) else None
            if isinstance(holder, (dict, ml_collections.ConfigDict)) and leaf in holder:
                holder[leaf] = absolute_path(field, holder[leaf])
    if stages:
        config.stages = stages
    return config


# What makes a stage the stage it is: a command-line value does not replace these (config.teacher has its own
# rule in `stages_of`: it stands for the first stage's "previous").
STAGE_IDENTITY = ("name", "teacher", "model", "student", "plan", "stages")


def command_line_wins(config: ml_collections.ConfigDict, fields: Sequence[str]) -> list[str]:
    """Removes from every stage of `config.stages` the values the command line set (`fields`: dotted names,
    `--config.FIELD=VALUE`), so that those apply to every stage — except `STAGE_IDENTITY` fields, which stay
    per stage. Returns one note per value replaced or kept."""
    notes, stages, first = [], [], True
    for i, stage in enumerate(config.stages or []):
        if not isinstance(stage, (Mapping, ml_collections.ConfigDict)):  # validate() reports it
            stages.append(stage)
            continue
        stage = _plain(stage)
        name = stage.get("name", f"#{i}")
        if config.teacher and stage.get("model"):  # stages_of skips it: the teacher takes its place
            stages.append(stage)
            continue
        for field in fields:
            path = ["lr"] if field == "optimizer.lr" and "lr" in stage else field.split(".")
            node = stage
            for part in path[:-1]:
                node = node.get(part) if isinstance(node, dict) else None
            if not isinstance(node, dict) or path[-1] not in node:
                continue
            if path[0] == "teacher":  # it stands for the first stage's teacher (stages_of: also for "previous")
                if node["teacher"] == "previous":
                    continue
                if first:
                    notes.append(f"config.teacher from the command line replaces stage {name}'s "
                                 f"teacher={node.pop('teacher')!r}")
                else:
                    notes.append(f"config.teacher from the command line does not apply to stage {name}, which sets "
                                 f"its own teacher={node['teacher']!r}")
                continue
            if path[0] in STAGE_IDENTITY:
                notes.append(f"config.{field} from the command line does not apply to stage {name}, which sets "
                             f"its own {path[0]}={node[path[-1]]!r}")
                continue
            value = node.pop(path[-1])
            notes.append(f"config.{field} from the command line replaces stage {name}'s {'.'.join(path)}={value!r}")
        stages.append(stage)
        first = False
    if any("replaces" in note for note in notes):
        config.stages = stages
    return notes


def _plain(value):
    """ConfigDicts and other mappings as nested dicts."""
    if isinstance(value, ml_collections.ConfigDict):
        value = value.to_dict()
    return {k: _plain(v) for k, v in value.items()} if isinstance(value, Mapping) else value


def _stage(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """`config` with one stage's overrides; a nested override (loss=dict(feature=0.0)) changes only the
    fields it names, and must name existing ones with values of their type."""
    c = ml_collections.ConfigDict(config.to_dict())
    where = f"config.stages[{overrides.get('name')}]"
    with c.unlocked():
        c.stages = []
        for key, value in overrides.items():
            target, field = (c.optimizer, "lr") if key == "lr" else (c, key)
            try:
                if isinstance(value, dict):
                    unknown = sorted(set(value) - set(c[key]))
                    if unknown:
                        raise ValueError(f"{where}.{key} has unknown fields {unknown}; {key} has "
                                         f"{sorted(c[key])}")
                    c[key].update(value)
                else:
                    target[field] = value
            except TypeError as e:
                raise ValueError(f"{where}.{key}={value!r}: {e}") from None
    return c


def _get(c, dotted):
    for part in dotted.split("."):
        c = c[part]
    return c
