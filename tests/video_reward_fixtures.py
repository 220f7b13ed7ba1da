"""A tiny random video reward model folder, the layout ``video-reward`` loads.

The backbone is the tiny random Qwen2-VL of :mod:`vlm_fixtures`, with what a VideoReward-style
checkpoint adds: three reward special tokens in the vocabulary (embeddings resized), a chat
template that renders a video part as Qwen2-VL's does, a video processor sized for tiny clips,
and a random linear head with its ``reward_head.json``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from vlm_fixtures import QWEN_TEMPLATE, write_tiny_vlm

REWARD_TOKENS = ["<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>"]
OUTPUTS = ["VQ", "MQ", "TA"]
QUESTION = ('Judge the video made for "{prompt}". Visual quality: <|VQ_reward|> Motion '
            'quality: <|MQ_reward|> Text alignment: <|TA_reward|> {"json": "braces kept"}')
VIDEO_TEMPLATE = QWEN_TEMPLATE.replace(
    "{% elif content['type'] == 'text' %}",
    "{% elif content['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}")
"""The tiny Qwen2-VL template with the video part of Qwen2-VL's own template."""
FRAME_PIXELS = {"shortest_edge": 16 * 16, "longest_edge": 32 * 32}
"""Video processor bounds: a 16 x 16 frame stays 16 x 16 (16 vision tokens per frame pair)."""


def write_backbone(folder: Path, seed: int) -> Path:
    """The tiny Qwen2-VL with the reward tokens added, as a VideoReward checkpoint has them."""
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    write_tiny_vlm(folder, "qwen2-vl", seed)
    processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
    processor.tokenizer.add_special_tokens({"additional_special_tokens": REWARD_TOKENS})
    processor.chat_template = VIDEO_TEMPLATE
    processor.video_processor.size = FRAME_PIXELS
    processor.save_pretrained(folder)
    model = Qwen2VLForConditionalGeneration.from_pretrained(folder, local_files_only=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.resize_token_embeddings(len(processor.tokenizer))
    model.save_pretrained(folder)
    return folder


def write_head(folder: Path, seed: int, rows: int, manifest: dict[str, Any],
               bias: bool = False) -> Path:
    """A random head of ``rows`` outputs and its manifest, into a backbone folder."""
    from safetensors.torch import save_file

    config = json.loads((folder / "config.json").read_text())
    hidden = config.get("text_config", config)["hidden_size"]
    generator = torch.Generator().manual_seed(seed)
    head = {"weight": torch.randn(rows, hidden, generator=generator)}
    if bias:
        head["bias"] = torch.randn(rows, generator=generator)
    save_file(head, str(folder / "reward_head.safetensors"))
    (folder / "reward_head.json").write_text(json.dumps(manifest))
    return folder


def reward_folder(backbone: Path, out: Path, seed: int = 0, rows: int = 3, bias: bool = False,
                  **manifest: Any) -> Path:
    """A copy of ``backbone`` with a head: VideoReward's token pooling unless ``manifest``
    says otherwise."""
    shutil.copytree(backbone, out)
    spec = {"outputs": OUTPUTS, "pooling": "tokens", "reward_tokens": REWARD_TOKENS,
            "question": QUESTION, **manifest}
    return write_head(out, seed, rows, {k: v for k, v in spec.items() if v is not None}, bias)
