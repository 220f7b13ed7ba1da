"""Search over paths: levels and cost, the re-noise/denoise rounds, who is kept, failures,
option checks, and a full play on the fake denoiser."""

from __future__ import annotations

import pytest
import torch
from strategy_harness import MemoryWorker, common, play, scripted

from diffsearch.strategies.options import OptionError
from diffsearch.strategies.paths import Paths, levels
from diffsearch.tasks import Outcome, Perturbation, PerturbKind, ScoreOn
from fake_denoiser import FakeDenoiser


def reward_of(task) -> float:
    return (task.candidate * 7919 % 1009) / 1009


def test_levels_advance_by_the_net_interval_and_stop_before_the_end() -> None:
    assert levels(10, 2, 4, 20) == [10, 12, 14, 16, 18]
    assert levels(10, 2, 5, 20) == [10, 13, 16, 19]  # 19 - 2 + 5 = 22 would pass the end
    assert levels(18, 2, 4, 20) == [18]


def test_defaults_and_budget_fitting() -> None:
    s = Paths(**common(budget=20 * 16))
    assert (s.start_step, s.renoise_steps, s.denoise_steps, s.branches) == (10, 2, 4, 2)
    per_path = 10 + 4 * 2 * 4 + (20 - 18)  # to the start, 4 rounds of 2 branches, the end
    assert s.n == 320 // per_path == 7


def test_rounds_renoise_denoise_and_keep_the_best_n() -> None:
    s = Paths(n=3, branches=2, **common(budget=400))
    record = play(s, scripted(reward_of))
    rounds = [tasks for tasks, _ in record.rounds]
    assert [len(r) for r in rounds] == [3, 6, 6, 6, 6, 3]
    assert {(t.source_candidate, t.start, t.end, t.score_on) for t in rounds[0]} == {
        (None, 0, 10, ScoreOn.NONE)}
    for i, level in enumerate([10, 12, 14, 16], start=1):
        assert {(t.start, t.end, t.score_on, t.perturbation) for t in rounds[i]} == {
            (level - 2, level + 2, ScoreOn.X0,
             Perturbation(PerturbKind.RENOISE, to_step=level - 2))}
    # each kept path branches twice; the kept are exactly the best 3 of the previous round
    assert [t.source_candidate for t in rounds[1]] == [0, 0, 1, 1, 2, 2]
    for (_, outcomes), following in zip(record.rounds[1:], rounds[2:]):
        top = [o.candidate for o in sorted(outcomes, key=lambda o: -o.reward)[:3]]
        per_path = 2 if following[0].score_on is ScoreOn.X0 else 1
        assert [t.source_candidate for t in following] == [c for c in top for _ in range(per_path)]
    assert {(t.start, t.end, t.score_on, t.perturbation) for t in rounds[-1]} == {
        (18, 20, ScoreOn.FINAL, None)}
    assert record.nfe == s.planned_nfe == 3 * (10 + 4 * 2 * 4 + 2)
    assert s.best() == max(record.rounds[-1][1], key=lambda o: o.reward)


def test_no_search_round_when_the_start_is_close_to_the_end() -> None:
    s = Paths(start_step=18, n=2, **common(budget=400))
    record = play(s, scripted(reward_of))
    assert [[(t.start, t.end, t.score_on) for t in tasks] for tasks, _ in record.rounds] == [
        [(0, 18, ScoreOn.NONE)] * 2, [(18, 20, ScoreOn.FINAL)] * 2]


def test_failed_paths_are_dropped_and_all_failing_stops() -> None:
    s = Paths(n=3, **common(budget=400))
    s.tell([Outcome(0, t.candidate, t.end, None, error="non-finite values" if t.candidate == 0
                    else None) for t in s.ask()])
    assert [t.source_candidate for t in s.ask()] == [1, 1, 2, 2]

    s = Paths(n=2, **common(budget=400))
    s.tell([scripted(reward_of)(t) for t in s.ask()])
    s.tell([scripted(lambda t: None)(t) for t in s.ask()])
    assert s.ask() == [] and s.done and s.best() is None


def test_same_outcomes_same_tasks() -> None:
    def tasks_of() -> list:
        return play(Paths(**common(budget=400)), scripted(reward_of)).tasks

    assert tasks_of() == tasks_of()


@pytest.mark.parametrize(("options", "message"), [
    ({"width": 2}, "width: unknown option; paths takes: n, branches"),
    ({"branches": 0}, "branches: must be >= 1"),
    ({"renoise_steps": 0}, "renoise_steps: must be >= 1"),
    ({"renoise_steps": 4, "denoise_steps": 4}, "denoise_steps: 4 must exceed renoise_steps"),
    ({"renoise_steps": 20, "denoise_steps": 21}, "renoise_steps: 20 leaves no start step"),
    ({"start_step": 1}, "start_step: must be >= 2"),
    ({"start_step": 20}, "start_step: must be <= 19"),
    ({"n": 20}, "n: 20 paths need .* over the budget of 400"),
])
def test_bad_options_are_refused_by_name(options: dict, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        Paths.from_options(options, **common(budget=400))


def test_a_budget_below_one_path_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot pay for one path"):
        Paths(**common(budget=40))


def test_full_play_branches_differ_and_are_rescored_at_their_level() -> None:
    worker = MemoryWorker(FakeDenoiser(num_steps=10))
    s = Paths(n=2, branches=3, **common(num_steps=10, budget=200))
    record = play(s, worker.run)
    assert record.nfe == s.planned_nfe <= 200
    tasks, outcomes = record.rounds[1]
    siblings = [worker.states[t.candidate][1] for t in tasks if t.source_candidate == 0]
    assert len(siblings) == 3
    assert not torch.allclose(siblings[0], siblings[1])  # fresh re-noising per branch
    assert all(o.step == t.end and o.reward is not None for t, o in zip(tasks, outcomes))
    assert s.best() == max(record.rounds[-1][1], key=lambda o: o.reward)
