"""EvoSearch: schedule and population fitting, breeding mechanics on scripted outcomes, elites,
determinism, option checks, and a full play on the fake denoiser."""

from __future__ import annotations

import pytest
import torch
from strategy_harness import MemoryWorker, common, play, scripted

from diffsearch.strategies.best_of_n import BestOfN
from diffsearch.strategies.evosearch import EvoSearch, default_schedule, fit_populations, plan_cost
from diffsearch.strategies.options import OptionError
from diffsearch.tasks import Perturbation, PerturbKind, ScoreOn
from fake_denoiser import FakeDenoiser


def by_candidate(rewards: dict[int, float], default: float = 0.0):
    return scripted(lambda task: rewards.get(task.candidate, default))


def test_default_schedule_follows_the_reference() -> None:
    assert default_schedule(50) == [0, 0, 20, 30, 40]
    assert default_schedule(20) == [0, 0, 8, 12, 16]
    assert default_schedule(4) == [0, 0, 2, 3]
    assert default_schedule(1) == [0, 0]


def test_plan_cost_reproduces_the_reference_budget() -> None:
    # 42*50 + 26*50 + 26*30 + 26*20 + 30*10 = 5,000 NFE = best-of-100 at 50 steps (elites
    # re-evaluated in the reference, i.e. no cheaper carrying: elites=0 here)
    assert plan_cost([0, 0, 20, 30, 40], [42, 26, 26, 26, 30], 0, 50) == 5000
    # an elite is only carried to the next generation's step: 2 * (8-0), 2 * (12-8), ...
    assert plan_cost([0, 0, 8], [4, 3, 3], 1, 20) == 4 * 20 + (2 * 20 + 1 * 8) + 2 * 12


@pytest.mark.parametrize("multiple", [4, 8, 16, 32, 100])
@pytest.mark.parametrize("leftover", ["early", "last"])
def test_populations_fill_the_budget(multiple: int, leftover: str) -> None:
    s = EvoSearch(leftover=leftover, **common(budget=20 * multiple))
    cost = plan_cost(s.schedule, s.population, s.elites, 20)
    assert cost <= s.budget_nfe
    # what is left cannot pay for one more child of the last generation
    assert s.budget_nfe - cost < 20 - s.schedule[-1]
    if len(s.schedule) > 1:  # [2p, p, ..., p] plus what is left
        p = s.population[0] // 2
        assert s.population[0] == 2 * p and p > s.elites
        if leftover == "last":
            assert s.population[1:-1] == [p] * (len(s.schedule) - 2)
        assert all(size >= p for size in s.population[1:])


def test_the_leftover_goes_to_early_generations_by_default() -> None:
    # 16x at 20 steps: [8, 4, 4, 4, 4] costs 280 of 320; the 40 left buy two more children
    # bred at step 0 (where noise mutation still changes the image), not ten at step 16
    assert EvoSearch(**common(budget=320)).population == [8, 6, 4, 4, 4]
    assert EvoSearch(leftover="last", **common(budget=320)).population == [8, 4, 4, 4, 14]
    # 32x: 616 of 640; 20 more buy one child at step 0, the last 4 one child at step 16
    assert fit_populations([0, 0, 8, 12, 16], 2, 20, 640) == [16, 9, 8, 8, 9]
    assert fit_populations([0, 0, 8, 12, 16], 2, 20, 640, "last") == [16, 8, 8, 8, 14]


def test_small_budgets_shorten_the_default_schedule_down_to_best_of_n() -> None:
    assert EvoSearch(**common(budget=80)).schedule == [0]  # 4 samples: best-of-4
    assert EvoSearch(**common(budget=160)).schedule == [0, 0]
    assert EvoSearch(**common(budget=320)).schedule == [0, 0, 8, 12, 16]


@pytest.mark.parametrize("budget", [20, 137, 400])
def test_schedule_zero_is_best_of_n_task_for_task(budget: int) -> None:
    evo = EvoSearch(schedule=[0], **common(budget=budget))
    best_of_n = BestOfN(**common(budget=budget))
    tasks = evo.ask()
    assert tasks == best_of_n.ask()
    evo.tell([scripted(lambda t: t.candidate / 10)(t) for t in tasks])
    assert evo.done and evo.ask() == []
    assert evo.best().candidate == len(tasks) - 1


def test_a_budget_of_four_samples_is_best_of_four() -> None:
    assert EvoSearch(**common(budget=80)).ask() == BestOfN(**common(budget=80)).ask()


