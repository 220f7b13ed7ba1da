"""Does the run store scale to batch jobs? Files, bytes and times of synthetic stores.

Each configuration builds a store of P prompts x 4 candidates the way a best-of-4 run records
it: units of 8 candidates (two prompts' tasks packed together) recorded one after another, then
closed. ``last``: tasks end at the last step, so a final latent is its state and is not stored
again; ``early``: tasks end before it and are rolled out, so ``state`` and ``final`` both fill.
Reported per configuration:

- ``files``, ``bytes``: everything under store.zarr, of which ``metadata_files`` (a constant:
  one per array and group, and the lock); ``data_files_per_64_candidates``: the rest (shards
  and column chunks) per 64 candidates; ``raw_latent_bytes``: the latents it holds (rows x
  latent bytes, twice for ``early``); ``bytes_per_raw``;
- ``create_record_close_s``: creating the store, recording every unit, the last flush;
- ``open_s``: opening it for writing, as a resumed run does (reads every column once);
- ``lookup_all_s``: the resumed run's replay, one lookup per task;
- ``all_finished_s``: every prompt's finished candidates from a read-only open (what
  ``diffsearch show`` and results read), open included;
- ``show_read_s``: what ``diffsearch show`` computes for a stopped run (each prompt's best from
  the store); ``show_cli_s``: the ``diffsearch show`` command itself, Python's start and
  imports included.

    nice python benchmarks/store_scale.py [--prompts 800 10000] [--shape 4 8 8] [--dir PATH]

``--shape`` defaults to the bundled shapes model's latent; ``--dir`` puts the stores on the file
system to measure (NFS, Lustre), by default a temporary folder. Prints a table and saves JSON
(``benchmarks/results/store_scale.json``).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from diffsearch.run_reading import best_per_prompt
from diffsearch.store import LOCK_FILE, SHARD_ROWS, RunStore
from diffsearch.tasks import Outcome, ScoreOn, Task

from _report import command_line, save_report

CANDIDATES = 4
UNIT = 8
STEPS = 20
EARLY_END = 12
"""Where ``early`` tasks stop before being rolled out to STEPS (EvoSearch-like fitness)."""


def tasks_of(prompts: int, end: int) -> list[Task]:
    return [Task(prompt_index=p, prompt=f"prompt {p}", candidate=c, seed=p * 100 + c, start=0,
                 end=end, score_on=ScoreOn.FINAL)
            for p in range(prompts) for c in range(CANDIDATES)]


def outcome(task: Task) -> Outcome:
    score = float(task.seed % 997) / 997
    return Outcome(prompt_index=task.prompt_index, candidate=task.candidate, step=task.end,
                   reward=score, scores={"guide": score}, nfe=STEPS, rows=STEPS,
                   verifier_calls=1)


def build(path: Path, prompts: int, end: int, shape: tuple[int, ...]) -> float:
    """Create and fill a store; returns the seconds it took (latents drawn beforehand)."""
    tasks = tasks_of(prompts, end)
    rng = np.random.default_rng(0)
    units = [(tasks[i:i + UNIT], rng.standard_normal((UNIT, *shape), dtype=np.float32))
             for i in range(0, len(tasks), UNIT)]
    started = time.perf_counter()
    with RunStore.create(path, job={"benchmark": "store_scale", "verifier": "guide"},
                         result_key="bench",
                         latent_shape=shape, num_steps=STEPS,
                         prompts=[t.prompt for t in tasks[::CANDIDATES]]) as store:
        for unit, states in units:
            store.record(unit, [outcome(t) for t in unit], states, -states)
    return time.perf_counter() - started


def disk_use(path: Path) -> tuple[int, int, int]:
    """Files, of which metadata (one per array and group, and the lock), and bytes."""
    files = [Path(folder, name) for folder, _, names in os.walk(path) for name in names]
    metadata = sum(f.name in ("zarr.json", LOCK_FILE) for f in files)
    return len(files), metadata, sum(f.stat().st_size for f in files)


def measure(root: Path, prompts: int, variant: str, shape: tuple[int, ...]) -> dict[str, Any]:
    end = STEPS if variant == "last" else EARLY_END
    path = root / f"{variant}_{prompts}" / "store.zarr"
    build_s = build(path, prompts, end, shape)
    files, metadata, size = disk_use(path)
    candidates = prompts * CANDIDATES
    latents = candidates * (1 if end == STEPS else 2)
    raw = latents * int(np.prod(shape)) * 4

    started = time.perf_counter()
    store = RunStore.open(path)
    open_s = time.perf_counter() - started
    started = time.perf_counter()
    replayed = sum(store.lookup(t) is not None for t in tasks_of(prompts, end))
    lookup_s = time.perf_counter() - started
    store.close()
    started = time.perf_counter()
    finished = RunStore.open(path, writable=False).all_finished()
    all_finished_s = time.perf_counter() - started
    assert replayed == candidates == sum(map(len, finished.values()))
    started = time.perf_counter()
    shown = best_per_prompt(path.parent)  # a stopped run: no results.json, read from the store
    show_read_s = time.perf_counter() - started
    assert len(shown) == prompts and all(row["candidate"] is not None for row in shown)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "diffsearch", "show", str(path.parent)], check=True,
                   stdout=subprocess.DEVNULL)
    show_cli_s = time.perf_counter() - started
    shutil.rmtree(path.parent)
    return {
        "prompts": prompts, "candidates": candidates, "variant": variant,
        "files": files, "metadata_files": metadata, "bytes": size, "raw_latent_bytes": raw,
        "bytes_per_raw": round(size / raw, 3),
        "data_files_per_64_candidates": round((files - metadata) / candidates * 64, 3),
        "create_record_close_s": round(build_s, 2), "open_s": round(open_s, 3),
        "lookup_all_s": round(lookup_s, 3), "all_finished_s": round(all_finished_s, 3),
        "show_read_s": round(show_read_s, 3), "show_cli_s": round(show_cli_s, 2),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, nargs="+", default=[800, 10000])
    parser.add_argument("--shape", type=int, nargs="+", default=[4, 8, 8],
                        help="latent shape (C H W); the bundled shapes model's by default")
    parser.add_argument("--dir", type=Path, default=None,
                        help="where to build the stores (default: a temporary folder)")
    args = parser.parse_args(argv)
    shape = tuple(args.shape)

    root = Path(tempfile.mkdtemp(prefix="store_scale_", dir=args.dir))
    rows = []
    header = (f"{'prompts':>8} {'variant':>7} {'files':>6} {'MB':>8} {'bytes/raw':>9} "
              f"{'data files/64c':>14} {'build s':>8} {'open s':>7} {'lookups s':>9} "
              f"{'all_finished s':>14} {'show s':>7} {'show CLI s':>10}")
    print(header)
    try:
        for prompts in args.prompts:
            for variant in ("last", "early"):
                row = measure(root, prompts, variant, shape)
                rows.append(row)
                print(f"{prompts:>8} {variant:>7} {row['files']:>6} "
                      f"{row['bytes'] / 1e6:>8.1f} {row['bytes_per_raw']:>9.3f} "
                      f"{row['data_files_per_64_candidates']:>14.3f} "
                      f"{row['create_record_close_s']:>8.2f} {row['open_s']:>7.3f} "
                      f"{row['lookup_all_s']:>9.3f} {row['all_finished_s']:>14.3f} "
                      f"{row['show_read_s']:>7.3f} {row['show_cli_s']:>10.2f}", flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    report = {
        "benchmark": "store_scale",
        "latent_shape": list(shape), "candidates_per_prompt": CANDIDATES, "unit": UNIT,
        "num_steps": STEPS, "early_end": EARLY_END, "shard_rows": SHARD_ROWS,
        "machine": {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(),
                    "python": platform.python_version(), "zarr": zarr.__version__,
                    "stores_in": str(args.dir or tempfile.gettempdir())},
        "results": rows,
        "command": command_line(argv),
    }
    save_report(report, "store_scale", show=False)
    return report


if __name__ == "__main__":
    main()
