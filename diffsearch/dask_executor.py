"""The Dask executor: work units run on a cluster of worker processes, pipelined in two stages.

By default it starts a ``LocalCluster`` of worker processes on this machine: one per GPU (each
worker sees only its own GPU through ``CUDA_VISIBLE_DEVICES`` and advertises the resource
``GPU=1``), else one per ``threads`` CPU cores. Given a scheduler address it connects to a running
cluster instead (see docs/cluster.md); workers there need nothing but ``diffsearch`` installed,
because the model-loading plugin travels from the client.

Each worker loads the job's model and verifiers once, in a worker plugin, and keeps them for every
task; a worker that is restarted (after a crash or a kill) gets the plugin again from the
scheduler. A task is :func:`run_unit`: a pure function of small records (ids, seeds, where its
source latents are in the Zarr store) that reads its sources from the store and returns its
outcomes and new latents, which the client fetches from the worker directly. So the scheduler
never carries tensors, only the driver writes the store, and when a worker is lost the scheduler
simply runs its tasks again elsewhere, with the same seeds and therefore the same bits.

A worker with two task threads (GPU workers of the local cluster) is a two-stage pipeline like
the in-process executor: one unit is decoded and scored while the next one denoises, each stage
one unit at a time (:func:`run_unit`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import dask
import torch
from dask.system import CPU_COUNT
from distributed import Client, Future, KilledWorker, LocalCluster, Nanny, as_completed
from distributed.diagnostics.plugin import WorkerPlugin

from diffsearch.errors import DiffsearchError
from diffsearch.executor import Executor
from diffsearch.runtime import (
    ModelInfo,
    RuntimeSpec,
    UnitResult,
    WorkBatch,
    describe_model,
    get_runtime,
    pin_threads,
)

SLOTS_REFRESH_S = 5.0
"""How often :meth:`DaskExecutor.concurrency` asks the scheduler again (workers may join)."""
RUNTIME_PLUGIN = "diffsearch-runtime"
"""The worker plugin's name: registering a new spec under it replaces the previous job's plugin."""
STAGES = 2
"""Units a worker usefully holds: one denoising, one being decoded and scored (:func:`run_unit`).
It is the task threads the local cluster gives a GPU worker; more threads would only wait."""
GPU_PER_UNIT = 1 / STAGES
"""What a unit asks of the ``GPU`` resource, so a ``GPU=1`` worker holds both stages' units."""


class ClusterError(DiffsearchError):
    """The cluster cannot be reached or keeps losing workers; the message says what to check."""


class RuntimePlugin(WorkerPlugin):
    """Loads a job's model and verifiers into a worker process once, before it runs any task.

    The load runs in the worker's task thread pool, not on its event loop: a model load takes
    seconds to minutes, and a blocked event loop misses heartbeats. (Each task thread pins
    torch's intra-op thread count again itself: :func:`run_unit`.)
    """

    def __init__(self, spec: RuntimeSpec) -> None:
        self.spec = spec

    async def setup(self, worker: Any) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(worker.executor, _load, self.spec)


_LOAD_ERRORS: dict[RuntimeSpec, DiffsearchError] = {}
"""This worker process's load error per spec, for the driver to collect with ``client.run``."""


def _load(spec: RuntimeSpec) -> None:
    """Load ``spec``'s runtime; keep a user error (missing weights, bad path) for the driver.

    A plugin that raises is logged with a traceback by every worker, then raised again by the
    driver: a typo in a model path would print one traceback per worker. The driver reports the
    kept error once, in one line. Anything else is a bug and is raised (and logged) as usual.
    """
    try:
        get_runtime(spec)
    except DiffsearchError as error:
        _LOAD_ERRORS[spec] = error
    else:
        _LOAD_ERRORS.pop(spec, None)


def _load_error(spec: RuntimeSpec) -> DiffsearchError | None:
    return _LOAD_ERRORS.get(spec)


