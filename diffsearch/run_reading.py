"""Reading a run folder back: what ``diffsearch show`` prints, for finished and stopped runs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffsearch.errors import StoreError
from diffsearch.runtime import candidate_image_path
from diffsearch.store import RunStore


def best_per_prompt(run_dir: Path) -> list[dict[str, Any]]:
    """One row per prompt: index, prompt, best score, image path (relative to ``run_dir``).

    A finished run is read from results.json (the strategy's own choice of best); a stopped one
    from the store, where the best is the highest-reward finished candidate with a final image.
    """
    results = run_dir / "results.json"
    if results.is_file():
        data = json.loads(results.read_text())
        return [
            {"index": p["index"], "prompt": p["prompt"],
             "score": p["best"]["score"] if p["best"] else None,
             "candidate": p["best"]["candidate"] if p["best"] else None,
             "image": p["best"]["image"] if p["best"] else None, "finished": True}
            for p in data["prompts"]
        ]
    store_path = run_dir / "store.zarr"
    if not store_path.exists():
        raise StoreError(f"{run_dir} is not a diffsearch run (no results.json, no store.zarr)")
    store = RunStore.open(store_path, writable=False)
    rows = []
    for index in store.prompt_indices():
        finals = [c for c in store.finished_candidates(index)
                  if c.has_final and c.reward is not None]
        best = max(finals, key=lambda c: c.reward, default=None)  # type: ignore[arg-type,return-value]
        rows.append({
            "index": index, "prompt": store.prompt_text(index),
            "score": best.reward if best else None,
            "candidate": best.candidate if best else None,
            "image": candidate_image_path(index, best.candidate) if best else None,
            "finished": False,
        })
    return rows
