"""Tree-of-Frames against linear search (N independent clips, best-of-N for clips) at equal
NFE budgets, and at half linear's budget, with paired intervals.

Both make frame-chain clips with the bundled shapes model (frame 0 from noise, each later frame
img2img from the previous one at ``--strength`` under its own prompt) for a fixed seeded set of
shapes motion prompts (``a red circle moving from left to right``), under each of ``--seeds``
(the job seed), guided by ``shapes-video`` (per-frame shapes-clip score + temporal
consistency). ``shapes-video-oracle`` judges the returned clip (held out: no strategy sees it);
a clip is right when every frame is. Budgets are multiples of one linear clip's cost,
T + (F - 1) * (T - k) NFE. Per (strategy, budget), each a mean with a 95% cluster-bootstrap
interval over prompts (``_stats.py``):

- guiding clip score (shapes-video) and oracle accuracy / mean oracle score of the best clip;
- diversity of the top-k finished clips (mean pairwise RMS distance of their last frames);
- NFEs actually spent per prompt, failed candidates and wall time;

and for Tree-of-Frames the paired differences (same prompt and seed) from linear clips at the
same budget (``*_vs_linear-clips``) and at twice its budget (``*_vs_linear-clips_at_2x``:
the target is a difference >= 0 at half the NFE). A difference whose interval contains 0 is
not a result ("n.s." in the printed table).

Prints and saves ``benchmarks/results/<name>.json`` and a plot ``<name>.png``::

    python benchmarks/tof_scaling.py [--prompts 20] [--seeds 0 1 2] [--budgets 1 2 4 8]
        [--strength 0.7] [--frames 3] [--tof-options JSON] [--executor local|dask]
        [--threads 1]
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
from diffsearch.pipelines.frame_chain import FrameChain
from diffsearch.pipelines.shapes import bundled_defaults
from diffsearch.pipelines.shapes.motion import motion_prompts
from diffsearch.results import PromptResult, RunResult

from _report import command_line, save_plot, save_report
from _stats import Interval, pixel_spread, summarise

GUIDE = "shapes-video"
JUDGE = "shapes-video-oracle"
STRATEGIES = ("linear-clips", "tree-of-frames")


LINEAR = "linear-clips"
METRICS = ("oracle_accuracy", "oracle_score", "guiding_score", "diversity")


def finished_clips(prompt: PromptResult, num_frames: int) -> list[Any]:
    """The prompt's finished clips (last frames whose chain holds ``num_frames`` frames), best
    first by the guide."""
    parent = {c.candidate: c.parent for c in prompt.candidates}

    def depth(candidate: int | None) -> int:
        frames = 0
        while candidate is not None and candidate in parent:
            candidate, frames = parent[candidate], frames + 1
        return frames

    clips = [c for c in prompt.candidates if c.has_final and c.reward is not None
             and c.scores.get(GUIDE) == c.reward and depth(c.candidate) == num_frames]
    return sorted(clips, key=lambda c: (-c.reward, c.candidate))


def units(result: RunResult, run_dir: Path, num_frames: int, top: int) -> list[dict[str, Any]]:
    """One record per prompt of a run: the returned clip's scores and the top-k spread."""
    records = []
    for prompt in result.prompts:
        best = prompt.best
        oracle = best.scores.get(JUDGE, 0.0) if best else 0.0
        last_frames = [np.asarray(Image.open(run_dir / run_folder.candidate_image(
            prompt.prompt_index, c.candidate)), dtype=np.float64) / 255
            for c in finished_clips(prompt, num_frames)[:top]]
        records.append({
            "prompt": prompt.prompt_index, "oracle_accuracy": float(oracle >= 1.0),
            "oracle_score": oracle,
            "guiding_score": best.reward if best and best.reward is not None else 0.0,
            "diversity": pixel_spread(last_frames),
        })
    return records


