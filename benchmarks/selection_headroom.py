"""How much can the final pick gain over the guide's argmax? Every selection rule on the same
best-of-N pools, with paired intervals.

Best-of-N's candidates are independent samples, so its pool at budget N shows what any choice
of the returned image could reach: the oracle's pass@N (some candidate is right) is the ceiling,
and the guide's argmax is what best-of-N returns. In between are the ``select`` methods of
diffsearch/strategies/selection.py, evaluated here by calling that module's own ``pick`` on the
pool (so a rule's figure is the answer a real run with that ``select`` returns):

- ``argmax`` (best-of-N), and the argmax of each ``--also`` verifier alone;
- ``agreement@k``: the guide's top k re-ranked by the mean rank of the guide and the ``--also``
  verifiers (at k = N, a rank-normalised ensemble's argmax over the whole pool);
- ``held-out@k``: the first ``--also`` verifier's best among the guide's top k;
- ``softmax@T``: a draw by exp(reward / T) over all N, seeded as a run seeds it.

Every candidate of the pool is scored by the guide, the oracle and the ``--also`` verifiers in
the run itself (``eval_verifiers``), so no rule costs another run. Also reported: best-of-m for
m < N on the first m candidates with the oracle's pass@m beside it (is there a best N below
the budget?), and each verifier's pairwise accuracy against the oracle within pools (of the
pairs of one prompt and seed where exactly one image is right, the share it orders right).

Each rule's accuracy is paired with the argmax on (prompt, seed) and given a 95% cluster
bootstrap interval over prompts (``_stats.py``). Choosing a rule by these figures and then
quoting its figure on the same runs is optimistic: confirm the chosen rule on other seeds with
``search_scaling.py --config``. Prints and saves ``benchmarks/results/<name>.json``,
``<name>.png`` and the pools themselves, ``<name>_pools.json``, which ``--pools`` analyses
again without running anything (a new rule costs a second, not a run), also under another
guide of the verifiers the pools were scored by (``--guide``, ``--also``)::

    python benchmarks/selection_headroom.py [--prompts 93] [--seeds 0 1 2] [--budget 32]
        [--also shapes-clip-small] [--executor dask --threads 1]
    python benchmarks/selection_headroom.py --pools benchmarks/results/NAME_pools.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffsearch.api import run_job
from diffsearch.job import Job, verifier_label
from diffsearch.pipelines.shapes.world import distinct_prompts
from diffsearch.strategies.common import ranked
from diffsearch.strategies.selection import Selection, pick, to_rescore
from diffsearch.tasks import Outcome

from _report import RESULTS, command_line, save_plot, save_report, verifier_spec
from _stats import Interval, mean_interval, paired_difference

ORACLE = "shapes-oracle"
SETTINGS = ("prompts", "seeds", "prompt_seed", "budget", "guide", "also")
"""What a pools file records of the run that made it, so ``--pools`` reports it as run."""
TOPS = (2, 4, 8, 16)
TEMPERATURES = (0.005, 0.01, 0.02, 0.05)


def pools(args: argparse.Namespace, prompts: list[str]) -> list[dict[str, Any]]:
    """Best-of-N at ``--budget`` under each seed: one pool per (prompt, seed), each candidate
    with every verifier's score."""
    found = []
    for seed in args.seeds:
        run_dir = args.work / f"best-of-n-{args.budget}x-seed{seed}"
        shutil.rmtree(run_dir, ignore_errors=True)
        job = Job.model_validate({
            "prompts": prompts, "model": "shapes", "strategy": {"name": "best-of-n"},
            "budget": f"{args.budget}x", "verifier": verifier_spec(args.guide),
            "eval_verifiers": [ORACLE, *map(verifier_spec, args.also)], "seed": seed,
            "executor": args.executor,
            "batch_size": 16, "threads": args.threads, "images": "none",
        })
        began = time.perf_counter()
        result = run_job(job, run_dir, progress_bar=False)
        for prompt in result.prompts:
            found.append({"prompt": prompt.prompt_index, "text": prompt.prompt, "seed": seed,
                          "candidates": [{"candidate": c.candidate, "scores": c.scores}
                                         for c in prompt.candidates
                                         if c.has_final and c.error is None]})
        print(json.dumps({"seed": seed, "prompts": len(result.prompts),
                          "wall_seconds": round(time.perf_counter() - began, 1)}), flush=True)
    return found


def rules(also: Sequence[str], budget: int) -> dict[str, Selection]:
    """Label -> the ``select`` it stands for (re-scoring the guide's top k for each k of
    ``TOPS`` below the budget's N, and all N: a rank ensemble over the whole pool)."""
    found = {"argmax": Selection()}
    for t in TEMPERATURES:
        found[f"softmax@{t}"] = Selection("softmax", temperature=t)
    if also:
        for k in [*(k for k in TOPS if k < budget), budget]:
            found[f"agreement@{k}"] = Selection("agreement", verifiers=tuple(also), top=k)
            found[f"held-out@{k}"] = Selection("held-out", verifiers=(also[0],), top=k)
    return found


