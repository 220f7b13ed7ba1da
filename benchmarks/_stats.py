"""Paired bootstrap intervals for the search benchmarks: is a strategy better than best-of-N?

Every strategy is run on the same prompts and seeds as best-of-N at the same budget, so each
(prompt, seed) is a pair and the question is the mean of the per-pair differences. Pairs of one
prompt are not independent (an easy prompt is easy under every seed), so the bootstrap resamples
prompts, each with all of its seeds (a cluster bootstrap): the interval is for a new set of
prompts like these, not only new seeds. Percentile intervals, a fixed resampling seed, so a
report is reproducible from its numbers.

A difference whose interval contains 0 is not a result: the reports say so beside it.
"""

from __future__ import annotations

import itertools
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95


@dataclass(frozen=True)
class Interval:
    """A mean and its bootstrap interval over ``n`` values (``clusters`` prompts)."""

    mean: float
    low: float
    high: float
    n: int
    clusters: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_json(self, digits: int = 4) -> dict[str, float | int | bool]:
        return {"mean": round(self.mean, digits), "low": round(self.low, digits),
                "high": round(self.high, digits), "n": self.n, "prompts": self.clusters,
                "excludes_zero": self.excludes_zero}

    @classmethod
    def from_json(cls, saved: Mapping[str, Any]) -> Interval:
        """The interval :meth:`to_json` saved (rounded as saved)."""
        return cls(saved["mean"], saved["low"], saved["high"], saved["n"], saved["prompts"])

    def __str__(self) -> str:
        mark = "" if self.excludes_zero else " (n.s.)"
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]{mark}"


def mean_interval(values: Sequence[float], clusters: Sequence[Hashable], *,
                  resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL) -> Interval:
    """The mean of ``values`` with a cluster-bootstrap interval (``clusters[i]`` is the prompt
    of ``values[i]``)."""
    array = np.asarray(values, dtype=np.float64)
    if array.shape != (len(clusters),) or not len(array):
        raise ValueError(f"need one cluster per value and at least one value, got "
                         f"{len(array)} values and {len(clusters)} clusters")
    groups: dict[Hashable, list[int]] = {}
    for i, cluster in enumerate(clusters):
        groups.setdefault(cluster, []).append(i)
    sums = np.array([array[rows].sum() for rows in groups.values()])
    counts = np.array([len(rows) for rows in groups.values()], dtype=np.float64)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(sums), size=(resamples, len(sums)))
    means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Interval(float(array.mean()), float(low), float(high), len(array), len(sums))


def paired_difference(values: Sequence[float], baseline: Sequence[float],
                      clusters: Sequence[Hashable], **options: float | int) -> Interval:
    """Mean of ``values[i] - baseline[i]`` over pairs (same prompt and seed), with its
    cluster-bootstrap interval."""
    if len(values) != len(baseline):
        raise ValueError(f"pairs need as many values as baseline values, got {len(values)} "
                         f"and {len(baseline)}")
    differences = np.asarray(values, dtype=np.float64) - np.asarray(baseline, dtype=np.float64)
    return mean_interval(differences, clusters, **options)  # type: ignore[arg-type]


def summarise(records: Sequence[Mapping[str, Any]], baseline: Sequence[Mapping[str, Any]] | None,
              metrics: Sequence[str], baseline_name: str) -> dict[str, Any]:
    """Per metric: the mean of ``records`` with its interval, and (with ``baseline``) the
    paired difference from the baseline's record of the same prompt and seed as
    ``<metric>_vs_<baseline_name>``. Records are mappings with ``prompt``, ``seed`` and the
    metrics (None where a metric does not apply, e.g. diversity with one image: such pairs are
    left out of that metric)."""
    summary: dict[str, Any] = {}
    partner = {(b["prompt"], b["seed"]): b for b in baseline or records}
    for metric in metrics:
        pairs = [(r, b) for r in records
                 if (b := partner.get((r["prompt"], r["seed"]))) is not None
                 and r[metric] is not None and b[metric] is not None]
        if not pairs:
            summary[metric] = None
            continue
        clusters = [r["prompt"] for r, _ in pairs]
        summary[metric] = mean_interval([r[metric] for r, _ in pairs], clusters).to_json()
        if baseline is not None:
            summary[f"{metric}_vs_{baseline_name}"] = paired_difference(
                [r[metric] for r, _ in pairs], [b[metric] for _, b in pairs],
                clusters).to_json()
    return summary


def pixel_spread(images: Sequence[np.ndarray]) -> float | None:
    """Diversity of a top-k: mean pairwise RMS distance between images (pixels in [0, 1]);
    0 for copies, None for fewer than two images."""
    if len(images) < 2:
        return None
    return float(np.mean([np.sqrt(np.mean((a - b) ** 2))
                          for a, b in itertools.combinations(images, 2)]))
