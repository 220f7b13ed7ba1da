"""Best-of-N random search: N independent seeds, each denoised 0 -> T and scored on the final
image; the best is kept. The baseline every other strategy is compared with at equal NFE."""

from __future__ import annotations

from typing import Any

from diffsearch.seeding import derive_seed
from diffsearch.strategies import options
from diffsearch.strategies.base import Strategy
from diffsearch.tasks import Outcome, ScoreOn, Task


class BestOfN(Strategy):
    """All N candidates are asked at once, so the executor can spread and batch them freely.

    N is the budget divided by the cost of one sample (T NFEs); ``n`` overrides it. Asking more
    than the budget allows is an error rather than a silent overspend.
    """

    name = "best-of-n"
    option_checks = {"n": options.rule(options.integer, minimum=1, allow_none=True)}

    def __init__(self, *, n: int | None = None, **common: Any) -> None:
        super().__init__(**common)
        affordable = self.budget_nfe // self.num_steps
        if affordable < 1:
            raise ValueError(f"budget of {self.budget_nfe} NFE buys no sample of "
                             f"{self.num_steps} steps")
        if n is not None and n > affordable:
            raise options.OptionError("n", f"{n} samples need {n * self.num_steps} NFE, over "
                                           f"the budget of {self.budget_nfe}")
        self.n = affordable if n is None else n
        self._asked = False
        self._outcomes: list[Outcome] = []

    def ask(self) -> list[Task]:
        if self._asked:
            return []
        self._asked = True
        return [
            Task(
                prompt_index=self.prompt_index,
                prompt=self.prompt,
                candidate=candidate,
                seed=derive_seed(self.seed, self.prompt, candidate, "noise"),
                start=0,
                end=self.num_steps,
                score_on=ScoreOn.FINAL,
            )
            for candidate in range(self.n)
        ]

    def tell(self, outcomes: list[Outcome]) -> None:
        self._outcomes.extend(outcomes)

    @property
    def done(self) -> bool:
        return self._asked

    def best(self) -> Outcome | None:
        scored = [o for o in self._outcomes if o.reward is not None and o.ok]
        return max(scored, key=Outcome.rank_key, default=None)
