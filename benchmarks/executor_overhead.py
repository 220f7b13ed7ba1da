"""What do the engine and the executors cost? One best-of-N search, four ways.

The same search (one prompt, N candidates of T steps, scored by one verifier, the best kept) runs
through:

- ``plain``: a batched loop over the diffusers StableDiffusionPipeline itself
  (``num_images_per_prompt=batch``, ``output_type="pt"``), each batch scored by the verifier;
- ``in_process``: diffsearch's engine with the in-process executor;
- ``dask_1x{threads}``: the Dask executor, one worker process of ``threads`` intra-op threads;
- ``dask_2x1``: the Dask executor, two worker processes of one thread each.

``search_s`` is the search itself, with model and cluster already up and warmed (what each
prompt of a long job pays). ``setup_s`` is the one-off cost of loading the model and starting the
cluster. In that time diffsearch does more than the plain loop: it writes every latent and final
latent to the Zarr store, writes every candidate's PNG, and records every score. Ratios are to
``plain``. The configurations run in interleaved rounds and the fastest round counts, so load
from other processes on a shared machine hits them all alike. ``cpu_s`` is the CPU time the
driver and the configuration's worker processes spent in that fastest round: on a busy machine it
shows the work done, where wall time mostly shows the competition.

    nice python benchmarks/executor_overhead.py [--model shapes] [--verifier shapes-clip]
        [--candidates 64] [--steps 20] [--batch 8] [--threads 2] [--repeats 3]

On a machine shared with other work, run it with ``OMP_WAIT_POLICY=PASSIVE`` (every process
inherits it): spinning OpenMP threads that lose their core to another process make multi-threaded
runs many times slower, which would measure the neighbours, not diffsearch.

``--verifier`` takes a name or a JSON object (``'{"name": "shapes-clip", "weights": "..."}'``).
Prints and saves JSON (``benchmarks/results/executor_overhead.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch

from diffsearch.api import run_job
from diffsearch.dask_executor import DaskExecutor
from diffsearch.executor import Executor, LocalExecutor
from diffsearch.job import Job, VerifierSpec
from diffsearch.runtime import RuntimeSpec
from diffsearch.seeding import derive_seed, torch_generator

from _report import command_line, save_report

PROMPT = "a red circle to the left of a blue square"


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (all their threads) so far."""
    return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)


class PlainLoop:
    """The baseline: diffusers' own pipeline call, batch after batch, then the verifier."""

    def __init__(self, job: Job, n: int) -> None:
        from diffsearch.pipelines.loading import load_denoiser
        from diffsearch.verifiers.registry import create_verifier

        self.job, self.n = job, n
        torch.set_num_threads(job.threads)
        began = time.perf_counter()
        # the StableDiffusionPipeline that load_denoiser builds: same weights, same scheduler
        self.denoiser = load_denoiser(job.model, num_steps=job.num_steps, device="cpu")
        self.pipe = self.denoiser.pipe
        self.pipe.set_progress_bar_config(disable=True)
        self.verifier = create_verifier(job.verifier, device="cpu")
        self.setup_s = time.perf_counter() - began
        _, latent_h, latent_w = self.denoiser.latent_shape
        self.size = (latent_h * self.pipe.vae_scale_factor, latent_w * self.pipe.vae_scale_factor)
        self._scores(self.job.batch_size)  # warm-up: first calls pick kernels and allocate
        self.pids = [os.getpid()]

    def _scores(self, n: int) -> list[float]:
        torch.set_num_threads(self.job.threads)
        scores: list[float] = []
        for first in range(0, n, self.job.batch_size):
            rows = range(first, min(n, first + self.job.batch_size))
            generators = [torch_generator(derive_seed(self.job.seed, PROMPT, c, "noise"))
                          for c in rows]
            images = self.pipe(
                PROMPT, num_inference_steps=self.denoiser.num_steps,
                guidance_scale=self.denoiser.guidance_scale, height=self.size[0],
                width=self.size[1], num_images_per_prompt=len(rows), generator=generators,
                output_type="pt").images
            scores += self.verifier.score(images.float(), [PROMPT] * len(rows)).tolist()
        return scores

    def search(self) -> tuple[float, dict[str, Any]]:
        began = time.perf_counter()
        scores = self._scores(self.n)
        seconds = time.perf_counter() - began
        best = max(range(self.n), key=scores.__getitem__)
        return seconds, {"best": {"candidate": best, "score": scores[best]}}

    def close(self) -> None:
        pass

    def describe(self) -> str:
        return f"diffusers {type(self.pipe).__name__} loop"


