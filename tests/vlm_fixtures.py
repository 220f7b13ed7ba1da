"""Tiny random-weight vision-language models of three architectures, written to disk as real
transformers folders (model, tokenizer, image processor, processor with its chat template), so
the ``vlm`` verifier loads them by path exactly as it loads a published checkpoint.

Everything is built here, offline: a byte-level BPE tokenizer (exact decode round trip, so a
reply the test makes the model "generate" decodes back to the same text) with each family's chat
special tokens, merges that make "Yes" and " Yes" single tokens (the two spellings the chat
templates put first in an answer), and each image processor from its own class.

- ``qwen2-vl``: Qwen2-VL (Qwen2 decoder with M-RoPE, a windowless ViT with 2x2 patch merging);
  the answer follows ``<|im_start|>assistant\\n``, so it begins with "Yes".
- ``idefics3``: Idefics3, the architecture of SmolVLM (a Llama decoder, a SigLIP ViT with pixel
  shuffle, image tiling); its template begins with ``<|begin_of_text|>`` and the tokenizer adds
  a BOS too (the double-BOS trap), and the answer follows ``Assistant:``, so it begins with
  " Yes".
- ``llava-onevision``: LLaVA-OneVision (a Qwen2 decoder, a SigLIP ViT, "anyres" tiling: a 32 x 32
  image becomes a base view and four tiles, with a learned newline embedding after each row of
  tile features); its template writes an assistant turn as ``<|im_start|>assistant \\nYes``
  but its generation prompt ends ``<|im_start|>assistant\\n``, so the assistant turn does not
  extend the prompt, and the answer begins with "Yes".
"""

from __future__ import annotations

from pathlib import Path

import torch
from verifier_fixtures import _byte_symbols

ARCHITECTURES = ("qwen2-vl", "idefics3", "llava-onevision")

_YES_MERGES = [("Ġ", "Y"), ("ĠY", "e"), ("ĠYe", "s"), ("Y", "e"), ("Ye", "s")]
"""BPE merges (highest priority first) that make "ĠYes" (" Yes") and "Yes" single tokens."""

QWEN_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen2-VL's chat template, reduced to what a judge sends (list contents, no system turn)."""

