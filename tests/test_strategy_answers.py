"""The strategy's side of the contract, as the engine enforces and reports it: one budget check
for every strategy, and one "best so far" per prompt. The strategy's ``best()`` is the answer;
the engine's progress, the service's search record and ``diffsearch show`` on a stopped run all
follow the same rule (``best_of`` over the answers), so an x0-estimate score, a partial clip or
a first frame judged by the image verifier never shows up as the best."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from diffsearch.engine import BudgetExceededError, ProgressEvent
from diffsearch.pipelines.base import DenoiseResult
from diffsearch.run_reading import best_per_prompt
from diffsearch.service.events import EventLog
from diffsearch.service.searches import SearchRecord
from diffsearch.store import RunStore
from diffsearch.strategies import registry
from diffsearch.strategies.common import RoundStrategy
from diffsearch.tasks import Outcome, ScoreOn, Task
from engine_harness import fake_job, run_fake
from fake_denoiser import FakeDenoiser

CLIP_PROMPT = "a red circle moving from left to right"
JOBS = {
    "best-of-n": {},
    "evosearch": {"strategy": {"name": "evosearch", "schedule": [0, 0, 4, 6],
                               "population": [4, 3, 3, 3]}},
    "ttsnap": {"strategy": {"name": "ttsnap"}},
    "zero-order": {"strategy": {"name": "zero-order", "neighbours": 2}},
    "paths": {"strategy": {"name": "paths", "n": 2}},
    "particles": {"strategy": {"name": "particles", "particles": 3, "resample_every": 3}},
    "tree-of-frames": {"prompts": [CLIP_PROMPT], "verifier": "clip-redness", "budget": 120,
                       "strategy": {"name": "tree-of-frames", "strength": 0.6,
                                    "first_frame_candidates": 3, "branching": 2,
                                    "image_verifier": "redness"}},
    "linear-clips": {"prompts": [CLIP_PROMPT], "verifier": "clip-redness", "budget": 70,
                     "strategy": {"name": "linear-clips", "strength": 0.6}},
}


def test_every_registered_strategy_is_covered() -> None:
    assert set(JOBS) == set(registry.strategy_names())


class RedX0Denoiser(FakeDenoiser):
    """x0 estimates before the last step decode fully red: the redness verifier scores them
    higher than any final image."""

    def denoise(self, latents, conds, start, end, **kwargs) -> DenoiseResult:
        result = super().denoise(latents, conds, start, end, **kwargs)
        if end < self.num_steps:
            result.x0[:, 0] = 20.0
        return result


def rewards_by_score_on(run_dir: Path) -> dict[str, list[float]]:
    """The stored rewards of final images, and of everything else (x0 estimates)."""
    store = RunStore.open(run_dir / "store.zarr", writable=False)
    finals = [c.reward for c in store.finished_candidates(0) if c.has_final]
    others = [c.reward for c in store.finished_candidates(0)
              if not c.has_final and c.reward is not None]
    return {"final": finals, "other": others}


def test_x0_scores_never_count_as_the_progress_best(tmp_path: Path) -> None:
    events: list[ProgressEvent] = []
    job = fake_job(budget="8x", batch_size=4, strategy={"name": "ttsnap"})
    result, _ = run_fake(job, tmp_path / "run", denoiser=RedX0Denoiser(num_steps=10),
                         on_progress=events.append)
    rewards = rewards_by_score_on(tmp_path / "run")
    assert min(rewards["other"]) > max(rewards["final"])  # the x0 estimates do score higher
    best = result.prompts[0].best
    assert best is not None and best.reward == max(rewards["final"])
    assert all(e.best_reward is None or e.best_reward <= best.reward for e in events)
    assert events[0].best is None  # the first round scores x0 estimates only
    assert events[-1].best.candidate == best.candidate


@pytest.mark.parametrize("name", sorted(JOBS))
def test_the_progress_best_is_the_strategy_s_best(name: str, tmp_path: Path) -> None:
    events: list[ProgressEvent] = []
    result, _ = run_fake(fake_job(**{"budget": "8x", "batch_size": 2, **JOBS[name]}),
                         tmp_path / "run", on_progress=events.append)
    prompt = result.prompts[0]
    assert prompt.best is not None
    assert events[-1].best is not None and events[-1].best.candidate == prompt.best.candidate
    assert events[-1].best_reward == prompt.best.reward
    rewards = [e.best_reward for e in events if e.best_reward is not None]
    assert rewards == sorted(rewards)  # it only ever improves, up to the answer
    if name not in ("tree-of-frames", "linear-clips"):  # clips: see the next test
        finals = {c.candidate for c in prompt.candidates if c.has_final}
        assert all(e.best.candidate in finals for e in events if e.best is not None)


def test_partial_clips_and_first_frames_are_not_the_best_of_a_tree(tmp_path: Path) -> None:
    events: list[ProgressEvent] = []
    result, _ = run_fake(fake_job(**{"batch_size": 1, **JOBS["tree-of-frames"]}),
                         tmp_path / "run", on_progress=events.append)
    last_frames = {5, 6}  # 3 first frames, 2 partial clips, then the 2 finished clips
    assert result.prompts[0].best.candidate in last_frames
    assert [e.best is not None for e in events] == [False] * 5 + [True] * 2
    assert all(e.best.candidate in last_frames for e in events if e.best is not None)


def test_the_service_record_follows_the_engine_s_best(tmp_path: Path) -> None:
    loop = asyncio.new_event_loop()
    try:
        job = fake_job(budget="8x", batch_size=4, strategy={"name": "ttsnap"})
        record = SearchRecord(id="s000001", job=job, model_name="fake",
                              run_dir=tmp_path / "run", events=EventLog(loop))
        events: list[ProgressEvent] = []

        def both(event: ProgressEvent) -> None:
            events.append(event)
            record.on_progress(event)

        result, _ = run_fake(job, tmp_path / "run", denoiser=RedX0Denoiser(num_steps=10),
                             on_progress=both)
    finally:
        loop.close()
    best = result.prompts[0].best
    assert record.best[0].candidate == best.candidate and record.best[0].score == best.reward
    changes, previous = [], None
    for event in events:
        if event.best is not None and event.best.candidate != previous:
            changes.append((event.nfe_done, event.best_reward))
            previous = event.best.candidate
    assert record.history[0] == changes  # a point each time the engine's best changed
    assert max(score for _, score in changes) == best.reward  # never an x0 estimate's


def test_show_on_a_stopped_run_takes_only_final_images_by_the_guiding_verifier(
        tmp_path: Path) -> None:
    run_fake(fake_job(**{"batch_size": 1, **JOBS["tree-of-frames"]}), tmp_path / "tree")
    (tmp_path / "tree" / "results.json").unlink()  # as if the driver died before writing it
    (row,) = best_per_prompt(tmp_path / "tree")
    # the first frames have final images, but the image verifier scored them, not the job's
    assert row["finished"] is False and row["score"] is None and row["image"] is None

    run_fake(fake_job(budget="8x", strategy={"name": "ttsnap"}), tmp_path / "snap",
             denoiser=RedX0Denoiser(num_steps=10))
    finished = json.loads((tmp_path / "snap" / "results.json").read_text())["prompts"][0]
    (tmp_path / "snap" / "results.json").unlink()
    (row,) = best_per_prompt(tmp_path / "snap")
    assert (row["candidate"], row["score"]) == (finished["best"]["candidate"],
                                                finished["best"]["score"])


# ---- the budget -------------------------------------------------------------------------------
class Overplanner(RoundStrategy):
    """Round-based, and asks twice what its budget pays for."""

    name = "overplanner"

    def _next_round(self) -> list[Task]:
        return [self._task(start=0, end=self.num_steps, score_on=ScoreOn.FINAL)
                for _ in range(2 * self.budget_nfe // self.num_steps)]

    def _receive(self, tasks: Sequence[Task], outcomes: Sequence[Outcome]) -> None:
        self._finish()


class Twice(Overplanner):
    name = "twice"

    def _next_round(self) -> list[Task]:
        task = self._task(start=0, end=self.num_steps, score_on=ScoreOn.FINAL)
        return [task, task]


@pytest.mark.parametrize("name", ["overplanner", "twice"])
def test_the_engine_refuses_a_strategy_bug_for_round_strategies_too(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry._STRATEGIES, "overplanner", f"{__name__}:Overplanner")
    monkeypatch.setitem(registry._STRATEGIES, "twice", f"{__name__}:Twice")
    error = BudgetExceededError if name == "overplanner" else RuntimeError
    match = "over its budget of 40" if name == "overplanner" else "asked one candidate twice"
    with pytest.raises(error, match=match):
        run_fake(fake_job(strategy={"name": name}), tmp_path / "run")
