"""``temporal-consistency``: how alike a clip's consecutive frames are, prompt-free.

The score is the mean similarity of frame f and frame f + 1 over the clip (a one-frame clip
scores 1, the most consistent), measured on ``features``:

- ``histogram`` (default; no weights): 1 minus the total variation distance between the
  frames' coarse colour histograms (:func:`~diffsearch.verifiers.video.histogram_distances`),
  in [0, 1]. Blind to where things are, so motion costs nothing, while colour flicker and
  objects that grow, split or appear from nowhere do. The term ``shapes-video`` adds.
- ``pixels``: 1 minus the mean absolute difference of the frames' pixels, in [0, 1]. Any
  change costs, motion included: it rewards still clips, so use it to measure flicker on
  clips whose motion is fixed (a frame chain on one conditioning), not to guide a search.
- an image verifier spec whose verifier exposes image features (``image_embeddings``:
  ``clip``, ``hpsv2``, ``pickscore``, ``shapes-clip``): the cosine of consecutive frames'
  unit-norm embeddings, in [-1, 1]; with CLIP this is the CLIP-Temp score of the video
  generation literature (semantic: a moving subject stays similar, a changing one does not).
  A verifier without image features is refused, naming those that have them.

Row-independent: each clip's similarity uses only its own frames (feature verifiers encode in
fixed-size chunks).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from diffsearch.verifiers.base import VerifierError
from diffsearch.verifiers.video import VideoVerifier, histogram_distances

PIXEL_FEATURES = ("histogram", "pixels")
"""The ``features`` that need no model."""
FEATURE_VERIFIERS = ("clip", "hpsv2", "pickscore", "shapes-clip")
"""The built-in verifiers that expose image features (named in the refusal of others)."""


@runtime_checkable
class ImageFeatures(Protocol):
    """A verifier that exposes its image embeddings."""

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm float embeddings (B, D) of images (B, 3, H, W) in [0, 1], each row
        independent of the others."""


def pixel_similarities(clips: torch.Tensor) -> torch.Tensor:
    """1 - mean |frame f+1 - frame f| over pixels and channels, (B, F - 1)."""
    clips = clips.clamp(0, 1)
    return 1.0 - (clips[:, 1:] - clips[:, :-1]).abs().mean(dim=(2, 3, 4))


def feature_similarities(embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine of consecutive frames' embeddings (B, F, D) -> (B, F - 1)."""
    unit = F.normalize(embeddings.float(), dim=-1)
    return (unit[:, 1:] * unit[:, :-1]).sum(-1)


class TemporalConsistencyVerifier(VideoVerifier):
    """Mean similarity of consecutive frames (histograms, pixels or an image verifier's
    features)."""

    name: ClassVar[str] = "temporal-consistency"
    needs_prompt: ClassVar[bool] = False

    def __init__(self, device: str | torch.device = "cpu",
                 features: str | dict[str, Any] = "histogram", **options: Any) -> None:
        super().__init__(device, **options)
        self.encoder: ImageFeatures | None = None
        if isinstance(features, str) and features in PIXEL_FEATURES:
            self.features = features
            return
        from diffsearch.verifiers.registry import UnknownVerifierError, create_verifier

        allowed = (f"temporal-consistency: features must be {' or '.join(PIXEL_FEATURES)}, or "
                   f"an image verifier with image features ({', '.join(FEATURE_VERIFIERS)})")
        try:
            verifier = create_verifier(features, device=device)
        except UnknownVerifierError as error:
            raise VerifierError(f"{allowed}; {error}") from None
        if not isinstance(verifier, ImageFeatures):
            raise VerifierError(f"{allowed}; {verifier.name!r} exposes none")
        self.encoder, self.features = verifier, verifier.name

    def similarities(self, clips: torch.Tensor) -> torch.Tensor:
        """Similarity of each pair of consecutive frames, (B, F - 1)."""
        if self.features == "histogram":
            return 1.0 - histogram_distances(clips)
        if self.features == "pixels":
            return pixel_similarities(clips)
        assert self.encoder is not None
        batch, frames = clips.shape[:2]
        embeddings = self.encoder.image_embeddings(clips.flatten(0, 1)).detach().float().cpu()
        return feature_similarities(embeddings.view(batch, frames, -1))

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        self._check(images, prompts)
        clips = images.detach().float().cpu()
        if clips.shape[1] < 2:
            return torch.ones(clips.shape[0])
        return self.similarities(clips).mean(-1)

    def describe(self) -> dict[str, Any]:
        encoder = self.encoder.describe() if self.encoder is not None else None  # type: ignore[attr-defined]
        return super().describe() | {"features": self.features, "feature_verifier": encoder}
