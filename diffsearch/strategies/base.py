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
from collections.abc import Mapping
from typing import Any, ClassVar, Self

from diffsearch.pipelines.samplers import SamplerNeed
from diffsearch.strategies.options import Check, OptionError, rule
from diffsearch.strategies.selection import ARGMAX, Selection, check_select
from diffsearch.tasks import Outcome, ScoreOn, Task

COMMON_OPTION_CHECKS: Mapping[str, Check] = {"select": rule(check_select)}
"""Options every strategy takes besides its own: ``select`` (which answer is returned,
:mod:`~diffsearch.strategies.selection`)."""


class Strategy(ABC):
    """A search algorithm for one prompt, driven by the engine through ask/tell.

    Contract: ``ask()`` returns the next tasks (all of them will be told back, in one ``tell``
    call, before ``ask()`` is called again); it returns an empty list only when ``done``.
    Everything random comes from generators seeded from the job seed and the prompt, so the same
    outcomes produce the same next tasks.

    Options are the keyword arguments of a subclass's ``__init__``, each with its check in
    :attr:`option_checks`. Build strategies from user input with :meth:`from_options` (or
    :func:`diffsearch.strategies.registry.build_strategies` for a job), which checks every option
    first; the constructor takes checked values and checks only what needs the model and the
    budget.
    """

    name: str
    option_checks: ClassVar[Mapping[str, Check]] = {}
    """Each option's type and range check, by option name (see :mod:`~diffsearch.strategies
    .options`): everything about an option that can be checked without the model."""
    sampler_needs: ClassVar[frozenset[SamplerNeed]] = frozenset()
    """What its tasks ask of the job's sampler (:mod:`diffsearch.pipelines.samplers`): the
    pre-run checks refuse a sampler that cannot do it, naming both."""
    selects: ClassVar[bool] = False
    """Whether it carries out a ``select`` other than argmax (the round-based strategies do;
    the others refuse one by name rather than ignore it)."""

    def __init__(self, *, prompt_index: int, prompt: str, num_steps: int, budget_nfe: int,
                 seed: int, select: Selection = ARGMAX) -> None:
        self.prompt_index = prompt_index
        self.prompt = prompt
        self.num_steps = num_steps
        self.budget_nfe = budget_nfe
        self.seed = seed
        self.select = select

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """The options, each checked by its rule and in its Python type; raises
        :class:`~diffsearch.strategies.options.OptionError` naming the first unknown or bad
        one. Needs no model: jobs call it when they are validated."""
        checks = {**cls.option_checks, **COMMON_OPTION_CHECKS}
        for name in options:
            if name not in checks:
                known = ", ".join(checks)
                raise OptionError(name, f"unknown option; {cls.name} takes: {known}")
        checked = {name: checks[name](name, value) for name, value in options.items()}
        select = checked.get("select", ARGMAX)
        if select.method != "argmax" and not cls.selects:
            raise OptionError("select.method", f"{cls.name} returns the guide's best answer "
                                               f"only (argmax), got {select.method!r}")
        return checked

    @classmethod
    def from_options(cls, options: Mapping[str, Any], *, prompt_index: int, prompt: str,
                     num_steps: int, budget_nfe: int, seed: int) -> Self:
        """A strategy for one prompt from unchecked (user) options: checked, then built."""
        return cls(prompt_index=prompt_index, prompt=prompt, num_steps=num_steps,
                   budget_nfe=budget_nfe, seed=seed, **cls.check_options(options))

    def named_verifiers(self) -> dict[str, str]:
        """The verifiers this strategy's tasks name beyond the job's guiding verifier, by the
        option that names them (``verifiers.6``, ``image_verifier``). Whoever checks a job's
        verifiers (the pre-run checks, a service's allow-list) checks these too: an option must
        not reach a verifier the job's own fields could not. Subclasses that name their own
        add them to this (the ``select`` option's)."""
        return self.select.named_verifiers()

    def is_answer(self, task: Task) -> bool:
        """Whether ``task``'s outcome competes for :meth:`best`: a finished result scored by
        the job's guiding verifier. Scores of x0 estimates and of per-task verifiers are on
        other scales and never do; strategies whose answers are not final images (clips)
        override this."""
        return task.score_on is ScoreOn.FINAL and task.verifier is None

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
        """The answer so far: :func:`~diffsearch.strategies.common.best_of` the outcomes of
        every task told for which :meth:`is_answer` holds (None before any); once ``done``,
        the answer the ``select`` option picks among them (the same one by default)."""