def picked(pool: dict[str, Any], selection: Selection, guide: str, *, first: int | None = None
           ) -> dict[str, float] | None:
    """The scores of the candidate ``selection`` returns from the pool's ``first`` candidates
    (all by default), through selection.py's ``pick``."""
    answers = ranked(Outcome(prompt_index=pool["prompt"], candidate=c["candidate"], step=0,
                             reward=c["scores"][guide], scores=c["scores"])
                     for c in first_candidates(pool, first))
    rescored = {a.candidate: a.scores for a in to_rescore(selection, answers)}
    best = pick(selection, answers, rescored, seed=pool["seed"], prompt=pool["text"])
    return None if best is None else best.scores


def first_candidates(pool: dict[str, Any], first: int | None) -> list[dict[str, Any]]:
    """The pool's candidates numbered below ``first`` (all when None): best-of-``first``'s own
    pool, since a candidate's noise depends on its number and not on N."""
    return [c for c in pool["candidates"] if first is None or c["candidate"] < first]


def accuracy_records(found: list[dict[str, Any]], selection: Selection, guide: str, *,
                     first: int | None = None) -> list[dict[str, Any]]:
    records = []
    for pool in found:
        scores = picked(pool, selection, guide, first=first)
        records.append({"prompt": pool["prompt"], "seed": pool["seed"],
                        "correct": float(bool(scores) and scores[ORACLE] >= 1.0)})
    return records


def pass_records(found: list[dict[str, Any]], first: int | None = None) -> list[dict[str, Any]]:
    """Whether any of the first candidates is right (the ceiling of every pick)."""
    return [{"prompt": p["prompt"], "seed": p["seed"],
             "correct": float(any(c["scores"][ORACLE] >= 1.0
                                  for c in first_candidates(p, first)))} for p in found]


def interval(records: list[dict[str, Any]]) -> Interval:
    return mean_interval([r["correct"] for r in records], [r["prompt"] for r in records])


