"""The service's searches: a bounded queue in front of the backend, and each search's state.

Submissions go into a FIFO queue of at most ``max_queue`` waiting searches (more are refused
with :class:`QueueFull`, never dropped); ``backend.concurrency`` runner threads take them one at
a time and run them with :func:`diffsearch.api.run_job`. A search's progress (NFEs, the best
candidate so far, the best score against NFE) is kept on its :class:`SearchRecord` and published
as events on its :class:`~diffsearch.service.events.EventLog`.

Cancelling a queued search removes it from the queue; cancelling a running one stops it after
the work batch in flight (the api's cancel event), and its run folder keeps what finished.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from diffsearch import run_folder
from diffsearch.api import SearchCancelled, SearchResult, run_job
from diffsearch.engine import ProgressEvent
from diffsearch.errors import DiffsearchError
from diffsearch.job import Job
from diffsearch.runtime import ModelInfo
from diffsearch.service.backend import Backend
from diffsearch.service.events import EventLog

log = logging.getLogger("diffsearch.service")


class Status(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def finished(self) -> bool:
        return self in (Status.DONE, Status.FAILED, Status.CANCELLED)


class QueueFull(Exception):
    pass


class NotCancellable(Exception):
    pass


@dataclass(frozen=True)
class BestSoFar:
    """A prompt's best answer so far (the engine's :attr:`ProgressEvent.best`, then the
    strategy's final choice) and the NFEs spent when it came."""

    candidate: int
    score: float
    nfe: int


@dataclass
class SearchRecord:
    id: str
    job: Job
    model_name: str
    model: ModelInfo
    run_dir: Path
    events: EventLog
    created_at: float = field(default_factory=time.time)
    status: Status = Status.QUEUED
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    nfe_done: int = 0
    nfe_total: int | None = None
    best: dict[int, BestSoFar] = field(default_factory=dict)
    history: dict[int, list[tuple[int, float]]] = field(default_factory=dict)
    """Per prompt, (NFEs spent, best score) each time the best improved: the page's plot."""
    result: SearchResult | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)

    # ---- called from the runner thread --------------------------------------------------------
    def on_progress(self, event: ProgressEvent) -> None:
        """Record an engine progress event and publish the candidates it brought."""
        candidates = []
        with self.lock:
            self.nfe_done, self.nfe_total = event.nfe_done, event.nfe_total
            for outcome in event.outcomes:
                image = run_folder.candidate_image(outcome.prompt_index, outcome.candidate)
                has_image = (self.run_dir / image).is_file()
                candidates.append({
                    "prompt_index": outcome.prompt_index, "candidate": outcome.candidate,
                    "step": outcome.step, "reward": outcome.reward, "scores": outcome.scores,
                    "error": outcome.error,
                    "image": image_url(self.id, outcome.prompt_index, outcome.candidate)
                    if has_image else None,
                })
            if event.best is not None and event.best.reward is not None:
                self._offer_best(event.prompt_index, event.best.candidate, event.best.reward,
                                 event.nfe_done)
            best = self.best.get(event.prompt_index)
        self.events.append("progress", {
            "nfe_done": event.nfe_done, "nfe_total": event.nfe_total,
            "prompt_index": event.prompt_index, "candidates": candidates,
            "best": None if best is None else {"candidate": best.candidate, "score": best.score,
                                               "nfe": best.nfe},
        })

    def _offer_best(self, prompt_index: int, candidate: int, score: float, nfe: int) -> None:
        """Take the engine's best so far; the history grows when it changes."""
        current = self.best.get(prompt_index)
        if current is None or candidate != current.candidate:
            self.best[prompt_index] = BestSoFar(candidate, score, nfe)
            self.history.setdefault(prompt_index, []).append((nfe, score))

    def set_status(self, status: Status, *, error: str | None = None,
                   result: SearchResult | None = None) -> None:
        now = time.time()
        with self.lock:
            self.status = status
            self.error = error
            if status is Status.RUNNING:
                self.started_at = now
            if status.finished:
                self.finished_at = now
            if result is not None:
                self.result = result
                self.nfe_done = result.nfe
                self.best = {p.index: BestSoFar(p.best.candidate, p.best.score, p.nfe)
                             for p in result.prompts
                             if p.best is not None and p.best.score is not None}
        self.events.append("status", {"status": status.value, "error": error})
        if status.finished:
            self.events.close()