def test_generations_breed_from_the_right_states() -> None:
    s = EvoSearch(schedule=[0, 0, 8], population=[4, 3, 3], elites=1, tournament=4,
                  **common(budget=400))
    rewards = {0: 0.1, 1: 0.9, 2: 0.5, 3: 0.3}
    gen0 = s.ask()
    assert [(t.candidate, t.source_candidate, t.start, t.end, t.score_on) for t in gen0] == [
        (c, None, 0, 0, ScoreOn.FINAL) for c in range(4)]  # noise stored at step 0
    s.tell([by_candidate(rewards)(t) for t in gen0])

    gen1 = s.ask()
    carry, *children = gen1
    # the elite (1) is carried to step 8 unscored; a tournament over the whole pool always
    # picks the best, so both children are noise mutations of candidate 1's noise
    assert (carry.candidate, carry.source_candidate, carry.start, carry.end, carry.score_on,
            carry.perturbation) == (4, 1, 0, 8, ScoreOn.NONE, None)
    assert [(t.candidate, t.source_candidate, t.start, t.end, t.score_on, t.perturbation)
            for t in children] == [
        (c, 1, 0, 8, ScoreOn.FINAL, Perturbation(PerturbKind.NOISE_MUTATION, 0.25))
        for c in (5, 6)]
    rewards.update({5: 0.95, 6: 0.2})
    s.tell([by_candidate(rewards)(t) for t in gen1])

    gen2 = s.ask()
    # last generation: the elite (5, at step 8 already) needs no task; children mutate the
    # best state at step 8 with step noise and are rolled out to the end
    assert [(t.candidate, t.source_candidate, t.start, t.end, t.score_on, t.perturbation)
            for t in gen2] == [
        (c, 5, 8, 20, ScoreOn.FINAL, Perturbation(PerturbKind.STEP_NOISE, 1.0))
        for c in (7, 8)]
    s.tell([by_candidate(rewards)(t) for t in gen2])
    assert s.done and s.ask() == []
    assert s.best().candidate == 5
    assert s.planned_nfe == plan_cost([0, 0, 8], [4, 3, 3], 1, 20) == 152


def test_an_elite_survives_worse_children_and_is_bred_from_where_it_was_carried() -> None:
    s = EvoSearch(schedule=[0, 4, 8, 12], population=[3, 3, 3, 3], elites=1, tournament=3,
                  **common(budget=400))
    play_ = play(s, by_candidate({0: 1.0}, default=0.1))
    tasks = play_.tasks
    carries = [t for t in tasks if t.score_on is ScoreOn.NONE]
    # candidate 0 (the best) is carried 4 -> 8 by one task, then 8 -> 12 by the next
    assert [(t.source_candidate, t.start, t.end) for t in carries] == [
        (0, 4, 8), (carries[0].candidate, 8, 12)]
    # every child comes from the elite's state at its generation's step
    children = [t for t in tasks if t.source_candidate is not None and t.score_on is ScoreOn.FINAL]
    assert {(t.start, t.source_candidate) for t in children} == {
        (4, 0), (8, carries[0].candidate), (12, carries[1].candidate)}
    assert s.best().candidate == 0


def _archive_families(crowding: int | None) -> list[int]:
    """Families of the elites carried by generation 2, after generation 1's children (all of
    family 0, candidate 0's noise: a whole-pool tournament always picks the best) beat
    every other member."""
    s = EvoSearch(schedule=[0, 0, 8, 12], population=[4, 5, 5, 5], elites=2, tournament=10,
                  crowding=crowding, **common(budget=1000))
    tasks = s.ask()
    s.tell([by_candidate({0: 0.9, 1: 0.5, 2: 0.4, 3: 0.1})(t) for t in tasks])
    gen1 = s.ask()
    tasks += gen1
    children = [t.candidate for t in gen1 if t.score_on is ScoreOn.FINAL]
    assert {t.source_candidate for t in gen1 if t.score_on is ScoreOn.FINAL} == {0}
    s.tell([by_candidate({c: 0.95 - 0.01 * i for i, c in enumerate(children)})(t)
            for t in gen1])
    source = {t.candidate: t.source_candidate for t in tasks}

    def family(candidate: int) -> int:
        while source[candidate] is not None:
            candidate = source[candidate]
        return candidate

    return [family(t.source_candidate) for t in s.ask() if t.score_on is ScoreOn.NONE]


def test_without_crowding_one_family_fills_the_archive() -> None:
    assert _archive_families(None) == [0, 0]


def test_crowding_keeps_distinct_families_in_the_archive() -> None:
    # at most one member per family: family 0's best child, then family 1's member
    assert _archive_families(1) == [0, 1]


def test_tournaments_never_pick_the_worst_of_two() -> None:
    s = EvoSearch(schedule=[0, 0], population=[6, 40], elites=0, tournament=2,
                  **common(budget=2000))
    gen0 = s.ask()
    s.tell([by_candidate({c: c / 10 for c in range(6)})(t) for t in gen0])
    parents = [t.source_candidate for t in s.ask()]
    assert 0 not in parents  # the worst can never win a tournament of two distinct entrants
    assert len(set(parents)) >= 3  # but selection is not just "the best"


