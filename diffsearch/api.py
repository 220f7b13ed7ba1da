"""The Python API: run a job (or a single search) and get the results back.

The CLI is a thin layer over :func:`run_job`; creative tools call :func:`search` (or
:func:`asearch` from asyncio code) and get a :class:`SearchResult` with the best images as PIL
images, their scores and lineage, and the run folder.

Cancellation: :func:`run_job` takes a ``threading.Event``; once it is set the run stops after
the work batch in flight and raises :class:`SearchCancelled`, leaving a resumable store. The
check sits between the engine and the executor (:class:`_CancellableExecutor`) because the
engine has no stop hook and a batch cannot be interrupted half-way without losing its work.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import re
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from diffsearch import run_folder
from diffsearch.engine import Engine, ProgressCallback, ProgressEvent
from diffsearch.errors import JobError
from diffsearch.executor import Executor, LocalExecutor
from diffsearch.job import Job, VerifierSpec, job_from_mapping
from diffsearch.results import PromptResult, RunResult
from diffsearch.runtime import ModelInfo, RuntimeSpec, UnitResult, WorkBatch
from diffsearch.store import CandidateRecord

RUNS_DIR_ENV = "DIFFSEARCH_RUNS"
"""Where :func:`search` puts run folders when ``out`` is not given (default: the temp dir)."""


class SearchCancelled(Exception):
    """A run was stopped through its cancel event. Finished candidates are in the store."""


def make_executor(job: Job, *, profile: str | Path | None = None) -> Executor:
    """The executor the job asks for (the Dask one is imported only when used).

    ``profile`` names an HTML file for Dask's performance report of the run.
    """
    if job.executor == "dask":
        from diffsearch.dask_executor import DaskExecutor

        return DaskExecutor(workers=job.workers, scheduler=job.scheduler, threads=job.threads,
                            profile=None if profile is None else str(profile))
    if profile is not None:
        raise JobError("--profile writes Dask's performance report: use the dask executor")
    return LocalExecutor()


class _CancellableExecutor(Executor):
    """Passes everything through to ``inner`` and raises :class:`SearchCancelled` between
    batches once ``cancel`` is set. The batches still pending stay in ``inner``: whoever owns it
    must close it (an executor shared by several runs would otherwise hand them to the next)."""

    def __init__(self, inner: Executor, cancel: threading.Event) -> None:
        self.inner = inner
        self.cancel = cancel

    def start(self, spec: RuntimeSpec) -> ModelInfo:
        self._check()
        return self.inner.start(spec)

    def submit(self, batch: WorkBatch) -> None:
        self._check()
        self.inner.submit(batch)

    def as_completed(self) -> Iterator[tuple[WorkBatch, UnitResult]]:
        for item in self.inner.as_completed():
            self._check()
            yield item

    def concurrency(self) -> int:
        return self.inner.concurrency()

    def slots_for_partial_units(self, in_flight: int) -> int:
        return self.inner.slots_for_partial_units(in_flight)

    def describe(self) -> str:
        return self.inner.describe()

    def _check(self) -> None:
        if self.cancel.is_set():
            raise SearchCancelled("search cancelled; finished candidates are kept in the store")


def run_job(
    job: Job,
    out: str | Path,
    *,
    resume: bool = False,
    progress_bar: bool = False,
    on_progress: ProgressCallback | None = None,
    executor: Executor | None = None,
    cancel: threading.Event | None = None,
    profile: str | Path | None = None,
) -> RunResult:
    """Run ``job`` into the folder ``out`` (results.json, store.zarr/, images/, best/).

    ``resume=True`` continues a stopped run in ``out`` without recomputing finished candidates.
    An ``executor`` may be passed to share one cluster between runs; it is then left open (after
    a cancelled run it may still hold that run's unfinished batches: close it or discard it).
    Setting ``cancel`` stops the run after the batch in flight with :class:`SearchCancelled`.
    """
    own = executor is None
    active = make_executor(job, profile=profile) if own else executor
    assert active is not None
    engine_executor = active if cancel is None else _CancellableExecutor(active, cancel)
    try:
        return Engine(job, Path(out), engine_executor, resume=resume, progress_bar=progress_bar,
                      on_progress=on_progress).run()
    finally:
        if own:
            active.close()


# ---- the result a creative tool gets -------------------------------------------------------------
@dataclass(frozen=True)
class BestCandidate:
    """The winner of one prompt: which candidate, how it scored, where it came from."""

    candidate: int
    seed: int
    score: float | None
    """The guiding verifier's score (the reward the strategy maximised)."""
    scores: dict[str, float]
    """Every verifier's score, guiding and held-out."""
    lineage: tuple[int, ...]
    """Candidate ids from the best back to its first ancestor: ``(best, parent, ...)``. Length 1
    for strategies without parents (best-of-N)."""
    image_path: Path | None
    """None when the job said ``images: none``."""

    @property
    def image(self) -> Image.Image:
        """The best image, read from the run folder (a copy: no file handle stays open)."""
        if self.image_path is None:
            raise ValueError("this search ran with images='none': no image was written")
        with Image.open(self.image_path) as image:
            return image.copy()


@dataclass(frozen=True)
class PromptSearchResult:
    index: int
    prompt: str
    nfe: int
    best: BestCandidate | None
    """None when no candidate of this prompt finished with a score (e.g. all failed)."""
    candidates: tuple[CandidateRecord, ...]


@dataclass(frozen=True)
class SearchResult:
    """What :func:`search` returns. ``run`` is the engine's full :class:`RunResult`."""

    run_dir: Path
    prompts: tuple[PromptSearchResult, ...]
    run: RunResult

    @property
    def nfe(self) -> int:
        return self.run.nfe

    @property
    def best_images(self) -> list[Image.Image | None]:
        """The best image of each prompt, in prompt order (None where a prompt has none)."""
        return [p.best.image if p.best else None for p in self.prompts]

    @property
    def best_image(self) -> Image.Image:
        """The first prompt's best image: the common one-prompt case."""
        best = self.prompts[0].best
        if best is None:
            raise ValueError(f"prompt {self.prompts[0].prompt!r} has no scored candidate")
        return best.image

    @property
    def scores(self) -> list[float | None]:
        """The best guiding score of each prompt, in prompt order."""
        return [p.best.score if p.best else None for p in self.prompts]

    @classmethod
    def from_run(cls, run: RunResult) -> SearchResult:
        return cls(run_dir=run.run_dir,
                   prompts=tuple(_prompt_result(run.run_dir, p) for p in run.prompts), run=run)


def _prompt_result(run_dir: Path, prompt: PromptResult) -> PromptSearchResult:
    best = None
    if prompt.best is not None:
        record = prompt.best
        best = BestCandidate(
            candidate=record.candidate, seed=record.seed, score=record.reward,
            scores=dict(record.scores), lineage=lineage(prompt.candidates, record.candidate),
            image_path=None if prompt.images == "none"
            else run_dir / run_folder.best_image(prompt.prompt_index))
    return PromptSearchResult(index=prompt.prompt_index, prompt=prompt.prompt, nfe=prompt.nfe,
                              best=best, candidates=tuple(prompt.candidates))


def lineage(candidates: list[CandidateRecord], candidate: int) -> tuple[int, ...]:
    """``candidate`` and its ancestors through ``parent`` links, newest first."""
    parents = {c.candidate: c.parent for c in candidates}
    chain = [candidate]
    while (parent := parents.get(chain[-1])) is not None:
        if parent in chain:
            raise ValueError(f"candidate {candidate} has a cycle in its parents: {chain}")
        chain.append(parent)
    return tuple(chain)


# ---- one-call searches ---------------------------------------------------------------------------
def search(
    prompts: str | list[str],
    *,
    model: str = "shapes",
    strategy: str | dict[str, Any] = "best-of-n",
    verifier: VerifierSpec = "shapes-clip",
    eval_verifiers: list[VerifierSpec] | None = None,
    budget: int | str = "8x",
    seed: int = 0,
    out: str | Path | None = None,
    resume: bool = False,
    on_progress: ProgressCallback | None = None,
    executor: Executor | str | None = None,
    cancel: threading.Event | None = None,
    **job_fields: Any,
) -> SearchResult:
    """Search for the best image of each prompt and return them with their scores and lineage.

    ``strategy`` is a name or ``{"name": ..., **options}``; ``verifier`` is the guiding reward and
    ``eval_verifiers`` are held-out judges reported but never seen by the strategy. Any other
    :class:`~diffsearch.job.Job` field (``num_steps``, ``guidance_scale``, ``threads``, ...) may be
    passed by name and is validated like a job file. ``out=None`` makes a fresh folder under
    ``$DIFFSEARCH_RUNS`` (default: the system temp dir); it is kept and named in the result.
    ``executor`` is an :class:`Executor` to reuse across calls (a running Dask cluster: models
    stay loaded; it is left open) or the job field's name (``"local"`` / ``"dask"``).
    """
    fields: dict[str, Any] = {
        "prompts": [prompts] if isinstance(prompts, str) else list(prompts), "model": model,
        "strategy": {"name": strategy} if isinstance(strategy, str) else strategy,
        "verifier": verifier, "eval_verifiers": list(eval_verifiers or []), "budget": budget,
        "seed": seed, **job_fields,
    }
    if isinstance(executor, str):
        fields["executor"] = executor
    job = job_from_mapping(fields, source="search()", base_dir=Path.cwd())
    run_dir = Path(out) if out is not None else default_run_dir(job.prompt_texts[0])
    shared = executor if isinstance(executor, Executor) else None
    run = run_job(job, run_dir, resume=resume, on_progress=on_progress, executor=shared,
                  cancel=cancel)
    return SearchResult.from_run(run)


AsyncProgressCallback = Callable[[ProgressEvent], Awaitable[None] | None]


async def asearch(
    prompts: str | list[str],
    *,
    on_progress: AsyncProgressCallback | None = None,
    **kwargs: Any,
) -> SearchResult:
    """:func:`search` for asyncio code: the blocking engine runs in a worker thread.

    ``on_progress`` is called on the caller's event loop, in order, one event at a time (it may
    be a coroutine function; it is awaited before the next event is delivered), so it can touch
    loop-bound objects (websockets, UI state) without locks. The result is returned only after
    every event was delivered. Cancelling the awaiting task stops the search after the batch in
    flight (and raises ``CancelledError``); the run folder keeps the finished candidates.
    """
    if "cancel" in kwargs:
        raise TypeError("asearch() is cancelled by cancelling its task, not with cancel=")
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[ProgressEvent | None] = asyncio.Queue()
    cancel = threading.Event()

    def forward(event: ProgressEvent) -> None:  # engine thread -> loop
        loop.call_soon_threadsafe(events.put_nowait, event)

    async def deliver() -> None:
        while (event := await events.get()) is not None:
            if on_progress is not None:
                returned = on_progress(event)
                if inspect.isawaitable(returned):
                    await returned

    delivery = asyncio.ensure_future(deliver())
    # a callback that raises stops the search, as it does in the blocking search()
    delivery.add_done_callback(lambda task: task.cancelled() or task.exception() is None
                               or cancel.set())
    worker = asyncio.ensure_future(asyncio.to_thread(
        search, prompts, on_progress=forward if on_progress else None, cancel=cancel, **kwargs))
    try:
        await asyncio.wait([worker])
    except asyncio.CancelledError:
        cancel.set()
        delivery.cancel()
        # let the thread finish its batch and release the executor before propagating
        await asyncio.wait([worker])
        raise
    # every forward() of the engine was queued before the worker's result: end after them
    events.put_nowait(None)
    await asyncio.wait([delivery])
    if not delivery.cancelled() and delivery.exception() is not None:
        worker.exception()  # retrieved: the callback's error is the one to report
        raise delivery.exception()  # type: ignore[misc]
    return worker.result()


def default_run_dir(first_prompt: str) -> Path:
    """A fresh, unique folder for a search without ``out``, named after its first prompt."""
    base = Path(os.environ.get(RUNS_DIR_ENV) or Path(tempfile.gettempdir()) / "diffsearch")
    base.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", first_prompt.lower()).strip("-")[:40] or "search"
    return Path(tempfile.mkdtemp(prefix=f"{slug}-", dir=base))
