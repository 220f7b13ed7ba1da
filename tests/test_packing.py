"""Packing work from every prompt into full compute batches, and counting the rows computed.

The engine pools the ready tasks of all prompts; a work unit may hold several prompts' tasks
and the runtime writes each to its own prompt. None of it may change a bit of any result.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from dask_fixtures import FakeRuntimePlugin
from distributed import LocalCluster

from diffsearch.api import run_job
from diffsearch.dask_executor import DaskExecutor
from diffsearch.engine import WorkPool
from diffsearch.runtime import ImageWanted, RuntimeSpec, WorkBatch, get_runtime
from diffsearch.store import RunStore
from diffsearch.tasks import Perturbation, PerturbKind, ScoreOn, Task
from engine_harness import comparable, fake_job, png_bytes, run_fake
from fake_denoiser import FakeDenoiser

PROMPTS = ["a red circle on the left", "two blue squares", "a green triangle",
           "one small star", "a purple ring in the middle"]
EVOSEARCH = {"name": "evosearch", "schedule": [0, 0, 4, 6], "population": [4, 3, 3, 3]}


def rows_of(denoiser: FakeDenoiser) -> int:
    """The rows the fake's forward passes computed, padding included."""
    return sum((c.end - c.start) * denoiser.padded_rows(c.batch) for c in denoiser.calls)


def by_prompt(run_dir: Path) -> dict[str, dict]:
    """results.json's prompts by their text, without what names the prompt's index."""
    data = json.loads((run_dir / "results.json").read_text())
    prompts = {}
    for prompt in data["prompts"]:
        for candidate in prompt["candidates"]:
            candidate.pop("image")
        best = prompt["best"]
        for key in ("image", "candidate_image"):
            best.pop(key)
        prompts[prompt["prompt"]] = {k: v for k, v in prompt.items() if k != "index"}
    return prompts


def images_by_prompt(run_dir: Path) -> dict[tuple[str, str], bytes]:
    data = json.loads((run_dir / "results.json").read_text())
    text = {f"p{p['index']:05d}": p["prompt"] for p in data["prompts"]}
    return {(text[path.parent.name], path.name): path.read_bytes()
            for path in sorted((run_dir / "images").rglob("*.png"))}


def test_best_of_n_over_many_prompts_fills_its_forward_passes(tmp_path: Path) -> None:
    """5 prompts x best-of-3 on compute batches of 4: one unit per prompt computed 4 rows for
    3 candidates (1.33 rows per NFE); packed, the 15 candidates fill 4 passes of 4."""
    job = fake_job(prompts=PROMPTS, budget="3x", batch_size=8)
    result, denoiser = run_fake(job, tmp_path / "run")
    assert result.nfe == 5 * 3 * 10
    assert result.rows == rows_of(denoiser) == 16 * 10
    assert result.rows_per_nfe == pytest.approx(16 / 15)
    assert any(len(set(call.prompts)) > 1 for call in denoiser.calls)
    data = json.loads((tmp_path / "run" / "results.json").read_text())
    assert (data["rows"], data["nfe"]) == (160, 150)
    assert data["rows_per_nfe"] == pytest.approx(160 / 150, abs=1e-4)


def test_rows_count_the_rollout_and_every_pass_of_a_search(tmp_path: Path) -> None:
    job = fake_job(prompts=PROMPTS[:3], budget="8x", strategy=EVOSEARCH, batch_size=4)
    result, denoiser = run_fake(job, tmp_path / "run")
    assert result.rows == rows_of(denoiser)
    assert result.nfe <= result.rows < 1.25 * result.nfe
    store = RunStore.open(tmp_path / "run" / "store.zarr", writable=False)
    stored = sum(c.rows for i in range(3) for c in store.finished_candidates(i))
    assert stored == result.rows  # what a resumed run reads back


@pytest.mark.parametrize("strategy", [EVOSEARCH, {"name": "particles", "particles": 3,
                                                  "resample_every": 3}])
def test_the_same_results_whatever_the_batch_size_and_the_prompts_order(
        tmp_path: Path, strategy: dict) -> None:
    runs = {
        "b1": fake_job(prompts=PROMPTS, strategy=strategy, budget="8x", images="all",
                       batch_size=1),
        "b64": fake_job(prompts=PROMPTS, strategy=strategy, budget="8x", images="all",
                       batch_size=64),
        "b5": fake_job(prompts=PROMPTS, strategy=strategy, budget="8x", images="all",
                       batch_size=5),
        "reversed": fake_job(prompts=PROMPTS[::-1], strategy=strategy, budget="8x",
                             images="all", batch_size=7),
    }
    rows = {}
    for name, job in runs.items():
        result, _ = run_fake(job, tmp_path / name)
        rows[name] = result.rows
    reference = by_prompt(tmp_path / "b1")
    for name in runs:
        assert by_prompt(tmp_path / name) == reference
        assert images_by_prompt(tmp_path / name) == images_by_prompt(tmp_path / "b1")
    assert comparable(tmp_path / "b64", "job", "result_key") == \
        comparable(tmp_path / "b1", "job", "result_key")
    assert rows["b64"] < rows["b1"]  # one candidate per unit pads every pass


