"""Adapters for Wan 2.1 / 2.2: ``WanPipeline`` (text-to-video) and ``WanImageToVideoPipeline``.

One candidate is one clip. Its latent is (C, F', H / s, W / s) with F' = (F - 1) / t + 1, where
s and t are the VAE's spatial and temporal factors read from its config (8 and 4 in the
released models); a clip's frame count is therefore t k + 1, and its height and width
multiples of s times the transformer's spatial patch (16). Sizes diffusers would round are
refused instead, so a stored latent always matches the size the job asked for.

Sampling: flow matching. Wan's checkpoints ship ``UniPCMultistepScheduler`` in flow mode, a
multistep solver whose state is more than the latent. The default sampler is ``flow-euler``:
``FlowMatchEulerDiscreteScheduler`` with the model's shift (UniPC's ``flow_shift``), what
diffusers' Wan pipeline runs with that scheduler swapped in. It serves every strategy (resume,
re-noising, the SDE step for eta > 0; :mod:`diffsearch.pipelines._flow`). ``flow-unipc`` runs
the shipped UniPC itself, exactly as the pipeline does, but only 0 -> T in one call, so only
strategies that neither resume nor re-noise take it (best-of-N).

Guidance: diffusers runs the conditional and the unconditional pass as two forward calls, and
so does this adapter, each over the same fixed chunk of rows. A video transformer's activation
memory grows with the rows of a pass, so one pass over both halves would double the peak.

Wan 2.2 adds ``transformer_2`` and the pipeline's ``boundary_ratio``: steps whose timestep is at
least ``boundary_ratio * num_train_timesteps`` run ``transformer`` at ``guidance_scale``, the
later (low-noise) ones ``transformer_2`` at ``guidance_scale_2`` (default: the same scale).
Wan 2.2's 5B model (``expand_timesteps``) takes one timestep per latent token; the text-to-video
adapter gives every token the step's timestep, as the pipeline does.

Latent normalisation: per-channel ``latents_mean`` / ``latents_std`` from the VAE config (no
scaling factor), undone before the VAE decodes. :meth:`WanDenoiser.decode` returns clips
(B, F, 3, H, W) in [0, 1], as :mod:`diffsearch.pipelines.video` does.

Image-to-video (:class:`WanImageToVideoDenoiser`): the first frame conditions the clip through
the condition latents concatenated to the noisy ones (a frame mask and the VAE encoding of the
image followed by empty frames) and, for Wan 2.1's model, CLIP image-encoder embeddings. Both
are per-candidate tensors of the :class:`~diffsearch.pipelines.base.Conditioning`, added by
:meth:`WanImageToVideoDenoiser.condition_on_image`, so one batch may continue different clips.
Wan 2.2's TI2V-5B (``expand_timesteps``) conditions otherwise: the image's latent frame stands
in for the clip's first latent frame, whose tokens get timestep 0, and replaces it in the
result. The pipeline lets its own first frame drift meanwhile (the network never sees it);
here every returned state has the image's frame in place, so stored states and x0 estimates
decode to clips that start with the image, and the final clip is the pipeline's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffsearch.pipelines._adapter import NEGATIVE
from diffsearch.pipelines._flow import FlowDenoiser
from diffsearch.pipelines.base import Conditioning, DenoiseResult
from diffsearch.pipelines.sources import ModelLoadError

DEFAULT_SIZE = {"height": 480, "width": 832, "num_frames": 81}
"""diffusers' defaults for both Wan pipelines (480p, 81 frames)."""
IMAGE_CONDITION = "image_condition"
"""The first-frame condition latents of an image-to-video conditioning (mask + VAE latents)."""
IMAGE_EMBEDS = "image_embeds"
"""The CLIP image-encoder embeddings of the first frame (Wan 2.1 image-to-video only)."""


