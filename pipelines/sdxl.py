"""Adapter for StableDiffusionXLPipeline: the SD loop plus SDXL's extra UNet conditions.

SDXL's UNet also takes the pooled embedding of the second text encoder and the "time ids"
(original size, crop corner, target size). The time ids are the same for every candidate (no
cropping, original = target = the sampled size, as the pipeline does by default), so they are
built once; the pooled embeddings are per prompt and travel in the Conditioning.

The unconditional branch is the encoded negative prompt; without one it follows the pipeline's
default (``negative_prompt=None``): zeros when the model's config sets
``force_zeros_for_empty_prompt`` (SDXL base does), else the encoded empty prompt.
"""

from __future__ import annotations

from typing import Any

import torch

from diffsearch.pipelines._adapter import NEGATIVE
from diffsearch.pipelines.stable_diffusion import StableDiffusionDenoiser


class StableDiffusionXLDenoiser(StableDiffusionDenoiser):
    def __init__(self, pipe: Any, **options: Any) -> None:
        super().__init__(pipe, **options)
        if pipe.text_encoder_2 is None:
            raise ValueError("SDXL pipelines without text_encoder_2 (the refiner) are not "
                             "supported: it is an image-to-image model")
        size = (self.height, self.width)
        self._time_ids = pipe._get_add_time_ids(
            size, (0, 0), size, dtype=self.dtype,
            text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
        ).to(self.device)

    def _encode(self, prompt: str, negative_prompt: str | None) -> dict[str, torch.Tensor]:
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt, device=self.device, num_images_per_prompt=1,
            do_classifier_free_guidance=self.do_guidance, negative_prompt=negative_prompt)
        tensors = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if self.do_guidance:
            tensors[NEGATIVE + "prompt_embeds"] = negative
            tensors[NEGATIVE + "pooled_prompt_embeds"] = negative_pooled
        return tensors

    def _extra_unet_inputs(self, rows: dict[str, torch.Tensor]) -> dict[str, Any]:
        pooled = rows["pooled_prompt_embeds"]
        time_ids = self._time_ids.expand(pooled.shape[0], -1)
        return {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
