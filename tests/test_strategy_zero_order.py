"""Zero-order search: pivot moves, fresh pivots, budget use, option checks, and a full play
whose stored neighbours have exactly the asked cosine with their pivot."""

from __future__ import annotations

import pytest
import torch
from strategy_harness import MemoryWorker, common, play, scripted

from diffsearch.seeding import derive_seed
from diffsearch.strategies.options import OptionError
from diffsearch.strategies.zero_order import ZeroOrder
from diffsearch.tasks import Perturbation, PerturbKind, ScoreOn
from fake_denoiser import FakeDenoiser


def answer(s: ZeroOrder, rewards: dict[int, float | None]) -> list:
    tasks = s.ask()
    s.tell([scripted(lambda t: rewards[t.candidate])(t) for t in tasks])
    return tasks


def test_pivot_moves_to_a_better_neighbour_and_is_redrawn_when_none_wins() -> None:
    s = ZeroOrder(neighbours=3, **common(budget=20 * 20))
    first = answer(s, {0: 0.5})
    assert [(t.candidate, t.source_candidate, t.start, t.end, t.score_on, t.seed)
            for t in first] == [(0, None, 0, 0, ScoreOn.FINAL, derive_seed(7, "a red circle", 0,
                                                                            "noise"))]
    neighbours = answer(s, {1: 0.4, 2: 0.7, 3: 0.6})
    assert [(t.source_candidate, t.start, t.end, t.score_on, t.perturbation)
            for t in neighbours] == [
        (0, 0, 0, ScoreOn.FINAL, Perturbation(PerturbKind.NEIGHBOUR, 0.95))] * 3
    # 2 beat the pivot: its neighbours next
    moved = answer(s, {4: 0.7, 5: 0.1, 6: None})  # a tie does not move the pivot
    assert {t.source_candidate for t in moved} == {2}
    # no neighbour won: a fresh pivot from noise, asked alone, then its neighbours
    fresh = answer(s, {7: 0.2})
    assert [(t.candidate, t.source_candidate) for t in fresh] == [(7, None)]
    assert {t.source_candidate for t in answer(s, {8: 0.1, 9: 0.1, 10: 0.1})} == {7}
    assert s.pivots == [0, 2, 7]
    assert s.best().candidate == 2  # the best anywhere, not the current pivot


def test_the_budget_is_spent_to_the_last_sample() -> None:
    s = ZeroOrder(neighbours=4, **common(budget=7 * 20 + 19))
    record = play(s, scripted(lambda t: t.candidate / 100))  # every neighbour wins
    assert [len(tasks) for tasks, _ in record.rounds] == [1, 4, 2]
    assert record.nfe == 7 * 20


def test_a_failed_fresh_pivot_is_drawn_again() -> None:
    s = ZeroOrder(neighbours=2, **common(budget=100))
    answer(s, {0: None})
    assert [t.source_candidate for t in s.ask()] == [None]


def test_same_outcomes_same_tasks_and_the_seed_matters() -> None:
    def tasks_of(seed: int) -> list:
        s = ZeroOrder(**common(budget=400, seed=seed))
        return play(s, scripted(lambda t: (t.candidate * 37 % 11) / 10)).tasks

    assert tasks_of(3) == tasks_of(3)
    assert tasks_of(3) != tasks_of(4)


@pytest.mark.parametrize(("options", "message"), [
    ({"pivots": 2}, "pivots: unknown option; zero-order takes: neighbours, cosine"),
    ({"neighbours": 0}, "neighbours: must be >= 1"),
    ({"neighbours": 2.5}, "neighbours: must be an integer"),
    ({"cosine": 1.0}, r"cosine: must be in \(0, 1\)"),
    ({"cosine": 0}, "cosine: "),
])
def test_bad_options_are_refused_by_name(options: dict, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        ZeroOrder.from_options(options, **common())


def test_a_budget_below_one_sample_is_refused() -> None:
    with pytest.raises(ValueError, match="buys no sample"):
        ZeroOrder(**common(budget=19))


def test_full_play_neighbours_are_at_the_asked_cosine() -> None:
    worker = MemoryWorker(FakeDenoiser(num_steps=8))
    s = ZeroOrder(neighbours=3, cosine=0.9, **common(num_steps=8, budget=8 * 12))
    record = play(s, worker.run)
    assert record.nfe == 8 * 12
    for task in record.tasks:
        step, noise = worker.states[task.candidate]
        assert step == 0
        if task.source_candidate is not None:
            pivot = worker.states[task.source_candidate][1]
            cosine = torch.nn.functional.cosine_similarity(noise.flatten(), pivot.flatten(), 0)
            assert cosine.item() == pytest.approx(0.9, abs=1e-5)
            assert noise.norm().item() == pytest.approx(pivot.norm().item(), rel=1e-5)
    finals = record.outcomes
    assert s.best() == max(finals, key=lambda o: o.reward)
