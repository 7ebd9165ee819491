"""Sampling (`jaxdistill.sample`) against diffusers: the schedulers step for step, and the whole
`StableDiffusionXLPipeline` on a tiny random pipeline folder written by diffusers
(`reference.write_random_pipeline`), from the same initial latents.

Tolerances (float32), max |ours − diffusers| / max |diffusers|:
- scheduler tables and each step's output (random model outputs): 1e-6 (measured ≤ 6e-7; torch's
  vectorised sqrt is not always correctly rounded, so tables differ from ours by an ulp at most);
- whole pipeline, final latents and float images before uint8 rounding: 1e-4, the project's UNet parity
  tolerance (measured, `pytest -s` prints them: ≤ 2e-6 for Euler, DDIM and DPM-Solver++; DDIM's
  x0 = (x − √(1−ᾱ) ε)/√ᾱ magnifies the UNet's float32 differences at large t, up to 2e-5 seen); uint8 images
  differ by at most 1 (rounding at .5 boundaries).
"""

import dataclasses
import inspect
import json
import re
import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from jaxdistill import load_unet, sample, save_unet
from jaxdistill.reference import write_random_pipeline
from jaxdistill.sample import SDXL_SCHEDULER_CONFIG as SDXL_SCHEDULER
from jaxdistill.sample import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    generate,
    image_grid,
    initial_latents,
    load_pipeline,
)
from jaxdistill.spec import UnsupportedConfigError
from jaxdistill.train import STAGE_MARKER

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

STEP_TOLERANCE = 1e-6
PIPELINE_TOLERANCE = 1e-4
HEIGHT, WIDTH = 32, 48  # pixels; the tiny VAE's factor is 2: latents 16 × 24
STEPS = 4
PROMPTS = ["a photo of the cat", "a red tree under the sky at night"]


def rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-30))


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return write_random_pipeline(tmp_path_factory.mktemp("sdxl_pipeline"), seed=0)


@pytest.fixture(scope="module")
def pipe(pipeline_dir):
    return load_pipeline(pipeline_dir)


@pytest.fixture(scope="module")
def torch_pipe(pipeline_dir):
    p = diffusers.StableDiffusionXLPipeline.from_pretrained(pipeline_dir, add_watermarker=False)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture(scope="module")
def noise():
    return np.concatenate([initial_latents(s, HEIGHT, WIDTH, vae_scale_factor=2) for s in range(len(PROMPTS))])


def run_diffusers(torch_pipe, scheduler: str, latents: np.ndarray, guidance: float, negative_prompt=None,
                  guidance_rescale: float = 0.0, prompts=PROMPTS, **micro):
    """diffusers' pipeline from NHWC noise → (float images [B, H, W, 3] in [0, 1], final latents NHWC)."""
    base = diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)
    others = {"ddim": diffusers.DDIMScheduler, "dpm": diffusers.DPMSolverMultistepScheduler}
    torch_pipe.scheduler = base if scheduler == "euler" else others[scheduler].from_config(base.config)
    final = {}

    def keep_latents(_pipe, _i, _t, kwargs):
        final["latents"] = kwargs["latents"]
        return kwargs

    with torch.no_grad():
        images = torch_pipe(prompts, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=guidance,
                            negative_prompt=negative_prompt, guidance_rescale=guidance_rescale, output_type="np",
                            callback_on_step_end=keep_latents, **micro,
                            latents=torch.from_numpy(latents.transpose(0, 3, 1, 2).copy())).images
    return images, final["latents"].permute(0, 2, 3, 1).numpy()


# ---- schedulers, step for step --------------------------------------------------------------------

def compare_steps(ours, ref, steps: int, seed: int = 0) -> float:
    """Runs diffusers' scheduler on random model outputs; at each step our jitted scale_model_input and
    step take the same input. → the worst relative error over tables, inputs and steps."""
    ref.set_timesteps(steps)
    schedule = ours.set_timesteps(steps)
    np.testing.assert_allclose(schedule.timesteps, ref.timesteps.numpy(), rtol=STEP_TOLERANCE, atol=0)
    assert abs(float(schedule.init_noise_sigma) - float(ref.init_noise_sigma)) <= 1e-6 * float(ref.init_noise_sigma)
    worst = rel(schedule.sigmas, ref.sigmas.numpy()) if hasattr(schedule, "sigmas") else 0.0
    scale, step = jax.jit(ours.scale_model_input), jax.jit(ours.step)
    rng = np.random.default_rng(seed)
    nhwc = lambda x: x.permute(0, 2, 3, 1).numpy()  # noqa: E731
    x = torch.from_numpy(rng.standard_normal((2, 4, 6, 5)).astype(np.float32)) * ref.init_noise_sigma
    state = ours.init_state(nhwc(x))  # carried from our step to our next: a multistep solver's history is ours
    for i, t in enumerate(ref.timesteps):
        model_input = ref.scale_model_input(x, t)
        model_output = torch.from_numpy(rng.standard_normal(x.shape).astype(np.float32))
        prev = ref.step(model_output, t, x).prev_sample
        ours_prev, state = step(schedule, nhwc(model_output), i, nhwc(x), state)
        worst = max(worst, rel(scale(schedule, nhwc(x), i), nhwc(model_input)), rel(ours_prev, nhwc(prev)))
        x = prev
    return worst


