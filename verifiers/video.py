"""Video verifiers: reward models that score whole clips against a clip prompt.

A video verifier's ``score`` takes clips as float32 (B, F, 3, H, W) in [0, 1] and one clip
prompt per clip. Verifiers built on an image verifier derive each frame's prompt from the clip
prompt with :func:`diffsearch.pipelines.frame_chain.frame_prompts`, the same schedule the
frame-chain strategies condition the frames on. That schedule is prefix-consistent, so a
partial clip (a Tree-of-Frames branch at a pruning depth) is judged like the start of the
finished one: the question asked of frame f changes with f (hierarchical prompting by depth)
but never with the clip's length.

* ``shapes-video``: the mean over frames of an image verifier's score of frame f against
  frame f's prompt (``frame_verifier``, default ``shapes-clip``) plus ``consistency_weight``
  times the clip's temporal consistency (:func:`temporal_consistency`).
* ``shapes-video-oracle``: the mean over frames of the exact shapes oracle's score; 1.0 exactly
  when every frame is right. A held-out judge for benchmarks.

The video verifiers for any model are in their own modules: ``frames`` (any image verifier over
sampled frames, :mod:`~diffsearch.verifiers.frames`), ``temporal-consistency``
(:mod:`~diffsearch.verifiers.temporal`) and ``video-reward`` (a Qwen2-VL reward head,
:mod:`~diffsearch.verifiers.video_reward`).
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from diffsearch.pipelines.frame_chain import frame_prompts
from diffsearch.verifiers.base import Verifier, VerifierError

HISTOGRAM_LEVELS = 4
"""Colour levels per channel of the consistency histogram (4**3 = 64 bins): coarse enough that
antialiased edges and sampling speckle barely move mass, fine enough to tell palette colours
apart."""


class VideoVerifier(Verifier):
    """Base of verifiers that score clips (B, F, 3, H, W) rather than images."""

    @abstractmethod
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Scores of clips ``images`` (B, F, 3, H, W) in [0, 1] against clip ``prompts``
        (len B): a 1-D tensor of length B, each row independent of the others."""

    def _check(self, clips: torch.Tensor, prompts: Sequence[str]) -> None:
        if clips.ndim != 5 or clips.shape[2] != 3:
            raise VerifierError(
                f"video verifier {self.name!r} scores clips (B, F, 3, H, W), got shape "
                f"{tuple(clips.shape)}; use it as the verifier of a frame-chain strategy "
                f"(tree-of-frames, linear-clips)")
        if len(prompts) != clips.shape[0]:
            raise VerifierError(f"{clips.shape[0]} clips but {len(prompts)} prompts")


def frame_prompt_rows(prompts: Sequence[str], num_frames: int) -> list[str]:
    """Each clip's per-frame prompts, flattened clip by clip (rows of ``clips.flatten(0, 1)``)."""
    return [p for prompt in prompts for p in frame_prompts(prompt, num_frames)]


def colour_histograms(clips: torch.Tensor) -> torch.Tensor:
    """Normalised coarse RGB histograms of every frame: (B, F, HISTOGRAM_LEVELS ** 3)."""
    levels = HISTOGRAM_LEVELS
    q = (clips.clamp(0, 1) * levels).long().clamp(max=levels - 1)  # (B, F, 3, H, W)
    bins = (q[:, :, 0] * levels + q[:, :, 1]) * levels + q[:, :, 2]  # (B, F, H, W)
    flat = bins.flatten(2)
    counts = torch.zeros(*flat.shape[:2], levels ** 3, dtype=torch.float32)
    counts.scatter_add_(2, flat, torch.ones_like(flat, dtype=torch.float32))
    return counts / flat.shape[2]


def histogram_distances(clips: torch.Tensor) -> torch.Tensor:
    """Total variation distance (half the L1 distance) between consecutive frames' colour
    histograms, (B, F - 1): 0 when they hold the same colours in the same amounts, 1 when
    they share none."""
    hist = colour_histograms(clips)
    return 0.5 * (hist[:, 1:] - hist[:, :-1]).abs().sum(-1)


def temporal_consistency(clips: torch.Tensor) -> torch.Tensor:
    """Minus the mean :func:`histogram_distances` of a clip, (B,): in [-1, 0].

    Histograms ignore where things are, so an object that moves is not penalised, while
    one that changes colour, grows, shrinks, splits or appears from nowhere (the flicker of
    independently re-sampled frames) is. A one-frame clip scores 0.
    """
    if clips.shape[1] < 2:
        return torch.zeros(clips.shape[0])
    return -histogram_distances(clips).mean(-1)


class ShapesVideoVerifier(VideoVerifier):
    """Per-frame prompt score (an image verifier) + weighted temporal consistency."""

    name: ClassVar[str] = "shapes-video"

    def __init__(
        self, device: str | torch.device = "cpu", frame_verifier: str | dict[str, Any] =
        "shapes-clip", consistency_weight: float = 1.0, **options: Any,
    ) -> None:
        super().__init__(device, **options)
        from diffsearch.verifiers.registry import create_verifier

        self.frames = create_verifier(frame_verifier, device=device)
        if isinstance(self.frames, VideoVerifier):
            raise VerifierError(f"frame_verifier must be an image verifier, got the video "
                                f"verifier {self.frames.name!r}")
        self.consistency_weight = float(consistency_weight)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        self._check(images, prompts)
        clips = images.detach().float().cpu()
        batch, frames = clips.shape[:2]
        per_frame = self.frames.score(clips.flatten(0, 1), frame_prompt_rows(prompts, frames))
        prompt_score = per_frame.detach().float().cpu().view(batch, frames).mean(1)
        return prompt_score + self.consistency_weight * temporal_consistency(clips)

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"frame_verifier": self.frames.describe(),
                                     "consistency_weight": self.consistency_weight}


class ShapesVideoOracleVerifier(VideoVerifier):
    """Mean over frames of the shapes oracle's score on each frame's prompt (1.0: all right)."""

    name: ClassVar[str] = "shapes-video-oracle"

    def __init__(self, device: str | torch.device = "cpu", **options: Any) -> None:
        super().__init__(device, **options)
        from diffsearch.verifiers.shapes import ShapesOracleVerifier

        self.frames = ShapesOracleVerifier(device)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        self._check(images, prompts)
        batch, frames = images.shape[:2]
        per_frame = self.frames.score(images.flatten(0, 1), frame_prompt_rows(prompts, frames))
        return per_frame.view(batch, frames).mean(1)
