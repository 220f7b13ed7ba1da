"""Adapter point for diffusers text-to-video pipelines whose latent is a whole clip.

The frame-chain adapter (:mod:`diffsearch.pipelines.frame_chain`) makes clips out of an image
model, one frame per candidate. Real video models denoise all frames at once: one candidate is
one clip, its latent (C, F, H, W), and every search strategy applies to it unchanged (a seed
is a clip's noise, a re-noised state is a whole clip's state), scored on its decoded frames by
a video verifier. This module adapts the pipelines that share Stable Diffusion's components
with a 3-D UNet (``TextToVideoSDPipeline`` with ``UNet3DConditionModel``: ModelScope
text-to-video, Zeroscope); the loop, guidance, schedulers, fixed-batch forwards and the
forward process are the SD adapter's, because diffusers' text-to-video loop is SD's loop on
5-D latents (its scheduler steps are element-wise, so folding frames into the batch, as
diffusers does, changes nothing).

Extensions of the :class:`~diffsearch.pipelines.base.Denoiser` contract here:
``latent_shape`` is (C, F, H, W) and :meth:`decode` returns clips (B, F, 3, H, W) in [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from diffsearch.pipelines.base import Conditioning
from diffsearch.pipelines.stable_diffusion import StableDiffusionDenoiser


class TextToVideoDenoiser(StableDiffusionDenoiser):
    """A ``TextToVideoSDPipeline`` (or any pipeline with SD's components and a 3-D UNet
    taking (B, C, F, H, W)) as a resumable, batched, seeded sampler of whole clips.

    ``num_frames`` is the clip length (diffusers' default for this pipeline is 16). Rows of
    every forward pass are clips, cut into fixed chunks of ``compute_batch`` clips; the VAE
    decodes frames in fixed chunks of ``compute_batch`` frames.
    """

    def __init__(self, pipe: Any, *, num_frames: int = 16, **options: Any) -> None:
        if num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {num_frames}")
        super().__init__(pipe, **options)
        channels, h, w = self.latent_shape
        self.num_frames = num_frames
        self.latent_shape = (channels, num_frames, h, w)  # type: ignore[assignment]

    def _check_call(self, latents: torch.Tensor, conds: Sequence[Conditioning], start: int,
                    end: int, eta: float, generators: Sequence[torch.Generator] | None) -> None:
        """The base adapter's checks for 5-D latents (the base insists on 4-D)."""
        if latents.dim() != 5 or tuple(latents.shape[1:]) != tuple(self.latent_shape):
            expected = ", ".join(map(str, self.latent_shape))
            raise ValueError(f"latents must have shape (B, {expected}), "
                             f"got {tuple(latents.shape)}")
        if not 0 <= start <= end <= self.num_steps:
            raise ValueError(f"denoise needs 0 <= start <= end <= {self.num_steps}, "
                             f"got {start} -> {end}")
        if len(conds) != latents.shape[0]:
            raise ValueError(f"got {len(conds)} conditionings for {latents.shape[0]} clips")
        self._check_sampler_call(latents, start, eta, generators)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Clips (B, C, F, H, W) to frames (B, F, 3, H', W') in [0, 1]."""
        batch, channels, frames, h, w = latents.shape
        flat = latents.permute(0, 2, 1, 3, 4).reshape(batch * frames, channels, h, w)
        images = super().decode(flat)
        return images.view(batch, frames, *images.shape[1:])