IDEFICS3_TEMPLATE = (
    "<|begin_of_text|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)
"""Idefics3's published chat template (the one SmolVLM also uses)."""

LLAVA_ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\\n' + content['text'] }}{% endfor %}"
    "{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}"
    "{% endif %}{{'<|im_end|>'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
"""LLaVA-OneVision's published chat template (llava-hf/llava-onevision-qwen2-*-hf)."""


def _tokenizer(specials: list[str], bos: str | None, eos: str, pad: str) -> object:
    """A byte-level BPE tokenizer: every byte, the "Yes" merges, then ``specials``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: index for index, symbol in enumerate(_byte_symbols())}
    for left, right in _YES_MERGES:
        vocab[left + right] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=_YES_MERGES))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(specials)
    if bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, backend.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos,
                                   pad_token=pad)


def _random(model_class: type, config: object, seed: int) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return model_class(config).eval()


def _write_qwen2_vl(folder: Path, seed: int) -> None:
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    tokenizer = _tokenizer(specials, bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in specials}
    config = Qwen2VLConfig(
        text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "max_position_embeddings": 1024, "initializer_range": 0.5,
                     "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                         "mrope_section": [1, 1, 2]},
                     "bos_token_id": None, "eos_token_id": ids["<|im_end|>"],
                     "pad_token_id": ids["<|endoftext|>"]},
        vision_config={"depth": 1, "embed_dim": 32, "hidden_size": 32, "num_heads": 2,
                       "mlp_ratio": 2, "patch_size": 4, "spatial_merge_size": 2,
                       "temporal_patch_size": 2, "in_channels": 3},
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
    )
    _random(Qwen2VLForConditionalGeneration, config, seed).save_pretrained(folder)
    image_processor = Qwen2VLImageProcessor(patch_size=4, merge_size=2, temporal_patch_size=2,
                                            min_pixels=16 * 16, max_pixels=64 * 64)
    video_processor = Qwen2VLVideoProcessor(patch_size=4, merge_size=2, temporal_patch_size=2)
    Qwen2VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                     video_processor=video_processor,
                     chat_template=QWEN_TEMPLATE).save_pretrained(folder)


def _write_idefics3(folder: Path, seed: int) -> None:
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<fake_token_around_image>", "<image>",
                "<end_of_utterance>", "<global-img>"]
    tokenizer = _tokenizer(specials, bos="<|begin_of_text|>", eos="<end_of_utterance>",
                           pad="<|end_of_text|>")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in specials}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
    scale_factor = 2
    config = Idefics3Config(
        vision_config=vision,
        text_config={"model_type": "llama", "vocab_size": len(tokenizer), "hidden_size": 32,
                     "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "max_position_embeddings": 2048,
                     "initializer_range": 0.5,
                     "bos_token_id": ids["<|begin_of_text|>"],
                     "eos_token_id": ids["<end_of_utterance>"],
                     "pad_token_id": ids["<|end_of_text|>"]},
        image_token_id=ids["<image>"], scale_factor=scale_factor,
        pad_token_id=ids["<|end_of_text|>"],
    )
    _random(Idefics3ForConditionalGeneration, config, seed).save_pretrained(folder)
    image_processor = Idefics3ImageProcessor(size={"longest_edge": 64},
                                             max_image_size={"longest_edge": 32})
    image_seq_len = (vision["image_size"] // vision["patch_size"]) ** 2 // scale_factor ** 2
    Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                      image_seq_len=image_seq_len,
                      chat_template=IDEFICS3_TEMPLATE).save_pretrained(folder)


def _write_llava_onevision(folder: Path, seed: int) -> None:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]
    tokenizer = _tokenizer(specials, bos=None, eos="<|im_end|>", pad="<|endoftext|>")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in specials}
    view, patch = 16, 8  # a 16 x 16 view is 2 x 2 patches: 4 image features per view
    pinpoints = [[view, view], [view, 2 * view], [2 * view, view], [2 * view, 2 * view]]
    aspect_ratio = "anyres_max_4"
    config = LlavaOnevisionConfig(
        vision_config={"model_type": "siglip_vision_model", "hidden_size": 32,
                       "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": view, "patch_size": patch,
                       "vision_use_head": False},
        text_config={"model_type": "qwen2", "vocab_size": len(tokenizer), "hidden_size": 32,
                     "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                     "num_key_value_heads": 2, "max_position_embeddings": 1024,
                     "initializer_range": 0.5, "bos_token_id": None,
                     "eos_token_id": ids["<|im_end|>"], "pad_token_id": ids["<|endoftext|>"]},
        image_token_index=ids["<image>"], video_token_index=ids["<video>"],
        image_grid_pinpoints=pinpoints, vision_feature_select_strategy="full",
        vision_aspect_ratio=aspect_ratio,
    )
    _random(LlavaOnevisionForConditionalGeneration, config, seed).save_pretrained(folder)
    size = {"height": view, "width": view}
    LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints),
        video_processor=LlavaOnevisionVideoProcessor(size=size), tokenizer=tokenizer,
        num_image_tokens=(view // patch) ** 2, vision_feature_select_strategy="full",
        vision_aspect_ratio=aspect_ratio, chat_template=LLAVA_ONEVISION_TEMPLATE,
    ).save_pretrained(folder)


def write_tiny_vlm(folder: Path, architecture: str, seed: int) -> Path:
    """A tiny random ``architecture`` (one of :data:`ARCHITECTURES`) model folder."""
    writers = {"qwen2-vl": _write_qwen2_vl, "idefics3": _write_idefics3,
               "llava-onevision": _write_llava_onevision}
    folder.mkdir(parents=True, exist_ok=True)
    writers[architecture](folder, seed)
    return folder