class SearchManager:
    def __init__(self, backend: Backend, data_dir: Path, *, max_queue: int,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.backend = backend
        self.runs_dir = data_dir / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.max_queue = max_queue
        self.loop = loop
        self._records: dict[str, SearchRecord] = {}
        self._queue: deque[SearchRecord] = deque()
        self._changed = threading.Condition()
        self._stopping = False
        self._next = 1 + max((int(p.name[1:]) for p in self.runs_dir.glob("s[0-9]*")
                              if p.name[1:].isdigit()), default=0)
        self._threads = [threading.Thread(target=self._work, name=f"diffsearch-runner-{i}",
                                          daemon=True) for i in range(backend.concurrency)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel everything (running searches stop after their batch in flight) and wait."""
        with self._changed:
            self._stopping = True
            while self._queue:
                self._queue.popleft().set_status(Status.CANCELLED, error="the service stopped")
            for record in self._records.values():
                record.cancel.set()
            self._changed.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    # ---- requests -----------------------------------------------------------------------------
    def submit(self, job: Job, model_name: str, model: ModelInfo) -> SearchRecord:
        with self._changed:
            if self._stopping:
                raise QueueFull("the service is stopping")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"{len(self._queue)} searches are waiting, the most this "
                                f"service queues (max_queue); retry later")
            search_id = f"s{self._next:06d}"
            self._next += 1
            record = SearchRecord(id=search_id, job=job, model_name=model_name, model=model,
                                  run_dir=self.runs_dir / search_id, events=EventLog(self.loop))
            record.events.append("status", {"status": Status.QUEUED.value, "error": None})
            self._records[search_id] = record
            self._queue.append(record)
            self._changed.notify()
        return record

    def get(self, search_id: str) -> SearchRecord | None:
        return self._records.get(search_id)

    def all(self) -> list[SearchRecord]:
        return list(self._records.values())

    def queue_position(self, record: SearchRecord) -> int | None:
        """0 for the next to start; None when not waiting."""
        with self._changed:
            try:
                return self._queue.index(record)
            except ValueError:
                return None

    def cancel(self, record: SearchRecord) -> None:
        with self._changed:
            if record.status.finished:
                raise NotCancellable(f"search {record.id} is already {record.status.value}")
            if record in self._queue:
                self._queue.remove(record)
                record.set_status(Status.CANCELLED)
                return
            record.cancel.set()  # the runner marks it cancelled when the engine stops

    # ---- the runners --------------------------------------------------------------------------
    def _work(self) -> None:
        while True:
            with self._changed:
                while not self._queue and not self._stopping:
                    self._changed.wait()
                if self._stopping:
                    return
                record = self._queue.popleft()
                record.set_status(Status.RUNNING)
            self._run(record)

    def _run(self, record: SearchRecord) -> None:
        executor = None
        try:
            executor = self.backend.executor(record.job)
            run = run_job(record.job, record.run_dir, executor=executor,
                          on_progress=record.on_progress, cancel=record.cancel)
            result = SearchResult.from_run(run)
        except SearchCancelled:
            record.set_status(Status.CANCELLED)
        except DiffsearchError as error:
            record.set_status(Status.FAILED, error=str(error))
        except Exception as error:  # a bug or a broken model: report it, keep serving
            log.exception("search %s failed", record.id)
            record.set_status(Status.FAILED,
                              error=f"internal error: {type(error).__name__}: {error}")
        else:
            record.set_status(Status.DONE, result=result)
        finally:
            if executor is not None:
                try:
                    executor.close()
                except Exception:  # the search's state is settled; keep the runner alive
                    log.exception("closing the executor of search %s failed", record.id)


def image_url(search_id: str, prompt_index: int, candidate: int) -> str:
    """The URL path of a candidate's PNG (``GET`` it from the service)."""
    return f"/v1/searches/{search_id}/images/{prompt_index}/{candidate}.png"


def summary_fields(record: SearchRecord) -> dict[str, Any]:
    """A consistent snapshot of a record's mutable fields."""
    with record.lock:
        return {
            "status": record.status, "error": record.error, "started_at": record.started_at,
            "finished_at": record.finished_at, "nfe_done": record.nfe_done,
            "nfe_total": record.nfe_total, "best": dict(record.best),
            "history": {k: list(v) for k, v in record.history.items()},
            "result": record.result,
        }
