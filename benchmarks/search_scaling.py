"""How does each strategy scale with compute? Oracle accuracy and guiding reward against NFE.

For every strategy and budget (multiples of one sample's cost) it runs the same fixed seeded set
of distinct held-out shapes prompts, guided by shapes-clip, with the shapes oracle as a held-out
judge that no strategy sees. Per (strategy, budget) it reports:

- oracle accuracy of the returned best image (all aspects right), and its mean oracle score;
- the guiding reward (shapes-clip) of the returned best;
- diversity: mean pairwise L2 distance (pixels in [0, 1], per pixel) between the top-4 final
  images of each prompt, averaged over prompts;
- NFEs actually spent and wall time.

Prints and saves ``benchmarks/results/search_scaling.json`` and a plot
``benchmarks/results/search_scaling.png`` (oracle accuracy and reward against NFE, one line per
strategy)::

    python benchmarks/search_scaling.py [--prompts 50] [--budgets 4 8 16 32]
        [--strategies best-of-n evosearch ...] [--executor local|dask]

The TTSnap variant with a distilled noise-aware verifier runs when ``--distilled FOLDER`` names
the output of ``diffsearch distill``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffsearch import run_folder
from diffsearch.api import run_job
from diffsearch.job import Job
from diffsearch.pipelines.shapes.world import distinct_prompts
from diffsearch.results import RunResult

from _report import command_line, save_plot, save_report

ORACLE = "shapes-oracle"
GUIDE = "shapes-clip"
DEFAULT_STRATEGIES = ["best-of-n", "evosearch", "ttsnap", "zero-order", "paths", "particles"]


def strategy_configs(names: list[str], distilled: Path | None) -> dict[str, dict[str, Any]]:
    """Label -> strategy spec. 'ttsnap-distilled' uses the per-step distilled checkpoints."""
    configs = {name: {"name": name} for name in names}
    if distilled is not None:
        manifest = json.loads((distilled / "distilled.json").read_text())
        configs["ttsnap-distilled"] = {"name": "ttsnap", "verifiers": {
            int(step): str(distilled / folder) for step, folder in manifest["steps"].items()}}
    return configs


def diversity(run_dir: Path, result_prompt: Any, top: int = 4) -> float | None:
    finals = sorted((c for c in result_prompt.candidates if c.has_final and c.reward is not None),
                    key=lambda c: c.reward, reverse=True)[:top]
    if len(finals) < 2:
        return None
    images = [np.asarray(Image.open(run_dir / run_folder.candidate_image(
                  result_prompt.prompt_index, c.candidate)), dtype=np.float64) / 255
              for c in finals]
    distances = [np.sqrt(np.mean((a - b) ** 2)) for a, b in itertools.combinations(images, 2)]
    return float(np.mean(distances))


def summarise(result: RunResult, run_dir: Path) -> dict[str, Any]:
    bests = [p.best for p in result.prompts]
    oracle = [b.scores.get(ORACLE, 0.0) if b else 0.0 for b in bests]
    spread = [d for p in result.prompts if (d := diversity(run_dir, p)) is not None]
    return {
        "oracle_accuracy": round(statistics.fmean(s >= 1.0 for s in oracle), 4),
        "oracle_score": round(statistics.fmean(oracle), 4),
        "guiding_reward": round(statistics.fmean(b.reward if b and b.reward is not None
                                                 else 0.0 for b in bests), 4),
        "diversity": round(statistics.fmean(spread), 4) if spread else None,
        "nfe_per_prompt": result.nfe / len(result.prompts),
        "failed_candidates": result.failed_candidates,
        "wall_seconds": round(result.wall_seconds, 1),
    }


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (accuracy_axis, reward_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    for label in dict.fromkeys(r["strategy"] for r in rows):
        mine = sorted((r for r in rows if r["strategy"] == label), key=lambda r: r["budget_nfe"])
        nfe = [r["budget_nfe"] for r in mine]
        accuracy_axis.plot(nfe, [r["oracle_accuracy"] for r in mine], marker="o", label=label)
        reward_axis.plot(nfe, [r["guiding_reward"] for r in mine], marker="o", label=label)
    for axis, title in ((accuracy_axis, "oracle accuracy (held out)"),
                        (reward_axis, f"guiding reward ({GUIDE})")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("NFE per prompt")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    accuracy_axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--budgets", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--strategies", nargs="+", default=DEFAULT_STRATEGIES)
    parser.add_argument("--distilled", type=Path, help="folder written by `diffsearch distill`")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--executor", choices=["local", "dask"], default="local")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads per worker (1 when something else shares the CPU)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-search-scaling"))
    parser.add_argument("--name", default="search_scaling")
    args = parser.parse_args(argv)

    prompts = distinct_prompts("heldout", args.prompts, seed=args.seed)
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for label, spec in strategy_configs(args.strategies, args.distilled).items():
        for multiple in args.budgets:
            run_dir = args.work / f"{label}-{multiple}x"
            shutil.rmtree(run_dir, ignore_errors=True)
            job = Job.model_validate({
                "prompts": prompts, "model": "shapes", "strategy": spec,
                "budget": f"{multiple}x", "verifier": GUIDE, "eval_verifiers": [ORACLE],
                "seed": args.seed, "executor": args.executor, "batch_size": 16,
                "threads": args.threads,
            })
            result = run_job(job, run_dir, progress_bar=False)
            row = {"strategy": label, "budget_multiple": multiple,
                   "budget_nfe": multiple * result.model.num_steps, **summarise(result, run_dir)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {
        "benchmark": "search_scaling", "prompts": len(prompts), "seed": args.seed,
        "guide": GUIDE, "judge": ORACLE, "rows": rows,
        "total_wall_seconds": round(time.perf_counter() - started, 1),
        "command": command_line(argv),
    }
    save_report(report, args.name, show=False)
    save_plot(lambda path: plot(rows, path), args.name)
    return rows


if __name__ == "__main__":
    main()
