"""The SanaPipeline adapter against diffusers' own loop, on tiny random pipelines."""

from __future__ import annotations

import shutil
from pathlib import Path

import adapter_checks as checks
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SanaPipeline
from tiny_dit import (
    SANA_FLOW_SHIFT,
    SANA_SIZE,
    generate,
    invoke_generate,
    tiny_sana_pipeline,
)

from diffsearch.pipelines.loading import load_denoiser
from diffsearch.pipelines.sana import INSTRUCTION, SanaDenoiser
from diffsearch.pipelines.sources import ModelLoadError, plan_model

STEPS = 4
GUIDANCE = 4.5

_one_thread = checks.one_thread_per_module


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tiny_sana_pipeline(tmp_path_factory.mktemp("sana"),
                              defaults={"num_steps": 3, "guidance_scale": GUIDANCE})


@pytest.fixture(scope="module")
def pipe(folder) -> SanaPipeline:
    return checks.load_pipeline(SanaPipeline, folder)


@pytest.fixture(scope="module")
def denoiser(pipe) -> SanaDenoiser:
    return SanaDenoiser(pipe, num_steps=STEPS, guidance_scale=GUIDANCE, compute_batch=3)


def euler_reference(pipe: SanaPipeline, **options) -> checks.Reference:
    """diffusers' Sana loop with flow-matching Euler at the shipped flow_shift, at the asked
    size (32x32 unless told; no resolution binning)."""
    shipped = pipe.scheduler
    options = {"height": SANA_SIZE, "width": SANA_SIZE, **options}
    guidance = options.pop("guidance_scale", GUIDANCE)
    run = checks.pipeline_reference(pipe, STEPS, guidance, use_resolution_binning=False,
                                    **options)

    def reference(noise: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=SANA_FLOW_SHIFT)
        try:
            return run(noise, prompts)
        finally:
            pipe.scheduler = shipped

    return reference


def test_flow_euler_at_the_shipped_shift_matches_the_pipeline(pipe, denoiser):
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert denoiser.sampler.name == "flow-euler"
    assert denoiser.latent_shape == (4, SANA_SIZE // 4, SANA_SIZE // 4)  # native size, x4 VAE
    checks.check_matches_pipeline(denoiser, euler_reference(pipe))


def test_the_shipped_flow_dpm_solver_matches_the_pipeline_and_runs_0_to_t_only(pipe):
    denoiser = SanaDenoiser(pipe, num_steps=STEPS, guidance_scale=GUIDANCE, compute_batch=3,
                            sampler="flow-dpm++")
    checks.check_matches_pipeline(denoiser, checks.pipeline_reference(
        pipe, STEPS, GUIDANCE, use_resolution_binning=False, height=SANA_SIZE, width=SANA_SIZE))
    checks.check_resume_is_refused(denoiser, k=2)


def test_flow_dpm_is_refused_for_a_model_that_ships_another_scheduler(folder, tmp_path):
    euler = tmp_path / "sana-euler"
    shutil.copytree(folder, euler)
    FlowMatchEulerDiscreteScheduler(shift=SANA_FLOW_SHIFT).save_config(euler / "scheduler")
    assert plan_model(str(euler)).sampler == "flow-euler"
    with pytest.raises(ModelLoadError, match="sampler: flow-dpm\\+\\+ runs the model's own "
                                             "DPMSolverMultistepScheduler"):
        plan_model(str(euler), sampler="flow-dpm++")


def test_the_instruction_is_prepended_by_default_and_can_be_left_off(pipe, denoiser):
    assert denoiser.instruction == INSTRUCTION and len(INSTRUCTION) > 3
    bare = SanaDenoiser(pipe, num_steps=STEPS, guidance_scale=GUIDANCE, compute_batch=3,
                        complex_human_instruction=False)
    with_it = denoiser.encode("a red circle").tensors
    without = bare.encode("a red circle").tensors
    assert with_it["prompt_embeds"].shape == without["prompt_embeds"].shape == (1, 300, 32)
    assert not torch.equal(with_it["prompt_embeds"], without["prompt_embeds"])
    torch.testing.assert_close(with_it["negative_prompt_embeds"],
                               without["negative_prompt_embeds"])  # negatives go bare
    checks.check_matches_pipeline(bare, euler_reference(pipe, complex_human_instruction=[]))


def test_a_negative_prompt_and_a_non_square_size_match_the_pipeline(pipe):
    denoiser = SanaDenoiser(pipe, num_steps=STEPS, guidance_scale=GUIDANCE, compute_batch=3,
                            height=32, width=64, negative_prompt="blurry")
    assert denoiser.latent_shape == (4, 8, 16)
    checks.check_matches_pipeline(denoiser, euler_reference(
        pipe, negative_prompt="blurry", height=32, width=64))


def test_a_learned_variance_half_is_dropped(tmp_path):
    pipe = checks.load_pipeline(SanaPipeline, tiny_sana_pipeline(tmp_path, out_channels=8))
    denoiser = SanaDenoiser(pipe, num_steps=STEPS, guidance_scale=1.0, compute_batch=3)
    assert set(denoiser.encode("a red circle").tensors) == {"prompt_embeds",
                                                             "prompt_attention_mask"}
    checks.check_matches_pipeline(denoiser, euler_reference(pipe, guidance_scale=1.0))


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
    checks.check_decode(denoiser, SANA_SIZE, SANA_SIZE)


def test_vae_memory_options_reach_the_dc_ae(folder):
    loaded = load_denoiser(str(folder), vae_tiling=True, vae_slicing=True)
    assert loaded.pipe.vae.use_tiling and loaded.pipe.vae.use_slicing


def test_sizes_off_the_dc_ae_grid_are_refused(pipe, folder):
    with pytest.raises(ValueError, match="multiples of 4"):
        SanaDenoiser(pipe, num_steps=STEPS, guidance_scale=GUIDANCE, height=30)
    with pytest.raises(ModelLoadError, match="height: sana models take multiples of 4 "
                                             r"\(the VAE factor x the transformer's patch"):
        load_denoiser(str(folder), height=30)


@pytest.mark.parametrize(("strategy", "budget", "flags"), [
    ("best-of-n", "3x", []), ("evosearch", "12x", []),
    ("best-of-n", "3x", ["--sampler", "flow-dpm++"]),
], ids=["best-of-n", "evosearch", "best-of-n-flow-dpm++"])
def test_a_saved_folder_runs_through_the_command_line(folder, tmp_path, strategy, budget, flags):
    assert isinstance(load_denoiser(str(folder)), SanaDenoiser)
    results = generate(folder, tmp_path / "run", strategy, "shapes-oracle", budget, *flags)
    assert results["job"]["sampler"] == (flags[1] if flags else None)
    (prompt,) = results["prompts"]
    assert results["nfe"] <= int(budget[:-1]) * 3 and results["failed_candidates"] == 0
    assert (tmp_path / "run" / prompt["best"]["image"]).is_file()
    assert results["model"]["latent_shape"] == [4, SANA_SIZE // 4, SANA_SIZE // 4]
    if strategy == "evosearch":  # intermediate states were mutated and carried on
        assert any(c["parent"] is not None and 0 < c["step"] < 3 for c in prompt["candidates"])


def test_a_resuming_strategy_with_the_flow_dpm_solver_is_refused_in_one_line(folder, tmp_path):
    result = invoke_generate(folder, tmp_path / "run", "evosearch", "shapes-oracle", "12x",
                             "--sampler", "flow-dpm++")
    assert result.exit_code == 2 and "Traceback" not in result.output
    (line,) = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert "sampler: strategy evosearch" in line and "flow-dpm++" in line
