"""The service's searches: a bounded queue in front of the backend, and each search's state.

Submissions go into a FIFO queue of at most ``max_queue`` waiting searches (more are refused
with :class:`QueueFull`, never dropped); ``backend.concurrency`` runner threads take them one at
a time and run them with :func:`diffsearch.api.run_job`. A search's progress (NFEs, the best
candidate so far, the best score against NFE) is kept on its :class:`SearchRecord` and published
as events on its :class:`~diffsearch.service.events.EventLog`.

Cancelling a queued search removes it from the queue; cancelling a running one stops it after
the work batch in flight (the api's cancel event), and its run folder keeps what finished.

Restarts lose nothing: every record is saved in the data dir (:mod:`record_files`) when its
status changes and at most every :data:`PROGRESS_SAVE_SECONDS` while it runs, and reloaded at
start. A search that was running when the service stopped comes back ``interrupted`` and
:meth:`SearchManager.resume` queues it again with ``resume=True``: the engine replays the
store, so no finished candidate is computed twice. Queued ones are queued again, in order.

Memory stays bounded however long the service runs: queued and running searches are held, and
of the others (nothing runs in them) the ``max_records`` most recently used; an older one is read
back from its record file when a request names it, with a fresh event log that goes on from the
saved event id (see :mod:`~diffsearch.service.events`, which also caps each log).
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from diffsearch import run_folder
from diffsearch.api import SearchCancelled, SearchResult, run_job
from diffsearch.engine import ProgressEvent
from diffsearch.errors import DiffsearchError
from diffsearch.job import Job
from diffsearch.service import schemas
from diffsearch.service.backend import Backend
from diffsearch.service.events import EventLog
from diffsearch.service.record_files import RecordFiles

log = logging.getLogger("diffsearch.service")

RECORD_FORMAT = 1
"""The version of a saved record's layout (:meth:`SearchRecord.to_json`)."""

PROGRESS_SAVE_SECONDS = 2.0
"""While a search runs its record is saved at most this often (status changes always are): a
restart shows progress at most this old, and a run with many small batches costs few writes."""

SEARCH_ID = re.compile(r"s[0-9]+")
"""What search ids look like (``s000001``): a name that is not one never reaches the disk."""

STOPPED = "the service stopped while this search ran; POST /v1/searches/{id}/resume continues it"