class WanDenoiser(FlowDenoiser):
    """A ``WanPipeline`` (2.1, or 2.2 with ``transformer_2``) as a resumable, batched, seeded
    sampler of whole clips (see the module docstring). ``max_sequence_length`` is the T5 token
    count (diffusers' 512); ``guidance_scale_2`` the low-noise stage's scale (Wan 2.2), an
    argument of this class only: a job's ``guidance_scale`` sets both stages, as diffusers'
    default does."""

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
        max_sequence_length: int = 512,
        guidance_scale_2: float | None = None,
    ) -> None:
        transformer = pipe.transformer
        boundary_ratio = pipe.config.boundary_ratio
        if boundary_ratio is not None and pipe.transformer_2 is None:
            raise ValueError("the pipeline's boundary_ratio switches to transformer_2, "
                             "which it does not have")
        if boundary_ratio is None and guidance_scale_2 is not None:
            raise ValueError("guidance_scale_2 is for Wan 2.2's second transformer; this "
                             "pipeline has no boundary_ratio")
        self.height = height or DEFAULT_SIZE["height"]
        self.width = width or DEFAULT_SIZE["width"]
        self.num_frames = num_frames or DEFAULT_SIZE["num_frames"]
        spatial = pipe.vae_scale_factor_spatial
        temporal = pipe.vae_scale_factor_temporal
        _, patch_h, patch_w = transformer.config.patch_size
        for name, value, multiple in (("height", self.height, spatial * patch_h),
                                      ("width", self.width, spatial * patch_w)):
            if value % multiple:
                raise ValueError(f"{name} must be a multiple of {multiple}, got {value}")
        if self.num_frames < 1 or (self.num_frames - 1) % temporal:
            raise ValueError(f"num_frames must be {temporal}k+1 (the VAE folds {temporal} "
                             f"frames into a latent frame after the first), "
                             f"got {self.num_frames}")
        self.max_sequence_length = max_sequence_length
        self.guidance_scale_2 = float(guidance_scale if guidance_scale_2 is None
                                      else guidance_scale_2)
        self.patch_size = (patch_h, patch_w)
        latent_shape = (self._latent_channels(pipe), (self.num_frames - 1) // temporal + 1,
                        self.height // spatial, self.width // spatial)
        super().__init__(
            pipe, transformer, num_steps=num_steps, guidance_scale=guidance_scale,
            latent_shape=latent_shape,  # type: ignore[arg-type]  # (C, F', H, W): a clip
            compute_batch=compute_batch, sampler=sampler, negative_prompt=negative_prompt)
        self._boundary = (None if boundary_ratio is None
                          else boundary_ratio * self._schedule.config.num_train_timesteps)
        vae_config = pipe.vae.config
        shape = (1, vae_config.z_dim, 1, 1, 1)
        self._latents_mean = torch.tensor(vae_config.latents_mean).view(shape)
        self._latents_inverse_std = 1.0 / torch.tensor(vae_config.latents_std).view(shape)

    @staticmethod
    def _latent_channels(pipe: Any) -> int:
        """The clip latent's channels as the pipeline sizes its noise."""
        return pipe.transformer.config.in_channels

    # ---- the sampler ------------------------------------------------------------------------
    def _set_timesteps(self, scheduler: Any) -> None:
        scheduler.set_timesteps(self.num_steps)  # the pipeline's call: no mu, no custom sigmas

    def _stage(self, t: torch.Tensor) -> tuple[torch.nn.Module, float]:
        """The transformer and guidance scale of the step at timestep ``t`` (Wan 2.2: the
        high-noise ``transformer`` at or above the boundary, ``transformer_2`` below)."""
        if self._boundary is None or t >= self._boundary:
            return self.network, self.guidance_scale
        return self.pipe.transformer_2, self.guidance_scale_2

    # ---- the network ------------------------------------------------------------------------
    def _encode(self, prompt: str, negative_prompt: str | None) -> dict[str, torch.Tensor]:
        embeds, negative = self.pipe.encode_prompt(
            prompt=prompt, negative_prompt=negative_prompt,
            do_classifier_free_guidance=self.do_guidance,
            max_sequence_length=self.max_sequence_length, device=self.device)
        tensors = {"prompt_embeds": embeds.to(self.dtype)}
        if self.do_guidance:
            tensors[NEGATIVE + "prompt_embeds"] = negative.to(self.dtype)
        return tensors

    def _network_input(self, x: torch.Tensor, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        """The transformer's ``hidden_states`` for the noisy latents ``x``."""
        return x.to(self.dtype)

    def _timestep(self, t: torch.Tensor, n: int) -> torch.Tensor:
        """One timestep per row, or per row and token for Wan 2.2's 5B model (the pipeline's
        token mask times t)."""
        t = t.to(self.device)
        if not self.pipe.config.expand_timesteps:
            return t.expand(n)
        return (self._token_mask() * t).flatten().expand(n, -1)

    def _token_mask(self) -> torch.Tensor:
        """Which latent tokens (F', H / patch, W / patch) are denoised: all of them."""
        _, frames, h, w = self.latent_shape  # type: ignore[misc]
        patch_h, patch_w = self.patch_size
        return torch.ones(frames, h // patch_h, w // patch_w, device=self.device)

    def _predict_rows(self, x: torch.Tensor, t: torch.Tensor, **rows: torch.Tensor
                      ) -> torch.Tensor:
        network, scale = self._stage(t)
        hidden = self._network_input(x, rows)
        timestep = self._timestep(t, x.shape[0])
        image_embeds = rows.get(IMAGE_EMBEDS)

        def velocity(text: torch.Tensor) -> torch.Tensor:
            return network(hidden_states=hidden, timestep=timestep, encoder_hidden_states=text,
                           encoder_hidden_states_image=image_embeds, return_dict=False)[0].float()

        cond = velocity(rows["prompt_embeds"])
        if not self.do_guidance:
            return cond
        uncond = velocity(rows[NEGATIVE + "prompt_embeds"])
        return uncond + scale * (cond - uncond)

    # ---- clips ------------------------------------------------------------------------------
    def _to_vae(self, latents: torch.Tensor) -> torch.Tensor:
        mean = self._latents_mean.to(latents.device, latents.dtype)
        inverse_std = self._latents_inverse_std.to(latents.device, latents.dtype)
        return latents / inverse_std + mean  # the pipeline's own expression, for its bits

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Clips (B, C, F', h, w) to frames (B, F, 3, H, W) in [0, 1]: the Wan VAE decodes a
        whole clip (it is causal in time), in fixed chunks of ``compute_batch`` clips."""
        return super().decode(latents).permute(0, 2, 1, 3, 4).contiguous()


class WanImageToVideoDenoiser(WanDenoiser):
    """A ``WanImageToVideoPipeline`` (Wan 2.1 I2V with its CLIP image encoder, or Wan 2.2 I2V's
    two transformers) as a sampler of clips that continue a first frame.

    Wan 2.2's TI2V-5B (``expand_timesteps``) pins the first latent frame instead (see the
    module docstring).

    :meth:`encode` gives the prompt alone; :meth:`condition_on_image` adds a first frame, and
    every candidate of a :meth:`denoise` call needs one.
    """

    continues_from_image = True
    """Its candidates can continue an image (:meth:`condition_on_image`), so a clip can be made
    chunk by chunk, each continuing the last frame of the one before (:mod:`diffsearch.clips`)."""

    @staticmethod
    def _latent_channels(pipe: Any) -> int:
        return pipe.vae.config.z_dim  # the transformer's input adds the condition channels

    def condition_on_image(self, cond: Conditioning, image: Image.Image | torch.Tensor
                           ) -> Conditioning:
        """``cond`` with ``image`` as the clip's first frame: a PIL image or a float tensor
        (3, H, W) in [0, 1] (a decoded frame), resized to the adapter's size as diffusers does.

        A tensor is rounded to 8-bit first: the image encoder's processor takes 8-bit pixels,
        and both encoders then see exactly what they would from the saved frame.
        """
        picture = image if isinstance(image, Image.Image) else _to_pil(image)
        pipe = self.pipe
        with torch.no_grad():
            pixels = pipe.video_processor.preprocess(picture, height=self.height,
                                                     width=self.width)
            condition = pipe.prepare_latents(
                pixels.to(self.device, torch.float32), 1, self.latent_shape[0], self.height,
                self.width, self.num_frames, torch.float32, self.device, None,
                torch.zeros(1, *self.latent_shape))[1]  # no draw: the candidates bring noise
            tensors = {IMAGE_CONDITION: condition}
            if self.network.config.image_dim is not None:  # Wan 2.1's image cross-attention
                tensors[IMAGE_EMBEDS] = pipe.encode_image(picture, self.device).to(self.dtype)
        return Conditioning(prompt=cond.prompt, tensors={**cond.tensors, **tensors},
                            negative_prompt=cond.negative_prompt)

    def _check_call(self, latents: torch.Tensor, conds: Sequence[Conditioning], start: int,
                    end: int, eta: float, generators: Sequence[torch.Generator] | None) -> None:
        super()._check_call(latents, conds, start, end, eta, generators)
        if any(IMAGE_CONDITION not in c.tensors for c in conds):
            # the user's choice of model and strategy, not a bug: one line in the CLI
            raise ModelLoadError("model: image-to-video needs a first frame for every "
                                 "candidate (condition_on_image), which this strategy does not "
                                 "give; for text-to-video use a WanPipeline folder")

    def denoise(self, latents: torch.Tensor, conds: Sequence[Conditioning], start: int,
                end: int, **options: Any) -> DenoiseResult:
        result = super().denoise(latents, conds, start, end, **options)
        if not self.pipe.config.expand_timesteps:
            return result
        first = torch.cat([c.tensors[IMAGE_CONDITION] for c in conds]).to("cpu", torch.float32)
        return DenoiseResult(latents=_with_first_frame(result.latents, first),
                             x0=_with_first_frame(result.x0, first), rows=result.rows)

    def _network_input(self, x: torch.Tensor, rows: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.pipe.config.expand_timesteps:
            return _with_first_frame(x, rows[IMAGE_CONDITION]).to(self.dtype)
        return torch.cat([x, rows[IMAGE_CONDITION]], dim=1).to(self.dtype)

    def _token_mask(self) -> torch.Tensor:
        """TI2V-5B: the first latent frame's tokens are the image's, at timestep 0."""
        mask = super()._token_mask()
        mask[0] = 0
        return mask


def _with_first_frame(clips: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """``clips`` (B, C, F', h, w) with their first latent frame replaced by ``first``
    (B, C, 1, h, w): the pipeline's (1 - mask) * condition + mask * latents, whose mask is 0 on
    that frame and 1 elsewhere, without the arithmetic."""
    return torch.cat([first.to(clips.dtype), clips[:, :, 1:]], dim=2)


def _to_pil(image: torch.Tensor) -> Image.Image:
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"the first frame must be (3, H, W), got {tuple(image.shape)}")
    pixels = (image.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    return Image.fromarray(np.ascontiguousarray(pixels.permute(1, 2, 0).numpy()))
