"""Adapter for HunyuanVideoPipeline: HunyuanVideo's video transformer on a flow-matching
schedule, one candidate one whole clip.

- **Latents** are clips (C, F', H/s, W/s) with F' = (F - 1) / t + 1, s and t the VAE's spatial
  and temporal compression read from its config (8 and 4 for the released model); the frame
  count is t k + 1. :meth:`decode` returns (B, F, 3, H, W) in [0, 1], like every clip adapter.
- **Text.** The prompt is wrapped in diffusers' chat template (``prompt_template``, by default
  the pipeline's own) and encoded by the Llama encoder, whose third-to-last hidden state, minus
  the template's fixed prefix (``crop_start``, 95 tokens), is the text embedding with its
  attention mask; a CLIP encoder gives the pooled embedding. Both are the pipeline's
  ``encode_prompt``.
- **Guidance.** HunyuanVideo is guidance-distilled: ``guidance_scale`` is diffusers' own, an
  input of the transformer (embedded as 1000 x the scale), so a step is one forward pass and
  the job's ``guidance_scale`` sets it. diffusers' "true" classifier-free guidance, a second
  pass on a negative prompt mixed at ``true_cfg_scale``, is off unless ``true_cfg_scale > 1``
  (diffusers' default is 1): then the unconditional rows (the negative prompt, by default the
  empty one) run in the same forward as the conditional ones. A negative prompt without
  ``true_cfg_scale > 1`` is refused: it would change nothing.
- **Schedule**: diffusers' sigmas ``linspace(1, 0, T + 1)[:-1]`` under the scheduler's shift,
  stepped with flow-matching Euler (``flow-euler``, the scheduler HunyuanVideo ships).

Defaults follow diffusers: 720x1280, 129 frames.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import (
    DEFAULT_PROMPT_TEMPLATE,
    retrieve_timesteps,
)

from diffsearch.pipelines._adapter import NEGATIVE
from diffsearch.pipelines._flow import FlowDenoiser

DEFAULT_SIZE = {"height": 720, "width": 1280, "num_frames": 129}
"""diffusers' HunyuanVideoPipeline defaults."""
NEEDS_TRUE_CFG = ("HunyuanVideo uses a negative prompt only in true classifier-free guidance, "
                  "with true_cfg_scale > 1 (guidance_scale is an input of the model)")


class HunyuanVideoDenoiser(FlowDenoiser):
    """A HunyuanVideoPipeline as a resumable, batched, seeded sampler of whole clips (see the
    module docstring). Rows of every forward pass are clips, in fixed chunks of
    ``compute_batch``; the VAE decodes whole clips in chunks of ``compute_batch`` too."""

    def __init__(
        self,
        pipe: Any,
        *,
        num_steps: int,
        guidance_scale: float,
        compute_batch: int | None = None,
        height: int | None = None,
        width: int | None = None,
        num_frames: int | None = None,
        sampler: str | None = None,
        negative_prompt: str | None = None,
        true_cfg_scale: float = 1.0,
        max_sequence_length: int = 256,
        prompt_template: dict[str, Any] | None = None,
    ) -> None:
        self.true_cfg_scale = float(true_cfg_scale)
        if negative_prompt is not None and not self.do_guidance:
            raise ValueError(NEEDS_TRUE_CFG)
        transformer = pipe.transformer
        spatial, temporal = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
        self.height = height or DEFAULT_SIZE["height"]
        self.width = width or DEFAULT_SIZE["width"]
        self.num_frames = num_frames or DEFAULT_SIZE["num_frames"]
        multiple = spatial * transformer.config.patch_size
        if self.height % multiple or self.width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple} (the VAE factor "
                             f"x the patch size), got {self.height}x{self.width}")
        if self.num_frames < 1 or (self.num_frames - 1) % temporal:
            raise ValueError(f"num_frames must be {temporal}k+1 (the VAE folds {temporal} frames "
                             f"into one after the first), got {self.num_frames}")
        self.max_sequence_length = max_sequence_length
        self.prompt_template = prompt_template or DEFAULT_PROMPT_TEMPLATE
        frames = (self.num_frames - 1) // temporal + 1
        super().__init__(
            pipe, transformer, num_steps=num_steps, guidance_scale=guidance_scale,
            latent_shape=(transformer.config.in_channels, frames, self.height // spatial,
                          self.width // spatial),  # type: ignore[arg-type]  # a clip
            compute_batch=compute_batch, sampler=sampler, negative_prompt=negative_prompt,
        )

    @property
    def do_guidance(self) -> bool:
        """Whether the unconditional rows run: true CFG only (see the module docstring)."""
        return self.true_cfg_scale > 1.0

    def _set_timesteps(self, scheduler: Any) -> None:
        sigmas = np.linspace(1.0, 0.0, self.num_steps + 1)[:-1]
        retrieve_timesteps(scheduler, self.num_steps, None, sigmas=sigmas)

    def _encode(self, prompt: str, negative_prompt: str | None) -> dict[str, torch.Tensor]:
        if negative_prompt is not None and not self.do_guidance:
            raise ValueError(NEEDS_TRUE_CFG)
        tensors = self._encode_one(prompt)
        if self.do_guidance:
            negative = self._encode_one(negative_prompt or "")
            tensors.update({NEGATIVE + key: value for key, value in negative.items()})
        return tensors

    def _encode_one(self, prompt: str) -> dict[str, torch.Tensor]:
        embeds, pooled, mask = self.pipe.encode_prompt(
            prompt, prompt_template=self.prompt_template, device=self.device,
            max_sequence_length=self.max_sequence_length)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled,
                "prompt_attention_mask": mask}

    def _predict_rows(self, x: torch.Tensor, t: torch.Tensor, **rows: torch.Tensor
                      ) -> torch.Tensor:
        x, rows = self._with_unconditional(x, rows)
        n = x.shape[0]
        guidance = None
        if self.network.config.guidance_embeds:
            guidance = torch.full([n], self.guidance_scale * 1000.0, device=self.device,
                                  dtype=self.dtype)
        output = self.network(
            hidden_states=x.to(self.dtype), timestep=t.to(self.device).expand(n).float(),
            encoder_hidden_states=rows["prompt_embeds"].to(self.dtype),
            encoder_attention_mask=rows["prompt_attention_mask"].to(self.dtype),
            pooled_projections=rows["pooled_prompt_embeds"].to(self.dtype), guidance=guidance,
            return_dict=False,
        )[0].float()
        if not self.do_guidance:
            return output
        uncond, cond = output.chunk(2)
        return uncond + self.true_cfg_scale * (cond - uncond)

    def _to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.pipe.vae.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Clips (B, C, F', h, w) to frames (B, F, 3, H, W) in [0, 1]: the causal 3-D VAE
        decodes whole clips, in fixed chunks of ``compute_batch`` clips."""
        return super().decode(latents).permute(0, 2, 1, 3, 4).contiguous()
