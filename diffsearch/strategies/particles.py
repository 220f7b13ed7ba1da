"""Feynman-Kac steering (Singhal et al. 2025): particles resampled by their intermediate rewards.

``particles`` candidates are denoised together with stochastic steps (``eta``, DDIM eta = 1 by
default: with deterministic steps resampled copies would stay identical). Every
``resample_every`` steps their x0 estimates are scored and each particle's log-weight grows by
its potential, lam * (r_k - r_prev) ("diff") or lam * max(r_k, its best so far) ("max"). Then
the particles are resampled multinomially by weight, with replacement (weights back to equal),
either always or, with ``ess_threshold``, only when the effective sample size
(sum w)^2 / sum w^2 falls below ``ess_threshold * particles`` (the reference's k/2 is 0.5).
A failed particle gets weight zero and forces a resampling, so it is never continued. After the
last segment every particle is scored on its final image; the best is the answer.

A resampled copy is a new candidate that continues its ancestor's stored state with its own
seed, hence its own step noise. The resampling draws come from a numpy generator seeded by
(job seed, prompt, -1, "particles/resample/<step>"). Every particle runs every step once, so
the cost is ``particles * T`` NFEs, like best-of-N with as many samples.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from diffsearch.seeding import derive_seed, numpy_rng
from diffsearch.strategies import options
from diffsearch.strategies.common import RoundStrategy
from diffsearch.tasks import Outcome, ScoreOn, Task


def effective_sample_size(log_weights: np.ndarray) -> float:
    """(sum w)^2 / sum w^2, i.e. 1 / sum(w_normalised^2); 0 when every weight is zero."""
    if not np.isfinite(log_weights).any():
        return 0.0
    w = np.exp(log_weights - log_weights[np.isfinite(log_weights)].max())
    return float(w.sum() ** 2 / (w * w).sum())


class Particles(RoundStrategy):
    """FK steering; see the module docstring. Options: ``particles`` (the most the budget pays
    for), ``resample_every`` (steps, T/4), ``potential`` ("max" | "diff", "max"), ``lam``
    (10.0), ``ess_threshold`` (None: resample at every scheduled step), ``eta`` (1.0)."""

    name = "particles"
    sampler_needs = frozenset({"resume", "stochastic"})
    option_checks = {
        "particles": options.rule(options.integer, minimum=1, allow_none=True),
        "resample_every": options.rule(options.integer, minimum=1, allow_none=True),
        "potential": options.rule(options.choice, choices=("max", "diff")),
        "lam": options.rule(options.number, low=0.0),
        "ess_threshold": options.rule(options.number, low=0.0, high=1.0, low_open=True,
                                      allow_none=True),
        "eta": options.rule(options.number, low=0.0, low_open=True),
    }

    def __init__(
        self, *, particles: int | None = None, resample_every: int | None = None,
        potential: str = "max", lam: float = 10.0, ess_threshold: float | None = None,
        eta: float = 1.0, **common: Any,
    ) -> None:
        super().__init__(**common)
        t = self.num_steps
        affordable = self.budget_nfe // t
        if affordable < 1:
            raise ValueError(f"budget of {self.budget_nfe} NFE buys no particle of {t} steps")
        if particles is not None and particles > affordable:
            raise options.OptionError("particles", f"{particles} need {particles * t} NFE, "
                                                   f"over the budget of {self.budget_nfe}")
        self.particles = affordable if particles is None else particles
        self.resample_every = max(1, t // 4) if resample_every is None else resample_every
        self.potential = potential
        self.lam = lam
        self.ess_threshold = ess_threshold
        self.eta = eta
        self.segments = [*range(0, t, self.resample_every), t]
        """Step boundaries: particles are scored and maybe resampled at the inner ones."""
        self.resampled_at: list[int] = []
        """Steps at which a resampling happened (for inspection and tests)."""
        self._holders: list[int] = []
        """Per particle slot: the candidate holding its state at the current step."""
        self.log_weights = np.zeros(self.particles)
        """Per slot: the log-weight accumulated since the last resampling (-inf: failed)."""
        self._previous = np.zeros(self.particles)
        """Per slot: the reward the "diff" potential subtracts (0 before the first score)."""
        self._best_so_far = np.full(self.particles, -math.inf)
        """Per slot: the best reward along its ancestry (the "max" potential)."""

    def _next_round(self) -> list[Task]:
        i = self._rounds_told
        start, end = self.segments[i], self.segments[i + 1]
        score_on = ScoreOn.FINAL if end == self.num_steps else ScoreOn.X0
        if i == 0:
            return [self._task(start=0, end=end, score_on=score_on, eta=self.eta)
                    for _ in range(self.particles)]
        return [self._task(start=start, end=end, score_on=score_on, eta=self.eta, source=holder)
                for holder in self._holders]

    def _receive(self, tasks: Sequence[Task], outcomes: Sequence[Outcome]) -> None:
        step = tasks[0].end
        if step == self.num_steps:
            self._finish()
            return
        rewards = np.array([o.reward if o.ok and o.reward is not None else math.nan
                            for o in outcomes])
        failed = np.isnan(rewards)
        if failed.all():
            self._finish()
            return
        scores = np.where(failed, 0.0, rewards)  # failed rows get weight zero below anyway
        if self.potential == "diff":
            increments = self.lam * (scores - self._previous)
        else:
            increments = self.lam * np.maximum(scores, self._best_so_far)
        self.log_weights = np.where(failed, -math.inf, self.log_weights + increments)
        self._previous = scores
        self._best_so_far = np.maximum(self._best_so_far, scores)
        self._holders = [o.candidate for o in outcomes]
        if (self.ess_threshold is None or failed.any() or effective_sample_size(
                self.log_weights) < self.ess_threshold * self.particles):
            self._resample(step)

    def _resample(self, step: int) -> None:
        finite = np.isfinite(self.log_weights)
        w = np.where(finite, np.exp(self.log_weights - self.log_weights[finite].max()), 0.0)
        rng = numpy_rng(derive_seed(self.seed, self.prompt, -1, f"particles/resample/{step}"))
        ancestors = np.sort(rng.choice(self.particles, size=self.particles, p=w / w.sum()))
        self._holders = [self._holders[a] for a in ancestors]
        self._previous = self._previous[ancestors]
        self._best_so_far = self._best_so_far[ancestors]
        self.log_weights = np.zeros(self.particles)
        self.resampled_at.append(step)
