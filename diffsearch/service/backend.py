"""Where the service's searches run: one set of loaded models, a fresh session per search.

The engine drives one run per executor (``as_completed`` belongs to one engine), and a cancelled
run leaves its unfinished batches in the executor it used. So the service never hands one
executor object to two runs; what it shares is what is expensive, the loaded models:

- :class:`LocalBackend`: in this process. Each model is loaded once per device and dtype and each
  verifier once, whatever the searches' steps, sizes or verifier sets, and kept up to the
  ``--max-loaded`` limits (:mod:`diffsearch.model_cache`); each search gets its own
  :class:`~diffsearch.executor.LocalExecutor`, a thin queue over that cache. One search at a time:
  the runtime is not meant to be driven from two threads.
- :class:`DaskBackend`: one Dask cluster for the service's lifetime (started on first use, or the
  scheduler given); each search connects its own client (a ``DaskExecutor`` on the scheduler's
  address), so cancelling a search cancels exactly its futures. The workers keep the models.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from diffsearch.executor import Executor, LocalExecutor
from diffsearch.job import Job
from diffsearch.runtime import ModelInfo, RuntimeSpec, describe_model


class Backend(ABC):
    concurrency: int = 1
    """How many searches may run at once."""

    def __init__(self) -> None:
        self._infos: dict[RuntimeSpec, ModelInfo] = {}
        self._lock = threading.Lock()

    def describe(self, job: Job) -> ModelInfo:
        """The job's model as its workers see it (loading model and verifiers on first use, so
        a request naming something that cannot load is refused before it is queued)."""
        spec = RuntimeSpec.from_job(job)
        with self._lock:  # one load per spec, even under a burst of submissions
            if spec not in self._infos:
                self._infos[spec] = self._describe(spec, job)
            return self._infos[spec]

    @abstractmethod
    def _describe(self, spec: RuntimeSpec, job: Job) -> ModelInfo: ...

    @abstractmethod
    def executor(self, job: Job) -> Executor:
        """A fresh executor for one search; the caller closes it when the search ends."""

    def close(self) -> None:  # noqa: B027  (optional hook: not every backend holds resources)
        """Release shared resources (the cluster)."""

    @abstractmethod
    def describe_line(self) -> str: ...


class LocalBackend(Backend):
    concurrency = 1

    def _describe(self, spec: RuntimeSpec, job: Job) -> ModelInfo:
        return describe_model(spec)

    def executor(self, job: Job) -> Executor:
        return LocalExecutor()

    def describe_line(self) -> str:
        return "in-process executor, models kept loaded in this process"


class DaskBackend(Backend):
    """``worker_plugins`` are set up on every worker before a model loads (see DaskExecutor)."""

    def __init__(self, *, workers: int | None, scheduler: str | None, threads: int,
                 concurrency: int = 1, worker_plugins: Sequence[Any] = ()) -> None:
        super().__init__()
        self.workers = workers
        self.threads = threads
        self.concurrency = concurrency
        self.worker_plugins = tuple(worker_plugins)
        self._address = scheduler
        self._cluster_owner: Executor | None = None
        self._start_lock = threading.Lock()

    def _describe(self, spec: RuntimeSpec, job: Job) -> ModelInfo:
        session = self.executor(job)
        try:
            return session.start(spec)
        finally:
            session.close()

    def executor(self, job: Job) -> Executor:
        from diffsearch.dask_executor import DaskExecutor

        with self._start_lock:
            if self._address is None:  # start the service's cluster once, keep it
                owner = DaskExecutor(workers=self.workers, threads=self.threads,
                                     worker_plugins=self.worker_plugins)
                owner.start(RuntimeSpec.from_job(job))
                self._cluster_owner = owner
                self._address = owner.client.scheduler.address
        return DaskExecutor(workers=self.workers, scheduler=self._address, threads=self.threads,
                            worker_plugins=self.worker_plugins)

    @property
    def scheduler_address(self) -> str | None:
        """The cluster's scheduler (None until the first search starts the service's own)."""
        return self._address

    def close(self) -> None:
        if self._cluster_owner is not None:
            self._cluster_owner.close()
            self._cluster_owner = None

    def describe_line(self) -> str:
        where = self._address or "a local cluster started on first use"
        return f"dask executor at {where}, {self.concurrency} search(es) at a time"
