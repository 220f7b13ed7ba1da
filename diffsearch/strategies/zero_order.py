"""Zero-order search (Ma et al. 2025): local search over starting noises around a pivot.

A pivot noise is scored on its final image. Each round asks ``neighbours`` noises at a fixed
``cosine`` with the pivot and the pivot's norm (``PerturbKind.NEIGHBOUR``: y = |n| (c u +
sqrt(1 - c^2) w), w a random unit vector orthogonal to u = n/|n|), each denoised to the end and
scored. The best neighbour becomes the pivot if it beats it (strictly); if none does, a fresh
random pivot is drawn, so the search does not sit on a local optimum.

Every noise is stored as a candidate at step 0 (its task runs 0 -> 0 and is scored by rolling
out to the end), so a pivot's neighbours can be built from its stored latent. A fresh pivot is
asked alone: its neighbours need it stored first. The last round asks as many neighbours as the
budget still pays for; every sample costs T NFEs, like best-of-N.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from diffsearch.strategies import options
from diffsearch.strategies.common import RoundStrategy, ranked
from diffsearch.tasks import Outcome, Perturbation, PerturbKind, ScoreOn, Task


class ZeroOrder(RoundStrategy):
    """Zero-order search; see the module docstring. Options: ``neighbours`` (per round, 4),
    ``cosine`` (with the pivot, in (0, 1), 0.95)."""

    name = "zero-order"
    option_checks = {
        "neighbours": options.rule(options.integer, minimum=1),
        "cosine": options.rule(options.number, low=0.0, high=1.0, low_open=True,
                               high_open=True),
    }

    def __init__(self, *, neighbours: int = 4, cosine: float = 0.95, **common: Any) -> None:
        super().__init__(**common)
        self.neighbours = neighbours
        self.cosine = cosine
        if self.budget_nfe < self.num_steps:
            raise ValueError(f"budget of {self.budget_nfe} NFE buys no sample of "
                             f"{self.num_steps} steps")
        self.pivot: Outcome | None = None
        """The current pivot's outcome (its candidate holds its noise); None: draw a fresh one."""
        self.pivots: list[int] = []
        """Every candidate that has been the pivot, in order (for inspection and tests)."""

    def _next_round(self) -> list[Task]:
        affordable = (self.budget_nfe - self.planned_nfe) // self.num_steps
        if affordable < 1:
            return []
        if self.pivot is None:
            return [self._task(start=0, end=0, score_on=ScoreOn.FINAL)]
        step = Perturbation(PerturbKind.NEIGHBOUR, self.cosine)
        return [self._task(start=0, end=0, score_on=ScoreOn.FINAL, source=self.pivot.candidate,
                           perturbation=step)
                for _ in range(min(self.neighbours, affordable))]

    def _receive(self, tasks: Sequence[Task], outcomes: Sequence[Outcome]) -> None:
        if self.pivot is None:  # a fresh pivot (None again if it failed)
            self.pivot = ranked(outcomes)[0] if ranked(outcomes) else None
        else:
            best = ranked([*outcomes, self.pivot])[0]
            self.pivot = None if best is self.pivot else best
        if self.pivot is not None and self.pivot.candidate not in self.pivots:
            self.pivots.append(self.pivot.candidate)