def test_a_unit_of_two_prompts_reads_each_source_from_its_own_prompt(tmp_path: Path) -> None:
    job = fake_job(prompts=PROMPTS[:2], budget="2x")
    run_fake(job, tmp_path / "run")  # the store, its two prompts and their candidates 0, 1
    store = RunStore.open(tmp_path / "run" / "store.zarr", writable=False)
    runtime = get_runtime(RuntimeSpec.from_job(job))

    def renoised(index: int, candidate: int, source: int) -> Task:
        return Task(prompt_index=index, prompt=PROMPTS[index], candidate=candidate,
                    seed=100 * index + candidate, start=4, end=10, source_candidate=source,
                    perturbation=Perturbation(PerturbKind.RENOISE, to_step=4))

    def unit(tasks: tuple[Task, ...]) -> WorkBatch:
        return WorkBatch(tasks=tasks, store_path=str(store.path),
                         sources=tuple(store.latent_ref(t.prompt_index, t.source_candidate)
                                       for t in tasks),
                         images=(ImageWanted.ALWAYS,) * len(tasks), to_beat=(None,) * len(tasks))

    # each reads its source from its own prompt, and the two prompts' rows share passes
    mixed = (renoised(0, 2, 0), renoised(1, 2, 0), renoised(0, 3, 1), renoised(1, 3, 1))
    together = runtime.run(unit(mixed))
    assert not np.array_equal(together.states[0], together.states[1])
    for row, (task, outcome) in enumerate(zip(mixed, together.outcomes, strict=True)):
        assert (outcome.prompt_index, outcome.candidate) == (task.prompt_index, task.candidate)
        alone = runtime.run(unit((task,)))
        assert alone.outcomes[0].reward == outcome.reward
        assert np.array_equal(alone.states[0], together.states[row])
        key = (task.prompt_index, task.candidate)
        assert np.array_equal(alone.images[key], together.images[key])
    # 6 steps of one pass of 4 rows, shared equally
    assert [o.rows for o in together.outcomes] == [6] * 4


def test_an_interrupted_packed_run_resumes_to_the_same_results(tmp_path: Path) -> None:
    job = fake_job(prompts=PROMPTS, strategy=EVOSEARCH, budget="8x", batch_size=4)
    full, _ = run_fake(job, tmp_path / "full")
    seen = []

    def interrupt(event) -> None:
        seen.append(event)
        if len(seen) == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_fake(job, tmp_path / "stopped", on_progress=interrupt)
    resumed, _ = run_fake(job, tmp_path / "stopped", resume=True)
    assert comparable(tmp_path / "stopped") == comparable(tmp_path / "full")
    assert png_bytes(tmp_path / "stopped") == png_bytes(tmp_path / "full")
    assert resumed.nfe == full.nfe and resumed.rows >= resumed.nfe


def test_the_pool_packs_across_prompts_and_splits_only_in_whole_compute_batches() -> None:
    def tasks(index: int, n: int, start: int = 0, score_on: ScoreOn = ScoreOn.FINAL
              ) -> list[Task]:
        return [Task(prompt_index=index, prompt="p", candidate=c, seed=c, start=start,
                     end=10, source_candidate=None if start == 0 else 0, score_on=score_on)
                for c in range(n)]

    pool = WorkPool(batch_size=8, compute_batch=4)
    pool.add(tasks(0, 5) + tasks(1, 6) + tasks(2, 3, start=4))
    full = pool.full_units()
    assert [[(t.prompt_index, t.candidate) for t in unit] for unit in full] == \
        [[(0, c) for c in range(5)] + [(1, 0), (1, 1), (1, 2)]]
    assert pool.full_units() == []
    # 3 left at step 0 and 3 at step 4: one slot takes one group, the oldest of the largest
    assert [len(u) for u in pool.partial_units(1)] == [3]
    assert [(t.prompt_index, t.start) for t in pool.partial_units(1)[0]] == [(2, 4)] * 3
    assert not pool

    pool.add(tasks(0, 7))
    assert [len(u) for u in pool.partial_units(4)] == [4, 3]  # two passes, two slots
    pool.add(tasks(0, 3))
    assert [len(u) for u in pool.partial_units(4)] == [3]  # one pass: never split
    # clips are assembled from one prompt's chain: those units never mix prompts
    pool.add(tasks(0, 2, start=4, score_on=ScoreOn.CLIP) + tasks(1, 2, start=4,
                                                                  score_on=ScoreOn.CLIP))
    assert [{t.prompt_index for t in u} for u in pool.partial_units(4)] == [{0}, {1}]


def test_packed_units_on_two_dask_workers_give_the_same_bits(tmp_path: Path) -> None:
    job = fake_job(prompts=PROMPTS[:3], strategy=EVOSEARCH, budget="8x", batch_size=4)
    local, _ = run_fake(job, tmp_path / "local")
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                      dashboard_address="127.0.0.1:0") as cluster, \
            DaskExecutor(scheduler=cluster.scheduler_address, workers=2,
                         worker_plugins=[FakeRuntimePlugin(job)]) as executor:
        result = run_job(job, tmp_path / "dask", executor=executor)
        assert executor.concurrency() == 2  # two workers of one thread each
    assert comparable(tmp_path / "dask") == comparable(tmp_path / "local")
    assert png_bytes(tmp_path / "dask") == png_bytes(tmp_path / "local")
    for index in range(3):
        stores = [RunStore.open(tmp_path / run / "store.zarr", writable=False)
                  for run in ("dask", "local")]
        finals = [c.candidate for c in stores[1].finished_candidates(index) if c.has_final]
        ours, theirs = (store.read_latents(index, finals, final=True).numpy()
                        for store in stores)
        assert len(finals) > 3 and np.array_equal(ours, theirs)
    assert result.nfe == local.nfe and result.rows < 1.5 * result.nfe