@pytest.mark.parametrize("changes, steps", [
    ({}, 25),  # SDXL's own: leading spacing, steps_offset 1, epsilon
    ({}, 1),
    ({"prediction_type": "v_prediction"}, 7),
    ({"timestep_spacing": "trailing"}, 10),
    ({"timestep_spacing": "linspace", "final_sigmas_type": "sigma_min"}, 6),
    ({"use_karras_sigmas": True}, 12),
])
def test_euler_matches_diffusers_step_for_step(changes, steps):
    config = SDXL_SCHEDULER | changes
    ref = diffusers.EulerDiscreteScheduler.from_config(config)
    assert compare_steps(EulerDiscreteScheduler.from_config(config), ref, steps) <= STEP_TOLERANCE


@pytest.mark.parametrize("changes, steps", [
    ({"clip_sample": False}, 25),  # SDXL's config (its scheduler_config.json says clip_sample false)
    ({}, 5),  # DDIM's own default clips x0 to [-1, 1]: what DDIMScheduler.from_config(tiny pipeline) does
    ({"clip_sample": False, "prediction_type": "v_prediction"}, 8),
    ({"clip_sample": False, "timestep_spacing": "trailing"}, 10),
    ({"clip_sample": False, "timestep_spacing": "linspace", "set_alpha_to_one": True}, 6),
])
def test_ddim_matches_diffusers_step_for_step(changes, steps):
    config = SDXL_SCHEDULER | changes
    ref = diffusers.DDIMScheduler.from_config(config)
    assert compare_steps(DDIMScheduler.from_config(config), ref, steps) <= STEP_TOLERANCE


