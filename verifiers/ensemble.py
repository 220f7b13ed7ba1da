"""``ensemble``: a weighted sum of several verifiers' scores.

Options::

    verifier:
      name: ensemble
      normalize: raw            # or rank
      members:
        - clip                                   # weight 1
        - {name: aesthetic, weights: /w/sac+logos+ava1-l14-linearMSE.pth, weight: 0.5}

Each member is a verifier spec (a name, or a mapping with ``name``, its options and optionally
``weight`` (default 1) and ``device``). Members are built once, with the ensemble's device unless
they name their own.

``normalize``:

- ``raw`` (default): sum of ``weight * score``. Row-independent like its members, but members'
  scales differ (CLIP ~30, aesthetic ~5, HPS ~0.3), so weights must absorb the scales.
- ``rank``: each member's scores are replaced by their rank within the batch, scaled to [0, 1]
  (ties share their mean rank; a batch of one scores 0.5), then weighted and summed. Scale-free,
  which is why the literature uses it for verifier ensembles, BUT a score then depends on its
  batch-mates. This breaks the Verifier contract on purpose: the engine must score the whole
  population of a prompt in ONE call (one chunk holding every candidate compared together);
  padded or split batches change the ranks. Scores are comparable only within one call, so do
  not mix rank-ensemble scores from different calls, and do not use rank mode to guide
  strategies that compare scores across generations (EvoSearch's archive, zero-order pivots).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from diffsearch.verifiers.base import Verifier, VerifierError

NORMALIZE_MODES = ("raw", "rank")


def batch_ranks(scores: torch.Tensor) -> torch.Tensor:
    """Ranks of ``scores`` in [0, 1] (lowest 0, highest 1), ties given their mean rank."""
    n = scores.shape[0]
    if n == 1:
        return torch.full_like(scores, 0.5)
    order = scores.argsort(stable=True)
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(n, dtype=scores.dtype)
    for value in scores.unique():
        tied = scores == value
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks / (n - 1)


class EnsembleVerifier(Verifier):
    """Weighted sum of member verifiers' scores, raw or rank-normalised per batch."""

    name: ClassVar[str] = "ensemble"
    input_size: ClassVar[int | None] = None

    def __init__(self, device: str | torch.device = "cpu", members: Sequence[Any] = (),
                 normalize: str = "raw", **options: Any) -> None:
        super().__init__(device, **options)
        from diffsearch.verifiers.registry import create_verifier

        if normalize not in NORMALIZE_MODES:
            raise VerifierError(f"ensemble: normalize must be one of {', '.join(NORMALIZE_MODES)},"
                                f" got {normalize!r}")
        if not members:
            raise VerifierError("ensemble: members must list at least one verifier spec")
        self.normalize = normalize
        self.members: list[tuple[Verifier, float]] = []
        for index, spec in enumerate(members):
            member_spec, weight = self._split_weight(spec, index)
            self.members.append((create_verifier(member_spec, device=self.device), weight))
        # An ensemble needs prompts as soon as one member does, and costs what its members do.
        self.needs_prompt = any(m.needs_prompt for m, _ in self.members)  # type: ignore[misc]
        self.calls_per_score = sum(m.calls_per_score for m, _ in self.members)

    @staticmethod
    def _split_weight(spec: Any, index: int) -> tuple[str | dict[str, Any], float]:
        if isinstance(spec, str):
            return spec, 1.0
        if not isinstance(spec, dict):
            raise VerifierError(f"ensemble: members[{index}] must be a name or a mapping, got "
                                f"{type(spec).__name__}")
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise VerifierError(f"ensemble: members[{index}].weight must be a number, got "
                                f"{weight!r}")
        return {k: v for k, v in spec.items() if k != "weight"}, float(weight)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        total = torch.zeros(images.shape[0], dtype=torch.float64)
        for member, weight in self.members:
            values = member.score(images, prompts).detach().to("cpu", torch.float64)
            if values.shape != total.shape:
                raise VerifierError(f"ensemble: member {member.name!r} returned shape "
                                    f"{tuple(values.shape)} for {images.shape[0]} images")
            if self.normalize == "rank":
                values = batch_ranks(values)
            total += weight * values
        return total.float()

    def describe(self) -> dict[str, Any]:
        return super().describe() | {
            "normalize": self.normalize,
            "members": [member.describe() | {"weight": weight}
                        for member, weight in self.members],
        }