_DENOISING = threading.Lock()
"""Held by this worker process's unit in its compute stage (starting latents, denoising)."""
_SCORING = threading.Lock()
"""Held by this worker process's unit in its finish stage (decoding, scoring, pixels)."""


def run_unit(spec: RuntimeSpec, batch: WorkBatch) -> UnitResult:
    """A work unit's task: its compute stage, then its finish stage, each under this worker
    process's lock of that stage (:meth:`WorkerRuntime.compute`, :meth:`WorkerRuntime.finish`).

    With two task threads a worker is a two-stage pipeline: while one thread's unit is decoded
    and scored, the other thread's unit denoises, so the denoiser does not idle while a verifier
    runs. No stage ever holds two units, so each stage runs its units one after another, as a
    serial run does, and gives the same bits. The unit between its stages (states, x0
    estimates) never leaves the task: when a worker is lost, its tasks are run again elsewhere,
    computing included. With one task thread the locks are never contended.

    Each task thread pins the job's intra-op thread count itself: a thread that did not load
    the model would otherwise multiply matrices (MKL) on as many threads as the machine has
    cores, whatever the job's ``threads``.
    """
    pin_threads(spec.threads)
    with _DENOISING:
        runtime = get_runtime(spec)  # under the lock: a runtime dropped from the cache loads once
        unit = runtime.compute(batch)
    with _SCORING:
        return runtime.finish(unit)


class IgnoreInterruptPlugin(WorkerPlugin):
    """Makes the workers of our own local cluster ignore SIGINT.

    Ctrl-C in a terminal reaches the whole process group, worker processes included. Without
    this they die mid-batch with a traceback each while the driver is still closing them; with
    it, the driver alone handles the interrupt and shuts its workers down in order. Workers on
    other machines keep the default (their own Ctrl-C stops them).
    """

    name = "diffsearch-ignore-interrupt"

    def setup(self, worker: Any) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # plugins are set up in the main thread


