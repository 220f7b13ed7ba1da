"""Adapter for StableDiffusionPipeline (SD 1.x / 2.x): a UNet with eps or v prediction, sampled
with any UNet sampler (:mod:`diffsearch.pipelines._discrete`), classifier-free guidance with a
negative prompt (the empty one by default).

Every tensor of the sampler state is float32, also when the network runs in float16: the
network's input is cast down and its output back up, so rounding does not build up over steps.
"""

from __future__ import annotations

from typing import Any

import torch

from diffsearch.pipelines._adapter import NEGATIVE, DiffusersDenoiser
from diffsearch.pipelines._discrete import DiscreteHooks, discrete_scheduler, sampler_for


class StableDiffusionDenoiser(DiscreteHooks, DiffusersDenoiser):
    """A StableDiffusionPipeline as a resumable, batched, seeded sampler.

    ``height`` / ``width`` default to the pipeline's own default (the UNet's sample size times
    the VAE scale factor). Guidance is on when ``guidance_scale > 1``, as in diffusers.
    ``sampler`` names one of the UNet samplers (None: the model's own scheduler);
    ``negative_prompt`` is the default unconditional prompt (None: the pipeline's default).
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
    ) -> None:
        unet = pipe.unet
        if unet.config.time_cond_proj_dim is not None:
            raise ValueError("guidance-embedding UNets (LCM) are not supported: they need no "
                             "classifier-free guidance and a different sampler")
        sampler, self._scheduler_class, self._scheduler_config = discrete_scheduler(
            pipe.scheduler, sampler)
        factor = pipe.vae_scale_factor
        sample = unet.config.sample_size
        sample_h, sample_w = (sample, sample) if isinstance(sample, int) else sample
        height = height or sample_h * factor
        width = width or sample_w * factor
        if height % factor or width % factor:
            raise ValueError(f"height and width must be multiples of {factor}, "
                             f"got {height}x{width}")
        self.height, self.width = height, width
        super().__init__(
            pipe, unet, num_steps=num_steps, guidance_scale=guidance_scale,
            latent_shape=(unet.config.in_channels, height // factor, width // factor),
            sampler=sampler, compute_batch=compute_batch, negative_prompt=negative_prompt,
        )
        self._sampler = sampler_for(sampler, self._schedule)

    # ---- hooks ------------------------------------------------------------------------------
    def _new_scheduler(self) -> Any:
        scheduler = self._scheduler_class.from_config(self._scheduler_config)
        scheduler.set_timesteps(self.num_steps)
        return scheduler

    def _encode(self, prompt: str, negative_prompt: str | None) -> dict[str, torch.Tensor]:
        positive, negative = self.pipe.encode_prompt(
            prompt, self.device, 1, self.do_guidance, negative_prompt=negative_prompt or "")
        tensors = {"prompt_embeds": positive}
        if self.do_guidance:
            tensors[NEGATIVE + "prompt_embeds"] = negative
        return tensors

    def _predict_rows(self, x: torch.Tensor, t: torch.Tensor, **rows: torch.Tensor
                      ) -> torch.Tensor:
        x, rows = self._with_unconditional(x, rows)
        output = self.network(
            x.to(self.dtype), t, encoder_hidden_states=rows["prompt_embeds"],
            return_dict=False, **self._extra_unet_inputs(rows),
        )[0]
        return self._guided(output)

    def _extra_unet_inputs(self, rows: dict[str, torch.Tensor]) -> dict[str, Any]:
        """UNet keyword inputs beyond the text embeddings (SDXL's added conditions)."""
        return {}

    def _to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        config = self.pipe.vae.config
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, -1, 1, 1)
            mean_t = torch.tensor(mean, device=latents.device).view(shape)
            std_t = torch.tensor(std, device=latents.device).view(shape)
            return latents * std_t / config.scaling_factor + mean_t
        return latents / config.scaling_factor
