"""Tree-of-Frames against linear search (N independent clips) at equal NFE budgets.

Both make frame-chain clips with the bundled shapes model (frame 0 from noise, each later frame
img2img from the previous one at ``--strength`` under its own prompt) for a fixed seeded set of
shapes motion prompts (``a red circle moving from left to right``), guided by ``shapes-video``
(per-frame shapes-clip score + temporal consistency). ``shapes-video-oracle`` judges the
returned clip (held out: no strategy sees it); a clip is right when every frame is. Budgets are
multiples of one linear clip's cost, T + (F - 1) * (T - k) NFE. Per (strategy, budget):

- guiding clip score (shapes-video) and oracle accuracy / mean oracle score of the best clip;
- NFEs actually spent per prompt, failed candidates and wall time;

and per linear budget, the smallest ToF budget whose mean guiding score (and oracle accuracy)
reaches linear's, as a share of linear's NFE (the target: 0.5 or less).

Prints and saves ``benchmarks/results/tof_scaling.json`` and a plot ``tof_scaling.png``::

    python benchmarks/tof_scaling.py [--prompts 20] [--budgets 1 2 4 8] [--strength 0.7]
        [--frames 3] [--tof-options JSON] [--executor local|dask] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from diffsearch.api import run_job
from diffsearch.job import Job
from diffsearch.pipelines.frame_chain import FrameChain
from diffsearch.pipelines.shapes import bundled_defaults
from diffsearch.pipelines.shapes.motion import motion_prompts
from diffsearch.results import RunResult

from _report import command_line, save_plot, save_report

GUIDE = "shapes-video"
JUDGE = "shapes-video-oracle"
STRATEGIES = ("linear-clips", "tree-of-frames")


def summarise(result: RunResult) -> dict[str, Any]:
    bests = [p.best for p in result.prompts]
    oracle = [b.scores.get(JUDGE, 0.0) if b else 0.0 for b in bests]
    return {
        "guiding_score": round(statistics.fmean(
            b.reward if b and b.reward is not None else 0.0 for b in bests), 4),
        "oracle_accuracy": round(statistics.fmean(s >= 1.0 for s in oracle), 4),
        "oracle_score": round(statistics.fmean(oracle), 4),
        "nfe_per_prompt": result.nfe / len(result.prompts),
        "failed_candidates": result.failed_candidates,
        "wall_seconds": round(result.wall_seconds, 1),
    }


def nfe_to_match(rows: list[dict[str, Any]], metric: str) -> list[dict[str, Any]]:
    """For each linear budget: the cheapest ToF budget at least as good on ``metric``."""
    tof = sorted((r for r in rows if r["strategy"] == "tree-of-frames"),
                 key=lambda r: r["budget_nfe"])
    matches = []
    for linear in sorted((r for r in rows if r["strategy"] == "linear-clips"),
                         key=lambda r: r["budget_nfe"]):
        match = next((r for r in tof if r[metric] >= linear[metric]), None)
        matches.append({
            "linear_budget_nfe": linear["budget_nfe"], "linear": linear[metric],
            "tof_budget_nfe": match["budget_nfe"] if match else None,
            "tof": match[metric] if match else None,
            "nfe_share": round(match["budget_nfe"] / linear["budget_nfe"], 3) if match else None,
        })
    return matches


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for strategy in STRATEGIES:
        mine = sorted((r for r in rows if r["strategy"] == strategy), key=lambda r: r["budget_nfe"])
        nfe = [r["budget_nfe"] for r in mine]
        axes[0].plot(nfe, [r["guiding_score"] for r in mine], marker="o", label=strategy)
        axes[1].plot(nfe, [r["oracle_accuracy"] for r in mine], marker="o", label=strategy)
    for axis, title in ((axes[0], f"guiding clip score ({GUIDE})"),
                        (axes[1], f"all frames right ({JUDGE}, held out)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("NFE per prompt")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--budgets", type=float, nargs="+", default=[1, 2, 4, 8],
                        help="multiples of one linear clip's NFE")
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--strength", type=float, default=0.7)
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default="shapes", help="the bundled model or a pipeline folder")
    parser.add_argument("--clip-weights", help="shapes-clip weights folder (default: bundled)")
    parser.add_argument("--executor", choices=["local", "dask"], default="local")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per worker (on a shared 2-core machine 2 threads "
                             "oversubscribe and run several times slower than 1)")
    parser.add_argument("--tof-options", type=json.loads, default={},
                        help='extra Tree-of-Frames options as JSON, e.g. \'{"keep": 0.25}\'')
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--work", type=Path, default=Path("runs/bench-tof-scaling"))
    parser.add_argument("--name", default="tof_scaling")
    args = parser.parse_args(argv)

    steps = args.steps or int(bundled_defaults(None if args.model == "shapes" else args.model)
                              ["num_steps"])
    guide: str | dict[str, Any] = GUIDE
    if args.clip_weights:
        guide = {"name": GUIDE, "frame_verifier": {"name": "shapes-clip",
                                                   "weights": args.clip_weights}}
    prompts = motion_prompts(args.prompts, seed=args.seed)
    clip_nfe = FrameChain.for_prompt(prompts[0], args.frames, args.strength).clip_nfe(steps)
    common = {"num_frames": args.frames, "strength": args.strength}
    rows: list[dict[str, Any]] = []
    started = time.perf_counter()
    for strategy in args.strategies:
        options = {**common, **(args.tof_options if strategy == "tree-of-frames" else {})}
        for multiple in args.budgets:
            budget = int(round(multiple * clip_nfe))
            run_dir = args.work / f"{strategy}-{multiple:g}"
            shutil.rmtree(run_dir, ignore_errors=True)
            job = Job.model_validate({
                "prompts": prompts, "model": args.model, "num_steps": steps,
                "strategy": {"name": strategy, **options}, "budget": budget,
                "verifier": guide, "eval_verifiers": [JUDGE], "seed": args.seed,
                "executor": args.executor, "threads": args.threads, "batch_size": 16,
            })
            result = run_job(job, run_dir, progress_bar=False)
            row = {"strategy": strategy, "budget_clips": multiple, "budget_nfe": budget,
                   **summarise(result)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    report = {
        "benchmark": "tof_scaling", "prompts": len(prompts), "seed": args.seed,
        "num_steps": steps, "num_frames": args.frames, "strength": args.strength,
        "model": args.model, "tof_options": args.tof_options, "clip_nfe": clip_nfe,
        "guide": guide, "judge": JUDGE, "rows": rows,
        "nfe_to_match_guiding_score": nfe_to_match(rows, "guiding_score"),
        "nfe_to_match_oracle_accuracy": nfe_to_match(rows, "oracle_accuracy"),
        "total_wall_seconds": round(time.perf_counter() - started, 1),
        "command": command_line(argv),
    }
    print(json.dumps({k: report[k] for k in ("nfe_to_match_guiding_score",
                                             "nfe_to_match_oracle_accuracy")}, indent=2))
    save_report(report, args.name, show=False)
    save_plot(lambda path: plot(rows, path), args.name)
    return report


if __name__ == "__main__":
    main()
