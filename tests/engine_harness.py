"""Run the real engine, store and in-process executor on the model-free FakeDenoiser.

The fake runtime is registered for the job's spec in this process, so the local executor uses it
instead of loading a model; everything else (batching, store, replay, results) is the real code.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from diffsearch.api import run_job
from diffsearch.job import Job
from diffsearch.results import RunResult
from diffsearch.runtime import RuntimeSpec, WorkerRuntime, register_runtime
from diffsearch.verifiers.base import Verifier
from diffsearch.verifiers.video import VideoVerifier
from fake_denoiser import FakeDenoiser


class RednessVerifier(Verifier):
    """Mean of the red channel: a prompt-free score with an obvious best."""

    name = "redness"
    needs_prompt = False

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return images[:, 0].mean(dim=(1, 2))


class FailsOnBrightVerifier(Verifier):
    """Raises for any batch holding a very red image: one candidate's failure, not the run's."""

    name = "fails-on-bright"

    def __init__(self, device: str | torch.device = "cpu", threshold: float = 0.9) -> None:
        super().__init__(device)
        self.threshold = threshold

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        redness = images[:, 0].mean(dim=(1, 2))
        if (redness > self.threshold).any():
            raise RuntimeError("too bright")
        return redness


class ClipRednessVerifier(VideoVerifier):
    """A video verifier whose score depends on every frame and on their order:
    sum over frames f of (f + 1) * the mean red of frame f. Records what it was shown."""

    name = "clip-redness"

    def __init__(self, device: str | torch.device = "cpu") -> None:
        super().__init__(device)
        self.seen: list[tuple[int, str]] = []
        """(number of frames, prompt) of every clip scored."""

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        self._check(images, prompts)
        self.seen.extend((images.shape[1], p) for p in prompts)
        return clip_redness(images)


def clip_redness(clips: torch.Tensor) -> torch.Tensor:
    weights = torch.arange(1, clips.shape[1] + 1, dtype=clips.dtype)
    return (clips[:, :, 0].mean(dim=(2, 3)) * weights).sum(1)


FAKE_VERIFIERS = {"redness": RednessVerifier, "fails-on-bright": FailsOnBrightVerifier,
                  "clip-redness": ClipRednessVerifier}


def create_fake_verifier(spec: str | dict[str, Any], device: str = "cpu") -> Verifier:
    if isinstance(spec, str):
        return FAKE_VERIFIERS[spec](device)
    options = dict(spec)
    return FAKE_VERIFIERS[options.pop("name")](device, **options)


def fake_job(**fields: Any) -> Job:
    defaults: dict[str, Any] = {"prompts": ["a red circle on the left"], "model": "fake",
                                "verifier": "redness", "budget": "4x", "threads": 1,
                                "executor": "local"}
    return Job.model_validate({**defaults, **fields})


def install_fake_runtime(job: Job, denoiser: FakeDenoiser | None = None) -> FakeDenoiser:
    denoiser = denoiser or FakeDenoiser(num_steps=10)
    register_runtime(WorkerRuntime(RuntimeSpec.from_job(job), denoiser, create_fake_verifier))
    return denoiser


def run_fake(job: Job, out: Path, *, denoiser: FakeDenoiser | None = None,
             **kwargs: Any) -> tuple[RunResult, FakeDenoiser]:
    denoiser = install_fake_runtime(job, denoiser)
    return run_job(job, out, **kwargs), denoiser


RUN_SPECIFIC = ("wall_seconds", "stage_seconds", "executor", "rows", "rows_per_nfe",
                "verifier_usage")
"""results.json fields that legitimately differ between two runs of one job (the rows computed
depend on how tasks were packed into work units)."""


def comparable(run_dir: Path, *also: str) -> dict:
    """results.json without the run-specific fields (and ``also``, e.g. "job" when the two
    jobs differ in a setting that must not change results, such as the batch size)."""
    data = json.loads((run_dir / "results.json").read_text())
    for key in (*RUN_SPECIFIC, *also):
        data.pop(key)
    return data


def png_bytes(run_dir: Path) -> dict[str, bytes]:
    """Every PNG of a run folder, by relative path."""
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*.png"))}
