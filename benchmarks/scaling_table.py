"""Every strategy at every budget against best-of-N at the same budget, from saved
``search_scaling`` reports, as one table with paired 95% intervals.

A full grid (six strategies x four budgets x 93 prompts x 3 seeds) takes hours here, so it is
run in parts: best-of-N and EvoSearch in one run per budget, the other strategies with
``--no-baseline`` in another. Each report keeps its per-prompt-and-seed records, so this pairs
every row with the baseline's row at the same budget from whichever report holds it (the same
cluster bootstrap over prompts as the benchmarks themselves, ``_stats.py``) and prints the grid
as Markdown. The reports must share prompts, seeds, guide and judge; a (strategy, budget) found
in two of them is refused rather than silently picking one. Prints and saves
``benchmarks/results/<name>.json``::

    python benchmarks/scaling_table.py REPORT.json [REPORT.json ...] [--baseline best-of-n]
        [--metric oracle_accuracy] [--name scaling_table]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import compare_rows
import search_scaling

from _report import command_line, save_report
from _stats import Interval, summarise

SAME_GRID = (*compare_rows.SAME_WORLD, "seeds")
"""What the reports of one table share: one world, and the same seeds for every cell."""
Rows = dict[tuple[str, float], tuple[Path, dict[str, Any]]]
"""(strategy, budget multiple) -> (the report holding it, the row)."""


def load_rows(paths: list[Path]) -> tuple[dict[str, Any], Rows]:
    """The first report (for its world) and every row by (strategy, budget multiple)."""
    reports = [(path, json.loads(path.read_text())) for path in paths]
    first = reports[0][1]
    rows: Rows = {}
    for path, report in reports:
        if compare_rows.kind_of(report) != "search_scaling":
            raise SystemExit(f"{path} is not a search_scaling report")
        compare_rows.check_same_world(report, first, SAME_GRID)
        for row in report["rows"]:
            key = (row["strategy"], row["budget_multiple"])
            if key in rows:
                raise SystemExit(f"{key[0]}@{key[1]:g}x is in both {rows[key][0]} and {path}: "
                                 f"give only one of them")
            rows[key] = (path, row)
    return first, rows


def _format(value: dict[str, Any] | None, difference: dict[str, Any] | None, scale: float) -> str:
    """``74.2`` for the baseline, ``75.3, -0.4 [-5.4, +4.7]`` for a paired row."""
    if value is None:
        return "-"
    text = f"{value['mean'] * scale:.1f}" if scale != 1 else f"{value['mean']:.3f}"
    if difference is None:
        return text
    gap = Interval.from_json(difference)
    digits = 1 if scale != 1 else 3
    bold = "**" if gap.excludes_zero else ""
    return (f"{text}, {bold}{gap.mean * scale:+.{digits}f} [{gap.low * scale:+.{digits}f}, "
            f"{gap.high * scale:+.{digits}f}]{bold}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reports", type=Path, nargs="+", help="search_scaling report JSON files")
    parser.add_argument("--baseline", default=search_scaling.BASELINE,
                        help="the strategy every row is paired with (default: %(default)s)")
    parser.add_argument("--metric", choices=search_scaling.METRICS, default="oracle_accuracy")
    parser.add_argument("--name", default="scaling_table")
    args = parser.parse_args(argv)
    world, rows = load_rows(args.reports)
    budgets = sorted({budget for _, budget in rows})
    strategies = list(dict.fromkeys([args.baseline, *(label for label, _ in rows)]))
    scale = 100.0 if args.metric == "oracle_accuracy" else 1.0
    cells = []
    for label in strategies:
        for budget in budgets:
            if (label, budget) not in rows:
                continue
            path, row = rows[label, budget]
            base = rows.get((args.baseline, budget)) if label != args.baseline else None
            name = f"{args.baseline}@{budget:g}x"
            summary = summarise(row["units"], base[1]["units"] if base else None,
                                [args.metric], name)
            cells.append({"strategy": label, "budget_multiple": budget, "report": str(path),
                          "nfe_per_prompt": row["nfe_per_prompt"],
                          "value": summary[args.metric],
                          "vs_baseline": summary.get(f"{args.metric}_vs_{name}")})
    by_key = {(c["strategy"], c["budget_multiple"]): c for c in cells}
    unit = " (%; minus best-of-N in points)" if scale != 1 else ""
    lines = [f"| {args.metric}{unit} | " + " | ".join(f"{b:g}x" for b in budgets) + " |",
             "|---" * (len(budgets) + 1) + "|"]
    for label in strategies:
        lines.append(f"| {label} | " + " | ".join(
            _format(cell["value"], cell["vs_baseline"], scale) if (cell := by_key.get((label, b)))
            else "-" for b in budgets) + " |")
    table = "\n".join(lines)
    print(table)
    result = {"benchmark": "scaling_table", "reports": [str(p) for p in args.reports],
              "baseline": args.baseline, "metric": args.metric,
              **{key: world.get(key) for key in SAME_GRID},
              "intervals": "95% percentile bootstrap over prompts (each with all its seeds), "
                           "differences paired on prompt and seed with the baseline at the "
                           "same budget; bold where the interval excludes 0",
              "cells": cells, "markdown": table, "command": command_line(argv)}
    save_report(result, args.name, show=False)
    return result


if __name__ == "__main__":
    main()
