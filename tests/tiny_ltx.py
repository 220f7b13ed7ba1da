"""A tiny random-weight LTXPipeline saved as a real pipeline folder (no Hub).

The VAE keeps LTX-Video's real compression: x32 in space (a 4x4 patch, then three 2x
downsamplings) and x8 in time, so a 17-frame 96x64 clip is a (C, 3, 2, 3) latent. Its decoder is
timestep-conditioned, as in LTX-Video 0.9.1 and later. The scheduler has the shipped dynamic
shift and terminal shift. Widths are multiples of 32 (see tests/tiny_pipelines.py).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLLTXVideo,
    FlowMatchEulerDiscreteScheduler,
    LTXPipeline,
    LTXVideoTransformer3DModel,
)

from tiny_pipelines import T5_WIDTH, TRANSFORMER_WIDTH, tiny_t5, write_defaults, write_t5_tokenizer

LATENT_CHANNELS = 32
LTX_DEFAULTS = {"num_steps": 3, "guidance_scale": 3.0, "height": 64, "width": 96,
                "num_frames": 17}
"""The ``diffsearch_defaults.json`` of the tiny folder: LTXPipeline's own defaults (512x704,
161 frames, 50 steps) would be far too slow for tests."""


def tiny_ltx_vae(*, inject_noise: bool = False) -> AutoencoderKLLTXVideo:
    """The tiny LTX VAE; ``inject_noise`` adds noise in its decoder's first block, as
    LTX-Video 0.9.1's does (its noise scales are set nonzero, so the noise shows)."""
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=LATENT_CHANNELS,
        block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, True, False),
        decoder_spatio_temporal_scaling=(True, True, True, False),
        decoder_inject_noise=(inject_noise, False, False, False, False),
        upsample_residual=(False, False, False, False), upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=True, patch_size=4, patch_size_t=1, scaling_factor=1.5,
        encoder_causal=True, decoder_causal=False,
    )
    with torch.no_grad():
        for name, parameter in vae.named_parameters():
            if "per_channel_scale" in name:
                parameter.fill_(0.5)
    return vae


def tiny_ltx_pipeline(tmp_path: Path, *, name: str = "tiny-ltx",
                      defaults: dict | None = LTX_DEFAULTS) -> Path:
    """Save a tiny LTXPipeline (T5 text encoder, one transformer block) and return its folder."""
    folder = tmp_path / name
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tokenizer = write_t5_tokenizer(folder / "tokenizer")
        vae = tiny_ltx_vae()
        # Non-trivial per-channel statistics, as the real checkpoint stores in its weights.
        vae.latents_mean.copy_(0.1 * torch.randn(LATENT_CHANNELS))
        vae.latents_std.copy_(0.5 + torch.rand(LATENT_CHANNELS))
        pipe = LTXPipeline(
            transformer=LTXVideoTransformer3DModel(
                in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, patch_size=1,
                patch_size_t=1, num_attention_heads=2,
                attention_head_dim=TRANSFORMER_WIDTH // 2, cross_attention_dim=TRANSFORMER_WIDTH,
                num_layers=1, caption_channels=T5_WIDTH),
            scheduler=FlowMatchEulerDiscreteScheduler(
                use_dynamic_shifting=True, base_image_seq_len=1024, max_image_seq_len=4096,
                base_shift=0.95, max_shift=2.05, shift_terminal=0.1),
            vae=vae, text_encoder=tiny_t5(tokenizer), tokenizer=tokenizer,
        )
    pipe.save_pretrained(folder, safe_serialization=True)
    write_defaults(folder, defaults)
    return folder
