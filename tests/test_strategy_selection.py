"""The ``select`` option: which answer a strategy returns (argmax, softmax, agreement,
held-out), checked on scripted outcomes, on the fake denoiser and through the real engine."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
import torch
from strategy_harness import MemoryWorker, common, greenness, play, redness, scripted

from diffsearch.api import run_job
from diffsearch.errors import JobError
from diffsearch.job import Job
from diffsearch.preflight import check_strategies, check_verifiers
from diffsearch.runtime import RuntimeSpec, WorkerRuntime, register_runtime
from diffsearch.store import RunStore
from diffsearch.strategies.best_of_n import BestOfN
from diffsearch.strategies.evosearch import EvoSearch
from diffsearch.strategies.options import OptionError
from diffsearch.strategies.selection import Selection, check_select, pick
from diffsearch.strategies.tree_of_frames import TreeOfFrames
from diffsearch.strategies.ttsnap import TTSnap
from diffsearch.tasks import Outcome, ScoreOn
from diffsearch.verifiers.base import Verifier
from engine_harness import create_fake_verifier, fake_job
from fake_denoiser import FakeDenoiser


def outcome(candidate: int, reward: float, step: int = 20) -> Outcome:
    return Outcome(prompt_index=0, candidate=candidate, step=step, reward=reward)


@pytest.mark.parametrize(("value", "message"), [
    ({"method": "best"}, "select.method: must be one of 'argmax', 'softmax', 'agreement'"),
    ({"method": "argmax", "temperature": 1.0}, "select.temperature: not used by method "
                                               "'argmax' .it takes: no other field"),
    ({"method": "softmax"}, "select.temperature: required by method 'softmax'"),
    ({"method": "softmax", "temperature": 0}, r"select.temperature: must be in \(0, inf\)"),
    ({"method": "softmax", "temperature": 1, "verifiers": ["a"]},
     "select.verifiers: not used by method 'softmax' .it takes: temperature, top"),
    ({"method": "held-out"}, "select.verifiers: required by method 'held-out'"),
    ({"method": "held-out", "verifiers": ["a", "b"]}, "held-out names exactly one verifier"),
    ({"method": "agreement", "verifiers": "clip"}, "select.verifiers: must be a non-empty list"),
    ({"method": "agreement", "verifiers": ["a", "a"]}, "select.verifiers: repeats a name"),
    ({"method": "agreement", "verifiers": ["a"], "top": 1}, "select.top: must be >= 2"),
    ({"method": "held-out", "verifiers": ["a"], "top": True}, "select.top: must be an integer"),
    ("softmax", "select: must be a mapping with 'method'"),
])
def test_bad_select_is_refused_by_field(value: object, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        BestOfN.check_options({"select": value})


def test_select_is_checked_with_every_strategy_and_refused_where_it_cannot_act() -> None:
    checked = EvoSearch.check_options({"select": {"method": "softmax", "temperature": 0.1}})
    assert checked["select"] == Selection("softmax", temperature=0.1)
    assert check_select("select", {"method": "held-out", "verifiers": ["v"]}).top == 4
    with pytest.raises(OptionError, match="select.method: tree-of-frames returns the guide's "
                                          "best answer only"):
        TreeOfFrames.check_options({"select": {"method": "softmax", "temperature": 0.1}})
    TreeOfFrames.check_options({"select": {"method": "argmax"}})


def test_named_verifiers_include_the_selections() -> None:
    s = TTSnap.from_options({"verifiers": {2: "x0-judge"},
                             "select": {"method": "agreement", "verifiers": ["a", "b"]}},
                            **common(budget=400))
    assert s.named_verifiers() == {"select.verifiers.0": "a", "select.verifiers.1": "b",
                                   "verifiers.2": "x0-judge"}


def test_argmax_is_the_default_and_asks_nothing_more() -> None:
    plain = BestOfN(**common(budget=200))
    explicit = BestOfN.from_options({"select": {"method": "argmax"}}, **common(budget=200))
    reward = scripted(lambda t: (t.candidate * 37 % 11) / 10)
    assert play(plain, reward).tasks == play(explicit, reward).tasks
    assert plain.best() == explicit.best() and plain.best().reward == 1.0


def test_softmax_draws_by_reward_and_is_seeded() -> None:
    answers = [outcome(c, r) for c, r in enumerate([0.9, 0.8, 0.7, 0.1])]
    soft = Selection("softmax", temperature=0.1)
    picks = [pick(soft, answers, {}, seed=seed, prompt="p").candidate for seed in range(4000)]
    # p = exp(r / 0.1) normalised: 0.6648, 0.2446, 0.0900, 0.0002
    expected = np.exp(np.array([0.9, 0.8, 0.7, 0.1]) / 0.1)
    expected /= expected.sum()
    frequencies = np.bincount(picks, minlength=4) / len(picks)
    assert np.abs(frequencies - expected).max() < 4 * np.sqrt(0.25 / len(picks))
    # the same seed and prompt pick the same answer; a cold temperature is the argmax
    assert pick(soft, answers, {}, seed=3, prompt="p") == pick(soft, answers, {}, seed=3,
                                                                 prompt="p")
    cold = Selection("softmax", temperature=1e-6)
    assert {pick(cold, answers, {}, seed=s, prompt="p").candidate for s in range(50)} == {0}
    # top limits the draw to the guide's best
    top2 = Selection("softmax", temperature=100.0, top=2)
    assert {pick(top2, answers, {}, seed=s, prompt="p").candidate for s in range(200)} == {0, 1}


def test_agreement_takes_the_lowest_mean_rank() -> None:
    answers = [outcome(c, r) for c, r in enumerate([0.9, 0.8, 0.7])]
    agree = Selection("agreement", verifiers=("a", "b"), top=3)
    # guide ranks 0, 1, 2; a ranks 2, 0, 1; b ranks 2, 0, 1: mean ranks 1.33, 0.33, 1.33
    rescored = {0: {"a": 0.1, "b": 0.1}, 1: {"a": 0.9, "b": 0.9}, 2: {"a": 0.5, "b": 0.5}}
    assert pick(agree, answers, rescored, seed=0, prompt="p").candidate == 1
    # a tie in mean rank goes to the guide's order
    rescored = {0: {"a": 0.1, "b": 0.9}, 1: {"a": 0.9, "b": 0.1}, 2: {"a": 0.0, "b": 0.0}}
    assert pick(agree, answers, rescored, seed=0, prompt="p").candidate == 0
    # an answer missing a verifier's score (its re-scoring failed) does not compete
    rescored = {0: {"a": 0.1}, 1: {"a": 0.2, "b": 0.0}, 2: {"a": 0.3, "b": 0.1}}
    assert pick(agree, answers, rescored, seed=0, prompt="p").candidate == 2
    assert pick(agree, answers, {}, seed=0, prompt="p").candidate == 0  # none left: argmax


def test_held_out_rescoring_round_costs_nothing_and_decides_the_pick() -> None:
    worker = MemoryWorker(FakeDenoiser(num_steps=10))
    s = BestOfN.from_options({"select": {"method": "held-out", "verifiers": ["greenness"],
                                         "top": 3}}, **common(num_steps=10, budget=80))
    record = play(s, worker.run)
    (search, told), (rescoring, rescored) = record.rounds
    assert record.nfe == 80 and s.planned_nfe == 80 and s.done
    reward = {o.candidate: o for o in told}
    by_redness = sorted(search, key=lambda t: -reward[t.candidate].reward)[:3]
    assert [(t.source_candidate, t.start, t.end, t.score_on, t.verifier) for t in rescoring] == [
        (t.candidate, 10, 10, ScoreOn.FINAL, "greenness") for t in by_redness]
    assert all(t.denoise_nfe(10) == 0 for t in rescoring)
    # the pick is the greenest of the three reddest; its reward stays the guide's
    d = worker.denoiser
    green = {t.candidate: float(greenness(d.decode(worker.states[t.candidate][1][None]))[0])
             for t in by_redness}
    assert s.best().candidate == max(green, key=green.get)
    assert [o.reward for o in rescored] == pytest.approx([green[t.candidate]
                                                          for t in by_redness])
    assert s.best() == reward[s.best().candidate]
    assert s.best().reward == pytest.approx(float(redness(d.decode(
        worker.states[s.best().candidate][1][None]))[0]))


def test_answers_that_stopped_before_the_last_step_are_rescored_from_their_final_latent(
        ) -> None:
    # EvoSearch's earlier generations stop before the last step and are rolled out to be
    # scored: a 0-NFE task starts from that rolled-out final latent, so they compete too
    worker = MemoryWorker(FakeDenoiser(num_steps=10))
    s = EvoSearch.from_options({"select": {"method": "held-out", "verifiers": ["greenness"],
                                           "top": 50}}, **common(num_steps=10, budget=200))
    record = play(s, worker.run)
    rescoring, outcomes = record.rounds[-1]
    assert rescoring and all(t.verifier == "greenness" and t.start == t.end == 10
                             for t in rescoring)
    answers = {t.candidate: t for t in record.tasks
               if t.score_on is ScoreOn.FINAL and t.verifier is None}
    sources = [t.source_candidate for t in rescoring]
    assert set(sources) <= set(answers)
    assert any(answers[c].end < 10 for c in sources)  # an earlier generation's answer
    for task, outcome in zip(rescoring, outcomes):  # scored on the answer's own final image
        final = worker.finals[task.source_candidate][None]
        expected = float(GreennessVerifier().score(worker.denoiser.decode(final), [""])[0])
        assert outcome.reward == pytest.approx(expected)
    assert record.nfe == s.planned_nfe <= 200


def test_the_search_ends_with_the_argmax_when_nothing_can_be_rescored() -> None:
    s = BestOfN.from_options({"select": {"method": "held-out", "verifiers": ["greenness"]}},
                             **common(budget=80))
    s.tell([scripted(lambda t: None)(t) for t in s.ask()])
    assert s.ask() == [] and s.done and s.best() is None


class GreennessVerifier(Verifier):
    name = "greenness"
    needs_prompt = False

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        return images[:, 1].mean(dim=(1, 2))


def _create(spec: str | dict, device: str = "cpu") -> Verifier:
    return GreennessVerifier(device) if spec == "greenness" else create_fake_verifier(spec,
                                                                                      device)


def test_the_engine_returns_the_held_out_pick_at_the_same_nfe(tmp_path: Path) -> None:
    held_out = {"name": "best-of-n",
                "select": {"method": "held-out", "verifiers": ["greenness"], "top": 4}}
    results = {}
    for label, strategy in (("argmax", {"name": "best-of-n"}), ("held-out", held_out)):
        job = fake_job(strategy=strategy, budget="8x", prompts=["a", "b"])
        register_runtime(WorkerRuntime(RuntimeSpec.from_job(job), FakeDenoiser(num_steps=10),
                                       _create))
        result = run_job(job, tmp_path / label, progress_bar=False)
        results[label] = json.loads((tmp_path / label / "results.json").read_text())
        assert result.nfe == 2 * 80
    for argmax, chosen in zip(results["argmax"]["prompts"], results["held-out"]["prompts"]):
        finals = [c for c in chosen["candidates"] if "greenness" not in c["scores"]]
        top4 = sorted(finals, key=lambda c: -c["reward"])[:4]
        rescored = {c["parent"]: c["scores"]["greenness"] for c in chosen["candidates"]
                    if "greenness" in c["scores"]}
        assert set(rescored) == {c["candidate"] for c in top4}
        assert chosen["best"]["candidate"] == max(rescored, key=rescored.get)
        assert argmax["best"]["candidate"] == top4[0]["candidate"]
        assert chosen["best"]["score"] == next(c["reward"] for c in finals
                                               if c["candidate"] == chosen["best"]["candidate"])


def test_an_unknown_select_verifier_is_refused_before_the_run() -> None:
    job = Job.model_validate({
        "prompts": ["a red circle"], "model": "shapes", "verifier": "shapes-clip",
        "strategy": {"name": "best-of-n",
                     "select": {"method": "held-out", "verifiers": ["no-such-judge"]}}})
    strategy = check_strategies(job, num_steps=20)
    with pytest.raises(JobError, match="strategy.select.verifiers.0: unknown verifier "
                                       "'no-such-judge'"):
        check_verifiers(job, strategy)


def test_the_engine_rescores_an_earlier_generation_from_its_rolled_out_final(tmp_path: Path
                                                                             ) -> None:
    """EvoSearch's earlier generations stop before the last step; a 0-NFE re-scoring task
    reads the source's rolled-out final latent from the store, not its state at that step."""
    strategy = {"name": "evosearch",
                "select": {"method": "held-out", "verifiers": ["greenness"], "top": 50}}
    job = fake_job(strategy=strategy, budget="20x", prompts=["a"])
    denoiser = FakeDenoiser(num_steps=10)
    register_runtime(WorkerRuntime(RuntimeSpec.from_job(job), denoiser, _create))
    run_job(job, tmp_path / "run", progress_bar=False)
    store = RunStore.open(tmp_path / "run" / "store.zarr", writable=False)
    records = {r.candidate: r for r in store.finished_candidates(0)}
    rescored = [r for r in records.values() if "greenness" in r.scores]
    early = [r for r in rescored if records[r.parent].step < 10]
    assert early, "no earlier-generation answer was re-scored"
    for record in early:
        final = store.read_latents(0, [record.parent], final=True)
        expected = float(GreennessVerifier().score(denoiser.decode(final), [""])[0])
        assert record.scores["greenness"] == pytest.approx(expected, abs=1e-6)
