"""SDXL's training noise schedule (diffusers' DDPMScheduler, "scaled_linear" betas) as plain arrays and
pure functions: noising, prediction targets. Samplers live in `sample.py`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction")
# The fields of config.schedule, named as in diffusers' scheduler configs.
SCHEDULE_FIELDS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "prediction_type")


def alphas_cumprod(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                   beta_schedule: str = "scaled_linear") -> np.ndarray:
    """ᾱ_t for t in [0, T) [T] float32, bit-equal to diffusers' (torch) table. Sampling needs the last ulp:
    the smallest σ = √((1 − ᾱ)/ᾱ) comes from 1 − ᾱ ≈ 1e-3. torch's float32 linspace is start + step·i
    (from the end for the second half) with step in float32 and one rounding; its cumprod accumulates in
    double."""
    if beta_schedule not in ("scaled_linear", "linear"):
        raise ValueError(f"beta_schedule={beta_schedule!r}: expected 'scaled_linear' (SDXL) or 'linear'.")
    n, start, end = num_train_timesteps, beta_start, beta_end
    if beta_schedule == "scaled_linear":
        start, end = start**0.5, end**0.5
    start32, end32 = np.float32(start), np.float32(end)
    step = (end32 - start32) / np.float32(n - 1)
    i = np.arange(n, dtype=np.float64)
    betas = np.where(i < n / 2, start32 + np.float64(step) * i, end32 - np.float64(step) * (n - 1 - i)).astype(
        np.float32)
    if beta_schedule == "scaled_linear":
        betas = betas**2
    return np.cumprod((np.float32(1.0) - betas).astype(np.float64)).astype(np.float32)


def _coefficients(acp: jax.Array, timesteps: jax.Array, ndim: int) -> tuple[jax.Array, jax.Array]:
    a = acp[timesteps].reshape((-1,) + (1,) * (ndim - 1))
    return jnp.sqrt(a), jnp.sqrt(1.0 - a)


def add_noise(acp: jax.Array, x0: jax.Array, noise: jax.Array, timesteps: jax.Array) -> jax.Array:
    """x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε. x0, noise [B, ...], timesteps [B] int."""
    signal, sigma = _coefficients(acp, timesteps, x0.ndim)
    return signal * x0 + sigma * noise


def prediction_target(acp: jax.Array, x0: jax.Array, noise: jax.Array, timesteps: jax.Array,
                      prediction_type: str) -> jax.Array:
    """What the UNet learns to predict: ε, or v = √ᾱ_t ε − √(1−ᾱ_t) x0."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        signal, sigma = _coefficients(acp, timesteps, x0.ndim)
        return signal * noise - sigma * x0
    raise ValueError(f"prediction_type={prediction_type!r}: expected one of {PREDICTION_TYPES}.")


def min_snr_weights(acp: jax.Array, timesteps: jax.Array, gamma: float, prediction_type: str) -> jax.Array:
    """Min-SNR-γ loss weights [B] (Hang et al. 2023, as diffusers' `--snr_gamma`): min(SNR_t, γ) / SNR_t for
    ε-prediction, min(SNR_t, γ) / (SNR_t + 1) for v-prediction, SNR_t = ᾱ_t / (1 − ᾱ_t). Low-noise steps,
    whose targets are easy and whose gradients would otherwise dominate, are weighted down."""
    a = acp[timesteps].astype(jnp.float32)
    snr = a / (1.0 - a)
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r}: expected one of {PREDICTION_TYPES}.")
    return jnp.minimum(snr, gamma) / (snr if prediction_type == "epsilon" else snr + 1.0)


# diffusers' --timestep_bias_strategy values → the --timestep_bias_* fields each reads; their defaults (its script's)
TIMESTEP_BIAS = {"none": (), "earlier": ("multiplier", "portion"), "later": ("multiplier", "portion"),
                 "range": ("multiplier", "begin", "end")}
TIMESTEP_BIAS_DEFAULTS = dict(multiplier=1.0, portion=0.25, begin=0, end=1000)


def timestep_bias_weights(num_timesteps: int, strategy: str = "none", multiplier: float = 1.0, portion: float = 0.25,
                          begin: int = 0, end: int = 1000) -> np.ndarray | None:
    """The training timesteps' probabilities with diffusers' `--timestep_bias_*` (its SDXL training script):
    `earlier` the first `portion` of the timesteps, `later` the last, `range` [begin, end) drawn `multiplier`
    times as often as the rest. None for `none`: uniform, drawn as without a bias."""
    if strategy == "none":
        return None
    count = int(portion * num_timesteps)
    biased = {"earlier": slice(0, count), "later": slice(num_timesteps - count, None), "range": slice(begin, end)}
    weights = np.ones(num_timesteps)
    weights[biased[strategy]] *= multiplier
    return weights / weights.sum()


def draw_timesteps(rng: jax.Array, batch: int, num_timesteps: int, weights: jax.Array | None = None) -> jax.Array:
    """One training timestep per example: uniform (`randint`, the draw of runs without a bias), or by `weights`."""
    if weights is None:
        return jax.random.randint(rng, (batch,), 0, num_timesteps)
    return jax.random.choice(rng, num_timesteps, (batch,), p=weights).astype(jnp.int32)


def schedule_mismatches(schedule: Mapping[str, Any], scheduler_config: Mapping[str, Any]) -> list[str]:
    """How a diffusers scheduler config (a pipeline's `scheduler/scheduler_config.json`) describes another
    training schedule than `schedule` (config.schedule): one line per differing field the file sets, and
    settings this module does not implement (trained_betas, rescale_betas_zero_snr). Empty: they agree."""
    problems = []
    for field in SCHEDULE_FIELDS:
        if field not in scheduler_config:
            continue
        ours, theirs = schedule[field], scheduler_config[field]
        same = (math.isclose(float(ours), float(theirs), rel_tol=1e-9) if isinstance(ours, float)
                else ours == theirs)
        if not same:
            problems.append(f"{field}: the config has {ours!r}, the pipeline {theirs!r}")
    if scheduler_config.get("trained_betas") is not None:
        problems.append("trained_betas: the pipeline lists its own betas, which training does not implement")
    if scheduler_config.get("rescale_betas_zero_snr"):
        problems.append("rescale_betas_zero_snr: the pipeline rescales its betas to zero terminal SNR, which "
                        "training does not implement")
    return problems
