"""Tiny random-weight diffusers pipelines, saved as real pipeline folders, for fast tests.

Every component is a real diffusers / transformers class built from a small config; nothing comes
from the Hub. The tokenizers are written here: a byte-level CLIP BPE vocabulary (every byte
symbol, with and without the end-of-word mark, so any text tokenizes) and, for SD3 / FLUX, a
Unigram T5 tokenizer built in code with the ``tokenizers`` backend.

Weights are drawn under a forked, fixed global RNG so a builder gives the same folder every time
and leaves the caller's RNG state alone.
"""

from __future__ import annotations

import json
import string
import warnings
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    TextToVideoSDPipeline,
    UNet2DConditionModel,
    UNet3DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
TEXT_LENGTH = 32
"""Token context of the tiny CLIP encoders (SD uses 77; shorter keeps tests fast)."""
SD_DEFAULTS = {"num_steps": 4, "guidance_scale": 3.0}
"""The ``diffsearch_defaults.json`` written beside the tiny SD pipeline: few steps, so engine
tests that load it by path stay fast."""


def _byte_symbols() -> list[str]:
    """The printable character byte-level BPE uses for each of the 256 bytes."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = iter(range(256, 512))
    table = {b: (b if b in printable else next(extra)) for b in range(256)}
    return [chr(table[b]) for b in range(256)]


def write_clip_tokenizer(folder: Path) -> CLIPTokenizer:
    """A byte-level CLIP tokenizer (vocab.json + merges.txt on disk), loaded back from the folder.

    No merges: every character is one token, which keeps the vocabulary at 514 rows. End-of-text
    gets the largest id, which CLIP's pooling looks for.
    """
    folder.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + [BOS, EOS]
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"model_max_length": TEXT_LENGTH, "tokenizer_class": "CLIPTokenizer"}))
    return CLIPTokenizer.from_pretrained(folder)


def clip_text_config(tokenizer: CLIPTokenizer, hidden: int, projection: int | None = None
                     ) -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=TEXT_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, projection_dim=projection or hidden,
    )


def tiny_vae(latent_channels: int = 4, **extra: object) -> AutoencoderKL:
    """A two-level AutoencoderKL: scale factor 2 (16x16 images, 8x8 latents)."""
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, sample_size=16, **extra,
    )


def tiny_unet(cross_attention_dim: int, **extra: object) -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=cross_attention_dim,
        attention_head_dim=4, norm_num_groups=4, **extra,
    )


def discrete_scheduler(kind: str, prediction_type: str) -> DDIMScheduler | EulerDiscreteScheduler:
    """SD 1.x-style schedules: ``ddim`` (SD 2.x's) or ``euler`` (SDXL's default)."""
    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                  beta_schedule="scaled_linear", prediction_type=prediction_type,
                  steps_offset=1, timestep_spacing="leading")
    if kind == "ddim":
        return DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **common)
    if kind == "euler":
        return EulerDiscreteScheduler(**common)
    raise ValueError(f"unknown scheduler kind {kind!r}")


def write_defaults(folder: Path, defaults: dict | None) -> None:
    if defaults is not None:
        (folder / "diffsearch_defaults.json").write_text(json.dumps(defaults))


def tiny_sd_pipeline(
    tmp_path: Path,
    *,
    scheduler: str = "ddim",
    prediction_type: str = "epsilon",
    defaults: dict | None = SD_DEFAULTS,
    name: str = "tiny-sd",
) -> Path:
    """Save a tiny StableDiffusionPipeline (16x16 images, 4x8x8 latents) and return its folder."""
    folder = tmp_path / name
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tokenizer = write_clip_tokenizer(folder / "tokenizer")
        text_encoder = CLIPTextModel(clip_text_config(tokenizer, hidden=16))
        pipe = StableDiffusionPipeline(
            vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
            unet=tiny_unet(cross_attention_dim=16),
            scheduler=discrete_scheduler(scheduler, prediction_type),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False,
        )
    pipe.save_pretrained(folder, safe_serialization=True)
    write_defaults(folder, defaults)
    return folder


def tiny_sdxl_pipeline(tmp_path: Path, *, scheduler: str = "euler",
                       prediction_type: str = "epsilon", name: str = "tiny-sdxl") -> Path:
    """Save a tiny StableDiffusionXLPipeline (two CLIP encoders, text_time conditioning)."""
    folder = tmp_path / name
    time_embed, projection = 4, 16
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tokenizer = write_clip_tokenizer(folder / "tokenizer")
        tokenizer_2 = write_clip_tokenizer(folder / "tokenizer_2")
        pipe = StableDiffusionXLPipeline(
            vae=tiny_vae(), tokenizer=tokenizer, tokenizer_2=tokenizer_2,
            text_encoder=CLIPTextModel(clip_text_config(tokenizer, hidden=16)),
            text_encoder_2=CLIPTextModelWithProjection(
                clip_text_config(tokenizer_2, hidden=16, projection=projection)),
            unet=tiny_unet(
                cross_attention_dim=32, addition_embed_type="text_time",
                addition_time_embed_dim=time_embed,
                # six time ids (original size, crop corner, target size) + the pooled text
                projection_class_embeddings_input_dim=6 * time_embed + projection),
            scheduler=discrete_scheduler(scheduler, prediction_type),
            add_watermarker=False,
        )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_video_pipeline(tmp_path: Path, *, name: str = "tiny-t2v") -> Path:
    """Save a tiny TextToVideoSDPipeline (a 3-D UNet over (C, F, H, W) latents, SD's text
    encoder and VAE: 16x16 frames, 8x8 latents)."""
    folder = tmp_path / name
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tokenizer = write_clip_tokenizer(folder / "tokenizer")
        unet = UNet3DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
            block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
            up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=16,
            attention_head_dim=4, norm_num_groups=4)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the pipeline is marked deprecated
            pipe = TextToVideoSDPipeline(
                vae=tiny_vae(), text_encoder=CLIPTextModel(clip_text_config(tokenizer, 16)),
                tokenizer=tokenizer, unet=unet, scheduler=discrete_scheduler("ddim", "epsilon"))
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


# ---- flow-matching families: SD3, FLUX ---------------------------------------------------------
T5_WIDTH = 32
TRANSFORMER_WIDTH = 32
"""Inner width of the tiny SD3/FLUX transformers (2 heads of 16). Per-candidate rows of
elementwise ops (the timestep embedding is (B, width)) must be a multiple of the CPU kernels'
unrolled SIMD width (2 x 16 floats with AVX-512): a row that ends in the kernels' scalar tail is
computed by a different code path, so its bits would depend on its position in the batch."""
FLUX_SIZE = {"height": 16, "width": 16}
FLOW_VAE = {"shift_factor": 0.06, "scaling_factor": 1.5}
"""SD3/FLUX VAEs shift as well as scale their latents; non-trivial values test both."""


def write_t5_tokenizer(folder: Path) -> T5TokenizerFast:
    """A Unigram T5 tokenizer over letters, digits and punctuation (with and without the word-start
    mark), built with the tokenizers backend and saved as tokenizer.json: no sentencepiece."""
    chars = string.ascii_letters + string.digits + ",.!?'-"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + c, -3.0) for c in chars] + [(c, -4.0) for c in chars]
    T5TokenizerFast(vocab=vocab, extra_ids=0).save_pretrained(folder)
    return T5TokenizerFast.from_pretrained(folder)


def tiny_t5(tokenizer: T5TokenizerFast) -> T5EncoderModel:
    return T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=T5_WIDTH, d_ff=2 * T5_WIDTH, d_kv=8, num_layers=2,
        num_heads=4, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id))


def tiny_sd3_pipeline(tmp_path: Path, *, shift: float = 3.0, name: str = "tiny-sd3") -> Path:
    """Save a tiny StableDiffusion3Pipeline (MMDiT, two CLIP encoders and a T5; load it with
    ``text_encoder_3=None, tokenizer_3=None`` for SD3 without T5)."""
    folder = tmp_path / name
    clip_width = T5_WIDTH // 2  # the two CLIP widths, concatenated, are padded to the T5 width
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tokenizer = write_clip_tokenizer(folder / "tokenizer")
        tokenizer_2 = write_clip_tokenizer(folder / "tokenizer_2")
        tokenizer_3 = write_t5_tokenizer(folder / "tokenizer_3")
        pipe = StableDiffusion3Pipeline(
            transformer=SD3Transformer2DModel(
                sample_size=8, patch_size=1, in_channels=4, out_channels=4, num_layers=2,
                attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5_WIDTH,
                caption_projection_dim=TRANSFORMER_WIDTH, pooled_projection_dim=2 * clip_width,
                pos_embed_max_size=16),
            scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
            vae=tiny_vae(**FLOW_VAE),
            text_encoder=CLIPTextModelWithProjection(
                clip_text_config(tokenizer, hidden=clip_width)),
            tokenizer=tokenizer,
            text_encoder_2=CLIPTextModelWithProjection(
                clip_text_config(tokenizer_2, hidden=clip_width)),
            tokenizer_2=tokenizer_2,
            text_encoder_3=tiny_t5(tokenizer_3),
            tokenizer_3=tokenizer_3,
        )
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def tiny_flux_pipeline(tmp_path: Path, *, guidance_embeds: bool = True,
                       name: str = "tiny-flux") -> Path:
    """Save a tiny FluxPipeline (4-channel latents packed 2x2 into 16-wide tokens).

    FluxPipeline's default size is fixed at 1024, so the folder's ``diffsearch_defaults.json``
    names the tiny size (16x16)."""
    folder = tmp_path / name
    latent_channels = 4
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tokenizer = write_clip_tokenizer(folder / "tokenizer")
        tokenizer_2 = write_t5_tokenizer(folder / "tokenizer_2")
        pipe = FluxPipeline(
            transformer=FluxTransformer2DModel(
                patch_size=1, in_channels=4 * latent_channels, num_layers=1,
                num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                joint_attention_dim=T5_WIDTH, pooled_projection_dim=16,
                guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8)),
            scheduler=FlowMatchEulerDiscreteScheduler(
                use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256,
                base_shift=0.5, max_shift=1.15),
            vae=tiny_vae(latent_channels=latent_channels, **FLOW_VAE),
            text_encoder=CLIPTextModel(clip_text_config(tokenizer, hidden=16)),
            tokenizer=tokenizer,
            text_encoder_2=tiny_t5(tokenizer_2),
            tokenizer_2=tokenizer_2,
        )
    pipe.save_pretrained(folder, safe_serialization=True)
    write_defaults(folder, FLUX_SIZE)
    return folder
