"""Adapter for LTXPipeline (LTX-Video): a video transformer on a flow-matching schedule with
LTX's dynamic timestep shift (like FLUX's, from the clip's token count), a T5 encoder with
attention masks, and classifier-free guidance with a negative prompt (the empty one by default).

A candidate is one clip, stored unpacked as (C, F', H', W'), the layout of the other whole-clip
families, so the store, the perturbations and the video verifiers see one layout. The
transformer's token sequence [F' * H' * W', C] is made inside each forward pass with the
pipeline's own ``_pack_latents`` / ``_unpack_latents`` (pure reshapes, bit-exact both ways).

Sizes come from the VAE and transformer configs: height and width are multiples of the VAE's
spatial compression (x32 for LTX-Video) times the patch size, and the frame count is
r * k + 1 for the VAE's temporal compression r (x8: 9, 17, ..., 161 frames). The transformer's
rotary embeddings are scaled by the frame rate ((r / frame_rate, x32, x32)), so ``frame_rate``
is a setting of the model as it is of the pipeline: like ``num_frames``, it is read from the
model folder's ``diffsearch_defaults.json``. Defaults (size, frames, frame rate, text length,
decode timestep) are the pipeline's own ``__call__`` defaults.

Latents are normalised with the per-channel mean and std the VAE stores in its weights and the
VAE's scaling factor. A timestep-conditioned VAE (LTX-Video 0.9.1 and later) is decoded at the
pipeline's default ``decode_timestep`` (0), where the pipeline adds no decode noise either. A
VAE that injects noise in its decoder (LTX-Video 0.9.1) draws it from torch's global generator,
unseeded in the pipeline; here each decode pass draws it under a fixed seed, so decoding is a
deterministic function of the latent. That noise is one (H, W) plane per layer, shared by every
clip, channel and frame of the pass, so a clip also decodes the same alone or in any batch.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from diffusers.pipelines.ltx.pipeline_ltx import calculate_shift, retrieve_timesteps

from diffsearch.pipelines._adapter import NEGATIVE
from diffsearch.pipelines._flow import FlowDenoiser

DECODE_SEED = 0
"""The seed of the noise a noise-injecting VAE decoder draws (see module docstring)."""


def pipeline_default(pipe: Any, name: str) -> Any:
    """The default of argument ``name`` of the pipeline's ``__call__``: diffusers' choice, kept
    in one place."""
    return inspect.signature(type(pipe).__call__).parameters[name].default


class LTXDenoiser(FlowDenoiser):
    """An ``LTXPipeline`` as a resumable, batched, seeded sampler of whole clips.

    Extensions of the :class:`~diffsearch.pipelines.base.Denoiser` contract, as for every
    whole-clip family: ``latent_shape`` is (C, F', H', W') and :meth:`decode` returns clips
    (B, F, 3, H, W) in [0, 1].
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
        num_frames: int | None = None,
        frame_rate: float | None = None,
        max_sequence_length: int | None = None,
        sampler: str | None = None,
        negative_prompt: str | None = None,
    ) -> None:
        transformer = pipe.transformer
        self.spatial_ratio = pipe.vae_spatial_compression_ratio
        self.temporal_ratio = pipe.vae_temporal_compression_ratio
        self.patch = transformer.config.patch_size
        self.patch_t = transformer.config.patch_size_t
        height = height or pipeline_default(pipe, "height")
        width = width or pipeline_default(pipe, "width")
        num_frames = pipeline_default(pipe, "num_frames") if num_frames is None else num_frames
        frame_rate = pipeline_default(pipe, "frame_rate") if frame_rate is None else frame_rate
        multiple = self.spatial_ratio * self.patch
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, "
                             f"got {height}x{width}")
        latent_frames = (num_frames - 1) // self.temporal_ratio + 1
        if num_frames < 1 or (num_frames - 1) % self.temporal_ratio or latent_frames % self.patch_t:
            raise ValueError(f"num_frames must be {self.temporal_ratio}k + 1 (k >= 0), "
                             f"got {num_frames}")
        if frame_rate <= 0:
            raise ValueError(f"frame_rate must be > 0, got {frame_rate}")
        self.height, self.width, self.num_frames = height, width, num_frames
        self.frame_rate = float(frame_rate)
        self.max_sequence_length = max_sequence_length or pipeline_default(
            pipe, "max_sequence_length")
        self.decode_timestep = float(pipeline_default(pipe, "decode_timestep"))
        super().__init__(
            pipe, transformer, num_steps=num_steps, guidance_scale=guidance_scale,
            latent_shape=(transformer.config.in_channels, latent_frames,
                          height // self.spatial_ratio, width // self.spatial_ratio),
            compute_batch=compute_batch, sampler=sampler, negative_prompt=negative_prompt,
        )
        self._rope_scale = (self.temporal_ratio / self.frame_rate, self.spatial_ratio,
                            self.spatial_ratio)

    def _set_timesteps(self, scheduler: Any) -> None:
        _, frames, h, w = self.latent_shape
        mu = calculate_shift(
            frames * h * w,
            scheduler.config.get("base_image_seq_len", 256),
            scheduler.config.get("max_image_seq_len", 4096),
            scheduler.config.get("base_shift", 0.5),
            scheduler.config.get("max_shift", 1.15),
        )
        sigmas = np.linspace(1.0, 1 / self.num_steps, self.num_steps)
        retrieve_timesteps(scheduler, self.num_steps, None, sigmas=sigmas, mu=mu)

    def _encode(self, prompt: str, negative_prompt: str | None) -> dict[str, torch.Tensor]:
        embeds, mask, negative, negative_mask = self.pipe.encode_prompt(
            prompt=prompt, negative_prompt=negative_prompt or "",
            do_classifier_free_guidance=self.do_guidance, num_videos_per_prompt=1,
            max_sequence_length=self.max_sequence_length, device=self.device)
        tensors = {"prompt_embeds": embeds, "prompt_attention_mask": mask}
        if self.do_guidance:
            tensors[NEGATIVE + "prompt_embeds"] = negative
            tensors[NEGATIVE + "prompt_attention_mask"] = negative_mask
        return tensors

    def _predict_rows(self, x: torch.Tensor, t: torch.Tensor, **rows: torch.Tensor
                      ) -> torch.Tensor:
        _, frames, h, w = self.latent_shape
        packed = self.pipe._pack_latents(x, self.patch, self.patch_t)
        packed, rows = self._with_unconditional(packed, rows)
        output = self.network(
            hidden_states=packed.to(self.dtype), encoder_hidden_states=rows["prompt_embeds"],
            timestep=t.to(self.device).expand(packed.shape[0]),
            encoder_attention_mask=rows["prompt_attention_mask"], num_frames=frames, height=h,
            width=w, rope_interpolation_scale=self._rope_scale, return_dict=False,
        )[0]
        return self.pipe._unpack_latents(self._guided(output), frames, h, w, self.patch,
                                         self.patch_t)

    def _to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        vae = self.pipe.vae
        return self.pipe._denormalize_latents(latents, vae.latents_mean, vae.latents_std,
                                              vae.config.scaling_factor)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Clips (B, C, F', H', W') to frames (B, F, 3, H, W) in [0, 1], in fixed chunks of
        ``compute_batch`` clips."""
        vae = self.pipe.vae

        def decode_rows(rows: torch.Tensor) -> torch.Tensor:
            timestep = None
            if vae.config.timestep_conditioning:
                timestep = torch.full((rows.shape[0],), self.decode_timestep,
                                      device=self.device, dtype=vae.dtype)
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(DECODE_SEED)
                video = vae.decode(self._to_vae(rows).to(vae.dtype), timestep,
                                   return_dict=False)[0]
            return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)

        with torch.no_grad():
            clips = self.forward_in_fixed_batches(decode_rows, latents.to(self.device))
        return clips.to("cpu", torch.float32)
