"""Dask workers with two task threads overlap a unit's decoding and scoring with the next unit's
denoising, one unit per stage at a time, and give the same bits as a serial run.

The proof of overlap is an order of events, not a timing: the worker records when each unit's
compute and finish stages start and end, and its first finish does not end until another unit's
compute has started on the same worker (a worker running units one after another would never
get there). Real LocalClusters of worker processes; the fake runtime is registered inside them.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cloudpickle
import pytest
from distributed import LocalCluster
from distributed.diagnostics.plugin import WorkerPlugin
from test_dask_executor import assert_same_run

from diffsearch.api import run_job
from diffsearch.dask_executor import DaskExecutor
from diffsearch.executor import LocalExecutor
from diffsearch.job import Job
from diffsearch.runtime import (
    ComputedUnit,
    RuntimeSpec,
    UnitResult,
    WorkBatch,
    WorkerRuntime,
    get_runtime,
    register_runtime,
)
from engine_harness import fake_job, install_fake_runtime, run_fake

TESTS_DIR = str(Path(__file__).resolve().parent)
WAIT_S = 60.0
"""How long a held finish waits for what it waits for: far longer than it takes when it works."""

Event = tuple[str, str, tuple[int, int]]
"""(stage, "start" or "end", the unit's first (prompt index, candidate))."""

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import this module


class StageRecorder(WorkerRuntime):
    """The fake runtime, recording each unit's stages in the order they start and end.

    ``release_file`` None: the process's first finish waits until another unit's compute has
    started. A path: every finish waits until that file exists (the unit is held between its
    stages, computed but not handed back)."""

    def __init__(self, *args: Any, release_file: str | None) -> None:
        super().__init__(*args)
        self.release_file = release_file
        self.events: list[Event] = []
        self._changed = threading.Condition()

    def compute(self, batch: WorkBatch) -> ComputedUnit:
        self._record("compute", "start", batch)
        try:
            return super().compute(batch)
        finally:
            self._record("compute", "end", batch)

    def finish(self, unit: ComputedUnit) -> UnitResult:
        self._record("finish", "start", unit.batch)
        try:
            self._hold(unit_of(unit.batch))
            return super().finish(unit)
        finally:
            self._record("finish", "end", unit.batch)

    def _record(self, stage: str, edge: str, batch: WorkBatch) -> None:
        with self._changed:
            self.events.append((stage, edge, unit_of(batch)))
            self._changed.notify_all()

    def _hold(self, unit: tuple[int, int]) -> None:
        if self.release_file is not None:
            deadline = time.monotonic() + WAIT_S
            while not os.path.exists(self.release_file) and time.monotonic() < deadline:
                time.sleep(0.05)
            return
        with self._changed:
            if [e for e in self.events if e[:2] == ("finish", "start")] == [("finish", "start",
                                                                             unit)]:
                self._changed.wait_for(lambda: any(
                    e[:2] == ("compute", "start") and e[2] != unit for e in self.events),
                    timeout=WAIT_S)


def unit_of(batch: WorkBatch) -> tuple[int, int]:
    first = batch.tasks[0]
    return first.prompt_index, first.candidate


class StageRecorderPlugin(WorkerPlugin):
    """Registers a :class:`StageRecorder` for ``job`` in each worker process (and the plain fake
    runtime in the driver, for its pre-run checks)."""

    def __init__(self, job: Job, release_file: Path | None = None) -> None:
        self.job = job
        self.release_file = None if release_file is None else str(release_file)
        install_fake_runtime(job)

    def setup(self, worker: object) -> None:
        if TESTS_DIR not in sys.path:
            sys.path.insert(0, TESTS_DIR)
        from engine_harness import create_fake_verifier
        from fake_denoiser import FakeDenoiser

        register_runtime(StageRecorder(RuntimeSpec.from_job(self.job), FakeDenoiser(num_steps=10),
                                       create_fake_verifier, release_file=self.release_file))


@pytest.fixture()
def two_thread_workers() -> Iterator[Callable[..., LocalCluster]]:
    """Starts a LocalCluster of ``n`` worker processes of two task threads each."""
    clusters: list[LocalCluster] = []

    def start(n: int, **options: Any) -> LocalCluster:
        clusters.append(LocalCluster(n_workers=n, threads_per_worker=2, processes=True,
                                     dashboard_address="127.0.0.1:0", **options))
        return clusters[-1]

    yield start
    for cluster in clusters:
        cluster.close()


def events_by_worker(executor: DaskExecutor, spec: RuntimeSpec) -> dict[str, list[Event]]:
    return executor.client.run(lambda: get_runtime(spec).events)


def one_at_a_time(events: list[Event], stage: str) -> bool:
    """Whether every unit's ``stage`` ended before the next one's started."""
    edges = [(edge, unit) for s, edge, unit in events if s == stage]
    return len(edges) % 2 == 0 and all(
        edge == ("start", "end")[i % 2] and (i % 2 == 0 or unit == edges[i - 1][1])
        for i, (edge, unit) in enumerate(edges))


def test_a_unit_is_scored_while_the_next_one_denoises_with_the_serial_bits(
        tmp_path: Path, two_thread_workers: Callable[..., LocalCluster]) -> None:
    """On a GPU=1 worker (its units ask for half of it each: one per stage)."""
    job = fake_job(prompts=["a red circle on the left", "two blue squares"], budget="8x",
                   batch_size=2)
    run_fake(job, tmp_path / "serial", executor=LocalExecutor(overlap=False))
    spec = RuntimeSpec.from_job(job)

    cluster = two_thread_workers(1, resources={"GPU": 1})
    with DaskExecutor(scheduler=cluster.scheduler_address,
                      worker_plugins=[StageRecorderPlugin(job)]) as executor:
        result = run_job(job, tmp_path / "dask", executor=executor)
        assert "GPU=0.5 per unit" in result.executor
        assert executor.concurrency() == 2  # one unit per stage
        # a partial unit only while the worker would not denoise otherwise
        assert [executor.slots_for_partial_units(n) for n in (0, 1, 2)] == [1, 0, 0]
        (events,) = events_by_worker(executor, spec).values()

    first = events[[e[:2] for e in events].index(("finish", "start"))][2]
    during_first_finish = events[events.index(("finish", "start", first)):
                                 events.index(("finish", "end", first))]
    assert any(stage == "compute" and edge == "start" and unit != first
               for stage, edge, unit in during_first_finish)
    assert one_at_a_time(events, "compute") and one_at_a_time(events, "finish")
    units = {unit for _, _, unit in events}
    assert len(units) == 8 and len(events) == 4 * 8  # 2 prompts of 8 tasks, 2 tasks a unit
    assert_same_run(tmp_path / "dask", tmp_path / "serial", prompts=2, candidates=8)


def test_a_unit_lost_with_its_worker_after_its_compute_is_computed_again(
        tmp_path: Path, two_thread_workers: Callable[..., LocalCluster]) -> None:
    job = fake_job(budget="12x", batch_size=2, seed=5)
    run_fake(job, tmp_path / "serial", executor=LocalExecutor(overlap=False))
    spec = RuntimeSpec.from_job(job)
    release = tmp_path / "release"
    killed: list[tuple[int, tuple[int, int]]] = []

    cluster = two_thread_workers(2)
    with DaskExecutor(scheduler=cluster.scheduler_address, workers=2,
                      worker_plugins=[StageRecorderPlugin(job, release)]) as executor:
        executor.start(spec)  # connected before the killer asks the workers
        assert executor.concurrency() == 4
        assert [executor.slots_for_partial_units(n) for n in (0, 1, 2)] == [2, 1, 0]

        def kill_a_worker_holding_a_computed_unit() -> None:
            """Every worker holds its first computed unit in its finish stage until released."""
            try:
                deadline = time.monotonic() + WAIT_S
                while not killed and time.monotonic() < deadline:
                    for address, events in events_by_worker(executor, spec).items():
                        finishing = [u for s, edge, u in events if (s, edge) == ("finish", "start")
                                     and ("finish", "end", u) not in events]
                        if finishing:
                            pid = executor.client.run(os.getpid, workers=[address])[address]
                            os.kill(pid, signal.SIGKILL)
                            killed.append((pid, finishing[0]))
                            break
                    time.sleep(0.1)
            finally:
                release.touch()

        killer = threading.Thread(target=kill_a_worker_holding_a_computed_unit)
        killer.start()
        try:
            run_job(job, tmp_path / "dask", executor=executor)
        finally:
            killer.join()
        (pid, lost), = killed
        executor.client.wait_for_workers(2, timeout=60)
        assert pid not in executor.client.run(os.getpid).values()
        recomputed = [address for address, events in events_by_worker(executor, spec).items()
                      if ("compute", "end", lost) in events and ("finish", "end", lost) in events]
        assert len(recomputed) == 1
    assert_same_run(tmp_path / "dask", tmp_path / "serial", prompts=1, candidates=12)
