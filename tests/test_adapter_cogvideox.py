"""The CogVideoXPipeline adapter against diffusers' own loop, on tiny random CogVideoX pipelines
(rotary embeddings as in 5B; ``patch_size_t`` as in 1.5; see tests/tiny_cogvideox.py)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import adapter_checks as checks
import pytest
import torch
from click.testing import CliRunner
from diffusers import CogVideoXDPMScheduler, CogVideoXPipeline, DDIMScheduler
from PIL import Image
from tiny_cogvideox import COGVIDEOX_DEFAULTS, TEXT_LENGTH, tiny_cogvideox_pipeline

from diffsearch.cli import main as cli_main
from diffsearch.pipelines.cogvideox import CogVideoXDenoiser
from diffsearch.pipelines.loading import load_denoiser
from diffsearch.pipelines.sources import DEFAULTS_FILE, ModelLoadError, plan_model
from diffsearch.run_folder import best_clip
from diffsearch.seeding import torch_generator

STEPS, GUIDANCE = 3, 3.0
LATENT = (4, 3, 4, 4)
"""The default clip: 9 frames -> (9 - 1) / 4 + 1 = 3 latent frames; 32x32 pixels -> 4x4."""

_one_thread = checks.one_thread_per_module


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tiny_cogvideox_pipeline(tmp_path_factory.mktemp("cogvideox"))


@pytest.fixture(scope="module")
def pipe(folder) -> CogVideoXPipeline:
    return checks.load_pipeline(CogVideoXPipeline, folder)


@pytest.fixture(scope="module")
def denoiser(pipe) -> CogVideoXDenoiser:
    return CogVideoXDenoiser(pipe, num_steps=STEPS, guidance_scale=GUIDANCE, compute_batch=3)


def frames_first(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) <-> the pipeline's (B, F, C, H, W): the same swap both ways."""
    return latents.permute(0, 2, 1, 3, 4)


def cog_reference(pipe: CogVideoXPipeline, **call_options) -> checks.Reference:
    """The pipeline's 0 -> T loop on the same noise in its frames-first layout."""

    def reference(noise: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        options = {"guidance_scale": GUIDANCE, **call_options}
        return frames_first(pipe(prompts, num_inference_steps=STEPS, latents=frames_first(noise),
                                 output_type="latent", max_sequence_length=TEXT_LENGTH,
                                 **options).frames)

    return reference


def test_the_default_clip_is_the_transformers_sample_size(denoiser):
    assert denoiser.latent_shape == LATENT
    assert (denoiser.height, denoiser.width, denoiser.num_frames) == (32, 32, 9)
    assert denoiser.encode("a red circle").tensors["prompt_embeds"].shape[1] == TEXT_LENGTH


def test_full_run_matches_the_pipeline(pipe, denoiser):
    checks.check_matches_pipeline(denoiser, cog_reference(pipe))


def test_negative_prompt_matches_the_pipeline(pipe):
    other = CogVideoXDenoiser(pipe, num_steps=STEPS, guidance_scale=GUIDANCE, compute_batch=3,
                              negative_prompt="blurry")
    checks.check_matches_pipeline(other, cog_reference(
        pipe, negative_prompt=["blurry"] * len(checks.PROMPTS)))


def test_without_guidance_matches_the_pipeline(pipe):
    plain = CogVideoXDenoiser(pipe, num_steps=STEPS, guidance_scale=1.0, compute_batch=3)
    assert set(plain.encode("a red circle").tensors) == {"prompt_embeds"}
    checks.check_matches_pipeline(plain, cog_reference(pipe, guidance_scale=1.0))


def test_resume_from_an_intermediate_step_is_exact(denoiser):
    checks.check_resume_is_exact(denoiser, k=1)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_batching_does_not_change_any_bit(denoiser, eta):
    checks.check_batch_invariance(denoiser, eta=eta)


def test_stochastic_steps_use_each_candidates_own_generator(denoiser):
    checks.check_stochastic_steps(denoiser)


@pytest.mark.parametrize("step", [0, 1])
def test_step_noise_std_is_the_std_the_stochastic_step_adds(denoiser, step):
    checks.check_step_noise_std(denoiser, step)


def ddim_twin(pipe: CogVideoXPipeline, denoiser: CogVideoXDenoiser) -> DDIMScheduler:
    """diffusers' DDIMScheduler on CogVideoX's SNR-shifted schedule, with its timesteps set."""
    twin = DDIMScheduler.from_config(pipe.scheduler.config)
    twin.set_timesteps(denoiser.num_steps)
    twin.alphas_cumprod = denoiser._schedule.alphas_cumprod.clone()
    twin.final_alpha_cumprod = denoiser._schedule.final_alpha_cumprod.clone()
    assert torch.equal(twin.timesteps, denoiser._schedule.timesteps)
    return twin


@pytest.mark.parametrize(("steps", "step"), [(STEPS, 0), (STEPS, 1), (6, 1)])
def test_the_stochastic_step_is_ddims_eta_step(pipe, denoiser, steps, step):
    """CogVideoXDDIMScheduler ignores eta; ours is DDIMScheduler's eta step on the same
    schedule. With 6 trailing steps, step 1's timestep (832) sits one below where step 0
    landed (833): the step's noise levels are its own timestep's, as in DDIMScheduler."""
    if steps != STEPS:
        denoiser = CogVideoXDenoiser(pipe, num_steps=steps, guidance_scale=GUIDANCE,
                                     compute_batch=3)
    twin = ddim_twin(pipe, denoiser)
    conds = checks.conds_for(denoiser)[:1]
    x = denoiser.denoise(denoiser.initial_noise([1]), conds, 0, step).latents
    ours = denoiser.denoise(x, conds, step, step + 1, eta=0.7, generators=[torch_generator(5)])
    t = twin.timesteps[step]
    alpha = twin.alphas_cumprod[t]
    velocity = (alpha.sqrt() * x - ours.x0) / (1 - alpha).sqrt()  # the v that gives this x0
    z = torch.randn(LATENT, generator=torch_generator(5))[None]
    theirs = twin.step(velocity, t, x, eta=0.7, variance_noise=z, return_dict=False)[0]
    torch.testing.assert_close(ours.latents, theirs, atol=1e-5, rtol=1e-5)


def test_renoise_from_clean_is_the_schedulers_forward_process(pipe, denoiser):
    twin = ddim_twin(pipe, denoiser)
    clean = torch.randn(2, *LATENT, generator=torch_generator(1))
    ours = denoiser.renoise(clean, STEPS, 1, [torch_generator(3), torch_generator(4)])
    noise = torch.stack([torch.randn(LATENT, generator=torch_generator(s)) for s in (3, 4)])
    theirs = twin.add_noise(clean, noise, twin.timesteps[1])
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-5)