class DaskExecutor(Executor):
    """Runs work batches on Dask workers; see the module docstring.

    ``workers``: how many worker processes to start (own cluster), or how many to wait for
    before starting (``scheduler`` given). ``threads``: the job's intra-op CPU threads per worker,
    used to size the default local cluster. ``profile``: write a Dask performance report (HTML)
    to this path when the executor is closed. ``retries``: how often a batch that raised is run
    again (transient I/O on a shared filesystem); lost workers are handled by the scheduler on
    its own. ``worker_plugins`` are set up on every worker before the model is loaded (embedding
    applications use them to register their own runtimes or environment).
    """

    def __init__(
        self,
        *,
        workers: int | None = None,
        scheduler: str | None = None,
        threads: int = 2,
        profile: str | None = None,
        retries: int = 1,
        dashboard_address: str | None = ":8787",
        connect_timeout: float = 30.0,
        worker_timeout: float = 300.0,
        worker_plugins: Sequence[WorkerPlugin] = (),
    ) -> None:
        if workers is not None and workers < 1:
            raise ClusterError(f"workers must be at least 1, got {workers}")
        if profile is not None and importlib.util.find_spec("bokeh") is None:
            raise ClusterError("a Dask performance report needs bokeh: pip install 'bokeh>=3.1'")
        self.workers = workers
        self.scheduler = scheduler
        self.threads = threads
        self.profile = profile
        self.retries = retries
        self.dashboard_address = dashboard_address
        self.connect_timeout = connect_timeout
        self.worker_timeout = worker_timeout
        self.worker_plugins = tuple(worker_plugins)
        self._cluster: LocalCluster | None = None
        self._client: Client | None = None
        self._spec: RuntimeSpec | None = None
        self._resources: dict[str, float] | None = None
        self._pending: dict[str, tuple[Future, WorkBatch]] = {}
        self._capacity: tuple[float, _Capacity] | None = None
        """(when it was read, what the cluster holds): :meth:`concurrency`."""
        self._finished: as_completed | None = None
        self._report = contextlib.ExitStack()

    # ---- connection ---------------------------------------------------------------------------
    @property
    def client(self) -> Client:
        """The connected client (after :meth:`start`): for dashboards, diagnostics, tests."""
        if self._client is None:
            raise RuntimeError("start() the executor first")
        return self._client

    def start(self, spec: RuntimeSpec) -> ModelInfo:
        """Connect (or start the local cluster), load the model on every worker, describe it.

        A worker's load error (missing weights, unknown model) is raised here, before any work.
        """
        if self._client is None:
            self._client = self._connect()
            self._finished = as_completed(loop=self._client.loop)
            if self._cluster is not None:
                self._client.register_plugin(IgnoreInterruptPlugin())
            for plugin in self.worker_plugins:
                self._client.register_plugin(plugin)
            self._wait_for_workers()
            self._resources = {"GPU": GPU_PER_UNIT} if self._workers_have_gpus() else None
            if self.profile:
                from distributed import performance_report

                self._report.enter_context(performance_report(filename=self.profile))
            print(f"diffsearch: {self.describe()}", file=sys.stderr)
        self._cancel_pending()  # a previous run on this executor may have stopped early
        self._spec = spec
        try:
            self._client.register_plugin(RuntimePlugin(spec), name=RUNTIME_PLUGIN)
            errors = [e for e in self._client.run(_load_error, spec).values() if e is not None]
            if errors:
                raise errors[0]
        except BaseException:
            # workers that join later would keep failing on it
            self._client.unregister_worker_plugin(RUNTIME_PLUGIN)
            raise
        future = self._client.submit(describe_model, spec, key=f"describe-model-{uuid.uuid4().hex}",
                                     pure=False, resources=self._resources)
        return future.result()

    def _connect(self) -> Client:
        if self.scheduler is None:
            self._cluster = _local_cluster(self.workers, self.threads, self.dashboard_address)
            return Client(self._cluster)
        try:
            return Client(self.scheduler, timeout=self.connect_timeout)
        except (TimeoutError, OSError) as error:
            raise ClusterError(f"cannot reach the Dask scheduler at {self.scheduler} "
                               f"({type(error).__name__}: {error}); is `dask scheduler` running "
                               f"there?") from None

    def _wait_for_workers(self) -> None:
        wanted = self.workers or 1
        try:
            self.client.wait_for_workers(wanted, timeout=self.worker_timeout)
        except TimeoutError:
            have = len(self.client.scheduler_info(n_workers=-1)["workers"])
            raise ClusterError(
                f"only {have} of {wanted} Dask worker(s) joined {self._address()} within "
                f"{self.worker_timeout:g} s; start them with `dask worker {self._address()} "
                f"--nthreads 1` (one per GPU: `--nthreads {STAGES} --resources GPU=1`)"
            ) from None

    def _workers_have_gpus(self) -> bool:
        """GPU work asks for the resource ``GPU`` when the cluster's workers advertise it."""
        workers = self.client.scheduler_info(n_workers=-1)["workers"].values()
        return any(info.get("resources", {}).get("GPU", 0) >= 1 for info in workers)

    def _address(self) -> str:
        return self.client.scheduler.address if self._client else str(self.scheduler)

    # ---- work ---------------------------------------------------------------------------------
    def submit(self, batch: WorkBatch) -> None:
        if self._spec is None:
            raise RuntimeError("start() the executor first")
        if batch.tasks:
            first = batch.tasks[0]
            key = f"denoise-p{first.prompt_index}-c{first.candidate}-{uuid.uuid4().hex}"
        else:
            key = f"render-{uuid.uuid4().hex}"
        future = self.client.submit(run_unit, self._spec, batch, key=key, pure=False,
                                    retries=self.retries, resources=self._resources)
        self._pending[future.key] = (future, batch)
        assert self._finished is not None
        self._finished.add(future)

    def concurrency(self) -> int:
        """The units the cluster runs at once: per worker, its task threads, at most
        :data:`STAGES` and, when tasks need a GPU, as many as its ``GPU`` resource admits."""
        return self._read_capacity().slots

    def slots_for_partial_units(self, in_flight: int) -> int:
        """A partial unit only for a worker that would otherwise not denoise: one per worker
        beyond ``in_flight``. A worker's second slot is its pipeline's next stage, and a partial
        unit sent early to fill it would pad passes that waiting for more tasks fills (as in
        :meth:`LocalExecutor.slots_for_partial_units`)."""
        return max(0, self._read_capacity().denoisers - in_flight)

    def _read_capacity(self) -> _Capacity:
        """Read again at most every ``SLOTS_REFRESH_S`` seconds, so workers that join a running
        cluster get work too."""
        now = time.monotonic()
        if self._capacity is None or now - self._capacity[0] > SLOTS_REFRESH_S:
            workers = self.client.scheduler_info(n_workers=-1)["workers"].values()
            slots = [_unit_slots(w, gpu=bool(self._resources)) for w in workers]
            self._capacity = (now, _Capacity(slots=max(1, sum(slots)),
                                             denoisers=max(1, sum(1 for n in slots if n))))
        return self._capacity[1]

    def as_completed(self) -> Iterator[tuple[WorkBatch, UnitResult]]:
        if self._finished is None:
            raise RuntimeError("start() the executor first")
        for future in self._finished:
            _, batch = self._pending.pop(future.key)
            try:
                result = future.result()
            except KilledWorker as error:
                raise ClusterError(
                    f"batch {future.key}: {error.allowed_failures + 1} workers died while "
                    f"running it (last {error.last_worker.address}), often from running out of "
                    f"memory; use fewer workers or a smaller batch_size, then --resume") from None
            yield batch, result

    # ---- lifecycle ----------------------------------------------------------------------------
    def close(self) -> None:
        """Cancel what is still queued, write the profile, release the client and own cluster.

        The driver records finished candidates in the store as they come back (and flushes it
        when the run stops), so an interrupted run resumes.
        """
        client, cluster = self._client, self._cluster
        self._client = self._cluster = None
        self._spec = None
        self._capacity = None
        try:
            if client is not None:
                try:
                    self._cancel_pending(client)
                    self._report.close()
                finally:
                    self._finished = None
                    client.close()
        finally:
            if cluster is not None:
                with _quiet_nanny_kills():
                    cluster.close()

    def _cancel_pending(self, client: Client | None = None) -> None:
        pending = [future for future, _ in self._pending.values()]
        self._pending.clear()
        if pending:
            (client or self.client).cancel(pending, force=True)
            self._finished = as_completed(loop=(client or self.client).loop)

    def describe(self) -> str:
        if self._client is None:
            return "dask executor (not started)"
        workers = self._client.scheduler_info(n_workers=-1)["workers"]
        where = "local cluster" if self._cluster is not None else "cluster"
        gpu = f", GPU={GPU_PER_UNIT:g} per unit" if self._resources else ""
        # an own cluster started without a dashboard still serves HTTP (health, metrics)
        dashboard = "" if self._cluster is not None and self.dashboard_address is None \
            else f", dashboard {self._client.dashboard_link}"
        return (f"dask {where} at {self._client.scheduler.address}, {len(workers)} worker(s)"
                f"{gpu}{dashboard}")


