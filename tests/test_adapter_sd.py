"""The StableDiffusionPipeline adapter against diffusers' own loop, on tiny random pipelines."""

from __future__ import annotations

import adapter_checks as checks
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline

from diffsearch.pipelines.stable_diffusion import StableDiffusionDenoiser
from diffsearch.seeding import torch_generator
from tiny_pipelines import tiny_sd_pipeline

STEPS = 5
GUIDANCE = 4.0


_one_thread = checks.one_thread_per_module


@pytest.fixture(scope="module", params=[("ddim", "epsilon"), ("ddim", "v_prediction"),
                                        ("euler", "epsilon")], ids=lambda p: "-".join(p))
def pipe(request, tmp_path_factory) -> StableDiffusionPipeline:
    scheduler, prediction = request.param
    folder = tiny_sd_pipeline(tmp_path_factory.mktemp("sd"), scheduler=scheduler,
                              prediction_type=prediction)
    return checks.load_pipeline(StableDiffusionPipeline, folder)


@pytest.fixture(scope="module")
def denoiser(pipe) -> StableDiffusionDenoiser:
    return StableDiffusionDenoiser(pipe, num_steps=STEPS, guidance_scale=GUIDANCE,
                                   compute_batch=3)


def test_full_run_matches_the_pipeline(pipe, denoiser):
    checks.check_matches_pipeline(denoiser, checks.pipeline_reference(pipe, STEPS, GUIDANCE))


def test_without_guidance_matches_the_pipeline(pipe):
    denoiser = StableDiffusionDenoiser(pipe, num_steps=STEPS, guidance_scale=1.0, compute_batch=3)
    assert set(denoiser.encode("a red circle").tensors) == {"prompt_embeds"}
    checks.check_matches_pipeline(denoiser, checks.pipeline_reference(pipe, STEPS, 1.0))


def test_resume_from_an_intermediate_step_is_exact(denoiser):
    checks.check_resume_is_exact(denoiser, k=2)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_batching_does_not_change_any_bit(denoiser, eta):
    checks.check_batch_invariance(denoiser, eta=eta)


def test_stochastic_steps_use_each_candidates_own_generator(denoiser):
    checks.check_stochastic_steps(denoiser)


@pytest.mark.parametrize("step", [0, 3])
def test_step_noise_std_is_the_std_the_stochastic_step_adds(denoiser, step):
    checks.check_step_noise_std(denoiser, step)


def test_decode_gives_images_in_unit_range(denoiser):
    checks.check_decode(denoiser, 16, 16)


def test_initial_noise_is_scaled_by_the_schedulers_init_sigma(denoiser):
    raw = torch.randn(denoiser.latent_shape, generator=torch_generator(7))
    scale = float(denoiser.pipe.scheduler.init_noise_sigma)
    assert torch.equal(denoiser.initial_noise([7])[0], raw * scale)


def test_renoise_is_the_schedulers_forward_process(pipe):
    """From the clean end (alpha-bar 1 / sigma 0) renoising to step k is ``add_noise`` at t_k."""
    config = dict(pipe.scheduler.config)
    if pipe.scheduler.__class__ is DDIMScheduler:
        config["set_alpha_to_one"] = True  # the clean end at alpha-bar exactly 1
    scheduler = pipe.scheduler.__class__.from_config(config)
    pipe = StableDiffusionPipeline(**{**pipe.components, "scheduler": scheduler})
    denoiser = StableDiffusionDenoiser(pipe, num_steps=STEPS, guidance_scale=GUIDANCE)
    clean = torch.randn(2, *denoiser.latent_shape, generator=torch_generator(1))
    k = 2
    ours = denoiser.renoise(clean, STEPS, k, [torch_generator(3), torch_generator(4)])
    noise = torch.stack([torch.randn(denoiser.latent_shape, generator=torch_generator(s))
                         for s in (3, 4)])
    scheduler.set_timesteps(STEPS)
    t = scheduler.timesteps[k].expand(2)
    torch.testing.assert_close(ours, scheduler.add_noise(clean, noise, t), atol=1e-5, rtol=1e-5)


def test_renoise_then_denoise_keeps_shapes_and_moves_back_in_noise(denoiser):
    conds = checks.conds_for(denoiser)[:2]
    state = denoiser.denoise(denoiser.initial_noise([1, 2]), conds, 0, 4).latents
    back = denoiser.renoise(state, 4, 1, [torch_generator(5), torch_generator(6)])
    assert back.shape == state.shape and not torch.equal(back, state)
    again = denoiser.denoise(back, conds, 1, STEPS)
    assert torch.isfinite(again.latents).all()


def test_history_keeping_schedulers_are_replaced_by_ddim(tmp_path):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_pipeline(tmp_path))
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
    denoiser = StableDiffusionDenoiser(pipe, num_steps=STEPS, guidance_scale=GUIDANCE)
    checks.check_resume_is_exact(denoiser, k=3)

    ddim_scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    ddim = StableDiffusionPipeline(**{**pipe.components, "scheduler": ddim_scheduler})
    reference = StableDiffusionDenoiser(ddim, num_steps=STEPS, guidance_scale=GUIDANCE)
    x = denoiser.initial_noise([3])
    conds = [denoiser.encode("a red circle")]
    assert torch.equal(denoiser.denoise(x, conds, 0, STEPS).latents,
                       reference.denoise(x, conds, 0, STEPS).latents)


@pytest.mark.parametrize("call, message", [
    (lambda d, x, c: d.denoise(x, c, 3, 2), "start <= end"),
    (lambda d, x, c: d.denoise(x, c, 0, STEPS + 1), "start <= end"),
    (lambda d, x, c: d.denoise(x, c[:1], 0, 1), "conditionings"),
    (lambda d, x, c: d.denoise(x[:, :2], c, 0, 1), "shape"),
    (lambda d, x, c: d.denoise(x, c, 0, 1, eta=0.5), "generator"),
    (lambda d, x, c: d.denoise(x, c, 0, 1, eta=1.5, generators=[torch_generator(0)] * 2), "eta"),
    (lambda d, x, c: d.renoise(x, 1, 3, [torch_generator(0)] * 2), "to_step < from_step"),
    (lambda d, x, c: d.step_noise_std(STEPS + 1), "step must be"),
])
def test_bad_calls_fail_with_a_clear_error(denoiser, call, message):
    x = denoiser.initial_noise([1, 2])
    conds = checks.conds_for(denoiser)[:2]
    with pytest.raises(ValueError, match=message):
        call(denoiser, x, conds)


def test_prompt_encodings_are_cached(denoiser):
    assert denoiser.encode("a cached prompt") is denoiser.encode("a cached prompt")
