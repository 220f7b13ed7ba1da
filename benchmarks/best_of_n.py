"""Does search help on the bundled model? Best-of-N guided by shapes-clip, judged by the oracle.

On a fixed seeded set of distinct held-out shapes prompts, runs best-of-N (default 8) guided by the
shapes-clip verifier with the shapes oracle as a held-out judge, then compares:

- single sample: the oracle accuracy of one random sample (the mean over all N candidates, an
  unbiased and lower-variance estimate than looking at candidate 0 alone);
- best-of-N: the oracle accuracy of the candidate shapes-clip picked;
- oracle best-of-N: the share of prompts where at least one candidate is correct (the ceiling
  for any verifier at this N).

Prints and saves JSON (``benchmarks/results/best_of_n.json``)::

    python benchmarks/best_of_n.py [--prompts 50] [--n 8] [--seed 0] [--out runs/bench-best-of-n]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
from pathlib import Path

from diffsearch.api import run_job
from diffsearch.job import Job
from diffsearch.pipelines.shapes.world import distinct_prompts

from _report import command_line, save_report

ORACLE = "shapes-oracle"


def correct(scores: dict[str, float]) -> bool:
    """The oracle's score is the share of aspects right: correct means all of them."""
    return scores.get(ORACLE, 0.0) >= 1.0


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-best-of-n"))
    parser.add_argument("--executor", choices=["local", "dask"], default="local")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads per worker (1 when something else shares the CPU)")
    args = parser.parse_args(argv)

    prompts = distinct_prompts("heldout", args.prompts, seed=args.seed)
    job = Job.model_validate({
        "prompts": prompts, "model": "shapes", "strategy": {"name": "best-of-n"},
        "budget": f"{args.n}x", "verifier": "shapes-clip", "eval_verifiers": [ORACLE],
        "seed": args.seed, "executor": args.executor, "batch_size": args.n,
        "threads": args.threads,
    })
    shutil.rmtree(args.out, ignore_errors=True)
    result = run_job(job, args.out, progress_bar=True)

    single, best, ceiling = [], [], []
    for prompt in result.prompts:
        judged = [correct(c.scores) for c in prompt.candidates if not c.error]
        single.append(statistics.fmean(judged))
        best.append(prompt.best is not None and correct(prompt.best.scores))
        ceiling.append(any(judged))
    report = {
        "benchmark": "best_of_n",
        "prompts": len(prompts),
        "n": args.n,
        "seed": args.seed,
        "num_steps": result.model.num_steps,
        "single_sample_accuracy": round(statistics.fmean(single), 4),
        "best_of_n_accuracy": round(statistics.fmean(best), 4),
        "oracle_best_of_n_accuracy": round(statistics.fmean(ceiling), 4),
        "nfe": result.nfe,
        "nfe_per_prompt": result.nfe // len(prompts),
        "verifier_calls": result.verifier_calls,
        "wall_seconds": round(result.wall_seconds, 2),
        "command": command_line(argv),
    }
    save_report(report, "best_of_n")
    return report


if __name__ == "__main__":
    main()
