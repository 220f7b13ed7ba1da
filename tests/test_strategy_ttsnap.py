"""TTSnap: the scaled pruning schedule, the cost model and budget fitting, exactly who survives,
per-step verifiers, failures, option checks, and a full play on the fake denoiser."""

from __future__ import annotations

import pytest
from strategy_harness import MemoryWorker, common, play, scripted

from diffsearch.strategies.options import OptionError
from diffsearch.strategies.ttsnap import TTSnap, default_schedule, plan_cost, survivors
from diffsearch.tasks import ScoreOn
from fake_denoiser import FakeDenoiser


def reward_of(task) -> float:
    """A fixed, scrambled reward per candidate, so rankings are known but not id order."""
    return (task.candidate * 7919 % 1009) / 1009


def test_schedule_scales_with_the_number_of_steps() -> None:
    assert default_schedule(20) == ([2, 6, 11], [0.4, 0.4, 0.5])
    assert default_schedule(50) == ([5, 15, 28], [0.4, 0.4, 0.5])
    steps, shares = default_schedule(4)  # 2 and 6 of 20 both land on step 1: 40% of 40%
    assert steps == [1, 2] and shares == pytest.approx([0.16, 0.5])
    assert default_schedule(1) == ([], [])


def test_cost_counts_each_segment_for_the_candidates_that_run_it() -> None:
    assert survivors(30, [0.4, 0.4, 0.5]) == [12, 5, 3]
    assert survivors(10, [0.4, 0.4, 0.5]) == [4, 2, 1]  # 0.4 * 10 is 4, not 5
    assert plan_cost(30, [2, 6, 11], [0.4, 0.4, 0.5], 20) == 30 * 2 + 12 * 4 + 5 * 5 + 3 * 9


@pytest.mark.parametrize("multiple", [1, 4, 8, 32])
def test_n_is_the_most_the_budget_pays_for(multiple: int) -> None:
    s = TTSnap(**common(budget=20 * multiple))
    assert plan_cost(s.n, s.prune_at, s.keep, 20) <= s.budget_nfe
    assert plan_cost(s.n + 1, s.prune_at, s.keep, 20) > s.budget_nfe
    if multiple >= 8:  # the reference's "about 3.8x more seeds than best-of-N"
        assert s.n / multiple > 3.7


def test_rounds_prune_to_exactly_the_top_share() -> None:
    s = TTSnap(n=30, **common(budget=160))
    record = play(s, scripted(reward_of))
    assert [len(tasks) for tasks, _ in record.rounds] == [30, 12, 5, 3]
    ranges = [{(t.start, t.end, t.score_on) for t in tasks} for tasks, _ in record.rounds]
    assert ranges == [{(0, 2, ScoreOn.X0)}, {(2, 6, ScoreOn.X0)}, {(6, 11, ScoreOn.X0)},
                      {(11, 20, ScoreOn.FINAL)}]
    for (_, outcomes), (next_tasks, _) in zip(record.rounds, record.rounds[1:]):
        top = sorted(outcomes, key=lambda o: -o.reward)[:len(next_tasks)]
        assert [t.source_candidate for t in next_tasks] == [o.candidate for o in top]
    assert record.rounds[0][0][0].source_candidate is None
    assert record.nfe == s.planned_nfe == 160
    finals = record.rounds[-1][1]
    assert s.best() == max(finals, key=lambda o: o.reward)


def test_per_step_verifiers_go_into_the_tasks() -> None:
    # as a job gives them: a JSON key is a string
    s = TTSnap.from_options({"verifiers": {2: "noise-aware-2", "6": "noise-aware-6"}},
                            **common(budget=160))
    record = play(s, scripted(reward_of))
    names = [{t.verifier for t in tasks} for tasks, _ in record.rounds]
    assert names == [{"noise-aware-2"}, {"noise-aware-6"}, {None}, {None}]


def test_failed_candidates_never_survive_and_all_failing_stops() -> None:
    s = TTSnap(n=10, **common(budget=400))
    first = s.ask()
    best_two = {8, 9}
    s.tell([scripted(lambda t: None if t.candidate in best_two else t.candidate / 10)(t)
            for t in first])
    assert [t.source_candidate for t in s.ask()] == [7, 6, 5, 4]

    s = TTSnap(n=10, **common(budget=400))
    s.tell([scripted(lambda t: None)(t) for t in s.ask()])
    assert s.ask() == [] and s.done and s.best() is None


def test_same_outcomes_same_tasks() -> None:
    def tasks_of() -> list:
        return play(TTSnap(**common(budget=320)), scripted(reward_of)).tasks

    assert tasks_of() == tasks_of()


def test_one_step_model_is_best_of_n() -> None:
    s = TTSnap(**common(num_steps=1, budget=5))
    tasks = s.ask()
    assert [(t.start, t.end, t.score_on) for t in tasks] == [(0, 1, ScoreOn.FINAL)] * 5


@pytest.mark.parametrize(("options", "message"), [
    ({"prune": [2]}, "prune: unknown option; ttsnap takes: prune_at, keep, n, verifiers"),
    ({"prune_at": [2, 6]}, "keep: required with a custom prune_at"),
    ({"prune_at": [2, 6], "keep": [0.5]}, "keep: needs 2 value"),
    ({"prune_at": [6, 2], "keep": 0.5}, "prune_at: must be strictly increasing"),
    ({"prune_at": [0, 6], "keep": 0.5}, "prune_at.0: must be >= 1"),
    ({"prune_at": [2, 20], "keep": 0.5}, "prune_at: steps must be below the model's 20 steps"),
    ({"keep": 0}, r"keep: must be in \(0, 1\]"),
    ({"keep": True}, "keep: must be a number or a non-empty list of numbers, got True"),
    ({"keep": [0.4, 1.5, 0.5]}, "keep.1: "),
    ({"n": 0}, "n: must be >= 1"),
    ({"n": 200}, "n: 200 needs .* over the budget of 160"),
    ({"verifiers": {3: "x"}}, "verifiers.3: step 3 is not a pruning step"),
    ({"verifiers": {"two": "x"}}, "verifiers.two: keys must be steps"),
    ({"verifiers": {2: ""}}, "verifiers.2: must be a name"),
    ({"verifiers": ["x"]}, "verifiers: must be a mapping"),
])
def test_bad_options_are_refused_by_name(options: dict, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        TTSnap.from_options(options, **common(budget=160))


def test_a_budget_below_one_candidate_is_refused() -> None:
    with pytest.raises(ValueError, match="cannot pay for one candidate"):
        TTSnap(**common(budget=19))


def test_custom_schedule_and_a_single_share() -> None:
    s = TTSnap(prune_at=[3], keep=0.25, n=8, **common(num_steps=10, budget=80))
    record = play(s, scripted(reward_of))
    assert [len(tasks) for tasks, _ in record.rounds] == [8, 2]
    assert record.nfe == 8 * 3 + 2 * 7


def test_full_play_on_the_fake_denoiser_scores_each_step_with_its_verifier() -> None:
    worker = MemoryWorker(FakeDenoiser(num_steps=10))
    s = TTSnap(verifiers={3: "greenness"}, **common(num_steps=10, budget=100))
    record = play(s, worker.run)
    assert record.nfe <= 100
    keys = [{name for o in outcomes for name in o.scores} for _, outcomes in record.rounds]
    assert keys == [{"redness"}, {"greenness"}, {"redness"}, {"redness"}]
    assert s.best() == max(record.rounds[-1][1], key=lambda o: o.reward)
