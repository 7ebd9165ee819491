"""The distillation step: a pure function `(state, frozen, batch, rng) → (state, metrics)`; `frozen` holds
the parameters nobody trains: {"teacher": ..., "encoders": ...} (either may be None).

Noise and timesteps are drawn from `fold_in(rng, step)` (a resumed run draws the same numbers), the
teacher runs under `stop_gradient` (it is an input, not state: not optimised, not checkpointed), the
student runs forward and backward, the three losses are combined, and one AdamW update is applied.
Gradient accumulation is a `lax.scan` over micro-batches inside the step, so one step is one optimizer
update. With output and feature weights at 0 and no teacher this is plain diffusion training. With
`encode` (on-the-fly data) the batch holds pixels and token ids, encoded into latents and embeddings by
the frozen VAE and text encoders inside the step, per micro-batch.

Three options of diffusers' SDXL training script, each off at 0: `noise_offset` (ε + offset · a normal draw
per example and channel: the model learns to change an image's mean brightness), `snr_gamma` (min-SNR-γ
weights on the task term) and `empty_prompt_rate` (that share of the examples, drawn per example, trained
with the empty prompt's conditioning — zero text embeddings, SDXL's `force_zeros_for_empty_prompt` — by
student and teacher alike: the student learns the unconditional prediction classifier-free guidance uses).
Their draws have streams of their own, so the noise and timesteps do not change with them. A fourth,
`timestep_weights` (diffusers' `--timestep_bias_*`), draws the timesteps from other probabilities than uniform.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxdistill.losses import distill_loss
from jaxdistill.schedule import add_noise, draw_timesteps, min_snr_weights, prediction_target
from jaxdistill.sharding import BATCH, like_params
from jaxdistill.unet import UNet

Batch = Mapping[str, jax.Array]  # latents [B, H, W, 4], encoder_hidden_states, text_embeds, time_ids
CONDITIONING = ("encoder_hidden_states", "text_embeds", "time_ids")


LR_SCHEDULES = ("constant", "cosine", "linear")  # diffusers' get_scheduler names (each with warmup)
# The streams of a micro-batch's key, one number folded in per draw. (Not `jax.random.split`: under jax's default
# partitionable threefry, split(rng)[i] is fold_in(rng, i), so a split and a fold_in can hand out one key twice.)
NOISE, TIMESTEPS, EMPTY_PROMPTS, OFFSET_NOISE, LATENT_SAMPLE = range(5)


class TrainState(flax.struct.PyTreeNode):
    step: jax.Array
    params: Any  # the student's float32 master weights
    opt_state: Any
    ema_params: Any  # None when EMA is off


def clip_by_global_norm(max_norm: float) -> optax.GradientTransformation:
    """Scales the gradients by min(1, max_norm / (global norm + 1e-6)), as `torch.nn.utils.clip_grad_norm_`
    (the diffusers scripts' clipping) does. Same role as `optax.clip_by_global_norm`, whose per-leaf
    `select` between clipped and unclipped keeps XLA:CPU from fusing the clip into AdamW: its clip + AdamW
    update took 2.4x as long on the CPU machine (157 vs 67 ms for 79 M parameters, bench/NOTES.md)."""
    def update(updates, state, params=None):
        del params
        scale = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def make_optimizer(lr: float = 1e-5, warmup_steps: int = 0, weight_decay: float = 1e-2, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8, grad_clip: float = 1.0,
                   schedule: str = "constant", total_steps: int = 0) -> tuple[optax.GradientTransformation,
                                                                              optax.Schedule]:
    """AdamW (diffusers' defaults) behind global-norm clipping, with a linear warmup from 0 over `warmup_steps`,
    then the rate `schedule` names (`LR_SCHEDULES`), as diffusers' `get_scheduler` of that name (with warmup)
    gives it: constant, cosine (half a cosine to 0 at `total_steps`) or linear (to 0 at `total_steps`)."""
    end = max(total_steps, warmup_steps + 1)
    if schedule == "constant":
        lr_fn = optax.warmup_constant_schedule(0.0, lr, warmup_steps) if warmup_steps else optax.constant_schedule(lr)
    elif schedule == "cosine":
        lr_fn = optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, end)
    elif schedule == "linear":
        decay = optax.linear_schedule(lr, 0.0, end - warmup_steps)
        lr_fn = (optax.join_schedules([optax.linear_schedule(0.0, lr, warmup_steps), decay], [warmup_steps])
                 if warmup_steps else decay)
    else:
        raise ValueError(f"optimizer.schedule={schedule!r}: expected one of {LR_SCHEDULES}.")
    parts = [clip_by_global_norm(grad_clip)] if grad_clip else []
    tx = optax.chain(*parts, optax.adamw(lr_fn, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay))
    return tx, lr_fn


def ema_decay_at(step: jax.Array, decay: float) -> jax.Array:
    """The EMA decay for the update after `step` earlier updates: diffusers' `EMAModel` (no warm-up
    power, update_after_step 0): 0 for the first update (the EMA becomes the trained weights), then
    min(decay, (1 + step) / (10 + step)). A constant decay from the start would leave decay**N of the
    untrained pruned student in the EMA: 37 % after 10k steps at 0.9999."""
    step = jnp.asarray(step, jnp.float32)
    return jnp.where(step > 0, jnp.minimum(decay, (1.0 + step) / (10.0 + step)), 0.0)


def ema_update(ema: Any, params: Any, step: jax.Array, decay: float) -> Any:
    """The EMA after the update that follows `step` earlier updates (`ema_decay_at`)."""
    d = ema_decay_at(step, decay)
    return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p, ema, params)


def init_state(params: Any, tx: optax.GradientTransformation, ema: bool) -> TrainState:
    """float32 master copies of `params` in buffers of their own (the state is donated to the step, and a
    student fresh from pruning shares its arrays with the teacher). One jitted program, not one per leaf.
    Parameters placed on a mesh keep their placement, and so do their AdamW moments and EMA (zeros do not
    depend on the parameters, so without explicit output shardings XLA would replicate them).
    `jax.ShapeDtypeStruct` parameters (with their shardings) give the state's shapes and shardings alone,
    nothing allocated: the target a checkpoint restores into."""
    def build(params):
        params = jax.tree.map(lambda x: jnp.array(x, jnp.float32, copy=True), params)
        ema_params = jax.tree.map(lambda x: jnp.array(x, copy=True), params) if ema else None
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          ema_params=ema_params)

    leaves = jax.tree.leaves(params)
    abstract = bool(leaves) and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    sharding = getattr(leaves[0], "sharding", None) if leaves else None
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return jax.eval_shape(build, params) if abstract else jax.jit(build)(params)
    shapes = jax.eval_shape(build, params)
    out = like_params(shapes, jax.tree.map(lambda x: x.sharding, params), sharding.mesh)
    if abstract:
        return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, out)
    return jax.jit(build, out_shardings=out)(params)


def offset_noise(rng: jax.Array, shape: Sequence[int]) -> jax.Array:
    """The noise offset's draw [B, 1, 1, C] for a micro-batch's `rng` (diffusers: randn(B, C, 1, 1))."""
    return jax.random.normal(jax.random.fold_in(rng, OFFSET_NOISE), (shape[0], 1, 1, shape[-1]), jnp.float32)


def dropped_prompts(rng: jax.Array, batch: int, rate: float) -> jax.Array:
    """Which examples of a micro-batch train with the empty prompt [B] bool, for the micro-batch's `rng`."""
    return jax.random.bernoulli(jax.random.fold_in(rng, EMPTY_PROMPTS), rate, (batch,))


def empty_prompts(cond: Mapping[str, jax.Array], dropped: jax.Array) -> dict[str, jax.Array]:
    """The conditioning with the text embeddings of the `dropped` examples zeroed (the empty prompt under
    SDXL's force_zeros_for_empty_prompt); time ids stay, as the pipeline's unconditional half keeps them."""
    def zero(x):
        return jnp.where(dropped.reshape(-1, *(1,) * (x.ndim - 1)), jnp.zeros((), x.dtype), x)

    return {k: zero(v) if k != "time_ids" else v for k, v in cond.items()}


def make_train_step(student: UNet, teacher: UNet | None, tx: optax.GradientTransformation, lr_fn: optax.Schedule,
                    alphas_cumprod: jax.Array, *, pairs: Sequence[tuple[str, str]] = (),
                    weights: Mapping[str, float] | None = None, normalize: str = "none",
                    prediction_type: str = "epsilon", accumulation: int = 1, ema_decay: float = 0.0,
                    encode: Callable | None = None, mesh: jax.sharding.Mesh | None = None,
                    scan_accumulation: bool | None = None, noise_offset: float = 0.0, snr_gamma: float = 0.0,
                    empty_prompt_rate: float = 0.0, timestep_weights: Sequence[float] | None = None,
                    ) -> Callable[[TrainState, Any, Batch, jax.Array], tuple[TrainState, dict[str, jax.Array]]]:
    """Builds the (unjitted) step. `teacher` None (or output and feature weights 0): plain diffusion.
    `encode(encoder_params, pixels, ids1, ids2, rng) → {latents, encoder_hidden_states, text_embeds}`
    (`jaxdistill.prepare.make_encode`): the batch is {pixels, input_ids, input_ids_2, time_ids}.
    `mesh`: keep every micro-batch split over data × fsdp (`jaxdistill.sharding`) inside the scan.
    `scan_accumulation`: micro-batches as a `lax.scan` (True) or straight-line code (False); default: scan
    for several micro-batches, straight-line for one. Both compute the same step. `noise_offset`, `snr_gamma`,
    `empty_prompt_rate`: see the module's docstring (0: off). `timestep_weights`: the timesteps' probabilities
    (`schedule.timestep_bias_weights`); None: uniform."""
    weights = {"task": 1.0, "output": 0.5, "feature": 0.5} | dict(weights or {})
    uses_teacher = teacher is not None and (weights["output"] or (weights["feature"] and pairs))
    if (weights["output"] or weights["feature"]) and teacher is None:
        raise ValueError("output/feature distillation weights are set but there is no teacher: set them to 0 "
                         "for plain diffusion training, or give a teacher.")
    acp = jnp.asarray(alphas_cumprod)
    if timestep_weights is not None:
        timestep_weights = jnp.asarray(timestep_weights, jnp.float32)

    def loss_fn(params, frozen, batch, rng):
        teacher_params = frozen["teacher"]
        if encode is not None:  # the latent draw has its own stream: noise and timesteps stay as without it
            encoded = encode(frozen["encoders"], batch["pixels"], batch["input_ids"], batch["input_ids_2"],
                             jax.random.fold_in(rng, LATENT_SAMPLE))
            batch = jax.lax.stop_gradient(encoded) | {"time_ids": batch["time_ids"]}
        latents = batch["latents"].astype(jnp.float32)
        noise_rng, t_rng = jax.random.fold_in(rng, NOISE), jax.random.fold_in(rng, TIMESTEPS)
        noise = jax.random.normal(noise_rng, latents.shape, jnp.float32)
        timesteps = draw_timesteps(t_rng, latents.shape[0], acp.shape[0], timestep_weights)
        if noise_offset:
            noise = noise + noise_offset * offset_noise(rng, latents.shape)
        noisy = add_noise(acp, latents, noise, timesteps)
        target = prediction_target(acp, latents, noise, timesteps, prediction_type)
        cond = {k: batch[k] for k in CONDITIONING if k in batch}
        if empty_prompt_rate:
            cond = empty_prompts(cond, dropped_prompts(rng, latents.shape[0], empty_prompt_rate))
        task_weights = min_snr_weights(acp, timesteps, snr_gamma, prediction_type) if snr_gamma else None
        t_out = None
        if uses_teacher:
            t_out = jax.lax.stop_gradient(teacher.apply({"params": teacher_params}, noisy, timesteps, **cond))
        s_out = student.apply({"params": params}, noisy, timesteps, **cond)
        return distill_loss(s_out.sample, target, teacher_pred=None if t_out is None else t_out.sample,
                            student_features=s_out.features, teacher_features=None if t_out is None else t_out.features,
                            pairs=pairs if uses_teacher else (), weights=weights, normalize=normalize,
                            task_weights=task_weights)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    # the terms distill_loss returns (known up front: tracing the models once more to ask costs seconds)
    term_names = ["task"] + (["output_kd"] if uses_teacher and weights["output"] else [])
    if uses_teacher and weights["feature"] and pairs:
        term_names += ["feature_kd"] + [f"feature/{s}" for s, _ in pairs]

    def step(state: TrainState, frozen: Mapping[str, Any], batch: Batch, rng: jax.Array):
        rng = jax.random.fold_in(rng, state.step)
        # [B, ...] → [accumulation, B / accumulation, ...], micro-batch i = examples i, i + A, i + 2A, ...: each
        # device's block of a batch split over the mesh holds its share of every micro-batch, so no data moves.
        # Gradients are averaged over micro-batches.
        micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // accumulation, accumulation, *x.shape[1:]).swapaxes(0, 1),
                             batch)
        if mesh is not None:
            split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, BATCH))
            micro = jax.lax.with_sharding_constraint(micro, split)

        def accumulate(carry, inputs):
            index, mb = inputs
            (loss, terms), grads = grad_fn(state.params, frozen, mb, jax.random.fold_in(rng, index))
            return jax.tree.map(jnp.add, carry, (grads, {"loss": loss, **terms})), None

        zero_metrics = dict.fromkeys(["loss", *term_names], jnp.zeros((), jnp.float32))
        carry = (jax.tree.map(jnp.zeros_like, state.params), zero_metrics)
        if not (accumulation > 1 if scan_accumulation is None else scan_accumulation):
            # One micro-batch needs no loop (outside one XLA also drops the zero carry). Several are a loop:
            # one copy of the body, so the compile time does not grow with their number (on the CPU
            # machine, 4 micro-batches: 58 s scanned, 328 s straight-line; step times within its drift).
            for i in range(accumulation):
                carry, _ = accumulate(carry, (jnp.int32(i), jax.tree.map(lambda x, i=i: x[i], micro)))
        else:
            carry, _ = jax.lax.scan(accumulate, carry, (jnp.arange(accumulation), micro))
        grads, metrics = carry
        grads, metrics = jax.tree.map(lambda x: x / accumulation, (grads, metrics))

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema_params
        if ema is not None:
            ema = ema_update(ema, params, state.step, ema_decay)
        metrics |= {"grad_norm": optax.tree.norm(grads), "lr": lr_fn(state.step)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema), metrics

    return step