def test_decode_gives_the_pipelines_clips(pipe, denoiser):
    conds = checks.conds_for(denoiser)[:2]
    noise = denoiser.initial_noise(checks.SEEDS[:2])
    final = denoiser.denoise(noise, conds, 0, STEPS).latents
    clips = denoiser.decode(final)
    assert clips.shape == (2, 9, 3, 32, 32) and clips.dtype == torch.float32
    assert 0 <= clips.min() and clips.max() <= 1 and clips.std() > 0
    theirs = pipe(checks.PROMPTS[:2], num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  latents=frames_first(noise), output_type="pt",
                  max_sequence_length=TEXT_LENGTH).frames
    torch.testing.assert_close(clips, theirs, atol=1e-4, rtol=0)
    assert torch.equal(denoiser.decode(final[1:])[0], clips[1])


def test_cogvideox_1_5_pads_latent_frames_like_the_pipeline(tmp_path):
    """patch_size_t = 2: 3 latent frames are padded to 4 in front; decoding drops the pad."""
    pipe = checks.load_pipeline(CogVideoXPipeline, tiny_cogvideox_pipeline(
        tmp_path, patch_size_t=2))
    denoiser = CogVideoXDenoiser(pipe, num_steps=STEPS, guidance_scale=GUIDANCE,
                                 compute_batch=2)
    assert denoiser.latent_shape == (4, 4, 4, 4) and denoiser.padding_frames == 1
    prompts = checks.PROMPTS[:2]
    noise = denoiser.initial_noise(checks.SEEDS[:2])
    final = denoiser.denoise(noise, [denoiser.encode(p) for p in prompts], 0, STEPS).latents
    torch.testing.assert_close(final, cog_reference(pipe)(noise, prompts), atol=1e-4, rtol=1e-4)
    theirs = pipe(prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  latents=frames_first(noise), output_type="pt",
                  max_sequence_length=TEXT_LENGTH).frames
    clips = denoiser.decode(final)
    assert clips.shape == theirs.shape == (2, 9, 3, 32, 32)
    torch.testing.assert_close(clips, theirs, atol=1e-4, rtol=0)


