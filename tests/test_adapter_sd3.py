"""The StableDiffusion3Pipeline adapter against diffusers' own loop, on tiny random pipelines."""

from __future__ import annotations

import adapter_checks as checks
import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from diffsearch.pipelines.sd3 import StableDiffusion3Denoiser
from diffsearch.seeding import torch_generator
from tiny_pipelines import tiny_sd3_pipeline

STEPS = 4
GUIDANCE = 4.5


_one_thread = checks.one_thread_per_module


@pytest.fixture(scope="module", params=[True, False], ids=["with-t5", "without-t5"])
def pipe(request, tmp_path_factory) -> StableDiffusion3Pipeline:
    folder = tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3"))
    without_t5 = {} if request.param else {"text_encoder_3": None, "tokenizer_3": None}
    return checks.load_pipeline(StableDiffusion3Pipeline, folder, **without_t5)


@pytest.fixture(scope="module")
def schedule(pipe):
    """The pipeline's own scheduler with the schedule SD3 samples on (no dynamic shifting)."""
    scheduler = pipe.scheduler.__class__.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(STEPS)
    return scheduler


@pytest.fixture(scope="module")
def denoiser(pipe) -> StableDiffusion3Denoiser:
    return StableDiffusion3Denoiser(pipe, num_steps=STEPS, guidance_scale=GUIDANCE,
                                    compute_batch=3)


def test_full_run_matches_the_pipeline(pipe, denoiser):
    checks.check_matches_pipeline(denoiser, checks.pipeline_reference(pipe, STEPS, GUIDANCE))


def test_resume_from_an_intermediate_step_is_exact(denoiser):
    checks.check_resume_is_exact(denoiser, k=2)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_batching_does_not_change_any_bit(denoiser, eta):
    checks.check_batch_invariance(denoiser, eta=eta)


def test_without_guidance_matches_the_pipeline_and_batches_exactly(pipe):
    denoiser = StableDiffusion3Denoiser(pipe, num_steps=STEPS, guidance_scale=1.0,
                                        compute_batch=3)
    assert set(denoiser.encode("a red circle").tensors) == {"prompt_embeds",
                                                             "pooled_prompt_embeds"}
    checks.check_matches_pipeline(denoiser, checks.pipeline_reference(pipe, STEPS, 1.0))
    checks.check_batch_invariance(denoiser)


def test_stochastic_steps_use_each_candidates_own_generator(denoiser):
    checks.check_stochastic_steps(denoiser)


@pytest.mark.parametrize("step", [0, 2])
def test_step_noise_std_is_the_std_the_stochastic_step_adds(denoiser, step):
    checks.check_step_noise_std(denoiser, step)


def test_decode_gives_images_in_unit_range(denoiser):
    checks.check_decode(denoiser, 16, 16)


def test_without_t5_the_t5_tokens_are_zeros(pipe, denoiser):
    embeds = denoiser.encode("a red circle").tensors["prompt_embeds"]
    clip_tokens = pipe.tokenizer.model_max_length
    assert embeds.shape == (1, clip_tokens + denoiser.max_sequence_length, 32)
    t5_part = embeds[:, clip_tokens:]
    assert (t5_part.abs().max() == 0) == (pipe.text_encoder_3 is None)


def test_x0_estimate_is_the_flow_tweedie_estimate(denoiser, schedule):
    """x0_hat = x_s - s v: one step's x0 is recovered from the Euler step it took."""
    conds = checks.conds_for(denoiser)[:1]
    x = denoiser.initial_noise([5])
    result = denoiser.denoise(x, conds, 0, 1)
    sigmas = schedule.sigmas
    velocity = (result.latents - x) / (sigmas[1] - sigmas[0])
    torch.testing.assert_close(result.x0, x - sigmas[0] * velocity, atol=1e-4, rtol=1e-4)


def test_renoise_from_clean_is_the_schedulers_forward_process(denoiser, schedule):
    clean = torch.randn(2, *denoiser.latent_shape, generator=torch_generator(1))
    k = 1
    ours = denoiser.renoise(clean, STEPS, k, [torch_generator(3), torch_generator(4)])
    noise = torch.stack([torch.randn(denoiser.latent_shape, generator=torch_generator(s))
                         for s in (3, 4)])
    theirs = schedule.scale_noise(clean, schedule.timesteps[k].expand(2), noise)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_renoise_keeps_the_flow_marginal(denoiser, schedule):
    """From an intermediate state x_s = (1-s) x0 + s eps, renoising to r gives noise of std r
    around (1-r) x0: checked on many independent rows with x0 = 0."""
    n = 512
    s_step, r_step = 3, 1
    s, r = float(schedule.sigmas[s_step]), float(schedule.sigmas[r_step])
    state = s * torch.randn(n, *denoiser.latent_shape, generator=torch_generator(0))
    back = denoiser.renoise(state, s_step, r_step, [torch_generator(i) for i in range(n)])
    assert abs(back.std().item() - r) < 0.02 * r

