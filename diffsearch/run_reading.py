"""Reading a run folder back: what ``diffsearch show`` prints, for finished and stopped runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffsearch import run_folder
from diffsearch.errors import StoreError
from diffsearch.image_output import shown_candidate
from diffsearch.job import verifier_label
from diffsearch.store import CandidateRecord, RunStore
from diffsearch.strategies.common import best_of


def best_per_prompt(run_dir: Path) -> list[dict[str, Any]]:
    """One row per prompt: index, prompt, best score, image path (relative to ``run_dir``).

    A finished run is read from results.json (the strategy's own choice of best); a stopped one
    from the store, by the strategies' rule (:func:`~diffsearch.strategies.common.best_of`) over
    the answers it holds (:func:`stored_answers`).
    """
    results = run_dir / run_folder.RESULTS
    if results.is_file():
        data = json.loads(results.read_text())
        return [
            {"index": p["index"], "prompt": p["prompt"],
             "score": p["best"]["score"] if p["best"] else None,
             "candidate": p["best"]["candidate"] if p["best"] else None,
             "image": p["best"]["image"] if p["best"] else None, "finished": True}
            for p in data["prompts"]
        ]
    store_path = run_dir / run_folder.STORE
    if not store_path.exists():
        raise StoreError(f"{run_dir} is not a diffsearch run (no results.json, no store.zarr)")
    store = RunStore.open(store_path, writable=False)
    guide = verifier_label(store.attrs["job"]["verifier"])
    rows = []
    for index, candidates in sorted(store.all_finished().items()):
        best = best_of(stored_answers(candidates, guide))
        image = run_folder.best_image(index)
        rows.append({
            "index": index, "prompt": store.prompt_text(index),
            "score": best.reward if best else None,
            "candidate": best.candidate if best else None,
            "image": image if best and shown_candidate(run_dir / image) == best.candidate
            else None,
            "finished": False,
        })
    return rows


def stored_answers(candidates: list[CandidateRecord], guide: str) -> list[CandidateRecord]:
    """The stored candidates that compete for the best, read from what the store keeps:
    final images scored by the guiding verifier ``guide`` (the store's side of
    :meth:`~diffsearch.strategies.base.Strategy.is_answer`; an x0 estimate has no final image,
    and a task with its own verifier was not scored by ``guide``). Clips are not final images:
    a stopped clip search shows no best."""
    return [c for c in candidates
            if c.has_final and c.reward is not None and c.scores.get(guide) == c.reward]
