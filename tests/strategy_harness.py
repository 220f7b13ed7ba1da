"""Play a strategy to completion without the engine, and script outcomes for exact tests.

:class:`MemoryWorker` runs tasks the way a worker does (see ``diffsearch.runtime``): the start
latent from the task's seed or its source's stored state, the real perturbations of
``diffsearch.perturb``, the FakeDenoiser's steps with per-task generators, the state at ``end``
kept per candidate, and scores of the decoded x0 estimate or final image by a fake verifier.
:func:`play` drives ask/tell and checks the contract on every round: unique candidate ids,
sources told in earlier rounds and at the right step, no NFE over the budget.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from diffsearch.perturb import apply_perturbations
from diffsearch.seeding import task_generator
from diffsearch.strategies.base import Strategy
from diffsearch.tasks import Outcome, PerturbKind, ScoreOn, Task
from fake_denoiser import FakeDenoiser

RewardFn = Callable[[Task], float | None]


def redness(images: torch.Tensor) -> torch.Tensor:
    """Mean of the red channel: a verifier with an obvious best (the engine tests use it too)."""
    return images[:, 0].mean(dim=(1, 2))


def greenness(images: torch.Tensor) -> torch.Tensor:
    """A second verifier, so per-step verifier choices (TTSnap) change the scores."""
    return images[:, 1].mean(dim=(1, 2))


FAKE_VERIFIERS = {"redness": redness, "greenness": greenness}


class MemoryWorker:
    """Runs tasks one at a time on the FakeDenoiser, keeping each candidate's state in memory."""

    def __init__(self, denoiser: FakeDenoiser | None = None, guiding: str = "redness",
                 fail: Callable[[Task], bool] = lambda task: False) -> None:
        self.denoiser = denoiser or FakeDenoiser(num_steps=10)
        self.guiding = guiding
        self.fail = fail
        self.states: dict[int, tuple[int, torch.Tensor]] = {}
        """candidate -> (step, latent at that step)."""
        self.finals: dict[int, torch.Tensor] = {}
        """candidate -> its final latent, for candidates scored on their final image."""

    def run(self, task: Task) -> Outcome:
        d = self.denoiser
        if task.source_candidate is None:
            latent, source_step = d.initial_noise([task.seed]), 0
        elif task.start == d.num_steps:  # re-scoring: from the source's final latent, as the
            source_step, latent = d.num_steps, self.finals[task.source_candidate][None]  # engine
        else:
            source_step, latent = self.states[task.source_candidate]
            latent = latent.unsqueeze(0)
        if task.perturbation is not None:
            latent = apply_perturbations(latent, [task.perturbation],
                                         [task_generator(task.seed, "perturb")], d, [source_step])
        cond = [d.encode(task.prompt)]
        steps = [task_generator(task.seed, "steps")] if task.eta > 0 else None
        result = d.denoise(latent, cond, task.start, task.end, eta=task.eta, generators=steps)
        self.states[task.candidate] = (task.end, result.latents[0])
        nfe = task.denoise_nfe(d.num_steps)
        if self.fail(task):
            return Outcome(task.prompt_index, task.candidate, task.end, None, nfe=nfe,
                           error="scripted failure")
        if task.score_on is ScoreOn.NONE:
            return Outcome(task.prompt_index, task.candidate, task.end, None, nfe=nfe)
        scored = result.x0
        if task.score_on is ScoreOn.FINAL and task.end < d.num_steps:
            scored = d.denoise(result.latents, cond, task.end, d.num_steps, eta=task.eta,
                               generators=steps).latents
        if task.score_on is ScoreOn.FINAL:
            self.finals[task.candidate] = scored[0]
        name = task.verifier or self.guiding
        reward = float(FAKE_VERIFIERS[name](d.decode(scored))[0])
        return Outcome(task.prompt_index, task.candidate, task.end, reward, {name: reward},
                       nfe=nfe, verifier_calls=1)


@dataclass
class Play:
    rounds: list[tuple[list[Task], list[Outcome]]] = field(default_factory=list)
    nfe: int = 0
    """NFEs of every task asked (``Task.denoise_nfe``), what the engine would charge."""

    @property
    def tasks(self) -> list[Task]:
        return [task for tasks, _ in self.rounds for task in tasks]

    @property
    def outcomes(self) -> list[Outcome]:
        return [outcome for _, outcomes in self.rounds for outcome in outcomes]


def check_round(strategy: Strategy, tasks: Sequence[Task], steps: dict[int, int]) -> None:
    """The engine's expectations of one round; ``steps`` maps every candidate told so far to
    the step its state is at."""
    for task in tasks:
        assert task.candidate not in steps, f"candidate {task.candidate} asked twice"
        assert task.prompt_index == strategy.prompt_index and task.prompt == strategy.prompt
        if task.source_candidate is None:
            assert task.start == 0
            continue
        assert task.source_candidate in steps, (
            f"candidate {task.candidate} starts from {task.source_candidate}, not told yet")
        source_step = steps[task.source_candidate]
        if task.start == task.end == strategy.num_steps:
            continue  # a 0-NFE re-scoring: from the source's final latent, wherever it stopped
        if task.perturbation is not None and task.perturbation.kind is PerturbKind.RENOISE:
            assert task.perturbation.to_step == task.start < source_step
        else:
            assert source_step == task.start, (
                f"candidate {task.candidate} starts at {task.start}, its source is at "
                f"{source_step}")
    assert len({t.candidate for t in tasks}) == len(tasks), "one candidate twice in a round"


def play(strategy: Strategy, run: Callable[[Task], Outcome], max_rounds: int = 1000) -> Play:
    """Ask, run every task, tell, until done; check the contract on the way."""
    record = Play()
    steps: dict[int, int] = {}
    while not strategy.done:
        tasks = strategy.ask()
        if not tasks:
            break
        check_round(strategy, tasks, steps)
        record.nfe += sum(t.denoise_nfe(strategy.num_steps) for t in tasks)
        assert record.nfe <= strategy.budget_nfe, f"planned {record.nfe} > {strategy.budget_nfe}"
        outcomes = [run(task) for task in tasks]
        strategy.tell(outcomes)
        steps.update({t.candidate: t.end for t in tasks})
        record.rounds.append((tasks, outcomes))
        assert len(record.rounds) <= max_rounds, "the strategy does not finish"
    assert strategy.done and strategy.ask() == []
    return record


def scripted(reward: RewardFn) -> Callable[[Task], Outcome]:
    """A runner that answers each task with ``reward(task)`` (None: a failed candidate), or no
    reward for unscored tasks: strategy mechanics tested against known numbers."""

    def run(task: Task) -> Outcome:
        if task.score_on is ScoreOn.NONE:
            return Outcome(task.prompt_index, task.candidate, task.end, None)
        value = reward(task)
        if value is None:
            return Outcome(task.prompt_index, task.candidate, task.end, None,
                           error="scripted failure")
        return Outcome(task.prompt_index, task.candidate, task.end, value, {"scripted": value})

    return run


def common(num_steps: int = 20, budget: int = 400, seed: int = 7, prompt: str = "a red circle",
           prompt_index: int = 0) -> dict:
    """The engine's constructor arguments for one prompt."""
    return {"prompt_index": prompt_index, "prompt": prompt, "num_steps": num_steps,
            "budget_nfe": budget, "seed": seed}