class _Capacity(NamedTuple):
    slots: int
    """Units the cluster runs at once, pipeline stages included."""
    denoisers: int
    """Workers that take units: each denoises one unit at a time."""


def _unit_slots(worker: dict[str, Any], *, gpu: bool) -> int:
    """The units one worker (its scheduler info) runs at once."""
    slots = min(int(worker.get("nthreads", 1)), STAGES)
    if gpu:
        slots = min(slots, int(worker.get("resources", {}).get("GPU", 0) / GPU_PER_UNIT))
    return slots


def _local_cluster(workers: int | None, threads: int, dashboard_address: str | None
                   ) -> LocalCluster:
    """One worker process per GPU, with a task thread per pipeline stage (:func:`run_unit`),
    else one per ``threads`` cores, with one task thread.

    On the CPU both stages would run torch on the same ``threads`` cores: the two OpenMP
    teams (one per task thread) would double the threads at work on them, and there is no idle
    device for the overlap to fill. A GPU worker's denoising runs on its GPU, so its finish
    stage has the CPU to itself.
    """
    gpus = _visible_gpus()
    options: dict[str, Any] = {"processes": True, "threads_per_worker": STAGES if gpus else 1,
                               "dashboard_address": dashboard_address}
    if dashboard_address is None:  # the scheduler's HTTP server would still take port 8787
        options.update(dashboard_address="127.0.0.1:0", scheduler_kwargs={"dashboard": False})
    with _glibc_default_trimming():
        if not gpus:
            count = workers or max(1, CPU_COUNT // threads)
            return LocalCluster(n_workers=count, **options)
        count = workers or len(gpus)
        # n_workers=0 would leave each worker the "auto" share of one core's memory: split it
        cluster = LocalCluster(n_workers=0, resources={"GPU": 1}, memory_limit=1 / count,
                               **options)
        template = cluster.new_spec["options"]
        for index in range(count):
            env = {**template.get("env", {}), "CUDA_VISIBLE_DEVICES": gpus[index % len(gpus)]}
            cluster.worker_spec[f"gpu-{index}"] = {"cls": Nanny,
                                                   "options": {**template, "env": env}}
        cluster.scale(count)
        cluster.wait_for_workers(count)  # inside the context: the nannies are made meanwhile
        return cluster


_MALLOC_TRIM = "MALLOC_TRIM_THRESHOLD_"
_USER_MALLOC_TRIM = os.environ.get(_MALLOC_TRIM)
"""The user's own setting, read before any Dask nanny of this process copied Dask's into it."""


@contextlib.contextmanager
def _quiet_nanny_kills() -> Iterator[None]:
    """Silence the nannies' "Worker process still alive after 4.0 seconds, killing" while our
    own cluster shuts down: by then the run's results are written, and a worker process that
    is slow to exit (a loaded model, a busy machine) is killed on purpose, not lost."""
    nanny_log = logging.getLogger("distributed.nanny")
    level = nanny_log.level
    nanny_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        nanny_log.setLevel(level)


@contextlib.contextmanager
def _glibc_default_trimming() -> Iterator[None]:
    """Start worker processes without Dask's ``MALLOC_TRIM_THRESHOLD_=65536``.

    That setting (meant to hand memory of many small objects back to the OS) also turns off
    glibc's adaptive mmap threshold, so every large tensor is mapped, zero-filled and unmapped
    again on each allocation: a UNet forward pass on the CPU took 1.5 to 3 times as long in our
    measurement. A value the user set themselves is kept. Nannies snapshot their environment
    when they are made, so restarted workers keep glibc's default too.
    """
    if _USER_MALLOC_TRIM is not None:
        yield
        return
    os.environ.pop(_MALLOC_TRIM, None)  # each nanny copies its spawn environment into ours
    with dask.config.set({f"distributed.nanny.pre-spawn-environ.{_MALLOC_TRIM}": None}):
        yield


def _visible_gpus() -> list[str]:
    """The CUDA device ids this process may use, as ``CUDA_VISIBLE_DEVICES`` entries."""

    if not torch.cuda.is_available():
        return []
    count = torch.cuda.device_count()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return [d.strip() for d in visible.split(",") if d.strip()][:count]
    return [str(i) for i in range(count)]