def test_the_dpm_scheduler_is_run_as_ddim_on_its_schedule(pipe, denoiser, caplog):
    dpm = CogVideoXPipeline(**{**pipe.components, "scheduler": CogVideoXDPMScheduler.from_config(
        pipe.scheduler.config)})
    with caplog.at_level(logging.WARNING, logger="diffsearch.pipelines.cogvideox"):
        as_ddim = CogVideoXDenoiser(dpm, num_steps=STEPS, guidance_scale=GUIDANCE,
                                    compute_batch=3)
    assert "CogVideoXDPMScheduler keeps a history" in caplog.text
    x, conds = denoiser.initial_noise([1]), checks.conds_for(denoiser)[:1]
    assert torch.equal(as_ddim.denoise(x, conds, 0, STEPS).latents,
                       denoiser.denoise(x, conds, 0, STEPS).latents)


@pytest.mark.parametrize(("options", "message"), [
    ({"num_frames": 8}, r"num_frames must be 4k \+ 1 \(k >= 0\), got 8"),
    ({"height": 40}, "height and width must be multiples of 16, got 40x32"),
    ({"sampler": "euler"}, "sampler 'euler' is not for CogVideoX models; they take: ddim"),
])
def test_settings_are_checked(pipe, options, message):
    with pytest.raises(ValueError, match=message):
        CogVideoXDenoiser(pipe, num_steps=STEPS, guidance_scale=GUIDANCE, **options)


def with_defaults(folder: Path, tmp_path: Path, **defaults) -> Path:
    """A copy of the tiny folder whose diffsearch_defaults.json sets ``defaults`` as well."""
    copy = Path(shutil.copytree(folder, tmp_path / "copy"))
    (copy / DEFAULTS_FILE).write_text(json.dumps({**COGVIDEOX_DEFAULTS, **defaults}))
    return copy


@pytest.mark.parametrize(("defaults", "options", "message"), [
    ({}, {"height": 40}, r"^height: cogvideox models take multiples of 16 \(the VAE factor x "),
    ({}, {"sampler": "euler"}, r"^sampler: 'euler' is not for cogvideox models; they take: "
                               r"ddim$"),
    ({"num_frames": 8}, {}, r"^num_frames: cogvideox models take 4k \+ 1 frames"),
])
def test_bad_settings_are_refused_from_the_configs(folder, tmp_path, defaults, options,
                                                   message):
    with pytest.raises(ModelLoadError, match=message):
        plan_model(str(with_defaults(folder, tmp_path, **defaults)), **options)


def test_the_folder_loads_by_its_family_with_its_clip_length(folder, tmp_path, denoiser):
    """The folder's num_frames reaches the adapter; the loaded model samples the clips of the
    one built in memory; the VAE memory options reach its VAE."""
    loaded = load_denoiser(str(with_defaults(folder, tmp_path, num_frames=5)), device="cpu",
                           compute_batch=3)
    assert isinstance(loaded, CogVideoXDenoiser) and loaded.sampler.name == "ddim"
    assert loaded.latent_shape == (4, 2, 4, 4) and loaded.num_steps == STEPS
    same = load_denoiser(str(folder), device="cpu", compute_batch=3, vae_tiling=True,
                         vae_slicing=True)
    assert same.pipe.vae.use_tiling and same.pipe.vae.use_slicing
    noise = same.initial_noise([3])
    ours = same.denoise(noise, [same.encode("a red circle")], 0, STEPS).latents
    theirs = denoiser.denoise(noise, [denoiser.encode("a red circle")], 0, STEPS).latents
    assert torch.equal(ours, theirs)


@pytest.mark.parametrize(("strategy", "budget"), [
    ("best-of-n", "3x"), ("evosearch", "8x"), ("ttsnap", "4x"), ("particles", "4x"),
    ("paths", "4x")])
def test_generate_runs_the_saved_folder(folder, tmp_path, strategy, budget):
    """Every strategy on whole clips, the adapter picked by the folder's pipeline class."""
    out = tmp_path / "run"
    result = CliRunner().invoke(cli_main, [
        "generate", "a red circle moving right", "--model", str(folder), "--strategy",
        strategy, "--verifier", "shapes-video", "--budget", budget, "--executor", "local",
        "--threads", "1", "--quiet", "--out", str(out)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert data["model"]["latent_shape"] == list(LATENT)
    assert 0 < data["nfe"] <= int(budget[:-1]) * STEPS
    if strategy in ("best-of-n", "evosearch"):
        assert data["nfe"] == int(budget[:-1]) * STEPS
    with Image.open(out / best_clip(0)) as gif:
        assert gif.n_frames == 9 and gif.size == (32, 32)
