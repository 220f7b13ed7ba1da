"""The StableDiffusionXLPipeline adapter against diffusers' own loop, on tiny random pipelines."""

from __future__ import annotations

import adapter_checks as checks
import pytest
from diffusers import StableDiffusionXLPipeline

from diffsearch.pipelines.sdxl import StableDiffusionXLDenoiser
from tiny_pipelines import tiny_sdxl_pipeline

STEPS = 4
GUIDANCE = 5.0


_one_thread = checks.one_thread_per_module


@pytest.fixture(scope="module", params=["euler", "ddim"])
def pipe(request, tmp_path_factory) -> StableDiffusionXLPipeline:
    folder = tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl"), scheduler=request.param)
    return checks.load_pipeline(StableDiffusionXLPipeline, folder)


@pytest.fixture(scope="module")
def denoiser(pipe) -> StableDiffusionXLDenoiser:
    return StableDiffusionXLDenoiser(pipe, num_steps=STEPS, guidance_scale=GUIDANCE,
                                     compute_batch=3)


def test_full_run_matches_the_pipeline(pipe, denoiser):
    checks.check_matches_pipeline(denoiser, checks.pipeline_reference(pipe, STEPS, GUIDANCE))


def test_unconditional_branch_follows_the_pipeline_default(pipe, denoiser):
    """force_zeros_for_empty_prompt (SDXL's default): the negative embeddings are zeros."""
    assert pipe.config.force_zeros_for_empty_prompt
    tensors = denoiser.encode("a red circle").tensors
    assert tensors["negative_prompt_embeds"].abs().max() == 0
    assert tensors["negative_pooled_prompt_embeds"].abs().max() == 0
    assert tensors["pooled_prompt_embeds"].shape == (1, 16)


def test_resume_from_an_intermediate_step_is_exact(denoiser):
    checks.check_resume_is_exact(denoiser, k=1)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_batching_does_not_change_any_bit(denoiser, eta):
    checks.check_batch_invariance(denoiser, eta=eta)


def test_stochastic_steps_use_each_candidates_own_generator(denoiser):
    checks.check_stochastic_steps(denoiser)


def test_step_noise_std_is_the_std_the_stochastic_step_adds(denoiser):
    checks.check_step_noise_std(denoiser, step=1)


def test_decode_gives_images_in_unit_range(denoiser):
    checks.check_decode(denoiser, 16, 16)
