"""The run store (format 3): every finished candidate of a run as one row of flat tables.

Layout::

    store.zarr/               attrs: format, job, result_key, latent_shape, num_steps, prompts,
                              prompt_layouts
      writer.lock             flock'ed by the one process writing the store
      state  (R, *latent)     float32, each row's state at its task's ``end``
      final  (R, *latent)     float32, the rolled-out clean latent of rows whose task ended
                              before the last step; other rows' final IS their state and is
                              not stored again (their inner chunks stay unwritten)
      state_CxHxW, final_CxHxW  the same for prompts whose own size gives another latent shape
                              (``prompt_layouts``); a row is in the arrays of its prompt's shape
      columns/                attrs: the code tables verifier_names, error_messages,
                              score_labels
        done, prompt, candidate, step, start, parent, source, seed, nfe, rows,
        verifier_calls, eta, score_on, perturb_kind, perturb_strength, perturb_to, reward,
        verifier, error       one value per row, chunks of COLUMN_CHUNK rows
      scores/<i>              float64 per row for score_labels[i] (NaN: not scored)

Why this shape: a batch job of 10,000 prompts runs on NFS or Lustre, where every file costs.
Rows of every prompt share files (``state``/``final`` are sharded: one file per SHARD_ROWS rows,
inner chunks of one row, uncompressed because latents do not compress and raw bytes keep row
reads cheap), so files grow with candidates / SHARD_ROWS, not with prompts x arrays.

The driver is the only writer: workers return latents to it and only read, by row
(:func:`read_latent_rows`), so no two processes ever write one file. The writer keeps every
column in memory (read once per column at open) and answers lookups from there, which is what
makes resuming 10,000 prompts take seconds. A background thread writes recorded rows, latents
first and ``done`` last, about once a second (:data:`WRITE_INTERVAL`) and at once when the run
ends; each write takes every row recorded since the last, so a slow disk means fewer, larger
writes rather than a queue. A worker reads its sources from the store, except recent rows
(always those not on disk yet), whose latents travel inside the work unit
(:attr:`LatentRef.value`): a strategy that continues from the states it just received
(particles, TTSnap, paths) would otherwise hold the denoiser while the driver waited for a write
and the worker read it back. Zarr's local store writes each file to a temporary one and renames
it, so a kill at any moment leaves whole files: a row is finished exactly when ``done`` is set,
and a resumed run recomputes the rest (rows not done are ignored and the trailing ones reused).
Together with the task records the store is enough to rebuild any candidate bit for bit.
"""

from __future__ import annotations

import errno
import fcntl
import math
import os
import shutil
import threading
import time
import uuid
import warnings
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import zarr

from diffsearch.errors import StoreError
from diffsearch.tasks import Outcome, Perturbation, PerturbKind, ScoreOn, Task

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 3
"""3: flat tables with one row per candidate, written by the driver alone. Format 2 kept one
Zarr group per prompt (about 96 files per prompt), written by the workers; format 1 had no
``rows`` array."""

SHARD_ROWS = 256
"""Rows per shard file of ``state`` and ``final``: even when both arrays fill, a file holds 128
candidates' latents (the target is at most one file per 64), while a shard of SDXL latents
(256 KiB a row) stays at 64 MiB."""
COLUMN_CHUNK = 16384
"""Rows per chunk file of each column: a few files per column even at 10,000 prompts."""
WRITE_INTERVAL = 1.0
"""The writer thread writes at most once per this many seconds unless the driver waits for rows
(the run ends, or a worker needs a latent too large to carry). A write is about 20 small files,
and in-process the thread's Python competes for the GIL with the denoiser's; pacing it bounds
that cost, and what a kill can lose, to about a second of recorded rows."""
INLINE_LATENT_BYTES = 1 << 20
"""The largest latent a work unit carries itself (see :attr:`LatentRef.value`). A row of image
latents is kilobytes (SDXL: 256 KiB); a long video clip's latent is megabytes, and a unit of
those would bloat a Dask task, so for those the driver waits for the write if need be and the
worker reads the store."""
RECENT_LATENT_BYTES = 64 << 20
"""The driver keeps its latest rows' latents in memory up to this many bytes (and every row not
on disk yet, whatever the size), so that units continuing from them carry them rather than
sending workers to the disk: on NFS or Lustre a read is a round trip per file."""
LOCK_FILE = "writer.lock"

_KEYS = {"name": "default", "separator": "."}
"""Chunk files sit directly in their array's folder (``c.3.0.0.0``), not in a folder per
dimension: every folder is one more file system entry."""
_PERTURB_CODES = {kind: code for code, kind in enumerate(PerturbKind)}
_SCORE_CODES = {kind: code for code, kind in enumerate(ScoreOn)}
_FINAL = _SCORE_CODES[ScoreOn.FINAL]
_NO_LOCKS = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK)
"""What flock raises on file systems without locks (Lustre mounted without ``flock``)."""

# name -> (dtype, fill value) of the per-row columns; ``done`` is written last.
_COLUMNS: dict[str, tuple[str, Any]] = {
    "done": ("bool", False),
    "prompt": ("int32", -1),
    "candidate": ("int32", -1),
    "step": ("int32", -1),
    "start": ("int32", -1),
    "parent": ("int32", -1),
    "source": ("int32", -1),
    "seed": ("int64", 0),
    "nfe": ("int32", 0),
    "rows": ("int32", 0),
    "verifier_calls": ("int32", 0),
    "eta": ("float64", 0.0),
    "score_on": ("int8", -1),
    "perturb_kind": ("int8", -1),
    "perturb_strength": ("float64", 0.0),
    "perturb_to": ("int32", -1),
    "reward": ("float64", math.nan),
    "verifier": ("int16", -1),
    "error": ("int32", -1),
}
_CODE_TABLES = ("verifier_names", "error_messages", "score_labels")


