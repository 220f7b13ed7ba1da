"""The testbed's reward: r(x) = a.x on the point a Gaussian-mixture image encodes.

A linear reward keeps every tilted target p(x) exp(lam r(x)) / Z a Gaussian mixture
(:meth:`diffsearch.pipelines.gmm.GaussianMixture.tilted`) and the reward of a sample a 1-D
Gaussian mixture, so what a search should reach is known exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from diffsearch.pipelines.gmm import image_to_point
from diffsearch.verifiers.base import Verifier, VerifierError


class LinearReward(Verifier):
    """r(x) = direction . x, read from images made by
    :meth:`~diffsearch.pipelines.gmm.GmmDenoiser.decode`. Option: ``direction`` (one number
    per dimension of the point, at most 3)."""

    name = "gmm-linear"
    needs_prompt = False

    def __init__(self, device: str | torch.device = "cpu", *,
                 direction: Sequence[float]) -> None:
        super().__init__(device)
        if not 1 <= len(direction) <= 3 or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in direction):
            raise VerifierError(f"gmm-linear: direction must be 1 to 3 numbers, got "
                                f"{direction!r}")
        self.direction = [float(v) for v in direction]

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        points = image_to_point(images, len(self.direction))
        # One column at a time: a row's reward is the same sum wherever the row sits.
        return sum(points[:, i] * a for i, a in enumerate(self.direction))  # type: ignore[return-value]
