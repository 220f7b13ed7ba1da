"""Adapter for StableDiffusion3Pipeline: the SD3 transformer (MMDiT) on a flow-matching schedule,
classifier-free guidance with a negative prompt (the empty one by default), two CLIP encoders
and an optional T5. Sizes are multiples of the VAE factor times the transformer's patch size.

Without ``text_encoder_3`` the pipeline itself feeds zeros in place of the T5 tokens; the
adapter gets that for free by encoding through ``encode_prompt``.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import (
    calculate_shift,
    retrieve_timesteps,
)

from diffsearch.pipelines._adapter import NEGATIVE
from diffsearch.pipelines._flow import FlowDenoiser


class StableDiffusion3Denoiser(FlowDenoiser):
    def __init__(
        self,
        pipe: Any,
        *,
        num_steps: int,
        guidance_scale: float,
        compute_batch: int | None = None,
        height: int | None = None,
        width: int | None = None,
        max_sequence_length: int = 256,
        sampler: str | None = None,
        negative_prompt: str | None = None,
    ) -> None:
        transformer = pipe.transformer
        multiple = pipe.vae_scale_factor * transformer.config.patch_size
        height = height or pipe.default_sample_size * pipe.vae_scale_factor
        width = width or pipe.default_sample_size * pipe.vae_scale_factor
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, "
                             f"got {height}x{width}")
        self.height, self.width = height, width
        self.max_sequence_length = max_sequence_length
        factor = pipe.vae_scale_factor
        super().__init__(
            pipe, transformer, num_steps=num_steps, guidance_scale=guidance_scale,
            latent_shape=(transformer.config.in_channels, height // factor, width // factor),
            compute_batch=compute_batch, sampler=sampler, negative_prompt=negative_prompt,
        )

    def _set_timesteps(self, scheduler: Any) -> None:
        extra = {}
        if scheduler.config.get("use_dynamic_shifting"):
            patch = self.network.config.patch_size
            _, h, w = self.latent_shape
            extra["mu"] = calculate_shift(
                (h // patch) * (w // patch),
                scheduler.config.get("base_image_seq_len", 256),
                scheduler.config.get("max_image_seq_len", 4096),
                scheduler.config.get("base_shift", 0.5),
                scheduler.config.get("max_shift", 1.16),
            )
        retrieve_timesteps(scheduler, self.num_steps, None, **extra)

    def _encode(self, prompt: str, negative_prompt: str | None) -> dict[str, torch.Tensor]:
        embeds, negative, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=prompt, prompt_2=None, prompt_3=None, device=self.device,
            num_images_per_prompt=1, do_classifier_free_guidance=self.do_guidance,
            negative_prompt=negative_prompt or "", max_sequence_length=self.max_sequence_length)
        tensors = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if self.do_guidance:
            tensors[NEGATIVE + "prompt_embeds"] = negative
            tensors[NEGATIVE + "pooled_prompt_embeds"] = negative_pooled
        return tensors

    def _predict_rows(self, x: torch.Tensor, t: torch.Tensor, **rows: torch.Tensor
                      ) -> torch.Tensor:
        x, rows = self._with_unconditional(x, rows)
        output = self.network(
            hidden_states=x.to(self.dtype), timestep=t.expand(x.shape[0]).to(self.device),
            encoder_hidden_states=rows["prompt_embeds"],
            pooled_projections=rows["pooled_prompt_embeds"], return_dict=False,
        )[0]
        return self._guided(output)
