"""A finished run on our own local cluster shuts down without alarming warnings, even when a
worker process takes longer to exit than the nanny waits for it (a loaded model, a busy
machine): the nanny then kills it, which after a finished run is intended, not a failure."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
from dask_fixtures import FakeRuntimePlugin
from distributed.diagnostics.plugin import WorkerPlugin

from diffsearch.api import run_job
from diffsearch.dask_executor import DaskExecutor
from engine_harness import fake_job


class SlowToExitPlugin(WorkerPlugin):
    """Holds the worker's shutdown past the nanny's 4 s grace, as a big model's teardown can."""

    def teardown(self, worker: object) -> None:
        time.sleep(6)


def test_a_slow_worker_exit_after_a_finished_run_prints_no_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    job = fake_job(executor="dask", workers=1)
    executor = DaskExecutor(workers=1, threads=1, dashboard_address="127.0.0.1:0",
                            worker_plugins=[FakeRuntimePlugin(job), SlowToExitPlugin()])
    with caplog.at_level(logging.WARNING, logger="distributed"):
        run_job(job, tmp_path / "run", executor=executor)
        executor.close()
    assert (tmp_path / "run" / "results.json").is_file()
    assert not [r for r in caplog.records if "still alive" in r.getMessage()], caplog.text
