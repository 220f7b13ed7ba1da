"""The search benchmarks' own arithmetic: paired cluster-bootstrap intervals (_stats.py), rows
paired across reports (compare_rows.py, scaling_table.py) and selection rules scored on saved
pools (selection_headroom.py)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from diffsearch.strategies.selection import Selection

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import selection_headroom as headroom  # noqa: E402

from _stats import mean_interval, paired_difference  # noqa: E402


def test_an_interval_covers_the_true_mean_at_its_level() -> None:
    # 400 experiments of 30 prompts x 2 seeds with a prompt effect: ~95% must cover 0.1
    rng = np.random.default_rng(1)
    covered = 0
    for experiment in range(400):
        prompt_effect = np.repeat(rng.normal(0, 0.3, 30), 2)
        values = 0.1 + prompt_effect + rng.normal(0, 0.1, 60)
        interval = mean_interval(values, np.repeat(np.arange(30), 2), resamples=2000,
                                 seed=experiment)
        covered += interval.low <= 0.1 <= interval.high
    assert 0.90 <= covered / 400 <= 0.99


def test_clusters_widen_the_interval_when_seeds_of_a_prompt_agree() -> None:
    rng = np.random.default_rng(2)
    values = np.repeat(rng.normal(0, 1, 20), 3)  # three identical seeds per prompt
    by_prompt = mean_interval(values, np.repeat(np.arange(20), 3))
    as_if_independent = mean_interval(values, np.arange(60))
    assert by_prompt.clusters == 20 and as_if_independent.clusters == 60
    width = by_prompt.high - by_prompt.low
    assert width > 1.5 * (as_if_independent.high - as_if_independent.low)


def test_paired_difference_is_seeded_and_says_whether_it_excludes_zero() -> None:
    baseline = [0, 1, 0, 1, 1, 0, 1, 1]
    better = [1, 1, 1, 1, 1, 1, 1, 1]
    clusters = [0, 0, 1, 1, 2, 2, 3, 3]
    first = paired_difference(better, baseline, clusters, seed=5)
    assert first == paired_difference(better, baseline, clusters, seed=5)
    assert first.mean == pytest.approx(3 / 8) and first.n == 8
    assert first.excludes_zero and "n.s." not in str(first)
    same = paired_difference(baseline, baseline, clusters)
    assert (same.mean, same.low, same.high) == (0, 0, 0) and not same.excludes_zero
    assert first.to_json()["prompts"] == 4


def test_mismatched_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="as many values as baseline"):
        paired_difference([1, 2], [1], [0, 0])
    with pytest.raises(ValueError, match="one cluster per value"):
        mean_interval([1, 2], [0])


def _report(path: Path, label: str, multiple: int, accuracy: dict[tuple[int, int], float],
            prompts: int = 4) -> str:
    units = [{"prompt": p, "seed": s, "oracle_accuracy": a, "oracle_score": a,
              "guiding_reward": 0.5, "diversity": None} for (p, s), a in accuracy.items()]
    report = {"prompts": prompts, "prompt_seed": 0, "guide": "shapes-clip",
              "judge": "shapes-oracle", "top_k": 4,
              "rows": [{"strategy": label, "budget_multiple": multiple,
                        "nfe_per_prompt": 20.0 * multiple, "units": units}]}
    path.write_text(json.dumps(report))
    return f"{path}:{label}@{multiple}"


def test_compare_rows_pairs_two_saved_rows_on_prompt_and_seed(tmp_path: Path) -> None:
    import compare_rows

    keys = [(p, s) for p in range(4) for s in (0, 1)]
    row = _report(tmp_path / "a.json", "ttsnap", 16, {k: 1.0 for k in keys})
    baseline = _report(tmp_path / "b.json", "best-of-n", 32,
                       {k: float(k[0] % 2) for k in keys[:6]})  # prompt 3 never ran there
    result = compare_rows.main([row, baseline, "--name", str(tmp_path / "out")])
    difference = result["summary"]["oracle_accuracy_vs_best-of-n@32x"]
    assert result["pairs"] == 6 and difference["prompts"] == 3
    assert difference["mean"] == pytest.approx(4 / 6, abs=1e-4)
    assert result["summary"]["diversity"] is None
    assert json.loads((tmp_path / "out.json").read_text())["pairs"] == 6
    other_world = _report(tmp_path / "c.json", "best-of-n", 32, {k: 0.0 for k in keys},
                          prompts=93)
    with pytest.raises(SystemExit, match="differ in prompts"):
        compare_rows.main([row, other_world, "--name", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="has no row ttsnap@32"):
        compare_rows.main([f"{tmp_path / 'a.json'}:ttsnap@32", baseline])


def test_compare_rows_pools_the_same_comparison_run_on_other_seeds(tmp_path: Path) -> None:
    import compare_rows

    first = [(p, s) for p in range(4) for s in (0, 1)]
    later = [(p, s) for p in range(4) for s in (2, 3)]
    row = _report(tmp_path / "a.json", "paths", 32, {k: 1.0 for k in first})
    baseline = _report(tmp_path / "b.json", "best-of-n", 32, {k: 1.0 for k in first})
    later_row = _report(tmp_path / "c.json", "paths", 32, {k: 1.0 for k in later})
    later_baseline = _report(tmp_path / "d.json", "best-of-n", 32, {k: 0.0 for k in later})
    result = compare_rows.main([row, baseline, "--pool", later_row, later_baseline,
                                "--name", str(tmp_path / "out")])
    difference = result["summary"]["oracle_accuracy_vs_best-of-n@32x"]
    assert result["pairs"] == 16 and difference["prompts"] == 4
    assert difference["mean"] == pytest.approx(0.5)  # +0 on seeds 0-1, +1 on seeds 2-3
    assert result["pooled"] == [[later_row, later_baseline]]
    with pytest.raises(SystemExit, match="repeats \\(prompt, seed\\) records"):
        compare_rows.main([row, baseline, "--pool", row, later_baseline])
    other_strategy = _report(tmp_path / "e.json", "particles", 32, {k: 1.0 for k in later})
    with pytest.raises(SystemExit, match="one strategy at one budget"):
        compare_rows.main([row, baseline, "--pool", other_strategy, later_baseline])


def test_scaling_table_pairs_each_row_with_the_baseline_at_its_budget(tmp_path: Path) -> None:
    import scaling_table

    keys = [(p, s) for p in range(4) for s in (0, 1)]
    baselines = tmp_path / "baselines.json"
    _report(baselines, "best-of-n", 8, {k: float(k[0] % 2) for k in keys})
    report = json.loads(baselines.read_text())
    report["rows"].append({**report["rows"][0], "budget_multiple": 16,
                           "units": [{**u, "oracle_accuracy": 1.0} for u in
                                     report["rows"][0]["units"]]})
    baselines.write_text(json.dumps(report))
    others = tmp_path / "others.json"
    _report(others, "paths", 8, {k: 1.0 for k in keys})
    result = scaling_table.main([str(baselines), str(others), "--name", str(tmp_path / "t")])
    cells = {(c["strategy"], c["budget_multiple"]): c for c in result["cells"]}
    assert set(cells) == {("best-of-n", 8), ("best-of-n", 16), ("paths", 8)}
    assert cells["best-of-n", 8]["vs_baseline"] is None
    assert cells["paths", 8]["vs_baseline"]["mean"] == pytest.approx(0.5)
    assert result["markdown"].splitlines()[2:] == [
        "| best-of-n | 50.0 | 100.0 |",
        "| paths | 100.0, +50.0 [+0.0, +100.0] | - |"]  # n.s., so not bold
    assert json.loads((tmp_path / "t.json").read_text())["cells"] == result["cells"]
    with pytest.raises(SystemExit, match="paths@8x is in both"):
        scaling_table.main([str(others), str(others), "--name", str(tmp_path / "t")])
    other_seeds = tmp_path / "seeds.json"
    _report(other_seeds, "ttsnap", 8, {k: 1.0 for k in keys})
    other_report = json.loads(other_seeds.read_text())
    other_seeds.write_text(json.dumps({**other_report, "seeds": [3, 4, 5]}))
    with pytest.raises(SystemExit, match="differ in seeds"):
        scaling_table.main([str(baselines), str(other_seeds), "--name", str(tmp_path / "t")])


def test_compare_rows_pairs_tree_of_frames_rows_by_clips(tmp_path: Path) -> None:
    import compare_rows

    def tof_report(path: Path, label: str, clips: float, accuracy: float,
                   strength: float = 0.7) -> str:
        units = [{"prompt": p, "seed": 0, "oracle_accuracy": accuracy if p else 1.0,
                  "oracle_score": 0.5, "guiding_score": 0.5, "diversity": None}
                 for p in range(3)]
        path.write_text(json.dumps({
            "benchmark": "tof_scaling", "prompts": 3, "prompt_seed": 0, "guide": "shapes-video",
            "judge": "shapes-video-oracle", "top_k": 4, "model": "shapes", "num_steps": 20,
            "num_frames": 5, "strength": strength, "rows": [
                {"strategy": label, "budget_clips": clips, "nfe_per_prompt": 76 * clips,
                 "units": units}]}))
        return f"{path}:{label}@{clips:g}"

    tree = tof_report(tmp_path / "tree.json", "tree-of-frames", 2, 1.0)
    linear = tof_report(tmp_path / "linear.json", "linear-clips", 4, 0.0)
    result = compare_rows.main([tree, linear, "--name", str(tmp_path / "out")])
    assert result["summary"]["oracle_accuracy_vs_linear-clips@4x"]["mean"] == pytest.approx(2 / 3,
                                                                                       abs=1e-4)
    assert "guiding_score" in result["summary"] and "guiding_reward" not in result["summary"]
    other = tof_report(tmp_path / "other.json", "linear-clips", 4, 0.0, strength=0.9)
    with pytest.raises(SystemExit, match="differ in strength"):
        compare_rows.main([tree, other, "--name", str(tmp_path / "out")])
    search = _report(tmp_path / "search.json", "best-of-n", 4, {(0, 0): 1.0}, prompts=3)
    with pytest.raises(SystemExit, match="cannot pair with"):
        compare_rows.main([tree, search, "--name", str(tmp_path / "out")])


def _pool(prompt: int, rows: list[tuple[float, float, float]]) -> dict:
    """A best-of-N pool: (guide, small, oracle) scores per candidate."""
    return {"prompt": prompt, "text": f"prompt {prompt}", "seed": 0, "candidates": [
        {"candidate": i, "scores": {"guide": g, "small": s, "shapes-oracle": o}}
        for i, (g, s, o) in enumerate(rows)]}


def test_selection_headroom_scores_each_rule_with_the_strategies_own_pick() -> None:
    # the guide's best (candidate 0) is wrong and ranks the right one (2) second; the small
    # verifier ranks 2 first, so their mean rank over the guide's top 3 picks it
    pools = [_pool(0, [(0.9, 0.1, 0.0), (0.7, 0.2, 0.0), (0.8, 0.9, 1.0), (0.1, 0.5, 0.0)]),
             _pool(1, [(0.9, 0.9, 1.0), (0.5, 0.1, 0.0)])]
    argmax = headroom.accuracy_records(pools, Selection(), "guide")
    assert [r["correct"] for r in argmax] == [0.0, 1.0]
    agreement = Selection("agreement", verifiers=("small",), top=3)
    assert [r["correct"] for r in headroom.accuracy_records(pools, agreement, "guide")] == [1.0,
                                                                                          1.0]
    # held-out takes the small verifier's best of the guide's top 2 (candidates 0 and 2)
    held_out = Selection("held-out", verifiers=("small",), top=2)
    assert headroom.picked(pools[0], held_out, "guide")["small"] == 0.9
    assert headroom.picked(pools[0], held_out, "guide", first=2)["small"] == 0.2  # 0 and 1
    assert [r["correct"] for r in headroom.pass_records(pools)] == [1.0, 1.0]
    assert [r["correct"] for r in headroom.pass_records(pools, first=2)] == [0.0, 1.0]
    # pairs with exactly one right image: 3 in pool 0 (the guide orders 2 right), 1 in pool 1
    assert headroom.pairwise_accuracy(pools, "guide") == 0.75
    assert headroom.pairwise_accuracy(pools, "small") == 1.0
    gain = headroom.versus(headroom.accuracy_records(pools, agreement, "guide"), argmax)
    assert gain.mean == 0.5


def test_selection_headroom_reanalyses_saved_pools(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import _report

    monkeypatch.setattr(_report, "RESULTS", tmp_path)
    saved = tmp_path / "saved_pools.json"
    pools = [_pool(0, [(0.9, 0.1, 0.0), (0.7, 0.2, 0.0), (0.8, 0.9, 1.0), (0.1, 0.5, 0.0)])]
    saved.write_text(json.dumps({"prompts": 1, "seeds": [0], "prompt_seed": 0, "budget": 4,
                                 "guide": "guide", "also": ["small"], "command": "made here",
                                 "pools": pools}))
    report = headroom.main(["--pools", str(saved), "--name", "again"])
    assert json.loads((tmp_path / "again.json").read_text())["pools_made_by"] == "made here"
    by_rule = {row["rule"]: row for row in report["rules"]}
    assert by_rule["argmax"]["accuracy"]["mean"] == 0.0
    assert by_rule["agreement@4"]["accuracy"]["mean"] == 1.0  # k = N: the whole pool
    assert by_rule["oracle pass@N (ceiling)"]["vs_argmax"]["mean"] == 1.0
    assert [row["m"] for row in report["best_of_m"]] == [1, 2, 4]
    assert list(report["rules_by_pool_size"]) == ["4"]  # pools of fewer than 4 are not ranked
    # the same pools ranked by the other verifier they hold: its argmax (2) is right
    again = headroom.main(["--pools", str(saved), "--guide", "small", "--also", "guide",
                           "--name", "by_small"])
    assert again["guide"] == "small" and again["rules"][1]["accuracy"]["mean"] == 1.0
    with pytest.raises(SystemExit, match="holds no scores of clip"):
        headroom.main(["--pools", str(saved), "--guide", "clip", "--name", "nope"])


def test_a_saved_command_pastes_back_with_its_json_options() -> None:
    import shlex

    from _report import command_line

    argv = ["--config", 'paths-agreement16={"name": "paths", "top": 16}', "--name", "x"]
    assert shlex.split(command_line(argv))[2:] == argv
