"""Search over paths (Ma et al. 2025): beam search along the denoising trajectory.

``n`` samples are denoised from noise to ``start_step`` (unscored). Then, while a round can
still end before the last step, each kept path is re-noised ``branches`` ways back by
``renoise_steps`` (the forward process, ``PerturbKind.RENOISE``, fresh noise per branch) and
denoised ``denoise_steps`` forward; the x0 estimates are scored and the best ``n`` of the
n * branches become the kept paths. Each round moves ``denoise_steps - renoise_steps`` steps
towards clean. Finally the kept paths are denoised to the end and scored on their final images.

The plan does not depend on scores, so its cost is known up front: per path ``start_step +
rounds * branches * denoise_steps + (T - last level)``; ``n`` is the most the budget pays for.
Defaults (for T=20): start at step 10, re-noise 2 steps back, denoise 4 forward, 2 branches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from diffsearch.strategies import options
from diffsearch.strategies.common import RoundStrategy, count_within_budget, ranked
from diffsearch.tasks import Outcome, Perturbation, PerturbKind, ScoreOn, Task


def levels(start_step: int, renoise_steps: int, denoise_steps: int, num_steps: int) -> list[int]:
    """The steps the kept paths are at after round 0, 1, ...: each round re-noises back
    ``renoise_steps`` and denoises ``denoise_steps``; rounds stop before reaching the end."""
    steps = [start_step]
    while steps[-1] - renoise_steps + denoise_steps < num_steps:
        steps.append(steps[-1] - renoise_steps + denoise_steps)
    return steps


class Paths(RoundStrategy):
    """Search over paths; see the module docstring. Options: ``n`` (paths kept; the most the
    budget pays for), ``branches`` (2), ``start_step`` (T/2), ``renoise_steps`` (T/10, at least
    1), ``denoise_steps`` (twice ``renoise_steps``)."""

    name = "paths"
    sampler_needs = frozenset({"resume"})
    option_checks = {
        "n": options.rule(options.integer, minimum=1, allow_none=True),
        "branches": options.rule(options.integer, minimum=1),
        "start_step": options.rule(options.integer, minimum=1, allow_none=True),
        "renoise_steps": options.rule(options.integer, minimum=1, allow_none=True),
        "denoise_steps": options.rule(options.integer, minimum=1, allow_none=True),
    }

    def __init__(
        self, *, n: int | None = None, branches: int = 2, start_step: int | None = None,
        renoise_steps: int | None = None, denoise_steps: int | None = None, **common: Any,
    ) -> None:
        super().__init__(**common)
        t = self.num_steps
        if t < 2:
            raise ValueError(f"search over paths needs at least 2 steps, the model has {t}")
        self.branches = branches
        self.renoise_steps = max(1, int(t * 0.1 + 0.5)) if renoise_steps is None else renoise_steps
        self.denoise_steps = 2 * self.renoise_steps if denoise_steps is None else denoise_steps
        if self.denoise_steps <= self.renoise_steps:
            raise options.OptionError(
                "denoise_steps", f"{self.denoise_steps} must exceed renoise_steps "
                                 f"({self.renoise_steps}), or the paths never get cleaner")
        if self.renoise_steps >= t:
            raise options.OptionError("renoise_steps", f"{self.renoise_steps} leaves no start "
                                                       f"step below the model's {t} steps")
        self.start_step = (max(int(t * 0.5 + 0.5), self.renoise_steps) if start_step is None
                           else options.integer("start_step", start_step,
                                                minimum=self.renoise_steps, maximum=t - 1))
        self.levels = levels(self.start_step, self.renoise_steps, self.denoise_steps, t)
        per_path = (self.start_step + (len(self.levels) - 1) * self.branches * self.denoise_steps
                    + t - self.levels[-1])
        self.n = count_within_budget(
            n, budget_nfe=self.budget_nfe, cost=per_path, plural="paths",
            none_affordable=f"budget of {self.budget_nfe} NFE cannot pay for one path "
                            f"({per_path} NFE)")
        self._kept: list[int] = []
        """Candidates holding the kept paths, at ``levels[round - 1]``."""

    def _next_round(self) -> list[Task]:
        i = self._rounds_told
        if i == 0:
            return [self._task(start=0, end=self.start_step, score_on=ScoreOn.NONE)
                    for _ in range(self.n)]
        level = self.levels[i - 1]
        if i == len(self.levels):
            return [self._task(start=level, end=self.num_steps, score_on=ScoreOn.FINAL,
                               source=path) for path in self._kept]
        back = level - self.renoise_steps
        renoise = Perturbation(PerturbKind.RENOISE, to_step=back)
        return [self._task(start=back, end=self.levels[i], score_on=ScoreOn.X0, source=path,
                           perturbation=renoise)
                for path in self._kept for _ in range(self.branches)]

    def _receive(self, tasks: Sequence[Task], outcomes: Sequence[Outcome]) -> None:
        i = self._rounds_told
        if i == len(self.levels):
            self._finish()
            return
        if i == 0:
            self._kept = [o.candidate for o in outcomes if o.ok]
        else:
            self._kept = [o.candidate for o in ranked(outcomes)[: self.n]]
        if not self._kept:  # every path failed
            self._finish()
