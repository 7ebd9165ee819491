"""One distillation step of ours (`jaxdistill.step`) against a PyTorch reference step of the same recipe
(`reference.torch_distill_step`): diffusers teacher and student with the same weights (ours written by
`save_unet`, read by diffusers), the same noise and timesteps, torch.optim.AdamW with optax.adamw's settings.

The teacher is a tiny two-block SDXL-shaped UNet whose mid block is cross-attention (depth 2); the student
drops one transformer layer in two modules (keeping layer 1 of one: renumbering) and has a one-resnet mid
block, so the `mid_block` pair is a different module on each side, as in SSD-1B.

Both cases clip (grad norm ≥ 2 × grad_clip = 1.0); one uses optax's and torch's default eps = 1e-8, the other
the scanned parameter layout, `normalize="teacher_ms"`, v-prediction, a perturbed student and gradient accumulation
over two micro-batches (examples i, i + 2, ... on both sides; metrics and gradients averaged over them). Both keep an
EMA, checked over a second step of ours against diffusers' `EMAModel` rule. Tolerances, all float32
(measured differences are ~1e-6 relative; `pytest -s` prints them):
- every loss term, every per-tap feature term and the grad norm (before clipping): relative 1e-4;
- the clipped gradient ĝ, read from the optimizer's moments after one step (m = (1 − b1)·ĝ, v = (1 − b2)·ĝ²),
  per parameter tensor: max |ours − torch| ≤ 1e-4 · max |torch| (2e-4 for v, a square). This is the sharp
  check of the gradients (and of the clipping factor and b1, b2);
- the parameter update Δ = new − old: max |Δ_ours − Δ_torch| ≤ 1e-3 · lr (max |Δ| ≈ lr). Adam's first step
  is −lr · (ĝ / (|ĝ| + eps) + wd · p): near ĝ = 0 it amplifies a gradient difference δ by 1/eps, so with
  eps = 1e-8 elements whose gradient is within float32 noise of zero point anywhere, in any two
  implementations (measured: 0.1 · lr at worst). So:
    eps = 1e-8: Δ is compared where |ĝ| ≥ 1e3 · eps, there an error δ moves Δ by at most
      lr · eps · δ / ĝ² ≤ 1e-3 · lr · δ / |ĝ|; at least 80 % of the elements (measured 93 %), the rest is
      covered by the moments. ĝ/|ĝ| ≈ ±1 here: this checks lr, bias correction and the decoupled decay.
    eps = 1e-3: every element. g ↦ g/(|g| + eps) is 1/eps-Lipschitz, so |Δ_ours − Δ_torch| ≤ lr · δ / eps:
      the tolerance fails for gradient differences beyond 1e-6 (the clipped gradients are at most ~2e-2).
      The update is then about proportional to ĝ, so it checks ĝ's scale and where eps enters as well.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from diffusers import UNet2DConditionModel

from jaxdistill.convert import load_unet, save_unet, to_diffusers_state_dict
from jaxdistill.layers import stack_layers, unstack_layers
from jaxdistill.prune import PrunePlan, feature_pairs, prune
from jaxdistill.reference import random_inputs, torch_distill_step, write_random_unet
from jaxdistill.schedule import alphas_cumprod, draw_timesteps, timestep_bias_weights
from jaxdistill.spec import CROSS_ATTN_MID, RESNET_MID, UNetSpec
from jaxdistill.step import (
    LR_SCHEDULES,
    NOISE,
    TIMESTEPS,
    clip_by_global_norm,
    dropped_prompts,
    init_state,
    make_optimizer,
    make_train_step,
    offset_noise,
)
from jaxdistill.unet import UNet

TEACHER = UNetSpec(block_out_channels=(32, 64), down_depths=((0,), (2,)), up_depths=((2, 2), (0, 0)),
                   num_attention_heads=(1, 2), mid_block_type=CROSS_ATTN_MID, mid_depth=2, cross_attention_dim=64,
                   addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8, norm_num_groups=8,
                   sample_size=16)
PLAN = PrunePlan(attentions={"down_blocks.1.attentions.0": (1,), "up_blocks.0.attentions.1": (0,)},
                 mid_block_type=RESNET_MID)
# lr 1e-2, not 1e-3: Δ = new − old of float32 weights near 1 carries rounding of ~1e-7; at lr 1e-2 that is
# 1e-5 of |Δ| ≈ lr, far below the update tolerance (at 1e-3 it would be 1e-4 of it).
LR, WEIGHT_DECAY, B1, B2, GRAD_CLIP = 1e-2, 1e-2, 0.9, 0.999, 1.0
RTOL_LOSS = 1e-4  # loss terms and grad norm
RTOL_MOMENT = 1e-4  # clipped gradient (first moment) per tensor; twice that for the second moment
TOL_UPDATE = 1e-3  # · lr, on the update


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Teacher folder (diffusers' random init), our pruned student written as two folders: as pruned
    (the first step of a real run: taps upstream of the first pruned module match the teacher exactly),
    and with every weight perturbed (every feature term and its gradient non-zero)."""
    root = tmp_path_factory.mktemp("step_reference")
    write_random_unet(root / "teacher", TEACHER, seed=3)
    teacher_spec, teacher = load_unet(root / "teacher")
    student_spec, student, _ = prune(teacher_spec, teacher, PLAN)
    rng = np.random.default_rng(0)

    def perturb(x):  # in numpy: eager jax ops would compile once per leaf shape
        x = np.asarray(x)
        return x + 0.05 * x.std() * rng.standard_normal(x.shape, np.float32)

    perturbed = jax.tree.map(perturb, student)
    folders = {"teacher": root / "teacher", "pruned": save_unet(root / "pruned", student_spec, student),
               "perturbed": save_unet(root / "perturbed", student_spec, perturbed)}
    return teacher_spec, teacher, student_spec, {"pruned": student, "perturbed": perturbed}, folders


