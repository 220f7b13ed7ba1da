"""Adapter for PixArtSigmaPipeline: a DiT (``PixArtTransformer2DModel``) over a T5 encoder, on a
discrete (DDPM-trained) noise schedule, with classifier-free guidance and a negative prompt (the
empty one by default).

What differs from the UNet families, and how the adapter follows diffusers:

- The prompt is encoded by the pipeline's own ``encode_prompt`` (padded to
  ``max_sequence_length`` T5 tokens, 300 for Sigma) with its attention mask. Captions are
  cleaned as diffusers' default does (``clean_caption=True``: URLs, HTML and stray symbols
  removed) where its optional ``beautifulsoup4`` and ``ftfy`` are installed, and only
  lower-cased otherwise, as diffusers falls back to then. Both masks (the
  prompt's and the negative prompt's) travel in the Conditioning next to their embeddings, so a
  batch may mix prompts of any length.
- The transformer predicts a learned variance too (``out_channels`` is twice the latent
  channels): only the first half, the noise prediction, is kept, as the pipeline does.
- Samplers are the UNet families' (:mod:`diffsearch.pipelines._discrete`) over the model's own
  scheduler config. PixArt-Sigma ships ``DPMSolverMultistepScheduler``: with no sampler named
  the model runs DDIM on the same noise schedule, so every strategy can resume; name
  ``dpm++-2m`` for the shipped solver (0 -> T in one call only).
- No resolution binning: diffusers snaps the size to a preset aspect-ratio bin and resizes the
  image back (``use_resolution_binning=True``); here the latent is sampled at the asked size,
  which must be a multiple of the VAE factor times the transformer's patch size.

diffusers' PixArt-Sigma loop has only the old ``callback``/``callback_steps`` hooks; the adapter
owns its loop, so that does not matter.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.utils import is_bs4_available, is_ftfy_available

from diffsearch.pipelines._adapter import NEGATIVE, DiffusersDenoiser
from diffsearch.pipelines._discrete import DiscreteHooks, discrete_scheduler, sampler_for


class PixArtSigmaDenoiser(DiscreteHooks, DiffusersDenoiser):
    """A PixArtSigmaPipeline as a resumable, batched, seeded sampler (see module docstring).

    ``height`` / ``width`` default to the pipeline's default (the transformer's sample size
    times the VAE factor); ``max_sequence_length`` is the T5 context, diffusers' 300 by default.
    """

    def __init__(
        self,
        pipe: Any,
        *,
        num_steps: int,
        guidance_scale: float,
        compute_batch: int | None = None,
        height: int | None = None,
        width: int | None = None,
        sampler: str | None = None,
        negative_prompt: str | None = None,
        max_sequence_length: int = 300,
    ) -> None:
        transformer = pipe.transformer
        factor = pipe.vae_scale_factor
        multiple = factor * transformer.config.patch_size
        height = height or transformer.config.sample_size * factor
        width = width or transformer.config.sample_size * factor
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple} (the VAE factor "
                             f"x the patch size), got {height}x{width}")
        self.height, self.width = height, width
        self.max_sequence_length = max_sequence_length
        channels = transformer.config.in_channels
        self._learned_sigma = transformer.config.out_channels == 2 * channels
        """Whether the output's second half is the learned variance (dropped)."""
        self._clean_caption = is_bs4_available() and is_ftfy_available()
        """diffusers' default caption cleaning, which needs both packages (module docstring)."""
        sampler, self._scheduler_class, self._scheduler_config = discrete_scheduler(
            pipe.scheduler, sampler)
        super().__init__(
            pipe, transformer, num_steps=num_steps, guidance_scale=guidance_scale,
            latent_shape=(channels, height // factor, width // factor), sampler=sampler,
            compute_batch=compute_batch, negative_prompt=negative_prompt,
        )
        self._sampler = sampler_for(sampler, self._schedule)

    # ---- hooks ------------------------------------------------------------------------------
    def _new_scheduler(self) -> Any:
        scheduler = self._scheduler_class.from_config(self._scheduler_config)
        scheduler.set_timesteps(self.num_steps)
        return scheduler

    def _encode(self, prompt: str, negative_prompt: str | None) -> dict[str, torch.Tensor]:
        embeds, mask, negative, negative_mask = self.pipe.encode_prompt(
            prompt, do_classifier_free_guidance=self.do_guidance,
            negative_prompt=negative_prompt or "", device=self.device,
            max_sequence_length=self.max_sequence_length, clean_caption=self._clean_caption)
        tensors = {"prompt_embeds": embeds, "prompt_attention_mask": mask}
        if self.do_guidance:
            tensors[NEGATIVE + "prompt_embeds"] = negative
            tensors[NEGATIVE + "prompt_attention_mask"] = negative_mask
        return tensors

    def _predict_rows(self, x: torch.Tensor, t: torch.Tensor, **rows: torch.Tensor
                      ) -> torch.Tensor:
        x, rows = self._with_unconditional(x, rows)
        output = self.network(
            x.to(self.dtype), encoder_hidden_states=rows["prompt_embeds"],
            encoder_attention_mask=rows["prompt_attention_mask"],
            timestep=t.to(self.device).expand(x.shape[0]),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False,
        )[0]
        if self._learned_sigma:
            output = output.chunk(2, dim=1)[0]
        return self._guided(output)

    def _to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.pipe.vae.config.scaling_factor