def test_failed_members_are_never_parents_and_all_failing_ends_the_search() -> None:
    s = EvoSearch(schedule=[0, 0], population=[3, 4], elites=1, tournament=3,
                  **common(budget=400))
    gen0 = s.ask()
    s.tell([by_candidate({0: None, 1: 0.2, 2: 0.1})(t) for t in gen0])
    assert {t.source_candidate for t in s.ask()} == {1}

    s = EvoSearch(schedule=[0, 0], population=[3, 4], **common(budget=400))
    s.tell([scripted(lambda t: None)(t) for t in s.ask()])
    assert s.ask() == [] and s.done and s.best() is None


def test_same_outcomes_same_tasks_and_the_seed_matters() -> None:
    def tasks_of(seed: int) -> list:
        s = EvoSearch(tournament=2, **common(budget=640, seed=seed))
        return play(s, scripted(lambda t: (t.candidate * 7919 % 101) / 100)).tasks

    assert tasks_of(1) == tasks_of(1)
    assert tasks_of(1) != tasks_of(2)


@pytest.mark.parametrize(("options", "message"), [
    ({"generations": 3}, "generations: unknown option; evosearch takes: schedule, population"),
    ({"beta": 0}, r"beta: must be in \(0, 1\]"),
    ({"beta": 1.5}, "beta: "),
    ({"beta": "high"}, "beta: must be a number"),
    ({"elites": -1}, "elites: must be >= 0"),
    ({"elites": True}, "elites: must be an integer"),
    ({"tournament": 0}, "tournament: "),
    ({"step_noise_scale": 0.0}, "step_noise_scale: "),
    ({"crowding": 0}, "crowding: must be >= 1"),
    ({"leftover": "middle"}, "leftover: must be one of 'early', 'last', got 'middle'"),
    ({"schedule": [4, 8]}, "schedule: must start at step 0"),
    ({"schedule": [0, 8, 4]}, "schedule: must be non-decreasing"),
    ({"schedule": [0, 20]}, r"schedule: steps must be below the model's 20 steps, got \[0, 20\]"),
    ({"schedule": [0, 2.5]}, "schedule.1: must be an integer, got 2.5"),
    ({"schedule": "0,8"}, "schedule: must be a non-empty list of integers"),
    ({"schedule": [0, 8], "population": [4]}, "population: needs 2 sizes"),
    ({"schedule": [0, 8], "population": [4, 2]}, "population.1: 2 leaves no child"),
    ({"schedule": [0, 8], "population": [40, 30]}, "population: .* over the budget of 400"),
])
def test_bad_options_are_refused_by_name(options: dict, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        EvoSearch.from_options(options, **common(budget=400))


def test_a_budget_below_one_sample_is_refused() -> None:
    with pytest.raises(ValueError, match="buys no sample"):
        EvoSearch(**common(budget=19))
    with pytest.raises(ValueError, match=r"cannot pay for schedule \[0, 0, 8\] with 2 elites"):
        EvoSearch(schedule=[0, 0, 8], **common(budget=150))  # needs 120 + 36 + 12 = 168
    assert fit_populations([0, 0, 8], 2, 20, 168) == [6, 3, 3]


def test_full_play_on_the_fake_denoiser() -> None:
    worker = MemoryWorker(FakeDenoiser(num_steps=10))
    s = EvoSearch(**common(num_steps=10, budget=200))
    record = play(s, worker.run)
    assert record.nfe == s.planned_nfe <= 200
    finals = [o for t, o in zip(record.tasks, record.outcomes) if t.score_on is ScoreOn.FINAL]
    assert s.best() == max(finals, key=lambda o: o.reward)
    assert len(record.rounds) == len(s.schedule) == 5
    # an elite is not rolled out again because its carried state ends in the same image
    d = worker.denoiser
    carried = {t.candidate: t for t in record.tasks if t.score_on is ScoreOn.NONE}
    assert carried
    fitness = {o.candidate: o.reward for o in record.outcomes}
    for candidate, task in carried.items():
        origin = task
        while origin.score_on is ScoreOn.NONE:  # follow carries back to the scored member
            origin = next(t for t in record.tasks if t.candidate == origin.source_candidate)
        step, state = worker.states[candidate]
        final = d.denoise(state[None], [d.encode(task.prompt)], step, d.num_steps).latents
        red = float(d.decode(final)[0, 0].mean())
        assert red == pytest.approx(fitness[origin.candidate], abs=1e-6)
    # a mutated child leaves its parent's trajectory
    child = next(t for t in record.tasks if t.perturbation is not None and t.start > 0)
    parent_step, parent_state = worker.states[child.source_candidate]
    assert parent_step == child.start
    unmutated = d.denoise(parent_state[None], [d.encode(child.prompt)], child.start,
                          child.end).latents[0]
    assert not torch.allclose(worker.states[child.candidate][1], unmutated)
