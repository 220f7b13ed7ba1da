"""The testbed's yardsticks: exact expected maxima, MMD to a Gaussian mixture in closed form
(with its bootstrap interval over independent runs) and importance-weight ESS.

The MMD interval resamples runs (prompts), not points: points of one run (a particle
population, a best-of-N batch) are dependent, runs are independent. Means of per-run values
(best rewards) take the benchmarks' cluster bootstrap (benchmarks/_stats.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import integrate, stats

from diffsearch.pipelines.gmm import GaussianMixture

BOOTSTRAP_RESAMPLES = 10_000


def expected_max(weights: np.ndarray, means: np.ndarray, stds: np.ndarray, n: int) -> float:
    """E[max of n iid draws] of the 1-D mixture sum_j w_j N(m_j, s_j^2), by quadrature:
    E[M] = int_0^inf (1 - F^n) - int_-inf^0 F^n, F the mixture's CDF."""

    def cdf(x: float) -> float:
        return float(np.dot(weights, stats.norm.cdf(x, means, stds)))

    lo = float(np.min(means - 12 * stds))
    hi = float(np.max(means + 12 * stds))
    upper = integrate.quad(lambda x: 1 - cdf(x) ** n, 0.0, max(hi, 0.0), limit=400,
                           epsabs=1e-10)[0]
    lower = integrate.quad(lambda x: cdf(x) ** n, min(lo, 0.0), 0.0, limit=400,
                           epsabs=1e-10)[0]
    return upper - lower


def normalised_weights(log_weights: np.ndarray) -> np.ndarray:
    """exp(log_weights) scaled to sum to 1."""
    w = np.exp(log_weights - log_weights.max())
    return w / w.sum()


def effective_sample_size(weights: np.ndarray) -> float:
    """(sum w)^2 / sum w^2 of positive weights."""
    return float(weights.sum() ** 2 / (weights**2).sum())


def _kernel_mixture(x: np.ndarray, mixture: GaussianMixture, h: float) -> np.ndarray:
    """E_{y ~ mixture} k(x_i, y) for the rows of x, k(x, y) = exp(-|x - y|^2 / 2h^2)."""
    d = mixture.dim
    out = np.zeros(len(x))
    for w, m, s in zip(mixture.weights, mixture.means, mixture.covariances):
        c = h * h * np.eye(d) + s
        diff = x - m
        quad = np.einsum("ni,ni->n", diff, np.linalg.solve(c, diff.T).T)
        out += w * h**d / math.sqrt(np.linalg.det(c)) * np.exp(-0.5 * quad)
    return out


def mixture_kernel_mean(p: GaussianMixture, q: GaussianMixture, h: float) -> float:
    """E_{x ~ p, y ~ q} k(x, y) in closed form."""
    d = p.dim
    total = 0.0
    for wi, mi, si in zip(p.weights, p.means, p.covariances):
        for wj, mj, sj in zip(q.weights, q.means, q.covariances):
            c = h * h * np.eye(d) + si + sj
            diff = mi - mj
            total += (wi * wj * h**d / math.sqrt(np.linalg.det(c))
                      * math.exp(-0.5 * diff @ np.linalg.solve(c, diff)))
    return total


def mixture_mmd(p: GaussianMixture, q: GaussianMixture, h: float) -> float:
    """MMD between two mixtures (the square root of MMD^2), exact."""
    sq = (mixture_kernel_mean(p, p, h) - 2 * mixture_kernel_mean(p, q, h)
          + mixture_kernel_mean(q, q, h))
    return math.sqrt(max(sq, 0.0))


class MmdToMixture:
    """MMD^2 between the law of a point drawn from one run's weighted points and a mixture,
    estimated from independent runs, with a bootstrap over runs.

    Each run's weights sum to 1. The sample-sample term pairs points of *different* runs only
    (a U-statistic over runs), which is unbiased for dependent points within a run (a particle
    population) and stays so under the bootstrap, where copies of one run are never paired: its
    expectation is exactly MMD^2(pooled law, mixture), 0 for runs that sample the mixture. The
    square root is not taken: the estimate can be negative by chance, and the interval must
    show that.
    """

    def __init__(self, points: Sequence[np.ndarray], weights: Sequence[np.ndarray],
                 mixture: GaussianMixture, bandwidth: float) -> None:
        self.runs = len(points)
        if self.runs < 2:
            raise ValueError("MMD between runs needs at least 2 runs")
        h = bandwidth
        self._cross = np.array([float(w @ _kernel_mixture(x, mixture, h))
                                for x, w in zip(points, weights)])
        blocks = np.zeros((self.runs, self.runs))
        for i, (xi, wi) in enumerate(zip(points, weights)):
            for j in range(i + 1, self.runs):
                sq = ((xi[:, None, :] - points[j][None, :, :]) ** 2).sum(-1)
                blocks[i, j] = blocks[j, i] = wi @ np.exp(-sq / (2 * h * h)) @ weights[j]
        self._blocks = blocks
        """Run-pair kernel means; the diagonal (a run with itself) is 0 and never used."""
        self._target = mixture_kernel_mean(mixture, mixture, h)

    def value(self, counts: np.ndarray | None = None) -> float:
        """MMD^2 of the runs taken ``counts`` times each (None: each once)."""
        c = np.ones(self.runs) if counts is None else counts
        total = c.sum()
        pairs = float(c @ self._blocks @ c) / (total**2 - float(c @ c))
        return pairs - 2 * float(c @ self._cross) / total + self._target

    def interval(self, rng: np.random.Generator, level: float = 0.95) -> tuple[float, float]:
        draws = rng.multinomial(self.runs, np.full(self.runs, 1 / self.runs),
                                size=BOOTSTRAP_RESAMPLES)
        return _percentiles([self.value(c) for c in draws], level)


def _percentiles(draws: Sequence[float], level: float) -> tuple[float, float]:
    tail = 50 * (1 - level)
    low, high = np.percentile(draws, [tail, 100 - tail])
    return float(low), float(high)
