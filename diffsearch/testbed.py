"""The exact-target testbed: real strategies, through the real engine, on a model whose every
answer is known in closed form.

The model is :class:`~diffsearch.pipelines.gmm.GmmDenoiser` on a 2-D Gaussian mixture (its
denoiser is the exact posterior mean), the guide is the linear reward r(x) = a.x
(:class:`~diffsearch.verifiers.gmm.LinearReward`). Hence:

- the tilted target p(x) exp(lam r(x)) / Z is a Gaussian mixture
  (:meth:`~diffsearch.pipelines.gmm.GaussianMixture.tilted`), which Feynman-Kac steering with
  the "diff" potential and ``lam`` must sample;
- the reward of a base sample is a 1-D Gaussian mixture, so the expected best of N samples is an
  integral (:func:`diffsearch.testbed_stats.expected_max`), which best-of-N must hit and search
  at the same NFE should beat.

Each prompt of a testbed job is one independent run of the strategy (the model ignores the
text; its seeds come from it). The runtime is registered in-process
(:func:`~diffsearch.runtime.register_runtime`), so jobs run with the local executor only; every
other part (strategies, engine, packing, store, results) is the production code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from diffsearch import run_folder
from diffsearch.api import run_job
from diffsearch.job import Job
from diffsearch.pipelines.gmm import GaussianMixture, GmmDenoiser
from diffsearch.results import PromptResult, RunResult
from diffsearch.runtime import RuntimeSpec, WorkerRuntime, register_runtime
from diffsearch.store import CandidateRecord, RunStore, read_latent_rows
from diffsearch.verifiers.base import Verifier, VerifierError
from diffsearch.verifiers.gmm import LinearReward

MODEL = "gmm-testbed"
"""The job's model name: held in-process once :func:`install` registers it."""

MIXTURE = GaussianMixture.of(
    weights=[0.45, 0.3, 0.15, 0.1],
    means=[[-2.0, 0.0], [0.0, 2.0], [0.0, -2.0], [2.0, 0.5]],
    covariances=[[[0.25, 0.0], [0.0, 0.25]], [[0.3, 0.1], [0.1, 0.2]],
                 [[0.2, -0.05], [-0.05, 0.3]], [[0.15, 0.0], [0.0, 0.35]]],
)
"""Four modes; the one the reward favours (right, x = 2) holds only 10% of the mass, so the
tilted target differs from p in which mode dominates, not only by a shift."""


@dataclass(frozen=True)
class GmmTestbed:
    """A mixture, a linear reward's direction, the tilt's lam and the sampler's steps."""

    mixture: GaussianMixture = MIXTURE
    direction: tuple[float, ...] = (1.0, 0.0)
    lam: float = 1.0
    """The tilt of the target, and the FK strategy's ``lam``."""
    num_steps: int = 100
    """DDIM steps: enough that the sampler's own bias is far below the benchmark's intervals
    (docs/testbed.md gives the measured figures)."""
    compute_batch: int = 64

    def __post_init__(self) -> None:
        if len(self.direction) != self.mixture.dim:
            raise ValueError(f"direction: the reward needs {self.mixture.dim} numbers, one per "
                             f"dimension of the mixture; got {len(self.direction)}")

    @property
    def target(self) -> GaussianMixture:
        """p(x) exp(lam a.x) / Z, in closed form."""
        return self.mixture.tilted(self.direction, self.lam)

    @property
    def verifier_spec(self) -> dict[str, Any]:
        return {"name": LinearReward.name, "direction": list(self.direction)}

    def job(self, strategy: str, *, budget: str | int, runs: int, seed: int = 0,
            options: dict[str, Any] | None = None) -> Job:
        """A job of ``runs`` independent runs (prompts) of ``strategy`` on this testbed."""
        return Job.model_validate({
            "prompts": [f"run {i}" for i in range(runs)], "model": MODEL,
            "strategy": {"name": strategy, **(options or {})}, "budget": budget,
            "verifier": self.verifier_spec, "seed": seed, "num_steps": self.num_steps,
            "compute_batch": self.compute_batch, "threads": 1, "executor": "local",
            "images": "none", "batch_size": 64,
        })

    def denoiser(self) -> GmmDenoiser:
        return GmmDenoiser(self.mixture, num_steps=self.num_steps,
                           compute_batch=self.compute_batch)

    def install(self, job: Job) -> None:
        """Register this testbed's model and reward as this process's runtime for ``job``.

        The job names the model only as ``gmm-testbed``: the mixture is this testbed's, so
        whoever runs a testbed job registers first (:meth:`run` does)."""
        register_runtime(WorkerRuntime(RuntimeSpec.from_job(job), self.denoiser(),
                                       self._create_verifier))

    def _create_verifier(self, spec: str | dict[str, Any], device: str = "cpu") -> Verifier:
        options = dict(spec) if isinstance(spec, dict) else {"name": spec}
        if options.pop("name") != LinearReward.name:
            raise VerifierError(f"the testbed scores with {LinearReward.name} only")
        return LinearReward(device, **options)

    def run(self, strategy: str, out: str | Path, *, budget: str | int, runs: int, seed: int = 0,
            options: dict[str, Any] | None = None) -> GmmRun:
        """Run the job through :func:`~diffsearch.api.run_job` and read back what it found."""
        job = self.job(strategy, budget=budget, runs=runs, seed=seed, options=options)
        self.install(job)
        return GmmRun.read(run_job(job, out), self.num_steps)