@pytest.mark.parametrize("changes, steps", [
    ({}, 25),  # SDXL's config: "DPM++ 2M", leading spacing (its own: T // (N + 1)), final σ 0
    ({}, 1),
    ({"use_karras_sigmas": True}, 12),  # "DPM++ 2M Karras"
    ({"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 7),
    ({"solver_type": "heun", "timestep_spacing": "linspace"}, 9),
    # second order up to the last step (20 ≥ 15 steps, a final σ that is not 0)
    ({"final_sigmas_type": "sigma_min"}, 20),
    ({"final_sigmas_type": "sigma_min", "euler_at_final": True}, 16),
    ({"solver_order": 1}, 6),
    # Karras sigmas between the config's σ_min and σ_max (diffusers reads them though DPM does not declare them)
    ({"use_karras_sigmas": True, "sigma_min": 0.1, "sigma_max": 10.0}, 8),
])
def test_dpm_solver_matches_diffusers_step_for_step(changes, steps):
    config = SDXL_SCHEDULER | changes
    ref = diffusers.DPMSolverMultistepScheduler.from_config(config)
    assert compare_steps(DPMSolverMultistepScheduler.from_config(config), ref, steps) <= STEP_TOLERANCE


def test_karras_names_set_karras_sigmas(capsys):
    """"dpm-karras" is diffusers' `DPMSolverMultistepScheduler.from_config(config, use_karras_sigmas=True)`
    (DPM++ 2M Karras): the same tables; a scheduler without Karras sigmas has no such name."""
    assert sample.SCHEDULER_NAMES == ("euler", "ddim", "dpm", "euler-karras", "dpm-karras")
    for name, cls in (("dpm", diffusers.DPMSolverMultistepScheduler), ("euler", diffusers.EulerDiscreteScheduler)):
        ours = sample.make_scheduler(f"{name}-karras", SDXL_SCHEDULER).set_timesteps(10)
        ref = cls.from_config(SDXL_SCHEDULER, use_karras_sigmas=True)
        ref.set_timesteps(10)
        np.testing.assert_allclose(ours.sigmas, ref.sigmas.numpy(), rtol=STEP_TOLERANCE)
        np.testing.assert_allclose(ours.timesteps, ref.timesteps.numpy(), rtol=STEP_TOLERANCE)
        plain = sample.make_scheduler(name, SDXL_SCHEDULER).set_timesteps(10)
        assert not np.allclose(plain.sigmas, ours.sigmas)
    with pytest.raises(ValueError, match="ddim-karras"):
        sample.make_scheduler("ddim-karras")
    # a plain name runs plain sigmas even where the config asks for Karras: the name says what runs
    karras_config = SDXL_SCHEDULER | {"use_karras_sigmas": True}
    assert not sample.make_scheduler("dpm", karras_config).use_karras_sigmas
    # no name: the scheduler the pipeline's config names, as diffusers' from_pretrained runs it
    assert sample.scheduler_name(karras_config | {"_class_name": "DPMSolverMultistepScheduler"}) == "dpm-karras"
    assert sample.scheduler_name(SDXL_SCHEDULER | {"_class_name": "DDIMScheduler"}) == "ddim"
    assert sample.chosen_scheduler(None, SDXL_SCHEDULER) == "euler" and not capsys.readouterr().err
    assert sample.chosen_scheduler("ddim", karras_config | {"_class_name": "DPMSolverMultistepScheduler"}) == "ddim"
    unipc = SDXL_SCHEDULER | {"_class_name": "UniPCMultistepScheduler"}  # not ours: Euler, said
    assert sample.chosen_scheduler(None, unipc) == "euler"
    assert "scheduler UniPCMultistepScheduler is not implemented here: sampling with euler" in capsys.readouterr().err


@pytest.mark.parametrize("cls, changes, field", [
    (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}, "algorithm_type"),
    (DPMSolverMultistepScheduler, {"solver_order": 3}, "solver_order"),
    (EulerDiscreteScheduler, {"use_exponential_sigmas": True}, "use_exponential_sigmas"),
    (EulerDiscreteScheduler, {"interpolation_type": "log_linear"}, "interpolation_type"),
    (EulerDiscreteScheduler, {"timestep_spacing": "uniform"}, "timestep_spacing"),
    (EulerDiscreteScheduler, {"prediction_type": "sample"}, "prediction_type"),
    (DDIMScheduler, {"thresholding": True}, "thresholding"),
    (DDIMScheduler, {"beta_schedule": "squaredcos_cap_v2"}, "beta_schedule"),
])
def test_unsupported_scheduler_settings_are_refused(cls, changes, field):
    with pytest.raises(UnsupportedConfigError, match=field):
        cls.from_config(SDXL_SCHEDULER | changes)


# ---- the whole pipeline ---------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler,guidance_rescale", [("euler", 0.0), ("ddim", 0.0), ("dpm", 0.0), ("euler", 0.7)])
def test_generate_matches_diffusers(pipe, torch_pipe, noise, scheduler, guidance_rescale):
    images, latents = run_diffusers(torch_pipe, scheduler, noise, guidance=5.0, guidance_rescale=guidance_rescale)
    out = generate(pipe, PROMPTS, latents=noise, steps=STEPS, guidance=5.0, scheduler=scheduler,
                   guidance_rescale=guidance_rescale, height=HEIGHT, width=WIDTH, return_pixels=True)
    assert out.images.shape == (2, HEIGHT, WIDTH, 3) and out.images.dtype == np.uint8
    assert out.latents.shape == (2, HEIGHT // 2, WIDTH // 2, 4) and out.latents.dtype == np.float32
    print(f"\n{scheduler}, guidance_rescale {guidance_rescale}: latents {rel(out.latents, latents):.1e}, images "
          f"{rel(out.pixels, images):.1e} (max relative difference)")
    assert rel(out.latents, latents) <= PIPELINE_TOLERANCE
    assert rel(out.pixels, images) <= PIPELINE_TOLERANCE
    assert np.abs(out.images.astype(int) - (images * 255).round().astype(int)).max() <= 1


def test_rescale_noise_cfg_matches_diffusers():
    """guidance_rescale's formula against diffusers' `rescale_noise_cfg`, on random predictions whose means
    and standard deviations differ per sample (float32, the step tolerance)."""
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import rescale_noise_cfg

    rng = np.random.default_rng(0)
    per_sample = lambda *v: np.float32(v).reshape(-1, 1, 1, 1)  # noqa: E731
    text = rng.standard_normal((3, 5, 6, 4)).astype(np.float32) * per_sample(0.5, 1.0, 3.0)
    cfg = rng.standard_normal((3, 5, 6, 4)).astype(np.float32) * per_sample(2.0, 1.0, 0.25) + per_sample(0.3, 0, -1)
    for guidance_rescale in (0.0, 0.7, 1.0):
        ref = rescale_noise_cfg(torch.from_numpy(cfg), torch.from_numpy(text), guidance_rescale).numpy()
        assert rel(sample.rescale_noise_cfg(cfg, text, np.float32(guidance_rescale)), ref) <= STEP_TOLERANCE


def test_guidance_rescale_reaches_the_guided_loop(pipe, noise, monkeypatch):
    """generate(guidance_rescale=0.7) turns the rescale on in the guided denoising loop and hands it that
    value (the formula: above). Stopped where the loop's trace calls it, so nothing compiles; which half of
    the prediction it gets (text, not unconditional): test_generate_matches_diffusers with a rescale."""
    real, seen = sample._denoise, {}

    class Reached(Exception):
        pass

    def denoise(*args):
        given = inspect.signature(real.__wrapped__).bind(*args).arguments
        seen["rescale"], seen["value"] = given["rescale"], float(given["guidance_rescale"])
        return real.__wrapped__(*args)  # traced afresh, not served from jit's cache

    def rescale(noise_cfg, noise_pred_text, guidance_rescale):
        seen["shapes"] = noise_cfg.shape, noise_pred_text.shape
        raise Reached

    monkeypatch.setattr(sample, "_denoise", denoise)
    monkeypatch.setattr(sample, "rescale_noise_cfg", rescale)
    with pytest.raises(Reached):
        generate(pipe, PROMPTS, latents=noise, steps=STEPS, guidance=5.0, guidance_rescale=0.7, height=HEIGHT,
                 width=WIDTH)
    assert seen == {"rescale": True, "value": pytest.approx(0.7), "shapes": (noise.shape, noise.shape)}


def test_guidance_off_and_negative_prompts_match_diffusers(pipe, torch_pipe, noise):
    # guidance 1: no classifier-free guidance (a batch of B, no negative conditioning)
    images, latents = run_diffusers(torch_pipe, "euler", noise, guidance=1.0)
    out = generate(pipe, PROMPTS, latents=noise, steps=STEPS, guidance=1.0, height=HEIGHT, width=WIDTH,
                   return_pixels=True)
    assert rel(out.latents, latents) <= PIPELINE_TOLERANCE and rel(out.pixels, images) <= PIPELINE_TOLERANCE
    # an encoded negative prompt, one per prompt; a list of empty ones is encoded too (diffusers zeroes only
    # for negative_prompt=None, our "")
    for negatives in (["blue dog", "oil painting"], ["", ""]):
        images, latents = run_diffusers(torch_pipe, "euler", noise, guidance=5.0, negative_prompt=negatives)
        out = generate(pipe, PROMPTS, latents=noise, steps=STEPS, guidance=5.0, height=HEIGHT, width=WIDTH,
                       negative_prompt=negatives, return_pixels=True)
        assert rel(out.latents, latents) <= PIPELINE_TOLERANCE and rel(out.pixels, images) <= PIPELINE_TOLERANCE
    # force_zeros_for_empty_prompt off: the empty negative prompt is encoded
    torch_pipe.register_to_config(force_zeros_for_empty_prompt=False)
    try:
        images, latents = run_diffusers(torch_pipe, "euler", noise, guidance=5.0)
    finally:
        torch_pipe.register_to_config(force_zeros_for_empty_prompt=True)
    out = generate(dataclasses.replace(pipe, force_zeros_for_empty_prompt=False), PROMPTS, latents=noise,
                   steps=STEPS, guidance=5.0, height=HEIGHT, width=WIDTH, return_pixels=True)
    assert rel(out.latents, latents) <= PIPELINE_TOLERANCE and rel(out.pixels, images) <= PIPELINE_TOLERANCE


def test_micro_conditioning_matches_diffusers(pipe, torch_pipe, noise):
    kwargs = dict(latents=noise, steps=STEPS, guidance=5.0, height=HEIGHT, width=WIDTH)
    default = generate(pipe, PROMPTS, **kwargs)
    # the prompt's own; a negative crop alone is ignored, as diffusers ignores it without both negative sizes
    micro = dict(original_size=(64, 40), crops_coords_top_left=(4, 12), target_size=(16, 32),
                 negative_crops_coords_top_left=(8, 8))
    images, latents = run_diffusers(torch_pipe, "euler", noise, guidance=5.0, **micro)
    out = generate(pipe, PROMPTS, **micro, **kwargs, return_pixels=True)
    assert rel(out.latents, latents) <= PIPELINE_TOLERANCE and rel(out.pixels, images) <= PIPELINE_TOLERANCE
    assert rel(out.latents, default.latents) > 1e-3  # the conditioning reached the UNet
    # the negative's own (both sizes given): one prompt, since diffusers lays out 2B rows of time ids as
    # (neg, pos) × B where its embeddings are neg × B then pos × B; ours follow the embeddings, so an image
    # does not depend on its batch
    micro = dict(original_size=(64, 40), negative_original_size=(8, 8), negative_crops_coords_top_left=(2, 0),
                 negative_target_size=(24, 16))
    images, latents = run_diffusers(torch_pipe, "euler", noise[:1], guidance=5.0, prompts=PROMPTS[:1], **micro)
    one = generate(pipe, PROMPTS[:1], **micro, **(kwargs | dict(latents=noise[:1])), return_pixels=True)
    assert rel(one.latents, latents) <= PIPELINE_TOLERANCE and rel(one.pixels, images) <= PIPELINE_TOLERANCE
    both = generate(pipe, PROMPTS, **micro, **kwargs)
    np.testing.assert_allclose(both.latents[:1], one.latents, rtol=0, atol=1e-4)
    only_positive = generate(pipe, PROMPTS[:1], original_size=(64, 40), **(kwargs | dict(latents=noise[:1])))
    assert rel(one.latents, only_positive.latents) > 1e-3


def test_add_time_ids_defaults_and_bad_pairs():
    ids, negative = sample.add_time_ids(16, 24)
    assert ids.tolist() == negative.tolist() == [16, 24, 0, 0, 16, 24] and ids.dtype == np.float32
    ids, negative = sample.add_time_ids(16, 24, original_size=(1024, 768), negative_original_size=(512, 512))
    assert ids.tolist() == negative.tolist() == [1024, 768, 0, 0, 16, 24]  # one negative size alone: ignored
    for kwargs, reason in [(dict(original_size=(0, 5)), "original_size=(0, 5): expected (height, width), positive"),
                           (dict(crops_coords_top_left=(-1, 0)), "crops_coords_top_left=(-1, 0): expected (top, left)"),
                           (dict(target_size=(16.5, 24)), "target_size=(16.5, 24)"),
                           (dict(target_size=(16, 24, 1)), "target_size=(16, 24, 1)"),
                           (dict(negative_original_size=(8, 8), negative_target_size=5), "negative_target_size=5")]:
        with pytest.raises(ValueError, match=re.escape(reason)):
            sample.add_time_ids(16, 24, **kwargs)


def test_the_pipelines_own_scheduler_is_the_default(pipe, torch_pipe, noise):
    """A pipeline folder whose scheduler is DPM++ 2M Karras samples with it unless told otherwise, as
    diffusers' from_pretrained does (the default used to be Euler whatever the folder said)."""
    base = torch_pipe.scheduler
    torch_pipe.scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
        diffusers.EulerDiscreteScheduler.from_config(SDXL_SCHEDULER).config, use_karras_sigmas=True)
    config = dict(torch_pipe.scheduler.config) | {"_class_name": "DPMSolverMultistepScheduler"}  # as saved
    try:
        with torch.no_grad():
            images = torch_pipe(PROMPTS, height=HEIGHT, width=WIDTH, num_inference_steps=STEPS, guidance_scale=5.0,
                                output_type="np", latents=torch.from_numpy(noise.transpose(0, 3, 1, 2).copy())).images
    finally:
        torch_pipe.scheduler = base
    out = generate(dataclasses.replace(pipe, scheduler_config=config), PROMPTS, latents=noise, steps=STEPS,
                   guidance=5.0, height=HEIGHT, width=WIDTH, return_pixels=True)
    assert rel(out.pixels, images) <= PIPELINE_TOLERANCE


def test_seeds_chunks_and_bad_arguments(pipe, noise):
    kwargs = dict(steps=STEPS, guidance=5.0, height=HEIGHT, width=WIDTH)
    a = initial_latents(7, HEIGHT, WIDTH, vae_scale_factor=2)
    assert a.shape == (1, 16, 24, 4) and a.dtype == np.float32
    assert np.array_equal(a, initial_latents(7, HEIGHT, WIDTH, 4, vae_scale_factor=2))  # the seed alone decides
    assert not np.array_equal(a, initial_latents(8, HEIGHT, WIDTH, vae_scale_factor=2))
    # seeds are initial_latents; chunks of 2 (the last padded) give what one batch gives
    whole = generate(pipe, PROMPTS, latents=noise, **kwargs)
    chunked = generate(pipe, PROMPTS + PROMPTS[:1], seeds=[0, 1, 0], batch_size=2, **kwargs)
    np.testing.assert_array_equal(chunked.latents[:2], whole.latents)
    np.testing.assert_allclose(chunked.latents[2], whole.latents[0], rtol=0, atol=1e-5)
    np.testing.assert_array_equal(chunked.images[:2], whole.images)  # the VAE decodes chunk by chunk too
    one = generate(pipe, PROMPTS[0], seeds=[0], **kwargs)  # one string is one prompt
    assert one.latents.shape[0] == 1  # another batch size: XLA may order sums otherwise
    np.testing.assert_allclose(one.latents, chunked.latents[:1], rtol=0, atol=1e-4)
    with pytest.raises(ValueError, match="seeds are integers"):  # jax.random.key(2**32) is key(0) here
        generate(pipe, PROMPTS, seeds=[0, 2 ** 32], **kwargs)
    rectangular = dataclasses.replace(pipe, unet_spec=dataclasses.replace(pipe.unet_spec, sample_size=(8, 12)))
    assert rectangular.check_size(None, None) == (16, 24) and rectangular.check_size(None, 8) == (16, 8)
    with pytest.raises(ValueError, match="multiple of 4"):  # VAE 2× × UNet 2×
        generate(pipe, PROMPTS, seeds=[0, 1], height=30, width=WIDTH)
    with pytest.raises(ValueError, match="one seed per prompt"):
        generate(pipe, PROMPTS, seeds=[0], **kwargs)
    with pytest.raises(ValueError, match="expected"):
        generate(pipe, PROMPTS, latents=noise[:, :8], **kwargs)
    with pytest.raises(ValueError, match="scheduler"):
        generate(pipe, PROMPTS, scheduler="unipc", **kwargs)


def test_a_list_of_negatives_means_the_same_in_any_batch_size(pipe, noise):
    """With negatives ["", "blurry"] the "" is encoded (diffusers encodes a list as given), also when it is
    alone in its chunk: whether to use zero conditioning is decided for the call, not per chunk."""
    kwargs = dict(latents=noise, steps=STEPS, guidance=5.0, height=HEIGHT, width=WIDTH)
    whole = generate(pipe, PROMPTS, negative_prompt=["", "blurry"], **kwargs)
    chunked = generate(pipe, PROMPTS, negative_prompt=["", "blurry"], batch_size=1, **kwargs)
    np.testing.assert_allclose(chunked.latents, whole.latents, rtol=0, atol=1e-4)  # was 2.08 apart for image 0
    zero = generate(pipe, PROMPTS, **kwargs)  # "": zero conditioning
    assert np.abs(zero.latents[0] - whole.latents[0]).max() > 1e-2


def test_image_grid_sizes_and_labels(tmp_path, monkeypatch):
    images = np.random.default_rng(0).integers(0, 256, (5, 20, 30, 3), dtype=np.uint8)
    with monkeypatch.context() as patch:  # a grid over the limit shrinks its images (45 × 4 at 1024² was 193 MP)
        patch.setattr(sample, "GRID_PIXELS", 6 * 20 * 30 // 4)
        assert image_grid(images, rows=2).size == (3 * 15, 2 * 10)
    plain = image_grid(images, rows=2)
    assert plain.size == (3 * 30, 2 * 20)
    assert np.array_equal(np.asarray(plain)[20:40, 30:60], images[4])  # row 1, column 1
    labelled = image_grid(images, rows=2, row_labels=["a long prompt " * 5, "short"],
                          col_labels=["seed 0", "seed 1", "seed 2"])
    w, h = labelled.size
    top, pixels = h - 40, np.asarray(labelled)
    assert top > 0
    # each image once, in its row; columns as wide as their labels ("seed 0" is wider than these 30 pixels), so
    # a label does not run into the next one: white between the images
    at = [[x for x in range(w - 29) if np.array_equal(pixels[top:top + 20, x:x + 30], images[k])] for k in (0, 1, 2)]
    assert all(len(xs) == 1 for xs in at), at
    (x0,), (x1,), (x2,) = at
    assert x1 - x0 == x2 - x1 > 30 and np.all(pixels[top:top + 20, x0 + 30:x1] == 255)
    paths = sample.save_images(images[:2], tmp_path, ["a", "b"])
    assert [p.name for p in paths] == ["a.png", "b.png"]
    assert np.array_equal(np.asarray(Image.open(paths[1])), images[1])


def test_cli_writes_images_grid_and_side_by_side(pipeline_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "samples"
    code = sample.main(["--model", str(pipeline_dir), "--prompt", PROMPTS[0], "--num-images", "2", "--seed", "3",
                        "--steps", str(STEPS), "--height", str(HEIGHT), "--width", str(WIDTH), "--batch-size", "2",
                        "--out", str(out), "--teacher", str(pipeline_dir), "--original-size", "1024,768"])
    assert code == 0
    assert sorted(p.name for p in out.glob("*.png")) == ["000_seed3.png", "000_seed4.png", "grid.png",
                                                         "side_by_side.png"]
    assert sorted(p.name for p in (out / "teacher").glob("*.png")) == ["000_seed3.png", "000_seed4.png"]
    assert Image.open(out / "000_seed4.png").size == (WIDTH, HEIGHT)
    # what made them, each file's prompt and seed; the scheduler the pipeline names (SDXL's Euler)
    record = json.loads((out / "sample.json").read_text())
    assert record["images"] == [{"file": f"000_seed{s}.png", "prompt": PROMPTS[0], "seed": s} for s in (3, 4)]
    assert record["scheduler"] == "euler" and record["steps"] == STEPS and (record["height"], record["width"]) == (
        HEIGHT, WIDTH) and record["teacher"] == str(pipeline_dir)
    assert record["time_ids"] == record["negative_time_ids"] == [1024, 768, 0, 0, HEIGHT, WIDTH]
    # the teacher is the same model here: both sides are the same image
    assert np.array_equal(np.asarray(Image.open(out / "teacher" / "000_seed3.png")),
                          np.asarray(Image.open(out / "000_seed3.png")))
    grid = Image.open(out / "side_by_side.png")
    assert grid.size[0] > 2 * WIDTH and grid.size[1] > 2 * HEIGHT
    # errors are argparse errors (exit 2) with the reason
    for args, reason in [(["--model", str(pipeline_dir / "unet")], "pipeline"),
                         (["--model", str(pipeline_dir), "--height", "30"], "multiple of 4"),
                         (["--model", str(tmp_path / "nothing")], "does not exist"),
                         (["--model", str(pipeline_dir), "--ema"], "not known to be EMA weights"),
                         # steps the scheduler cannot do: refused before sampling, not a traceback
                         (["--model", str(pipeline_dir), "--steps", "1001"], "expected 1 … 1000"),
                         (["--model", str(pipeline_dir), "--steps", "1000", "--scheduler", "ddim"],
                          "reach timestep 1000 ≥ 1000; use fewer steps or timestep_spacing 'trailing'")]:
        with pytest.raises(SystemExit) as info:
            sample.main([*args, "--prompt", "x", "--out", str(tmp_path / "bad")])
        assert info.value.code == 2 and reason in capsys.readouterr().err

    # out of device memory while sampling: one line with what to change (exit 1), nothing written; any other
    # runtime error stays a traceback
    def failing(message):
        def generate(*args, **kwargs):
            raise jax.errors.JaxRuntimeError(message)
        return generate

    monkeypatch.setattr(sample, "generate", failing("RESOURCE_EXHAUSTED: Out of memory while trying to allocate "
                                                    "9.00GiB with allocator GPU_0_bfc. [tf-allocator]"))
    with pytest.raises(SystemExit) as info:
        sample.main(["--model", str(pipeline_dir), "--prompt", "x", "--batch-size", "3", "--dtype", "bfloat16",
                     "--out", str(tmp_path / "oom")])
    err = capsys.readouterr().err
    assert info.value.code == 1 and "does not fit the device's memory; try a smaller --batch-size (now 3" in err
    assert "--dtype bfloat16 (" not in err and "(XLA: RESOURCE_EXHAUSTED: Out of memory" in err and "[tf-" not in err
    assert not (tmp_path / "oom").exists()
    monkeypatch.setattr(sample, "generate", failing("INTERNAL: something else"))
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        sample.main(["--model", str(pipeline_dir), "--prompt", "x", "--out", str(tmp_path / "oom")])


def test_unet_folders_and_checkpoints_as_models(pipeline_dir, pipe, noise, tmp_path, capsys):
    import orbax.checkpoint as ocp

    with pytest.raises(FileNotFoundError, match="pipeline"):
        load_pipeline(pipeline_dir / "unet")
    # a folder has one set of weights: --ema / --no-ema only where its record says which (export's rule)
    with pytest.raises(ValueError, match="not known to be EMA weights"):
        load_pipeline(pipeline_dir, ema=True)
    ema_stage = shutil.copytree(pipeline_dir / "unet", tmp_path / "stages" / "main")
    (ema_stage / STAGE_MARKER).write_text(json.dumps({"stage": "main", "steps": 5, "config": {"ema_decay": 0.99}}))
    with pytest.raises(ValueError, match="holds EMA weights"):
        load_pipeline(ema_stage, pipeline_dir, ema=False)
    assert load_pipeline(ema_stage, pipeline_dir, ema=True).unet_spec == pipe.unet_spec
    # A checkpoint as python -m jaxdistill.train writes it (its state and meta items), holding the pipeline's
    # UNet as its EMA weights (zeros as the trained weights); its run config names the pipeline, so none need
    # be given.
    recorded = shutil.copytree(pipeline_dir, tmp_path / "data" / "pipeline")
    params = jax.tree.map(np.asarray, pipe.unet_params)
    manager = ocp.CheckpointManager((tmp_path / "run" / "checkpoints" / "main").absolute(),
                                    item_names=("state", "meta"))
    meta = {"student_config": pipe.unet_spec.to_diffusers_config(),
            "config": {"scan_layers": False, "data": {"pipeline": str(recorded)}}}
    state = {"params": jax.tree.map(np.zeros_like, params), "ema_params": params}
    manager.save(5, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave(meta)))
    manager.wait_until_finished()
    manager.close()
    (tmp_path / "run" / "config.json").write_text(json.dumps(meta["config"]))  # train.run writes the run's config
    from_checkpoint = load_pipeline(tmp_path / "run")  # the default follows the run: its EMA weights
    assert from_checkpoint.unet_spec == pipe.unet_spec and from_checkpoint.pipeline_dir == str(recorded)
    # --overwrite of a folder that holds the pipeline the run recorded (not named on the command line) is refused
    with pytest.raises(SystemExit) as info:
        sample.main(["--model", str(tmp_path / "run"), "--prompt", "x", "--out", str(tmp_path / "data"), "--overwrite"])
    assert info.value.code == 2 and "which is read to make it" in capsys.readouterr().err
    assert (recorded / "model_index.json").is_file()
    assert not any(np.any(x) for x in jax.tree.leaves(load_pipeline(tmp_path / "run", ema=False).unet_params))
    kwargs = dict(latents=noise, steps=STEPS, guidance=5.0, height=HEIGHT, width=WIDTH)
    np.testing.assert_array_equal(generate(from_checkpoint, PROMPTS, **kwargs).images,
                                  generate(pipe, PROMPTS, **kwargs).images)
    # the UNet folder with the pipeline given explicitly
    from_unet = load_pipeline(pipeline_dir / "unet", pipeline_dir)
    index = json.loads((pipeline_dir / "model_index.json").read_text())
    assert from_unet.unet_spec == pipe.unet_spec
    assert from_unet.force_zeros_for_empty_prompt is index["force_zeros_for_empty_prompt"] is True
    # a second UNet on the same VAE, text encoders and scheduler: shared, not loaded again
    shared = load_pipeline(pipeline_dir / "unet", parts=from_unet)
    assert shared.text_encoders is from_unet.text_encoders and shared.vae_params is from_unet.vae_params
    assert shared.name == str(pipeline_dir / "unet")


def test_cli_refuses_bad_input_before_loading(pipeline_dir, tmp_path, capsys):
    """Usage errors (exit 2) that name the flag and what to do; an earlier run's folder is left as it was."""
    run = tmp_path / "run"
    for step in (1, 2):  # finished steps, as orbax marks them (nothing is read from them)
        (run / "checkpoints" / "main" / str(step)).mkdir(parents=True)
        (run / "checkpoints" / "main" / str(step) / "_CHECKPOINT_METADATA").write_text("{}")
    earlier = tmp_path / "samples"
    (earlier / "teacher").mkdir(parents=True)
    (earlier / "000_seed1.png").write_bytes(b"an earlier run's")
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "prompts.txt").write_text("a cat\n")
    common = ["--model", str(pipeline_dir), "--steps", str(STEPS)]
    new = ["--out", str(tmp_path / "out")]
    spec, params = load_unet(pipeline_dir)
    half = save_unet(tmp_path / "half", dataclasses.replace(spec, sample_size=spec.sample_size // 2), params)
    for args, reason in [
            ([*common, "--prompt", "x", "--seed", str(2 ** 32 - 1), "--num-images", "2", *new],
             "--seed 4294967295 with --num-images 2: seed 4294967296: seeds are integers"),
            ([*common, "--prompts", str(tmp_path / "none.txt"), *new],
             f"--prompts: cannot read {tmp_path / 'none.txt'}: No such file"),
            (["--model", str(run / "checkpoints" / "main" / "9"), "--prompt", "x", *new],
             f"does not exist; finished steps in {run / 'checkpoints' / 'main'}: 1, 2"),
            ([*common, "--prompt", "x", "--out", str(earlier)], "not empty; choose another folder or add --overwrite"),
            ([*common, "--prompt", "x", "--height", "0", *new], "height=0: must be a positive multiple of 4"),
            ([*common, "--prompt", "x", "--target-size", "1024", *new],
             "argument --target-size: '1024': expected two comma-separated integers ≥ 1, e.g. 1024,1024"),
            ([*common, "--prompt", "x", "--crops-coords-top-left=-4,0", *new],
             "argument --crops-coords-top-left: '-4,0': expected two comma-separated integers ≥ 0"),
            # replacing --out would delete the prompt file it is made from
            ([*common, "--prompts", str(mine / "prompts.txt"), "--out", str(mine), "--overwrite"],
             "which is read to make it"),
            # float("nan") parses, and guidance > 1 is False for it: it sampled unguided and wrote NaN into JSON
            ([*common, "--prompt", "x", "--guidance", "nan", *new], "'nan': expected a finite number ≥ 0"),
            ([*common, "--prompt", "x", "--guidance", "inf", *new], "'inf': expected a finite number ≥ 0"),
            ([*common, "--prompt", "x", "--guidance-rescale", "7", *new], "'7': expected a finite number in 0 … 1"),
            # a teacher of another default size: the model's size would silently apply to both
            ([*common, "--prompt", "x", "--teacher", str(half), *new],
             "the model samples at 32×32 by default, the teacher at 16×16: give --height and --width")]:
        with pytest.raises(SystemExit) as info:
            sample.main(args)
        assert info.value.code == 2 and reason in capsys.readouterr().err, args
    assert sorted(p.name for p in earlier.iterdir()) == ["000_seed1.png", "teacher"]
    assert [p.name for p in mine.iterdir()] == ["prompts.txt"] and not (tmp_path / "out").exists()


def test_cli_overwrite_replaces_an_earlier_run_whole(pipeline_dir, tmp_path):
    """--overwrite: the new images replace the whole folder; none of the earlier run's files (another seed,
    a teacher, a side-by-side) stays to be taken for this run's."""
    out = tmp_path / "samples"
    (out / "teacher").mkdir(parents=True)
    for name in ("000_seed1.png", "teacher/000_seed1.png", "side_by_side.png"):
        (out / name).write_bytes(b"an earlier run's")
    code = sample.main(["--model", str(pipeline_dir), "--prompt", PROMPTS[0], "--num-images", "2", "--seed", "3",
                        "--steps", str(STEPS), "--height", str(HEIGHT), "--width", str(WIDTH), "--batch-size", "2",
                        "--out", str(out), "--overwrite"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["000_seed3.png", "000_seed4.png", "grid.png", "sample.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples"]  # nothing half-written beside it


def test_cli_names_nan_images_and_settings_that_do_nothing(pipeline_dir, pipe, tmp_path, capsys):
    """A model whose images are NaN (diverged weights) writes them black, lists them in sample.json and exits 1,
    instead of passing black images off as its output; a negative prompt without guidance, and a prompt the
    tokenizers cut at 77 tokens, are noted."""
    params = dict(pipe.unet_params)
    params["conv_out"] = jax.tree.map(lambda x: x * np.nan, params["conv_out"])
    broken = save_unet(tmp_path / "diverged", pipe.unet_spec, params)
    long = "a photo of " + "a very red cat and " * 20
    out = tmp_path / "samples"
    code = sample.main(["--model", str(broken), "--pipeline", str(pipeline_dir), "--prompt", long, "--num-images", "2",
                        "--steps", str(STEPS), "--height", str(HEIGHT), "--width", str(WIDTH), "--batch-size", "2",
                        "--guidance", "1", "--negative-prompt", "blurry", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 1
    assert "error: 2 of 2 model images hold NaN or Inf" in err and "written black" in err
    assert "--negative-prompt does nothing without --guidance > 1" in err
    assert "a prompt longer than the text encoders' 77 tokens is cut there" in err
    record = json.loads((out / "sample.json").read_text())
    assert record["non_finite"] == {"model": ["000_seed0.png", "000_seed1.png"]}
    assert record["weights"] == {"path": str(broken.resolve()), "ema": None} and record["model"] == str(broken)
    assert not np.asarray(Image.open(out / "000_seed1.png")).any()