class Status(str, Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"
    """It was running when the service stopped; it can be resumed, so it is not finished."""

    @property
    def finished(self) -> bool:
        return self in (Status.DONE, Status.FAILED, Status.CANCELLED)

    @property
    def active(self) -> bool:
        """Waiting or running: what cancelling acts on, and what keeps its event log open."""
        return self in (Status.QUEUED, Status.RUNNING)


class QueueFull(Exception):
    pass


class NotCancellable(Exception):
    pass


class NotResumable(Exception):
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
    run_dir: Path
    events: EventLog
    files: RecordFiles | None = None
    """Where the record is saved (None: kept in memory only)."""
    created_at: float = field(default_factory=time.time)
    queued_at: float = field(default_factory=time.time)
    """When it last entered the queue: a restart queues the waiting searches in this order."""
    status: Status = Status.QUEUED
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    resume: bool = False
    """Run with ``resume=True`` (set by :meth:`SearchManager.resume`): finished candidates are
    answered from the run folder's store."""
    nfe_done: int = 0
    nfe_total: int | None = None
    best: dict[int, BestSoFar] = field(default_factory=dict)
    history: dict[int, list[tuple[int, float]]] = field(default_factory=dict)
    """Per prompt, (NFEs spent, best score) each time the best improved: the page's plot."""
    result: schemas.ResultSummary | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _save_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _saved_at: float = field(default=0.0, init=False, repr=False)

    # ---- called from the runner thread --------------------------------------------------------
    def on_progress(self, event: ProgressEvent) -> None:
        """Record an engine progress event and publish the candidates it brought."""
        candidates = []
        with self.lock:
            self.nfe_done, self.nfe_total = event.nfe_done, event.nfe_total
            for outcome in event.outcomes:
                candidates.append({
                    "prompt_index": outcome.prompt_index, "candidate": outcome.candidate,
                    "step": outcome.step, "reward": outcome.reward, "scores": outcome.scores,
                    "error": outcome.error,
                    "image": image_url(self.id, outcome.prompt_index, outcome.candidate)
                    if outcome.candidate in event.images else None,
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
        if time.monotonic() - self._saved_at >= PROGRESS_SAVE_SECONDS:
            self.save()

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
                if self.resume:  # the replay of the store reports all of it again
                    self.nfe_done, self.best, self.history = 0, {}, {}
            if status.finished:
                self.finished_at = now
            if result is not None:
                self.result = result_summary(self.id, result)
                self.nfe_done = result.nfe
                self.best = {p.index: BestSoFar(p.best.candidate, p.best.score, p.nfe)
                             for p in result.prompts
                             if p.best is not None and p.best.score is not None}
        self.save()
        self.events.append("status", {"status": status.value, "error": error})
        if not status.active:
            self.events.close()

    def queue_again(self) -> None:
        """Make a stopped search wait again, to be run with ``resume=True``; its event log takes
        events again, after the ones it has."""
        with self.lock:
            self.status, self.error, self.finished_at = Status.QUEUED, None, None
            self.resume = True
            self.queued_at = time.time()
            self.cancel = threading.Event()
        self.save()
        self.events.reopen()
        self.events.append("status", {"status": Status.QUEUED.value, "error": None})

    # ---- on disk ------------------------------------------------------------------------------
    def save(self) -> None:
        """Write the record (the newest state: the snapshot is taken under the write lock)."""
        if self.files is None:
            return
        with self._save_lock:
            self.files.save(self.id, self.to_json())
            self._saved_at = time.monotonic()

    def to_json(self) -> dict[str, Any]:
        try:
            run_dir = str(self.run_dir.relative_to(self.files.data_dir)) if self.files \
                else str(self.run_dir)
        except ValueError:  # outside the data dir: keep it as it is
            run_dir = str(self.run_dir)
        with self.lock:
            return {
                "format": RECORD_FORMAT, "id": self.id, "model_name": self.model_name,
                "job": self.job.model_dump(mode="json"), "run_dir": run_dir,
                "status": self.status.value, "error": self.error, "resume": self.resume,
                "created_at": self.created_at, "queued_at": self.queued_at,
                "started_at": self.started_at, "finished_at": self.finished_at,
                "progress": {"nfe_done": self.nfe_done, "nfe_total": self.nfe_total},
                "best": {str(i): {"candidate": b.candidate, "score": b.score, "nfe": b.nfe}
                         for i, b in self.best.items()},
                "history": {str(i): [list(point) for point in points]
                            for i, points in self.history.items()},
                "result": None if self.result is None else self.result.model_dump(mode="json"),
                "events_next": self.events.next_id,
            }

    @classmethod
    def from_json(cls, data: dict[str, Any], files: RecordFiles,
                  new_log: Callable[[int], EventLog]) -> SearchRecord:
        """A saved record (:meth:`to_json`), its event log made by ``new_log(first id)``; raises
        KeyError, TypeError or ValueError (which pydantic's ValidationError is) for one this
        version cannot read. (Records saved before event ids were kept start at id 0.)"""
        if data.get("format") != RECORD_FORMAT:
            raise ValueError(f"record format {data.get('format')!r}, this diffsearch reads "
                             f"{RECORD_FORMAT}")
        result = data["result"]
        return cls(
            id=str(data["id"]), job=Job.model_validate(data["job"]),
            model_name=str(data["model_name"]), run_dir=files.data_dir / data["run_dir"],
            events=new_log(int(data.get("events_next", 0))), files=files,
            created_at=data["created_at"],
            queued_at=data["queued_at"], status=Status(data["status"]),
            started_at=data["started_at"], finished_at=data["finished_at"],
            error=data["error"], resume=bool(data["resume"]),
            nfe_done=int(data["progress"]["nfe_done"]), nfe_total=data["progress"]["nfe_total"],
            best={int(i): BestSoFar(int(b["candidate"]), float(b["score"]), int(b["nfe"]))
                  for i, b in data["best"].items()},
            history={int(i): [(int(nfe), float(score)) for nfe, score in points]
                     for i, points in data["history"].items()},
            result=None if result is None else schemas.ResultSummary.model_validate(result))


class SearchManager:
    def __init__(self, backend: Backend, data_dir: Path, *, max_queue: int, max_records: int,
                 max_events: int, loop: asyncio.AbstractEventLoop) -> None:
        self.backend = backend
        self.runs_dir = data_dir / "runs"
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.files = RecordFiles(data_dir)
        self.max_queue = max_queue
        self.max_records = max_records
        self.max_events = max_events
        self.loop = loop
        self._active: dict[str, SearchRecord] = {}
        """Queued and running searches: always in memory."""
        self._idle: OrderedDict[str, SearchRecord] = OrderedDict()
        """The others, least recently used first; at most ``max_records``."""
        self._queue: deque[SearchRecord] = deque()
        self._changed = threading.Condition()
        self._stopping = False
        used = [*(p.name for p in self.runs_dir.glob("s[0-9]*")), *self.files.ids()]
        self._next = 1 + max((int(name[1:]) for name in used if name[1:].isdigit()), default=0)
        self._threads = [threading.Thread(target=self._work, name=f"diffsearch-runner-{i}",
                                          daemon=True) for i in range(backend.concurrency)]
        self._load()

    def _new_log(self, first_id: int = 0) -> EventLog:
        return EventLog(self.loop, max_events=self.max_events, first_id=first_id)

    def _load(self) -> None:
        """Every saved search, as the service left it; running ones become interrupted, queued
        ones wait again in the order they were waiting. Of the rest only the newest
        ``max_records`` stay in memory."""
        waiting = []
        for data in self.files.load():
            record = self._revive(data)
            if record is None:
                continue
            if record.status is Status.QUEUED:
                waiting.append(record)
                self._active[record.id] = record
            else:
                self._hold_idle(record)
        self._queue.extend(sorted(waiting, key=lambda r: r.queued_at))

    def _revive(self, data: dict[str, Any]) -> SearchRecord | None:
        """A saved record back in service (None, logged, for one this version cannot read): a
        running one is now interrupted; its event log starts with its status."""
        try:
            record = SearchRecord.from_json(data, self.files, self._new_log)
        except (KeyError, TypeError, ValueError) as error:
            log.warning("skipping the saved search %s: %s", data.get("id"), error)
            return None
        if record.status is Status.RUNNING:
            record.status, record.error = Status.INTERRUPTED, STOPPED.format(id=record.id)
            record.save()
        record.events.append("status", {"status": record.status.value, "error": record.error})
        if not record.status.active:
            record.events.close()
        return record

    def _read_back(self, search_id: str) -> SearchRecord | None:
        """A search no longer in memory, from its record file (None: there is none)."""
        if not SEARCH_ID.fullmatch(search_id):
            return None
        data = self.files.load_one(search_id)
        return None if data is None else self._revive(data)

    def _hold_idle(self, record: SearchRecord) -> None:
        """Keep a search nothing runs in as the most recently used; forget the least recently
        used beyond ``max_records`` (their record files have their final state)."""
        self._idle[record.id] = record
        self._idle.move_to_end(record.id)
        while len(self._idle) > self.max_records:
            self._idle.popitem(last=False)

    def _settle(self, record: SearchRecord) -> None:
        """A search stopped running (or waiting): it may now leave memory."""
        with self._changed:
            if self._active.get(record.id) is record:
                del self._active[record.id]
            self._hold_idle(record)

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop running searches after their batch in flight (they become interrupted) and wait;
        queued ones stay queued on disk, for the next start."""
        with self._changed:
            self._stopping = True
            for record in self._queue:
                record.events.close()
            self._queue.clear()
            for record in self._active.values():
                record.cancel.set()
            self._changed.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    # ---- requests -----------------------------------------------------------------------------
    def submit(self, job: Job, model_name: str) -> SearchRecord:
        with self._changed:
            self._check_room()
            search_id = f"s{self._next:06d}"
            self._next += 1
            record = SearchRecord(id=search_id, job=job, model_name=model_name,
                                  run_dir=self.runs_dir / search_id, events=self._new_log(),
                                  files=self.files)
            record.events.append("status", {"status": Status.QUEUED.value, "error": None})
            self._active[search_id] = record
            record.save()
            self._queue.append(record)
            self._changed.notify()
        return record

    def resume(self, record: SearchRecord) -> SearchRecord:
        """Queue an interrupted search, or a cancelled one that finished some work, again; the
        answer is the search as the service now holds it (``record`` may have been read back
        again from its file since the caller got it)."""
        with self._changed:
            record = self._get(record.id) or record
            status = record.status
            has_work = (record.run_dir / run_folder.STORE).exists()
            if status is Status.CANCELLED and not has_work:
                raise NotResumable(f"search {record.id} was cancelled before any work finished: "
                                   f"nothing to resume; submit it again")
            if status not in (Status.INTERRUPTED, Status.CANCELLED):
                raise NotResumable(f"search {record.id} is {status.value}; only an interrupted "
                                   f"search, or a cancelled one with finished work, resumes")
            self._check_room()
            record.queue_again()
            self._idle.pop(record.id, None)
            self._active[record.id] = record
            self._queue.append(record)
            self._changed.notify()
        return record

    def _check_room(self) -> None:
        if self._stopping:
            raise QueueFull("the service is stopping")
        if len(self._queue) >= self.max_queue:
            raise QueueFull(f"{len(self._queue)} searches are waiting, the most this "
                            f"service queues (max_queue); retry later")

    def get(self, search_id: str) -> SearchRecord | None:
        with self._changed:
            return self._get(search_id)

    def _get(self, search_id: str) -> SearchRecord | None:
        """The search, from memory or read back from its file (the lock is held)."""
        record = self._active.get(search_id)
        if record is None and search_id in self._idle:
            record = self._idle[search_id]
            self._idle.move_to_end(search_id)
        if record is None:
            record = self._read_back(search_id)
            if record is not None:
                self._hold_idle(record)
        return record

    def all(self) -> list[SearchRecord]:
        """Every search with a record file, oldest first; those no longer in memory are read
        for the answer without being kept."""
        with self._changed:
            ids = self.files.ids()
            held = {**self._idle, **self._active}
        found = (held.get(search_id) or self._read_back(search_id) for search_id in ids)
        return [record for record in found if record is not None]

    def in_memory(self) -> list[str]:
        """The ids of the searches held in memory (queued and running ones first)."""
        with self._changed:
            return [*self._active, *self._idle]

    def queue_position(self, record: SearchRecord) -> int | None:
        """0 for the next to start; None when not waiting."""
        with self._changed:
            try:
                return self._queue.index(record)
            except ValueError:
                return None

    def cancel(self, record: SearchRecord) -> SearchRecord:
        """Cancel a queued or running search; the answer is the search as the service now holds
        it (see :meth:`resume`)."""
        with self._changed:
            record = self._get(record.id) or record
            if record.status is Status.INTERRUPTED:
                raise NotCancellable(f"search {record.id} is interrupted: nothing runs")
            if record.status.finished:
                raise NotCancellable(f"search {record.id} is already {record.status.value}")
            if record in self._queue:
                self._queue.remove(record)
                record.set_status(Status.CANCELLED)
                self._settle(record)
            else:
                record.cancel.set()  # the runner marks it cancelled when the engine stops
        return record

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
            run = run_job(record.job, record.run_dir, resume=record.resume, executor=executor,
                          on_progress=record.on_progress, cancel=record.cancel)
            result = SearchResult.from_run(run)
        except SearchCancelled:
            if self._stopping:
                record.set_status(Status.INTERRUPTED, error=STOPPED.format(id=record.id))
            else:
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
            self._settle(record)
            if executor is not None:
                try:
                    executor.close()
                except Exception:  # the search's state is settled; keep the runner alive
                    log.exception("closing the executor of search %s failed", record.id)


def image_url(search_id: str, prompt_index: int, candidate: int) -> str:
    """The URL path of a candidate's PNG (``GET`` it from the service)."""
    return f"/v1/searches/{search_id}/images/{prompt_index}/{candidate}.png"


def result_summary(search_id: str, result: SearchResult) -> schemas.ResultSummary:
    """What a search's detail says of its finished run (kept in the record, so a restarted
    service says it without reading the store)."""
    return schemas.ResultSummary(
        nfe=result.nfe, verifier_calls=result.run.verifier_calls,
        wall_seconds=result.run.wall_seconds, failed_candidates=result.run.failed_candidates,
        prompts=[schemas.PromptResult(
            index=p.index, prompt=p.prompt, nfe=p.nfe, candidates=len(p.candidates),
            best=None if p.best is None else schemas.BestResult(
                candidate=p.best.candidate, seed=p.best.seed, score=p.best.score,
                scores=p.best.scores, lineage=list(p.best.lineage),
                image=f"/v1/searches/{search_id}/best/{p.index}.png"))
            for p in result.prompts])


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


def snapshot(record: SearchRecord) -> dict[str, Any]:
    """The data of a ``snapshot`` event: what a client following the search would know from
    the events it missed (status, progress, each prompt's best so far, as a progress event
    gives it), taken now."""
    state = summary_fields(record)
    best = [state["best"].get(i) for i in range(len(record.job.prompts))]
    return {"status": state["status"].value, "error": state["error"],
            "nfe_done": state["nfe_done"], "nfe_total": state["nfe_total"],
            "best": [None if b is None else {"candidate": b.candidate, "score": b.score,
                                             "nfe": b.nfe} for b in best]}
