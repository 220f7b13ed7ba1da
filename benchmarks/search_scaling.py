"""How does each strategy scale with compute, and does it beat best-of-N? Paired intervals.

Every strategy runs on the same fixed set of distinct held-out shapes prompts, under each of
``--seeds`` (the job seed: the noises), at each budget (multiples of one sample's cost), guided
by ``--guide`` (shapes-clip), with the shapes oracle as a held-out judge that no strategy sees.
Best-of-N runs at every budget as the baseline, so every other strategy is paired with it on the
same prompts, seeds and NFE. Per (strategy, budget) it reports, each as a mean with a 95%
cluster-bootstrap interval over prompts (``_stats.py``), and as a paired difference from
best-of-N with its interval:

- oracle accuracy of the returned image (all aspects right), and its mean oracle score;
- the guide's reward of the returned image;
- diversity of the top-k: mean pairwise RMS distance (pixels in [0, 1]) between the ``--top``
  final images the guide ranks best, per prompt and seed -- near 0 when they are copies;
- how often the returned image is not the guide's argmax (``select`` options), NFE, wall time.

A difference whose interval contains 0 is marked "n.s." in the printed table and has
``excludes_zero: false`` in the JSON: it is not a result. Prints and saves
``benchmarks/results/<name>.json`` and a plot ``<name>.png`` (differences from best-of-N with
their intervals against NFE)::

    python benchmarks/search_scaling.py [--prompts 32] [--seeds 0 1 2] [--budgets 8 32]
        [--strategies evosearch ttsnap ...] [--config LABEL=JSON ...] [--guide shapes-clip]

``--config`` adds a variant as a strategy spec in JSON, e.g.
``--config 'bon-softmax={"name": "best-of-n", "select": {"method": "softmax",
"temperature": 0.01}}'``. The TTSnap variant with a distilled noise-aware verifier runs when
``--distilled FOLDER`` names the output of ``diffsearch distill``. ``--no-baseline`` skips
best-of-N, for rows to be paired with a best-of-N row saved by another run
(``compare_rows.py``, e.g. against best-of-N at twice the budget).
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffsearch import run_folder
from diffsearch.api import run_job
from diffsearch.job import Job, verifier_label
from diffsearch.pipelines.shapes.world import distinct_prompts
from diffsearch.results import PromptResult, RunResult

from _report import command_line, save_plot, save_report, verifier_spec
from _stats import Interval, pixel_spread, summarise

ORACLE = "shapes-oracle"
BASELINE = "best-of-n"
DEFAULT_STRATEGIES = ["evosearch", "ttsnap", "zero-order", "paths", "particles"]
METRICS = ("oracle_accuracy", "oracle_score", "guiding_reward", "diversity")


def strategy_configs(names: list[str], extra: Sequence[str], distilled: Path | None, *,
                     baseline: bool = True) -> dict[str, dict[str, Any]]:
    """Label -> strategy spec: best-of-N first (unless not ``baseline``), then ``names``, the
    ``--config`` variants and 'ttsnap-distilled' (the per-step distilled checkpoints)."""
    configs: dict[str, dict[str, Any]] = {BASELINE: {"name": BASELINE}} if baseline else {}
    configs.update({name: {"name": name} for name in names})
    for item in extra:
        label, _, spec = item.partition("=")
        if not label or not spec:
            raise SystemExit(f"--config: expected LABEL=JSON, got {item!r}")
        configs[label] = json.loads(spec)
    if distilled is not None:
        manifest = json.loads((distilled / "distilled.json").read_text())
        configs["ttsnap-distilled"] = {"name": "ttsnap", "verifiers": {
            int(step): str(distilled / folder) for step, folder in manifest["steps"].items()}}
    return configs


def answers(prompt: PromptResult, guide: str) -> list[Any]:
    """The prompt's final images scored by the guide, best first (re-scoring copies made by a
    ``select`` carry another verifier's score as their reward and are left out)."""
    finals = [c for c in prompt.candidates
              if c.has_final and c.reward is not None and c.scores.get(guide) == c.reward]
    return sorted(finals, key=lambda c: (-c.reward, c.candidate))


