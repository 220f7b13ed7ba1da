"""The PixArtSigmaPipeline adapter against diffusers' own loop, on a tiny random pipeline."""

from __future__ import annotations

from pathlib import Path

import adapter_checks as checks
import pytest
from diffusers import DDIMScheduler, PixArtSigmaPipeline
from tiny_dit import PIXART_SIZE, generate, tiny_pixart_pipeline

from diffsearch.pipelines.loading import load_denoiser
from diffsearch.pipelines.pixart import PixArtSigmaDenoiser
from diffsearch.pipelines.sources import ModelLoadError

STEPS = 4
GUIDANCE = 4.5

_one_thread = checks.one_thread_per_module


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tiny_pixart_pipeline(tmp_path_factory.mktemp("pixart"),
                                defaults={"num_steps": 3, "guidance_scale": GUIDANCE})


@pytest.fixture(scope="module")
def pipe(folder) -> PixArtSigmaPipeline:
    return checks.load_pipeline(PixArtSigmaPipeline, folder)


@pytest.fixture(scope="module")
def denoiser(pipe) -> PixArtSigmaDenoiser:
    return PixArtSigmaDenoiser(pipe, num_steps=STEPS, guidance_scale=GUIDANCE, compute_batch=3)


def reference(pipe: PixArtSigmaPipeline, scheduler, guidance: float = GUIDANCE,
              **options) -> checks.Reference:
    """The pipeline's loop with ``scheduler``, at the asked size (no resolution binning)."""
    pipe.scheduler = scheduler
    return checks.pipeline_reference(pipe, STEPS, guidance, use_resolution_binning=False,
                                     **options)


def ddim_of(pipe: PixArtSigmaPipeline) -> DDIMScheduler:
    """What a diffusers user runs as DDIM on this model's schedule (x0 not clipped: latents)."""
    return DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)


def test_the_default_sampler_is_ddim_on_the_shipped_dpm_solvers_schedule(pipe, denoiser):
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert denoiser.sampler.name == "ddim"
    assert denoiser.latent_shape == (4, PIXART_SIZE // 2, PIXART_SIZE // 2)
    shipped = pipe.scheduler
    try:
        checks.check_matches_pipeline(denoiser, reference(pipe, ddim_of(pipe)))
    finally:
        pipe.scheduler = shipped


def test_latents_are_not_clipped_like_pixels(denoiser):
    """DDIM built from a config without clip_sample (DPM-Solver's) would clip x0 to [-1, 1]."""
    final = denoiser.denoise(denoiser.initial_noise(checks.SEEDS), checks.conds_for(denoiser),
                             0, STEPS).latents
    assert final.abs().max() > 1.0


def test_the_shipped_dpm_solver_matches_the_pipeline_and_runs_0_to_t_only(pipe):
    denoiser = PixArtSigmaDenoiser(pipe, num_steps=STEPS, guidance_scale=GUIDANCE,
                                   compute_batch=3, sampler="dpm++-2m")
    checks.check_matches_pipeline(denoiser, reference(pipe, pipe.scheduler))
    checks.check_resume_is_refused(denoiser, k=2)


def test_a_negative_prompt_and_a_non_square_size_match_the_pipeline(pipe):
    denoiser = PixArtSigmaDenoiser(pipe, num_steps=STEPS, guidance_scale=GUIDANCE,
                                   compute_batch=3, height=8, width=32, negative_prompt="blurry")
    assert denoiser.latent_shape == (4, 4, 16)
    shipped = pipe.scheduler
    try:
        checks.check_matches_pipeline(denoiser, reference(
            pipe, ddim_of(pipe), negative_prompt="blurry", height=8, width=32))
    finally:
        pipe.scheduler = shipped


def test_without_guidance_there_is_no_unconditional_branch(pipe):
    denoiser = PixArtSigmaDenoiser(pipe, num_steps=STEPS, guidance_scale=1.0, compute_batch=3)
    assert set(denoiser.encode("a red circle").tensors) == {"prompt_embeds",
                                                             "prompt_attention_mask"}
    shipped = pipe.scheduler
    try:
        checks.check_matches_pipeline(denoiser, reference(pipe, ddim_of(pipe), guidance=1.0))
    finally:
        pipe.scheduler = shipped


def test_resume_from_an_intermediate_step_is_exact(denoiser):
    checks.check_resume_is_exact(denoiser, k=2)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_batching_does_not_change_any_bit(denoiser, eta):
    checks.check_batch_invariance(denoiser, eta=eta)


def test_stochastic_steps_use_each_candidates_own_generator(denoiser):
    checks.check_stochastic_steps(denoiser)


@pytest.mark.parametrize("step", [0, 2])
def test_step_noise_std_is_the_std_the_stochastic_step_adds(denoiser, step):
    checks.check_step_noise_std(denoiser, step)


def test_decode_gives_images_in_unit_range(denoiser):
    checks.check_decode(denoiser, PIXART_SIZE, PIXART_SIZE)


def test_sizes_off_the_patch_grid_are_refused(pipe, folder):
    with pytest.raises(ValueError, match="multiples of 4"):
        PixArtSigmaDenoiser(pipe, num_steps=STEPS, guidance_scale=GUIDANCE, width=18)
    with pytest.raises(ModelLoadError, match="width: pixart-sigma models take multiples of 4 "
                                             r"\(the VAE factor x the transformer's patch"):
        load_denoiser(str(folder), width=18)


@pytest.mark.parametrize(("strategy", "budget"), [("best-of-n", "3x"), ("evosearch", "12x")])
def test_a_saved_folder_runs_through_the_command_line(folder, tmp_path, strategy, budget):
    assert isinstance(load_denoiser(str(folder)), PixArtSigmaDenoiser)
    results = generate(folder, tmp_path / "run", strategy, "shapes-oracle", budget)
    (prompt,) = results["prompts"]
    assert results["nfe"] <= int(budget[:-1]) * 3 and results["failed_candidates"] == 0
    assert (tmp_path / "run" / prompt["best"]["image"]).is_file()
    assert results["model"]["latent_shape"] == [4, PIXART_SIZE // 2, PIXART_SIZE // 2]
    if strategy == "evosearch":  # intermediate states were mutated and carried on
        assert any(c["parent"] is not None and 0 < c["step"] < 3 for c in prompt["candidates"])
