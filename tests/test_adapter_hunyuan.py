"""The HunyuanVideoPipeline adapter against diffusers' own loop, on a tiny random pipeline
(Llama + CLIP text encoders, a 3-D causal VAE, the guidance-distilled video transformer)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import adapter_checks as checks
import pytest
import torch
from diffusers import HunyuanVideoPipeline
from PIL import Image
from tiny_dit import HUNYUAN_SIZE, generate, tiny_hunyuan_pipeline

from diffsearch.pipelines.hunyuan_video import HunyuanVideoDenoiser
from diffsearch.pipelines.loading import load_denoiser
from diffsearch.pipelines.sources import DEFAULTS_FILE, ModelLoadError, plan_model
from diffsearch.run_folder import best_clip
from diffsearch.seeding import torch_generator

STEPS = 3
GUIDANCE = 6.0
CLIP = (4, 2, 4, 4)
"""(C, F', h, w) of the tiny clip: 5 frames of 32x32 through a x8, x4-in-time VAE."""

_one_thread = checks.one_thread_per_module


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tiny_hunyuan_pipeline(tmp_path_factory.mktemp("hunyuan"))


@pytest.fixture(scope="module")
def pipe(folder) -> HunyuanVideoPipeline:
    return checks.load_pipeline(HunyuanVideoPipeline, folder)


def adapter(pipe: HunyuanVideoPipeline, **options) -> HunyuanVideoDenoiser:
    return HunyuanVideoDenoiser(pipe, num_steps=STEPS, guidance_scale=GUIDANCE, compute_batch=3,
                                **HUNYUAN_SIZE, **options)


@pytest.fixture(scope="module")
def denoiser(pipe) -> HunyuanVideoDenoiser:
    return adapter(pipe)


def reference(pipe: HunyuanVideoPipeline, **options) -> checks.Reference:
    def run(noise: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return pipe(prompts, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=noise,
                    output_type="latent", **HUNYUAN_SIZE, **options).frames

    return run


def test_embedded_guidance_matches_the_pipeline_in_one_pass(pipe, denoiser):
    assert denoiser.latent_shape == CLIP and denoiser.sampler.name == "flow-euler"
    assert not denoiser.do_guidance
    assert set(denoiser.encode("a red circle").tensors) == {
        "prompt_embeds", "pooled_prompt_embeds", "prompt_attention_mask"}
    checks.check_matches_pipeline(denoiser, reference(pipe))


def test_true_cfg_with_a_negative_prompt_matches_the_pipeline(pipe):
    denoiser = adapter(pipe, true_cfg_scale=3.0, negative_prompt="blurry")
    assert denoiser.encode("a red circle").negative_prompt == "blurry"
    checks.check_matches_pipeline(denoiser, reference(
        pipe, true_cfg_scale=3.0, negative_prompt="blurry"))
    checks.check_batch_invariance(denoiser)


def test_the_guidance_scale_is_an_input_of_the_model(pipe, denoiser):
    weaker = HunyuanVideoDenoiser(pipe, num_steps=STEPS, guidance_scale=1.0, compute_batch=3,
                                  **HUNYUAN_SIZE)
    x = denoiser.initial_noise([3])
    ours = denoiser.denoise(x, [denoiser.encode("a red circle")], 0, STEPS)
    other = weaker.denoise(x, [weaker.encode("a red circle")], 0, STEPS)
    assert not torch.allclose(ours.latents, other.latents)
    assert ours.rows == other.rows == STEPS * denoiser.compute_batch  # one forward per step


def test_the_chat_template_prefix_is_cropped(denoiser):
    """What is left of the Llama sequence starts at the prompt: 'a red circle' and the
    template's closing <|eot_id|> are its only unmasked tokens."""
    tensors = denoiser.encode("a red circle").tensors
    assert tensors["prompt_embeds"].shape == (1, denoiser.max_sequence_length, 32)
    assert tensors["prompt_attention_mask"][0].tolist() == [1] * 4 + [0] * 252


def test_a_negative_prompt_without_true_cfg_is_refused(pipe, folder, tmp_path):
    with pytest.raises(ValueError, match="true_cfg_scale > 1"):
        adapter(pipe, negative_prompt="blurry")
    with pytest.raises(ModelLoadError,
                       match="negative_prompt: hunyuan-video models take no negative prompt"):
        load_denoiser(str(folder), negative_prompt="blurry")


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


def test_renoised_clips_keep_their_shape_and_differ(denoiser):
    clean = denoiser.denoise(denoiser.initial_noise([1, 2]), checks.conds_for(denoiser)[:2], 0,
                             STEPS).latents
    back = denoiser.renoise(clean, STEPS, 1, [torch_generator(3), torch_generator(4)])
    assert back.shape == clean.shape and not torch.equal(back, clean)


def test_decode_gives_whole_clips_in_unit_range(pipe, denoiser):
    x = denoiser.initial_noise([1, 2])
    final = denoiser.denoise(x, checks.conds_for(denoiser)[:2], 0, STEPS).latents
    clips = denoiser.decode(final)
    frames = HUNYUAN_SIZE["num_frames"], 3, HUNYUAN_SIZE["height"], HUNYUAN_SIZE["width"]
    assert clips.shape == (2, *frames) and clips.dtype == torch.float32
    assert 0 <= clips.min() and clips.max() <= 1 and clips.std() > 0
    assert torch.equal(denoiser.decode(final[1:2])[0], clips[1])
    theirs = pipe(checks.PROMPTS[:2], num_inference_steps=STEPS, guidance_scale=GUIDANCE,
                  latents=x, output_type="pt", **HUNYUAN_SIZE).frames
    torch.testing.assert_close(clips, theirs, atol=1e-4, rtol=1e-4)


def test_sizes_and_frame_counts_the_vae_cannot_take_are_refused(pipe, folder, tmp_path):
    with pytest.raises(ValueError, match="num_frames must be 4k\\+1"):
        HunyuanVideoDenoiser(pipe, num_steps=STEPS, guidance_scale=GUIDANCE, height=32,
                             width=32, num_frames=6)
    with pytest.raises(ValueError, match="multiples of 16"):
        HunyuanVideoDenoiser(pipe, num_steps=STEPS, guidance_scale=GUIDANCE, height=32,
                             width=40, num_frames=5)
    with pytest.raises(ModelLoadError, match="width: hunyuan-video models take multiples of 16"):
        load_denoiser(str(folder), width=40)
    six = tmp_path / "six-frames"
    shutil.copytree(folder, six)
    (six / DEFAULTS_FILE).write_text(json.dumps({**HUNYUAN_SIZE, "num_frames": 6}))
    with pytest.raises(ModelLoadError, match="num_frames: hunyuan-video models take 4k \\+ 1"):
        plan_model(str(six))


def test_vae_memory_options_reach_the_video_vae(folder):
    loaded = load_denoiser(str(folder), vae_tiling=True, vae_slicing=True)
    assert loaded.pipe.vae.use_tiling and loaded.pipe.vae.use_slicing


def test_a_saved_folder_loads_as_hunyuan_video(folder):
    loaded = load_denoiser(str(folder))
    assert isinstance(loaded, HunyuanVideoDenoiser) and loaded.latent_shape == CLIP


@pytest.mark.parametrize(("strategy", "budget"), [
    ("best-of-n", "3x"), ("evosearch", "12x"), ("ttsnap", "4x"), ("particles", "4x"),
    ("paths", "4x")])
def test_a_saved_folder_runs_through_the_command_line(folder, tmp_path, strategy, budget):
    """Every strategy on whole clips, scored by a video verifier, the best written as a GIF."""
    results = generate(folder, tmp_path / "run", strategy, "shapes-video-oracle", budget)
    (prompt,) = results["prompts"]
    assert 0 < results["nfe"] <= int(budget[:-1]) * STEPS
    assert results["failed_candidates"] == 0
    assert results["model"]["latent_shape"] == list(CLIP)
    with Image.open(tmp_path / "run" / best_clip(0)) as gif:
        assert gif.n_frames == HUNYUAN_SIZE["num_frames"] and gif.size == (32, 32)
    if strategy == "evosearch":  # intermediate clips were mutated and carried on
        assert any(c["parent"] is not None and 0 < c["step"] < STEPS
                   for c in prompt["candidates"])