def drawn_noise_and_timesteps(rng, step, latents_shape, num_timesteps, accumulation=1, empty_prompt_rate=0.0,
                              timestep_weights=None):
    """What `make_train_step` draws at `step`, for the whole batch: micro-batch i (examples i, i + A, ...)
    folds in the step, then i, then the number of each draw's stream (`step.NOISE`, ...)."""
    noise = np.zeros(latents_shape, np.float32)
    offset = np.zeros((latents_shape[0], 1, 1, latents_shape[-1]), np.float32)
    timesteps = np.zeros(latents_shape[:1], np.int32)
    dropped = np.zeros(latents_shape[:1], bool)
    micro_shape = (latents_shape[0] // accumulation, *latents_shape[1:])
    for i in range(accumulation):
        micro_rng = jax.random.fold_in(jax.random.fold_in(rng, step), i)
        noise[i::accumulation] = jax.random.normal(jax.random.fold_in(micro_rng, NOISE), micro_shape, jnp.float32)
        timesteps[i::accumulation] = draw_timesteps(jax.random.fold_in(micro_rng, TIMESTEPS), micro_shape[0],
                                                    num_timesteps, timestep_weights)
        offset[i::accumulation] = offset_noise(micro_rng, micro_shape)
        dropped[i::accumulation] = dropped_prompts(micro_rng, micro_shape[0], empty_prompt_rate)
    return noise, timesteps, offset, dropped


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


# prediction_type, ema_decay and the options ride on these two cases: a third would compile another step (~50 s).
@pytest.mark.parametrize("student_name, scan_layers, normalize, eps, compare_above, accumulation, prediction_type, "
                         "ema_decay, options", [
    # the defaults; updates compared where |ĝ| ≥ 1e3 · eps; the EMA's second decay is the warm-up's 2/11
    ("pruned", False, "none", 1e-8, 1e-5, 1, "epsilon", 0.9, {}),
    # everywhere; two micro-batches of 2; the EMA's second decay is the cap, 0.1; diffusers' script's options
    ("perturbed", True, "teacher_ms", 1e-3, 0.0, 2, "v_prediction", 0.1,
     dict(noise_offset=0.1, snr_gamma=5.0, empty_prompt_rate=0.5,
          timestep_weights=timestep_bias_weights(1000, "range", multiplier=1000.0, begin=50, end=150))),
])
def test_one_step_matches_the_pytorch_reference(models, student_name, scan_layers, normalize, eps, compare_above,
                                                accumulation, prediction_type, ema_decay, options):
    from diffusers.training_utils import EMAModel

    teacher_spec, teacher_params, student_spec, students, folders = models
    student_params = students[student_name]
    pairs = feature_pairs(teacher_spec, student_spec, "all")
    assert ("mid_block", "mid_block") in pairs and len(pairs) == 10
    acp = alphas_cumprod()
    inputs = random_inputs(student_spec, batch=2 * accumulation, size=8, seq_len=6, seed=5)
    batch = {"latents": inputs["sample"]} | {k: inputs[k] for k in ("encoder_hidden_states", "text_embeds",
                                                                     "time_ids")}
    rng = jax.random.key(7)

    # ---- ours: one jitted step, float32
    tx, lr_fn = make_optimizer(lr=LR, weight_decay=WEIGHT_DECAY, b1=B1, b2=B2, eps=eps, grad_clip=GRAD_CLIP)
    layout = stack_layers if scan_layers else (lambda p: p)
    step = make_train_step(UNet(student_spec, scan_layers=scan_layers), UNet(teacher_spec, scan_layers=scan_layers),
                           tx, lr_fn, acp, pairs=pairs, normalize=normalize, prediction_type=prediction_type,
                           accumulation=accumulation, ema_decay=ema_decay, **options)
    state = init_state(layout(student_params), tx, ema=True)
    teacher_in = layout(teacher_params)
    teacher_before = jax.tree.map(np.array, teacher_in)
    # Donated as in train.py: the state's buffers must not be the teacher's (a pruned student shares them).
    jitted = jax.jit(step, donate_argnums=(0,))
    new_state, metrics = jitted(state, {"teacher": teacher_in}, batch, rng)
    assert all(x.is_deleted() for x in jax.tree.leaves(state.params))  # donation happened
    metrics = {k: float(v) for k, v in metrics.items()}
    unlayout = unstack_layers if scan_layers else (lambda p: p)
    ours_new = to_diffusers_state_dict(unlayout(jax.device_get(new_state.params)))
    moments = jax.device_get([optax.tree_utils.tree_get(new_state.opt_state, k) for k in ("mu", "nu")])
    ours_m, ours_v = (to_diffusers_state_dict(unlayout(tree)) for tree in moments)

    # ---- the EMA over a second step of ours. diffusers' EMAModel, stepped after each optimizer update, uses
    # get_decay(k) for update k: 0 for the first (it copies the new weights), then min(ema_decay, (1 + t) / (10 + t))
    # with t = k − 1. Checked on the step itself: test_ema_follows_diffusers_ema_model covers `ema_update`, not
    # which weights and step count the step hands it.
    ema1 = to_diffusers_state_dict(unlayout(jax.device_get(new_state.ema_params)))
    second = jitted(new_state, {"teacher": teacher_in}, batch, rng)[0]  # donates new_state: read above
    params2, ema2 = (to_diffusers_state_dict(unlayout(jax.device_get(t))) for t in (second.params, second.ema_params))
    d2 = EMAModel([torch.nn.Parameter(torch.zeros(1))], decay=ema_decay).get_decay(2)
    assert d2 == min(ema_decay, 2 / 11), d2
    for name, p1 in ours_new.items():
        np.testing.assert_allclose(ema1[name], p1, rtol=1e-6, err_msg=f"EMA after step 1: {name}")
        # atol: float32 rounding where the two terms nearly cancel, on the tensor's scale
        np.testing.assert_allclose(ema2[name], d2 * ema1[name] + (1 - d2) * params2[name], rtol=1e-6,
                                   atol=1e-6 * np.max(np.abs(params2[name])), err_msg=f"EMA after step 2: {name}")
    # the second update is visible, so the decay is too (d2 · 0.5 · lr ≫ the tolerance)
    assert max(np.max(np.abs(params2[k] - ema1[k])) for k in ema1) > 0.5 * LR

    # ---- the reference: diffusers models loaded from the folders we wrote, torch.optim.AdamW
    teacher = UNet2DConditionModel.from_pretrained(folders["teacher"], low_cpu_mem_usage=False).eval()
    student = UNet2DConditionModel.from_pretrained(folders[student_name], low_cpu_mem_usage=False).train()
    old = {k: v.detach().clone().numpy() for k, v in student.state_dict().items()}
    teacher_old = {k: v.detach().clone() for k, v in teacher.state_dict().items()}
    # the same weights on both sides, bit for bit
    for name, value in to_diffusers_state_dict(student_params).items():
        assert np.array_equal(value, old[name]), name
    for name, value in to_diffusers_state_dict(teacher_params).items():
        assert np.array_equal(value, teacher_old[name].numpy()), name
    noise, timesteps, offset, dropped = drawn_noise_and_timesteps(rng, 0, batch["latents"].shape, acp.shape[0],
                                                                  accumulation, options.get("empty_prompt_rate", 0.0),
                                                                  options.get("timestep_weights"))
    if options.get("timestep_weights") is not None:  # the bias shows: uniform draws would mostly fall outside
        assert np.all((50 <= timesteps) & (timesteps < 150)), timesteps
    if options.get("empty_prompt_rate"):
        assert 0 < dropped.sum() < len(dropped), dropped  # both kinds of example in the batch
    if options.get("snr_gamma"):  # the weights are not all 1: some timesteps have SNR above γ
        assert np.any(acp[timesteps] / (1 - acp[timesteps]) > options["snr_gamma"]), timesteps
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR, betas=(B1, B2), eps=eps, weight_decay=WEIGHT_DECAY)
    ref = torch_distill_step(teacher, student, optimizer, batch, noise, timesteps, acp, pairs, None,
                             normalize=normalize, prediction_type=prediction_type, grad_clip=GRAD_CLIP,
                             accumulation=accumulation, noise_offset=options.get("noise_offset", 0.0),
                             offset_noise=offset, snr_gamma=options.get("snr_gamma", 0.0),
                             dropped=dropped if options.get("empty_prompt_rate") else None)
    new = {k: v.detach().numpy() for k, v in student.state_dict().items()}

    # ---- loss terms (the task term agreeing also shows the noise and timesteps are the ones the step drew)
    assert set(ref) == set(metrics) - {"lr"}
    bad = {k: (metrics[k], ref[k]) for k in ref
           if abs(metrics[k] - ref[k]) > RTOL_LOSS * abs(ref[k]) + (1e-9 if k.startswith("feature/") else 0)}
    assert not bad, f"ours vs torch beyond {RTOL_LOSS:g} relative: {bad}"
    assert ref["output_kd"] > 0 and ref["feature_kd"] > 0
    assert ref["grad_norm"] > 2 * GRAD_CLIP, ref["grad_norm"]  # clipping is active (and scales by < 1/2)

    # ---- the clipped gradient, via the optimizer's moments, tensor by tensor
    named = dict(student.named_parameters())
    assert set(ours_new) == set(new) == set(named)
    worst = {"m": (0.0, ""), "v": (0.0, "")}
    checks = (("m", ours_m, "exp_avg", RTOL_MOMENT), ("v", ours_v, "exp_avg_sq", 2 * RTOL_MOMENT))
    for name, p in named.items():
        for key, ours, torch_key, tol in checks:
            theirs = optimizer.state[p][torch_key].numpy()
            err = np.max(np.abs(ours[name] - theirs)) / max(np.max(np.abs(theirs)), 1e-30)
            assert err <= tol, f"{name}: Adam {key} differs by {err:.2e} of its max (tolerance {tol:g})"
            worst[key] = max(worst[key], (err, name))

    # ---- the update, tensor by tensor
    clipped = {name: optimizer.state[p]["exp_avg"].numpy() / (1 - B1) for name, p in named.items()}
    compared = total = moved = 0
    worst["update"] = (0.0, "")
    for name in new:
        d_ours, d_torch = ours_new[name] - old[name], new[name] - old[name]
        where = np.abs(clipped[name]) >= compare_above
        compared, total = compared + where.sum(), total + where.size
        err = np.max(np.abs(d_ours - d_torch)[where], initial=0.0) / LR
        assert err <= TOL_UPDATE, f"{name}: the update differs by {err:.2e}·lr (tolerance {TOL_UPDATE:g}·lr)"
        worst["update"] = max(worst["update"], (err, name))
        moved = max(moved, np.max(np.abs(d_torch)))
    assert compared >= 0.8 * total, f"only {compared / total:.0%} of the elements compared"
    assert moved > 0.5 * LR, moved  # the update is visible: the comparison is not vacuous

    # ---- the teacher is an input: untouched on both sides
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(teacher_old[k], v) for k, v in teacher.state_dict().items())
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b), teacher_in, teacher_before))
    largest = max(np.max(np.abs(g)) for g in clipped.values())
    print(f"\n{student_name}, scan_layers={scan_layers}, {normalize}, {prediction_type}, eps={eps:g}, "
          f"grad norm {ref['grad_norm']:.3g}, max |ĝ| {largest:.2g}: loss terms "
          f"{max(rel(metrics[k], ref[k]) for k in ref if ref[k]):.1e} relative (grad norm "
          f"{rel(metrics['grad_norm'], ref['grad_norm']):.1e}); m {worst['m'][0]:.1e}, v {worst['v'][0]:.1e} of the "
          f"tensor's max; update {worst['update'][0]:.1e}·lr ({worst['update'][1]}) on {compared / total:.1%}")


