"""The distillation loss: task (noise prediction), output KD (student vs teacher prediction) and feature KD
(student vs teacher features at paired taps), each weighted, every term returned on its own for logging.

    loss = w_task · MSE(s, target) + w_out · MSE(s, t) + w_feat · Σ_taps MSE(s_f, t_f) [/ mean(t_f²)]

The task term may weight each example (`task_weights`, e.g. min-SNR-γ): mean over the batch of w_b · MSE_b.

With w_task=1, w_out=w_feat=0.5 and no normalisation this is Segmind's SSD-1B recipe (a plain sum over
taps); `normalize="teacher_ms"` divides each feature term by the teacher feature's mean square
(LAPTOP-Diff), which keeps the feature term from dwarfing the others.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp

NORMALIZATIONS = ("none", "teacher_ms")


def mse(a: jax.Array, b: jax.Array, weights: jax.Array | None = None) -> jax.Array:
    """Mean squared error in float32; with `weights` [B], the batch mean of each example's MSE times its weight."""
    square = jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32))
    if weights is None:
        return jnp.mean(square)
    return jnp.mean(jnp.mean(square, axis=tuple(range(1, square.ndim))) * weights)


def feature_terms(student: Mapping[str, jax.Array], teacher: Mapping[str, jax.Array],
                  pairs: Sequence[tuple[str, str]], normalize: str = "none") -> dict[str, jax.Array]:
    """One MSE per (student tap, teacher tap) pair, keyed by the student tap."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"feature normalisation {normalize!r}: expected one of {NORMALIZATIONS}.")
    terms = {}
    for s_name, t_name in pairs:
        target = jax.lax.stop_gradient(teacher[t_name])
        term = mse(student[s_name], target)
        if normalize == "teacher_ms":
            term = term / (jnp.mean(jnp.square(target.astype(jnp.float32))) + 1e-8)
        terms[s_name] = term
    return terms


def distill_loss(student_pred: jax.Array, target: jax.Array, *, teacher_pred: jax.Array | None = None,
                 student_features: Mapping[str, jax.Array] | None = None,
                 teacher_features: Mapping[str, jax.Array] | None = None,
                 pairs: Sequence[tuple[str, str]] = (), weights: Mapping[str, float] | None = None,
                 normalize: str = "none", task_weights: jax.Array | None = None
                 ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """→ (weighted total, {"task", "output_kd", "feature_kd", "feature/<tap>"...} terms before `weights`; the
    task term after `task_weights` [B], if given). Terms whose weight is 0 are not computed (no teacher needed
    for plain diffusion training)."""
    w = {"task": 1.0, "output": 0.5, "feature": 0.5} | dict(weights or {})
    terms = {"task": mse(student_pred, target, task_weights)}
    total = w["task"] * terms["task"]
    if w["output"]:
        terms["output_kd"] = mse(student_pred, jax.lax.stop_gradient(teacher_pred))
        total = total + w["output"] * terms["output_kd"]
    if w["feature"] and pairs:
        per_tap = feature_terms(student_features, teacher_features, pairs, normalize)
        terms["feature_kd"] = sum(per_tap.values())
        terms |= {f"feature/{k}": v for k, v in per_tap.items()}
        total = total + w["feature"] * terms["feature_kd"]
    return total, terms
