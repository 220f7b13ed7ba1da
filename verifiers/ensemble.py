"""``ensemble``: a weighted sum of several verifiers' scores.

Options::

    verifier:
      name: ensemble
      normalize: raw            # or rank, or calibrated
      members:
        - clip                                   # weight 1
        - {name: aesthetic, weights: /w/sac+logos+ava1-l14-linearMSE.pth, weight: 0.5}

Each member is a verifier spec (a name, or a mapping with ``name``, its options and optionally
``weight`` (default 1), ``device`` and, for ``calibrated``, ``reference``). Members are built
once, with the ensemble's device unless they name their own.

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
- ``calibrated``: each member's score is mapped through a fixed calibration distribution, the
  empirical CDF of that member's scores on a reference set (its ``reference``), so it becomes
  "the share of reference images this one beats", in [0, 1], then weighted and summed.
  Scale-free like ``rank`` and row-independent like ``raw`` (a score depends only on the image
  and the reference), so it can guide any strategy. ``reference`` is a list of scores, or a
  JSON file holding one, or a diffsearch ``results.json`` (every candidate's score under the
  member's label: run best-of-N with the members as ``eval_verifiers`` on prompts like the
  ones to search, and point each member at that file).

  The trade-off: the reference must look like what is scored (the same model, prompts like
  these); and it has a resolution of 1/n for n reference scores. Search pushes candidates into
  the reference's top tail and past its maximum, where the CDF is nearly flat: past the maximum
  a member adds at most 0.5/n more (an exponential tail with the reference's top spacing keeps
  the order strict), so a member the search has saturated stops steering it and the members
  still inside their reference range decide. That is what keeps one hacked member from
  dominating, and also why a reference of the model's *best* samples (best-of-N winners, not
  only plain samples) keeps more resolution where the search operates.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from diffsearch.verifiers.base import Verifier, VerifierError

NORMALIZE_MODES = ("raw", "rank", "calibrated")
_TAIL_GAPS = 10
"""How many of the reference's outermost spacings set the tails' scale past its range."""


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


class Calibration:
    """A member's fixed calibration: the empirical CDF of its reference scores.

    Reference score i of n (sorted) sits at probability (i + 0.5) / n (tied scores share their
    mean position); between them the CDF is linear; past either end it approaches 0 or 1
    exponentially, with the mean of the outermost spacings as scale, so it stays strictly
    increasing and continuous.
    """

    def __init__(self, scores: Sequence[float], what: str) -> None:
        values = np.sort(np.asarray(scores, dtype=np.float64))
        if values.ndim != 1 or not np.isfinite(values).all() or len(np.unique(values)) < 2:
            raise VerifierError(f"ensemble: {what} needs at least two distinct finite scores")
        n = len(values)
        self.points, first = np.unique(values, return_index=True)
        counts = np.diff(np.append(first, n))
        self.positions = (first + (counts - 1) / 2 + 0.5) / n  # mean position of each tie
        gaps = np.diff(self.points)
        k = min(_TAIL_GAPS, len(gaps))
        self.low_scale, self.high_scale = gaps[:k].mean(), gaps[-k:].mean()
        self.size = n

    def __call__(self, scores: torch.Tensor) -> torch.Tensor:
        x = scores.detach().to("cpu", torch.float64).numpy()
        p = np.interp(x, self.points, self.positions)
        low, high = self.points[0], self.points[-1]
        below, above = x < low, x > high
        p[below] = self.positions[0] * np.exp((x[below] - low) / self.low_scale)
        p[above] = 1 - (1 - self.positions[-1]) * np.exp(-(x[above] - high) / self.high_scale)
        return torch.from_numpy(p)


def load_reference(reference: Any, label: str, what: str) -> list[float]:
    """Reference scores from a list, a JSON file of a list, or a results.json (every
    candidate's score under ``label``)."""
    if isinstance(reference, (str, Path)):
        path = Path(reference).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise VerifierError(f"ensemble: {what}: cannot read {path} as JSON "
                                f"({type(error).__name__})") from None
        if isinstance(data, dict) and isinstance(data.get("prompts"), list):
            data = [c["scores"][label] for p in data["prompts"] for c in p.get("candidates", [])
                    if isinstance(c.get("scores"), dict) and label in c["scores"]]
            if not data:
                raise VerifierError(f"ensemble: {what}: {path} holds no candidate scored by "
                                    f"{label!r} (add it to the run's eval_verifiers)")
        reference = data
    if (isinstance(reference, (str, bytes)) or not isinstance(reference, Sequence)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                       for v in reference)):
        raise VerifierError(f"ensemble: {what} must be a list of scores, a JSON file of one, or "
                            f"a results.json")
    return [float(v) for v in reference]


class EnsembleVerifier(Verifier):
    """Weighted sum of member verifiers' scores: raw, rank-normalised per batch, or calibrated
    by each member's fixed reference distribution."""

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
        self.calibrations: list[Calibration] = []
        for index, spec in enumerate(members):
            member_spec, weight = self._split_weight(spec, index)
            reference = None
            if isinstance(member_spec, dict):
                reference = member_spec.pop("reference", None)
            what = f"members[{index}].reference"
            if normalize == "calibrated":
                if reference is None:
                    raise VerifierError(f"ensemble: {what} is required by normalize: "
                                        f"calibrated (the member's scores on a reference set)")
                label = member_spec.get("label") or member_spec["name"]  # type: ignore[union-attr]
                self.calibrations.append(Calibration(load_reference(reference, label, what),
                                                     what))
            elif reference is not None:
                raise VerifierError(f"ensemble: {what} is used only by normalize: calibrated, "
                                    f"not {normalize!r}")
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
        for index, (member, weight) in enumerate(self.members):
            values = member.score(images, prompts).detach().to("cpu", torch.float64)
            if values.shape != total.shape:
                raise VerifierError(f"ensemble: member {member.name!r} returned shape "
                                    f"{tuple(values.shape)} for {images.shape[0]} images")
            if self.normalize == "rank":
                values = batch_ranks(values)
            elif self.normalize == "calibrated":
                values = self.calibrations[index](values)
            total += weight * values
        return total.float()

    def describe(self) -> dict[str, Any]:
        return super().describe() | {
            "normalize": self.normalize,
            "members": [member.describe() | {"weight": weight}
                        | ({"reference_size": self.calibrations[i].size}
                           if self.calibrations else {})
                        for i, (member, weight) in enumerate(self.members)],
        }
