"""What the search strategies share: how outcomes are ranked and the best one chosen, and the
base of the round-based strategies (candidate ids and seeds, the ask/tell bookkeeping, the NFEs
planned so far, the best answer and the ``select`` option's pick).

Subclasses of :class:`RoundStrategy` implement :meth:`RoundStrategy._next_round` (the tasks
of the next round, [] when finished) and :meth:`RoundStrategy._receive` (the outcomes of the
last round, in task order). The base checks the engine's side of the contract (one outcome per
task, in order), because a mismatch would silently attach scores to the wrong candidates. The
strategy's side (never ask past the budget) is checked by the engine, for every strategy and in
the NFEs it actually charges.

A ``select`` that needs other verifiers (:mod:`~diffsearch.strategies.selection`) adds one
round after the search: 0-NFE tasks re-scoring the chosen answers, which the subclass never
sees. ``done`` holds once the pick is made.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any, Protocol, TypeVar

from diffsearch.seeding import derive_seed
from diffsearch.strategies import options, selection
from diffsearch.strategies.base import Strategy
from diffsearch.tasks import Outcome, Perturbation, ScoreOn, Task


class Scored(Protocol):
    """What ranking needs of an outcome, or of a stored candidate (``store.CandidateRecord``)."""

    @property
    def candidate(self) -> int: ...
    @property
    def reward(self) -> float | None: ...
    @property
    def error(self) -> str | None: ...


S = TypeVar("S", bound=Scored)


def ranked(items: Iterable[S]) -> list[S]:
    """Scored, successful items, best first; equal rewards by candidate id, so equal outcomes
    always give equal choices (replay, determinism)."""
    scored = [item for item in items if item.error is None and item.reward is not None]
    return sorted(scored, key=lambda item: (-item.reward, item.candidate))  # type: ignore[operator]


def best_of(items: Iterable[S | None]) -> S | None:
    """The best of ``items`` by :func:`ranked` (Nones skipped); None when none is scored.

    The one rule for "the best so far": strategies answer :meth:`Strategy.best` with it over
    their answers, the engine's progress over the answers told and those still arriving, and
    ``diffsearch show`` over a stopped run's stored final images.
    """
    first = ranked(item for item in items if item is not None)
    return first[0] if first else None


def kept(share: float, n: int) -> int:
    """How many of ``n`` survive keeping the top ``share``: rounded up, at least one (the
    rounding to 9 digits stops 0.4 * 10 = 4.000000000000001 from becoming 5)."""
    return max(1, math.ceil(round(share * n, 9)))


def count_within_budget(n: int | None, *, budget_nfe: int, cost: int, plural: str,
                        none_affordable: str) -> int:
    """How many independent units (samples, paths, clips) of ``cost`` NFE each a strategy runs:
    its option ``n`` when given, checked against the budget, else as many as the budget buys.
    ``none_affordable`` is the error when the budget buys not even one."""
    affordable = budget_nfe // cost
    if affordable < 1:
        raise ValueError(none_affordable)
    if n is not None and n > affordable:
        raise options.OptionError("n", f"{n} {plural} need {n * cost} NFE, over the budget of "
                                       f"{budget_nfe}")
    return affordable if n is None else n


class RoundStrategy(Strategy):
    """A strategy that asks in rounds of tasks it builds with :meth:`_task`."""

    selects = True

    def __init__(self, **common: Any) -> None:
        super().__init__(**common)
        if self.num_steps < 1:
            raise ValueError(f"num_steps must be at least 1, got {self.num_steps}")
        self._next_candidate = 0
        self._pending: list[Task] | None = None
        self._searched = False
        """The subclass's search is over (it may still wait for the pick's re-scoring)."""
        self._done = False
        self._best: Outcome | None = None
        self._answers: list[Outcome] = []
        """Every answer told, for a ``select`` other than argmax."""
        self._rescoring: dict[int, int] = {}
        """The pick's re-scoring tasks: task candidate -> the answer it re-scores."""
        self._chosen: Outcome | None = None
        self.planned_nfe = 0
        """NFEs of every task asked so far, in the strategy's unit (one per step): what is left
        of the budget for the next round."""
        self._rounds_told = 0
        """Rounds answered so far: in :meth:`_next_round` the index of the round to build, in
        :meth:`_receive` the index of the round being answered."""

    # ---- for subclasses ---------------------------------------------------------------------
    @abstractmethod
    def _next_round(self) -> list[Task]:
        """The tasks of the next round; [] when the search is over."""

    @abstractmethod
    def _receive(self, tasks: Sequence[Task], outcomes: Sequence[Outcome]) -> None:
        """Take the outcomes of the last round (``outcomes[i]`` answers ``tasks[i]``)."""

    def _task(self, *, start: int, end: int, score_on: ScoreOn, source: int | None = None,
              perturbation: Perturbation | None = None, eta: float = 0.0,
              verifier: str | None = None) -> Task:
        """A new candidate: the next id, its seed, and its source as its parent.

        The seed is best-of-N's (job seed, prompt, candidate, "noise"), so a round of tasks from
        noise draws exactly the noises best-of-N draws for the same candidate ids.
        """
        candidate = self._next_candidate
        self._next_candidate += 1
        return Task(prompt_index=self.prompt_index, prompt=self.prompt, candidate=candidate,
                    seed=derive_seed(self.seed, self.prompt, candidate, "noise"), start=start,
                    end=end, parent=source, source_candidate=source, perturbation=perturbation,
                    eta=eta, score_on=score_on, verifier=verifier)

    def _cost(self, task: Task) -> int:
        return task.denoise_nfe(self.num_steps)

    def _finish(self) -> None:
        """The search is over: pick the answer now, or once its re-scoring round is told."""
        self._searched = True
        if not self.select.rescores:
            self._pick({})

    def _pick(self, rescored: dict[int, dict[str, float]]) -> None:
        self._chosen = selection.pick(self.select, ranked(self._answers), rescored,
                                      seed=self.seed, prompt=self.prompt)
        self._done = True

    def _rescoring_round(self) -> list[Task]:
        """A 0-NFE task per answer the pick needs re-scored, per verifier: from the answer's
        final latent (``start == end`` = the last step), scored by that verifier."""
        tasks = []
        last = self.num_steps
        for answer in selection.to_rescore(self.select, ranked(self._answers)):
            for verifier in self.select.verifiers:
                task = self._task(start=last, end=last, score_on=ScoreOn.FINAL,
                                  source=answer.candidate, verifier=verifier)
                self._rescoring[task.candidate] = answer.candidate
                tasks.append(task)
        return tasks

    # ---- the Strategy interface ---------------------------------------------------------------
    def ask(self) -> list[Task]:
        if self._pending is not None:
            raise RuntimeError(f"{self.name}: ask() called again before the last round was told")
        if self._done:
            return []
        tasks = [] if self._searched else self._next_round()
        if not tasks:
            if not self._searched:
                self._finish()
            if not self._done:
                tasks = self._rescoring_round()
                if not tasks:  # no answer to re-score: the guide's argmax
                    self._pick({})
            if not tasks:
                return []
        self.planned_nfe += sum(self._cost(t) for t in tasks)
        self._pending = tasks
        return tasks

    def tell(self, outcomes: list[Outcome]) -> None:
        tasks = self._pending
        if tasks is None:
            raise RuntimeError(f"{self.name}: tell() without a pending ask()")
        if [o.candidate for o in outcomes] != [t.candidate for t in tasks]:
            raise ValueError(f"{self.name}: tell() needs one outcome per asked task, in order")
        self._pending = None
        if self._rescoring:
            self._pick(_rescored_scores(tasks, outcomes, self._rescoring))
            return
        answers = [outcome for task, outcome in zip(tasks, outcomes) if self.is_answer(task)]
        self._best = best_of([self._best, *answers])
        if self.select.method != "argmax":
            self._answers.extend(answers)
        self._receive(tasks, outcomes)
        self._rounds_told += 1

    @property
    def done(self) -> bool:
        return self._done

    def best(self) -> Outcome | None:
        """The guide's best answer while the search runs, the ``select`` pick once done."""
        return self._chosen if self._done and self.select.method != "argmax" else self._best


def _rescored_scores(tasks: Sequence[Task], outcomes: Sequence[Outcome],
                     answer_of: dict[int, int]) -> dict[int, dict[str, float]]:
    """By re-scored answer: each verifier's score of it (absent where re-scoring failed)."""
    scores: dict[int, dict[str, float]] = {}
    for task, outcome in zip(tasks, outcomes):
        if outcome.ok and outcome.reward is not None:
            scores.setdefault(answer_of[task.candidate], {})[task.verifier] = outcome.reward  # type: ignore[index]
    return scores
