"""Do the forward passes fill up? Rows computed per NFE charged, and NFE per second.

Every forward pass runs exactly ``compute_batch`` rows (padded), so a work unit that holds fewer
candidates computes rows that nobody charged. The engine packs the ready tasks of every prompt
into shared units; this measures how close that gets to full passes, two ways:

- ``throughput``: P prompts x best-of-4 x T steps through diffsearch, in-process and on a Dask
  cluster of one worker with the same threads, against the bare batched diffusers loop
  (``StableDiffusionPipeline`` called with ``compute_batch / 4`` prompts and
  ``num_images_per_prompt=4``, each batch scored by the same verifier) at the same compute batch.
  The configurations run in interleaved repeats, and each diffsearch run is divided by the bare
  loop's run of the same repeat (``ratios_to_bare``), so load from other processes on a shared
  machine hits both sides of a ratio alike.
- ``strategies``: one row per strategy at ``--budget`` (16x) on held-out shapes prompts,
  in-process (or on one Dask worker with ``--strategies-on dask``: there the driver's own work
  runs in another process than the denoiser), the strategies interleaved in each of
  ``--repeats`` rounds: rows per NFE, NFE/s and NFE/s relative to best-of-N's run of the same
  round.

Model and cluster are loaded and warmed before anything is timed. Prints and saves
``benchmarks/results/packing.json``::

    nice python benchmarks/packing.py [--prompts 32] [--steps 10] [--threads 1]
        [--compute-batch 8] [--repeats 2] [--strategy-prompts 8] [--budget 16x]
        [--verifier shapes-oracle] [--batch-size N] [--skip-dask] [--skip-throughput]
        [--skip-strategies] [--strategies-on local|dask] [--name packing]

On a machine shared with other work, run it with ``OMP_WAIT_POLICY=PASSIVE`` (see
executor_overhead.py).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from diffsearch.api import run_job
from diffsearch.dask_executor import DaskExecutor
from diffsearch.executor import Executor, LocalExecutor
from diffsearch.job import Job
from diffsearch.pipelines.shapes.world import distinct_prompts
from diffsearch.results import RunResult
from diffsearch.runtime import RuntimeSpec
from diffsearch.seeding import derive_seed, torch_generator

from _report import command_line, save_report

CANDIDATES = 4
"""Best-of-4 in the throughput comparison."""
STRATEGIES: dict[str, dict[str, Any]] = {
    "best-of-n": {"name": "best-of-n"}, "evosearch": {"name": "evosearch"},
    "ttsnap": {"name": "ttsnap"}, "zero-order": {"name": "zero-order"},
    "paths": {"name": "paths"}, "particles": {"name": "particles"},
}


class BareLoop:
    """The baseline: diffusers' own pipeline call over ``compute_batch`` rows at a time."""

    def __init__(self, job: Job, prompts: list[str]) -> None:
        from diffsearch.pipelines.loading import load_denoiser
        from diffsearch.verifiers.registry import create_verifier

        torch.set_num_threads(job.threads)
        self.job, self.prompts = job, prompts
        self.denoiser = load_denoiser(job.model, num_steps=job.num_steps, device="cpu")
        self.pipe = self.denoiser.pipe
        self.pipe.set_progress_bar_config(disable=True)
        self.verifier = create_verifier(job.verifier, device="cpu")
        _, latent_h, latent_w = self.denoiser.latent_shape
        self.size = (latent_h * self.pipe.vae_scale_factor, latent_w * self.pipe.vae_scale_factor)
        self.per_call = max(1, (job.compute_batch or self.denoiser.compute_batch) // CANDIDATES)
        self._run(prompts[:self.per_call])  # warm-up: first calls pick kernels and allocate

    def _run(self, prompts: list[str]) -> None:
        torch.set_num_threads(self.job.threads)
        for first in range(0, len(prompts), self.per_call):
            chunk = prompts[first:first + self.per_call]
            generators = [torch_generator(derive_seed(self.job.seed, p, c, "noise"))
                          for p in chunk for c in range(CANDIDATES)]
            images = self.pipe(
                chunk, num_inference_steps=self.denoiser.num_steps,
                guidance_scale=self.denoiser.guidance_scale, height=self.size[0],
                width=self.size[1], num_images_per_prompt=CANDIDATES, generator=generators,
                output_type="pt").images
            self.verifier.score(images.float(), [p for p in chunk for _ in range(CANDIDATES)])

    def run(self) -> dict[str, Any]:
        began = time.perf_counter()
        self._run(self.prompts)
        seconds = time.perf_counter() - began
        nfe = len(self.prompts) * CANDIDATES * self.denoiser.num_steps
        return {"seconds": round(seconds, 3), "nfe": nfe, "nfe_per_s": round(nfe / seconds, 1)}


class EngineRun:
    """diffsearch's engine on a started, warmed executor."""

    def __init__(self, job: Job, executor: Executor) -> None:
        self.job, self.executor = job, executor
        executor.start(RuntimeSpec.from_job(job))
        # budget and prompts are not part of what workers load: this warms the same runtime
        self.run(job.model_copy(update={"prompts": job.prompts[:2]}))

    def run(self, job: Job | None = None) -> dict[str, Any]:
        out = Path(tempfile.mkdtemp(prefix="diffsearch-packing-"))
        try:
            began = time.perf_counter()
            result: RunResult = run_job(job or self.job, out / "run", executor=self.executor)
            seconds = time.perf_counter() - began
        finally:
            shutil.rmtree(out, ignore_errors=True)
        return {"seconds": round(seconds, 3), "nfe": result.nfe, "rows": result.rows,
                "rows_per_nfe": round(result.rows / result.nfe, 4),
                "nfe_per_s": round(result.nfe / seconds, 1),
                "stage_seconds": {k: round(v, 2) for k, v in sorted(result.stage_seconds.items())}}


def throughput(args: argparse.Namespace) -> dict[str, Any]:
    distinct = distinct_prompts("train", args.prompts, seed=args.seed)
    prompts = (distinct * -(-args.prompts // len(distinct)))[:args.prompts]
    job = Job.model_validate({
        "prompts": prompts, "model": args.model, "verifier": args.verifier,
        "strategy": {"name": "best-of-n"}, "budget": f"{CANDIDATES}x", "num_steps": args.steps,
        "threads": args.threads, "compute_batch": args.compute_batch, "device": "cpu",
        "seed": args.seed, **batching(args),
    })
    runs: dict[str, BareLoop | EngineRun] = {"bare": BareLoop(job, prompts),
                                             "in_process": EngineRun(job, LocalExecutor())}
    if not args.skip_dask:
        runs["dask_1worker"] = EngineRun(job, DaskExecutor(
            workers=1, threads=args.threads, dashboard_address=None))
    results: dict[str, dict[str, Any]] = {name: {"runs": []} for name in runs}
    try:
        for repeat in range(args.repeats):
            for name, run in runs.items():
                results[name]["runs"].append(run.run())
                print(f"repeat {repeat + 1}: {name:>12} {results[name]['runs'][-1]}",
                      file=sys.stderr)
    finally:
        for run in runs.values():
            if isinstance(run, EngineRun):
                run.executor.close()
    bare = results["bare"]["runs"]
    for name, entry in results.items():
        entry["nfe_per_s_median"] = statistics.median(r["nfe_per_s"] for r in entry["runs"])
        if name != "bare":
            entry["ratios_to_bare"] = [round(r["nfe_per_s"] / b["nfe_per_s"], 3)
                                       for r, b in zip(entry["runs"], bare, strict=True)]
            entry["rows_per_nfe"] = entry["runs"][-1]["rows_per_nfe"]
    return {"prompts": len(prompts), "candidates": CANDIDATES, "batch_size": job.batch_size,
            "results": results}


def strategies(args: argparse.Namespace) -> dict[str, Any]:
    prompts = distinct_prompts("heldout", args.strategy_prompts, seed=args.seed)

    def job(spec: dict[str, Any]) -> Job:
        return Job.model_validate({
            "prompts": prompts, "model": args.model, "verifier": args.verifier,
            "strategy": spec, "budget": args.budget, "num_steps": args.steps,
            "threads": args.threads, "compute_batch": args.compute_batch, "device": "cpu",
            "seed": args.seed, "executor": "local", **batching(args),
        })

    executor: Executor = LocalExecutor() if args.strategies_on == "local" else DaskExecutor(
        workers=1, threads=args.threads, dashboard_address=None)
    engine = EngineRun(job(STRATEGIES["best-of-n"]), executor)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in STRATEGIES}
    try:
        for repeat in range(args.repeats):  # interleaved: each repeat runs every strategy once
            for name, spec in STRATEGIES.items():
                runs[name].append(engine.run(job(spec)))
                print(f"repeat {repeat + 1}: {name:>12} {runs[name][-1]}", file=sys.stderr)
    finally:
        executor.close()
    rows = {}
    for name, repeats in runs.items():
        ratios = [round(r["nfe_per_s"] / b["nfe_per_s"], 3)
                  for r, b in zip(repeats, runs["best-of-n"], strict=True)]
        rows[name] = {"runs": repeats, "rows_per_nfe": repeats[-1]["rows_per_nfe"],
                      "nfe_per_s_median": statistics.median(r["nfe_per_s"] for r in repeats),
                      "ratios_to_best_of_n": ratios,
                      "ratio_to_best_of_n_median": statistics.median(ratios)}
    return {"prompts": len(prompts), "budget": args.budget, "executor": args.strategies_on,
            "batch_size": engine.job.batch_size, "rows": rows}


def batching(args: argparse.Namespace) -> dict[str, Any]:
    """``--batch-size`` when given, else the job's default."""
    return {} if args.batch_size is None else {"batch_size": args.batch_size}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes")
    parser.add_argument("--verifier", default="shapes-oracle")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compute-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--strategy-prompts", type=int, default=8)
    parser.add_argument("--budget", default="16x")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="candidates per work unit (default: the job's)")
    parser.add_argument("--skip-dask", action="store_true")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-strategies", action="store_true")
    parser.add_argument("--strategies-on", choices=["local", "dask"], default="local",
                        help="the strategy rows' executor: in-process, or one Dask worker")
    parser.add_argument("--name", default="packing",
                        help="the report's file name in benchmarks/results (without .json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = {
        "benchmark": "packing", "model": args.model, "verifier": args.verifier,
        "steps": args.steps, "threads": args.threads, "compute_batch": args.compute_batch,
        "throughput": None if args.skip_throughput else throughput(args),
        "strategies": None if args.skip_strategies else strategies(args),
        "machine": {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},
        "command": command_line(argv),
    }
    save_report(report, args.name)
    return report


if __name__ == "__main__":
    main()
