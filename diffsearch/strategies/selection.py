"""Which finished candidate a strategy returns: the ``select`` option every round-based strategy
takes.

The guide's argmax is the default and what every strategy did before this option existed. It
is also what a search over-optimises: the more candidates compared, the more the winner is the
one whose guide score errs most in its favour (reward hacking; the analysis of reward
misspecification in inference-time scaling predicts a finite best N and a best temperature
once the guide differs from the truth). The other methods trade some guide score for a pick the
guide alone does not decide::

    select: {method: argmax}                                  # the default
    select: {method: softmax, temperature: 0.02, top: 8}      # sample by exp(reward / T)
    select: {method: agreement, verifiers: [clip, pickscore], top: 4}
    select: {method: held-out, verifiers: [imagereward], top: 4}

- ``softmax``: one of the ``top`` best answers (all of them without ``top``), drawn with
  probability proportional to ``exp(reward / temperature)``; ``temperature`` is in the guide's
  units (a cosine-similarity guide spans ~0.1 between good and bad images). The draw is seeded
  from the job seed and the prompt, so a run and its resume pick the same candidate.
- ``agreement``: the guide's ``top`` answers are re-scored by each of ``verifiers``; each
  verifier and the guide rank them, and the lowest mean rank wins (the guide's order breaks
  ties).
- ``held-out``: the guide's ``top`` answers are re-scored by the one verifier named, used only
  for this pick; its best wins (the guide's order breaks ties).

Re-scoring costs no NFE: a task with ``start == end ==`` the last step starts from its source's
final latent (the engine reads the rolled-out one when the source's task stopped earlier, as
EvoSearch's earlier generations and zero-order's noises do), decodes it and scores it with the
task's own verifier. Every answer is scored on its final image, so every one can be re-scored
(see :func:`rescorable`). An answer whose re-scoring failed is left out of the pick; if none is
left, the guide's argmax is returned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from diffsearch.seeding import derive_seed, numpy_rng
from diffsearch.strategies import options
from diffsearch.tasks import Outcome

METHODS = ("argmax", "softmax", "agreement", "held-out")
_FIELDS = {
    "argmax": (),
    "softmax": ("temperature", "top"),
    "agreement": ("verifiers", "top"),
    "held-out": ("verifiers", "top"),
}
"""The fields each method takes besides ``method`` (any other is refused: none is ignored)."""
DEFAULT_TOP = 4
"""How many of the guide's best answers agreement and held-out re-score when ``top`` is unset."""


@dataclass(frozen=True)
class Selection:
    """A checked ``select`` option (see the module docstring)."""

    method: str = "argmax"
    temperature: float | None = None
    verifiers: tuple[str, ...] = ()
    top: int | None = None

    @property
    def rescores(self) -> bool:
        """Whether the pick needs other verifiers' scores (an extra round of 0-NFE tasks)."""
        return bool(self.verifiers)

    def named_verifiers(self) -> dict[str, str]:
        """The verifiers it names, by option path (for the allow-lists)."""
        return {f"select.verifiers.{i}": name for i, name in enumerate(self.verifiers)}


ARGMAX = Selection()


def check_select(name: str, value: Any) -> Selection:
    """A ``select`` mapping checked field by field (an unknown field, or one the method does
    not use, is refused by name)."""
    if isinstance(value, Selection):
        return value
    if not isinstance(value, Mapping):
        raise options.OptionError(name, f"must be a mapping with 'method' (one of "
                                        f"{', '.join(METHODS)}), got {value!r}")
    method = options.choice(f"{name}.method", value.get("method", "argmax"), choices=METHODS)
    allowed = _FIELDS[method]
    for key in value:
        if key != "method" and key not in allowed:
            takes = ", ".join(allowed) if allowed else "no other field"
            raise options.OptionError(f"{name}.{key}", f"not used by method {method!r} "
                                                       f"(it takes: {takes})")
    temperature = None
    if method == "softmax":
        if "temperature" not in value:
            raise options.OptionError(f"{name}.temperature", "required by method 'softmax' "
                                                             "(in the guide's reward units)")
        temperature = options.number(f"{name}.temperature", value["temperature"], low=0.0,
                                     low_open=True)
    verifiers: tuple[str, ...] = ()
    if "verifiers" in allowed:
        if "verifiers" not in value:
            raise options.OptionError(f"{name}.verifiers", f"required by method {method!r}")
        verifiers = tuple(options.text_list(f"{name}.verifiers", value["verifiers"]))
        if method == "held-out" and len(verifiers) != 1:
            raise options.OptionError(f"{name}.verifiers", f"held-out names exactly one "
                                                           f"verifier, got {len(verifiers)}")
    top = None
    if "top" in value:
        top = options.integer(f"{name}.top", value["top"],
                              minimum=2 if method == "agreement" else 1)
    elif method in ("agreement", "held-out"):
        top = DEFAULT_TOP
    return Selection(method, temperature, verifiers, top)


def rescorable(answer: Outcome) -> bool:
    """Whether a 0-NFE task can re-score ``answer``: it finished and was scored (an answer is
    scored on its final image, so its final latent is stored)."""
    return answer.ok and answer.reward is not None


def to_rescore(selection: Selection, ranked_answers: Sequence[Outcome]) -> list[Outcome]:
    """The answers whose re-scoring decides the pick: the guide's ``top`` best re-scorable
    ones, best first ([] for the methods that need no other verifier)."""
    if not selection.rescores:
        return []
    eligible = [a for a in ranked_answers if rescorable(a)]
    return eligible[: selection.top]


def pick(selection: Selection, ranked_answers: Sequence[Outcome],
         rescored: Mapping[int, Mapping[str, float]], *, seed: int,
         prompt: str) -> Outcome | None:
    """The returned answer.

    ``ranked_answers``: the scored answers, best first by the guide (``ranked``);
    ``rescored``: by answer candidate, each re-scoring verifier's score (a verifier missing
    for a candidate: its re-scoring failed).
    """
    if not ranked_answers:
        return None
    method = selection.method
    if method == "argmax":
        return ranked_answers[0]
    if method == "softmax":
        pool = ranked_answers[: selection.top]
        rewards = np.array([a.reward for a in pool], dtype=np.float64)
        weights = np.exp((rewards - rewards.max()) / selection.temperature)
        rng = numpy_rng(derive_seed(seed, prompt, -1, "select/softmax"))
        return pool[int(rng.choice(len(pool), p=weights / weights.sum()))]
    pool = [a for a in ranked_answers
            if a.candidate in rescored
            and all(v in rescored[a.candidate] for v in selection.verifiers)]
    if not pool:
        return ranked_answers[0]
    if method == "held-out":
        (judge,) = selection.verifiers
        return max(pool, key=lambda a: (rescored[a.candidate][judge], -pool.index(a)))
    columns = [[-float(a.reward) for a in pool]]  # type: ignore[arg-type]
    columns += [[-rescored[a.candidate][v] for a in pool] for v in selection.verifiers]
    ranks = np.mean([_ranks(column) for column in columns], axis=0)
    return pool[int(np.argmin(ranks))]  # argmin takes the first of ties: the guide's order


def _ranks(values: Sequence[float]) -> np.ndarray:
    """0 for the smallest value, ties sharing their mean rank."""
    array = np.asarray(values, dtype=np.float64)
    order = array.argsort(kind="stable")
    ranks = np.empty(len(array))
    ranks[order] = np.arange(len(array), dtype=np.float64)
    for value in np.unique(array):
        tied = array == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks

