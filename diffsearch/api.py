"""The Python API: run a job (or a single search) and get the results back.

The CLI is a thin layer over :func:`run_job`; creative tools call :func:`search`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffsearch.engine import Engine, ProgressCallback
from diffsearch.executor import Executor, LocalExecutor
from diffsearch.job import Job, VerifierSpec, job_from_mapping
from diffsearch.results import RunResult


def make_executor(job: Job) -> Executor:
    """The executor the job asks for (the Dask one is imported only when used)."""
    if job.executor == "dask":
        from diffsearch.dask_executor import DaskExecutor

        return DaskExecutor(workers=job.workers, scheduler=job.scheduler, threads=job.threads)
    return LocalExecutor()


def run_job(
    job: Job,
    out: str | Path,
    *,
    resume: bool = False,
    progress_bar: bool = False,
    on_progress: ProgressCallback | None = None,
    executor: Executor | None = None,
) -> RunResult:
    """Run ``job`` into the folder ``out`` (results.json, store.zarr/, images/, best/).

    ``resume=True`` continues a stopped run in ``out`` without recomputing finished candidates.
    An ``executor`` may be passed to share one cluster between runs; it is then left open.
    """
    own = executor is None
    active = make_executor(job) if own else executor
    try:
        return Engine(job, Path(out), active, resume=resume, progress_bar=progress_bar,
                      on_progress=on_progress).run()
    finally:
        if own:
            active.close()


def search(
    prompts: str | list[str],
    *,
    out: str | Path,
    model: str = "shapes",
    strategy: str | dict[str, Any] = "best-of-n",
    verifier: VerifierSpec = "shapes-clip",
    budget: int | str = "8x",
    seed: int = 0,
    resume: bool = False,
    on_progress: ProgressCallback | None = None,
    **job_fields: Any,
) -> RunResult:
    """Search for the best image of each prompt; see :class:`diffsearch.job.Job` for fields."""
    strategy_spec = {"name": strategy} if isinstance(strategy, str) else strategy
    job = job_from_mapping(
        {"prompts": [prompts] if isinstance(prompts, str) else prompts, "model": model,
         "strategy": strategy_spec, "verifier": verifier, "budget": budget, "seed": seed,
         **job_fields},
        source="search()", base_dir=Path.cwd(),
    )
    return run_job(job, out, resume=resume, on_progress=on_progress)
