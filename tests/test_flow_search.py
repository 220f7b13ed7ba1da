"""FK particles, EvoSearch and search over paths on the flow-matching families (SD3, FLUX),
through the real engine: ``run_job`` with the in-process executor, which loads the tiny
pipelines from their folders (``RuntimeSpec.from_job`` -> ``get_runtime``) and guides with the
learned ``shapes-clip`` verifier on their 16x16 images.

Each run must charge exactly its budget, fail no candidate, leave in the store the decisions
that make it that strategy rather than best-of-N, and be the same bits when run again:

- particles: stochastic steps (eta > 0, the flow SDE step) and resampled copies, i.e.
  candidates with a parent that start where it stopped, and copies of one particle that their
  own step noise has drawn apart;
- EvoSearch: a generation bred at step k > 0 whose children carry the step-noise mutation
  (``step_noise_std``, the SDE step's std at k) on a parent's stored state, so that their
  images differ from the parent's although every later step is deterministic;
- paths: branches re-noised back from a kept path's step by the forward process, each with
  its own draw.

Run with the flow step's noise switched off, the particles and EvoSearch checks fail.
Budgets are tiny (4 steps, a few candidates) and everything runs on one thread.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import adapter_checks as checks
import numpy as np
import pytest
import zarr

from diffsearch import run_folder
from diffsearch.api import run_job
from diffsearch.job import Job
from diffsearch.results import RunResult
from diffsearch.store import _PERTURB_CODES as PERTURB_CODE  # the perturb_kind column's codes
from diffsearch.tasks import PerturbKind
from tiny_pipelines import tiny_flux_pipeline, tiny_sd3_pipeline

_one_thread = checks.one_thread_per_module

STEPS = 4

STRATEGIES: dict[str, tuple[dict[str, Any], int]] = {
    # 4 particles x 4 steps, resampled after every step
    "particles": ({"particles": 4, "resample_every": 1, "lam": 10.0}, 4 * STEPS),
    # generation 0 of 4 from noise; generation 1 of 3 (1 elite, 2 children) bred at step 2:
    # 4 * 4 + 2 * (4 - 2)
    "evosearch": ({"schedule": [0, 2], "population": [4, 3], "elites": 1}, 4 * STEPS + 2 * 2),
    # 2 paths to step 2; one round of 2 branches re-noised to 1 and denoised to 3; then to 4:
    # 2 * (2 + 2 * 2 + 1)
    "paths": ({"n": 2, "branches": 2, "start_step": 2, "renoise_steps": 1,
               "denoise_steps": 2}, 2 * 7),
}


@pytest.fixture(scope="module", params=["sd3", "flux"])
def model(request, tmp_path_factory) -> Path:
    build: Callable[..., Path] = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline}[
        request.param]
    return build(tmp_path_factory.mktemp(request.param))


def search_job(model: Path, strategy: str) -> Job:
    options, budget = STRATEGIES[strategy]
    return Job(prompts=["a red circle", "two blue squares"], model=str(model),
               strategy={"name": strategy, **options}, budget=budget, num_steps=STEPS,
               verifier="shapes-clip", executor="local", threads=1, seed=3, images="none")


class Stored:
    """What a run's store holds (the documented store layout): its finished rows' columns,
    each row's state and, for rows that ended before the last step and were scored on their
    final image, the rolled-out clean latent."""

    def __init__(self, out: Path) -> None:
        root = out / run_folder.STORE
        group = zarr.open_group(store=str(root / "columns"), mode="r")
        done = group["done"][:].astype(bool)
        self.rows = np.flatnonzero(done)
        self.columns = {name: group[name][:][done] for name in (
            "prompt", "candidate", "start", "step", "parent", "source", "eta", "perturb_kind",
            "perturb_strength", "perturb_to")}
        self.state = zarr.open_array(store=str(root), path="state", mode="r")[:]
        self.final = zarr.open_array(store=str(root), path="final", mode="r")[:]
        self._row_of = {(p, c): r for p, c, r in zip(self.columns["prompt"],
                                                     self.columns["candidate"], self.rows)}

    def row(self, prompt: int, candidate: int) -> int:
        return self._row_of[(prompt, candidate)]


def assert_strategy_acted(strategy: str, stored: Stored) -> None:
    """The store holds the decisions that make ``strategy`` itself (module docstring)."""
    rows = stored.columns
    children = rows["parent"] >= 0
    if strategy == "particles":
        assert (rows["eta"] > 0).all()
        step_of = {(p, c): s for p, c, s in zip(rows["prompt"], rows["candidate"], rows["step"])}
        copies: dict[tuple[int, int, int], list[int]] = {}
        for p, c, start, parent in zip(rows["prompt"][children], rows["candidate"][children],
                                       rows["start"][children], rows["parent"][children]):
            # a resampled copy continues its ancestor's state from where the ancestor stopped
            assert step_of[(p, parent)] == start
            copies.setdefault((p, parent, start), []).append(stored.row(p, c))
        # copies of one particle drawn apart by their own SDE noise (the last step, to s = 0,
        # has none: there x' is the x0 estimate)
        twins = [group for (_, _, start), group in copies.items()
                 if len(group) > 1 and start < STEPS - 1]
        assert twins
        for group in twins:
            assert len({stored.state[r].tobytes() for r in group}) == len(group)
    elif strategy == "evosearch":
        mutated = rows["perturb_kind"] == PERTURB_CODE[PerturbKind.STEP_NOISE]
        assert mutated.any()
        assert (rows["start"][mutated] == 2).all() and children[mutated].all()
        for p, c, parent in zip(rows["prompt"][mutated], rows["candidate"][mutated],
                                rows["parent"][mutated]):
            # eta = 0 steps after the mutation: the child's image differs from its parent's
            # only by the step noise (step_noise_std at step 2) it was given
            assert not np.array_equal(stored.state[stored.row(p, c)],
                                      stored.final[stored.row(p, parent)])
    else:
        renoised = rows["perturb_kind"] == PERTURB_CODE[PerturbKind.RENOISE]
        assert renoised.sum() == 2 * 2 * 2  # 2 prompts x 2 kept paths x 2 branches
        assert (rows["perturb_to"][renoised] == 1).all()
        assert (rows["start"][renoised] == 1).all() and (rows["step"][renoised] == 3).all()
        branches: dict[tuple[int, int], list[int]] = {}
        for p, c, source in zip(rows["prompt"][renoised], rows["candidate"][renoised],
                                rows["source"][renoised]):
            branches.setdefault((p, source), []).append(stored.row(p, c))
        for group in branches.values():  # each branch re-noised with its own draw
            assert len({stored.state[r].tobytes() for r in group}) == len(group) == 2


def assert_same_run(first: RunResult, second: RunResult, out_first: Path,
                    out_second: Path) -> None:
    assert [p.candidates for p in first.prompts] == [p.candidates for p in second.prompts]
    assert [p.best for p in first.prompts] == [p.best for p in second.prompts]
    one, two = Stored(out_first), Stored(out_second)
    for name, values in one.columns.items():
        assert np.array_equal(values, two.columns[name]), name
    for rows, other in ((one.state, two.state), (one.final, two.final)):  # NaN: unwritten
        assert np.array_equal(rows, other, equal_nan=True)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_a_flow_model_runs_the_strategy_through_the_engine(model, strategy, tmp_path):
    job = search_job(model, strategy)
    result = run_job(job, tmp_path / "run")
    budget = STRATEGIES[strategy][1]
    assert result.failed_candidates == 0
    assert [p.nfe for p in result.prompts] == [budget, budget]
    assert result.nfe == 2 * budget
    assert all(p.best is not None and p.best.reward is not None for p in result.prompts)
    assert_strategy_acted(strategy, Stored(tmp_path / "run"))

    again = run_job(job, tmp_path / "again")
    assert_same_run(result, again, tmp_path / "run", tmp_path / "again")
