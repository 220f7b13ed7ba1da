"""SIGKILL of the driver process (the `diffsearch run` CLI itself, not a worker): nothing that
finished is lost, `--resume` completes the run to the results of an uninterrupted one, and a
Dask run leaves no orphaned worker processes behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from diffsearch.api import run_job
from diffsearch.executor import LocalExecutor
from diffsearch.job import load_job
from diffsearch.pipelines.shapes.world import distinct_prompts
from diffsearch.store import RunStore
from engine_harness import comparable, png_bytes

PROMPTS = distinct_prompts("heldout", 12, seed=2)


def write_job(tmp_path: Path, executor: str) -> Path:
    path = tmp_path / "job.yaml"
    lines = ["prompts:", *(f"  - {p}" for p in PROMPTS),
             "model: shapes", "num_steps: 10", "budget: 4x", "batch_size: 4",
             "verifier: shapes-oracle", "seed: 3", "threads: 1", f"executor: {executor}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def cli(*args: object) -> subprocess.Popen:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    return subprocess.Popen([sys.executable, "-m", "diffsearch", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def finished(store_path: Path) -> int:
    """Candidates marked done so far (0 while the store is not created yet)."""
    if not (store_path / "zarr.json").is_file():
        return 0
    try:
        store = RunStore.open(store_path, writable=False)
        return sum(len(store.finished_candidates(i)) for i in store.prompt_indices())
    except Exception:  # noqa: BLE001  (caught mid-creation by the writer: try again)
        return 0


def kill_after_first_batches(process: subprocess.Popen, store_path: Path) -> tuple[int, list]:
    """SIGKILL the driver once some but not all candidates are done; returns how many were
    done just before, and the driver's descendants at that moment."""
    deadline = time.monotonic() + 240
    while (done := finished(store_path)) == 0:
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "the run never finished a candidate"
        time.sleep(0.02)
    descendants = psutil.Process(process.pid).children(recursive=True)
    process.send_signal(signal.SIGKILL)
    process.wait()
    return done, descendants


def test_a_killed_driver_resumes_to_the_same_results(tmp_path: Path) -> None:
    """On the default executor (a Dask LocalCluster of worker processes); the driver writes the
    store the same way whatever the executor."""
    job_file = write_job(tmp_path, "dask")
    out = tmp_path / "run"
    done_before, descendants = kill_after_first_batches(
        cli("run", job_file, "--out", out, "--quiet"), out / "store.zarr")
    total = len(PROMPTS) * 4
    after_kill = finished(out / "store.zarr")
    assert 0 < done_before <= after_kill < total  # killed mid-run, the store still readable
    assert not (out / "results.json").exists()

    # the driver's Dask cluster (nannies, workers) goes down with it
    _, alive = psutil.wait_procs(descendants, timeout=30)
    assert not alive, f"orphaned processes: {[p.cmdline() for p in alive]}"

    resumed = cli("run", job_file, "--out", out, "--resume", "--quiet")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()

    reference = tmp_path / "reference"
    run_job(load_job(job_file), reference, executor=LocalExecutor())
    assert comparable(out) == comparable(reference)
    assert png_bytes(out) == png_bytes(reference)
