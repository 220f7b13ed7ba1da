"""Adapter for SanaPipeline: Sana's linear-attention DiT over a Gemma-2 encoder and a deep
compression autoencoder (DC-AE, x32 in the real checkpoints), on a flow-matching schedule with
classifier-free guidance and a negative prompt (the empty one by default).

How it follows diffusers, and where it departs:

- **The prompt instruction.** diffusers' ``SanaPipeline.__call__`` prepends a long "complex
  human instruction" (``complex_human_instruction``: ask the text encoder for an enhanced,
  detailed description) to every prompt and keeps the BOS token plus the last
  ``max_sequence_length - 1`` tokens of the encoder output. The adapter does the same by default,
  with diffusers' own instruction text, read from the pipeline's signature so it follows the
  installed diffusers; ``complex_human_instruction=False`` encodes the bare prompt. The negative
  prompt is encoded without it, as diffusers does.
- **Sizes.** diffusers defaults to 1024x1024 whatever the checkpoint; here the size is the job's,
  and without one the transformer's native one (its ``sample_size`` times the VAE factor: 1024,
  2048 or 4096 for the released models). No resolution binning (``use_resolution_binning=False``
  in diffusers): the latent is sampled at the asked size, a multiple of the VAE factor times the
  patch size (32 for the released models), with the VAE factor read from the DC-AE's config.
- **Samplers.** Sana ships ``DPMSolverMultistepScheduler`` in flow mode (``flow_shift``). Its
  multistep history is not in the latent, so the default sampler is ``flow-euler``:
  ``FlowMatchEulerDiscreteScheduler`` at the shipped ``flow_shift`` (what diffusers runs with
  ``FlowMatchEulerDiscreteScheduler(shift=flow_shift)`` swapped in), which resumes at any step.
  ``flow-dpm++`` runs the shipped solver as diffusers does, 0 -> T in one call only (for
  best-of-N; strategies that resume or re-noise are refused with it).
- A transformer whose ``out_channels`` is twice the latent channels also predicts a variance:
  the first half is kept, as diffusers does.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import SanaPipeline

from diffsearch.pipelines._adapter import NEGATIVE
from diffsearch.pipelines._flow import FlowDenoiser

INSTRUCTION: list[str] = inspect.signature(SanaPipeline.__call__).parameters[
    "complex_human_instruction"].default
"""diffusers' default instruction, one line per entry, prepended to every prompt."""


class SanaDenoiser(FlowDenoiser):
    """A SanaPipeline as a resumable, batched, seeded sampler (see module docstring).

    ``max_sequence_length`` is the prompt's token context (diffusers' 300);
    ``complex_human_instruction`` whether the prompt gets diffusers' instruction prepended.
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
        complex_human_instruction: bool = True,
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
        self.instruction = INSTRUCTION if complex_human_instruction else None
        """The instruction prepended to prompts (None: the bare prompt)."""
        channels = transformer.config.in_channels
        self._learned_sigma = transformer.config.out_channels == 2 * channels
        super().__init__(
            pipe, transformer, num_steps=num_steps, guidance_scale=guidance_scale,
            latent_shape=(channels, height // factor, width // factor),
            compute_batch=compute_batch, sampler=sampler, negative_prompt=negative_prompt,
        )

    def _set_timesteps(self, scheduler: Any) -> None:
        scheduler.set_timesteps(self.num_steps)  # the pipeline's call: no mu, no custom sigmas

    def _encode(self, prompt: str, negative_prompt: str | None) -> dict[str, torch.Tensor]:
        embeds, mask, negative, negative_mask = self.pipe.encode_prompt(
            prompt, do_classifier_free_guidance=self.do_guidance,
            negative_prompt=negative_prompt or "", device=self.device,
            max_sequence_length=self.max_sequence_length,
            complex_human_instruction=self.instruction)
        tensors = {"prompt_embeds": embeds, "prompt_attention_mask": mask}
        if self.do_guidance:
            tensors[NEGATIVE + "prompt_embeds"] = negative
            tensors[NEGATIVE + "prompt_attention_mask"] = negative_mask
        return tensors

    def _predict_rows(self, x: torch.Tensor, t: torch.Tensor, **rows: torch.Tensor
                      ) -> torch.Tensor:
        x, rows = self._with_unconditional(x, rows)
        timestep = t.to(self.device).expand(x.shape[0]) * self.network.config.timestep_scale
        output = self.network(
            x.to(self.dtype), encoder_hidden_states=rows["prompt_embeds"].to(self.dtype),
            encoder_attention_mask=rows["prompt_attention_mask"], timestep=timestep,
            return_dict=False,
        )[0]
        if self._learned_sigma:
            output = output.chunk(2, dim=1)[0]
        return self._guided(output)

    def _to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.pipe.vae.config.scaling_factor  # DC-AE: no shift
