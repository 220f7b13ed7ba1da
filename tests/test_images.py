"""The job's ``images``: which images a run folder gets, written by the driver off the
denoiser's path, and restored on resume when a kill lost them."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffsearch import run_folder
from diffsearch.api import SearchResult, run_job
from diffsearch.executor import Executor, LocalExecutor
from diffsearch.image_output import CANDIDATE_KEY, shown_candidate
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