@dataclass(frozen=True)
class RunOfPrompt:
    """What one prompt's run returned."""

    best_reward: float
    """The strategy's answer's reward."""
    final_points: np.ndarray
    """(n, d): the points of its candidates that ended at the last step (best-of-N: every
    sample; particles: the final population)."""
    final_rewards: np.ndarray
    """(n,) their rewards."""
    parent_rewards: np.ndarray
    """(n,) their parents' rewards (NaN without a parent): for particles, the x0-estimate
    rewards of the last resampling, which the final importance weights need."""


@dataclass(frozen=True)
class GmmRun:
    result: RunResult
    prompts: list[RunOfPrompt] = field(default_factory=list)

    @classmethod
    def read(cls, result: RunResult, num_steps: int) -> GmmRun:
        """Each prompt's answer and final candidates, their points read from the store in one
        pass."""
        with RunStore.open(result.run_dir / run_folder.STORE, writable=False) as store:
            finals = [[c for c in p.candidates if c.step == num_steps and c.error is None]
                      for p in result.prompts]
            refs = [store.latent_ref(p.prompt_index, c.candidate)
                    for p, chosen in zip(result.prompts, finals) for c in chosen]
            dim = int(np.prod(store.latent_shape))
            points = read_latent_rows(store.path, refs).numpy().reshape(len(refs), dim)
        prompts, begin = [], 0
        for p, chosen in zip(result.prompts, finals):
            prompts.append(_prompt_run(p, chosen, points[begin : begin + len(chosen)]))
            begin += len(chosen)
        return cls(result, prompts)

    def fk_log_weights(self, lam: float) -> list[np.ndarray]:
        """Per run, FK steering's final log importance weights of the final particles (the
        "diff" potential): lam (r(x_T) - r at the last resampling), which makes the population
        a weighted sample of p exp(lam r) / Z. Without a resampling the parent reward is the
        potential's start, 0."""
        return [lam * (p.final_rewards - np.nan_to_num(p.parent_rewards, nan=0.0))
                for p in self.prompts]

    @property
    def best_rewards(self) -> np.ndarray:
        return np.array([p.best_reward for p in self.prompts])

    @property
    def nfe_per_run(self) -> float:
        return self.result.nfe / len(self.prompts)


def _prompt_run(prompt: PromptResult, finals: list[CandidateRecord], points: np.ndarray
                ) -> RunOfPrompt:
    best = prompt.best
    if best is None or best.reward is None:
        raise RuntimeError(f"prompt {prompt.prompt_index} has no scored answer")
    by_id = {c.candidate: c for c in prompt.candidates}
    parents = [None if c.parent is None else by_id.get(c.parent) for c in finals]
    return RunOfPrompt(
        best_reward=best.reward, final_points=points.astype(np.float64),
        final_rewards=np.array([c.reward for c in finals], dtype=np.float64),
        parent_rewards=np.array([np.nan if p is None or p.reward is None else p.reward
                                 for p in parents], dtype=np.float64))