def test_clipping_scales_by_the_global_norm_only_above_the_limit():
    keys = jax.random.split(jax.random.key(3), 3)
    grads = {"a": jax.random.normal(keys[0], (7, 5)), "b": [jax.random.normal(keys[1], (11,)),
                                                            jax.random.normal(keys[2], (2, 3, 4))]}
    norm = float(optax.tree.norm(grads))
    clip = jax.jit(lambda g, limit: clip_by_global_norm(limit).update(g, optax.EmptyState())[0])
    # below the limit: untouched, bit for bit (the scale is exactly 1)
    below = clip(grads, 2 * norm)
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), below, grads))
    # above it: the global norm becomes the limit, every tensor scaled by the same factor, as optax's does
    above = clip(grads, norm / 4)
    np.testing.assert_allclose(float(optax.tree.norm(above)), norm / 4, rtol=1e-5)
    theirs = optax.clip_by_global_norm(norm / 4).update(grads, optax.EmptyState())[0]
    for a, b in zip(jax.tree.leaves(above), jax.tree.leaves(theirs), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=0)


def test_accumulation_as_a_scan_equals_straight_line_code(models):
    """Micro-batches as a `lax.scan` (the default for several) or as straight-line code: the same step."""
    teacher_spec, teacher_params, student_spec, students, _ = models
    pairs = feature_pairs(teacher_spec, student_spec, "all")
    inputs = random_inputs(student_spec, batch=4, size=8, seq_len=6, seed=11)
    batch = {"latents": inputs["sample"]} | {k: inputs[k] for k in ("encoder_hidden_states", "text_embeds",
                                                                     "time_ids")}
    tx, lr_fn = make_optimizer(lr=LR, grad_clip=GRAD_CLIP)
    results = []
    for scan in (True, False):
        step = make_train_step(UNet(student_spec), UNet(teacher_spec), tx, lr_fn, alphas_cumprod(), pairs=pairs,
                               accumulation=2, scan_accumulation=scan)
        state = init_state(students["perturbed"], tx, ema=False)
        results.append(jax.device_get(jax.jit(step)(state, {"teacher": teacher_params}, batch, jax.random.key(2))))
    (scanned, scanned_metrics), (straight, straight_metrics) = results
    assert set(scanned_metrics) == set(straight_metrics) and scanned_metrics["feature_kd"] > 0
    for k, v in straight_metrics.items():
        np.testing.assert_allclose(scanned_metrics[k], v, rtol=1e-5, err_msg=k)
    # Adam's first moment is (1 − b1) · the clipped gradient: the gradients agree tensor by tensor
    for a, b in zip(jax.tree.leaves(optax.tree_utils.tree_get(scanned.opt_state, "mu")),
                    jax.tree.leaves(optax.tree_utils.tree_get(straight.opt_state, "mu")), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5 * np.max(np.abs(b)) + 1e-12)