@dataclass(frozen=True)
class LatentRef:
    """Where a finished candidate's latent is, for a worker to read: its row and the step that
    latent is at. Small and picklable, so it travels in work units instead of the latent."""

    row: int
    step: int
    final: bool = False
    """Read the ``final`` array (the rolled-out clean latent) instead of ``state``."""
    shape: str = ""
    """The arrays' suffix for a prompt of another latent shape than the run's (``4x12x8``:
    ``state_4x12x8``); empty for the run's own."""
    value: np.ndarray | None = field(default=None, compare=False, repr=False)
    """The latent itself, when the driver still holds it (a recent row, maybe not on disk yet):
    the unit carries it, and neither the driver nor the worker waits for the disk. None: read
    the row from the store."""


@dataclass(frozen=True)
class PromptLayout:
    """A prompt's schedule length and latent shape, where they are not the run's."""

    num_steps: int
    latent_shape: tuple[int, ...]


def shape_suffix(shape: Sequence[int]) -> str:
    return "x".join(str(n) for n in shape)


@dataclass(frozen=True)
class CandidateRecord:
    """One finished candidate as the store knows it (for results, ``show`` and replay)."""

    candidate: int
    step: int
    parent: int | None
    seed: int
    reward: float | None
    scores: dict[str, float]
    nfe: int
    verifier_calls: int
    error: str | None
    has_final: bool
    """It was scored on its final image (and did not fail): it has an image to show."""
    rows: int = 0
    """Rows the model computed for it (:attr:`diffsearch.tasks.Outcome.rows`)."""


class _Codes:
    """A code table: each distinct string gets the next integer; rows store the integer."""

    def __init__(self, values: Sequence[str]) -> None:
        self.values = list(values)
        self._codes = {value: code for code, value in enumerate(self.values)}
        self.grown = False
        """New values since the table was last written."""

    def code(self, value: str | None) -> int:
        if value is None:
            return -1
        if value not in self._codes:
            self._codes[value] = len(self.values)
            self.values.append(value)
            self.grown = True
        return self._codes[value]

    def value(self, code: int) -> str | None:
        return None if code < 0 else self.values[code]


class _Table:
    """Every column (and score) of the store in memory, as growable arrays: lookups, records
    and resumes read these, never Zarr."""

    def __init__(self, columns: dict[str, np.ndarray], scores: list[np.ndarray],
                 rows: int) -> None:
        self.rows = rows
        self._capacity = max(rows, 64)
        self._columns = {name: self._sized(values, _COLUMNS[name][1])
                         for name, values in columns.items()}
        self._scores = [self._sized(values, math.nan) for values in scores]

    def _sized(self, values: np.ndarray, fill: Any) -> np.ndarray:
        out = np.full(self._capacity, fill, dtype=values.dtype)
        out[:self.rows] = values[:self.rows]
        return out

    def column(self, name: str) -> np.ndarray:
        return self._columns[name][:self.rows]

    def score(self, index: int) -> np.ndarray:
        return self._scores[index][:self.rows]

    @property
    def score_count(self) -> int:
        return len(self._scores)

    def append(self, values: dict[str, list[Any]], scores: dict[int, list[float]]) -> int:
        """Add rows (``values`` per column, ``scores`` per label index); returns the first."""
        first, count = self.rows, len(values["done"])
        if first + count > self._capacity:
            self._capacity = max(2 * self._capacity, first + count)
            self._columns = {name: self._sized(array, _COLUMNS[name][1])
                             for name, array in self._columns.items()}
            self._scores = [self._sized(array, math.nan) for array in self._scores]
        while len(self._scores) <= max(scores, default=-1):
            self._scores.append(np.full(self._capacity, math.nan))
        for name, column in values.items():
            self._columns[name][first:first + count] = column
        for index, column in scores.items():
            self._scores[index][first:first + count] = column
        self.rows += count
        return first

    def padded(self, values: np.ndarray, fill: Any, lo: int, hi: int) -> np.ndarray:
        """Rows ``lo:hi`` of a column, fill values past the last row (whole chunks to write)."""
        out = np.full(hi - lo, fill, dtype=values.dtype)
        stop = min(hi, self.rows)
        out[:max(0, stop - lo)] = values[lo:stop]
        return out


@dataclass
class _Arrays:
    """The writer's handles on the store's arrays (Zarr reads an array's metadata when it
    opens one; resizing through the handle keeps it current)."""

    root: zarr.Group
    latents: dict[str, zarr.Array]
    columns: dict[str, zarr.Array]
    scores: list[zarr.Array]
    """By label index (``score_labels``)."""


@dataclass
class _Pending:
    """Latents recorded but not written yet, for consecutive rows."""

    states: np.ndarray
    finals: np.ndarray | None
    """NaN where a row has no final of its own; None when no row has one."""
    shape: str = ""
    """Which arrays they go to (:attr:`LatentRef.shape`)."""


@dataclass
class _Write:
    """Rows ``first:stop`` as the writer thread writes them: their latents, and every column
    and score as whole chunks from ``chunk_start`` (copies, so the table may grow meanwhile)."""

    first: int
    stop: int
    chunk_start: int
    states: dict[str, np.ndarray]
    """By array suffix: rows ``first:stop``, NaN for rows of other shapes."""
    finals: dict[str, np.ndarray]
    columns: dict[str, np.ndarray]
    scores: list[np.ndarray]
    codes: dict[str, list[str]] | None
    """The code tables, when one grew since the last write."""


