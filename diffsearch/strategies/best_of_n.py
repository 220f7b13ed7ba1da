"""Best-of-N random search: N independent seeds, each denoised 0 -> T and scored on the final
image; the best is kept. The baseline every other strategy is compared with at equal NFE."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from diffsearch.strategies import options
from diffsearch.strategies.common import RoundStrategy, count_within_budget
from diffsearch.tasks import Outcome, ScoreOn, Task


class BestOfN(RoundStrategy):
    """All N candidates are asked in one round, so the executor can spread and batch them freely.

    N is the budget divided by the cost of one sample (T NFEs); ``n`` overrides it. Asking more
    than the budget allows is an error rather than a silent overspend.
    """

    name = "best-of-n"
    option_checks = {"n": options.rule(options.integer, minimum=1, allow_none=True)}

    def __init__(self, *, n: int | None = None, **common: Any) -> None:
        super().__init__(**common)
        self.n = count_within_budget(
            n, budget_nfe=self.budget_nfe, cost=self.num_steps, plural="samples",
            none_affordable=f"budget of {self.budget_nfe} NFE buys no sample of "
                            f"{self.num_steps} steps")

    def _next_round(self) -> list[Task]:
        return [self._task(start=0, end=self.num_steps, score_on=ScoreOn.FINAL)
                for _ in range(self.n)]

    def _receive(self, tasks: Sequence[Task], outcomes: Sequence[Outcome]) -> None:
        self._finish()