def test_ema_follows_diffusers_ema_model():
    """The EMA of the trained weights, update after update, equals diffusers' `EMAModel` (its warm-up-free
    decay min(decay, (1 + t) / (10 + t)), the first update copying the weights), on random weight sequences:
    a constant decay would differ from the first update on."""
    from diffusers.training_utils import EMAModel

    from jaxdistill.step import ema_update

    rng = np.random.default_rng(0)
    weights = [rng.standard_normal((3, 5)).astype(np.float32) for _ in range(30)]
    theirs = torch.nn.Parameter(torch.from_numpy(weights[0].copy()))
    reference = EMAModel([theirs], decay=0.5)
    ours = {"w": jnp.asarray(weights[0])}
    for step, w in enumerate(weights[1:]):
        theirs.data.copy_(torch.from_numpy(w))
        reference.step([theirs])
        ours = ema_update(ours, {"w": jnp.asarray(w)}, jnp.int32(step), 0.5)
        np.testing.assert_allclose(np.asarray(ours["w"]), reference.shadow_params[0].numpy(), rtol=1e-6, atol=1e-6)
    assert float(reference.cur_decay_value) == 0.5  # the cap was reached within the sequence


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_follow_diffusers(prediction_type):
    """`schedule.min_snr_weights` against diffusers' scripts' weighting, from its `compute_snr`, at every 7th
    timestep (SNR falls from ~1e3 to ~5e-3 over SDXL's schedule, so γ = 5 is both above and below it)."""
    from types import SimpleNamespace

    from diffusers.training_utils import compute_snr

    from jaxdistill.schedule import min_snr_weights

    acp, gamma = alphas_cumprod(), 5.0
    t = torch.arange(0, 1000, 7)
    snr = compute_snr(SimpleNamespace(alphas_cumprod=torch.from_numpy(acp)), t)
    theirs = torch.stack([snr, gamma * torch.ones_like(t)], dim=1).min(dim=1)[0]
    theirs = (theirs / (snr if prediction_type == "epsilon" else snr + 1)).numpy()
    assert theirs.min() < 0.1 and theirs.max() > 0.15  # weights reach both sides of the cap
    ours = np.asarray(min_snr_weights(jnp.asarray(acp), jnp.asarray(t.numpy()), gamma, prediction_type))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)