class RunStore:
    """One run's store. Opened writable by the driver (the only writer, holding the lock) or
    read-only by ``show``, results and anything else that only reads."""

    def __init__(self, path: Path, disk: _Arrays, attrs: dict[str, Any], table: _Table,
                 codes: dict[str, _Codes], lock: int | None) -> None:
        self.path = path
        self._disk = disk
        self._attrs = attrs
        self._table = table
        self._codes = codes
        self._lock = lock
        self._layouts = {int(index): PromptLayout(int(value["num_steps"]),
                                                  tuple(value["latent_shape"]))
                         for index, value in attrs.get("prompt_layouts", {}).items()}
        """The prompts whose steps or latent shape are their own."""
        self._rows_of: dict[int, dict[int, int]] = {}
        """prompt -> candidate -> row, for finished candidates (recorded ones included)."""
        done = table.column("done")
        finished = np.flatnonzero(done)
        prompts, candidates = table.column("prompt"), table.column("candidate")
        for p, c, row in zip(prompts[finished].tolist(), candidates[finished].tolist(),
                             finished.tolist()):
            self._rows_of.setdefault(p, {})[c] = row
        self._written = table.rows
        """Rows below this are on disk; the rest are pending."""
        self._pending: list[_Pending] = []
        self._recent: OrderedDict[int, tuple[np.ndarray, np.ndarray | None]] = OrderedDict()
        """row -> (state, own final or None), oldest first, for every row at or above
        ``_written`` and the written ones that fit in :data:`RECENT_LATENT_BYTES`: what
        :meth:`latent_ref` hands out in units."""
        self._recent_bytes = 0
        self._changed = threading.Condition()
        """Guards the table, the pending rows, the recent latents and ``_written`` between the
        driver and the writer thread; notified when rows are recorded or written."""
        self._writer: threading.Thread | None = None
        self._writer_error: BaseException | None = None
        self._closing = False
        self._awaited = 0
        """How many callers wait for rows to be written (the writer then writes at once)."""

    # ---- opening ----------------------------------------------------------------------------
    @classmethod
    def create(
        cls, path: Path, *, job: dict[str, Any], result_key: str,
        latent_shape: Sequence[int], num_steps: int, prompts: Sequence[str],
        prompt_layouts: dict[int, PromptLayout] | None = None,
    ) -> RunStore:
        """A new store at ``path``, opened for writing. It is built in a folder beside
        ``path`` and renamed into place, so a kill during creation leaves no half store."""
        if path.exists():
            raise StoreError(f"{path} already holds a run; pass --resume to continue it")
        building = path.with_name(f".{path.name}.creating-{uuid.uuid4().hex}")
        try:
            _remove_abandoned_builds(path)
            building.mkdir(parents=True)
            lock = _acquire_lock(building)
        except OSError as error:
            raise StoreError(f"cannot create the store at {path}: "
                             f"{error.strerror or error}") from None
        layouts = {str(index): {"num_steps": layout.num_steps,
                                "latent_shape": list(layout.latent_shape)}
                   for index, layout in (prompt_layouts or {}).items()
                   if (layout.num_steps, tuple(layout.latent_shape))
                   != (num_steps, tuple(latent_shape))}
        try:
            _lay_out(building, {
                "format": FORMAT_VERSION, "job": job, "result_key": result_key,
                "latent_shape": list(latent_shape), "num_steps": num_steps,
                "prompts": list(prompts), "prompt_layouts": layouts,
            })
            os.rename(building, path)
        except BaseException as error:
            os.close(lock)
            shutil.rmtree(building, ignore_errors=True)
            if not isinstance(error, OSError):
                raise
            if path.exists():
                raise StoreError(f"{path} already holds a run; pass --resume to continue it"
                                 ) from None
            raise StoreError(f"cannot create the store at {path}: "
                             f"{error.strerror or error}") from None
        return cls._load(path, _root_attrs(path), lock)

    @classmethod
    def open(cls, path: Path, *, writable: bool = True) -> RunStore:
        """An existing store. ``writable``: take the writer lock (a second writer is refused)
        and clear temporary files a killed writer left; readers never lock."""
        if not path.exists():
            raise StoreError(f"no run store at {path}")
        attrs = _root_attrs(path)
        lock = None
        if writable:
            try:
                lock = _acquire_lock(path)
            except OSError as error:
                raise StoreError(f"cannot open {path} for writing: "
                                 f"{error.strerror or error}") from None
            _remove_partial_files(path)
        try:
            return cls._load(path, attrs, lock)
        except BaseException:
            if lock is not None:
                os.close(lock)
            raise

    @classmethod
    def _load(cls, path: Path, attrs: dict[str, Any], lock: int | None) -> RunStore:
        """Read every column once. ``done`` is read first: a row done by then had its other
        columns and latents written before, so a reader never sees a half-written row."""
        try:
            root = zarr.open_group(store=str(path), mode="r" if lock is None else "r+")
            done_array = root["columns/done"]
            done = np.asarray(done_array[:])  # type: ignore[index]
            tables = root["columns"].attrs.asdict()
            codes = {name: _Codes(tables[name]) for name in _CODE_TABLES}
            disk = _Arrays(
                root=root, latents={name: root[name] for name in _latent_arrays(attrs)},
                columns={name: done_array if name == "done" else root[f"columns/{name}"]
                         for name in _COLUMNS},
                scores=[root[f"scores/{i}"] for i in range(len(codes["score_labels"].values))])
            values = {name: np.asarray(array[:]) for name, array in disk.columns.items()
                      if name != "done"}
            scores = [np.asarray(array[:]) for array in disk.scores]
            for key in ("latent_shape", "num_steps", "prompts"):
                attrs[key]  # noqa: B018  (a store without them is damaged)
        except Exception as error:  # zarr raises many types for damaged data
            raise StoreError(f"{path} is not a readable diffsearch store "
                             f"({type(error).__name__}: {error})") from None
        finished = np.flatnonzero(done)
        rows = int(finished[-1]) + 1 if finished.size else 0
        if any(len(column) < rows for column in [*values.values(), *scores]):
            raise StoreError(f"{path} is not a readable diffsearch store (its columns have "
                             f"fewer rows than its done column)")
        table = _Table({"done": done, **values}, scores, rows)
        return cls(path, disk, attrs, table, codes, lock)

    def close(self) -> None:
        """Write what is pending, stop the writer thread and release the writer lock.
        Idempotent."""
        if self._lock is None:
            return
        try:
            self.flush()
        finally:
            with self._changed:
                self._closing = True
                self._changed.notify_all()
            if self._writer is not None:
                self._writer.join()
            os.close(self._lock)
            self._lock = None

    def __enter__(self) -> RunStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- what the run is ----------------------------------------------------------------------
    @property
    def attrs(self) -> dict[str, Any]:
        """The run's attributes: format, job, result_key, latent_shape, num_steps, prompts."""
        return dict(self._attrs)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self._attrs["latent_shape"])

    @property
    def num_steps(self) -> int:
        return int(self._attrs["num_steps"])

    def num_steps_of(self, prompt_index: int) -> int:
        """The prompt's schedule length (its own ``num_steps``, else the run's)."""
        layout = self._layouts.get(prompt_index)
        return self.num_steps if layout is None else layout.num_steps

    def latent_shape_of(self, prompt_index: int) -> tuple[int, ...]:
        """The prompt's latent shape (from its own size, else the run's)."""
        layout = self._layouts.get(prompt_index)
        return self.latent_shape if layout is None else layout.latent_shape

    def _suffix_of(self, prompt_index: int) -> str:
        shape = self.latent_shape_of(prompt_index)
        return "" if shape == self.latent_shape else shape_suffix(shape)

    def prompt_text(self, prompt_index: int) -> str:
        self._check_prompt(prompt_index)
        return str(self._attrs["prompts"][prompt_index])

    def prompt_indices(self) -> list[int]:
        """The prompts with at least one finished candidate."""
        return sorted(self._rows_of)

    def has_prompt(self, prompt_index: int) -> bool:
        """Whether the prompt has at least one finished candidate."""
        return prompt_index in self._rows_of

    def _check_prompt(self, prompt_index: int) -> None:
        count = len(self._attrs["prompts"])
        if not 0 <= prompt_index < count:
            raise StoreError(f"{self.path}: no prompt {prompt_index} (the run has {count})")

    # ---- writing (the driver) -----------------------------------------------------------------
    def record(self, tasks: Sequence[Task], outcomes: Sequence[Outcome], states: np.ndarray,
               finals: np.ndarray | None = None) -> None:
        """Record finished tasks (of any prompts, one row each) with their latents.

        ``states``: (n, *latent_shape), each task's state at ``task.end`` (a CPU torch tensor
        works too). ``finals``: the same shape, read only for rows whose task is scored on its
        final image and ends before the last step (the rolled-out clean latent: a task ending at
        the last step has its state as final); other rows are ignored, and it may be None when
        no row needs one. The rows are visible to lookups at once and written lazily (see
        :data:`FLUSH_SECONDS`). Recording a candidate already finished raises StoreError.
        """
        self._check_writable()
        count = len(tasks)
        if count == 0:
            return
        if len(outcomes) != count:
            raise ValueError(f"record got {count} tasks but {len(outcomes)} outcomes")
        shapes = {self.latent_shape_of(t.prompt_index) for t in tasks}
        if len(shapes) > 1:
            raise ValueError(f"record got tasks of latent shapes {sorted(shapes)}: a work "
                             f"unit holds prompts of one shape")
        shape = shapes.pop()
        block = self._latent_block(states, count, "states", shape)
        own_final = [self._has_own_final(t.score_on, t.end, self.num_steps_of(t.prompt_index))
                     for t in tasks]
        final_block = None
        if any(own_final):
            if finals is None:
                task = tasks[own_final.index(True)]
                raise ValueError(f"candidate {task.candidate} of prompt {task.prompt_index} "
                                 f"ends at step {task.end} and is scored on its final image, "
                                 f"but record got no finals")
            given = self._latent_block(finals, count, "finals", shape)
            final_block = np.full_like(block, math.nan)
            final_block[own_final] = given[own_final]
        self._check_new(tasks, outcomes)
        self._raise_writer_error()
        with self._changed:  # the code tables grow here too: the writer copies them
            first = self._table.append(*self._row_values(tasks, outcomes))
            for offset, task in enumerate(tasks):
                self._rows_of.setdefault(task.prompt_index, {})[task.candidate] = first + offset
                own = None if final_block is None or not own_final[offset] \
                    else final_block[offset]
                self._recent[first + offset] = (block[offset], own)
                self._recent_bytes += block[offset].nbytes + (0 if own is None else own.nbytes)
            self._forget_old_latents()
            self._pending.append(_Pending(block, final_block,
                                          self._suffix_of(tasks[0].prompt_index)))
            self._changed.notify_all()
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, daemon=True,
                                            name=f"store-writer {self.path.name}")
            self._writer.start()

    @staticmethod
    def _latent_block(values: np.ndarray, count: int, name: str, shape: tuple[int, ...]
                      ) -> np.ndarray:
        block = np.array(values, dtype=np.float32)  # a copy: the caller may reuse its buffer
        expected = (count, *shape)
        if block.shape != expected:
            raise ValueError(f"record: {name} has shape {block.shape}, expected {expected}")
        return block

    def _check_new(self, tasks: Sequence[Task], outcomes: Sequence[Outcome]) -> None:
        seen: set[tuple[int, int]] = set()
        for task, outcome in zip(tasks, outcomes):
            key = (task.prompt_index, task.candidate)
            if (outcome.prompt_index, outcome.candidate) != key:
                raise ValueError(f"record: outcome of candidate {outcome.candidate} of prompt "
                                 f"{outcome.prompt_index} paired with the task of candidate "
                                 f"{task.candidate} of prompt {task.prompt_index}")
            self._check_prompt(task.prompt_index)
            if key in seen or task.candidate in self._rows_of.get(task.prompt_index, {}):
                raise StoreError(f"{self.path}: candidate {task.candidate} of prompt "
                                 f"{task.prompt_index} is already recorded")
            seen.add(key)

    def _row_values(self, tasks: Sequence[Task], outcomes: Sequence[Outcome]
                    ) -> tuple[dict[str, list[Any]], dict[int, list[float]]]:
        """The new rows' column values, and their scores by label index."""
        verifiers, errors = self._codes["verifier_names"], self._codes["error_messages"]
        values: dict[str, list[Any]] = {
            "done": [True] * len(tasks),
            "prompt": [t.prompt_index for t in tasks],
            "candidate": [t.candidate for t in tasks],
            "step": [t.end for t in tasks],
            "start": [t.start for t in tasks],
            "parent": [_or_minus_one(t.parent) for t in tasks],
            "source": [_or_minus_one(t.source_candidate) for t in tasks],
            "seed": [t.seed for t in tasks],
            "nfe": [o.nfe for o in outcomes],
            "rows": [o.rows for o in outcomes],
            "verifier_calls": [o.verifier_calls for o in outcomes],
            "eta": [t.eta for t in tasks],
            "score_on": [_SCORE_CODES[t.score_on] for t in tasks],
            "perturb_kind": [_PERTURB_CODES[t.perturbation.kind] if t.perturbation else -1
                             for t in tasks],
            "perturb_strength": [t.perturbation.strength if t.perturbation else 0.0
                                 for t in tasks],
            "perturb_to": [_to_step(t.perturbation) for t in tasks],
            "reward": [math.nan if o.reward is None else o.reward for o in outcomes],
            "verifier": [verifiers.code(t.verifier) for t in tasks],
            "error": [errors.code(o.error) for o in outcomes],
        }
        labels = self._codes["score_labels"]
        scores: dict[int, list[float]] = {}
        for label in dict.fromkeys(label for o in outcomes for label in o.scores):
            scores[labels.code(label)] = [o.scores.get(label, math.nan) for o in outcomes]
        return values, scores

    def flush(self) -> None:
        """Wait until every recorded row is on disk (raises what the writer thread hit)."""
        self._wait_written(self._table.rows)

    def _wait_written(self, rows: int) -> None:
        with self._changed:
            self._awaited += 1
            self._changed.notify_all()
            try:
                while self._written < rows and self._writer_error is None:
                    self._changed.wait()
            finally:
                self._awaited -= 1
        self._raise_writer_error()

    def _raise_writer_error(self) -> None:
        error = self._writer_error
        if error is None:
            return
        if isinstance(error, OSError):
            raise StoreError(f"cannot write the store at {self.path}: "
                             f"{error.strerror or error}") from error
        raise StoreError(f"writing the store at {self.path} failed: "
                         f"{type(error).__name__}: {error}") from error

    # ---- the writer thread --------------------------------------------------------------------
    def _write_loop(self) -> None:
        """Write pending rows as they come, each write taking every row recorded so far, at
        most one write per :data:`WRITE_INTERVAL` unless someone waits for rows."""
        last_write = -math.inf
        while True:
            with self._changed:
                while not self._pending and not self._closing:
                    self._changed.wait()
                if not self._pending:
                    return
                while not (self._closing or self._awaited
                           or time.monotonic() - last_write >= WRITE_INTERVAL):
                    self._changed.wait(max(0.0, last_write + WRITE_INTERVAL - time.monotonic()))
                write = self._take_pending()
            last_write = time.monotonic()
            try:
                self._write(write)
            except BaseException as error:  # reported to the driver at its next call
                with self._changed:
                    self._writer_error = error
                    self._changed.notify_all()
                return
            with self._changed:
                self._written = write.stop
                self._forget_old_latents()
                self._changed.notify_all()

    def _forget_old_latents(self) -> None:
        """Drop the oldest written rows' latents beyond :data:`RECENT_LATENT_BYTES` (rows not
        on disk stay). Called with ``_changed`` held."""
        while self._recent_bytes > RECENT_LATENT_BYTES:
            row, (state, final) = next(iter(self._recent.items()))
            if row >= self._written:
                return
            del self._recent[row]
            self._recent_bytes -= state.nbytes + (0 if final is None else final.nbytes)

    def _take_pending(self) -> _Write:
        """The pending rows as one write, copied out of the table (the driver goes on
        appending while it is written). Called with ``_changed`` held."""
        first, stop = self._written, self._table.rows
        lo = first // COLUMN_CHUNK * COLUMN_CHUNK
        hi = -(-stop // COLUMN_CHUNK) * COLUMN_CHUNK
        columns = {name: self._table.padded(self._table.column(name), fill, lo, hi)
                   for name, (_, fill) in _COLUMNS.items()}
        scores = [self._table.padded(self._table.score(i), math.nan, lo, hi)
                  for i in range(self._table.score_count)]
        states: dict[str, np.ndarray] = {}
        finals: dict[str, np.ndarray] = {}
        offset = 0
        for pending in self._pending:
            rows = slice(offset, offset + len(pending.states))
            for slabs, values in ((states, pending.states), (finals, pending.finals)):
                if values is None:
                    continue
                if pending.shape not in slabs:
                    slabs[pending.shape] = np.full((stop - first, *values.shape[1:]), math.nan,
                                                   dtype=np.float32)
                slabs[pending.shape][rows] = values
            offset = rows.stop
        codes = None
        if any(table.grown for table in self._codes.values()):
            codes = {name: list(table.values) for name, table in self._codes.items()}
            for table in self._codes.values():
                table.grown = False
        self._pending = []
        return _Write(first=first, stop=stop, chunk_start=lo, states=states, finals=finals,
                      columns=columns, scores=scores, codes=codes)

    def _write(self, write: _Write) -> None:
        """Latents first, then the columns and code tables, ``done`` last, so a kill at any
        point leaves the rows either finished or ignored."""
        self._grow_on_disk(write.stop, len(write.scores))
        for kind, slabs in (("state", write.states), ("final", write.finals)):
            for suffix, slab in slabs.items():
                self._disk.latents[_array_name(kind, suffix)][write.first:write.stop] = slab
        for name, values in write.columns.items():
            if name != "done":
                self._write_chunks(self._disk.columns[name], values, write.chunk_start)
        for index, values in enumerate(write.scores):
            self._write_chunks(self._score_array(index), values, write.chunk_start)
        if write.codes is not None:
            self._disk.root["columns"].attrs.update(write.codes)
        self._write_chunks(self._disk.columns["done"], write.columns["done"], write.chunk_start)

    def _grow_on_disk(self, rows: int, score_count: int) -> None:
        """Resize the arrays (metadata only) to whole shards and chunks holding ``rows``."""
        latent_rows = -(-rows // SHARD_ROWS) * SHARD_ROWS
        for array in self._disk.latents.values():
            if array.shape[0] < latent_rows:
                array.resize((latent_rows, *array.shape[1:]))
        column_rows = -(-rows // COLUMN_CHUNK) * COLUMN_CHUNK
        scores = [self._score_array(i) for i in range(score_count)]
        for array in [*self._disk.columns.values(), *scores]:
            if array.shape[0] < column_rows:
                array.resize((column_rows,))

    def _score_array(self, index: int) -> zarr.Array:
        """The array of score label ``index``, created when the label first appears (replacing
        one that a killed writer created but never named in the code table)."""
        if index == len(self._disk.scores):
            self._disk.scores.append(self._disk.root["scores"].create_array(  # type: ignore
                str(index), shape=self._disk.columns["done"].shape, chunks=(COLUMN_CHUNK,),
                dtype="float64", fill_value=math.nan, chunk_key_encoding=_KEYS,
                overwrite=True))
        return self._disk.scores[index]

    @staticmethod
    def _write_chunks(array: zarr.Array, values: np.ndarray, chunk_start: int) -> None:
        """Write whole chunks from memory (``values`` starts at a chunk boundary and is
        padded), so Zarr never reads a chunk back to merge into it."""
        stop = min(chunk_start + len(values), array.shape[0])
        array[chunk_start:stop] = values[:stop - chunk_start]

    def _check_writable(self) -> None:
        if self._lock is None:
            raise RuntimeError(f"{self.path} is not open for writing (read-only or closed)")

    # ---- reading ---------------------------------------------------------------------------
    def lookup(self, task: Task) -> Outcome | None:
        """The recorded outcome of ``task`` if its candidate finished (resume by replay).

        A finished candidate whose recorded task differs from ``task`` means the strategy did not
        replay the same decisions: refusing is safer than mixing two runs.
        """
        row = self._rows_of.get(task.prompt_index, {}).get(task.candidate)
        if row is None:
            return None
        table = self._table
        expected = {
            "step": task.end, "start": task.start, "seed": task.seed,
            "parent": _or_minus_one(task.parent), "source": _or_minus_one(task.source_candidate),
            "score_on": _SCORE_CODES[task.score_on],
        }
        differing = [name for name, value in expected.items()
                     if table.column(name)[row] != value]
        if differing:
            raise StoreError(
                f"{self.path}: stored candidate {task.candidate} of prompt {task.prompt_index} "
                f"differs from the replayed task in {', '.join(differing)}; the run cannot be "
                f"resumed safely")
        record = self._records([row])[0]
        return Outcome(prompt_index=task.prompt_index, candidate=task.candidate,
                       step=record.step, reward=record.reward, scores=record.scores,
                       nfe=record.nfe, rows=record.rows, verifier_calls=record.verifier_calls,
                       error=record.error)

    def parents(self, prompt_index: int) -> dict[int, int | None]:
        """Parent links of a prompt's finished candidates (frame chains walk them)."""
        self._check_prompt(prompt_index)
        parents = self._table.column("parent")
        return {c: None if parents[row] < 0 else int(parents[row])
                for c, row in sorted(self._rows_of.get(prompt_index, {}).items())}

    def finished_candidates(self, prompt_index: int) -> list[CandidateRecord]:
        """A prompt's finished candidates, by candidate number (none yet: an empty list)."""
        self._check_prompt(prompt_index)
        by_candidate = self._rows_of.get(prompt_index, {})
        return self._records([by_candidate[c] for c in sorted(by_candidate)])

    def all_finished(self) -> dict[int, list[CandidateRecord]]:
        """Every prompt's finished candidates in one pass (what results and ``show`` read)."""
        order = sorted(self._rows_of)
        rows = [row for p in order for _, row in sorted(self._rows_of[p].items())]
        records = iter(self._records(rows))
        return {p: [next(records) for _ in self._rows_of[p]] for p in order}

    def _records(self, rows: list[int]) -> list[CandidateRecord]:
        """The records of ``rows``, each column gathered once."""
        index = np.asarray(rows, dtype=np.int64)
        get = {name: self._table.column(name)[index].tolist() for name in (
            "candidate", "step", "parent", "seed", "reward", "nfe", "rows", "verifier_calls",
            "score_on", "error")}
        labels = self._codes["score_labels"].values
        scores = [self._table.score(i)[index].tolist() for i in range(len(labels))]
        errors = self._codes["error_messages"]
        records = []
        for i in range(len(rows)):
            error = errors.value(get["error"][i])
            reward = get["reward"][i]
            records.append(CandidateRecord(
                candidate=get["candidate"][i], step=get["step"][i],
                parent=None if get["parent"][i] < 0 else get["parent"][i],
                seed=get["seed"][i], reward=None if math.isnan(reward) else reward,
                scores={label: column[i] for label, column in zip(labels, scores)
                        if not math.isnan(column[i])},
                nfe=get["nfe"][i], rows=get["rows"][i], verifier_calls=get["verifier_calls"][i],
                error=error, has_final=get["score_on"][i] == _FINAL and error is None,
            ))
        return records

    # ---- latents ------------------------------------------------------------------------------
    def latent_ref(self, prompt_index: int, candidate: int, *, final: bool = False
                   ) -> LatentRef:
        """Where a finished candidate's latent is, for a worker to read: the latent itself
        while the driver holds it (:data:`RECENT_LATENT_BYTES`, up to
        :data:`INLINE_LATENT_BYTES` a latent), else its row on disk (a row not written yet is
        written first). ``final``: its final latent, which is its state when its task ended at
        the last step."""
        row = self._rows_of.get(prompt_index, {}).get(candidate)
        if row is None:
            raise StoreError(f"{self.path}: candidate {candidate} of prompt {prompt_index} "
                             f"is not finished")
        step = int(self._table.column("step")[row])
        num_steps, shape = self.num_steps_of(prompt_index), self._suffix_of(prompt_index)
        if not final or step == num_steps:
            ref = LatentRef(row=row, step=step, shape=shape)
        elif self._has_own_final(int(self._table.column("score_on")[row]), step, num_steps):
            ref = LatentRef(row=row, step=num_steps, final=True, shape=shape)
        else:
            raise StoreError(f"{self.path}: candidate {candidate} of prompt {prompt_index} has "
                             f"no final latent (its task stopped at step {step} and was not "
                             f"rolled out)")
        with self._changed:
            held, written = self._recent.get(row), row < self._written
        if held is None:  # forgotten only once on disk
            return ref
        value = held[1] if ref.final else held[0]
        if value is not None and value.nbytes <= INLINE_LATENT_BYTES:
            return replace(ref, value=value)
        if not written:
            self._wait_written(row + 1)
        return ref

    def read_latents(self, prompt_index: int, candidates: Sequence[int], *,
                     final: bool = False) -> torch.Tensor:
        """Candidates' latents, (len(candidates), *latent_shape) float32 (see latent_ref)."""
        refs = [self.latent_ref(prompt_index, c, final=final) for c in candidates]
        return read_latent_rows(self.path, refs)

    @staticmethod
    def _has_own_final(score_on: ScoreOn | int, end: int, num_steps: int) -> bool:
        """Whether a task's final latent differs from its state: scored on the final image
        and stopped before the last step (of its prompt's ``num_steps``), so the worker rolled
        it out."""
        code = score_on if isinstance(score_on, int) else _SCORE_CODES[score_on]
        return code == _FINAL and end < num_steps


class _LatentArrays:
    """One store's ``state`` and ``final`` arrays as a worker reads them. Zarr caches an
    array's metadata (its shape) but not its chunks, so a handle is reopened when the array's
    metadata file changed (the driver grew it); rows written since are read as they are."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._arrays: dict[str, tuple[tuple[int, int, int], zarr.Array]] = {}

    def array(self, name: str) -> zarr.Array:
        try:
            stat = os.stat(self.path / name / "zarr.json")
        except FileNotFoundError:
            raise StoreError(f"no run store at {self.path}") from None
        signature = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        cached = self._arrays.get(name)
        if cached is None or cached[0] != signature:
            cached = (signature, zarr.open_array(store=str(self.path), path=name, mode="r"))
            self._arrays[name] = cached
        return cached[1]

    def read(self, refs: Sequence[LatentRef]) -> torch.Tensor:
        suffixes = {ref.shape for ref in refs}
        if len(suffixes) > 1:
            raise ValueError(f"refs of several latent shapes ({sorted(suffixes)}) cannot be "
                             f"read as one tensor")
        suffix = suffixes.pop() if suffixes else ""
        state = self.array(_array_name("state", suffix))
        out = np.empty((len(refs), *state.shape[1:]), dtype=np.float32)
        for kind in ("state", "final"):
            positions = [i for i, ref in enumerate(refs) if ref.final == (kind == "final")]
            if not positions:
                continue
            name = _array_name(kind, suffix)
            array = state if kind == "state" else self.array(name)
            rows = np.array([refs[i].row for i in positions])
            if rows.min() < 0 or rows.max() >= array.shape[0]:
                raise IndexError(f"{self.path}: row {int(rows.max())} of {name} is not "
                                 f"written (refs must come from RunStore.latent_ref)")
            unique, inverse = np.unique(rows, return_inverse=True)
            out[positions] = array.get_orthogonal_selection((unique,))[inverse]
        import torch  # here: reading the store's tables (show, results) needs no torch

        return torch.from_numpy(out)


_READERS: dict[str, _LatentArrays] = {}


def read_latent_rows(store_path: str | Path, refs: Sequence[LatentRef]) -> torch.Tensor:
    """The latents at ``refs``, (len(refs), *latent_shape) float32 in order: what a worker
    reads for its tasks' sources. A ref that carries its latent is not read from disk."""
    stored = [i for i, ref in enumerate(refs) if ref.value is None]
    if len(stored) == len(refs):
        return _reader(store_path).read(refs)
    import torch  # here: reading the store's tables (show, results) needs no torch

    shape = next(ref.value.shape for ref in refs if ref.value is not None)
    out = np.empty((len(refs), *shape), dtype=np.float32)
    for i, ref in enumerate(refs):
        if ref.value is not None:
            out[i] = ref.value
    if stored:
        out[stored] = _reader(store_path).read([refs[i] for i in stored]).numpy()
    return torch.from_numpy(out)


def _reader(store_path: str | Path) -> _LatentArrays:
    """This process's reader of the store at ``store_path``: it opens only the latent arrays
    (not the root attributes, which hold every prompt), once per store."""
    key = os.path.abspath(store_path)
    reader = _READERS.get(key)
    if reader is None:
        reader = _READERS[key] = _LatentArrays(Path(key))
    return reader


# ---- on disk ------------------------------------------------------------------------------------
def _lay_out(path: Path, attrs: dict[str, Any]) -> None:
    """Create the empty arrays of a new store at ``path``."""
    root = zarr.open_group(store=str(path), mode="a")  # holds only the lock file yet
    for name, latent_shape in _latent_arrays(attrs).items():
        root.create_array(
            name, shape=(0, *latent_shape), chunks=(1, *latent_shape),
            shards=(SHARD_ROWS, *latent_shape), dtype="float32", fill_value=math.nan,
            compressors=None, chunk_key_encoding=_KEYS)
    columns = root.create_group("columns")
    for name, (dtype, fill) in _COLUMNS.items():
        columns.create_array(name, shape=(0,), chunks=(COLUMN_CHUNK,), dtype=dtype,
                             fill_value=fill, chunk_key_encoding=_KEYS)
    columns.attrs.update({name: [] for name in _CODE_TABLES})
    root.create_group("scores")
    root.attrs.update(attrs)


def _array_name(kind: str, suffix: str) -> str:
    """``state`` / ``final``, or ``state_4x12x8`` for a prompt of another latent shape."""
    return f"{kind}_{suffix}" if suffix else kind


def _latent_arrays(attrs: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every latent array of a store with these attributes, by name, with its row shape."""
    main = tuple(attrs["latent_shape"])
    shapes = dict.fromkeys([main, *(tuple(layout["latent_shape"]) for layout
                                    in attrs.get("prompt_layouts", {}).values())])
    return {_array_name(kind, "" if shape == main else shape_suffix(shape)): shape
            for shape in shapes for kind in ("state", "final")}


def _root_attrs(path: Path) -> dict[str, Any]:
    """The root attributes, once the store's format is the one this diffsearch reads."""
    try:
        attrs = zarr.open_group(store=str(path), mode="r").attrs.asdict()
    except Exception as error:  # zarr raises many types for damaged metadata
        raise StoreError(f"{path} is not a readable diffsearch store "
                         f"({type(error).__name__}: {error})") from None
    version = attrs.get("format")
    if version is None:
        raise StoreError(f"{path} is not a diffsearch store (no store format in its "
                         f"attributes)")
    if version != FORMAT_VERSION:
        if isinstance(version, int) and version < FORMAT_VERSION:
            raise StoreError(f"{path} has store format {version} (written by an older "
                             f"diffsearch); this diffsearch reads format {FORMAT_VERSION}: "
                             f"run into a new folder")
        raise StoreError(f"{path} has store format {version}; this diffsearch reads format "
                         f"{FORMAT_VERSION}: upgrade diffsearch to read it")
    return attrs


def _acquire_lock(path: Path) -> int:
    """Take the writer lock of the store folder ``path`` (held until the fd is closed)."""
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(f"{path} is being written by another diffsearch process") from None
    except OSError as error:
        if error.errno not in _NO_LOCKS:
            os.close(fd)
            raise
        warnings.warn(f"{path}: this file system has no file locks, so nothing stops a "
                      f"second diffsearch process from writing the store too", stacklevel=3)
    return fd


def _remove_partial_files(path: Path) -> None:
    """Delete the temporary files of writes a killed writer never renamed into place."""
    for folder, _, files in os.walk(path):
        for name in files:
            if name.endswith(".partial"):
                Path(folder, name).unlink(missing_ok=True)


def _remove_abandoned_builds(path: Path) -> None:
    """Delete stores a killed :meth:`RunStore.create` left half built beside ``path`` (one
    still being built holds its lock and is left alone)."""
    for building in path.parent.glob(f".{path.name}.creating-*"):
        try:
            lock = _acquire_lock(building)
        except (StoreError, OSError):
            continue
        shutil.rmtree(building, ignore_errors=True)
        os.close(lock)


def _or_minus_one(value: int | None) -> int:
    return -1 if value is None else value


def _to_step(perturbation: Perturbation | None) -> int:
    if perturbation is None or perturbation.to_step is None:
        return -1
    return perturbation.to_step
