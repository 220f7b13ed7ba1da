"""EvoSearch (He et al. 2025): evolve the starting noise, then the intermediate states, keeping
the best elites and breeding the rest by tournament selection and mutation.

Generations live at the steps of ``schedule`` (non-decreasing, starting at 0). Generation 0 is
random noise, like best-of-N. A later generation at step k is bred from the previous
generation's states at k: the ``elites`` best are kept as they are, every other member is a
child of a tournament winner, mutated by ``x' = sqrt(1 - beta^2) x + beta eps`` at k = 0 (stays
N(0, I)) or ``x' = x + step_noise_scale * sigma_k eps`` at k > 0 (the sampler's own stochastic
step size). A member's fitness is the score of its final image: it is denoised from its step to
the end (``ScoreOn.FINAL``), and the state it passes at the next generation's step is stored,
which is where the next generation breeds. The answer is the best final image seen anywhere.

The default schedule mirrors the reference (0, 20, 30, 40 of 50 steps: evolution at 40%, 60%
and 80% of the steps), with a random generation 0 *and* a noise-evolution generation at step 0:
for T=20 it is [0, 0, 8, 12, 16]. That is how the reference's populations 42, 26, 26, 26, 30
add up to its 5,000 NFE at 50 steps (42*50 + 26*50 + 26*30 + 26*20 + 30*10). Populations are
fitted to the budget, generation 0 twice the others. What is left over goes by default
(``leftover: early``) to the earliest generations it pays children for: a child bred at step 0
costs a whole sample but its noise mutation still changes the image, while a child of the last
generation (step 16 of 20) is cheap but its step noise is so small that it is nearly a copy of
its parent. ``leftover: last`` gives it all to the last generation, as the reference does (and
as diffsearch did before ``leftover`` existed). Schedule [0] is best-of-N, task for task.

Elites are not rolled out again: with deterministic steps (eta = 0) and no mutation their final
image would be the same. A kept elite only has to be carried to the next generation's step
(an unscored task of a few steps), which is cheaper than the reference's re-evaluation.
The elites are the archive across generations: the best members of every generation so far,
each carried to the step where the next generation breeds (a parent must have a stored state
there). Selection is over them and the last generation's children; the reference selects from
every trajectory so far, which for a near-greedy tournament is the same pool's top. A larger
archive is ``elites``; a near-greedy selection is a larger ``tournament``.

Diversity: a family is every descendant of one generation-0 noise. Mutations at later steps are
small, so a family's members are near copies, and without a limit the best family soon fills
the whole pool (its top-k images collapse to one). ``crowding: c`` keeps at most the ``c`` best
members of each family in the pool that elites and tournaments are drawn from, so the archive
holds ``elites`` distinct families when c = 1 and children are bred from several lineages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from diffsearch.seeding import derive_seed, numpy_rng
from diffsearch.strategies import options
from diffsearch.strategies.common import RoundStrategy, ranked
from diffsearch.tasks import Outcome, Perturbation, PerturbKind, ScoreOn, Task

_REFERENCE_EVOLUTION = (0.4, 0.6, 0.8)
"""The reference's evolution steps as shares of T (20, 30, 40 of 50)."""


def default_schedule(num_steps: int) -> list[int]:
    """[0 (random), 0 (noise evolution), then 40%, 60%, 80% of T], dropping steps that round
    to 0, to T or onto an earlier one (short schedules)."""
    schedule = [0, 0]
    for share in _REFERENCE_EVOLUTION:
        step = int(num_steps * share + 0.5)
        if schedule[-1] < step < num_steps:
            schedule.append(step)
    return schedule


def plan_cost(schedule: Sequence[int], population: Sequence[int], elites: int,
              num_steps: int) -> int:
    """NFEs of a plan: each member rolled out from its generation's step to the end, except
    elites, which are only carried to the next generation's step (nothing in the last)."""
    cost = population[0] * num_steps
    for g in range(1, len(schedule)):
        step = schedule[g]
        cost += (population[g] - elites) * (num_steps - step)
        if g + 1 < len(schedule):
            cost += elites * (schedule[g + 1] - step)
    return cost


LEFTOVER = ("early", "last")
"""Where the budget left after fitting [2p, p, ..., p] goes (see the module docstring)."""


