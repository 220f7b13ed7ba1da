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
from click.testing import CliRunner, Result
from diffusers import (
    AutoencoderDC,
    AutoencoderKLHunyuanVideo,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    HunyuanVideoPipeline,
    HunyuanVideoTransformer3DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
)
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizer,
    LlamaConfig,
    LlamaModel,
    PreTrainedTokenizerFast,
)

from diffsearch.cli import main
from tiny_pipelines import (
    T5_WIDTH,
    TRANSFORMER_WIDTH,
    tiny_t5,
    tiny_vae,
    write_clip_tokenizer,
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


# ---- HunyuanVideo -------------------------------------------------------------------------------
HUNYUAN_SIZE = {"height": 32, "width": 32, "num_frames": 5}
"""The tiny HunyuanVideo's clip (4x2x4x4 latents: the VAE is x8 in space and x4 in time)."""
LLAMA_SPECIALS = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<pad>", "<unk>"]
PROMPT_WORDS = ("a an the red blue green yellow circle circles square squares triangle two three "
                "at top bottom left right moving from to of on in").split()


def write_llama_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the words of HunyuanVideo's chat template and of the test
    prompts, with Llama-3's header tokens. Words, punctuation runs and single newlines are one
    token each and no BOS is added, so the template's prefix is exactly its ``crop_start`` (95)
    tokens, as with the real Llama-3 tokenizer: the crop lands on the prompt's first token."""
    template = DEFAULT_PROMPT_TEMPLATE["template"]
    text = template
    for special in LLAMA_SPECIALS:
        text = text.replace(special, " ")
    pre = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]+|\n"), "removed", invert=True)
    words = {piece for piece, _ in pre.pre_tokenize_str(text)} | set(PROMPT_WORDS)
    vocab = {token: i for i, token in enumerate([*LLAMA_SPECIALS, "{", "}", *sorted(words)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=LLAMA_SPECIALS[:3])
    tokenizer.save_pretrained(folder)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(folder)
    prefix = template.split("{}")[0]
    assert len(tokenizer(prefix).input_ids) == DEFAULT_PROMPT_TEMPLATE["crop_start"]
    return tokenizer


def tiny_hunyuan_pipeline(tmp_path: Path, *, name: str = "tiny-hunyuan") -> Path:
    """Save a tiny HunyuanVideoPipeline: a guidance-distilled video transformer (2x2 patches),
    a 3-layer Llama encoder (its third-to-last hidden state is the text embedding), a CLIP
    encoder for the pooled embedding, a 3-D causal VAE (x8, x4 in time) and the flow-matching
    Euler scheduler at HunyuanVideo's shift 7. Its defaults file names the tiny clip size."""
    folder = tmp_path / name
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tokenizer = write_llama_tokenizer(folder / "tokenizer")
        tokenizer_2 = write_clip_tokenizer(folder / "tokenizer_2")
        text_encoder = LlamaModel(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
            pad_token_id=tokenizer.pad_token_id))
        text_encoder_2 = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(tokenizer_2), hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=77,
            bos_token_id=tokenizer_2.bos_token_id, eos_token_id=tokenizer_2.eos_token_id,
            pad_token_id=tokenizer_2.pad_token_id))
        levels = 4
        vae = AutoencoderKLHunyuanVideo(
            latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * levels,
            up_block_types=("HunyuanVideoUpBlock3D",) * levels, block_out_channels=(32,) * levels,
            layers_per_block=1, norm_num_groups=4, spatial_compression_ratio=8,
            temporal_compression_ratio=4)
        transformer = HunyuanVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2,
            attention_head_dim=TRANSFORMER_WIDTH // 2, num_layers=1, num_single_layers=1,
            num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
            text_embed_dim=32, pooled_projection_dim=32, rope_axes_dim=(4, 6, 6))
        pipe = HunyuanVideoPipeline(
            text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
            scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2)
    pipe.save_pretrained(folder, safe_serialization=True)
    write_defaults(folder, {"num_steps": 3, **HUNYUAN_SIZE})
    return folder


def invoke_generate(folder: Path, out: Path, strategy: str, verifier: str, budget: str,
                    *flags: str) -> Result:
    """``diffsearch generate --model <folder>`` in-process on one thread; ``flags`` are more
    command-line flags (``--sampler``, ...)."""
    return CliRunner().invoke(main, [
        "generate", "a red circle on the left", "--model", str(folder), "--strategy", strategy,
        "--verifier", verifier, "--budget", budget, "--executor", "local", "--threads", "1",
        "--quiet", "--out", str(out), *flags])


def generate(folder: Path, out: Path, strategy: str, verifier: str, budget: str,
             *flags: str) -> dict:
    """:func:`invoke_generate` run to completion: the run's ``results.json``."""
    result = invoke_generate(folder, out, strategy, verifier, budget, *flags)
    assert result.exit_code == 0, result.output
    return json.loads((out / "results.json").read_text())
