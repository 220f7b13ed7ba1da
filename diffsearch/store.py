"""The run store: one Zarr v3 group per run, on disk (or any path every worker can reach).

Layout::

    store.zarr/                 attrs: format, job (the validated job), result_key, latent_shape
      p00000/                   attrs: prompt, errors {candidate: message}, verifiers {cand: name}
        latent  (N, C, H, W)    the state each candidate reached (at ``step``); one chunk per
                                candidate, so concurrent writers never share a chunk
        final   (N, C, H, W)    the clean latent of every candidate scored on its final image
        done, step, start, parent, source, seed, nfe, rows, verifier_calls, eta, score_on,
        perturb_kind, perturb_strength, perturb_to, reward      one value per candidate
        scores/<verifier>       one float64 per candidate (NaN: not scored)

Workers only write latent chunks. Only the driver writes metadata and resizes arrays, and it
writes ``done`` last: a candidate is finished exactly when ``done`` is set, so a run killed at
any moment resumes by recomputing the unfinished ones (zarr's local store replaces chunk files
atomically, so a kill never leaves a torn chunk). Together with the task records the store is
enough to rebuild any candidate bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

from diffsearch.errors import StoreError
from diffsearch.tasks import Outcome, Perturbation, PerturbKind, ScoreOn, Task

FORMAT_VERSION = 2
"""2: a ``rows`` array (rows computed per candidate); format 1 stores had none."""
_META_CHUNK = 1024
_INITIAL_CAPACITY = 64
_PERTURB_CODES = {kind: code for code, kind in enumerate(PerturbKind)}
_SCORE_CODES = {kind: code for code, kind in enumerate(ScoreOn)}

# name -> (dtype, fill value): the per-candidate metadata arrays.
_META: dict[str, tuple[str, Any]] = {
    "done": ("bool", False),
    "step": ("int32", -1),
    "start": ("int32", -1),
    "parent": ("int64", -1),
    "source": ("int64", -1),
    "seed": ("int64", 0),
    "nfe": ("int32", 0),
    "rows": ("int32", 0),
    "verifier_calls": ("int32", 0),
    "eta": ("float64", 0.0),
    "score_on": ("int8", -1),
    "perturb_kind": ("int8", -1),
    "perturb_strength": ("float64", 0.0),
    "perturb_to": ("int32", -1),
    "reward": ("float64", np.nan),
}


def prompt_group_name(prompt_index: int) -> str:
    return f"p{prompt_index:05d}"


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
    rows: int = 0
    """Rows the model computed for it (:attr:`diffsearch.tasks.Outcome.rows`)."""


class RunStore:
    """Access to one run's store, from the driver or from a worker."""

    def __init__(self, root: zarr.Group, path: Path) -> None:
        self._root = root
        self.path = path

    # ---- opening ----------------------------------------------------------------------------
    @classmethod
    def create(
        cls, path: Path, *, job: dict[str, Any], result_key: str,
        latent_shape: Sequence[int], num_steps: int,
    ) -> RunStore:
        try:
            root = zarr.open_group(store=str(path), mode="w-")
        except (FileExistsError, zarr.errors.ContainsGroupError):
            raise StoreError(f"{path} already holds a run; pass --resume to continue it") from None
        except OSError as error:
            raise StoreError(f"cannot create the store at {path}: {error.strerror}") from None
        root.attrs.update({
            "format": FORMAT_VERSION, "job": job, "result_key": result_key,
            "latent_shape": list(latent_shape), "num_steps": num_steps,
        })
        return cls(root, path)

    @classmethod
    def open(cls, path: Path, *, writable: bool = True) -> RunStore:
        if not path.exists():
            raise StoreError(f"no run store at {path}")
        try:
            root = zarr.open_group(store=str(path), mode="r+" if writable else "r")
            version = root.attrs["format"]
        except Exception as error:  # zarr raises many types for damaged metadata
            raise StoreError(f"{path} is not a readable diffsearch store ({error})") from None
        if version != FORMAT_VERSION:
            raise StoreError(f"{path} has store format {version}; this diffsearch reads "
                             f"format {FORMAT_VERSION}")
        return cls(root, path)

    @property
    def attrs(self) -> dict[str, Any]:
        return dict(self._root.attrs)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        return tuple(self._root.attrs["latent_shape"])

    # ---- prompts -----------------------------------------------------------------------------
    def _group(self, prompt_index: int) -> zarr.Group:
        try:
            return self._root[prompt_group_name(prompt_index)]  # type: ignore[return-value]
        except KeyError:
            raise StoreError(f"{self.path}: prompt {prompt_index} has no data") from None

    def has_prompt(self, prompt_index: int) -> bool:
        return prompt_group_name(prompt_index) in self._root

    def ensure_prompt(self, prompt_index: int, prompt: str) -> None:
        """Create a prompt's arrays (driver only). Idempotent, so resumes call it freely."""
        if self.has_prompt(prompt_index):
            return
        group = self._root.create_group(prompt_group_name(prompt_index))
        group.attrs.update({"prompt": prompt, "errors": {}, "verifiers": {}})
        shape = (_INITIAL_CAPACITY, *self.latent_shape)
        for name in ("latent", "final"):
            group.create_array(name, shape=shape, chunks=(1, *self.latent_shape),
                               dtype="float32", fill_value=np.nan)
        for name, (dtype, fill) in _META.items():
            group.create_array(name, shape=(_INITIAL_CAPACITY,), chunks=(_META_CHUNK,),
                               dtype=dtype, fill_value=fill)
        group.create_group("scores")

    def capacity(self, prompt_index: int) -> int:
        return self._group(prompt_index)["done"].shape[0]  # type: ignore[index]

    def ensure_capacity(self, prompt_index: int, candidates: int) -> None:
        """Grow a prompt's arrays to hold ``candidates`` (driver only, before submitting)."""
        group = self._group(prompt_index)
        current = group["done"].shape[0]  # type: ignore[index]
        if candidates <= current:
            return
        new = max(candidates, 2 * current)
        for _, array in group.arrays():
            array.resize((new, *array.shape[1:]))
        for _, array in group["scores"].arrays():  # type: ignore[union-attr]
            array.resize((new,))

    # ---- latents (workers) ----------------------------------------------------------------------
    def write_latents(self, prompt_index: int, candidates: Sequence[int], latents: torch.Tensor,
                      *, final: bool = False) -> None:
        array = self._group(prompt_index)["final" if final else "latent"]
        values = latents.detach().to("cpu", torch.float32).numpy()
        for row, candidate in enumerate(candidates):
            array[candidate] = values[row]  # type: ignore[index]

    def read_latents(self, prompt_index: int, candidates: Sequence[int], *,
                     final: bool = False) -> torch.Tensor:
        array = self._group(prompt_index)["final" if final else "latent"]
        rows = [np.asarray(array[candidate]) for candidate in candidates]  # type: ignore[index]
        return torch.from_numpy(np.stack(rows))

    def read_steps(self, prompt_index: int, candidates: Sequence[int]) -> list[int]:
        steps = self._group(prompt_index)["step"]
        return [int(steps[c]) for c in candidates]  # type: ignore[index]

    # ---- metadata (driver) ----------------------------------------------------------------------
    def record(self, tasks: Sequence[Task], outcomes: Sequence[Outcome]) -> None:
        """Write the metadata of finished tasks of one prompt; ``done`` goes last."""
        if not tasks:
            return
        prompt_index = tasks[0].prompt_index
        group = self._group(prompt_index)
        self.ensure_capacity(prompt_index, max(t.candidate for t in tasks) + 1)
        index = np.array([t.candidate for t in tasks])
        columns: dict[str, list[Any]] = {
            "step": [t.end for t in tasks],
            "start": [t.start for t in tasks],
            "parent": [-1 if t.parent is None else t.parent for t in tasks],
            "source": [-1 if t.source_candidate is None else t.source_candidate for t in tasks],
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
            "reward": [np.nan if o.reward is None else o.reward for o in outcomes],
        }
        for name, values in columns.items():
            group[name].set_coordinate_selection(index, np.asarray(values))  # type: ignore
        labels = sorted({label for o in outcomes for label in o.scores})
        for label in labels:
            array = self._score_array(group, label)
            array.set_coordinate_selection(
                index, np.array([o.scores.get(label, np.nan) for o in outcomes]))
        errors = {str(o.candidate): o.error for o in outcomes if o.error}
        verifiers = {str(t.candidate): t.verifier for t in tasks if t.verifier}
        if errors or verifiers:
            group.attrs.update({
                "errors": {**group.attrs["errors"], **errors},
                "verifiers": {**group.attrs["verifiers"], **verifiers},
            })
        group["done"].set_coordinate_selection(index, np.ones(len(tasks), dtype=bool))  # type: ignore

    def _score_array(self, group: zarr.Group, label: str) -> zarr.Array:
        scores = group["scores"]
        if label not in scores:  # type: ignore[operator]
            return scores.create_array(  # type: ignore[union-attr]
                label, shape=(group["done"].shape[0],), chunks=(_META_CHUNK,),  # type: ignore
                dtype="float64", fill_value=np.nan)
        return scores[label]  # type: ignore[index,return-value]

    def lookup(self, task: Task) -> Outcome | None:
        """The stored outcome of ``task`` if it finished in an earlier run (resume by replay).

        A finished candidate whose recorded task differs from ``task`` means the strategy did not
        replay the same decisions: refusing is safer than mixing two runs.
        """
        if not self.has_prompt(task.prompt_index):
            return None
        group = self._group(task.prompt_index)
        if task.candidate >= group["done"].shape[0] or not group["done"][task.candidate]:  # type: ignore
            return None
        c = task.candidate
        stored = {name: group[name][c] for name in _META}  # type: ignore[index]
        expected = {
            "step": task.end, "start": task.start, "seed": task.seed,
            "parent": -1 if task.parent is None else task.parent,
            "source": -1 if task.source_candidate is None else task.source_candidate,
            "score_on": _SCORE_CODES[task.score_on],
        }
        differing = [name for name, value in expected.items() if stored[name] != value]
        if differing:
            raise StoreError(
                f"{self.path}: stored candidate {c} of prompt {task.prompt_index} differs from "
                f"the replayed task in {', '.join(differing)}; the run cannot be resumed safely")
        record = self._candidate(group, c, stored)
        return Outcome(prompt_index=task.prompt_index, candidate=c, step=record.step,
                       reward=record.reward, scores=record.scores, nfe=record.nfe,
                       rows=record.rows, verifier_calls=record.verifier_calls, error=record.error)

    # ---- reading back -------------------------------------------------------------------------
    def prompt_text(self, prompt_index: int) -> str:
        return str(self._group(prompt_index).attrs["prompt"])

    def prompt_indices(self) -> list[int]:
        return sorted(int(name[1:]) for name, _ in self._root.groups())

    def finished_candidates(self, prompt_index: int) -> list[CandidateRecord]:
        """Every finished candidate of a prompt; each metadata array is read once."""
        group = self._group(prompt_index)
        done = np.asarray(group["done"][:])  # type: ignore[index]
        columns = {name: np.asarray(group[name][:]) for name in _META}  # type: ignore[index]
        score_columns = {label: np.asarray(array[:])
                         for label, array in group["scores"].arrays()}  # type: ignore[union-attr]
        records = []
        for c in np.flatnonzero(done):
            stored = {name: values[c] for name, values in columns.items()}
            scores = {label: float(values[c]) for label, values in score_columns.items()}
            records.append(self._candidate(group, int(c), stored, scores))
        return records

    def read_parents(self, prompt_index: int) -> dict[int, int | None]:
        """Parent links of a prompt's finished candidates: two array reads, for the clip
        assembly that walks them on every batch of a frame chain."""
        group = self._group(prompt_index)
        done = np.asarray(group["done"][:])  # type: ignore[index]
        parents = np.asarray(group["parent"][:])  # type: ignore[index]
        return {int(c): None if parents[c] < 0 else int(parents[c]) for c in np.flatnonzero(done)}

    def _candidate(self, group: zarr.Group, c: int, stored: dict[str, Any],
                   all_scores: dict[str, float] | None = None) -> CandidateRecord:
        if all_scores is None:
            all_scores = {label: float(array[c])
                          for label, array in group["scores"].arrays()}  # type: ignore[union-attr]
        scores = {label: value for label, value in all_scores.items() if not np.isnan(value)}
        reward = float(stored["reward"])
        error = group.attrs["errors"].get(str(c))
        return CandidateRecord(
            candidate=c, step=int(stored["step"]),
            parent=None if stored["parent"] < 0 else int(stored["parent"]),
            seed=int(stored["seed"]), reward=None if np.isnan(reward) else reward,
            scores=scores, nfe=int(stored["nfe"]), rows=int(stored["rows"]),
            verifier_calls=int(stored["verifier_calls"]), error=error,
            has_final=stored["score_on"] == _SCORE_CODES[ScoreOn.FINAL] and error is None,
        )


def _to_step(perturbation: Perturbation | None) -> int:
    if perturbation is None or perturbation.to_step is None:
        return -1
    return perturbation.to_step
