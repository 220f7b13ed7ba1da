"""Executors run work batches somewhere and hand back outcomes as they complete.

The engine only submits :class:`~diffsearch.runtime.WorkBatch` records and iterates
``as_completed`` for their :class:`~diffsearch.runtime.UnitResult`; it may submit more batches
while iterating (a prompt's next round starts as soon as its previous one is told back). The
in-process executor lives here; the Dask executor in ``diffsearch.dask_executor``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from diffsearch.runtime import (
    ModelInfo,
    RuntimeSpec,
    UnitResult,
    WorkBatch,
    compute_batch,
    describe_model,
    finish_batch,
    pin_threads,
    run_batch,
)


class Executor(ABC):
    """Where batches run. Use as a context manager so workers are released on any exit."""

    @abstractmethod
    def start(self, spec: RuntimeSpec) -> ModelInfo:
        """Load the model and verifiers on the workers; report what the model is."""

    @abstractmethod
    def submit(self, batch: WorkBatch) -> None:
        """Queue a batch. Results come out of :meth:`as_completed`."""

    @abstractmethod
    def as_completed(self) -> Iterator[tuple[WorkBatch, UnitResult]]:
        """Yield each submitted batch with its result once, including batches submitted while
        iterating; stops when nothing is pending."""

    def concurrency(self) -> int:
        """How many work batches it runs at once (1 unless it says otherwise). The engine keeps
        at least this many in flight before it sends a batch it could still fill."""
        return 1

    def slots_for_partial_units(self, in_flight: int) -> int:
        """How many batches the engine may send that it could still fill, with ``in_flight``
        out: the slots that would otherwise idle (a partial batch pads its forward passes)."""
        return max(0, self.concurrency() - in_flight)

    def close(self) -> None:  # noqa: B027  (optional hook: in-process executors hold nothing)
        """Release workers. Safe to call twice."""

    def describe(self) -> str:
        """One line for the log: where the work runs."""
        return type(self).__name__

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class LocalExecutor(Executor):
    """Runs batches in this process: no cluster, easiest to debug.

    With ``overlap`` (the default) it is a two-stage pipeline: while one unit is decoded and
    scored in a helper thread, the next unit's denoising runs in the calling thread, so the
    denoiser does not idle while a verifier works (torch releases the GIL inside its kernels).
    Each stage still runs one unit at a time, so the results are the same bits either way.
    """

    def __init__(self, *, overlap: bool = True) -> None:
        self._spec: RuntimeSpec | None = None
        self._pending: deque[WorkBatch] = deque()
        self.overlap = overlap

    def start(self, spec: RuntimeSpec) -> ModelInfo:
        self._spec = spec
        return describe_model(spec)

    def submit(self, batch: WorkBatch) -> None:
        self._pending.append(batch)

    def concurrency(self) -> int:
        """Two units in flight when overlapping: the one being scored and the next."""
        return 2 if self.overlap else 1

    def slots_for_partial_units(self, in_flight: int) -> int:
        """A partial unit only when nothing is in flight: the second slot is the pipeline's
        next stage, not a second denoiser, and a partial unit sent early to fill it would pad
        passes that waiting for more tasks fills."""
        return 1 if in_flight == 0 else 0

    def as_completed(self) -> Iterator[tuple[WorkBatch, UnitResult]]:
        spec = self._spec
        assert spec is not None, "start() the executor first"
        if not self.overlap:
            while self._pending:
                batch = self._pending.popleft()
                yield batch, run_batch(spec, batch)
            return
        # A new thread starts at OpenMP's default thread count (every core), not the job's:
        # its verifier passes would round differently and crowd the denoiser's cores.
        with ThreadPoolExecutor(1, thread_name_prefix="diffsearch-finish",
                                initializer=pin_threads, initargs=(spec.threads,)) as finisher:
            finishing: Future[UnitResult] | None = None
            finishing_batch: WorkBatch | None = None
            while self._pending or finishing is not None:
                computed = None
                if self._pending:
                    batch = self._pending.popleft()
                    computed = compute_batch(spec, batch)  # while the last unit is scored
                if finishing is not None:
                    result = finishing.result()
                    done_batch, finishing, finishing_batch = finishing_batch, None, None
                    if computed is not None:
                        finishing = finisher.submit(finish_batch, spec, computed)
                        finishing_batch = computed.batch
                        computed = None
                    yield done_batch, result  # type: ignore[misc]
                if computed is not None:
                    finishing = finisher.submit(finish_batch, spec, computed)
                    finishing_batch = computed.batch

    def describe(self) -> str:
        return "in-process executor" + (" (denoising overlaps scoring)" if self.overlap else "")
