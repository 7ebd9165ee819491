"""Sampling SDXL-family models in JAX: text → image with a (pruned, distilled) UNet, for looking at what a
student has learnt next to its teacher, and as the base of evaluation.

    pipe = load_pipeline("runs/ssd1b", pipeline="stable-diffusion-xl-base-1.0")   # checkpoint, UNet or pipeline
    out = generate(pipe, ["a photo of a cat"], seeds=[0], steps=25, guidance=5.0)  # scheduler: euler | ddim | dpm
    out.images                      # uint8 [B, H, W, 3], as diffusers' output_type="pil" gives them
    image_grid(out.images, rows=1, row_labels=["a photo of a cat"]).save("grid.png")

    python -m jaxdistill.sample --model runs/ssd1b --pipeline SDXL_DIR --prompt "a cat" --out samples/ \
        [--teacher SDXL_DIR]        # one PNG per image, grid.png (and side_by_side.png with a teacher)
    # --out must be new or empty; --overwrite replaces it as a whole once the new images are written

What it reproduces, number for number in float32 (`tests/test_sample.py`): diffusers'
`StableDiffusionXLPipeline.__call__` with `EulerDiscreteScheduler`, `DDIMScheduler` (eta 0) or
`DPMSolverMultistepScheduler` (DPM-Solver++, orders 1 and 2), given the
same initial latents: SDXL's conditioning (both CLIP encoders, zero negative conditioning for an empty
negative prompt when the pipeline's `force_zeros_for_empty_prompt` is set), add_time_ids (SDXL's
micro-conditioning: original size, crop top-left and target size, by default (height, width), (0, 0),
(height, width); the negative's own only when both its sizes are given, as diffusers), classifier-free
guidance in one batch of 2B (uncond first), optional guidance_rescale, the VAE decode and the image
post-processing ((x/2 + 0.5) clipped to [0, 1], ×255, rounded).

The schedulers are pure: their tables (timesteps, sigmas, ᾱ) come from numpy on the host, computed with the
same float32 operations as diffusers' torch code; each step is a jittable function of the step index and of
a state it hands the next step (DPM-Solver++'s last x0 prediction), and the whole denoising loop is one
`jax.lax.fori_loop` inside one jit.

Not here: other schedulers (UniPC, DPM-Solver's SDE and third-order variants, ...), eta > 0, img2img /
inpainting / refiner, prompt weighting, long prompts (> 77 tokens are truncated, as diffusers does),
IP-adapters, the invisible watermark, torch's random generator (the noise of a seed is jax.random's, see
`initial_latents`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import operator
import os
import sys
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxdistill import schedule
from jaxdistill.cli import check_seeds
from jaxdistill.convert import (
    CONFIG_NAME,
    OutFolderError,
    check_out,
    is_workdir,
    load_unet,
    resolve_unet_folder,
    whole_folder,
)
from jaxdistill.schedule import PREDICTION_TYPES
from jaxdistill.spec import UNetSpec, UnsupportedConfigError
from jaxdistill.text import TextEncoders, check_pipeline_folder, load_text_encoders, truncated
from jaxdistill.unet import UNet
from jaxdistill.vae import VAESpec, load_vae
from jaxdistill.vae import decode as vae_decode

# stabilityai/stable-diffusion-xl-base-1.0's scheduler/scheduler_config.json: used when a pipeline folder
# has none. Its `clip_sample: false` matters for DDIM, whose own default clips x0 to [-1, 1].
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False}
SPACINGS = ("leading", "trailing", "linspace")
Pair = tuple[int, int]  # (height, width) or a crop's (top, left)


# ---- schedulers ---------------------------------------------------------------------------------

class _Scheduler:
    """Shared by the schedulers: reading a diffusers scheduler config (`from_config`) and ᾱ.

    Subclasses are frozen dataclasses whose fields are diffusers' config fields with diffusers' defaults,
    so `X.from_config(cfg)` means what diffusers' `X.from_config(cfg)` means (`pipe.scheduler =
    DDIMScheduler.from_config(pipe.scheduler.config)`): fields the class does not know are ignored, missing
    ones take the class default. `_REFUSED` lists settings not implemented here: (diffusers' default,
    the values we implement)."""

    _REFUSED: dict[str, tuple[Any, tuple]] = {}

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | str | os.PathLike):
        if not isinstance(config, Mapping):
            config = json.loads(Path(config).read_text())
        for field, (default, supported) in cls._REFUSED.items():
            value = config.get(field, default)
            if value not in supported:
                raise UnsupportedConfigError(f"{cls.__name__}: {field}={value!r} is not implemented in "
                                             f"jaxdistill.sample (supported: {supported})")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise UnsupportedConfigError(f"{type(self).__name__}: prediction_type={self.prediction_type!r}; "
                                         f"supported: {PREDICTION_TYPES}")
        if self.timestep_spacing not in SPACINGS:
            raise UnsupportedConfigError(f"{type(self).__name__}: timestep_spacing={self.timestep_spacing!r}; "
                                         f"supported: {SPACINGS}")
        if self.beta_schedule not in ("linear", "scaled_linear"):
            raise UnsupportedConfigError(f"{type(self).__name__}: beta_schedule={self.beta_schedule!r}; "
                                         "supported: 'linear', 'scaled_linear'")

    def alphas_cumprod(self) -> np.ndarray:
        """ᾱ [T] float32, bit-equal to diffusers' schedulers' (torch) table."""
        return schedule.alphas_cumprod(self.num_train_timesteps, self.beta_start, self.beta_end, self.beta_schedule)

    def train_sigmas(self) -> np.ndarray:
        """σ_t = √((1 − ᾱ_t)/ᾱ_t) [T] float32, as torch computes it."""
        acp = self.alphas_cumprod()
        return np.sqrt((1 - acp) / acp)

    def init_state(self, sample: jax.Array) -> Any:
        """What `step` carries from one step to the next (a multistep solver's last prediction); None here."""
        return None

    def _karras(self, sigmas: np.ndarray, n: int) -> np.ndarray:
        """Karras et al.'s ρ = 7 spacing from sigmas[0] (σ_max) to sigmas[-1] (σ_min), unless the config sets
        sigma_min / sigma_max (diffusers' `_convert_to_karras`)."""
        lo, hi = getattr(self, "sigma_min", None), getattr(self, "sigma_max", None)
        lo = lo if lo is not None else sigmas[-1].item()
        hi = hi if hi is not None else sigmas[0].item()
        rho, ramp = 7.0, np.linspace(0, 1, n)
        return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho

    @staticmethod
    def _sigma_to_t(sigma: float, log_sigmas: np.ndarray) -> float:
        """The fractional training timestep of σ, interpolating log σ (diffusers' `_sigma_to_t`)."""
        log_sigma = np.log(np.maximum(sigma, 1e-10))
        low = np.cumsum(log_sigma - log_sigmas >= 0).argmax().clip(max=len(log_sigmas) - 2)
        w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
        return (1 - w) * low + w * (low + 1)

    def _spaced_timesteps(self, num_inference_steps: int) -> np.ndarray:
        """The inference timesteps [N] (descending, float64 integers), diffusers' `timestep_spacing`."""
        n, train = num_inference_steps, self.num_train_timesteps
        if not 1 <= n <= train:
            raise ValueError(f"num_inference_steps={n}: expected 1 … {train}")
        if self.timestep_spacing == "leading":  # SDXL's: (N − 1)·⌊T/N⌋ + 1, …, 1 with steps_offset 1
            return (np.arange(0, n) * (train // n)).round()[::-1] + self.steps_offset
        if self.timestep_spacing == "trailing":
            return np.arange(train, 0, -train / n).round() - 1
        return np.linspace(0, train - 1, n)[::-1]  # "linspace"; each scheduler rounds (or not) itself


class EulerSchedule(NamedTuple):
    """`EulerDiscreteScheduler.set_timesteps`' tables (numpy on the host, traced inside jit)."""

    timesteps: np.ndarray  # [N] float32: what the UNet is given
    sigmas: np.ndarray  # [N + 1] float32, descending; the last is 0 (or σ_min with final_sigmas_type)
    init_noise_sigma: np.ndarray  # () float32: initial latents = N(0, 1) noise × this


@dataclasses.dataclass(frozen=True)
class EulerDiscreteScheduler(_Scheduler):
    """diffusers' `EulerDiscreteScheduler` (SDXL's default), deterministic (s_churn 0): epsilon and
    v_prediction; leading / trailing / linspace spacing; linear interpolation; Karras sigmas."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    interpolation_type: str = "linear"
    use_karras_sigmas: bool = False
    sigma_min: float | None = None
    sigma_max: float | None = None
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    final_sigmas_type: str = "zero"

    _REFUSED = {"trained_betas": (None, (None,)), "use_exponential_sigmas": (False, (False,)),
                "use_beta_sigmas": (False, (False,)), "timestep_type": ("discrete", ("discrete",)),
                "rescale_betas_zero_snr": (False, (False,)), "interpolation_type": ("linear", ("linear",)),
                "final_sigmas_type": ("zero", ("zero", "sigma_min"))}

    def set_timesteps(self, num_inference_steps: int) -> EulerSchedule:
        """diffusers' `set_timesteps(num_inference_steps)`, in numpy with diffusers' dtypes at each stage."""
        timesteps = self._spaced_timesteps(num_inference_steps).astype(np.float32)
        train_sigmas = self.train_sigmas()
        sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)  # float64
        if self.use_karras_sigmas:
            sigmas = self._karras(sigmas, num_inference_steps)
            log_sigmas = np.log(train_sigmas)
            # One σ at a time, as diffusers: numpy's vectorised float64 log can differ from the scalar one by an ulp.
            timesteps = np.array([self._sigma_to_t(sigma, log_sigmas) for sigma in sigmas])
        last = train_sigmas[0] if self.final_sigmas_type == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        max_sigma = sigmas.max()
        # diffusers' `init_noise_sigma`: the noise level of x_T = x_0 + σ ε (with x_0 ~ N(0, 1) for "leading").
        init = max_sigma if self.timestep_spacing in ("linspace", "trailing") else np.sqrt(max_sigma * max_sigma + 1)
        return EulerSchedule(timesteps.astype(np.float32), sigmas, np.asarray(init, np.float32))

    def scale_model_input(self, schedule: EulerSchedule, sample: jax.Array, step_index: jax.Array) -> jax.Array:
        """x / √(σ_i² + 1): what the UNet sees at step `step_index`. Jittable."""
        sigma = jnp.asarray(schedule.sigmas)[step_index]
        return sample / jnp.sqrt(sigma * sigma + 1)

    def step(self, schedule: EulerSchedule, model_output: jax.Array, step_index: jax.Array,
             sample: jax.Array, state: Any = None) -> tuple[jax.Array, Any]:
        """One Euler step from σ_i to σ_{i+1} (diffusers' `step(...).prev_sample`, same float32 operations,
        gamma 0). model_output and sample [B, h, w, C] → (prev_sample [B, h, w, C], state). Jittable."""
        sigmas = jnp.asarray(schedule.sigmas)
        sigma, sigma_next = sigmas[step_index], sigmas[step_index + 1]
        sample = sample.astype(jnp.float32)
        if self.prediction_type == "epsilon":
            pred_original_sample = sample - sigma * model_output
        else:  # v_prediction
            pred_original_sample = model_output * (-sigma / jnp.sqrt(sigma * sigma + 1)) + sample / (sigma * sigma + 1)
        derivative = (sample - pred_original_sample) / sigma
        return (sample + derivative * (sigma_next - sigma)).astype(model_output.dtype), state


class DDIMSchedule(NamedTuple):
    """`DDIMScheduler.set_timesteps`' tables: ᾱ of each step and of the step it leads to."""

    timesteps: np.ndarray  # [N] int32
    alpha_prod_t: np.ndarray  # [N] float32: ᾱ_t
    alpha_prod_t_prev: np.ndarray  # [N] float32: ᾱ at t − T/N, or final_alpha_cumprod past 0
    init_noise_sigma: np.ndarray  # () float32: 1


@dataclasses.dataclass(frozen=True)
class DDIMScheduler(_Scheduler):
    """diffusers' `DDIMScheduler` with eta 0 (deterministic DDIM): epsilon and v_prediction, any spacing,
    `clip_sample` (DDIM's default: on; SDXL's config: off), `set_alpha_to_one`."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True
    steps_offset: int = 0
    prediction_type: str = "epsilon"
    timestep_spacing: str = "leading"

    _REFUSED = {"trained_betas": (None, (None,)), "thresholding": (False, (False,)),
                "rescale_betas_zero_snr": (False, (False,))}

    def set_timesteps(self, num_inference_steps: int) -> DDIMSchedule:
        timesteps = self._spaced_timesteps(num_inference_steps)
        if self.timestep_spacing == "linspace":
            timesteps = timesteps.round()
        timesteps = timesteps.astype(np.int64)
        if timesteps.max() >= self.num_train_timesteps:  # diffusers fails at its first step, with an IndexError
            raise ValueError(f"{num_inference_steps} DDIM steps with {self.timestep_spacing} spacing and steps_offset "
                             f"{self.steps_offset} reach timestep {timesteps.max()} ≥ {self.num_train_timesteps}; use "
                             "fewer steps or timestep_spacing 'trailing'")
        acp = self.alphas_cumprod()
        final = np.float32(1.0) if self.set_alpha_to_one else acp[0]
        prev = timesteps - self.num_train_timesteps // num_inference_steps  # diffusers' rule, for every spacing
        alpha_prev = np.where(prev >= 0, acp[np.maximum(prev, 0)], final).astype(np.float32)
        return DDIMSchedule(timesteps.astype(np.int32), acp[timesteps], alpha_prev, np.asarray(1.0, np.float32))

    def scale_model_input(self, schedule: DDIMSchedule, sample: jax.Array, step_index: jax.Array) -> jax.Array:
        return sample

    def step(self, schedule: DDIMSchedule, model_output: jax.Array, step_index: jax.Array,
             sample: jax.Array, state: Any = None) -> tuple[jax.Array, Any]:
        """One DDIM step, eta 0 (diffusers' `step(...).prev_sample`, same float32 operations).
        model_output and sample [B, h, w, C] → (prev_sample [B, h, w, C], state). Jittable."""
        alpha_prod_t = jnp.asarray(schedule.alpha_prod_t)[step_index]
        alpha_prod_t_prev = jnp.asarray(schedule.alpha_prod_t_prev)[step_index]
        beta_prod_t = 1 - alpha_prod_t
        if self.prediction_type == "epsilon":
            pred_original_sample = (sample - jnp.sqrt(beta_prod_t) * model_output) / jnp.sqrt(alpha_prod_t)
            pred_epsilon = model_output
        else:  # v_prediction
            pred_original_sample = jnp.sqrt(alpha_prod_t) * sample - jnp.sqrt(beta_prod_t) * model_output
            pred_epsilon = jnp.sqrt(alpha_prod_t) * model_output + jnp.sqrt(beta_prod_t) * sample
        if self.clip_sample:
            pred_original_sample = jnp.clip(pred_original_sample, -self.clip_sample_range, self.clip_sample_range)
        prev = jnp.sqrt(alpha_prod_t_prev) * pred_original_sample + jnp.sqrt(1 - alpha_prod_t_prev) * pred_epsilon
        return prev, state


class DPMSolverSchedule(NamedTuple):
    """`DPMSolverMultistepScheduler.set_timesteps`' tables."""

    timesteps: np.ndarray  # [N] int32
    sigmas: np.ndarray  # [N + 1] float32, descending; the last is 0 (or σ_min with final_sigmas_type)
    init_noise_sigma: np.ndarray  # () float32: 1


@dataclasses.dataclass(frozen=True)
class DPMSolverMultistepScheduler(_Scheduler):
    """diffusers' `DPMSolverMultistepScheduler` as DPM-Solver++ (its default algorithm): orders 1 and 2
    ("DPM++ 2M"; with `use_karras_sigmas`, "DPM++ 2M Karras"), midpoint or heun, epsilon and v_prediction,
    any spacing, first order at the first step and (`lower_order_final`, `euler_at_final`, a final σ of 0) the
    last. The sample lives in the VP space (x_t = α_t x0 + σ'_t ε with α_t = 1/√(σ_t² + 1), σ'_t = σ_t α_t):
    no input scaling, initial noise unscaled. The state is the previous step's x0 prediction."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    solver_order: int = 2
    prediction_type: str = "epsilon"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    use_karras_sigmas: bool = False
    sigma_min: float | None = None  # not DPM's own fields, but read by its Karras sigmas (diffusers: hasattr)
    sigma_max: float | None = None
    final_sigmas_type: str = "zero"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0

    _REFUSED = {"trained_betas": (None, (None,)), "algorithm_type": ("dpmsolver++", ("dpmsolver++",)),
                "solver_order": (2, (1, 2)), "solver_type": ("midpoint", ("midpoint", "heun")),
                "thresholding": (False, (False,)), "variance_type": (None, (None,)),
                "use_exponential_sigmas": (False, (False,)), "use_beta_sigmas": (False, (False,)),
                "use_lu_lambdas": (False, (False,)), "use_flow_sigmas": (False, (False,)),
                "use_dynamic_shifting": (False, (False,)), "lambda_min_clipped": (-math.inf, (-math.inf,)),
                "rescale_betas_zero_snr": (False, (False,)), "final_sigmas_type": ("zero", ("zero", "sigma_min"))}

    def set_timesteps(self, num_inference_steps: int) -> DPMSolverSchedule:
        """diffusers' `set_timesteps(num_inference_steps)` (its own spacing rules: "leading" divides the
        training steps by N + 1), in numpy."""
        n, train = num_inference_steps, self.num_train_timesteps
        if not 1 <= n <= train:
            raise ValueError(f"num_inference_steps={n}: expected 1 … {train}")
        if self.timestep_spacing == "linspace":
            timesteps = np.linspace(0, train - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        elif self.timestep_spacing == "leading":
            timesteps = (np.arange(0, n + 1) * (train // (n + 1))).round()[::-1][:-1].astype(np.int64)
            timesteps += self.steps_offset
        else:  # trailing
            timesteps = np.arange(train, 0, -train / n).round().astype(np.int64) - 1
        train_sigmas = self.train_sigmas()
        if self.use_karras_sigmas:
            sigmas = self._karras(np.flip(train_sigmas), n)
            log_sigmas = np.log(train_sigmas)
            timesteps = np.array([self._sigma_to_t(sigma, log_sigmas) for sigma in sigmas]).round()
        else:
            sigmas = np.interp(timesteps, np.arange(len(train_sigmas)), train_sigmas)
        last = train_sigmas[0] if self.final_sigmas_type == "sigma_min" else 0.0
        sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        return DPMSolverSchedule(timesteps.astype(np.int32), sigmas, np.asarray(1.0, np.float32))

    def scale_model_input(self, schedule: DPMSolverSchedule, sample: jax.Array, step_index: jax.Array) -> jax.Array:
        return sample

    def init_state(self, sample: jax.Array) -> jax.Array:
        return jnp.zeros(sample.shape, jnp.float32)  # the previous x0 prediction (none before the first step)

    def step(self, schedule: DPMSolverSchedule, model_output: jax.Array, step_index: jax.Array,
             sample: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One DPM-Solver++ step from σ_i to σ_{i+1} (diffusers' `step(...).prev_sample`, same float32
        operations); `state` is the x0 prediction of step i − 1, and the new state step i's. Jittable."""
        sigmas, n = jnp.asarray(schedule.sigmas), len(schedule.timesteps)

        def alpha_sigma_lambda(sigma):
            alpha = 1 / jnp.sqrt(sigma * sigma + 1)
            sigma = sigma * alpha
            return alpha, sigma, jnp.log(alpha) - jnp.log(sigma)

        alpha_s0, sigma_s0, lambda_s0 = alpha_sigma_lambda(sigmas[step_index])
        alpha_t, sigma_t, lambda_t = alpha_sigma_lambda(sigmas[step_index + 1])
        if self.prediction_type == "epsilon":
            x0 = (sample - sigma_s0 * model_output) / alpha_s0
        else:  # v_prediction
            x0 = alpha_s0 * sample - sigma_s0 * model_output
        sample = sample.astype(jnp.float32)
        h = lambda_t - lambda_s0
        prev = (sigma_t / sigma_s0) * sample - (alpha_t * (jnp.exp(-h) - 1.0)) * x0
        if self.solver_order == 2:
            _, _, lambda_s1 = alpha_sigma_lambda(sigmas[jnp.maximum(step_index - 1, 0)])
            d1 = (1.0 / ((lambda_s0 - lambda_s1) / h)) * (x0 - state)
            if self.solver_type == "midpoint":
                second = prev - 0.5 * (alpha_t * (jnp.exp(-h) - 1.0)) * d1
            else:  # heun
                second = prev + (alpha_t * ((jnp.exp(-h) - 1.0) / h + 1.0)) * d1
            # first order at the first step, and at the last where diffusers lowers the order for stability
            final_first = self.euler_at_final or (self.lower_order_final and n < 15) or self.final_sigmas_type == "zero"
            first = (step_index == 0) | ((step_index == n - 1) & final_first)
            prev = jnp.where(first, prev, second)
        return prev.astype(model_output.dtype), x0


SCHEDULERS = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler, "dpm": DPMSolverMultistepScheduler}
Scheduler = EulerDiscreteScheduler | DDIMScheduler | DPMSolverMultistepScheduler
# The names sampling takes: each scheduler, and "-karras" for those with Karras sigmas ("dpm-karras": DPM++ 2M Karras)
SCHEDULER_NAMES = (*SCHEDULERS, *(f"{name}-karras" for name, cls in SCHEDULERS.items()
                                  if "use_karras_sigmas" in {f.name for f in dataclasses.fields(cls)}))


def make_scheduler(name: str | None, config: Mapping[str, Any] | None = None) -> Scheduler:
    """`SCHEDULERS[name].from_config(config)` (SDXL's config when None), like diffusers'
    `EulerDiscreteScheduler.from_config(pipe.scheduler.config)`; a name ending in "-karras" sets
    `use_karras_sigmas=True`, as `DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True)`, and
    a plain name False (a config's Karras sigmas are not inherited: the name says what runs). `name` None or
    "": the config's own scheduler (`scheduler_name`)."""
    config = dict(SDXL_SCHEDULER_CONFIG if config is None else config)
    name = name or scheduler_name(config)
    if name not in SCHEDULER_NAMES:
        raise ValueError(f"scheduler {name!r}: expected one of {list(SCHEDULER_NAMES)}")
    base = name.removesuffix("-karras")
    if "use_karras_sigmas" in {f.name for f in dataclasses.fields(SCHEDULERS[base])}:
        config["use_karras_sigmas"] = name.endswith("-karras")
    return SCHEDULERS[base].from_config(config)


def scheduler_name(config: Mapping[str, Any]) -> str:
    """The scheduler a pipeline's scheduler_config.json names (`_class_name`, with its Karras sigmas) as one of
    `SCHEDULER_NAMES`, what diffusers' `from_pretrained` runs; "euler" (SDXL's) where it names none of them or
    another class (`chosen_scheduler` says so)."""
    name = {cls.__name__: n for n, cls in SCHEDULERS.items()}.get(config.get("_class_name", ""), "euler")
    karras = f"{name}-karras"
    return karras if config.get("use_karras_sigmas") and karras in SCHEDULER_NAMES else name


def chosen_scheduler(name: str | None, config: Mapping[str, Any]) -> str:
    """`name`, or else the pipeline's own (`scheduler_name`), saying so on stderr where the pipeline names a
    scheduler that is not implemented here."""
    if name:
        return name
    own = config.get("_class_name")
    if own and own not in {cls.__name__ for cls in SCHEDULERS.values()}:
        print(f"note: the pipeline's scheduler {own} is not implemented here: sampling with "
              f"{scheduler_name(config)} (see --scheduler)", file=sys.stderr)
    return scheduler_name(config)


# ---- the pipeline -------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class Pipeline:
    """Everything `generate` needs: an SDXL-family UNet with the VAE, text encoders and scheduler settings
    of an SDXL pipeline. `dtype` is the compute dtype of the UNet and the VAE (the VAE computes in float32
    when that is float16 and its config says `force_upcast`, as diffusers upcasts it); the text encoders
    always compute in float32 (they run once per batch)."""

    unet_spec: UNetSpec | None  # None: the parts only (`load_parts`)
    unet_params: dict | None
    text_encoders: TextEncoders
    vae_spec: VAESpec
    vae_params: dict
    scheduler_config: dict[str, Any]
    force_zeros_for_empty_prompt: bool = True
    dtype: Any = jnp.float32
    name: str = ""  # where the UNet came from, for labels and logs
    pipeline_dir: str = ""  # where the VAE, text encoders and scheduler came from

    @property
    def vae_scale_factor(self) -> int:
        """Image side ÷ latent side (8 for SDXL)."""
        return self.vae_spec.downscale

    @property
    def size_multiple(self) -> int:
        """Image sides must be multiples of this: the VAE's factor × the UNet's 2^(blocks − 1)."""
        return self.vae_scale_factor * self.unet_spec.downscale

    @property
    def default_size(self) -> tuple[int, int]:
        """diffusers' default (height, width): the UNet's sample_size (one side, or (h, w)) × the VAE's
        factor (SDXL: 1024 × 1024)."""
        size = self.unet_spec.sample_size or 128
        h, w = (size, size) if isinstance(size, int) else size
        return h * self.vae_scale_factor, w * self.vae_scale_factor

    def check_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """(height, width) in pixels, defaults filled in; ValueError when not multiples of `size_multiple`."""
        height = self.default_size[0] if height is None else height
        width = self.default_size[1] if width is None else width
        m = self.size_multiple
        for name, value in (("height", height), ("width", width)):
            if value <= 0 or value % m:
                raise ValueError(f"{name}={value}: must be a positive multiple of {m} (the VAE's "
                                 f"{self.vae_scale_factor}× times the UNet's {m // self.vae_scale_factor}× "
                                 "downsampling)")
        return height, width


def load_pipeline(model: str | os.PathLike, pipeline: str | os.PathLike | None = None, *, ema: bool | None = None,
                  dtype: str | Any = "float32", parts: Pipeline | None = None) -> Pipeline:
    """A `Pipeline` whose UNet is `model` and whose VAE, text encoders and scheduler come from `pipeline`.

    `model`: a diffusers pipeline folder (its unet/), a diffusers UNet folder, or a training checkpoint of
    `python -m jaxdistill.train` (workdir, stage or step folder; `ema` as `checkpoint.load_checkpoint`: None
    follows the run, its EMA weights when it kept them; True / False the EMA / trained weights). `pipeline`:
    a diffusers SDXL pipeline folder; default `model` itself when it is a pipeline folder, or for a
    checkpoint the run's `data.pipeline` / pipeline-folder teacher. `parts`: another `Pipeline` whose VAE,
    text encoders and scheduler to share instead (a teacher and a student on one copy of them). `dtype`:
    the UNet's parameters are cast to it and it computes in it ("float32", "bfloat16"; "float16" on GPUs).
    Raises FileNotFoundError / ValueError with the reason when something is missing or does not fit."""
    model = Path(model)
    dtype = jnp.dtype(dtype)
    if dtype == jnp.float16 and jax.default_backend() == "cpu":
        raise ValueError("dtype float16: XLA:CPU's attention does not compute in float16; use bfloat16 or float32 "
                         "on a CPU (float16 is for GPUs)")
    # A pipeline or UNet folder (a workdir has a config.json too, and may hold an export in unet/): one set
    # of weights, whatever they are.
    folder = not is_workdir(model) and (is_pipeline(model) or (model / CONFIG_NAME).is_file())
    if folder and ema is not None:  # its one set of weights: only what its record says they are
        from jaxdistill.export import check_weights_choice, folder_provenance  # export imports the trainer

        check_weights_choice(model, folder_provenance(model, resolve_unet_folder(model)), ema)
    if folder:
        spec, params = load_unet(model, dtype)
        if is_pipeline(model) and pipeline is None:
            pipeline = model
    elif model.exists():
        from jaxdistill.checkpoint import load_checkpoint  # orbax: only for checkpoints

        spec, params, meta = load_checkpoint(model, ema=ema)
        params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
        if pipeline is None:  # the run's own SDXL pipeline, when it had one
            config = meta.get("config", {})
            candidates = [config.get("data", {}).get("pipeline"), config.get("teacher"), meta.get("teacher")]
            pipeline = next((c for c in candidates if c and is_pipeline(Path(c))), None)
            gone = [c for c in candidates if c and Path(c).is_absolute() and not Path(c).exists()]  # recorded in full
            if pipeline is None and parts is None and gone:
                raise FileNotFoundError(f"{model}: its run's pipeline {gone[0]} is not there (moved or deleted?): give "
                                        "the SDXL pipeline folder whose VAE, text encoders and scheduler to use "
                                        "(--pipeline DIR)")
    else:
        from jaxdistill.export import checkpoint_hint

        raise FileNotFoundError(f"model {model} does not exist{checkpoint_hint(model)}")
    if parts is None:
        if pipeline is None:
            raise FileNotFoundError(f"{model} is a UNet, not a whole pipeline: give the SDXL pipeline folder whose "
                                    "VAE, text encoders and scheduler to use (--pipeline DIR)")
        parts = load_parts(pipeline, dtype)
    elif parts.dtype != dtype:
        raise ValueError(f"the shared pipeline parts compute in {parts.dtype}, the model in {dtype}")
    return with_unet(parts, spec, params, str(model))


def load_parts(pipeline: str | os.PathLike, dtype: str | Any = "float32") -> Pipeline:
    """The VAE, text encoders and scheduler of a diffusers SDXL pipeline folder, as a `Pipeline` without a
    UNet (its own unet/ is not read): `with_unet` gives it one."""
    pipeline = Path(pipeline)
    check_pipeline_folder(pipeline)
    vae_spec, vae_params = load_vae(pipeline)
    encoders = load_text_encoders(pipeline, dtype=jnp.float32)  # once per batch: float32 costs nothing
    config = scheduler_config(pipeline)
    make_scheduler("euler", config)  # refuse an unsupported scheduler config now, not at generate
    index_file = pipeline / "model_index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else {}
    return Pipeline(None, None, encoders, vae_spec, vae_params, config,
                    bool(index.get("force_zeros_for_empty_prompt", True)), jnp.dtype(dtype), "", str(pipeline))


def scheduler_config(pipeline: str | os.PathLike) -> dict[str, Any]:
    """A pipeline folder's scheduler/scheduler_config.json (SDXL's Euler config where it has none)."""
    path = Path(pipeline) / "scheduler" / "scheduler_config.json"
    if not path.is_file():
        return dict(SDXL_SCHEDULER_CONFIG)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"cannot read {path}: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds no JSON object")
    return config


def with_unet(parts: Pipeline, spec: UNetSpec, params: dict, name: str) -> Pipeline:
    """`parts`' VAE, text encoders and scheduler (shared, not copied) with this UNet; ValueError when the
    UNet does not fit them."""
    pipe = dataclasses.replace(parts, unet_spec=spec, unet_params=params, name=name)
    _check_compatible(pipe)
    return pipe


def is_pipeline(path: str | os.PathLike) -> bool:
    """A diffusers pipeline folder (model_index.json, or at least unet/)."""
    path = Path(path)
    return (path / "model_index.json").is_file() or (path / "unet" / CONFIG_NAME).is_file()


def _check_compatible(pipe: Pipeline):
    """The UNet's conditioning widths against the text encoders' and the latent channels against the VAE's."""
    s, (e1, e2) = pipe.unet_spec, pipe.text_encoders.specs
    context, pooled = e1.hidden_size + e2.hidden_size, e2.projection_dim
    problems = []
    if s.cross_attention_dim != context:
        problems.append(f"the UNet's cross_attention_dim is {s.cross_attention_dim}, the text encoders give {context}")
    if s.addition_embed_type != "text_time":
        problems.append("the UNet has no SDXL text_time conditioning (addition_embed_type)")
    elif s.projection_class_embeddings_input_dim != pooled + 6 * s.addition_time_embed_dim:
        problems.append(f"the UNet's projection_class_embeddings_input_dim is {s.projection_class_embeddings_input_dim}"
                        f", the pooled embedding ({pooled}) and 6 time ids × {s.addition_time_embed_dim} make "
                        f"{pooled + 6 * s.addition_time_embed_dim}")
    if s.in_channels != pipe.vae_spec.latent_channels or s.out_channels != pipe.vae_spec.latent_channels:
        problems.append(f"the UNet has {s.in_channels}/{s.out_channels} channels, the VAE "
                        f"{pipe.vae_spec.latent_channels} latent channels")
    if problems:
        raise ValueError(f"{pipe.name} does not fit the pipeline's encoders: " + "; ".join(problems))


# ---- generation ---------------------------------------------------------------------------------

@dataclasses.dataclass
class SampleOutput:
    images: np.ndarray  # uint8 [B, H, W, 3]: diffusers' output_type="pil", as an array
    latents: np.ndarray  # float32 [B, h, w, C]: the final latents, before the VAE
    pixels: np.ndarray | None  # float32 [B, H, W, 3] in [0, 1]: diffusers' output_type="np" (return_pixels=True)
    finite: np.ndarray  # bool [B]: the image's latents and decoded pixels hold no NaN / Inf (a NaN pixel is 0)


def initial_latents(seed: int, height: int, width: int, channels: int = 4, *, vae_scale_factor: int = 8) -> np.ndarray:
    """N(0, 1) noise for one image of height × width pixels from one seed: float32 [1, h, w, C] with
    h = height / vae_scale_factor (SDXL: 8). Drawn by jax.random (`jax.random.key(seed)`), so a seed gives
    other noise than torch's generator in diffusers; pass these latents to both for equal images. The
    noise depends on the seed and the shape only, never on what else is in the batch."""
    shape = (1, height // vae_scale_factor, width // vae_scale_factor, channels)
    return np.asarray(jax.random.normal(jax.random.key(seed), shape, jnp.float32))


def generate(pipe: Pipeline, prompts: Sequence[str], *, seeds: Sequence[int] | None = None,
             latents: np.ndarray | None = None, steps: int = 25, guidance: float = 5.0, scheduler: str | None = None,
             height: int | None = None, width: int | None = None, negative_prompt: str | Sequence[str] = "",
             guidance_rescale: float = 0.0, batch_size: int | None = None, progress: str | None = None,
             original_size: Pair | None = None, crops_coords_top_left: Pair = (0, 0), target_size: Pair | None = None,
             negative_original_size: Pair | None = None, negative_crops_coords_top_left: Pair = (0, 0),
             negative_target_size: Pair | None = None, return_pixels: bool = False) -> SampleOutput:
    """Text → images, as diffusers' `StableDiffusionXLPipeline(prompts, ...)` computes them.

    One image per prompt: its noise from `seeds[i]` (`initial_latents`; default seeds 0 … B−1) or the given
    `latents` [B, h, w, C] (NHWC, unscaled N(0, 1) noise: diffusers' `latents=`, which both multiply by the
    scheduler's init_noise_sigma). `guidance` > 1 turns on classifier-free guidance (diffusers' rule);
    `negative_prompt` "" means zero negative conditioning when the pipeline's `force_zeros_for_empty_prompt`
    is set (diffusers' negative_prompt=None), else it is encoded (one string, or one per prompt: a list is
    encoded as given, empty strings included, as diffusers encodes a list).
    height/width in pixels (default: the UNet's sample size × the VAE's factor). `batch_size` runs the
    prompts in chunks of that many (the last chunk padded, so one compilation serves all). `scheduler`: one of
    `SCHEDULER_NAMES`, default the pipeline's own (`scheduler_name`). ValueError for a guidance that is not a
    finite number ≥ 0 or a rescale outside 0 … 1; `SampleOutput.finite` tells which images hold NaN / Inf.
    `progress`: a label for a progress bar (images done, rate, ETA; the first chunk includes compilation).
    `return_pixels`: the float images too (diffusers' output_type="np"), 4× the memory of the 8-bit ones.
    The micro-conditioning arguments are diffusers' (`add_time_ids`), (height, width) pairs and a (top, left)
    crop; with distinct negative ones, each image's rows go with its own embeddings (diffusers' repeat pairs
    them wrongly for more than one image, so this matches diffusers for one image per call)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    n = len(prompts)
    if not n:
        raise ValueError("no prompts")
    if not (math.isfinite(guidance) and guidance >= 0):
        raise ValueError(f"guidance {guidance}: a finite number ≥ 0 (> 1 turns classifier-free guidance on)")
    if not 0 <= guidance_rescale <= 1:
        raise ValueError(f"guidance_rescale {guidance_rescale}: a number in 0 … 1 (0.7 in the paper that proposed it)")
    height, width = pipe.check_size(height, width)
    f, channels = pipe.vae_scale_factor, pipe.unet_spec.in_channels
    shape = (n, height // f, width // f, channels)
    if latents is None:
        seeds = list(range(n)) if seeds is None else check_seeds(seeds)
        if len(seeds) != n:
            raise ValueError(f"{len(seeds)} seeds for {n} prompts: give one seed per prompt")
        latents = np.concatenate([initial_latents(s, height, width, channels, vae_scale_factor=f) for s in seeds])
    elif seeds is not None:
        raise ValueError("give seeds or latents, not both")
    latents = np.asarray(latents, np.float32)
    if latents.shape != shape:
        raise ValueError(f"latents of shape {latents.shape}: expected {shape} (NHWC, {height}×{width} pixels)")
    negatives = [negative_prompt] * n if isinstance(negative_prompt, str) else list(negative_prompt)
    if len(negatives) != n:
        raise ValueError(f"{len(negatives)} negative prompts for {n} prompts")
    time_ids = add_time_ids(height, width, original_size, crops_coords_top_left, target_size, negative_original_size,
                            negative_crops_coords_top_left, negative_target_size)
    sched = make_scheduler(scheduler, pipe.scheduler_config)
    schedule = sched.set_timesteps(steps)
    # Decided for the call, not per chunk, so an image does not depend on `batch_size`: "" is diffusers'
    # negative_prompt=None (zeros); a list of negatives is encoded as given, "" included, as diffusers does.
    zero_negatives = pipe.force_zeros_for_empty_prompt and isinstance(negative_prompt, str) and not negative_prompt

    chunk = min(batch_size or n, n)
    outputs = []
    from tqdm import tqdm

    bar = tqdm(total=n, desc=progress, unit="image", disable=progress is None, dynamic_ncols=True)
    for start in range(0, n, chunk):
        idx = [min(i, n - 1) for i in range(start, start + chunk)]  # pad the last chunk with its last item
        out = _generate_batch(pipe, [prompts[i] for i in idx], [negatives[i] for i in idx], zero_negatives,
                              latents[idx], sched, schedule, guidance, guidance_rescale, time_ids)
        # The VAE decodes chunk by chunk too: SDXL's decoder needs ~3.5 GB of activations per 1024² image. Each
        # chunk becomes 8-bit images at once: float32 pixels of 500 images at 1024² would be 6 GB.
        keep = min(chunk, n - start)
        final, decoded = out[:keep], _decode(pipe, out)[:keep]
        finite = np.isfinite(final).all(axis=(1, 2, 3)) & np.isfinite(decoded).all(axis=(1, 2, 3))
        # diffusers' VaeImageProcessor.postprocess: denormalize, then ×255 and round for PIL.
        pixels = np.clip(decoded * np.float32(0.5) + np.float32(0.5), 0, 1)
        images = (np.nan_to_num(pixels) * 255).round().astype(np.uint8)
        outputs.append((images, final, pixels if return_pixels else None, finite))
        bar.update(keep)
    bar.close()
    images, final, pixels, finite = zip(*outputs, strict=True)
    return SampleOutput(images=np.concatenate(images), latents=np.concatenate(final),
                        pixels=np.concatenate(pixels) if return_pixels else None, finite=np.concatenate(finite))


def check_pair(value, low: int) -> Pair:
    """A micro-conditioning pair as two ints ≥ `low` (1: a (height, width) size, 0: a (top, left) crop);
    ValueError otherwise."""
    try:
        values = tuple(operator.index(v) for v in value)
    except TypeError:
        values = ()
    if len(values) != 2 or min(values) < low:
        what = "(height, width), positive integers" if low else "(top, left), integers ≥ 0"
        raise ValueError(f"{value!r}: expected {what}")
    return values


def add_time_ids(height: int, width: int, original_size: Pair | None = None, crops_coords_top_left: Pair = (0, 0),
                 target_size: Pair | None = None, negative_original_size: Pair | None = None,
                 negative_crops_coords_top_left: Pair = (0, 0), negative_target_size: Pair | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """SDXL's micro-conditioning as diffusers' pipeline sets it → (time ids, negative time ids), float32 [6]
    each: original size (default (height, width)) + crop top-left + target size (default (height, width));
    the negative's own only when both its sizes are given, else the prompt's. ValueError names a bad one."""
    def ids(original, crop, target, prefix=""):
        out = []
        for name, value, low in (("original_size", original, 1), ("crops_coords_top_left", crop, 0),
                                 ("target_size", target, 1)):
            try:
                out += check_pair(value, low)
            except ValueError as e:
                raise ValueError(f"{prefix}{name}={e}") from None
        return np.asarray(out, np.float32)

    size = (height, width)
    positive = ids(original_size or size, crops_coords_top_left, target_size or size)
    negative = ids(negative_original_size or size, negative_crops_coords_top_left, negative_target_size or size,
                   "negative_")  # checked always, though diffusers uses it only when both negative sizes are given
    return positive, negative if negative_original_size is not None and negative_target_size is not None else positive


def _decode(pipe: Pipeline, latents: np.ndarray) -> np.ndarray:
    vae_dtype = jnp.float32 if pipe.dtype == jnp.float16 and pipe.vae_spec.force_upcast else pipe.dtype
    return np.asarray(vae_decode(pipe.vae_spec, pipe.vae_params, jnp.asarray(latents), dtype=vae_dtype), np.float32)


def _generate_batch(pipe: Pipeline, prompts: list[str], negatives: list[str], zero_negatives: bool,
                    latents: np.ndarray, scheduler: Scheduler, schedule, guidance: float, guidance_rescale: float,
                    time_ids: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Conditioning for one batch (`zero_negatives`: zero negative conditioning instead of encoding
    `negatives`; `time_ids`: `add_time_ids`), then the jitted loop → final latents [B, h, w, C]."""
    encoders = pipe.text_encoders
    prompt_embeds, pooled = _encode(encoders, encoders.params, *encoders.tokenize(prompts))
    guided = guidance > 1.0
    if guided:
        if zero_negatives:
            negative_embeds, negative_pooled = jnp.zeros_like(prompt_embeds), jnp.zeros_like(pooled)
        else:
            negative_embeds, negative_pooled = _encode(encoders, encoders.params, *encoders.tokenize(negatives))
        prompt_embeds = jnp.concatenate([negative_embeds, prompt_embeds])  # uncond first, as diffusers
        pooled = jnp.concatenate([negative_pooled, pooled])
    n = len(prompts)
    ids, negative_ids = time_ids
    batch_time_ids = np.stack([negative_ids] * n * guided + [ids] * n)
    final = _denoise(pipe.unet_spec, pipe.dtype, scheduler, guided, guidance_rescale > 0, pipe.unet_params,
                     schedule, jnp.asarray(latents), prompt_embeds, pooled, jnp.asarray(batch_time_ids),
                     jnp.float32(guidance), jnp.float32(guidance_rescale))
    return np.asarray(final, np.float32)


@functools.partial(jax.jit, static_argnums=0)
def _encode(encoders: TextEncoders, params: Mapping, ids1: np.ndarray, ids2: np.ndarray) -> tuple[jax.Array, ...]:
    """`encoders.encode`, jitted once per TextEncoders (static: hashed by identity)."""
    return encoders.encode(params, ids1, ids2)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _denoise(spec: UNetSpec, dtype, scheduler: Scheduler, guided: bool, rescale: bool, params: Mapping, schedule,
             latents: jax.Array, prompt_embeds: jax.Array, pooled: jax.Array, time_ids: jax.Array,
             guidance: jax.Array, guidance_rescale: jax.Array) -> jax.Array:
    """The whole denoising loop, one fori_loop. latents [B, h, w, C] unscaled noise; prompt_embeds
    [B', 77, D], pooled [B', P], time_ids [B', 6] with B' = 2B (uncond, cond) when `guided`, else B."""
    unet = UNet(spec, dtype=dtype)

    def body(i, carry):
        x, state = carry
        model_input = jnp.concatenate([x, x]) if guided else x
        model_input = scheduler.scale_model_input(schedule, model_input, i)
        t = jnp.asarray(schedule.timesteps)[i]
        noise_pred = unet.apply({"params": params}, model_input, t, prompt_embeds, text_embeds=pooled,
                                time_ids=time_ids).sample.astype(jnp.float32)
        if guided:
            noise_pred_uncond, noise_pred_text = jnp.split(noise_pred, 2)
            noise_pred = noise_pred_uncond + guidance * (noise_pred_text - noise_pred_uncond)
            if rescale:
                noise_pred = rescale_noise_cfg(noise_pred, noise_pred_text, guidance_rescale)
        return scheduler.step(schedule, noise_pred, i, x, state)

    x = latents.astype(jnp.float32) * schedule.init_noise_sigma
    return jax.lax.fori_loop(0, len(schedule.timesteps), body, (x, scheduler.init_state(x)))[0]


def rescale_noise_cfg(noise_cfg: jax.Array, noise_pred_text: jax.Array, guidance_rescale: jax.Array) -> jax.Array:
    """diffusers' `rescale_noise_cfg` (Lin et al. 2023, §3.4): the guided prediction rescaled to the text
    prediction's per-sample std (unbiased, as torch's), mixed back by `guidance_rescale`. [B, h, w, C]."""
    axes = tuple(range(1, noise_cfg.ndim))
    std_text = jnp.std(noise_pred_text, axis=axes, ddof=1, keepdims=True)
    std_cfg = jnp.std(noise_cfg, axis=axes, ddof=1, keepdims=True)
    return guidance_rescale * (noise_cfg * (std_text / std_cfg)) + (1 - guidance_rescale) * noise_cfg


# ---- grids and files ----------------------------------------------------------------------------

GRID_PIXELS = 48_000_000  # a grid's images are shrunk to fit: Pillow refuses to open 179 MP (a bomb) and warns at 89


def image_grid(images: Sequence[np.ndarray] | np.ndarray, rows: int, *, row_labels: Sequence[str] | None = None,
               col_labels: Sequence[str] | None = None):
    """Images (uint8 [H, W, 3] each, all one size) row by row into a `rows` × ⌈N/rows⌉ grid → PIL image of
    (left + cols·W) × (top + rows·H) pixels (each image shrunk where they would hold more than GRID_PIXELS;
    columns widened to a wider column label);
    `row_labels` (wrapped) fill a left margin, `col_labels` a top one, in Pillow's default font; no labels, no
    margins."""
    from PIL import Image, ImageDraw

    images = [np.asarray(im) for im in images]
    if not images or rows < 1:
        raise ValueError("image_grid needs at least one image and one row")
    h, w = images[0].shape[:2]
    if any(im.shape[:2] != (h, w) for im in images):
        raise ValueError("image_grid: the images differ in size")
    cols = math.ceil(len(images) / rows)
    scale = math.sqrt(GRID_PIXELS / (rows * cols * h * w))
    if scale < 1:  # a grid image viewers (and Pillow itself) open: smaller cells, not a refused file
        h, w = max(1, int(h * scale)), max(1, int(w * scale))
        images = [np.asarray(Image.fromarray(im.astype(np.uint8)).resize((w, h), Image.LANCZOS)) for im in images]
    font = _font(h)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    box = lambda text: probe.multiline_textbbox((0, 0), text, font=font)  # noqa: E731
    pad = 6
    size = getattr(font, "size", 11)  # Pillow's bitmap fallback font has no size
    row_texts = [textwrap.fill(str(t), 28, max_lines=max(1, h // (size + 4)), placeholder=" …")
                 for t in row_labels or []]
    col_texts = [textwrap.fill(str(t), max(8, w // max(1, size // 2)), max_lines=2, placeholder=" …")
                 for t in col_labels or []]
    left = max((box(t)[2] for t in row_texts), default=-2 * pad) + 2 * pad
    top = max((box(t)[3] for t in col_texts), default=-2 * pad) + 2 * pad
    # a column as wide as its widest label (small images: "seed 0" is wider than 32 pixels), the image centred
    cell = max([w] + [box(t)[2] + pad for t in col_texts])
    grid = Image.new("RGB", (left + cols * cell, top + rows * h), "white")
    for k, im in enumerate(images):
        grid.paste(Image.fromarray(im.astype(np.uint8)), (left + (k % cols) * cell + (cell - w) // 2,
                                                          top + (k // cols) * h))
    draw = ImageDraw.Draw(grid)
    for r, text in enumerate(row_texts[:rows]):
        draw.multiline_text((pad, top + r * h + pad), text, fill="black", font=font)
    for c, text in enumerate(col_texts[:cols]):
        draw.multiline_text((left + c * cell + (cell - box(text)[2]) // 2, pad), text, fill="black", font=font)
    return grid


def _font(image_height: int):
    from PIL import ImageFont

    try:  # the scalable default font (Pillow ≥ 10.1 with FreeType), sized to the images
        return ImageFont.load_default(size=max(12, image_height // 24))
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def save_images(images: Sequence[np.ndarray] | np.ndarray, directory: str | os.PathLike,
                names: Sequence[str]) -> list[Path]:
    """Writes each uint8 [H, W, 3] image as DIRECTORY/NAME.png (`names` without the suffix)."""
    from PIL import Image

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if len(names) != len(images):
        raise ValueError(f"{len(names)} names for {len(images)} images")
    paths = []
    for im, name in zip(images, names, strict=True):
        Image.fromarray(np.asarray(im, np.uint8)).save(path := directory / f"{name}.png")
        paths.append(path)
    return paths


def side_by_side(teacher: Pipeline, student: Pipeline, prompts: Sequence[str], seeds: Sequence[int],
                 **generate_kwargs):
    """The teacher's and the student's images for the same prompts and seeds (one seed per prompt, the same
    initial noise for both), one pair per row: a PIL image with columns "teacher" | "student"."""
    outs = [generate(pipe, prompts, seeds=seeds, **generate_kwargs) for pipe in (teacher, student)]
    return pair_grid(outs[0].images, outs[1].images, prompts, seeds)


def pair_grid(teacher_images: np.ndarray, student_images: np.ndarray, prompts: Sequence[str],
              seeds: Sequence[int], labels: tuple[str, str] = ("teacher", "student")):
    """Rows of (teacher image, student image), labelled with the prompt and seed."""
    interleaved = [im for pair in zip(teacher_images, student_images, strict=True) for im in pair]
    row_labels = [f"{p} (seed {s})" for p, s in zip(prompts, seeds, strict=True)]
    return image_grid(interleaved, rows=len(prompts), row_labels=row_labels, col_labels=list(labels))


# ---- command line -------------------------------------------------------------------------------

def read_prompts(path: str | os.PathLike) -> list[str]:
    """One prompt per line; blank lines and lines starting with # are ignored. ValueError naming the file when
    it cannot be read or holds no prompts."""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()  # -sig: a BOM (Windows editors) is no text
    except (OSError, UnicodeDecodeError) as e:  # the file and the reason, not a bare "[Errno 2] ..."
        raise ValueError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from e
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ValueError(f"{path} holds no prompts (one per line; # starts a comment)")
    return prompts


def seed_list(text: str) -> list[int]:
    """argparse type of a comma-separated seed list ("0,1"), checked by `check_seeds`."""
    import argparse

    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated integers, e.g. 0,1") from e
    if not seeds:
        raise argparse.ArgumentTypeError(f"{text!r}: no seeds (comma-separated integers, e.g. 0,1)")
    try:
        return check_seeds(seeds)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def pair_arg(low: int):
    """argparse type of "A,B" → `check_pair((A, B), low)`."""
    import argparse

    def parse(text: str) -> Pair:
        try:
            return check_pair([int(v) for v in text.split(",")], low)
        except ValueError:
            example = "1024,1024" if low else "0,0"
            raise argparse.ArgumentTypeError(f"{text!r}: expected two comma-separated integers ≥ {low}, "
                                             f"e.g. {example}") from None
    return parse


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m jaxdistill.sample`: images from a model (pipeline, UNet folder or training checkpoint)
    for prompts and seeds: one PNG per image, grid.png (prompts × seeds), sample.json (what made them: model,
    settings, each file's prompt and seed), and with --teacher the teacher's images and side_by_side.png."""
    import argparse

    from jaxdistill import cli

    parser = cli.parser("sample", main.__doc__)
    parser.add_argument("--model", required=True,
                        help="diffusers pipeline folder, UNet folder, or training checkpoint (workdir/stage/step)")
    parser.add_argument("--pipeline", help="SDXL pipeline folder for the VAE, text encoders and scheduler "
                                           "(default: the model when it is a pipeline folder)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="a prompt (repeat for more)")
    source.add_argument("--prompts", metavar="FILE", help="a text file, one prompt per line")
    parser.add_argument("--seed", type=int, default=0, help="first seed; image k of a prompt uses seed + k")
    parser.add_argument("--num-images", type=int, default=1, help="images per prompt")
    add_sampling_args(parser, "the UNet's sample size × the VAE's factor")
    parser.add_argument("--out", required=True, help="output folder (refused if not empty, see --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --out (all of it) once the new images are written")
    parser.add_argument("--teacher", help="a teacher model (same forms as --model, same --pipeline) for "
                                          "side_by_side.png")
    parser.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                        help="a checkpoint's EMA weights (--ema) or trained weights (--no-ema); default: as the run "
                             "hands them on, its EMA weights when it kept them")
    args = parser.parse_args(argv)

    if args.prompts:
        try:
            prompts = read_prompts(args.prompts)
        except ValueError as e:
            parser.error(f"--prompts: {e}")
    else:
        prompts = args.prompt
    if not prompts:
        parser.error("no prompts")
    settings = sampling_settings(parser, args)
    if args.num_images < 1:
        parser.error("--num-images must be ≥ 1")
    try:
        check_seeds([args.seed, args.seed + args.num_images - 1])
    except ValueError as e:
        parser.error(f"--seed {args.seed} with --num-images {args.num_images}: {e}")
    try:
        # Before the slow part; what the images are made from must survive replacing --out.
        check_out(args.out, args.overwrite, (args.model, args.pipeline, args.teacher, args.prompts))
        student = load_pipeline(args.model, args.pipeline, ema=args.ema, dtype=args.dtype)
        # The teacher gets the student's VAE, text encoders and scheduler: only the UNets differ.
        try:
            teacher = load_pipeline(args.teacher, parts=student, dtype=args.dtype) if args.teacher else None
        except (OSError, ValueError) as e:
            parser.error(f"--teacher: {e}")
        check_out(args.out, args.overwrite, (student.pipeline_dir,))  # the pipeline a run recorded, too
        height, width = student.check_size(args.height, args.width)
        if teacher is not None:
            teacher.check_size(height, width)
            teacher_h, teacher_w = teacher.check_size(None, None)
            if args.height is None and args.width is None and (teacher_h, teacher_w) != (height, width):
                raise ValueError(f"the model samples at {width}×{height} by default, the teacher at "
                                 f"{teacher_w}×{teacher_h}: give --height and --width")
        make_scheduler(args.scheduler, student.scheduler_config).set_timesteps(args.steps)
    except (OSError, ValueError) as e:  # --out, missing folders, incompatible parts, sizes, scheduler configs, steps
        parser.error(str(e))
    scheduler = chosen_scheduler(args.scheduler, student.scheduler_config)
    for note in long_prompt_notes(student, prompts):
        print(f"note: {note}", file=sys.stderr)
    pairs = [(i, p, args.seed + k) for i, p in enumerate(prompts) for k in range(args.num_images)]
    kwargs = dict(settings, seeds=[s for _, _, s in pairs], scheduler=scheduler, height=height, width=width)
    out = Path(args.out)
    digits = max(3, len(str(len(prompts) - 1)))  # names sort as the prompts do
    names = [f"{i:0{digits}d}_seed{s}" for i, _, s in pairs]
    with cli.stop_when_out_of_memory(f"sampling {width}×{height}", memory_ways(args)):
        output = generate(student, [p for _, p, _ in pairs], progress="model", **kwargs)
        teacher_output = (generate(teacher, [p for _, p, _ in pairs], progress="teacher", **kwargs)
                          if teacher is not None else None)
    images, teacher_images = output.images, teacher_output.images if teacher_output else None
    broken = {who: [f"{name}.png" for name, ok in zip(names, out_.finite, strict=True) if not ok]
              for who, out_ in (("model", output), ("teacher", teacher_output)) if out_ is not None}
    # Written whole or not at all: no image of an earlier run in --out is left among these.
    record = {"model": os.path.abspath(args.model), "pipeline": os.path.abspath(student.pipeline_dir),
              "weights": weights_record(args.model, args.ema),
              "teacher": args.teacher and os.path.abspath(args.teacher),
              "teacher_weights": args.teacher and weights_record(args.teacher),
              **settings_record(args, kwargs),
              "images": [{"file": f"{name}.png", "prompt": p, "seed": seed} for name, (_, p, seed) in zip(names, pairs,
                                                                                                      strict=True)],
              "non_finite": broken}
    try:
        with whole_folder(out, args.overwrite) as tmp:
            save_images(images, tmp, names)
            (tmp / "sample.json").write_text(json.dumps(record, indent=1, ensure_ascii=False, allow_nan=False) + "\n")
            image_grid(images, rows=len(prompts), row_labels=prompts,
                       col_labels=[f"seed {args.seed + k}" for k in range(args.num_images)]).save(tmp / "grid.png")
            if teacher_images is not None:
                save_images(teacher_images, tmp / "teacher", names)
                pair_grid(teacher_images, images, [p for _, p, _ in pairs],
                          kwargs["seeds"]).save(tmp / "side_by_side.png")
    except OutFolderError as e:  # --out changed while we sampled: the images are kept beside it
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{len(images)} images ({width}×{height}, {args.steps} {scheduler} steps, guidance {args.guidance}) "
          f"→ {out}/ and {out / 'grid.png'}")
    if teacher_images is not None:
        print(f"teacher images → {out / 'teacher'}/, side by side → {out / 'side_by_side.png'}")
    for who, files in broken.items():
        if files:
            print(f"error: {len(files)} of {len(names)} {who} images hold NaN or Inf (diverged weights, or overflow "
                  f"in {args.dtype}), written black: {', '.join(files[:5])}{' …' if len(files) > 5 else ''} "
                  "(sample.json: non_finite)", file=sys.stderr)
    return 1 if any(broken.values()) else 0


MICRO_CONDITIONING = ("original_size", "crops_coords_top_left", "target_size", "negative_original_size",
                      "negative_crops_coords_top_left", "negative_target_size")  # generate's arguments


def add_sampling_args(parser, size_default: str) -> None:
    """The flags of `generate`'s settings that `sample` and `evaluate` share; `size_default` says what the
    default height and width are."""
    from jaxdistill import cli

    parser.add_argument("--negative-prompt", default="",
                        help="with --guidance > 1; empty: zero negative conditioning where the pipeline's "
                             "force_zeros_for_empty_prompt is set (SDXL's), as diffusers' negative_prompt=None")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=cli.number(0), default=5.0, help="> 1 turns classifier-free guidance on")
    parser.add_argument("--guidance-rescale", type=cli.number(0, 1), default=0.0,
                        help="mixes the guided prediction's std back towards the text prediction's (0.7 in the paper)")
    parser.add_argument("--scheduler", choices=SCHEDULER_NAMES,
                        help="euler (SDXL's), ddim, dpm (DPM-Solver++ 2M); -karras: with Karras sigmas (dpm-karras: "
                             "DPM++ 2M Karras); default: the pipeline's own, as diffusers runs it (euler where it is "
                             "none of these)")
    parser.add_argument("--height", type=int, help=f"pixels (default: {size_default})")
    parser.add_argument("--width", type=int, help=f"pixels (default: {size_default})")
    micro = parser.add_argument_group(
        "SDXL micro-conditioning", "as diffusers' pipeline arguments of the same names; sizes are HEIGHT,WIDTH, "
        "crops TOP,LEFT; the negative sizes count only when both are given")
    micro.add_argument("--original-size", type=pair_arg(1), metavar="H,W", help="default: --height,--width")
    micro.add_argument("--crops-coords-top-left", type=pair_arg(0), metavar="T,L", default=(0, 0),
                       help="default: 0,0 (well-centred images)")
    micro.add_argument("--target-size", type=pair_arg(1), metavar="H,W", help="default: --height,--width")
    micro.add_argument("--negative-original-size", type=pair_arg(1), metavar="H,W")
    micro.add_argument("--negative-crops-coords-top-left", type=pair_arg(0), metavar="T,L", default=(0, 0),
                       help="default: 0,0")
    micro.add_argument("--negative-target-size", type=pair_arg(1), metavar="H,W")
    parser.add_argument("--batch-size", type=int, default=4, help="images denoised and decoded together")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                        help="the UNets' and the VAE's compute dtype (float16: GPUs only)")


def sampling_settings(parser, args) -> dict[str, Any]:
    """`generate`'s keyword arguments from `add_sampling_args`' flags, but for the scheduler and the size (which
    need the pipeline); a step count or batch size below 1 is a usage error, a flag that does nothing is noted."""
    for name in ("steps", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be ≥ 1")
    for flag, value in (("negative-prompt", args.negative_prompt), ("guidance-rescale", args.guidance_rescale)):
        if value and args.guidance <= 1:
            print(f"note: --{flag} does nothing without --guidance > 1", file=sys.stderr)
    return {"steps": args.steps, "guidance": args.guidance, "guidance_rescale": args.guidance_rescale,
            "negative_prompt": args.negative_prompt, "batch_size": args.batch_size,
            **{name: getattr(args, name) for name in MICRO_CONDITIONING}}


def settings_record(args, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The settings of a `generate` call with these keyword arguments, for a record (time ids as rows)."""
    time_ids = add_time_ids(kwargs["height"], kwargs["width"], *(kwargs[name] for name in MICRO_CONDITIONING))
    plain = ("steps", "guidance", "guidance_rescale", "negative_prompt", "scheduler", "height", "width", "batch_size")
    return {"dtype": args.dtype, **{name: kwargs[name] for name in plain},
            "time_ids": time_ids[0].astype(int).tolist(), "negative_time_ids": time_ids[1].astype(int).tolist()}


def memory_ways(args: Any) -> list[str]:
    """What lowers sampling's device memory, from the options of `add_sampling_args` (for
    `cli.stop_when_out_of_memory`)."""
    ways = []
    if args.batch_size > 1:
        ways.append(f"a smaller --batch-size (now {args.batch_size}: images denoised and decoded together)")
    if args.dtype == "float32":
        ways.append("--dtype bfloat16 (half the weights' and activations' memory)")
    return ways


def long_prompt_notes(pipe: Pipeline, prompts: Sequence[str]) -> list[str]:
    """A note for each prompt longer than the tokenizers take (77 tokens), which diffusers cuts, saying so."""
    tokenizers = pipe.text_encoders.tokenizers
    return [f"a prompt longer than the text encoders' {tokenizers[0].model_max_length} tokens is cut there, as "
            f"diffusers does: {p!r}" for p in truncated(tokenizers, prompts)]


def weights_record(model: str | os.PathLike, ema: bool | None = None) -> dict[str, Any]:
    """Which weights `load_pipeline(model, ema=)` read, for a record: the checkpoint's step folder and whether
    its EMA weights, or the UNet folder (`export.which_weights`)."""
    from jaxdistill.export import which_weights  # export imports the trainer

    path, ema = which_weights(model, ema=ema)
    return {"path": str(path), "ema": ema}


if __name__ == "__main__":
    # Run the imported module's main: under `python -m` this file is `__main__`, and its classes would not
    # be the ones other modules import.
    from jaxdistill.sample import main as _main

    raise SystemExit(_main())
