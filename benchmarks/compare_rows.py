"""Pair two rows of saved ``search_scaling`` (or ``tof_scaling``) reports, e.g. a strategy at 16x
against best-of-N at 32x, with paired 95% intervals.

``search_scaling.py`` pairs every strategy with best-of-N at the same budget. Some claims
compare across budgets or across runs ("TTSnap with the distilled verifier at 16x is at least
as good as best-of-N at 32x"); rerunning best-of-N for each of them would double the cost.
Each report keeps its per-prompt-and-seed records (``units``), so any two rows run on the same
prompts are paired here on (prompt, seed), with the same cluster bootstrap over prompts
(``_stats.py``). ``tof_scaling`` rows pair the same way, their budget counted in clips (a
Tree-of-Frames variant run alone against the linear clips of an earlier report). Prints and
saves ``benchmarks/results/<name>.json``::

    python benchmarks/compare_rows.py REPORT.json:LABEL@MULTIPLE BASELINE.json:LABEL@MULTIPLE
        [--pool REPORT.json:LABEL@MULTIPLE BASELINE.json:LABEL@MULTIPLE ...]
        [--name compare_rows]

e.g. ``benchmarks/results/search_ttsnap_16x.json:ttsnap-distilled@16
benchmarks/results/search_93x3_32x.json:best-of-n@32``. ``--pool`` adds the same comparison run
on other seeds (another pair of reports), so one interval covers every seed set: the records
are pooled, each (prompt, seed) once, and the bootstrap still resamples prompts, each with all
its seeds.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import search_scaling
import tof_scaling

from _report import command_line, save_report
from _stats import Interval, summarise

SAME_WORLD = ("prompts", "prompt_seed", "guide", "judge", "top_k")
"""What two reports must share for their records to pair: the same prompts, guide and judge."""
KINDS: dict[str, tuple[tuple[str, ...], str, tuple[str, ...]]] = {
    "search_scaling": (search_scaling.METRICS, "budget_multiple", SAME_WORLD),
    "tof_scaling": (tof_scaling.METRICS, "budget_clips",
                    (*SAME_WORLD, "model", "num_steps", "num_frames", "strength")),
}
"""Per benchmark: its metrics, the row field of its budget, and what two reports share."""


def kind_of(report: dict[str, Any]) -> str:
    """The report's benchmark (reports saved before they named it are search_scaling's)."""
    kind = report.get("benchmark", "search_scaling")
    if kind not in KINDS:
        raise SystemExit(f"cannot pair rows of a {kind!r} report (only: {', '.join(KINDS)})")
    return kind


def load_row(spec: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``REPORT.json:LABEL@MULTIPLE`` -> (the report, its row)."""
    path, _, row_name = spec.rpartition(":")
    label, _, multiple = row_name.rpartition("@")
    try:
        budget = float(multiple)
    except ValueError:
        budget = None
    if not path or not label or budget is None:
        raise SystemExit(f"expected REPORT.json:LABEL@MULTIPLE, got {spec!r}")
    report = json.loads(Path(path).read_text())
    key = KINDS[kind_of(report)][1]
    for row in report["rows"]:
        if row["strategy"] == label and row[key] == budget:
            return report, row
    have = ", ".join(f"{r['strategy']}@{r[key]:g}" for r in report["rows"])
    raise SystemExit(f"{path} has no row {label}@{multiple} (it has {have})")


def check_same_world(report: dict[str, Any], other: dict[str, Any], keys: tuple[str, ...]) -> None:
    """Refuse two reports whose records do not pair (other prompts, guide, judge, ...)."""
    differing = [key for key in keys if report.get(key) != other.get(key)]
    if differing:
        raise SystemExit(f"the reports differ in {', '.join(differing)}: their records do "
                         f"not pair")


def load_pooled(specs: list[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """One side of the comparison: the first spec's report, and its row with the records of
    every spec's row (the same strategy and budget run on other seeds)."""
    (report, row), *others = [load_row(spec) for spec in specs]
    kind = kind_of(report)
    budget = KINDS[kind][1]
    units = list(row["units"])
    seen = {(u["prompt"], u["seed"]) for u in units}
    for spec, (other_report, other_row) in zip(specs[1:], others):
        if kind_of(other_report) != kind:
            raise SystemExit(f"{spec}: a {kind_of(other_report)} row cannot pool with {kind} ones")
        check_same_world(other_report, report, KINDS[kind][2])
        if (other_row["strategy"], other_row[budget]) != (row["strategy"], row[budget]):
            raise SystemExit(f"{spec}: pooled rows must be one strategy at one budget, like "
                             f"{specs[0]}")
        keys = {(u["prompt"], u["seed"]) for u in other_row["units"]}
        if keys & seen:
            raise SystemExit(f"{spec} repeats (prompt, seed) records of another pooled row: "
                             f"pool reports of other seeds only")
        seen |= keys
        units += other_row["units"]
    return report, {**row, "units": units}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("row", help="REPORT.json:LABEL@MULTIPLE")
    parser.add_argument("baseline", help="REPORT.json:LABEL@MULTIPLE")
    parser.add_argument("--pool", nargs=2, action="append", default=[],
                        metavar=("ROW", "BASELINE"),
                        help="the same two rows from reports of other seeds, pooled with the "
                             "first (repeatable)")
    parser.add_argument("--name", default="compare_rows")
    args = parser.parse_args(argv)
    row_specs = [args.row, *(row_spec for row_spec, _ in args.pool)]
    baseline_specs = [args.baseline, *(baseline_spec for _, baseline_spec in args.pool)]
    (report, row), (base_report, base_row) = load_pooled(row_specs), load_pooled(baseline_specs)
    kind = kind_of(report)
    if kind_of(base_report) != kind:
        raise SystemExit(f"a {kind} row cannot pair with a {kind_of(base_report)} one")
    metrics, budget, same_world = KINDS[kind]
    check_same_world(report, base_report, same_world)
    pairs = {(u["prompt"], u["seed"]) for u in base_row["units"]}
    units = [u for u in row["units"] if (u["prompt"], u["seed"]) in pairs]
    if not units:
        raise SystemExit("the two rows share no (prompt, seed): nothing to pair")
    baseline_name = f"{base_row['strategy']}@{base_row[budget]:g}x"
    summary = summarise(units, base_row["units"], metrics, baseline_name)
    for metric in metrics:
        difference = summary.get(f"{metric}_vs_{baseline_name}")
        if difference is not None:
            print(f"{row['strategy']}@{row[budget]:g}x minus {baseline_name}, "
                  f"{metric}: {Interval.from_json(difference)}")
    result = {
        "benchmark": "compare_rows", "row": args.row, "baseline": args.baseline,
        "pooled": [list(pair) for pair in args.pool],
        "pairs": len(units), **{key: report.get(key) for key in same_world},
        "nfe_per_prompt": {"row": row["nfe_per_prompt"],
                           "baseline": base_row["nfe_per_prompt"]},
        "summary": summary, "command": command_line(argv),
    }
    save_report(result, args.name, show=False)
    return result


if __name__ == "__main__":
    main()