def versus(records: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> Interval:
    return paired_difference([r["correct"] for r in records], [r["correct"] for r in baseline],
                             [r["prompt"] for r in records])


def pairwise_accuracy(found: list[dict[str, Any]], label: str) -> float | None:
    """Of the within-pool pairs where exactly one image is right, the share ``label`` scores
    the right one higher (ties count half)."""
    right = total = 0.0
    for pool in found:
        scored = [(c["scores"][label], c["scores"][ORACLE] >= 1.0) for c in pool["candidates"]
                  if label in c["scores"]]
        good = [s for s, ok in scored if ok]
        bad = [s for s, ok in scored if not ok]
        for g in good:
            for b in bad:
                total += 1
                right += 1.0 if g > b else 0.5 if g == b else 0.0
    return round(right / total, 4) if total else None


def plot(curve: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 4.2))
    for key, label in (("best_of_m", "guide's argmax of the first m"),
                       ("pass_at_m", "oracle pass@m (ceiling)")):
        m = [row["m"] for row in curve]
        mean = [row[key]["mean"] for row in curve]
        errors = [[a - row[key]["low"] for a, row in zip(mean, curve)],
                  [row[key]["high"] - a for a, row in zip(mean, curve)]]
        axis.errorbar(m, mean, yerr=errors, marker="o", capsize=3, label=label)
    axis.set_xscale("log", base=2)
    axis.set_xticks([row["m"] for row in curve], [str(row["m"]) for row in curve])
    axis.minorticks_off()
    axis.set_xlabel("candidates m")
    axis.set_ylabel("oracle accuracy (95% CI)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=93)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--prompt-seed", type=int, default=0,
                        help="seed of the held-out prompt draw")
    parser.add_argument("--budget", type=int, default=32, help="N, as a multiple of one sample")
    parser.add_argument("--guide", default=None,
                        help="the guiding verifier, a name or a spec in JSON (default "
                             "shapes-clip; with --pools, the label of another verifier the "
                             "pools hold scores of)")
    parser.add_argument("--also", nargs="*", default=None,
                        help="verifiers for agreement and held-out picks (the first is the "
                             "held-out one), names or specs in JSON; with --pools, labels")
    parser.add_argument("--executor", choices=["local", "dask"], default="local")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", type=Path, default=Path("runs/bench-selection-headroom"))
    parser.add_argument("--name", default="selection_headroom")
    parser.add_argument("--pools", type=Path,
                        help="analyse the pools a run saved (its settings replace the flags, "
                             "but for --guide and --also)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    if args.pools:
        saved = json.loads(args.pools.read_text())
        chosen = {key: getattr(args, key) for key in ("guide", "also")}
        for key in SETTINGS:
            setattr(args, key, saved[key])
        for key, value in chosen.items():  # a pool holds every verifier's scores: re-rank it
            if value is not None:
                setattr(args, key, value)
        found = saved["pools"]
        held = set.intersection(*(set(c["scores"]) for p in found for c in p["candidates"]))
        missing = sorted({args.guide, *args.also} - held)
        if missing:
            raise SystemExit(f"{args.pools} holds no scores of {', '.join(missing)} "
                             f"(it has: {', '.join(sorted(held))})")
    else:
        args.guide = args.guide or "shapes-clip"
        args.also = ["shapes-clip-small"] if args.also is None else args.also
        found = pools(args, distinct_prompts("heldout", args.prompts, seed=args.prompt_seed))
        # from here on each verifier is the label its scores are stored under in the pools
        args.guide = verifier_label(verifier_spec(args.guide))
        args.also = [verifier_label(verifier_spec(spec)) for spec in args.also]
        pools_path = RESULTS / f"{args.name}_pools.json"
        saved = {**{key: getattr(args, key) for key in SETTINGS},
                 "command": command_line(argv), "pools": found}
        pools_path.write_text(json.dumps(saved, separators=(",", ":")) + "\n")
    sizes = [m for m in (1, 2, 4, 8, 16, 32, 64, 128) if m < args.budget] + [args.budget]
    by_size = {m: rule_rows(found, args.guide, args.also, m) for m in sizes if m >= 4}
    rows = by_size[args.budget]
    curve = [{"m": m, "best_of_m": interval(accuracy_records(found, Selection(), args.guide,
                                                             first=m)).to_json(),
              "pass_at_m": interval(pass_records(found, first=m)).to_json()} for m in sizes]
    report = {
        "benchmark": "selection_headroom", **{key: getattr(args, key) for key in SETTINGS},
        "judge": ORACLE,
        "pools": str(args.pools) if args.pools else f"benchmarks/results/{args.name}_pools.json",
        "pools_made_by": saved["command"],
        "pairwise_accuracy": {v: pairwise_accuracy(found, v) for v in [args.guide, *args.also]},
        "intervals": "95% percentile bootstrap over prompts (each with all its seeds), 10,000 "
                     "resamples, seed 0; differences paired with the argmax on prompt and seed",
        "rules": rows, "rules_by_pool_size": {str(m): r for m, r in by_size.items()},
        "best_of_m": curve,
        "total_wall_seconds": round(time.perf_counter() - started, 1),
        "command": command_line(argv),
    }
    print(f"\n{'rule':<28}{'oracle accuracy':<30}minus argmax")
    for row in rows:
        print(f"{row['rule']:<28}{_mean(row['accuracy']):<30}"
              f"{Interval.from_json(row['vs_argmax'])}")
    print(f"\nminus the argmax of the same first m candidates (best-of-m):\n"
          f"{'rule':<28}" + "".join(f"{'m=' + str(m):<32}" for m in by_size))
    for row in rows:
        cells = [next((r for r in by_size[m] if r["rule"] == row["rule"]), None)
                 for m in by_size]
        print(f"{row['rule']:<28}" + "".join(
            f"{'-' if c is None else str(Interval.from_json(c['vs_argmax'])):<32}"
            for c in cells))
    print("\npairwise accuracy against the oracle:", report["pairwise_accuracy"])
    print("best-of-m:", ", ".join(f"m={r['m']}: {r['best_of_m']['mean']:.3f} "
                                  f"(pass {r['pass_at_m']['mean']:.3f})" for r in curve))
    save_report(report, args.name, show=False)
    save_plot(lambda path: plot(curve, path), args.name)
    return report


def rule_rows(found: list[dict[str, Any]], guide: str, also: Sequence[str], size: int
              ) -> list[dict[str, Any]]:
    """Every rule on the pools' first ``size`` candidates (:func:`first_candidates`), paired
    with the argmax of the same candidates."""
    baseline = accuracy_records(found, Selection(), guide, first=size)
    rows = [{"rule": "oracle pass@N (ceiling)",
             **_row(pass_records(found, first=size), baseline)}]
    for label, selection in rules(also, size).items():
        rows.append({"rule": label, "select": _select_json(selection),
                     **_row(accuracy_records(found, selection, guide, first=size), baseline)})
    for verifier in also:
        rows.append({"rule": f"argmax of {verifier}", **_row(
            accuracy_records(found, Selection(), verifier, first=size), baseline)})
    return rows


def _row(records: list[dict[str, Any]], baseline: list[dict[str, Any]]) -> dict[str, Any]:
    return {"accuracy": interval(records).to_json(),
            "vs_argmax": versus(records, baseline).to_json()}


def _select_json(selection: Selection) -> dict[str, Any]:
    out: dict[str, Any] = {"method": selection.method}
    if selection.temperature is not None:
        out["temperature"] = selection.temperature
    if selection.verifiers:
        out["verifiers"] = list(selection.verifiers)
    if selection.top is not None:
        out["top"] = selection.top
    return out


def _mean(saved: dict[str, Any]) -> str:
    return f"{saved['mean']:.3f} [{saved['low']:.3f}, {saved['high']:.3f}]"


if __name__ == "__main__":
    main()
