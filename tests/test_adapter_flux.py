"""The FluxPipeline adapter against diffusers' own loop, on tiny random pipelines."""

from __future__ import annotations

import adapter_checks as checks
import pytest
import torch
from diffusers import FluxPipeline

from diffsearch.pipelines.flux import FluxDenoiser
from diffsearch.seeding import torch_generator
from tiny_pipelines import FLUX_SIZE, tiny_flux_pipeline

STEPS = 4
GUIDANCE = 3.5


_one_thread = checks.one_thread_per_module


@pytest.fixture(scope="module", params=[True, False], ids=["guidance-embed", "no-guidance"])
def pipe(request, tmp_path_factory) -> FluxPipeline:
    folder = tiny_flux_pipeline(tmp_path_factory.mktemp("flux"), guidance_embeds=request.param)
    return checks.load_pipeline(FluxPipeline, folder)


@pytest.fixture(scope="module")
def denoiser(pipe) -> FluxDenoiser:
    return FluxDenoiser(pipe, num_steps=STEPS, guidance_scale=GUIDANCE, compute_batch=3,
                        **FLUX_SIZE)


def test_latents_are_stored_unpacked(denoiser):
    assert denoiser.latent_shape == (4, 8, 8)
    assert denoiser.nfe_per_step == 1
    assert set(denoiser.encode("a red circle").tensors) == {"prompt_embeds",
                                                             "pooled_prompt_embeds"}


def test_full_run_matches_the_pipeline(pipe, denoiser):
    def reference(noise, prompts):
        n, c, h, w = noise.shape
        packed = pipe._pack_latents(noise, n, c, h, w)
        out = pipe(prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=packed,
                   height=16, width=16, output_type="latent").images
        return pipe._unpack_latents(out, 16, 16, pipe.vae_scale_factor)

    checks.check_matches_pipeline(denoiser, reference)


def test_the_guidance_scale_reaches_the_model_only_when_it_embeds_guidance(pipe):
    x = torch.randn(1, 4, 8, 8, generator=torch_generator(2))
    results = []
    for scale in (1.5, 6.0):
        denoiser = FluxDenoiser(pipe, num_steps=STEPS, guidance_scale=scale, **FLUX_SIZE)
        results.append(denoiser.denoise(x, [denoiser.encode("a red circle")], 0, 1).latents)
    assert torch.equal(results[0], results[1]) != pipe.transformer.config.guidance_embeds


def test_resume_from_an_intermediate_step_is_exact(denoiser):
    checks.check_resume_is_exact(denoiser, k=3)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_batching_does_not_change_any_bit(denoiser, eta):
    checks.check_batch_invariance(denoiser, eta=eta)


def test_stochastic_steps_use_each_candidates_own_generator(denoiser):
    checks.check_stochastic_steps(denoiser)


@pytest.mark.parametrize("step", [0, 2])
def test_step_noise_std_is_the_std_the_stochastic_step_adds(denoiser, step):
    checks.check_step_noise_std(denoiser, step)


def test_decode_gives_images_in_unit_range(denoiser):
    checks.check_decode(denoiser, 16, 16)
