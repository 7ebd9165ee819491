"""`python -m jaxdistill.evaluate`: how closely a student follows its teacher, image for image.

For every prompt of a prompt file and every seed, teacher and student sample from the same initial noise
with the same scheduler and guidance (`jaxdistill.sample`); we compare the final latents (MSE and MSE
relative to the teacher's mean square) and the decoded images (PSNR and SSIM, 8-bit, data range 255),
and, when CLIP weights are given, each image's CLIP score against its prompt. Output: `metrics.csv` (one
row per image pair), `metrics.md` (the table and the means), `summary.json` and `grid.png` (teacher above
student for each prompt and seed), in a new folder (`--overwrite` replaces one as a whole); a student that is
the teacher's very weights is refused. The same comparison feeds the validation grid during training.

SSIM is Wang et al.'s (11×11 Gaussian window, σ = 1.5, K1 = 0.01, K2 = 0.03), the mean over pixels and
channels — equal to scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=255)`. CLIP score is torchmetrics' definition, 100 · max(cos, 0),
computed with transformers' PyTorch `CLIPModel` (loaded from safetensors) — the only PyTorch on this path.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxdistill.convert import OutFolderError, check_out, whole_folder

METRICS = ("latent_mse", "latent_rel_mse", "psnr", "ssim")


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB of two images [H, W, C] (inf when equal)."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(data_range ** 2 / mse))


def check_ssim_size(height: int, width: int, sigma: float = 1.5) -> int:
    """ValueError for images smaller than SSIM's Gaussian window (11 pixels at σ = 1.5; scikit-image refuses
    them too); else the window's radius."""
    radius = int(3.5 * sigma + 0.5)  # scikit-image's truncate=3.5 → an 11-tap window at σ = 1.5
    if min(height, width) < 2 * radius + 1:  # np.convolve would swap its operands and return nonsense
        raise ValueError(f"images of {height}×{width} pixels are smaller than SSIM's {2 * radius + 1}×{2 * radius + 1} "
                         f"window: give a height and width of at least {2 * radius + 1}")
    return radius


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 255.0, sigma: float = 1.5) -> float:
    """Structural similarity of two images [H, W, C]: Gaussian-weighted local statistics (window 11 for
    σ = 1.5), averaged over the valid (unpadded) pixels and the channels."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    radius = check_ssim_size(*a.shape[:2], sigma=sigma)
    x = np.arange(-radius, radius + 1)
    g = np.exp(-x ** 2 / (2 * sigma ** 2))
    g /= g.sum()

    def blur(img):  # separable "valid" filtering over H and W, per channel (g is symmetric: correlation = convolution)
        from scipy.ndimage import correlate1d

        valid = (slice(radius, img.shape[0] - radius), slice(radius, img.shape[1] - radius))
        return correlate1d(correlate1d(img, g, axis=0), g, axis=1)[valid]

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2
    cov = blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return float(s.mean())


class ClipScore:
    """CLIP score of images against their prompts: 100 · max(cos(image, text), 0) per image, with a
    transformers `CLIPModel` folder (weights in safetensors; its processor config beside them). Loads in
    the constructor, so a bad folder is found before any sampling."""

    def __init__(self, clip_dir: str | os.PathLike):
        try:
            from transformers import CLIPModel, CLIPProcessor
        except ImportError as e:
            raise RuntimeError("CLIP score needs PyTorch and transformers: pip install 'jaxdistill[torch]'") from e
        if not Path(clip_dir).is_dir():  # never a Hub download: a folder on this machine
            raise FileNotFoundError(f"CLIP folder {clip_dir} does not exist (a transformers CLIPModel folder "
                                    "with safetensors weights and its processor files)")
        self.model = CLIPModel.from_pretrained(str(clip_dir), use_safetensors=True, local_files_only=True).eval()
        self.processor = CLIPProcessor.from_pretrained(str(clip_dir), local_files_only=True)

    def __call__(self, images: np.ndarray, prompts: Sequence[str], batch_size: int = 32,
                 done: Callable[[int], Any] | None = None) -> np.ndarray:
        """images [N, H, W, 3] uint8, one prompt each → [N] scores, `batch_size` images at a time (CLIP ViT-L's
        activations for 500 images at once are tens of GB); `done(k)` after each batch of k."""
        scores = []
        for start in range(0, len(images), batch_size):
            scores.append(self._scores(images[start:start + batch_size], prompts[start:start + batch_size]))
            if done is not None:
                done(len(scores[-1]))
        return np.concatenate(scores) if scores else np.zeros(0, np.float32)

    def _scores(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        import torch

        inputs = self.processor(text=list(prompts), images=list(np.asarray(images)), return_tensors="pt",
                                padding=True, truncation=True)
        with torch.no_grad():
            image = self.model.get_image_features(pixel_values=inputs["pixel_values"])
            text = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        image = torch.nn.functional.normalize(getattr(image, "pooler_output", image), dim=-1)
        text = torch.nn.functional.normalize(getattr(text, "pooler_output", text), dim=-1)
        return (100 * torch.clamp((image * text).sum(-1), min=0)).numpy()


@dataclasses.dataclass
class Evaluation:
    """One row per (prompt, seed): the metrics; and the images, teacher and student, [N, H, W, 3] uint8."""

    rows: list[dict[str, Any]]
    teacher_images: np.ndarray
    student_images: np.ndarray
    non_finite: dict[str, list[int]] = dataclasses.field(default_factory=dict)  # "teacher"/"student" → row indices

    def means(self) -> dict[str, float]:
        """Each figure's mean over the rows where it is finite (NaN where none is): a pair of identical images
        (PSNR inf) or a NaN image (its row's figures NaN) does not hide the others; `notes` says so."""
        keys = [k for k in self.rows[0] if k not in ("prompt", "seed")]
        means = {}
        for k in keys:
            values = np.asarray([r[k] for r in self.rows], np.float64)
            means[k] = float(values[np.isfinite(values)].mean()) if np.isfinite(values).any() else float("nan")
        return means

    def notes(self) -> list[str]:
        """What the means leave out, in words."""
        n, notes = len(self.rows), []
        for who, rows in self.non_finite.items():
            if rows:
                cases = ", ".join(f"{self.rows[i]['prompt']!r} seed {self.rows[i]['seed']}" for i in rows[:3])
                more = " …" if len(rows) > 3 else ""
                notes.append(f"{len(rows)} of {n} {who} images hold NaN or Inf (diverged weights, or overflow in this "
                             f"dtype): their rows' figures are NaN, left out of the means ({cases}{more})")
        identical = sum(r["psnr"] == float("inf") for r in self.rows)
        if identical:
            notes.append(f"{identical} of {n} image pairs are identical (PSNR inf): left out of the PSNR mean")
        return notes


def compare(teacher, student, prompts: Sequence[str], seeds: Sequence[int], *, clip: ClipScore | None = None,
            teacher_output=None, height: int | None = None, width: int | None = None, progress: bool = False,
            **sample_kwargs) -> Evaluation:
    """Teacher and student (`sample.Pipeline`s) from the same noise for every prompt × seed, at one size
    (default: the teacher's). `sample_kwargs` go to `sample.generate` (steps, guidance, scheduler,
    batch_size). `teacher_output`: the teacher's `SampleOutput` for these prompts and seeds when already
    computed (training reuses it). `progress`: a progress bar per model."""
    from jaxdistill import sample

    height, width = teacher.check_size(height, width)
    student.check_size(height, width)
    cases = [(p, s) for p in prompts for s in seeds]
    case_prompts, case_seeds = [p for p, _ in cases], [s for _, s in cases]
    kwargs = dict(sample_kwargs, height=height, width=width)
    t = teacher_output or sample.generate(teacher, case_prompts, seeds=case_seeds,
                                          progress="teacher" if progress else None, **kwargs)
    s = sample.generate(student, case_prompts, seeds=case_seeds, progress="student" if progress else None, **kwargs)
    from tqdm import tqdm

    # SSIM of a 1024² pair takes about a second on a CPU core, CLIP on a CPU longer: hundreds of images show a bar
    bar = tqdm(total=len(cases) * (3 if clip is not None else 1), desc="metrics", unit="image",
               disable=not progress, dynamic_ncols=True)
    rows = []
    for i, (prompt, seed) in enumerate(cases):
        bar.update(1)
        if not (t.finite[i] and s.finite[i]):  # a NaN image is black: its PSNR and SSIM would look plausible
            rows.append({"prompt": prompt, "seed": seed} | dict.fromkeys(METRICS, float("nan")))
            continue
        tl, sl = np.asarray(t.latents[i], np.float64), np.asarray(s.latents[i], np.float64)
        mse = float(np.mean((sl - tl) ** 2))
        rows.append({"prompt": prompt, "seed": seed, "latent_mse": mse, "latent_rel_mse": mse / float(np.mean(tl ** 2)),
                     "psnr": psnr(s.images[i], t.images[i]), "ssim": ssim(s.images[i], t.images[i])})
    if clip is not None:
        for name, out in (("clip_teacher", t), ("clip_student", s)):
            for row, score, ok in zip(rows, clip(out.images, case_prompts, done=bar.update), out.finite, strict=True):
                row[name] = float(score) if ok else float("nan")
    bar.close()
    non_finite = {who: np.flatnonzero(~out.finite).tolist() for who, out in (("teacher", t), ("student", s))}
    return Evaluation(rows, np.asarray(t.images), np.asarray(s.images), non_finite)


def comparison_grid(evaluation: Evaluation):
    """One row per prompt × seed: teacher | student."""
    from jaxdistill import sample

    return sample.pair_grid(evaluation.teacher_images, evaluation.student_images,
                            [r["prompt"] for r in evaluation.rows], [r["seed"] for r in evaluation.rows])


class Validation:
    """The validation grid and agreement figures during training: the teacher's samples for fixed prompts
    and seeds are drawn once; each call samples the student with its current weights and compares."""

    def __init__(self, pipeline_dir: str, teacher_spec, teacher_params, *, prompts: Sequence[str],
                 seeds: Sequence[int], **sample_kwargs):
        from jaxdistill import sample

        self.parts = sample.load_parts(pipeline_dir)  # its VAE, text encoders and scheduler, not its UNet
        self.teacher = sample.with_unet(self.parts, teacher_spec, teacher_params, "teacher")
        check_ssim_size(*self.teacher.check_size(sample_kwargs.get("height"), sample_kwargs.get("width")))
        self.prompts, self.seeds, self.kwargs = list(prompts), list(seeds), sample_kwargs
        self._teacher_output, self._put_teacher = None, None

    def place(self, put: Callable[[Any], Any], teacher_params: Any = None) -> None:
        """The VAE, the text encoders and the teacher's UNet put where `put` places a parameter tree (the
        trainer: sharded over its mesh, as training holds them, not whole on every device); `teacher_params`:
        the teacher's, already placed (the trainer's own arrays, where their layout is the UNet's), else the
        teacher is put there only while its samples are drawn."""
        encoders = dataclasses.replace(self.parts.text_encoders, params=put(self.parts.text_encoders.params))
        self.parts = dataclasses.replace(self.parts, text_encoders=encoders, vae_params=put(self.parts.vae_params))
        from jaxdistill import sample

        self._put_teacher = put if teacher_params is None else None
        self.teacher = sample.with_unet(self.parts, self.teacher.unet_spec, self.teacher.unet_params
                                        if teacher_params is None else teacher_params, self.teacher.name)

    def __call__(self, student_spec, student_params) -> tuple[dict[str, float], Any]:
        """→ (mean metrics, the teacher | student grid as a PIL image)."""
        from jaxdistill import sample

        if self._teacher_output is None:
            cases = [(p, s) for p in self.prompts for s in self.seeds]
            teacher = self.teacher
            if self._put_teacher is not None:
                teacher = dataclasses.replace(teacher, unet_params=self._put_teacher(teacher.unet_params))
            self._teacher_output = sample.generate(teacher, [p for p, _ in cases], seeds=[s for _, s in cases],
                                                   **self.kwargs)
            # drawn once: the teacher's UNet weights are not needed again
            self.teacher = dataclasses.replace(self.teacher, unet_params=None)
        student = sample.with_unet(self.parts, student_spec, student_params, "student")
        evaluation = compare(self.teacher, student, self.prompts, self.seeds, teacher_output=self._teacher_output,
                             **self.kwargs)
        return evaluation.means(), comparison_grid(evaluation)


def write_report(evaluation: Evaluation, out: str | os.PathLike, info: dict[str, Any] | None = None) -> Path:
    """metrics.csv, metrics.md, summary.json and grid.png in `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    keys = list(evaluation.rows[0])
    with open(out / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(evaluation.rows)
    means = evaluation.means()
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v).replace("|", "\\|")  # noqa: E731 (a prompt's |)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in evaluation.rows]
    lines.append("| **mean** | | " + " | ".join(fmt(means[k]) for k in keys[2:]) + " |")
    header = [f"# Student vs teacher ({len(evaluation.rows)} image pairs)", ""]
    if info:
        header += [f"- {k}: {v}" for k, v in info.items()] + [""]
    header += [f"**Note:** {note}" for note in evaluation.notes()] + [""] * bool(evaluation.notes())
    (out / "metrics.md").write_text("\n".join(header + lines) + "\n")
    # Strict JSON: a non-finite figure (PSNR of identical images is inf, any figure of a NaN image NaN) is written
    # as null; "non_finite" tells the two apart.
    finite = lambda v: v if not isinstance(v, float) or np.isfinite(v) else None  # noqa: E731
    summary = {"means": {k: finite(v) for k, v in means.items()},
               "rows": [{k: finite(v) for k, v in row.items()} for row in evaluation.rows],
               "non_finite": evaluation.non_finite, "notes": evaluation.notes()} | (info or {})
    (out / "summary.json").write_text(json.dumps(summary, indent=2, allow_nan=False))
    comparison_grid(evaluation).save(out / "grid.png")
    return out


def _check_not_the_same(student: str, teacher: str, ema: bool | None):
    """Refuses a student and a teacher that are the same weights (the same folder, or the same checkpoint with
    the same --ema choice): the comparison would be perfect by construction."""
    from jaxdistill.checkpoint import CheckpointError
    from jaxdistill.export import recorded_teacher, which_weights  # export imports the trainer

    try:
        weights = which_weights(student, ema=ema)
        if weights != which_weights(teacher):
            return
    except CheckpointError:  # not there, or not a checkpoint: loading it says what is wrong
        return
    recorded = recorded_teacher(student)
    hint = (f"--teacher {shlex.quote(str(recorded))} (as its run records it)" if recorded else
            "--teacher (its SDXL pipeline or UNet folder, or WORKDIR/stages/NAME of the stage before)")
    raise ValueError(f"--student {student} and --teacher {teacher} are the same weights ({weights[0]}): the "
                     f"student would be compared with itself. Give the teacher it was distilled from: {hint}")


def main(argv: Sequence[str] | None = None) -> int:
    """Compare a student with its teacher over prompts × seeds: latent MSE, PSNR, SSIM, CLIP score."""
    import argparse

    from jaxdistill import cli, sample

    parser = cli.parser("evaluate", main.__doc__)
    parser.add_argument("--student", required=True, help="pipeline / UNet folder, or a training checkpoint")
    parser.add_argument("--teacher", required=True, help="the teacher, in the same forms (a progressive stage's: "
                                                         "WORKDIR/stages/NAME of the stage before)")
    parser.add_argument("--pipeline", help="SDXL pipeline folder for the VAE, text encoders and scheduler "
                                           "(default: the teacher's own: a pipeline folder's, a run's)")
    parser.add_argument("--prompts", required=True, help="text file, one prompt per line")
    parser.add_argument("--seeds", default="0,1", type=sample.seed_list, help="comma-separated seeds (default 0,1)")
    sample.add_sampling_args(parser, "the teacher's sample size × the VAE's factor")
    parser.add_argument("--clip", help="transformers CLIPModel folder (safetensors) for CLIP scores")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                        help="the student checkpoint's EMA weights (--ema) or trained weights (--no-ema); default: "
                             "as the run hands them on, its EMA weights when it kept them")
    parser.add_argument("--out", required=True, help="the report folder (refused if not empty, see --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --out (all of it) once the new report is written")
    args = parser.parse_args(argv)
    try:
        prompts = sample.read_prompts(args.prompts)
    except ValueError as e:
        parser.error(f"--prompts: {e}")
    for what, values in (("prompts", prompts), ("seeds", args.seeds)):
        if len(set(values)) < len(values):  # the same pair twice is the same images: sampled again, counted twice
            print(f"note: {len(values) - len(set(values))} repeated {what} left out", file=sys.stderr)
    prompts, args.seeds = list(dict.fromkeys(prompts)), list(dict.fromkeys(args.seeds))
    settings = sample.sampling_settings(parser, args)
    try:  # everything that can fail before hours of sampling: folders, fit, sizes, scheduler, CLIP weights
        check_out(args.out, args.overwrite, (args.student, args.teacher, args.pipeline, args.prompts, args.clip))
        _check_not_the_same(args.student, args.teacher, args.ema)
        teacher = sample.load_pipeline(args.teacher, args.pipeline, dtype=args.dtype)
        student = sample.load_pipeline(args.student, ema=args.ema, parts=teacher, dtype=args.dtype)  # one VAE copy
        check_out(args.out, args.overwrite, (teacher.pipeline_dir,))  # the pipeline a run recorded, too
        height, width = teacher.check_size(args.height, args.width)
        student.check_size(height, width)
        check_ssim_size(height, width)
        sample.make_scheduler(args.scheduler, teacher.scheduler_config).set_timesteps(args.steps)
        clip = ClipScore(args.clip) if args.clip else None
    except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: --clip without PyTorch
        parser.error(str(e))
    scheduler = sample.chosen_scheduler(args.scheduler, teacher.scheduler_config)
    for note in sample.long_prompt_notes(teacher, prompts):
        print(f"note: {note}", file=sys.stderr)
    kwargs = dict(settings, scheduler=scheduler, height=height, width=width)
    with cli.stop_when_out_of_memory(f"sampling {width}×{height}", sample.memory_ways(args)):
        evaluation = compare(teacher, student, prompts, args.seeds, clip=clip, progress=True, **kwargs)
    absolute = lambda path: path and os.path.abspath(path)  # noqa: E731
    info = {"student": absolute(args.student), "student_weights": sample.weights_record(args.student, args.ema),
            "teacher": absolute(args.teacher), "teacher_weights": sample.weights_record(args.teacher),
            "pipeline": absolute(teacher.pipeline_dir), "prompts": absolute(args.prompts), "clip": absolute(args.clip),
            **sample.settings_record(args, kwargs), "seeds": list(args.seeds)}
    out = Path(args.out)
    try:
        with whole_folder(out, args.overwrite) as tmp:  # no file of an earlier report is left among the new ones
            write_report(evaluation, tmp, info)
    except OutFolderError as e:  # --out changed while we sampled: the report is kept beside it
        print(f"error: {e}", file=sys.stderr)
        return 1
    means = evaluation.means()
    print("  ".join(f"{k} {v:.4g}" for k, v in means.items()))
    for note in evaluation.notes():
        print(f"note: {note}", file=sys.stderr)
    print(f"evaluate: {len(evaluation.rows)} image pairs → {out}/metrics.{{csv,md}}, summary.json, grid.png")
    return 1 if any(evaluation.non_finite.values()) else 0


if __name__ == "__main__":
    from jaxdistill.evaluate import main as _main

    raise SystemExit(_main())
