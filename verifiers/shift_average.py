"""``shift-average``: a verifier's score averaged over slightly shifted copies of each image.

Options::

    verifier:
      name: shift-average
      verifier: shapes-clip      # any image verifier spec: a name or a mapping with options
      offsets: [1, 2]            # default [1]

Each image is scored as it is and shifted up, down, left and right by each offset, counted in
the inner verifier's own input pixels (an offset of 1 moves a 1024-pixel image by 1024 / 224
pixels for a 224-pixel CLIP; in image pixels when the verifier takes any size). The edge pixels
are repeated into the uncovered strip. The score is the mean of those 1 + 4 * len(offsets)
scores.

Why: a search returns the candidate whose guide score errs most in its favour, and much of a
learned judge's error is specific to the exact pixels it sees (reward hacking at its smallest
scale). A shift of a pixel or two does not change what an image shows, so averaging over shifts
keeps the judgement and averages out some of that error. On the bundled shapes model it raises
``shapes-clip``'s share of right-over-wrong pairs ordered correctly within best-of-N pools (see
docs/verifiers.md). It costs one inner call per view, and ``calls_per_score`` counts them.
Shifts keep a prompt true only where a few pixels do not matter; they are not flips, which
would need the prompt mirrored too ("left of" becomes "right of").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from diffsearch.verifiers.base import Verifier, VerifierError

DEFAULT_OFFSETS = (1,)


def shifted(images: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """``images`` (B, C, H, W) moved right by ``dx`` and down by ``dy`` pixels (negative: left,
    up), the uncovered strip filled by repeating the edge pixels."""
    height, width = images.shape[-2:]
    if abs(dx) >= width or abs(dy) >= height:
        raise VerifierError(f"shift-average: a shift of ({dx}, {dy}) pixels does not fit a "
                            f"{width}x{height} image")
    padded = F.pad(images, (max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)), mode="replicate")
    top, left = max(-dy, 0), max(-dx, 0)
    return padded[..., top : top + height, left : left + width]


def _offsets(value: Any) -> tuple[int, ...]:
    if (isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                       for v in value)):
        raise VerifierError(f"shift-average: offsets must be a non-empty list of whole numbers "
                            f">= 1 (input pixels), got {value!r}")
    return tuple(dict.fromkeys(value))


class ShiftAverageVerifier(Verifier):
    """The inner verifier's mean score over the image and its shifted copies."""

    name: ClassVar[str] = "shift-average"

    def __init__(self, device: str | torch.device = "cpu", verifier: Any = None,
                 offsets: Any = DEFAULT_OFFSETS, **options: Any) -> None:
        super().__init__(device, **options)
        from diffsearch.verifiers.registry import create_verifier

        if verifier is None:
            raise VerifierError("shift-average: verifier is required (the verifier to average, "
                                "e.g. shapes-clip)")
        self.offsets = _offsets(offsets)
        self.inner = create_verifier(verifier, device=self.device)
        self.needs_prompt = self.inner.needs_prompt  # type: ignore[misc]
        self.input_size = self.inner.input_size  # type: ignore[misc]
        self.calls_per_score = self.inner.calls_per_score * self.views

    @property
    def views(self) -> int:
        """How many copies of each image are scored (the image and 4 shifts per offset)."""
        return 1 + 4 * len(self.offsets)

    def _moves(self, height: int, width: int) -> list[tuple[int, int]]:
        """Each view's (dx, dy) in image pixels, the unshifted one first."""
        size = self.inner.input_size
        moves = [(0, 0)]
        for offset in self.offsets:
            dx = max(1, round(offset * width / size)) if size else offset
            dy = max(1, round(offset * height / size)) if size else offset
            moves += [(dx, 0), (-dx, 0), (0, dy), (0, -dy)]
        return moves

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        if images.ndim != 4:
            raise VerifierError(f"shift-average: images must be (B, C, H, W), got "
                                f"{tuple(images.shape)}")
        total = torch.zeros(images.shape[0], dtype=torch.float64)
        moves = self._moves(*images.shape[-2:])
        for dx, dy in moves:
            view = images if (dx, dy) == (0, 0) else shifted(images, dx, dy)
            total += self.inner.score(view, prompts).detach().to("cpu", torch.float64)
        return (total / len(moves)).float()

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"offsets": list(self.offsets),
                                     "verifier": self.inner.describe()}
