"""Tiny random-weight PixArt-Sigma, Sana and HunyuanVideo pipelines, saved as pipeline folders.

Built like :mod:`tiny_pipelines`: real diffusers / transformers classes from small configs,
tokenizers written here, weights drawn under a forked fixed RNG, nothing from the Hub. Every
per-row width the networks run elementwise ops over is 32 (see ``tiny_pipelines.
TRANSFORMER_WIDTH``), so batches stay bit-invariant. :func:`generate` runs a saved folder
through the command line, as a user would.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from click.testing import CliRunner
from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline, PixArtTransformer2DModel

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
