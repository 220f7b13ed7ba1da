"""``frames``: any image verifier over a clip's frames, one score per clip.

For whole-clip video models (pipelines/video.py) and frame-chain searches alike, most reward
models judge images. This applies one (``verifier``, any image verifier spec) to frames of each
clip and aggregates their scores:

- ``aggregate: mean`` (default): the mean of the sampled frames' scores.
- ``aggregate: min``: the worst sampled frame's score: one bad frame sinks the clip.
- ``aggregate: keyframes``: the mean over the first, middle and last frames (frame F // 2 is
  the middle; a 2-frame clip has no middle, a 1-frame clip only its first), what tt-scale-flux
  scores its LTX-Video and Wan clips on. Cheapest: three judge calls per clip at any length.

Which frames ``mean`` and ``min`` see is set by at most one of ``every: k`` (frames 0, k, 2k,
...) and ``count: n`` (n frames evenly spaced from the first to the last, both included; all of
them when the clip has no more than n). By default every frame is scored.

Frame f is judged against frame f's prompt from the clip prompt
(:func:`~diffsearch.verifiers.video.frame_prompt_rows`): the clip prompt itself, except for the
bundled shapes world's motion prompts. Scores are row-independent when the image verifier's are:
all sampled frames of a batch go to it as one batch of images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from diffsearch.verifiers.base import Verifier, VerifierError
from diffsearch.verifiers.video import VideoVerifier, frame_prompt_rows

AGGREGATES = ("mean", "min", "keyframes")


def keyframe_indices(num_frames: int) -> list[int]:
    """First, middle (``num_frames // 2``) and last frame, each once."""
    return sorted({0, num_frames // 2, num_frames - 1})


def sampled_indices(num_frames: int, every: int | None, count: int | None) -> list[int]:
    """The frames ``every``/``count`` pick from a clip of ``num_frames`` (all when neither)."""
    if every is not None:
        return list(range(0, num_frames, every))
    if count is not None and count < num_frames:
        if count == 1:
            return [0]
        return sorted({round(i * (num_frames - 1) / (count - 1)) for i in range(count)})
    return list(range(num_frames))


def _positive_int(field: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise VerifierError(f"frames: {field} must be a whole number >= 1, got {value!r}")
    return value


class FramesVerifier(VideoVerifier):
    """An image verifier's scores of sampled frames, aggregated per clip."""

    name: ClassVar[str] = "frames"

    def __init__(self, device: str | torch.device = "cpu",
                 verifier: str | dict[str, Any] | None = None, aggregate: str = "mean",
                 every: int | None = None, count: int | None = None, **options: Any) -> None:
        super().__init__(device, **options)
        if aggregate not in AGGREGATES:
            raise VerifierError(f"frames: aggregate must be one of {', '.join(AGGREGATES)}, "
                                f"got {aggregate!r}")
        self.every, self.count = _positive_int("every", every), _positive_int("count", count)
        if every is not None and count is not None:
            raise VerifierError("frames: give every or count, not both")
        if aggregate == "keyframes" and (every is not None or count is not None):
            raise VerifierError("frames: aggregate: keyframes picks its own frames (first, "
                                "middle, last); every and count apply to mean and min")
        if verifier is None:
            raise VerifierError("frames: verifier is required (the image verifier applied to "
                                "each frame, e.g. {name: frames, verifier: clip})")
        from diffsearch.verifiers.registry import create_verifier

        self.frame_verifier: Verifier = create_verifier(verifier, device=device)
        if isinstance(self.frame_verifier, VideoVerifier):
            raise VerifierError(f"frames: verifier must be an image verifier, got the video "
                                f"verifier {self.frame_verifier.name!r}")
        self.aggregate = aggregate
        self.needs_prompt = self.frame_verifier.needs_prompt  # type: ignore[misc]

    def frame_indices(self, num_frames: int) -> list[int]:
        """The frames of a ``num_frames`` clip that are scored."""
        if self.aggregate == "keyframes":
            return keyframe_indices(num_frames)
        return sampled_indices(num_frames, self.every, self.count)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        self._check(images, prompts)
        batch, num_frames = images.shape[:2]
        picked = self.frame_indices(num_frames)
        rows = frame_prompt_rows(prompts, num_frames)
        frame_prompts = [rows[clip * num_frames + f] for clip in range(batch) for f in picked]
        frames = images[:, picked].flatten(0, 1)
        # what one clip's score costs: a judge call per scored frame (read after each call)
        self.calls_per_score = self.frame_verifier.calls_per_score * len(picked)
        scores = self.frame_verifier.score(frames, frame_prompts).detach().float().cpu()
        per_frame = scores.view(batch, len(picked))
        return per_frame.amin(1) if self.aggregate == "min" else per_frame.mean(1)

    def usage(self) -> dict[str, int]:
        return self.frame_verifier.usage()

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"verifier": self.frame_verifier.describe(),
                                     "aggregate": self.aggregate, "every": self.every,
                                     "count": self.count}
