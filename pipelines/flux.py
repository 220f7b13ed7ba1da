"""Adapter for FluxPipeline: the FLUX transformer on a flow-matching schedule with the
resolution-dependent shift (mu), CLIP pooled + T5 conditioning, and embedded guidance.

Latents are stored and returned unpacked, (C, H, W) like every other family, so the store, the
perturbations and the verifiers see one layout; the 2x2 packing into transformer tokens is a pure
reshape done inside each forward pass (bit-exact both ways).

Guidance: FLUX-dev takes the guidance scale as an input embedding (one forward per step);
FLUX-schnell has no guidance input and ignores the scale. The pipeline's optional "true CFG"
(a second pass with a negative prompt) is not used, so a step always costs one forward, and a
negative prompt is refused: there is no unconditional pass for it to change.

Sizes are multiples of the VAE factor times 2: the transformer's tokens are 2x2 latent pixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps

from diffsearch.pipelines._flow import FlowDenoiser

NO_NEGATIVE_PROMPT = ("FLUX takes no negative prompt: it runs no classifier-free guidance pass "
                      "(the guidance scale is an input of the model)")


class FluxDenoiser(FlowDenoiser):
    def __init__(
        self,
        pipe: Any,
        *,
        num_steps: int,
        guidance_scale: float,
        compute_batch: int | None = None,
        height: int | None = None,
        width: int | None = None,
        max_sequence_length: int = 512,
        sampler: str | None = None,
        negative_prompt: str | None = None,
    ) -> None:
        if negative_prompt is not None:
            raise ValueError(NO_NEGATIVE_PROMPT)
        transformer = pipe.transformer
        factor = pipe.vae_scale_factor
        height = height or pipe.default_sample_size * factor
        width = width or pipe.default_sample_size * factor
        if height % (2 * factor) or width % (2 * factor):
            raise ValueError(f"height and width must be multiples of {2 * factor}, "
                             f"got {height}x{width}")
        self.height, self.width = height, width
        self.max_sequence_length = max_sequence_length
        super().__init__(
            pipe, transformer, num_steps=num_steps, guidance_scale=guidance_scale,
            latent_shape=(transformer.config.in_channels // 4, height // factor, width // factor),
            compute_batch=compute_batch, sampler=sampler,
        )
        _, h, w = self.latent_shape
        self._image_ids = pipe._prepare_latent_image_ids(1, h // 2, w // 2, self.device,
                                                         self.dtype)
        self._text_ids = torch.zeros(max_sequence_length, 3, device=self.device, dtype=self.dtype)

    @property
    def do_guidance(self) -> bool:
        """No classifier-free guidance pass: the scale is an input (see module docstring)."""
        return False

    def _set_timesteps(self, scheduler: Any) -> None:
        sigmas = None
        if not scheduler.config.get("use_flow_sigmas"):
            sigmas = np.linspace(1.0, 1 / self.num_steps, self.num_steps)
        _, h, w = self.latent_shape
        mu = calculate_shift(
            (h // 2) * (w // 2),
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        retrieve_timesteps(scheduler, self.num_steps, None, sigmas=sigmas, mu=mu)

    def _encode(self, prompt: str, negative_prompt: str | None) -> dict[str, torch.Tensor]:
        if negative_prompt is not None:
            raise ValueError(NO_NEGATIVE_PROMPT)
        embeds, pooled, _ = self.pipe.encode_prompt(
            prompt=prompt, prompt_2=None, device=self.device, num_images_per_prompt=1,
            max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def _predict_rows(self, x: torch.Tensor, t: torch.Tensor, **rows: torch.Tensor
                      ) -> torch.Tensor:
        n, channels, h, w = x.shape
        packed = self.pipe._pack_latents(x.to(self.dtype), n, channels, h, w)
        guidance = None
        if self.network.config.guidance_embeds:
            guidance = torch.full([n], self.guidance_scale, device=self.device,
                                  dtype=torch.float32)
        timestep = t.to(self.device).expand(n).to(self.dtype)
        output = self.network(
            hidden_states=packed, timestep=timestep / 1000, guidance=guidance,
            pooled_projections=rows["pooled_prompt_embeds"],
            encoder_hidden_states=rows["prompt_embeds"], txt_ids=self._text_ids,
            img_ids=self._image_ids, return_dict=False,
        )[0]
        return self.pipe._unpack_latents(output, self.height, self.width,
                                         self.pipe.vae_scale_factor).float()
