"""FK steering: segments and tasks, exact potentials, ESS-triggered and scheduled multinomial
resampling, failures, determinism, option checks, and a full stochastic play."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from strategy_harness import MemoryWorker, common, play, scripted

from diffsearch.seeding import derive_seed, numpy_rng
from diffsearch.strategies.options import OptionError
from diffsearch.strategies.particles import Particles, effective_sample_size
from diffsearch.tasks import ScoreOn
from fake_denoiser import FakeDenoiser

NEVER = 1e-9
"""An ESS threshold no real weight vector falls below: resampling only on failures."""


def answer(s: Particles, rewards: list[float | None]) -> list:
    tasks = s.ask()
    by_slot = dict(zip((t.candidate for t in tasks), rewards))
    s.tell([scripted(lambda t: by_slot[t.candidate])(t) for t in tasks])
    return tasks


def test_particles_run_stochastic_segments_and_finish_on_final_images() -> None:
    s = Particles(**common(budget=4 * 20))
    record = play(s, scripted(lambda t: (t.candidate * 37 % 11) / 10))
    assert s.particles == 4 and s.segments == [0, 5, 10, 15, 20]
    assert [{(t.start, t.end, t.score_on, t.eta) for t in tasks} for tasks, _ in record.rounds] == [
        {(0, 5, ScoreOn.X0, 1.0)}, {(5, 10, ScoreOn.X0, 1.0)}, {(10, 15, ScoreOn.X0, 1.0)},
        {(15, 20, ScoreOn.FINAL, 1.0)}]
    assert all(len(tasks) == 4 for tasks, _ in record.rounds)
    assert record.nfe == 80
    assert s.resampled_at == [5, 10, 15]
    assert s.best() == max(record.rounds[-1][1], key=lambda o: o.reward)


def test_potentials_accumulate_exactly_between_resamplings() -> None:
    for potential, expected in (("diff", [0.4, 0.1]), ("max", [0.6, 1.0])):
        s = Particles(particles=2, potential=potential, lam=1.0, ess_threshold=NEVER,
                      **common(budget=40))
        answer(s, [0.2, 0.5])
        np.testing.assert_allclose(s.log_weights, [0.2, 0.5])
        answer(s, [0.4, 0.1])
        # diff: 0.2 + (0.4 - 0.2), 0.5 + (0.1 - 0.5); max: 0.2 + 0.4, 0.5 + max(0.1, 0.5)
        np.testing.assert_allclose(s.log_weights, expected)
        assert s.resampled_at == []


def test_resampling_is_multinomial_from_the_seeded_generator() -> None:
    s = Particles(particles=5, lam=2.0, **common(budget=100))
    rewards = [0.1, 0.9, 0.5, 0.3, 0.7]
    first = answer(s, rewards)
    w = np.exp(2.0 * (np.array(rewards) - 0.9))
    rng = numpy_rng(derive_seed(7, "a red circle", -1, "particles/resample/5"))
    ancestors = np.sort(rng.choice(5, size=5, p=w / w.sum()))
    assert [t.source_candidate for t in s.ask()] == [first[a].candidate for a in ancestors]
    np.testing.assert_array_equal(s.log_weights, np.zeros(5))


def test_a_dominant_particle_takes_over_and_copies_diverge_by_seed() -> None:
    s = Particles(particles=4, lam=1000.0, **common(budget=80))
    answer(s, [0.1, 0.2, 0.8, 0.3])
    children = s.ask()
    assert [t.source_candidate for t in children] == [2, 2, 2, 2]
    assert len({t.seed for t in children}) == 4  # each copy draws its own step noise


def test_equal_weights_never_fall_below_the_ess_threshold() -> None:
    s = Particles(particles=3, lam=0.0, ess_threshold=0.5, **common(budget=60))
    first = answer(s, [0.1, 0.5, 0.9])
    assert [t.source_candidate for t in s.ask()] == [t.candidate for t in first]
    assert s.resampled_at == []


def test_ess_below_the_threshold_triggers_resampling() -> None:
    assert effective_sample_size(np.zeros(4)) == pytest.approx(4.0)
    assert effective_sample_size(np.array([0.0, -math.inf, -math.inf])) == pytest.approx(1.0)
    assert effective_sample_size(np.full(3, -math.inf)) == 0.0
    s = Particles(particles=4, lam=10.0, ess_threshold=0.5, **common(budget=80))
    answer(s, [0.0, 0.0, 0.0, 1.0])  # ESS ~ 1.0 < 2
    assert s.resampled_at == [5]


def test_a_failed_particle_forces_resampling_and_is_never_continued() -> None:
    s = Particles(particles=3, lam=0.0, ess_threshold=NEVER, **common(budget=60))
    first = answer(s, [0.5, None, 0.5])
    assert s.resampled_at == [5]
    assert first[1].candidate not in {t.source_candidate for t in s.ask()}

    s = Particles(particles=2, **common(budget=40))
    answer(s, [None, None])
    assert s.ask() == [] and s.done and s.best() is None


def test_same_outcomes_same_tasks_and_the_seed_matters() -> None:
    def tasks_of(seed: int) -> list:
        s = Particles(lam=5.0, **common(budget=160, seed=seed))
        return play(s, scripted(lambda t: (t.candidate * 37 % 11) / 10)).tasks

    assert tasks_of(5) == tasks_of(5)
    assert [t.source_candidate for t in tasks_of(5)] != [t.source_candidate for t in tasks_of(6)]


@pytest.mark.parametrize(("options", "message"), [
    ({"steps": 3}, "steps: unknown option; particles takes: particles, resample_every"),
    ({"particles": 5}, "particles: 5 need 100 NFE, over the budget of 80"),
    ({"particles": 0}, "particles: must be >= 1"),
    ({"particles": 2.5}, "particles: must be an integer"),
    ({"resample_every": 0}, "resample_every: must be >= 1"),
    ({"potential": "sum"}, "potential: must be one of 'max', 'diff'"),
    ({"lam": -1}, "lam: must be in"),
    ({"ess_threshold": 0}, r"ess_threshold: must be in \(0, 1\]"),
    ({"ess_threshold": 1.5}, "ess_threshold: "),
    ({"eta": 0.0}, "eta: must be in"),
])
def test_bad_options_are_refused_by_name(options: dict, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        Particles.from_options(options, **common(budget=80))


def test_a_budget_below_one_particle_is_refused() -> None:
    with pytest.raises(ValueError, match="buys no particle"):
        Particles(**common(budget=19))


def test_full_play_resampled_copies_diverge() -> None:
    worker = MemoryWorker(FakeDenoiser(num_steps=8))
    s = Particles(particles=4, resample_every=2, lam=200.0, **common(num_steps=8, budget=32))
    record = play(s, worker.run)
    assert record.nfe == 32
    tasks = record.rounds[1][0]
    sources = [t.source_candidate for t in tasks]
    twin = next(src for src in sources if sources.count(src) > 1)
    copies = [worker.states[t.candidate][1] for t in tasks if t.source_candidate == twin]
    assert not torch.allclose(copies[0], copies[1])
    assert s.best() == max(record.rounds[-1][1], key=lambda o: o.reward)
