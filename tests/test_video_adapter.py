"""The whole-clip video adapter on a tiny random-weight TextToVideoSDPipeline (UNet3D)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from diffusers import TextToVideoSDPipeline
from PIL import Image

from diffsearch.pipelines.loading import load_denoiser
from diffsearch.pipelines.sources import DEFAULTS_FILE
from diffsearch.pipelines.video import TextToVideoDenoiser
from diffsearch.run_folder import best_clip
from diffsearch.seeding import torch_generator
from diffsearch.store import RunStore
from engine_harness import clip_redness, fake_job, run_fake
from tiny_pipelines import tiny_video_pipeline

FRAMES, STEPS, GUIDANCE = 2, 4, 3.0
PROMPT = "a red circle moving from left to right"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread, as workers pin it: on a loaded 2-core machine two threads
    oversubscribe and these tests get ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> TextToVideoSDPipeline:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the pipeline is marked deprecated
        pipe = TextToVideoSDPipeline.from_pretrained(
            tiny_video_pipeline(tmp_path_factory.mktemp("t2v")))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def adapter(pipe: TextToVideoSDPipeline, compute_batch: int = 2) -> TextToVideoDenoiser:
    return TextToVideoDenoiser(pipe, num_steps=STEPS, guidance_scale=GUIDANCE,
                               num_frames=FRAMES, compute_batch=compute_batch)


def test_zero_to_t_matches_the_pipeline(pipe: TextToVideoSDPipeline) -> None:
    denoiser = adapter(pipe, compute_batch=1)  # the pipeline's own batch: [uncond; cond]
    assert denoiser.latent_shape == (4, FRAMES, 8, 8)
    noise = denoiser.initial_noise([5])
    ours = denoiser.denoise(noise, [denoiser.encode(PROMPT)], 0, STEPS)
    theirs = pipe(PROMPT, num_frames=FRAMES, num_inference_steps=STEPS,
                  guidance_scale=GUIDANCE, latents=noise.clone(), output_type="latent").frames
    assert torch.allclose(ours.latents, theirs, atol=1e-5)
    assert torch.equal(ours.x0, ours.latents)
    frames = denoiser.decode(ours.latents)
    pixels = pipe(PROMPT, num_frames=FRAMES, num_inference_steps=STEPS,
                  guidance_scale=GUIDANCE, latents=noise.clone(), output_type="pt").frames
    assert frames.shape == pixels.shape == (1, FRAMES, 3, 16, 16)
    assert torch.allclose(frames, pixels, atol=1e-4)
    assert frames.min() >= 0 and frames.max() <= 1


def test_a_saved_pipeline_loads_by_path_with_its_clip_length(
        pipe: TextToVideoSDPipeline, tmp_path: Path) -> None:
    """A text-to-video folder is a model like any other: its ``num_frames`` default reaches the
    adapter, and the loaded model samples the same clips as the one in memory."""
    folder = tmp_path / "t2v"
    pipe.save_pretrained(folder)
    (folder / DEFAULTS_FILE).write_text(json.dumps(
        {"num_steps": STEPS, "guidance_scale": GUIDANCE, "num_frames": FRAMES}))
    loaded = load_denoiser(str(folder), device="cpu", compute_batch=2)
    assert isinstance(loaded, TextToVideoDenoiser)
    assert loaded.latent_shape == (4, FRAMES, 8, 8) and loaded.num_steps == STEPS
    noise = loaded.initial_noise([3])
    ours = loaded.denoise(noise, [loaded.encode(PROMPT)], 0, STEPS).latents
    reference = adapter(pipe)
    assert torch.equal(ours, reference.denoise(noise, [reference.encode(PROMPT)], 0, STEPS).latents)


def test_resuming_and_batching_change_no_bit(pipe: TextToVideoSDPipeline) -> None:
    denoiser = adapter(pipe)
    noise = denoiser.initial_noise([1, 2, 3])
    conds = [denoiser.encode(p) for p in (PROMPT, "a blue square", PROMPT)]
    whole = denoiser.denoise(noise, conds, 0, STEPS)
    half = denoiser.denoise(noise, conds, 0, 2)
    resumed = denoiser.denoise(half.latents, conds, 2, STEPS)
    assert torch.equal(resumed.latents, whole.latents)
    alone = torch.cat([denoiser.denoise(noise[i:i + 1], conds[i:i + 1], 0, STEPS).latents
                       for i in range(3)])
    assert torch.equal(alone, whole.latents)
    frames = denoiser.decode(whole.latents)
    assert torch.equal(torch.cat([denoiser.decode(whole.latents[i:i + 1]) for i in range(3)]),
                       frames)


def test_stochastic_steps_and_renoising_use_one_generator_per_clip(
        pipe: TextToVideoSDPipeline) -> None:
    denoiser = adapter(pipe)
    noise = denoiser.initial_noise([1, 2])
    conds = [denoiser.encode(PROMPT)] * 2

    def run(seeds: list[int], rows: slice) -> torch.Tensor:
        return denoiser.denoise(noise[rows], conds[rows], 0, STEPS, eta=1.0,
                                generators=[torch_generator(s) for s in seeds]).latents

    both = run([10, 11], slice(0, 2))
    assert torch.equal(both, run([10, 11], slice(0, 2)))
    assert torch.equal(both[1:], run([11], slice(1, 2)))
    assert not torch.equal(both, denoiser.denoise(noise, conds, 0, STEPS).latents)
    renoised = denoiser.renoise(both, STEPS, 1, [torch_generator(3), torch_generator(4)])
    assert renoised.shape == both.shape and not torch.equal(renoised, both)


def test_frame_shaped_latents_are_refused(pipe: TextToVideoSDPipeline) -> None:
    denoiser = adapter(pipe)
    with pytest.raises(ValueError, match=r"latents must have shape \(B, 4, 2, 8, 8\)"):
        denoiser.denoise(torch.zeros(1, 4, 8, 8), [denoiser.encode(PROMPT)], 0, 1)
    with pytest.raises(ValueError, match="num_frames must be >= 1"):
        TextToVideoDenoiser(pipe, num_steps=STEPS, guidance_scale=GUIDANCE, num_frames=0)


def test_whole_clips_run_through_the_engine(pipe: TextToVideoSDPipeline, tmp_path: Path
                                            ) -> None:
    """Best-of-N over whole clips: scored on their frames by a video verifier, written as GIF
    (and the last frame as PNG)."""
    job = fake_job(prompts=[PROMPT], verifier="clip-redness", budget="3x", batch_size=2,
                   eval_verifiers=["redness"])  # an image judge: not asked about clips
    result, denoiser = run_fake(job, tmp_path / "run", denoiser=adapter(pipe))
    candidates = result.prompts[0].candidates
    assert len(candidates) == 3 and result.nfe == 3 * STEPS
    assert all(set(c.scores) == {"clip-redness"} for c in candidates)
    store = RunStore.open(tmp_path / "run" / "store.zarr", writable=False)
    best = result.prompts[0].best
    clip = denoiser.decode(store.read_latents(0, [best.candidate], final=True))
    assert best.reward == pytest.approx(clip_redness(clip).item(), rel=1e-6)
    with Image.open(tmp_path / "run" / best_clip(0)) as gif:
        assert gif.n_frames == FRAMES and gif.size == (16, 16)
    assert (tmp_path / "run" / "best" / "p00000.png").is_file()
