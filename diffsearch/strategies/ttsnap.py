"""TTSnap (noise-aware pruning): start many candidates, score their x0 estimates early, keep
the top share, and only let the survivors reach the end.

Round i denoises the survivors from the previous pruning step to ``prune_at[i]`` and scores the
decoded x0 estimate there (``ScoreOn.X0``); the top ``keep[i]`` share (rounded up, at least
one) goes on. The last round denoises the survivors to the end and scores the final images.
The reference schedule for 20 steps prunes at steps 2, 6, 11 keeping 40%, 40%, 50%, so 8% of
the candidates are finished; for other T the steps are scaled (steps that collide are merged,
their shares multiplied, so the same fraction survives).

Pruning counts do not depend on scores, so the whole cost is known up front and the number of
starting candidates ``n`` is the largest the budget pays for: n * k1 + n1 * (k2 - k1) + ...
+ n_last * (T - k_last). Failed or unscored candidates never survive a pruning.

``verifiers`` maps a pruning step to the verifier that scores there (TTSnap's per-level
distilled noise-aware checkpoints); unmapped steps and the final images use the job's
guiding verifier. It may also be the folder ``diffsearch distill`` wrote: its
``distilled.json`` maps each step to a checkpoint folder, and those steps must be exactly the
pruning steps (a checkpoint scores well only at the noise level it was trained for).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from diffsearch.strategies import options
from diffsearch.strategies.common import RoundStrategy, kept, ranked
from diffsearch.tasks import Outcome, ScoreOn, Task

REFERENCE_STEPS = 20
REFERENCE_PRUNE_AT = (2, 6, 11)
REFERENCE_KEEP = (0.4, 0.4, 0.5)
DISTILLED_MANIFEST = "distilled.json"
"""The file ``diffsearch distill`` writes into its output folder (see diffsearch/distill.py)."""


def default_schedule(num_steps: int) -> tuple[list[int], list[float]]:
    """The reference pruning steps scaled to ``num_steps`` (half up, within 1..T-1); shares of
    steps that land on the same step are multiplied."""
    steps: list[int] = []
    shares: list[float] = []
    for step, share in zip(REFERENCE_PRUNE_AT, REFERENCE_KEEP):
        scaled = min(max(int(step * num_steps / REFERENCE_STEPS + 0.5), 1), num_steps - 1)
        if scaled < 1:  # T = 1: nowhere to prune
            continue
        if steps and steps[-1] == scaled:
            shares[-1] *= share
        else:
            steps.append(scaled)
            shares.append(share)
    return steps, shares


def distilled_verifiers(folder: str | os.PathLike[str], num_steps: int) -> dict[int, str]:
    """Pruning step -> absolute checkpoint folder, from a ``diffsearch distill`` output folder
    distilled for ``num_steps`` steps (checked: step k of 20 is not step k of 50)."""
    root = Path(folder).expanduser()
    manifest = root / DISTILLED_MANIFEST
    if not manifest.is_file():
        raise options.OptionError("verifiers", f"{str(folder)!r} is neither a mapping of pruning "
                                               f"step to verifier nor a folder holding "
                                               f"{DISTILLED_MANIFEST}")
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
        steps, distilled_for = data["steps"], data["num_steps"]
        mapping = {int(step): str((root / name).resolve()) for step, name in steps.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise options.OptionError("verifiers", f"{manifest} is not a distill manifest with "
                                               f"'steps' and 'num_steps' "
                                               f"({type(error).__name__}: {error})") from None
    if distilled_for != num_steps:
        raise options.OptionError("verifiers", f"{root} was distilled for {distilled_for} "
                                               f"denoising steps, this run has {num_steps}")
    return mapping


def survivors(n: int, keep: Sequence[float]) -> list[int]:
    """How many candidates are alive after each pruning, starting from ``n``."""
    counts = []
    for share in keep:
        n = kept(share, n)
        counts.append(n)
    return counts


def plan_cost(n: int, prune_at: Sequence[int], keep: Sequence[float], num_steps: int) -> int:
    """NFEs of starting ``n`` candidates: each segment's length times the candidates that run
    it (all n up to the first pruning step, then the survivors of each)."""
    boundaries = [0, *prune_at, num_steps]
    alive = [n, *survivors(n, keep)]
    return sum(count * (b - a) for count, a, b in zip(alive, boundaries, boundaries[1:]))


class TTSnap(RoundStrategy):
    """TTSnap; see the module docstring. Options: ``prune_at`` (pruning steps), ``keep`` (share
    kept at each, a number or one per step; required with a custom ``prune_at``), ``n``
    (starting candidates; the most the budget pays for), ``verifiers`` (step -> verifier, or a
    ``diffsearch distill`` output folder)."""

    name = "ttsnap"
    sampler_needs = frozenset({"resume"})
    option_checks = {
        "prune_at": options.rule(options.integer_list, minimum=1, order="increasing",
                                 allow_none=True),
        "keep": options.rule(options.number_or_list, low=0.0, high=1.0, low_open=True,
                             allow_none=True),
        "n": options.rule(options.integer, minimum=1, allow_none=True),
        "verifiers": options.rule(options.step_mapping, allow_none=True),
    }

    def __init__(
        self, *, prune_at: Sequence[int] | None = None, keep: float | Sequence[float] | None = None,
        n: int | None = None, verifiers: Mapping[int, str] | str | os.PathLike[str] | None = None,
        **common: Any,
    ) -> None:
        super().__init__(**common)
        t = self.num_steps
        if prune_at is None:
            self.prune_at, default_keep = default_schedule(t)
        else:
            if prune_at[-1] >= t:
                raise options.OptionError("prune_at", f"steps must be below the model's {t} "
                                                      f"steps, got {list(prune_at)}")
            if keep is None:
                raise options.OptionError("keep", "required with a custom prune_at (the share "
                                                  "kept at each pruning step)")
            self.prune_at = list(prune_at)
        self.keep = (default_keep if keep is None else
                     options.number_list("keep", keep, len(self.prune_at)))
        if isinstance(verifiers, (str, os.PathLike)):
            verifiers = self._distilled(verifiers)
        self.verifiers = self._check_verifiers(verifiers or {})
        unit = plan_cost(1, self.prune_at, self.keep, t)
        if unit > self.budget_nfe:
            raise ValueError(f"budget of {self.budget_nfe} NFE cannot pay for one candidate "
                             f"({unit} NFE)")
        if n is None:
            self.n = 1
            while plan_cost(self.n + 1, self.prune_at, self.keep, t) <= self.budget_nfe:
                self.n += 1
        else:
            cost = plan_cost(n, self.prune_at, self.keep, t)
            if cost > self.budget_nfe:
                raise options.OptionError("n", f"{n} needs {cost} NFE, over the budget of "
                                               f"{self.budget_nfe}")
            self.n = n
        self.counts = survivors(self.n, self.keep)
        self._alive: list[int] = []
        """Candidates whose state at the last pruning step the next round continues."""

    def named_verifiers(self) -> dict[str, str]:
        return {**super().named_verifiers(),
                **{f"verifiers.{step}": spec for step, spec in self.verifiers.items()}}

    def _distilled(self, folder: str | os.PathLike[str]) -> dict[int, str]:
        """The checkpoints of a distill output folder, which must cover exactly the pruning
        steps."""
        mapping = distilled_verifiers(folder, self.num_steps)
        if sorted(mapping) != self.prune_at:
            raise options.OptionError(
                "verifiers", f"{folder} has checkpoints for steps {sorted(mapping)} but TTSnap "
                             f"prunes at {self.prune_at}; distil at these steps or set prune_at "
                             f"to match")
        return mapping

    def _check_verifiers(self, verifiers: Mapping[int, str]) -> dict[int, str]:
        """Checked names by step (see :func:`~diffsearch.strategies.options.step_mapping`);
        here every step must be a pruning step."""
        for step in verifiers:
            if step not in self.prune_at:
                raise options.OptionError(f"verifiers.{step}", f"step {step} is not a pruning "
                                                               f"step {self.prune_at}")
        return dict(verifiers)

    def _next_round(self) -> list[Task]:
        i = self._rounds_told
        start = 0 if i == 0 else self.prune_at[i - 1]
        if i < len(self.prune_at):
            end, score_on = self.prune_at[i], ScoreOn.X0
            verifier = self.verifiers.get(end)
        else:
            end, score_on, verifier = self.num_steps, ScoreOn.FINAL, None
        if i == 0:
            return [self._task(start=0, end=end, score_on=score_on, verifier=verifier)
                    for _ in range(self.n)]
        return [self._task(start=start, end=end, score_on=score_on, verifier=verifier,
                           source=candidate) for candidate in self._alive]

    def _receive(self, tasks: Sequence[Task], outcomes: Sequence[Outcome]) -> None:
        i = self._rounds_told
        if i == len(self.prune_at):
            self._finish()
            return
        self._alive = [o.candidate for o in ranked(outcomes)[: self.counts[i]]]
        if not self._alive:  # every candidate failed
            self._finish()