def fit_populations(schedule: Sequence[int], elites: int, num_steps: int,
                    budget: int, leftover: str = "early") -> list[int]:
    """The largest populations [2p, p, ..., p] (p > elites) that fit, the rest of the budget
    added as children to the earliest generations it pays for (``early``) or to the last
    (``last``); raises when even p = elites + 1 does not fit."""
    if len(schedule) == 1:
        if budget < num_steps:
            raise ValueError(f"budget of {budget} NFE buys no sample of {num_steps} steps")
        return [budget // num_steps]

    def sizes(p: int) -> list[int]:
        return [2 * p] + [p] * (len(schedule) - 1)

    p = elites + 1
    if plan_cost(schedule, sizes(p), elites, num_steps) > budget:
        raise ValueError(f"budget of {budget} NFE cannot pay for schedule {list(schedule)} with "
                         f"{elites} elites and one child per generation "
                         f"({plan_cost(schedule, sizes(p), elites, num_steps)} NFE)")
    while plan_cost(schedule, sizes(p + 1), elites, num_steps) <= budget:
        p += 1
    population = sizes(p)
    left = budget - plan_cost(schedule, population, elites, num_steps)
    order = range(1, len(schedule)) if leftover == "early" else [len(schedule) - 1]
    for g in order:  # a child of generation g costs its rollout from schedule[g]
        added = left // (num_steps - schedule[g])
        population[g] += added
        left -= added * (num_steps - schedule[g])
    return population


def _check_schedule(name: str, value: object) -> list[int]:
    """Generation steps: non-decreasing from step 0 (the random generation); that they lie
    below the model's step count is checked once the model is known."""
    schedule = options.integer_list(name, value, minimum=0, order="non-decreasing")
    if schedule[0] != 0:
        raise options.OptionError(name, f"must start at step 0 (random noise), got {schedule}")
    return schedule


@dataclass(frozen=True)
class _Member:
    """A member of a generation: the candidate holding its state at the next generation's step,
    and the outcome that scored its final image (an elite keeps its original one)."""

    candidate: int
    fitness: Outcome


@dataclass(frozen=True)
class _Next:
    """A member of the generation being asked: a new task (child, or generation 0), an elite
    carried by a task, or an elite whose stored state (``holder``) needs no carrying."""

    task: Task | None = None
    inherited: Outcome | None = None
    holder: int = -1


class EvoSearch(RoundStrategy):
    """EvoSearch; see the module docstring. Options: ``schedule`` (generation steps),
    ``population`` (one size per generation, elites included), ``elites`` (the archive, 2),
    ``tournament`` (size, 2), ``beta`` (noise mutation, 0.25), ``step_noise_scale`` (times
    sigma_k, 1.0), ``crowding`` (most members per family in the pool; unset: no limit),
    ``leftover`` (``early`` or ``last``: where the budget the populations leave goes)."""

    name = "evosearch"
    sampler_needs = frozenset({"resume", "deterministic"})
    option_checks = {
        "schedule": options.rule(_check_schedule, allow_none=True),
        "population": options.rule(options.integer_list, minimum=1, allow_none=True),
        "elites": options.rule(options.integer, minimum=0),
        "tournament": options.rule(options.integer, minimum=1),
        "beta": options.rule(options.number, low=0.0, high=1.0, low_open=True),
        "step_noise_scale": options.rule(options.number, low=0.0, low_open=True),
        "crowding": options.rule(options.integer, minimum=1, allow_none=True),
        "leftover": options.rule(options.choice, choices=LEFTOVER),
    }

    def __init__(
        self, *, schedule: Sequence[int] | None = None, population: Sequence[int] | None = None,
        elites: int = 2, tournament: int = 2, beta: float = 0.25, step_noise_scale: float = 1.0,
        crowding: int | None = None, leftover: str = "early", **common: Any,
    ) -> None:
        super().__init__(**common)
        t = self.num_steps
        self.elites = elites
        self.tournament = tournament
        self.beta = beta
        self.step_noise_scale = step_noise_scale
        self.crowding = crowding
        self.leftover = leftover
        self._family: dict[int, int] = {}
        """Candidate -> the generation-0 candidate it descends from (its family)."""
        if schedule is None:
            self.schedule = default_schedule(t)
        else:
            if schedule[-1] >= t:
                raise options.OptionError("schedule", f"steps must be below the model's {t} "
                                                      f"steps, got {list(schedule)}")
            self.schedule = list(schedule)
        if population is not None:
            self.population = self._check_population(population)
        elif schedule is None:
            self._fit_default()
        else:
            self.population = fit_populations(self.schedule, self.elites, t, self.budget_nfe,
                                              self.leftover)
        self._generation = 0
        self._members: list[_Member] = []
        self._round: list[_Next] = []

    def _fit_default(self) -> None:
        """Fit the default schedule, shortened from the end until the budget pays for it (at
        worst to [0]: best-of-N), so every budget that buys one sample gets a search."""
        full = self.schedule
        for length in range(len(full), 1, -1):
            try:
                self.population = fit_populations(full[:length], self.elites, self.num_steps,
                                                  self.budget_nfe, self.leftover)
                self.schedule = full[:length]
                return
            except ValueError:
                continue
        self.schedule = full[:1]
        self.population = fit_populations(self.schedule, self.elites, self.num_steps,
                                          self.budget_nfe)

    def _check_population(self, sizes: Sequence[int]) -> list[int]:
        """A given population against the schedule, the elites and the budget."""
        if len(sizes) != len(self.schedule):
            raise options.OptionError(
                "population", f"needs {len(self.schedule)} sizes, one per generation of "
                              f"schedule {self.schedule}, got {len(sizes)}")
        for g, size in enumerate(sizes[1:], start=1):
            if size <= self.elites:
                raise options.OptionError(f"population.{g}", f"{size} leaves no child beside "
                                                             f"{self.elites} elites")
        cost = plan_cost(self.schedule, sizes, self.elites, self.num_steps)
        if cost > self.budget_nfe:
            raise options.OptionError("population", f"{list(sizes)} needs {cost} NFE, over "
                                                    f"the budget of {self.budget_nfe}")
        return list(sizes)

    # ---- rounds ---------------------------------------------------------------------------
    def _end(self, generation: int) -> int:
        """Where a generation's tasks stop: the next generation's step (T for the last)."""
        if generation + 1 < len(self.schedule):
            return self.schedule[generation + 1]
        return self.num_steps

    def _next_round(self) -> list[Task]:
        g = self._generation
        end = self._end(g)
        if g == 0:
            tasks = [self._task(start=0, end=end, score_on=ScoreOn.FINAL)
                     for _ in range(self.population[0])]
            self._family.update((task.candidate, task.candidate) for task in tasks)
            self._round = [_Next(task=task) for task in tasks]
            return tasks
        pool = self._crowded(ranked(m.fitness for m in self._members))
        if not pool:  # every member failed: nothing left to breed from
            return []
        holder = {m.fitness.candidate: m.candidate for m in self._members}
        step = self.schedule[g]
        tasks: list[Task] = []
        self._round = []
        for elite in pool[: self.elites]:
            if end > step and g + 1 < len(self.schedule):
                carry = self._task(start=step, end=end, score_on=ScoreOn.NONE,
                                   source=holder[elite.candidate])
                self._family[carry.candidate] = self._family[elite.candidate]
                tasks.append(carry)
                self._round.append(_Next(task=carry, inherited=elite))
            else:  # its stored state already is where it would be carried (or it is the end)
                self._round.append(_Next(inherited=elite, holder=holder[elite.candidate]))
        mutation = (Perturbation(PerturbKind.NOISE_MUTATION, self.beta) if step == 0
                    else Perturbation(PerturbKind.STEP_NOISE, self.step_noise_scale))
        rng = numpy_rng(derive_seed(self.seed, self.prompt, -1, f"evosearch/tournament/{g}"))
        entrants_per_tournament = min(self.tournament, len(pool))
        for _ in range(self.population[g] - self.elites):
            entrants = rng.choice(len(pool), size=entrants_per_tournament, replace=False)
            winner = pool[int(entrants.min())]  # the pool is ranked: the lowest index wins
            child = self._task(start=step, end=end, score_on=ScoreOn.FINAL,
                               source=holder[winner.candidate], perturbation=mutation)
            self._family[child.candidate] = self._family[winner.candidate]
            tasks.append(child)
            self._round.append(_Next(task=child))
        return tasks

    def _crowded(self, pool: list[Outcome]) -> list[Outcome]:
        """The ranked pool with at most ``crowding`` members of each family (their best)."""
        if self.crowding is None:
            return pool
        seen: dict[int, int] = {}
        kept_members = []
        for member in pool:
            family = self._family[member.candidate]
            seen[family] = seen.get(family, 0) + 1
            if seen[family] <= self.crowding:
                kept_members.append(member)
        return kept_members

    def _receive(self, tasks: Sequence[Task], outcomes: Sequence[Outcome]) -> None:
        told = {o.candidate: o for o in outcomes}
        members = []
        for member in self._round:
            if member.task is None:
                members.append(_Member(member.holder, member.inherited))  # type: ignore[arg-type]
            elif member.inherited is None:  # a new member, scored on its own final image
                members.append(_Member(member.task.candidate, told[member.task.candidate]))
            elif told[member.task.candidate].ok:  # a carried elite: moved on, fitness kept
                members.append(_Member(member.task.candidate, member.inherited))
        self._members = members
        self._generation += 1
        if self._generation == len(self.schedule):
            self._finish()
