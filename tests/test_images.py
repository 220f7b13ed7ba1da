"""The job's ``images``: which images a run folder gets, written by the driver off the
denoiser's path, and restored on resume when a kill lost them."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from PIL import Image

from diffsearch import run_folder
from diffsearch.api import SearchResult, run_job
from diffsearch.executor import Executor, LocalExecutor
from diffsearch.image_output import CANDIDATE_KEY, CLIP_FRAME_MS, ImageOutput, shown_candidate
from diffsearch.job import Job
from diffsearch.runtime import ModelInfo, RuntimeSpec, UnitResult, WorkBatch
from diffsearch.store import RunStore
from engine_harness import comparable, fake_job, install_fake_runtime, run_fake

PROMPTS = ["a red circle on the left", "two blue squares", "a green triangle"]
EVOSEARCH = {"name": "evosearch", "schedule": [0, 0, 4, 6], "population": [4, 3, 3, 3]}


class CountingExecutor(Executor):
    """The in-process executor, counting the images workers send back."""

    def __init__(self) -> None:
        self.inner = LocalExecutor()
        self.images_sent: list[int] = []
        self.renders = 0
        self.tasks_run = 0

    def start(self, spec: RuntimeSpec) -> ModelInfo:
        return self.inner.start(spec)

    def submit(self, batch: WorkBatch) -> None:
        self.renders += len(batch.renders)
        self.tasks_run += len(batch.tasks)
        self.inner.submit(batch)

    def as_completed(self) -> Iterator[tuple[WorkBatch, UnitResult]]:
        for batch, result in self.inner.as_completed():
            self.images_sent.append(len(result.images))
            yield batch, result


def pixels_of(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / run_folder.RESULTS).read_text())


def test_best_writes_one_image_per_prompt_and_it_shows_the_best(tmp_path: Path) -> None:
    job = fake_job(prompts=PROMPTS, budget="8x", batch_size=8)
    counting = CountingExecutor()
    install_fake_runtime(job)
    run = run_job(job, tmp_path / "best", executor=counting)
    run_fake(job.model_copy(update={"images": "all"}), tmp_path / "all")
    assert not (tmp_path / "best" / run_folder.IMAGES).exists()
    for prompt in run.prompts:
        best = tmp_path / "best" / run_folder.best_image(prompt.prompt_index)
        assert shown_candidate(best) == prompt.best.candidate
        # the same pixels as that candidate's own image in a run that writes them all
        own = tmp_path / "all" / run_folder.candidate_image(prompt.prompt_index,
                                                            prompt.best.candidate)
        assert np.array_equal(pixels_of(best), pixels_of(own))
    # 3 prompts x 8 candidates: a worker sends at most one image per prompt and unit
    assert sum(counting.images_sent) <= 3 * len(counting.images_sent)
    assert sum(counting.images_sent) < 3 * 8
    assert counting.renders == 0
    assert results(tmp_path / "best")["prompts"][0]["candidates"][0]["image"] is None


def test_all_writes_every_final_image_and_the_same_results(tmp_path: Path) -> None:
    job = fake_job(prompts=PROMPTS, budget="8x", strategy=EVOSEARCH)
    run_fake(job, tmp_path / "best")
    run_fake(job.model_copy(update={"images": "all"}), tmp_path / "all")
    data = results(tmp_path / "all")
    written = sorted((tmp_path / "all" / run_folder.IMAGES).rglob("*.png"))
    finals = [c for p in data["prompts"] for c in p["candidates"] if c["image"]]
    assert len(written) == len(finals) > 3
    for candidate in finals:
        assert (tmp_path / "all" / candidate["image"]).is_file()
    # which images are written never changes what was found
    assert comparable(tmp_path / "all", "job", "result_key", "prompts") == \
        comparable(tmp_path / "best", "job", "result_key", "prompts")
    for ours, theirs in zip(data["prompts"], results(tmp_path / "best")["prompts"]):
        assert ours["best"]["candidate"] == theirs["best"]["candidate"]
        assert ours["best"]["score"] == theirs["best"]["score"]


def test_none_writes_no_image_and_says_so(tmp_path: Path) -> None:
    job = fake_job(prompts=PROMPTS[:1], images="none")
    run, _ = run_fake(job, tmp_path / "run")
    assert not list((tmp_path / "run").rglob("*.png"))
    assert results(tmp_path / "run")["prompts"][0]["best"]["image"] is None
    with pytest.raises(ValueError, match="images='none'"):
        SearchResult.from_run(run).best_image  # noqa: B018


def test_a_resumed_run_restores_a_best_image_a_kill_lost(tmp_path: Path) -> None:
    job = fake_job(prompts=PROMPTS, budget="8x", strategy=EVOSEARCH)
    run_fake(job, tmp_path / "run")
    lost = tmp_path / "run" / run_folder.best_image(1)
    kept = tmp_path / "run" / run_folder.best_image(0)
    before, kept_before = pixels_of(lost), kept.stat().st_mtime_ns
    lost.unlink()
    counting = CountingExecutor()
    install_fake_runtime(job)
    resumed = run_job(job, tmp_path / "run", resume=True, executor=counting)
    assert (counting.renders, counting.tasks_run) == (1, 0)  # only the lost one is decoded
    assert resumed.prompts[1].best is not None
    assert np.array_equal(pixels_of(lost), before)
    assert kept.stat().st_mtime_ns == kept_before


def test_a_best_image_records_its_candidate(tmp_path: Path) -> None:
    run, _ = run_fake(fake_job(prompts=PROMPTS[:1]), tmp_path / "run")
    with Image.open(tmp_path / "run" / run_folder.best_image(0)) as image:
        assert image.text[CANDIDATE_KEY] == str(run.prompts[0].best.candidate)


def test_show_reads_a_run_without_importing_torch() -> None:
    """``diffsearch show`` on a 10,000-prompt run should take seconds, not torch's import."""
    code = ("import sys; from diffsearch.run_reading import best_per_prompt; "
            "sys.exit('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


def test_the_job_s_size_and_sampler_reach_the_model(tmp_path: Path) -> None:
    """Generation settings go from the job through the runtime spec to the bundled model: its
    latents and best image have the job's size, and another sampler gives other latents."""
    base = {"prompts": ["a red circle to the left of a blue square"], "model": "shapes",
            "budget": "2x", "num_steps": 4, "threads": 1, "executor": "local",
            "verifier": "shapes-oracle"}
    run_job(Job.model_validate({**base, "width": 48, "height": 32,
                                "sampler": "euler-ancestral"}), tmp_path / "euler")
    run_job(Job.model_validate({**base, "width": 48, "height": 32}), tmp_path / "default")
    with Image.open(tmp_path / "euler" / run_folder.best_image(0)) as image:
        assert image.size == (48, 32)
    euler, default = (RunStore.open(tmp_path / name / run_folder.STORE, writable=False)
                      .read_latents(0, [0, 1], final=True) for name in ("euler", "default"))
    assert euler.shape[-2:] == (8, 12)  # 32 x 48 pixels at the bundled VAE's factor of 4
    assert not torch.equal(euler, default)


def gradient_clip(frames: int, height: int, width: int) -> np.ndarray:
    """uint8 (F, H, W, 3) frames whose colours differ from frame to frame (smooth in space, as
    decoded images are, so a lossy codec keeps them close)."""
    y, x = np.mgrid[0:height, 0:width]
    clip = [np.stack([x * 150 // (width - 1) + 20 * f, y * 150 // (height - 1) + 10 * f,
                      np.full_like(x, 40 + 30 * f)], axis=-1) for f in range(frames)]
    return np.stack(clip).astype(np.uint8)


def decoded_mp4(path: Path) -> tuple[np.ndarray, object]:
    """The frames of an MP4 as uint8 (F, H, W, 3), and its stream's frame rate."""
    with av.open(str(path)) as container:
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
        return np.stack(frames), container.streams.video[0].average_rate


def test_a_clip_is_written_as_gif_and_mp4_that_decode_to_its_frames(tmp_path: Path) -> None:
    clip = gradient_clip(5, 16, 24)
    output = ImageOutput(tmp_path, "best")
    output.write_best(0, 3, clip)
    output.close()
    assert np.array_equal(pixels_of(tmp_path / run_folder.best_image(0)), clip[-1])
    with Image.open(tmp_path / run_folder.best_clip(0, "gif")) as gif:
        assert (gif.n_frames, gif.size, gif.info["duration"]) == (5, (24, 16), CLIP_FRAME_MS)
    mp4 = tmp_path / run_folder.best_clip(0, "mp4")
    frames, rate = decoded_mp4(mp4)
    assert frames.shape == clip.shape
    assert rate == 1000 / CLIP_FRAME_MS
    error = np.abs(frames.astype(int)[:, None] - clip.astype(int)[None]).mean(axis=(2, 3, 4))
    assert error.diagonal().max() < 6  # each decoded frame is close to its own frame ...
    assert (error.argmin(axis=1) == np.arange(5)).all()  # ... and closer than to any other
    data = mp4.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")  # the index first: plays while loading
    assert not list(tmp_path.rglob("*.partial"))


def test_an_odd_sized_clip_is_padded_to_the_even_size_h264_needs(tmp_path: Path) -> None:
    clip = gradient_clip(3, 9, 13)
    output = ImageOutput(tmp_path, "best")
    output.write_best(0, 0, clip)
    output.close()
    frames, _ = decoded_mp4(tmp_path / run_folder.best_clip(0, "mp4"))
    assert frames.shape == (3, 10, 14, 3)
    assert np.abs(frames[:, :9, :13].astype(int) - clip).mean() < 6
    with Image.open(tmp_path / run_folder.best_clip(0, "gif")) as gif:
        assert gif.size == (13, 9)  # the GIF keeps the exact size


def test_images_all_writes_every_final_clip_in_both_formats(tmp_path: Path) -> None:
    strategy = {"name": "tree-of-frames", "num_frames": 3, "strength": 0.6,
                "first_frame_candidates": 3, "branching": 2, "image_verifier": "redness"}
    job = fake_job(prompts=["a red circle moving from left to right"], verifier="clip-redness",
                   budget=120, strategy=strategy, images="all")
    run_fake(job, tmp_path / "run")
    best = results(tmp_path / "run")["prompts"][0]["best"]["candidate"]
    gifs = sorted((tmp_path / "run" / run_folder.IMAGES).rglob("*.gif"))
    mp4s = sorted((tmp_path / "run" / run_folder.IMAGES).rglob("*.mp4"))
    assert [p.stem for p in gifs] == [p.stem for p in mp4s] and len(mp4s) >= 2
    for clip in (run_folder.candidate_clip(0, best, "mp4"), run_folder.best_clip(0, "mp4")):
        frames, _ = decoded_mp4(tmp_path / "run" / clip)
        assert frames.shape == (3, 8, 8, 3)
    gif_frames = []
    with Image.open(tmp_path / "run" / run_folder.best_clip(0, "gif")) as gif:
        for index in range(gif.n_frames):
            gif.seek(index)
            gif_frames.append(np.asarray(gif.convert("RGB")))
    frames, _ = decoded_mp4(tmp_path / "run" / run_folder.best_clip(0, "mp4"))
    assert np.abs(frames.astype(int) - np.stack(gif_frames)).mean() < 24  # the same clip


def test_a_clip_format_the_writer_does_not_know_is_refused() -> None:
    with pytest.raises(ValueError, match="one of gif, mp4, not 'webm'"):
        run_folder.best_clip(0, "webm")
