"""A tiny random-weight CogVideoXPipeline saved as a real pipeline folder (no Hub).

Like CogVideoX-5B it uses 3-D rotary embeddings; ``patch_size_t=2`` makes it a CogVideoX 1.5
(latent frames patched in pairs, padded at the front). The VAE compresses x8 in space and x4 in
time, as the real one does, and the scheduler is the shipped ``CogVideoXDDIMScheduler`` config
(v-prediction, SNR shift, zero terminal SNR, trailing spacing). The transformer's sample size
(4x4 latents, 9 frames) makes the pipeline's default clip 32x32 pixels and 9 frames. Widths are
multiples of 32 (see tests/tiny_pipelines.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLCogVideoX,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
)

from tiny_pipelines import T5_WIDTH, TRANSFORMER_WIDTH, tiny_t5, write_defaults, write_t5_tokenizer

TEXT_LENGTH = 16
"""The transformer's ``max_text_seq_length`` (226 for the released models)."""
COGVIDEOX_DEFAULTS = {"num_steps": 3, "guidance_scale": 3.0}
"""The ``diffsearch_defaults.json`` of the tiny folder: the family's 50 steps would be slow."""


def shipped_scheduler() -> CogVideoXDDIMScheduler:
    """The scheduler config CogVideoX-2B ships (5B differs in ``snr_shift_scale``: 1.0)."""
    return CogVideoXDDIMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
        num_train_timesteps=1000, prediction_type="v_prediction", rescale_betas_zero_snr=True,
        set_alpha_to_one=True, snr_shift_scale=3.0, steps_offset=0, timestep_spacing="trailing")


def tiny_cogvideox_pipeline(tmp_path: Path, *, patch_size_t: int | None = None,
                            name: str = "tiny-cogvideox",
                            defaults: dict | None = COGVIDEOX_DEFAULTS) -> Path:
    """Save a tiny CogVideoXPipeline (T5 text encoder, one transformer block) and return its
    folder."""
    folder = tmp_path / name
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tokenizer = write_t5_tokenizer(folder / "tokenizer")
        pipe = CogVideoXPipeline(
            transformer=CogVideoXTransformer3DModel(
                num_attention_heads=2, attention_head_dim=TRANSFORMER_WIDTH // 2, in_channels=4,
                out_channels=4, time_embed_dim=TRANSFORMER_WIDTH, text_embed_dim=T5_WIDTH,
                num_layers=1, sample_width=4, sample_height=4, sample_frames=9, patch_size=2,
                patch_size_t=patch_size_t, temporal_compression_ratio=4,
                max_text_seq_length=TEXT_LENGTH, use_rotary_positional_embeddings=True),
            vae=AutoencoderKLCogVideoX(
                in_channels=3, out_channels=3, latent_channels=4,
                down_block_types=("CogVideoXDownBlock3D",) * 4,
                up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8),
                layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4,
                scaling_factor=0.7),
            scheduler=shipped_scheduler(), text_encoder=tiny_t5(tokenizer), tokenizer=tokenizer,
        )
    pipe.save_pretrained(folder, safe_serialization=True)
    write_defaults(folder, defaults)
    return folder
