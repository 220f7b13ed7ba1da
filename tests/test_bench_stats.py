"""benchmarks/_stats.py: the paired cluster-bootstrap intervals the search benchmarks report."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
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
