"""An example verifier plugin: how red an image, or its central square, is.

It is deliberately simple so that its behaviour is obvious (a red image beats a blue one), yet it
is a complete plugin: options from the job file, input checks, a prompt-free judge, and scores
that do not depend on the other images in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from diffsearch.verifiers.base import Verifier, VerifierError


class RednessVerifier(Verifier):
    """mean(R - (G + B) / 2) over the central ``centre`` fraction of the image: 1 for pure red,
    0 for any grey, -0.5 for pure green or blue."""

    name: ClassVar[str] = "redness"
    needs_prompt: ClassVar[bool] = False

    def __init__(self, device: str | torch.device = "cpu", centre: float = 1.0,
                 **options: Any) -> None:
        super().__init__(device, **options)
        if not 0 < centre <= 1:
            raise VerifierError(f"redness: centre must be in (0, 1], got {centre}")
        self.centre = float(centre)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise VerifierError(f"redness: images must be (B, 3, H, W), got {tuple(images.shape)}")
        height, width = images.shape[-2:]
        crop_h = max(1, round(height * self.centre))
        crop_w = max(1, round(width * self.centre))
        top, left = (height - crop_h) // 2, (width - crop_w) // 2
        x = images[..., top:top + crop_h, left:left + crop_w].to(self.device).float()
        red, green, blue = x[:, 0], x[:, 1], x[:, 2]
        return (red - (green + blue) / 2).mean(dim=(1, 2)).cpu()

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"centre": self.centre}