def report_rows(records: dict[tuple[str, float], list[dict[str, Any]]],
                spent: dict[tuple[str, float], list[tuple[float, float, int]]],
                clip_nfe: int) -> list[dict[str, Any]]:
    """One row per (strategy, budget) run so far; Tree-of-Frames paired with linear clips at
    the same budget and at twice it where those have run."""
    rows = []
    for (strategy, multiple), mine in records.items():
        row: dict[str, Any] = {"strategy": strategy, "budget_clips": multiple,
                               "budget_nfe": int(round(multiple * clip_nfe))}
        row.update(summarise(mine, None, METRICS, LINEAR))
        if strategy != LINEAR:
            for suffix, factor in (("", 1), ("_at_2x", 2)):
                linear = records.get((LINEAR, multiple * factor))
                if linear:
                    paired = summarise(mine, linear, METRICS, LINEAR)
                    row.update({f"{m}_vs_{LINEAR}{suffix}": paired.get(f"{m}_vs_{LINEAR}")
                                for m in METRICS})
        nfe, wall, failed = zip(*spent[(strategy, multiple)])
        row.update({"nfe_per_prompt": statistics.fmean(nfe), "failed_candidates": sum(failed),
                    "wall_seconds": round(sum(wall), 1), "units": mine})
        rows.append(row)
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("guiding_score", f"guiding clip score ({GUIDE})"),
              ("oracle_accuracy", f"all frames right ({JUDGE}, held out)"),
              ("diversity", "top-k diversity (last frames)"))
    for strategy in STRATEGIES:
        mine = sorted((r for r in rows if r["strategy"] == strategy), key=lambda r: r["budget_nfe"])
        for axis, (metric, _) in zip(axes, panels):
            shown = [(r["budget_nfe"], r[metric]) for r in mine if r.get(metric)]
            if not shown:
                continue
            mean = np.array([m["mean"] for _, m in shown])
            errors = [mean - [m["low"] for _, m in shown], [m["high"] for _, m in shown] - mean]
            axis.errorbar([n for n, _ in shown], mean, yerr=errors, marker="o", capsize=3,
                          label=strategy)
    for axis, (_, title) in zip(axes, panels):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("NFE per prompt")
        axis.set_title(f"{title}, 95% CI", fontsize=9)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _cell(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        return "-"
    return str(Interval.from_json(value))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--budgets", type=float, nargs="+", default=[1, 2, 4, 8],
                        help="multiples of one linear clip's NFE")
    parser.add_argument("--frames", type=int, default=3)
    parser.add_argument("--strength", type=float, default=0.7)
    parser.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="job seeds (the noises); every one runs every strategy")
    parser.add_argument("--prompt-seed", type=int, default=0,
                        help="seed of the motion prompt draw")
    parser.add_argument("--top", type=int, default=4, help="k of the top-k diversity")
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
    prompts = motion_prompts(args.prompts, seed=args.prompt_seed)
    clip_nfe = FrameChain.for_prompt(prompts[0], args.frames, args.strength).clip_nfe(steps)
    common = {"num_frames": args.frames, "strength": args.strength}
    records: dict[tuple[str, float], list[dict[str, Any]]] = {}
    spent: dict[tuple[str, float], list[tuple[float, float, int]]] = {}
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    report: dict[str, Any] = {}
    for multiple, seed, strategy in itertools.product(args.budgets, args.seeds,
                                                      args.strategies):
        options = {**common, **(args.tof_options if strategy == "tree-of-frames" else {})}
        budget = int(round(multiple * clip_nfe))
        run_dir = args.work / f"{strategy}-{multiple:g}-seed{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        job = Job.model_validate({
            "prompts": prompts, "model": args.model, "num_steps": steps,
            "strategy": {"name": strategy, **options}, "budget": budget,
            "verifier": guide, "eval_verifiers": [JUDGE], "seed": seed,
            "executor": args.executor, "threads": args.threads, "batch_size": 16,
            "images": "all",
        })
        result = run_job(job, run_dir, progress_bar=False)
        mine = [record | {"seed": seed}
                for record in units(result, run_dir, args.frames, args.top)]
        records.setdefault((strategy, multiple), []).extend(mine)
        spent.setdefault((strategy, multiple), []).append(
            (result.nfe / len(result.prompts), result.wall_seconds, result.failed_candidates))
        print(json.dumps({"strategy": strategy, "budget_clips": multiple, "seed": seed,
                          "oracle_accuracy": statistics.fmean(r["oracle_accuracy"]
                                                              for r in mine),
                          "wall_seconds": round(result.wall_seconds, 1)}), flush=True)
        rows = report_rows(records, spent, clip_nfe)
        report = {
            "benchmark": "tof_scaling", "prompts": len(prompts), "seeds": args.seeds,
            "prompt_seed": args.prompt_seed, "num_steps": steps, "num_frames": args.frames,
            "strength": args.strength, "model": args.model, "tof_options": args.tof_options,
            "clip_nfe": clip_nfe, "guide": guide, "judge": JUDGE, "top_k": args.top,
            "intervals": "95% percentile bootstrap over prompts (each with all its seeds), "
                         "10,000 resamples, seed 0; differences paired on prompt and seed",
            "rows": rows, "total_wall_seconds": round(time.perf_counter() - started, 1),
            "command": command_line(argv),
        }
        save_report(report, args.name, show=False)  # after every run: a stopped one keeps it
    keys = [*METRICS, *(f"{m}_vs_{LINEAR}" for m in METRICS[:3]),
            *(f"{m}_vs_{LINEAR}_at_2x" for m in METRICS[:3])]
    for row in rows:
        print(f"{row['strategy']} {row['budget_clips']:g}x")
        for key in keys:
            if key in row:
                print(f"  {key:<40}{_cell(row, key)}")
    save_plot(lambda path: plot(rows, path), args.name)
    return report


if __name__ == "__main__":
    main()
