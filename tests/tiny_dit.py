"""Tiny random-weight PixArt-Sigma, Sana and HunyuanVideo pipelines, saved as pipeline folders.

Built like :mod:`tiny_pipelines`: real diffusers / transformers classes from small configs,
tokenizers written here, weights drawn under a forked fixed RNG, nothing from the Hub. Every
per-row width the networks run elementwise ops over is 32 (see ``tiny_pipelines.
TRANSFORMER_WIDTH``), so batches stay bit-invariant. :func:`generate` runs a saved folder
through the command line, as a user would.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from click.testing import CliRunner
from diffusers import (
    AutoencoderDC,
    DPMSolverMultistepScheduler,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
)
from transformers import Gemma2Config, Gemma2Model, GemmaTokenizer

from diffsearch.cli import main
from tiny_pipelines import (
    T5_WIDTH,
    TRANSFORMER_WIDTH,
    tiny_t5,
    tiny_vae,
    write_defaults,
    write_t5_tokenizer,
)

PIXART_SIZE = 16
"""Pixels per side of the tiny PixArt's default image (8x8 latents, 2x2 patches)."""


def tiny_pixart_pipeline(tmp_path: Path, *, defaults: dict | None = None,
                         name: str = "tiny-pixart") -> Path:
    """Save a tiny PixArtSigmaPipeline: a 2-layer DiT with 2x2 patches predicting a learned
    variance (8 output channels for 4 latent ones), a T5 encoder, a scale-2 VAE and, as
    PixArt-Sigma ships, a DPM-Solver++ scheduler."""
    folder = tmp_path / name
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tokenizer = write_t5_tokenizer(folder / "tokenizer")
        pipe = PixArtSigmaPipeline(
            tokenizer=tokenizer, text_encoder=tiny_t5(tokenizer),
            vae=tiny_vae(),
            transformer=PixArtTransformer2DModel(
                num_attention_heads=2, attention_head_dim=TRANSFORMER_WIDTH // 2, in_channels=4,
                out_channels=8, num_layers=2, cross_attention_dim=TRANSFORMER_WIDTH,
                sample_size=PIXART_SIZE // 2, patch_size=2, caption_channels=T5_WIDTH),
            scheduler=DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2),
        )
    pipe.save_pretrained(folder, safe_serialization=True)
    write_defaults(folder, defaults)
    return folder


# ---- Sana ---------------------------------------------------------------------------------------
SANA_SIZE = 32
"""Pixels per side of the tiny Sana's default image: SanaPipeline takes multiples of 32 only."""
SANA_FLOW_SHIFT = 3.0
"""The shift of Sana's shipped flow DPM-Solver (1024px checkpoints)."""
GEMMA_WIDTH = 32


def write_gemma_tokenizer(folder: Path) -> GemmaTokenizer:
    """A character-level Gemma tokenizer (BPE without merges, byte fallback for the rest) that
    adds ``<bos>`` as Gemma's does, saved as tokenizer.json: no sentencepiece model."""
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]
    chars = ["\u2581", *(c for c in string.printable if not c.isspace()), "\n"]
    tokens = specials + chars + [f"<0x{b:02X}>" for b in range(256)]
    GemmaTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[],
                   add_bos_token=True).save_pretrained(folder)
    return GemmaTokenizer.from_pretrained(folder)


def tiny_dc_ae(latent_channels: int = 4) -> AutoencoderDC:
    """A three-level DC-AE (Sana's VAE): scale factor 4, so 32x32 images have 8x8 latents."""
    levels = 3
    return AutoencoderDC(
        in_channels=3, latent_channels=latent_channels, attention_head_dim=8,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(32,) * levels, decoder_block_out_channels=(32,) * levels,
        encoder_layers_per_block=(1,) * levels, decoder_layers_per_block=(1,) * levels,
        encoder_qkv_multiscales=((), (), (5,)), decoder_qkv_multiscales=((), (), (5,)),
        scaling_factor=0.41407)


def tiny_sana_pipeline(tmp_path: Path, *, out_channels: int = 4, defaults: dict | None = None,
                       name: str = "tiny-sana") -> Path:
    """Save a tiny SanaPipeline: a 2-layer linear-attention DiT over a Gemma-2 encoder, a DC-AE
    and, as Sana ships, DPM-Solver++ in flow mode. ``out_channels=8`` makes a transformer that
    also predicts a learned variance."""
    folder = tmp_path / name
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tokenizer = write_gemma_tokenizer(folder / "tokenizer")
        text_encoder = Gemma2Model(Gemma2Config(
            vocab_size=len(tokenizer), hidden_size=GEMMA_WIDTH, intermediate_size=2 * GEMMA_WIDTH,
            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=2048, pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
        pipe = SanaPipeline(
            tokenizer=tokenizer, text_encoder=text_encoder, vae=tiny_dc_ae(),
            transformer=SanaTransformer2DModel(
                in_channels=4, out_channels=out_channels, num_attention_heads=2,
                attention_head_dim=TRANSFORMER_WIDTH // 2, num_layers=2,
                num_cross_attention_heads=2, cross_attention_head_dim=TRANSFORMER_WIDTH // 2,
                cross_attention_dim=TRANSFORMER_WIDTH, caption_channels=GEMMA_WIDTH,
                sample_size=SANA_SIZE // 4, patch_size=1),
            scheduler=DPMSolverMultistepScheduler(
                algorithm_type="dpmsolver++", solver_order=2, prediction_type="flow_prediction",
                use_flow_sigmas=True, flow_shift=SANA_FLOW_SHIFT),
        )
    pipe.save_pretrained(folder, safe_serialization=True)
    write_defaults(folder, defaults)
    return folder


def generate(folder: Path, out: Path, strategy: str, verifier: str, budget: str,
             *options: str) -> dict:
    """``diffsearch generate --model <folder>`` in-process on one thread, run to completion:
    the run's ``results.json``. ``options`` are ``--option`` values (``key=value``)."""
    flags = [flag for option in options for flag in ("--option", option)]
    result = CliRunner().invoke(main, [
        "generate", "a red circle", "--model", str(folder), "--strategy", strategy, *flags,
        "--verifier", verifier, "--budget", budget, "--executor", "local", "--threads", "1",
        "--quiet", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return json.loads((out / "results.json").read_text())
