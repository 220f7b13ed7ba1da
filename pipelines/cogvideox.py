"""Adapter for CogVideoXPipeline (CogVideoX 2B / 5B, and 1.5): a video transformer on
CogVideoX's own DDIM schedule (``CogVideoXDDIMScheduler``: v-prediction on an SNR-shifted,
zero-terminal-SNR noise schedule), a T5 encoder, and classifier-free guidance with a negative
prompt (the empty one by default).

The pipeline lays latents out frames first, [B, F', C, H, W]. A candidate is stored as
(C, F', H, W), the layout of the other whole-clip families (so the store, the perturbations and
the video verifiers see one layout), and permuted for each forward pass (a pure reshape).
Text is padded to the transformer's ``max_text_seq_length`` (226 tokens for the released
models): its positional embeddings are laid out for exactly that many tokens. The 3-D rotary
embeddings of the models that use them (5B, 1.5) depend only on the clip's size and are built
once, with the pipeline's own ``_prepare_rotary_positional_embeddings``. CogVideoX 1.5
(``patch_size_t``) pads the latent frames at the front to a multiple of it, as the pipeline
does; the padding frames are part of the candidate's state and dropped before decoding.

Samplers: ``ddim`` only, the scheduler's own deterministic step. ``CogVideoXDDIMScheduler
.step`` takes an ``eta`` but ignores it, so the stochastic step (eta > 0) is DDIM's eta step
computed here over the same schedule, its noise from each candidate's generator. The
pipeline's alternative, ``CogVideoXDPMScheduler`` (DPM-Solver++ 2M with fresh noise at every
step), keeps the previous step's x0 estimate and takes another ``step()`` signature: the latent
alone does not resume it, so it is not offered; a model folder that ships it is run as DDIM over
the same noise schedule (a warning says so), as the UNet families do with multistep
schedulers. The pipeline's ``use_dynamic_cfg`` (a guidance scale that changes over the steps)
is not offered either: the guidance scale is constant.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from diffusers import CogVideoXDDIMScheduler

from diffsearch.pipelines._adapter import NEGATIVE, DiffusersDenoiser
from diffsearch.pipelines._discrete import DDIMSampler, DiscreteHooks

log = logging.getLogger(__name__)

SAMPLER = "ddim"


class CogVideoXDDIMSampler(DDIMSampler):
    """DDIM over ``CogVideoXDDIMScheduler``'s schedule: its own step at eta = 0, above it the eta
    step of diffusers' ``DDIMScheduler`` (which this scheduler does not take) over the same
    SNR-shifted ``alphas_cumprod``. The forward process is DDIM's (:class:`DDIMSampler`)."""

    def _step_alphas(self, step: int) -> tuple[float, float]:
        """alpha-bar of the step's timestep and of the one it lands on, as the scheduler's
        ``step`` reads them. (With trailing spacing and T not dividing 1000 the timestep can sit
        one below where the previous step landed; the step's own noise level is the one its x0
        estimate used.)"""
        s = self.schedule
        t = int(s.timesteps[step])
        prev = t - s.config.num_train_timesteps // s.num_inference_steps
        return (float(s.alphas_cumprod[t]),
                float(s.alphas_cumprod[prev] if prev >= 0 else s.final_alpha_cumprod))

    def step(self, scheduler: Any, step: int, x: torch.Tensor, output: torch.Tensor, eta: float,
             noise: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        x_next, x0 = scheduler.step(output, scheduler.timesteps[step], x, return_dict=False)
        if eta > 0:
            a_t, a_next = self._step_alphas(step)
            eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
            up = eta * self.step_noise_std(step)
            x_next = (math.sqrt(a_next) * x0 + math.sqrt(max(1 - a_next - up**2, 0.0)) * eps
                      + up * noise)
        return x_next, x0

    def step_noise_std(self, step: int) -> float:
        a_t, a_next = self._step_alphas(step)
        return math.sqrt(max((1 - a_next) / (1 - a_t) * (1 - a_t / a_next), 0.0))


class CogVideoXDenoiser(DiscreteHooks, DiffusersDenoiser):
    """A ``CogVideoXPipeline`` as a resumable, batched, seeded sampler of whole clips.

    ``height`` / ``width`` / ``num_frames`` default to the pipeline's (the transformer's sample
    size times the VAE factor, and its ``sample_frames``). Extensions of the
    :class:`~diffsearch.pipelines.base.Denoiser` contract, as for every whole-clip family:
    ``latent_shape`` is (C, F', H', W') and :meth:`decode` returns clips (B, F, 3, H, W) in
    [0, 1].
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
        sampler: str | None = None,
        negative_prompt: str | None = None,
    ) -> None:
        if sampler not in (None, SAMPLER):
            raise ValueError(f"sampler {sampler!r} is not for CogVideoX models; they take: "
                             f"{SAMPLER} (CogVideoX's own SNR-shifted DDIM schedule)")
        if not isinstance(pipe.scheduler, CogVideoXDDIMScheduler):
            log.warning("%s keeps a history across steps and cannot resume from a latent; "
                        "using CogVideoXDDIMScheduler with the same noise schedule",
                        type(pipe.scheduler).__name__)
        self._scheduler_config = dict(CogVideoXDDIMScheduler.from_config(
            pipe.scheduler.config).config)
        transformer = pipe.transformer
        config = transformer.config
        spatial, temporal = pipe.vae_scale_factor_spatial, pipe.vae_scale_factor_temporal
        height = height or config.sample_height * spatial
        width = width or config.sample_width * spatial
        num_frames = config.sample_frames if num_frames is None else num_frames
        multiple = spatial * config.patch_size
        if height % multiple or width % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, "
                             f"got {height}x{width}")
        if num_frames < 1 or (num_frames - 1) % temporal:
            raise ValueError(f"num_frames must be {temporal}k + 1 (k >= 0), got {num_frames}")
        self.height, self.width, self.num_frames = height, width, num_frames
        latent_frames = (num_frames - 1) // temporal + 1
        patch_t = config.patch_size_t or 1
        self.padding_frames = -latent_frames % patch_t
        """Latent frames CogVideoX 1.5 puts in front of the clip (dropped before decoding)."""
        self.max_sequence_length = config.max_text_seq_length
        super().__init__(
            pipe, transformer, num_steps=num_steps, guidance_scale=guidance_scale,
            latent_shape=(config.in_channels, latent_frames + self.padding_frames,
                          height // spatial, width // spatial),
            sampler=SAMPLER, compute_batch=compute_batch, negative_prompt=negative_prompt,
        )
        self._sampler = CogVideoXDDIMSampler(self._schedule)
        self._rotary = None
        if config.use_rotary_positional_embeddings:
            self._rotary = pipe._prepare_rotary_positional_embeddings(
                height, width, self.latent_shape[1], self.device)

    # ---- hooks ------------------------------------------------------------------------------
    def _new_scheduler(self) -> CogVideoXDDIMScheduler:
        scheduler = CogVideoXDDIMScheduler.from_config(self._scheduler_config)
        scheduler.set_timesteps(self.num_steps)
        return scheduler

    def _encode(self, prompt: str, negative_prompt: str | None) -> dict[str, torch.Tensor]:
        positive, negative = self.pipe.encode_prompt(
            prompt, negative_prompt or "", self.do_guidance, num_videos_per_prompt=1,
            max_sequence_length=self.max_sequence_length, device=self.device)
        tensors = {"prompt_embeds": positive}
        if self.do_guidance:
            tensors[NEGATIVE + "prompt_embeds"] = negative
        return tensors

    def _predict_rows(self, x: torch.Tensor, t: torch.Tensor, **rows: torch.Tensor
                      ) -> torch.Tensor:
        frames_first = x.permute(0, 2, 1, 3, 4)  # the pipeline's [B, F', C, H, W]
        frames_first, rows = self._with_unconditional(frames_first, rows)
        output = self.network(
            hidden_states=frames_first.to(self.dtype), encoder_hidden_states=rows["prompt_embeds"],
            timestep=t.to(self.device).expand(frames_first.shape[0]),
            image_rotary_emb=self._rotary, return_dict=False,
        )[0]
        return self._guided(output).permute(0, 2, 1, 3, 4)

    def _to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        return latents / self.pipe.vae_scaling_factor_image

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Clips (B, C, F', H', W') to frames (B, F, 3, H, W) in [0, 1], in fixed chunks of
        ``compute_batch`` clips, without CogVideoX 1.5's padding frames."""
        vae = self.pipe.vae

        def decode_rows(rows: torch.Tensor) -> torch.Tensor:
            clip = self._to_vae(rows[:, :, self.padding_frames:]).to(vae.dtype)
            video = vae.decode(clip, return_dict=False)[0]
            return (video.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 1, 3, 4)

        with torch.no_grad():
            clips = self.forward_in_fixed_batches(decode_rows, latents.to(self.device))
        return clips.to("cpu", torch.float32)