def test_timestep_bias_follows_diffusers_and_draws_by_its_weights():
    """`timestep_bias_weights` as diffusers' `generate_timestep_weights` (train_text_to_image_sdxl.py) defines
    them: ones, the favoured slice times the multiplier, normalised; `draw_timesteps` draws by them, and without
    a bias draws exactly what runs before the option drew (`randint`), so their resumes continue unchanged."""
    assert timestep_bias_weights(1000) is None
    later = timestep_bias_weights(1000, "later", multiplier=3.0, portion=0.25)
    np.testing.assert_allclose(later[750:], 3 / 1500)  # normalised by 750 · 1 + 250 · 3
    np.testing.assert_allclose(later[:750], 1 / 1500)
    earlier = timestep_bias_weights(1000, "earlier", multiplier=0.5, portion=0.1)
    np.testing.assert_allclose(earlier[:100], 0.5 / 950)
    np.testing.assert_allclose(earlier[100:], 1 / 950)
    window = timestep_bias_weights(1000, "range", multiplier=4.0, begin=200, end=500)
    np.testing.assert_allclose(window[200:500], 4 / 1900)
    np.testing.assert_allclose(np.r_[window[:200], window[500:]], 1 / 1900)

    key = jax.random.key(3)
    np.testing.assert_array_equal(draw_timesteps(key, 64, 1000), jax.random.randint(key, (64,), 0, 1000))
    drawn = np.asarray(draw_timesteps(key, 200_000, 1000, jnp.asarray(later)))
    assert drawn.dtype == np.int32 and drawn.min() >= 0 and drawn.max() < 1000
    share = np.mean(drawn >= 750)  # expected 0.5; its standard error at 200k draws is 0.0011
    assert abs(share - 0.5) < 0.006, share
    counts = np.bincount(drawn, minlength=1000)  # flat within each part: the bias is a step, nothing else
    assert abs(counts[:750].mean() / counts[750:].mean() - 1 / 3) < 0.01


@pytest.mark.parametrize("schedule", LR_SCHEDULES)
@pytest.mark.parametrize("warmup", [0, 10])
def test_lr_schedules_follow_diffusers_get_scheduler(schedule, warmup):
    """The rate of every update of a 50-step run, ours (`make_optimizer`'s schedule, as logged: lr(step) for the
    update after `step` earlier ones) against diffusers' `get_scheduler` stepped after each optimizer step (its
    constant with a warmup is named constant_with_warmup)."""
    from diffusers.optimization import get_scheduler

    lr, total = 1e-3, 50
    _, lr_fn = make_optimizer(lr=lr, warmup_steps=warmup, schedule=schedule, total_steps=total)
    name = "constant_with_warmup" if schedule == "constant" and warmup else schedule
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    theirs = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)
    rates = []
    for _ in range(total):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        theirs.step()
    ours = [float(lr_fn(step)) for step in range(total)]
    np.testing.assert_allclose(ours, rates, rtol=1e-5, atol=1e-9)
    if schedule != "constant" or warmup:
        assert len(set(np.round(rates, 9))) > 2  # the rate moves: the comparison is not of constants
