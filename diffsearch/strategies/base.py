"""The ask/tell contract between strategies and the engine.

A strategy never touches a model, a tensor or a cluster. ``ask()`` returns
:class:`~diffsearch.tasks.Task` records (what to denoise next and whether to score it), the
engine runs them wherever it likes and hands back :class:`~diffsearch.tasks.Outcome` records
through ``tell()``. This is the shape of black-box optimisers (nevergrad, cma); it keeps every
algorithm testable with a fake denoiser and runnable on any executor, and it makes resuming a
run a replay: a deterministic strategy asks the same tasks again, and those already in the
store are answered from it.

Candidate ids are unique per prompt. Every candidate is one stored latent: the state reached at
``Task.end``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from diffsearch.tasks import Outcome, Task


class Strategy(ABC):
    """A search algorithm for one prompt, driven by the engine through ask/tell.

    Contract: ``ask()`` returns the next tasks (all of them will be told back, in one ``tell``
    call, before ``ask()`` is called again); it returns an empty list only when ``done``.
    Everything random comes from generators seeded from the job seed and the prompt, so the same
    outcomes produce the same next tasks.
    """

    name: str

    def __init__(
        self,
        *,
        prompt_index: int,
        prompt: str,
        num_steps: int,
        budget_nfe: int,
        seed: int,
        **options: Any,
    ) -> None:
        self.prompt_index = prompt_index
        self.prompt = prompt
        self.num_steps = num_steps
        self.budget_nfe = budget_nfe
        self.seed = seed
        if options:
            raise ValueError(f"strategy {self.name!r} takes no option(s): {', '.join(options)}")

    @abstractmethod
    def ask(self) -> list[Task]:
        """The next tasks to run; [] once done."""

    @abstractmethod
    def tell(self, outcomes: list[Outcome]) -> None:
        """Take the outcomes of every task of the last ``ask``."""

    @property
    @abstractmethod
    def done(self) -> bool:
        """True when the strategy has nothing more to ask."""

    @abstractmethod
    def best(self) -> Outcome | None:
        """The best final-image outcome seen so far (None before any)."""
