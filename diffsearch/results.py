"""A run's results: the best candidate per prompt with its lineage, written as results.json.

Everything here is read back from the store, so ``diffsearch show`` and a resumed run report
exactly what an uninterrupted run reports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffsearch import run_folder
from diffsearch.job import Job
from diffsearch.runtime import ModelInfo
from diffsearch.store import CandidateRecord, RunStore
from diffsearch.strategies.base import Strategy


@dataclass(frozen=True)
class PromptResult:
    prompt_index: int
    prompt: str
    nfe: int
    best: CandidateRecord | None
    candidates: list[CandidateRecord]

    images: str = "best"
    """The job's ``images``: which image paths exist in the run folder."""
    settings: dict[str, Any] | None = None
    """What the prompt ran with (negative prompt, seed, steps, guidance, size)."""

    @classmethod
    def from_store(cls, store: RunStore, index: int, strategy: Strategy, nfe: int,
                   images: str, settings: dict[str, Any] | None = None) -> PromptResult:
        candidates = store.finished_candidates(index) if store.has_prompt(index) else []
        winner = strategy.best()
        best = next((c for c in candidates if winner and c.candidate == winner.candidate), None)
        return cls(prompt_index=index, prompt=strategy.prompt, nfe=nfe, best=best,
                   candidates=candidates, images=images, settings=settings)

    def _candidate_image(self, candidate: CandidateRecord) -> str | None:
        """A candidate's image in the run folder; only ``images: all`` writes them."""
        if self.images != "all" or not candidate.has_final:
            return None
        return run_folder.candidate_image(self.prompt_index, candidate.candidate)

    def to_json(self) -> dict[str, Any]:
        best = None
        if self.best is not None:
            best = {
                "candidate": self.best.candidate,
                "seed": self.best.seed,
                "score": self.best.reward,
                "scores": self.best.scores,
                "image": None if self.images == "none"
                else run_folder.best_image(self.prompt_index),
                "candidate_image": self._candidate_image(self.best),
            }
        return {
            "index": self.prompt_index,
            "prompt": self.prompt,
            "settings": self.settings,
            "nfe": self.nfe,
            "best": best,
            "candidates": [
                {
                    "candidate": c.candidate, "seed": c.seed, "parent": c.parent,
                    "step": c.step, "reward": c.reward, "scores": c.scores, "nfe": c.nfe,
                    "error": c.error,
                    "image": self._candidate_image(c),
                }
                for c in self.candidates
            ],
        }


@dataclass(frozen=True)
class RunResult:
    run_dir: Path
    nfe: int
    rows: int
    """Rows the model computed for the finished candidates, padding included, counted like
    ``nfe`` (what the run cost; ``nfe`` is what the strategies charged)."""
    verifier_calls: int
    wall_seconds: float
    prompts: list[PromptResult]
    stage_seconds: dict[str, float]
    model: ModelInfo
    executor: str
    verifier_usage: dict[str, dict[str, int]]
    """What verifiers that report spending (an API judge's requests, retries, cache hits and
    tokens) spent in this process's run, by label. Unlike the counts above it is not kept in
    the store: after a resume it covers the resumed part only."""

    @property
    def rows_per_nfe(self) -> float | None:
        """Rows computed per NFE charged: 1 when every forward pass was full, more with padding
        (None for a run that charged nothing)."""
        return self.rows / self.nfe if self.nfe else None

    @property
    def failed_candidates(self) -> int:
        return sum(1 for p in self.prompts for c in p.candidates if c.error)

    def to_json(self, job: Job) -> dict[str, Any]:
        return {
            "job": job.model_dump(mode="json"),
            "result_key": job.result_key(),
            "model": self.model.to_json(),
            "executor": self.executor,
            "nfe": self.nfe,
            "rows": self.rows,
            "rows_per_nfe": None if self.rows_per_nfe is None else round(self.rows_per_nfe, 4),
            "verifier_calls": self.verifier_calls,
            "wall_seconds": round(self.wall_seconds, 3),
            "stage_seconds": {k: round(v, 4) for k, v in sorted(self.stage_seconds.items())},
            "verifier_usage": self.verifier_usage,
            "failed_candidates": self.failed_candidates,
            "prompts": [p.to_json() for p in self.prompts],
        }


def collect_results(*, run_dir: Path, job: Job, model: ModelInfo, prompts: list[PromptResult],
                    wall_seconds: float, stage_seconds: dict[str, float],
                    verifier_usage: dict[str, dict[str, int]], executor: str) -> RunResult:
    """Write ``results.json`` (the best images are in ``best/`` already:
    :class:`~diffsearch.image_output.ImageOutput` keeps them current while the run goes)."""
    result = RunResult(
        run_dir=run_dir,
        nfe=sum(c.nfe for p in prompts for c in p.candidates),
        rows=sum(c.rows for p in prompts for c in p.candidates),
        verifier_calls=sum(c.verifier_calls for p in prompts for c in p.candidates),
        wall_seconds=wall_seconds, prompts=prompts, stage_seconds=stage_seconds,
        model=model, executor=executor, verifier_usage=verifier_usage,
    )
    (run_dir / run_folder.RESULTS).write_text(json.dumps(result.to_json(job), indent=2))
    return result
