"""The engine, store and in-process executor, exercised on the model-free fake denoiser."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffsearch.engine import BudgetExceededError
from diffsearch.errors import StoreError
from diffsearch.store import RunStore
from diffsearch.strategies import registry
from diffsearch.strategies.best_of_n import BestOfN
from diffsearch.tasks import ScoreOn, Task
from engine_harness import comparable, fake_job, png_bytes, run_fake
from fake_denoiser import FakeDenoiser


def test_best_of_n_end_to_end(tmp_path: Path) -> None:
    job = fake_job(prompts=["a red circle on the left", "two blue squares"], budget="6x",
                   images="all")
    result, denoiser = run_fake(job, tmp_path / "run")

    data = json.loads((tmp_path / "run" / "results.json").read_text())
    assert data["nfe"] == 2 * 6 * denoiser.num_steps == result.nfe
    assert data["verifier_calls"] == 12
    assert data["wall_seconds"] > 0
    assert set(data["stage_seconds"]) >= {"denoise", "decode", "score", "store", "wait"}
    for prompt in data["prompts"]:
        assert len(prompt["candidates"]) == 6
        rewards = [c["reward"] for c in prompt["candidates"]]
        best = prompt["best"]
        assert best["score"] == max(rewards)
        assert best["scores"]["redness"] == best["score"]
        assert (tmp_path / "run" / best["image"]).is_file()
        for candidate in prompt["candidates"]:
            assert (tmp_path / "run" / candidate["image"]).is_file()
            assert candidate["step"] == denoiser.num_steps and candidate["parent"] is None
        seeds = {c["seed"] for c in prompt["candidates"]}
        assert len(seeds) == 6
    # each prompt was encoded once, although its candidates ran in several batches
    assert sorted(set(denoiser.encoded)) == sorted(job.prompts)


def test_same_job_same_bits_whatever_the_batch_size(tmp_path: Path) -> None:
    runs = {}
    for name, batch_size in (("a", 8), ("b", 8), ("c", 1), ("d", 3)):
        run_fake(fake_job(batch_size=batch_size, budget="8x"), tmp_path / name)
        runs[name] = tmp_path / name
    reference = comparable(runs["a"], "job", "result_key")
    for name in "bcd":
        assert comparable(runs[name], "job", "result_key") == reference
        assert png_bytes(runs[name]) == png_bytes(runs["a"])
    latents = {name: RunStore.open(path / "store.zarr", writable=False)
               .read_latents(0, range(8), final=True) for name, path in runs.items()}
    for name in "bcd":
        assert np.array_equal(latents[name].numpy(), latents["a"].numpy())


def test_the_fake_decodes_a_row_to_the_same_bits_in_any_batch() -> None:
    """The batch-size test above compares images decoded in batches of 8, 3 and 1; rows of 27
    values are not a multiple of any SIMD width, so a batched sigmoid would round some of them
    differently from the row alone."""
    denoiser = FakeDenoiser(latent_shape=(3, 3, 3))
    latents = 3 * torch.randn(8, 3, 3, 3, generator=torch.Generator().manual_seed(0))
    alone = torch.cat([denoiser.decode(latents[i : i + 1]) for i in range(8)])
    assert torch.equal(denoiser.decode(latents), alone)
    assert torch.equal(denoiser.decode(latents[2:5]), alone[2:5])


def test_batch_size_controls_work_units(tmp_path: Path) -> None:
    _, denoiser = run_fake(fake_job(batch_size=3, budget="8x"), tmp_path / "run")
    assert [c.batch for c in denoiser.calls] == [3, 3, 2]


def test_interrupted_run_resumes_to_the_same_results(tmp_path: Path) -> None:
    job = fake_job(prompts=["p one", "p two"], batch_size=2, budget="8x")
    run_fake(job, tmp_path / "full")

    seen = []

    def interrupt_after_three_batches(event) -> None:
        seen.append(event)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_fake(job, tmp_path / "stopped", on_progress=interrupt_after_three_batches)
    finished = sum(len(RunStore.open(tmp_path / "stopped" / "store.zarr", writable=False)
                       .finished_candidates(i)) for i in (0, 1))
    assert finished == 6

    with pytest.raises(StoreError, match="--resume"):
        run_fake(job, tmp_path / "stopped")
    _, denoiser = run_fake(job, tmp_path / "stopped", resume=True)
    assert sum(call.batch for call in denoiser.calls) == 16 - finished
    assert comparable(tmp_path / "stopped") == comparable(tmp_path / "full")
    assert png_bytes(tmp_path / "stopped") == png_bytes(tmp_path / "full")


def test_resume_refuses_a_different_job(tmp_path: Path) -> None:
    run_fake(fake_job(seed=1), tmp_path / "run")
    with pytest.raises(StoreError, match="different job"):
        run_fake(fake_job(seed=2), tmp_path / "run", resume=True)


def test_a_failing_verifier_fails_one_candidate_not_the_run(tmp_path: Path) -> None:
    reference, _ = run_fake(fake_job(budget="8x"), tmp_path / "ref")
    rewards = sorted(c.reward for c in reference.prompts[0].candidates)
    threshold = (rewards[-1] + rewards[-2]) / 2  # only the reddest candidate makes it raise

    job = fake_job(budget="8x", verifier={"name": "fails-on-bright", "threshold": threshold})
    result, _ = run_fake(job, tmp_path / "run")
    failed = [c for c in result.prompts[0].candidates if c.error]
    assert len(failed) == 1 and "too bright" in failed[0].error
    assert failed[0].reward is None
    assert result.prompts[0].best.reward == rewards[-2]
    data = json.loads((tmp_path / "run" / "results.json").read_text())
    assert data["failed_candidates"] == 1


class NaNAfterFiveSteps(FakeDenoiser):
    def denoise(self, latents, conds, start, end, **kwargs):
        result = super().denoise(latents, conds, start, end, **kwargs)
        if end > 5:
            result.latents[0] = float("nan")
        return result


def test_nan_latents_are_reported_not_scored(tmp_path: Path) -> None:
    result, _ = run_fake(fake_job(budget="4x", batch_size=4), tmp_path / "run",
                         denoiser=NaNAfterFiveSteps(num_steps=10))
    candidates = result.prompts[0].candidates
    assert [c.error is not None for c in candidates] == [True, False, False, False]
    assert "NaN" in candidates[0].error and candidates[0].reward is None
    assert result.prompts[0].best.candidate != 0


class Overspender(BestOfN):
    name = "overspender"

    def ask(self) -> list[Task]:
        tasks = super().ask()
        return tasks + [Task(prompt_index=0, prompt=self.prompt, candidate=99, seed=1, start=0,
                             end=self.num_steps, score_on=ScoreOn.FINAL)] if tasks else tasks


def test_a_strategy_cannot_overspend(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(registry._STRATEGIES, "overspender", f"{__name__}:Overspender")
    with pytest.raises(BudgetExceededError):
        run_fake(fake_job(strategy={"name": "overspender"}), tmp_path / "run")


def test_progress_events_count_up_to_the_budget(tmp_path: Path) -> None:
    events = []
    run_fake(fake_job(budget="4x", batch_size=1), tmp_path / "run", on_progress=events.append)
    assert [e.nfe_done for e in events] == [10, 20, 30, 40]
    assert all(e.nfe_total == 40 for e in events)
    assert events[-1].best_reward == max(o.reward for e in events for o in e.outcomes)
