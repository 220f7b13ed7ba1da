"""Tiny random-weight Wan pipelines (2.1 and 2.2, text- and image-to-video), saved as folders.

The components are diffusers' and transformers' own classes from small configs, as in
:mod:`tiny_pipelines`: a T5 encoder and tokenizer written in code, a Wan VAE with Wan's real
factors (x8 in space, x4 in time: four levels, two of them temporal) but 4 base channels, and
Wan transformers two heads of 16 wide (32: see ``tiny_pipelines.TRANSFORMER_WIDTH`` on SIMD
tails). 32x32 frames give 4x4 latents, 2x2 tokens of the (1, 2, 2) patches.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLWan,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
)
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    T5TokenizerFast,
    UMT5Config,
    UMT5EncoderModel,
)

from tiny_pipelines import T5_WIDTH, TRANSFORMER_WIDTH, write_defaults, write_t5_tokenizer

LATENT_CHANNELS = 4
IMAGE_WIDTH = 32
"""Width of the tiny CLIP image encoder (the Wan 2.1 I2V transformer's ``image_dim``)."""
SIZE = {"height": 32, "width": 32, "num_frames": 5}
"""The size every tiny Wan folder's ``diffsearch_defaults.json`` names (5 frames: 2 latent)."""
WAN_DEFAULTS = {**SIZE, "num_steps": 4, "guidance_scale": 3.0}
BOUNDARY_RATIO = 0.7
"""Wan 2.2's switch: timesteps >= 700 (of 1000) run ``transformer``, the lower ones
``transformer_2``; at 4 steps of shift 3 that is two steps each."""


def tiny_umt5(tokenizer: T5TokenizerFast) -> UMT5EncoderModel:
    """Wan's text encoder class (UMT5), as small as ``tiny_pipelines.tiny_t5``."""
    return UMT5EncoderModel(UMT5Config(
        vocab_size=len(tokenizer), d_model=T5_WIDTH, d_ff=2 * T5_WIDTH, d_kv=8, num_layers=2,
        num_heads=4, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id))


def tiny_wan_vae() -> AutoencoderKLWan:
    return AutoencoderKLWan(base_dim=4, z_dim=LATENT_CHANNELS, dim_mult=[1, 1, 1, 1],
                            num_res_blocks=1, temperal_downsample=[False, True, True],
                            latents_mean=[0.1, -0.2, 0.3, 0.0],
                            latents_std=[1.5, 0.8, 2.0, 1.2])


def tiny_wan_transformer(*, in_channels: int = LATENT_CHANNELS,
                         image_dim: int | None = None) -> WanTransformer3DModel:
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=TRANSFORMER_WIDTH // 2,
        in_channels=in_channels, out_channels=LATENT_CHANNELS, text_dim=T5_WIDTH, freq_dim=32,
        ffn_dim=2 * TRANSFORMER_WIDTH, num_layers=2, cross_attn_norm=True,
        qk_norm="rms_norm_across_heads", rope_max_seq_len=32, image_dim=image_dim)


def wan_scheduler(kind: str) -> FlowMatchEulerDiscreteScheduler | UniPCMultistepScheduler:
    """``euler``: flow matching with Wan's shift; ``unipc``: the scheduler real Wan checkpoints
    ship (UniPC in flow mode, its shift named ``flow_shift``)."""
    if kind == "euler":
        return FlowMatchEulerDiscreteScheduler(shift=3.0)
    if kind == "unipc":
        return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                       flow_shift=3.0)
    raise ValueError(f"unknown scheduler kind {kind!r}")


def tiny_wan_pipeline(tmp_path: Path, *, two_stage: bool = False, scheduler: str = "euler",
                      name: str = "tiny-wan") -> Path:
    """Save a tiny WanPipeline: Wan 2.1, or with ``two_stage`` Wan 2.2's pair of transformers
    switched at :data:`BOUNDARY_RATIO`."""
    folder = tmp_path / name
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tokenizer = write_t5_tokenizer(folder / "tokenizer")
        pipe = WanPipeline(
            tokenizer=tokenizer, text_encoder=tiny_umt5(tokenizer), vae=tiny_wan_vae(),
            scheduler=wan_scheduler(scheduler), transformer=tiny_wan_transformer(),
            transformer_2=tiny_wan_transformer() if two_stage else None,
            boundary_ratio=BOUNDARY_RATIO if two_stage else None)
    pipe.save_pretrained(folder, safe_serialization=True)
    write_defaults(folder, WAN_DEFAULTS)
    return folder


I2V_KINDS = ("wan2.1", "wan2.2", "ti2v")


def tiny_wan_i2v_pipeline(tmp_path: Path, *, kind: str = "wan2.1",
                          name: str = "tiny-wan-i2v") -> Path:
    """Save a tiny WanImageToVideoPipeline of one of Wan's three kinds:

    - ``wan2.1``: the first-frame condition latents (a frame mask and the VAE latents of the
      image followed by empty frames) concatenated to the noisy ones, and a CLIP image encoder;
    - ``wan2.2``: the same condition latents, no image encoder, two transformers;
    - ``ti2v`` (Wan 2.2 TI2V-5B, ``expand_timesteps``): the image's latent frame stands in for
      the clip's first latent frame, whose tokens get timestep 0.
    """
    if kind not in I2V_KINDS:
        raise ValueError(f"unknown kind {kind!r}")
    folder = tmp_path / name
    temporal_mask = 4  # one mask channel per frame folded into a latent frame
    in_channels = LATENT_CHANNELS if kind == "ti2v" else 2 * LATENT_CHANNELS + temporal_mask
    two_stage = kind == "wan2.2"
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tokenizer = write_t5_tokenizer(folder / "tokenizer")
        image_encoder = None if kind != "wan2.1" else CLIPVisionModel(CLIPVisionConfig(
            hidden_size=IMAGE_WIDTH, projection_dim=IMAGE_WIDTH, num_hidden_layers=2,
            num_attention_heads=2, image_size=32, intermediate_size=2 * IMAGE_WIDTH,
            patch_size=8))
        pipe = WanImageToVideoPipeline(
            tokenizer=tokenizer, text_encoder=tiny_umt5(tokenizer), vae=tiny_wan_vae(),
            scheduler=wan_scheduler("euler"),
            image_processor=(CLIPImageProcessor(crop_size=32, size=32) if image_encoder
                             else None),
            image_encoder=image_encoder,
            transformer=tiny_wan_transformer(in_channels=in_channels,
                                             image_dim=IMAGE_WIDTH if image_encoder else None),
            transformer_2=tiny_wan_transformer(in_channels=in_channels) if two_stage else None,
            boundary_ratio=BOUNDARY_RATIO if two_stage else None,
            expand_timesteps=kind == "ti2v")
    pipe.save_pretrained(folder, safe_serialization=True)
    write_defaults(folder, WAN_DEFAULTS)
    return folder
