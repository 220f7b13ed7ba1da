"""The records the engine, workers and store exchange: what to compute (:class:`Task`) and what
came of it (:class:`Outcome`).

They are frozen data (plus the little they imply: a task's NFE cost, whether an outcome
succeeded), kept apart from the strategies so that the runtime, the store, the executors and the
frame-chain adapter speak them without importing the search code. Strategies make Tasks and read
Outcomes (:mod:`diffsearch.strategies.base`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class ScoreOn(str, Enum):
    """What a task's verifiers look at."""

    NONE = "none"
    """Not scored (an intermediate state whose fitness is measured elsewhere)."""
    X0 = "x0"
    """The decoded x0 (Tweedie) estimate at ``end``: cheap, noisy (TTSnap, FK steering)."""
    FINAL = "final"
    """The final image: the state at ``end`` is rolled out to the last step and decoded
    (EvoSearch fitness, best-of-N). The rollout's NFEs count towards the task."""
    CLIP = "clip"
    """A frame-chain clip (Tree-of-Frames): the task's state at ``end`` (which must be the last
    step) is the last frame, its ancestors through ``parent`` links are the earlier ones; the
    decoded clip is scored by a video verifier against the prompt the run stores for
    ``prompt_index`` (the clip prompt, not ``Task.prompt``, which is this frame's)."""


class PerturbKind(str, Enum):
    NOISE_MUTATION = "noise_mutation"
    """x' = sqrt(1 - b^2) x + b eps at step 0: keeps x ~ N(0, I) (EvoSearch, zero-order)."""
    STEP_NOISE = "step_noise"
    """x' = x + b * sigma_k eps with sigma_k the sampler's own step std (EvoSearch at k > 0)."""
    RENOISE = "renoise"
    """Forward-diffuse from the source's step back to ``to_step`` (search over paths)."""
    NEIGHBOUR = "neighbour"
    """y = |n| (c u + sqrt(1 - c^2) w) at fixed cosine c = strength (zero-order search)."""


@dataclass(frozen=True)
class Perturbation:
    kind: PerturbKind
    strength: float = 0.0
    to_step: int | None = None
    """Only for RENOISE: the (noisier) step the latent is moved back to; the task's ``start``."""


@dataclass(frozen=True)
class Task:
    """One candidate to produce: where it starts, what is done to it, where it stops.

    Exactly one of ``source_candidate`` (start from that stored candidate's latent, which is at
    step ``start``, or at a later step for RENOISE) and "from noise" (``source_candidate is None``:
    the initial noise drawn from ``seed``, ``start == 0``) applies. ``seed`` also seeds the
    perturbation and any stochastic steps (``eta > 0``) through :func:`diffsearch.seeding
    .derive_seed`, so the task alone determines its result.
    """

    prompt_index: int
    prompt: str
    candidate: int
    seed: int
    start: int
    end: int
    parent: int | None = None
    source_candidate: int | None = None
    perturbation: Perturbation | None = None
    eta: float = 0.0
    score_on: ScoreOn = ScoreOn.FINAL
    verifier: str | None = None
    """Name of the guiding verifier to use instead of the job's (e.g. a noise-aware checkpoint
    for this step); None means the job's guiding verifier."""

    def __post_init__(self) -> None:
        if not 0 <= self.start <= self.end:
            raise ValueError(f"task needs 0 <= start <= end, got {self.start} -> {self.end}")
        if self.source_candidate is None and self.start != 0:
            raise ValueError("a task that starts from noise must start at step 0")

    def denoise_nfe(self, num_steps: int, nfe_per_step: int = 1) -> int:
        """NFEs this task spends: its own steps plus the rollout to the end when scored FINAL."""
        last = num_steps if self.score_on is ScoreOn.FINAL else self.end
        return (last - self.start) * nfe_per_step


@dataclass(frozen=True)
class Outcome:
    """What a worker returns for one task: small numbers, never tensors."""

    prompt_index: int
    candidate: int
    step: int
    reward: float | None
    """The guiding verifier's score (None when not scored or failed). Strategies rank by it."""
    scores: dict[str, float] = field(default_factory=dict)
    """Every verifier's score by name, guiding and evaluation ones."""
    nfe: int = 0
    rows: int = 0
    """Rows the model computed for this task: its equal share of its work unit's forward-pass
    rows, padding included (``nfe`` is what the task charges; ``rows`` what running it cost)."""
    verifier_calls: int = 0
    error: str | None = None
    """Why the candidate failed (NaN latents, a verifier exception); None when it succeeded."""
    timings: dict[str, float] = field(default_factory=dict)
    usage: dict[str, dict[str, int]] = field(default_factory=dict)
    """What verifiers reported spending (requests, tokens) while its work unit ran, by verifier
    label; carried by one outcome of the unit, so summing over outcomes counts it once."""

    @property
    def ok(self) -> bool:
        return self.error is None
