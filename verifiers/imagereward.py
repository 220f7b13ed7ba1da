"""``imagereward``: ImageReward (Xu et al. 2023) on transformers' BLIP modules, without the
``image-reward`` package (it pins old transformers/timm and imports removed transformers APIs).

ImageReward is BLIP: a ViT-L/16 image encoder, a BERT text encoder that cross-attends to the
image tokens, and the LAION-aesthetic-style MLP head on the text encoder's first ([CLS]) token,
normalised with the training set's mean and std. Scores are ~N(0, 1) over generated images
(higher is better; good samples ~1..2).

Checkpoint ``ImageReward.pt`` (a plain state dict of the original code's modules) maps onto
transformers as follows; nothing else is converted and every tensor is loaded strictly:

- ``blip.visual_encoder.*`` (timm-style ViT) -> ``BlipVisionModel``: ``cls_token`` ->
  ``embeddings.class_embedding``, ``pos_embed`` -> ``embeddings.position_embedding``,
  ``patch_embed.proj`` -> ``embeddings.patch_embedding``, ``blocks.i.{norm1, attn.qkv, attn.proj,
  norm2, mlp.fc1, mlp.fc2}`` -> ``encoder.layers.i.{layer_norm1, self_attn.qkv,
  self_attn.projection, layer_norm2, mlp.fc1, mlp.fc2}``, ``norm`` -> ``post_layernorm``. The
  fused qkv projection has the same (q, k, v) x heads layout in both. LayerNorm eps 1e-6.
- ``blip.text_encoder.*`` (BLIP's "med" BERT) -> ``BlipTextModel`` with the same key names (it
  is the same module family); the non-trainable ``embeddings.position_ids`` buffer is dropped.
  Its config comes from the checkpoint's ``med_config.json`` with ``encoder_width`` = ViT width.
- ``mlp.*`` -> :class:`~diffsearch.verifiers.aesthetic.AestheticMlp` (same layout).
- ``blip.vision_proj`` / ``blip.text_proj`` (contrastive heads) are unused by the reward.

The ViT's head count is not stored in the weights: BLIP uses 64-wide heads (ViT-B 12, ViT-L 16),
so ``vision_heads`` defaults to width / 64.

Weights: ``ImageReward.pt`` and ``med_config.json`` of the Hugging Face repo ``THUDM/ImageReward``
and the ``bert-base-uncased`` tokenizer, all from the local cache. Options: ``weights`` (a local
ImageReward.pt; ``med_config`` then defaults to the med_config.json beside it), ``med_config``,
``tokenizer`` (folder or cached id), ``vision_heads``, ``allow_download``, ``dtype``, ``chunk``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from diffsearch.verifiers._preprocess import (
    DEFAULT_CHUNK,
    check_batch,
    clip_pixels,
    encode_fixed_chunks,
    resolve_dtype,
)
from diffsearch.verifiers._weights import (
    check_tokenizer,
    from_pretrained_local,
    hub_file,
    local_file,
)
from diffsearch.verifiers.aesthetic import AestheticMlp
from diffsearch.verifiers.base import Verifier, VerifierError

IMAGEREWARD_REPO = "THUDM/ImageReward"
REWARD_MEAN = 0.16717362830052426
"""Mean and std of the raw head output over ImageReward's training set (from its release)."""
REWARD_STD = 1.0333394966054072
PROMPT_TOKENS = 35
"""ImageReward pads/truncates prompts to 35 tokens, as it was trained."""

_VISION_RENAMES = [
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.(fc[12])\.", r"encoder.layers.\1.mlp.\2."),
    (r"^norm\.", "post_layernorm."),
]


def _rename_vision(key: str) -> str:
    for pattern, replacement in _VISION_RENAMES:
        renamed, count = re.subn(pattern, replacement, key)
        if count:
            return renamed
    raise VerifierError(f"ImageReward checkpoint: unexpected vision key blip.visual_encoder.{key}")


def split_checkpoint(state: dict[str, torch.Tensor]) -> tuple[dict, dict, dict]:
    """(vision, text, head) state dicts in transformers' / AestheticMlp's names."""
    parts: tuple[dict, dict, dict] = ({}, {}, {})
    for key, value in state.items():
        if key.startswith("blip.visual_encoder."):
            parts[0][_rename_vision(key.removeprefix("blip.visual_encoder."))] = value
        elif key.startswith("blip.text_encoder."):
            name = key.removeprefix("blip.text_encoder.")
            if name != "embeddings.position_ids":
                parts[1][name] = value
        elif key.startswith("mlp."):
            parts[2][key.removeprefix("mlp.")] = value
    names = ("blip.visual_encoder", "blip.text_encoder", "mlp")
    for part, what in zip(parts, names, strict=True):
        if not part:
            raise VerifierError(f"not an ImageReward checkpoint: no {what}.* tensors")
    return parts