class EngineRun:
    """diffsearch's engine on an executor that is started (model loaded on every worker) and
    warmed up with one batch per worker before any search is timed."""

    def __init__(self, job: Job, executor: Executor) -> None:
        self.job, self.executor = job, executor
        began = time.perf_counter()
        executor.start(RuntimeSpec.from_job(job))
        self.setup_s = time.perf_counter() - began
        workers = len(executor.client.scheduler_info()["workers"]) \
            if isinstance(executor, DaskExecutor) else 1
        # the budget is not part of what workers load, so this warms the same runtime
        self._run(job.model_copy(update={"budget": f"{job.batch_size * workers}x"}))
        self.pids = [os.getpid()]
        if isinstance(executor, DaskExecutor):
            self.pids += list(executor.client.run(os.getpid).values())

    def _run(self, job: Job) -> tuple[float, Any]:
        out = Path(tempfile.mkdtemp(prefix="diffsearch-overhead-"))
        try:
            began = time.perf_counter()
            result = run_job(job, out / "run", executor=self.executor)
            return time.perf_counter() - began, result
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def search(self) -> tuple[float, dict[str, Any]]:
        seconds, result = self._run(self.job)
        best = result.prompts[0].best
        return seconds, {"best": {"candidate": best.candidate, "score": best.reward},
                         "stage_seconds": {k: round(v, 3)
                                           for k, v in result.stage_seconds.items()}}

    def close(self) -> None:
        self.executor.close()

    def describe(self) -> str:
        return self.executor.describe()


def parse_verifier(text: str) -> VerifierSpec:
    return json.loads(text) if text.lstrip().startswith("{") else text


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="shapes",
                        help="'shapes' or a StableDiffusionPipeline folder")
    parser.add_argument("--verifier", type=parse_verifier, default="shapes-clip")
    parser.add_argument("--candidates", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved rounds; each configuration's fastest counts")
    args = parser.parse_args(argv)

    def job(threads: int) -> Job:
        return Job.model_validate({
            "prompts": [PROMPT], "model": args.model, "verifier": args.verifier,
            "strategy": {"name": "best-of-n"}, "budget": f"{args.candidates}x",
            "num_steps": args.steps, "batch_size": args.batch, "threads": threads,
            "device": "cpu",
        })

    def dask(workers: int, threads: int) -> Executor:
        return DaskExecutor(workers=workers, threads=threads, dashboard_address=None)

    builders: dict[str, Callable[[], PlainLoop | EngineRun]] = {
        "plain": lambda: PlainLoop(job(args.threads), args.candidates),
        "in_process": lambda: EngineRun(job(args.threads), LocalExecutor()),
        f"dask_1x{args.threads}": lambda: EngineRun(job(args.threads), dask(1, args.threads)),
        "dask_2x1": lambda: EngineRun(job(1), dask(2, 1)),
    }
    runs: dict[str, PlainLoop | EngineRun] = {}
    results: dict[str, dict[str, Any]] = {}
    try:
        for name, build in builders.items():
            runs[name] = build()
            results[name] = {"setup_s": round(runs[name].setup_s, 2), "search_runs_s": [],
                             "where": runs[name].describe()}
        for round_ in range(args.repeats):
            for name, run in runs.items():
                cpu = cpu_seconds(run.pids)
                seconds, details = run.search()
                cpu = cpu_seconds(run.pids) - cpu
                runs_s = results[name]["search_runs_s"]
                runs_s.append(round(seconds, 3))
                if runs_s[-1] == min(runs_s):
                    results[name].update(details, cpu_s=round(cpu, 2))
                print(f"round {round_ + 1}: {name:>10} {seconds:7.2f} s", file=sys.stderr)
    finally:
        for run in runs.values():
            run.close()

    plain = min(results["plain"]["search_runs_s"])
    for entry in results.values():
        entry["search_s"] = min(entry["search_runs_s"])
        entry["search_ratio_to_plain"] = round(entry["search_s"] / plain, 3)
        entry["cpu_ratio_to_plain"] = round(entry["cpu_s"] / results["plain"]["cpu_s"], 3)
    report = {
        "benchmark": "executor_overhead",
        "model": args.model, "verifier": args.verifier, "prompt": PROMPT,
        "candidates": args.candidates, "steps": args.steps, "batch": args.batch,
        "threads": args.threads, "repeats": args.repeats,
        "machine": {"cpus": os.cpu_count(), "load_average_at_end": os.getloadavg(),
                    "python": platform.python_version(), "torch": torch.__version__,
                    "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY")},
        "results": results,
        "command": command_line(argv),
    }
    save_report(report, "executor_overhead")
    return report


if __name__ == "__main__":
    main()