def diversity(run_dir: Path, prompt: PromptResult, guide: str, top: int) -> float | None:
    """Mean pairwise RMS pixel distance of the guide's ``top`` best final images."""
    return pixel_spread([np.asarray(Image.open(run_dir / run_folder.candidate_image(
        prompt.prompt_index, c.candidate)), dtype=np.float64) / 255
        for c in answers(prompt, guide)[:top]])


def units(result: RunResult, run_dir: Path, guide: str, top: int) -> list[dict[str, Any]]:
    """One record per prompt of a run: what the returned image scores, and the top-k spread."""
    records = []
    for prompt in result.prompts:
        best = prompt.best
        oracle = best.scores.get(ORACLE, 0.0) if best else 0.0
        ranked = answers(prompt, guide)
        records.append({
            "prompt": prompt.prompt_index,
            "oracle_accuracy": float(oracle >= 1.0), "oracle_score": oracle,
            "guiding_reward": best.reward if best and best.reward is not None else 0.0,
            "diversity": diversity(run_dir, prompt, guide, top),
            "not_argmax": float(bool(best and ranked and best.candidate != ranked[0].candidate)),
        })
    return records


def plot(rows: list[dict[str, Any]], path: Path, guide: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = (("oracle_accuracy", "oracle accuracy (held out)"),
              ("guiding_reward", f"guiding reward ({guide})"), ("diversity", "top-k diversity"))
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 4.2))
    labels = [label for label in dict.fromkeys(r["strategy"] for r in rows) if label != BASELINE]
    for offset, label in enumerate(labels):
        mine = sorted((r for r in rows if r["strategy"] == label), key=lambda r: r["budget_nfe"])
        for axis, (metric, _) in zip(axes, panels):
            shown = [(r["budget_nfe"], r[f"{metric}_vs_{BASELINE}"]) for r in mine
                     if r.get(f"{metric}_vs_{BASELINE}")]
            if not shown:
                continue
            nfe = [n * (1 + 0.04 * (offset - len(labels) / 2)) for n, _ in shown]  # dodge
            mean = np.array([d["mean"] for _, d in shown])
            errors = [mean - [d["low"] for _, d in shown], [d["high"] for _, d in shown] - mean]
            axis.errorbar(nfe, mean, yerr=errors, marker="o", capsize=3, label=label)
    budgets = sorted({r["budget_nfe"] for r in rows})
    for axis, (_, title) in zip(axes, panels):
        axis.axhline(0, color="black", linewidth=0.8)
        axis.set_xscale("log", base=2)
        axis.set_xticks(budgets, [str(b) for b in budgets])
        axis.minorticks_off()
        axis.set_xlabel("NFE per prompt")
        axis.set_title(f"{title}: minus {BASELINE}, 95% CI", fontsize=9)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _cell(summary: dict[str, Any], metric: str) -> str:
    difference = summary.get(f"{metric}_vs_{BASELINE}")
    if difference is None:
        value = summary.get(metric)
        return "-" if value is None else f"{value['mean']:.3f}"
    return str(Interval.from_json(difference))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="job seeds (the noises); every one runs every strategy")
    parser.add_argument("--prompt-seed", type=int, default=0,
                        help="seed of the held-out prompt draw")
    parser.add_argument("--budgets", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--strategies", nargs="*", default=DEFAULT_STRATEGIES)
    parser.add_argument("--config", action="append", default=[], metavar="LABEL=JSON",
                        help="a strategy variant (repeatable)")
    parser.add_argument("--guide", default="shapes-clip",
                        help="the guiding verifier: a name, or a spec in JSON (an ensemble, a "
                             "shift-average)")
    parser.add_argument("--top", type=int, default=4, help="k of the top-k diversity")
    parser.add_argument("--distilled", type=Path, help="folder written by `diffsearch distill`")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip best-of-N: pair the rows with a saved one later "
                             "(compare_rows.py)")
    parser.add_argument("--executor", choices=["local", "dask"], default="local")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch threads per worker (1 when something else shares the CPU)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-search-scaling"))
    parser.add_argument("--name", default="search_scaling")
    args = parser.parse_args(argv)

    prompts = distinct_prompts("heldout", args.prompts, seed=args.prompt_seed)
    guide = verifier_spec(args.guide)
    label_of_guide = verifier_label(guide)
    configs = strategy_configs(args.strategies, args.config, args.distilled,
                               baseline=not args.no_baseline)
    records: dict[tuple[str, int], list[dict[str, Any]]] = {}
    spent: dict[tuple[str, int], list[tuple[float, float]]] = {}
    started = time.perf_counter()
    num_steps = 0
    for multiple, seed, (label, spec) in itertools.product(args.budgets, args.seeds,
                                                           configs.items()):
        run_dir = args.work / f"{label}-{multiple}x-seed{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        job = Job.model_validate({
            "prompts": prompts, "model": "shapes", "strategy": spec,
            "budget": f"{multiple}x", "verifier": guide, "eval_verifiers": [ORACLE],
            "seed": seed, "executor": args.executor, "batch_size": 16,
            "threads": args.threads, "images": "all",
        })
        result = run_job(job, run_dir, progress_bar=False)
        num_steps = result.model.num_steps
        mine = units(result, run_dir, label_of_guide, args.top)
        for record in mine:
            record["seed"] = seed
        records.setdefault((label, multiple), []).extend(mine)
        spent.setdefault((label, multiple), []).append(
            (result.nfe / len(result.prompts), result.wall_seconds))
        print(json.dumps({"strategy": label, "budget_multiple": multiple, "seed": seed,
                          "oracle_accuracy": statistics.fmean(r["oracle_accuracy"]
                                                              for r in mine),
                          "wall_seconds": round(result.wall_seconds, 1)}), flush=True)
        rows = report_rows(records, spent, configs, num_steps)
        save_report({
            "benchmark": "search_scaling", "prompts": len(prompts), "seeds": args.seeds,
            "prompt_seed": args.prompt_seed, "guide": guide, "judge": ORACLE,
            "top_k": args.top, "baseline": BASELINE,
            "intervals": "95% percentile bootstrap over prompts (each with all its seeds), "
                         "10,000 resamples, seed 0; differences paired on prompt and seed",
            "rows": rows, "total_wall_seconds": round(time.perf_counter() - started, 1),
            "command": command_line(argv),
        }, args.name, show=False)  # after every run: a stopped benchmark keeps what it did
    print(f"\n{'strategy':<22}{'budget':>7}  " + "  ".join(f"{m:<30}" for m in METRICS))
    for row in rows:
        print(f"{row['strategy']:<22}{row['budget_multiple']:>6}x  "
              + "  ".join(f"{_cell(row, m):<30}" for m in METRICS))
    if BASELINE in configs:  # the plot shows differences from it
        save_plot(lambda path: plot(rows, path, label_of_guide), args.name)
    return rows


def report_rows(records: dict[tuple[str, int], list[dict[str, Any]]],
                spent: dict[tuple[str, int], list[tuple[float, float]]],
                configs: dict[str, dict[str, Any]], num_steps: int) -> list[dict[str, Any]]:
    """One row per (strategy, budget) run so far, paired with best-of-N where it has run."""
    rows = []
    for (label, multiple), mine in records.items():
        baseline = records.get((BASELINE, multiple)) if label != BASELINE else None
        done = {(r["prompt"], r["seed"]) for r in baseline or ()}
        paired = [r for r in mine if baseline is None or (r["prompt"], r["seed"]) in done]
        if not paired:
            continue
        nfe, wall = zip(*spent[(label, multiple)])
        rows.append({"strategy": label, "spec": configs[label], "budget_multiple": multiple,
                     "budget_nfe": multiple * num_steps,
                     **summarise(paired, baseline, METRICS, BASELINE),
                     "not_argmax_share": round(statistics.fmean(r["not_argmax"]
                                                                for r in paired), 4),
                     "nfe_per_prompt": statistics.fmean(nfe),
                     "wall_seconds": round(sum(wall), 1), "units": mine})
    return rows


if __name__ == "__main__":
    main()