def _vision_model(state: dict[str, torch.Tensor], heads: int | None) -> torch.nn.Module:
    from transformers import BlipVisionConfig
    from transformers.models.blip.modeling_blip import BlipVisionModel

    width = int(state["embeddings.class_embedding"].shape[-1])
    patch = int(state["embeddings.patch_embedding.weight"].shape[-1])
    tokens = int(state["embeddings.position_embedding"].shape[1]) - 1
    layers = len({k.split(".")[2] for k in state if k.startswith("encoder.layers.")})
    config = BlipVisionConfig(
        hidden_size=width, intermediate_size=int(state["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        num_hidden_layers=layers, num_attention_heads=heads or max(1, width // 64),
        image_size=round(tokens ** 0.5) * patch, patch_size=patch, layer_norm_eps=1e-6,
        hidden_act="gelu",
    )
    if width % config.num_attention_heads:
        raise VerifierError(f"vision_heads={config.num_attention_heads} does not divide the "
                            f"ViT width {width}")
    return _load_strict(BlipVisionModel(config), state, "ImageReward vision encoder")


def _text_model(med_config: dict[str, Any], encoder_width: int,
                state: dict[str, torch.Tensor]) -> torch.nn.Module:
    from transformers import BlipTextConfig
    from transformers.models.blip.modeling_blip_text import BlipTextModel

    fields = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size", "max_position_embeddings", "layer_norm_eps", "hidden_act",
              "pad_token_id")
    config = BlipTextConfig(**{k: med_config[k] for k in fields if k in med_config},
                            encoder_hidden_size=encoder_width, is_decoder=True)
    # is_decoder=True only creates the cross-attention layers; the forward runs bidirectionally.
    return _load_strict(BlipTextModel(config, add_pooling_layer=False), state,
                        "ImageReward text encoder")


def _load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor],
                 what: str) -> torch.nn.Module:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as error:
        reason = " ".join(str(error).split())[:300]
        raise VerifierError(f"{what} does not fit its checkpoint tensors: {reason}") from error
    return model.eval().requires_grad_(False)


class ImageRewardVerifier(Verifier):
    """ImageReward: a BLIP image-text fusion feature scored by an MLP, standardised."""

    name: ClassVar[str] = "imagereward"
    needs_prompt: ClassVar[bool] = True
    input_size: ClassVar[int | None] = 224

    def __init__(self, device: str | torch.device = "cpu", weights: str | None = None,
                 med_config: str | None = None, tokenizer: str = "bert-base-uncased",
                 vision_heads: int | None = None, allow_download: bool = False,
                 dtype: str | None = None, chunk: int = DEFAULT_CHUNK, **options: Any) -> None:
        super().__init__(device, **options)
        from transformers import AutoTokenizer

        where = f"the Hugging Face repo {IMAGEREWARD_REPO}"
        if weights is not None:
            checkpoint = local_file(weights, "ImageReward checkpoint", where)
            config_path = med_config or str(Path(checkpoint).with_name("med_config.json"))
        else:
            checkpoint = hub_file(IMAGEREWARD_REPO, "ImageReward.pt", allow_download)
            config_path = med_config or hub_file(IMAGEREWARD_REPO, "med_config.json",
                                                 allow_download)
        config = json.loads(Path(local_file(config_path, "ImageReward med_config.json",
                                            where)).read_text())
        try:
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        except Exception as error:
            raise VerifierError(f"cannot read ImageReward checkpoint {checkpoint}: "
                                f"{type(error).__name__}: {error}") from error
        vision_state, text_state, head_state = split_checkpoint(state)
        vision = _vision_model(vision_state, vision_heads)
        text = _text_model(config, vision.config.hidden_size, text_state)
        head = AestheticMlp.from_state_dict(head_state, f"{checkpoint} (mlp.*)")
        loaded = from_pretrained_local("ImageReward tokenizer", AutoTokenizer, tokenizer,
                                       allow_download)
        self._setup(vision, text, head, check_tokenizer(loaded, "ImageReward tokenizer",
                                                        tokenizer), chunk, dtype, checkpoint)

    def _setup(self, vision: torch.nn.Module, text: torch.nn.Module, head: AestheticMlp,
               tokenizer: Any, chunk: int, dtype: str | None, weights: str) -> None:
        self.tokenizer = tokenizer
        self.dtype = resolve_dtype(self.device, dtype)
        self.vision = vision.to(self.device, self.dtype).eval().requires_grad_(False)
        self.text = text.to(self.device, self.dtype).eval().requires_grad_(False)
        self.head = head.to(self.device).eval().requires_grad_(False)
        self.input_size = int(vision.config.image_size)  # type: ignore[misc]
        self.chunk, self.weights = chunk, weights

    @classmethod
    def from_modules(cls, vision: torch.nn.Module, text: torch.nn.Module, head: AestheticMlp,
                     tokenizer: Any, device: str | torch.device = "cpu",
                     chunk: int = DEFAULT_CHUNK, dtype: str | None = None,
                     weights: str = "in-memory model") -> ImageRewardVerifier:
        """Wrap already-built BlipVisionModel / BlipTextModel / head (benchmarks, fine-tuning)."""
        verifier = cls.__new__(cls)
        Verifier.__init__(verifier, device)
        verifier._setup(vision, text, head, tokenizer, chunk, dtype, weights)
        return verifier

    def _reward(self, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
                ) -> torch.Tensor:
        """Standardised rewards of images and their prompts' tokens."""
        image_tokens = self.vision(pixel_values=pixels.to(self.dtype)).last_hidden_state
        fused = self.text(
            input_ids=ids, attention_mask=mask, encoder_hidden_states=image_tokens,
            encoder_attention_mask=torch.ones(image_tokens.shape[:-1], dtype=torch.long,
                                              device=self.device),
            is_decoder=False, use_cache=False,
        ).last_hidden_state[:, 0]
        return (self.head(fused.float()) - REWARD_MEAN) / REWARD_STD

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_batch(self.name, images, prompts)
        pixels = clip_pixels(images.to(self.device), self.input_size or 224)
        tokens = self.tokenizer(list(prompts), padding="max_length", truncation=True,
                                max_length=PROMPT_TOKENS, return_tensors="pt")
        inputs = (pixels, tokens["input_ids"].to(self.device),
                  tokens["attention_mask"].to(self.device))
        return encode_fixed_chunks(self._reward, inputs, self.chunk).float().cpu()

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"weights": self.weights}
