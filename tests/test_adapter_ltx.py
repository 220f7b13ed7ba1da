"""The LTXPipeline adapter against diffusers' own loop, on a tiny random LTX-Video pipeline
(the real x32 / x8 VAE compression; see tests/tiny_ltx.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import adapter_checks as checks
import pytest
import torch
from click.testing import CliRunner
from diffusers import LTXPipeline
from PIL import Image
from tiny_ltx import LTX_DEFAULTS, tiny_ltx_pipeline, tiny_ltx_vae

from diffsearch.cli import main as cli_main
from diffsearch.pipelines.loading import load_denoiser
from diffsearch.pipelines.ltx import LTXDenoiser
from diffsearch.pipelines.sources import DEFAULTS_FILE, ModelLoadError, plan_model
from diffsearch.run_folder import best_clip
from diffsearch.seeding import torch_generator

STEPS, GUIDANCE = 3, 3.0
SIZE = {"height": LTX_DEFAULTS["height"], "width": LTX_DEFAULTS["width"],
        "num_frames": LTX_DEFAULTS["num_frames"]}
LATENT = (32, 3, 2, 3)
"""17 frames -> (17 - 1) / 8 + 1 = 3 latent frames; 64x96 pixels -> 2x3 latent pixels."""

_one_thread = checks.one_thread_per_module


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tiny_ltx_pipeline(tmp_path_factory.mktemp("ltx"))


@pytest.fixture(scope="module")
def pipe(folder) -> LTXPipeline:
    return checks.load_pipeline(LTXPipeline, folder)


@pytest.fixture(scope="module")
def denoiser(pipe) -> LTXDenoiser:
    return LTXDenoiser(pipe, num_steps=STEPS, guidance_scale=GUIDANCE, compute_batch=3, **SIZE)


def ltx_reference(pipe: LTXPipeline, **call_options) -> checks.Reference:
    """The pipeline's 0 -> T loop on packed noise (it takes ``latents`` packed and returns them
    packed), unpacked for the comparison."""

    def reference(noise: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        options = {"guidance_scale": GUIDANCE, **SIZE, **call_options}
        packed = pipe(prompts, num_inference_steps=STEPS, latents=pipe._pack_latents(noise),
                      output_type="latent", **options).frames
        return pipe._unpack_latents(packed, *LATENT[1:])

    return reference


def test_latent_shape_follows_the_vae_compression(denoiser):
    assert denoiser.latent_shape == LATENT
    assert (denoiser.spatial_ratio, denoiser.temporal_ratio) == (32, 8)


def test_full_run_matches_the_pipeline(pipe, denoiser):
    checks.check_matches_pipeline(denoiser, ltx_reference(pipe))


def test_negative_prompt_and_frame_rate_match_the_pipeline(pipe):
    """Both change the result, and both reach the network as the pipeline passes them."""
    other = LTXDenoiser(pipe, num_steps=STEPS, guidance_scale=GUIDANCE, compute_batch=3,
                        negative_prompt="blurry", frame_rate=12, **SIZE)
    checks.check_matches_pipeline(other, ltx_reference(
        pipe, negative_prompt=["blurry"] * len(checks.PROMPTS), frame_rate=12))


def test_without_guidance_matches_the_pipeline(pipe):
    plain = LTXDenoiser(pipe, num_steps=STEPS, guidance_scale=1.0, compute_batch=3, **SIZE)
    assert set(plain.encode("a red circle").tensors) == {"prompt_embeds",
                                                          "prompt_attention_mask"}
    checks.check_matches_pipeline(plain, ltx_reference(pipe, guidance_scale=1.0))


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


def test_renoise_keeps_the_flow_marginal(denoiser):
    """From x_s = (1-s) x0 + s eps with x0 = 0, renoising to r gives noise of std r."""
    n = 64
    s, r = denoiser._sigma(2), denoiser._sigma(1)
    state = s * torch.randn(n, *LATENT, generator=torch_generator(0))
    back = denoiser.renoise(state, 2, 1, [torch_generator(i) for i in range(n)])
    assert abs(back.std().item() - r) < 0.02 * r


def test_decode_gives_the_pipelines_clips(pipe, denoiser):
    """Clips (B, F, 3, H, W) in [0, 1], equal to the pipeline's decoded frames (its
    timestep-conditioned VAE at the default decode timestep), each clip decoded alone."""
    conds = checks.conds_for(denoiser)[:2]
    final = denoiser.denoise(denoiser.initial_noise(checks.SEEDS[:2]), conds, 0, STEPS).latents
    clips = denoiser.decode(final)
    assert clips.shape == (2, 17, 3, 64, 96) and clips.dtype == torch.float32
    assert 0 <= clips.min() and clips.max() <= 1 and clips.std() > 0
    theirs = pipe(checks.PROMPTS[:2], num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  latents=pipe._pack_latents(denoiser.initial_noise(checks.SEEDS[:2])),
                  output_type="pt", **SIZE).frames
    torch.testing.assert_close(clips, theirs, atol=1e-3, rtol=0)
    assert torch.equal(denoiser.decode(final[1:])[0], clips[1])


def test_a_noise_injecting_decoder_decodes_reproducibly(pipe):
    """LTX-Video 0.9.1's decoder adds noise from the global generator: decoding draws it under
    a fixed seed (leaving the caller's generator alone), the same for a clip alone or in a
    batch."""
    noisy = LTXPipeline(**{**pipe.components, "vae": tiny_ltx_vae(inject_noise=True)})
    denoiser = LTXDenoiser(noisy, num_steps=STEPS, guidance_scale=GUIDANCE, compute_batch=3,
                           **SIZE)
    latents = torch.randn(2, *LATENT, generator=torch_generator(0))
    with torch.random.fork_rng():
        raw = [noisy.vae.decode(latents, torch.zeros(2), return_dict=False)[0]
               for _ in range(2)]
        assert not torch.equal(*raw)  # the noise is real
        state = torch.get_rng_state()
        clips = denoiser.decode(latents)
        assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(denoiser.decode(latents), clips)
    assert torch.equal(denoiser.decode(latents[1:])[0], clips[1])


@pytest.mark.parametrize(("options", "message"), [
    ({"num_frames": 16}, r"num_frames must be 8k \+ 1 \(k >= 0\), got 16"),
    ({"height": 48}, "height and width must be multiples of 32, got 48x96"),
    ({"num_frames": 0}, r"num_frames must be 8k \+ 1 \(k >= 0\), got 0"),
    ({"frame_rate": 0}, "frame_rate must be > 0, got 0"),
])
def test_settings_are_checked_against_the_configs(pipe, options, message):
    settings = {**SIZE, **options}
    with pytest.raises(ValueError, match=message):
        LTXDenoiser(pipe, num_steps=STEPS, guidance_scale=GUIDANCE, **settings)


def test_clip_shaped_latents_are_checked(denoiser):
    with pytest.raises(ValueError, match=r"latents must have shape \(B, 32, 3, 2, 3\)"):
        denoiser.denoise(torch.zeros(1, 32, 2, 3), checks.conds_for(denoiser)[:1], 0, 1)


def test_the_folder_is_planned_and_loaded_by_its_family(folder, denoiser):
    """Sizes are refused from the configs alone; the loaded model takes the folder's defaults
    (size, frames) and samples the clips of the one built in memory; the VAE memory options
    reach its VAE."""
    with pytest.raises(ModelLoadError, match="height: ltx models take multiples of 32"):
        plan_model(str(folder), height=48)
    loaded = load_denoiser(str(folder), device="cpu", compute_batch=3, vae_tiling=True,
                           vae_slicing=True)
    assert isinstance(loaded, LTXDenoiser)
    assert loaded.pipe.vae.use_tiling and loaded.pipe.vae.use_slicing
    assert loaded.latent_shape == LATENT and loaded.num_steps == LTX_DEFAULTS["num_steps"]
    noise = loaded.initial_noise([3])
    ours = loaded.denoise(noise, [loaded.encode("a red circle")], 0, STEPS).latents
    theirs = denoiser.denoise(noise, [denoiser.encode("a red circle")], 0, STEPS).latents
    assert torch.equal(ours, theirs)


def with_defaults(folder: Path, tmp_path: Path, **defaults) -> Path:
    """A copy of the tiny folder whose diffsearch_defaults.json sets ``defaults`` as well."""
    copy = Path(shutil.copytree(folder, tmp_path / "copy"))
    (copy / DEFAULTS_FILE).write_text(json.dumps({**LTX_DEFAULTS, **defaults}))
    return copy


def test_a_frame_rate_in_the_folder_defaults_reaches_the_adapter(folder, tmp_path):
    assert load_denoiser(str(with_defaults(folder, tmp_path, frame_rate=12)),
                         device="cpu").frame_rate == 12


def test_a_frame_count_the_vae_cannot_take_is_refused_from_the_configs(folder, tmp_path):
    with pytest.raises(ModelLoadError, match=r"^num_frames: ltx models take 8k \+ 1 frames "
                                             r"\(the VAE's temporal compression is 8\), got 16$"):
        plan_model(str(with_defaults(folder, tmp_path, num_frames=16)))


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
        assert gif.n_frames == 17 and gif.size == (96, 64)
