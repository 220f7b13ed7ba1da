"""``pickscore``: PickScore (Kirstain et al. 2023), a CLIP-H fine-tuned on Pick-a-Pic preferences.

It is a plain transformers ``CLIPModel``; its processor (tokenizer + image settings) is the one of
the CLIP it was fine-tuned from. Score = logit_scale.exp() * cosine(image, prompt), the logit the
model was trained with (about 100 * cosine; typical values 18..23).

Weights: ``model`` (default ``yuvalkirstain/PickScore_v1``) and ``processor`` (default
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``), each a local folder or a Hugging Face id looked up
in the local cache only. Other options: ``allow_download``, ``dtype``, ``chunk``.

Images go through the processor's own settings (shortest-edge resize, centre crop, mean/std) on
tensors; prompts are padded to the model's full context so a prompt's embedding never depends on
the other prompts in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from diffsearch.verifiers._preprocess import (
    DEFAULT_CHUNK,
    check_batch,
    clip_pixels,
    encode_fixed_chunks,
    resolve_dtype,
)
from diffsearch.verifiers._weights import check_tokenizer, from_pretrained_local
from diffsearch.verifiers.base import Verifier

DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
_RESAMPLE = {2: "bilinear", 3: "bicubic"}
"""PIL resample codes the CLIP image processors use -> torch interpolation modes."""


def _field(size: Any, key: str) -> Any:
    """``key`` of an image processor size: a dict (transformers 4), a SizeDict (5), or an int."""
    if isinstance(size, int):
        return size
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


class PickScoreVerifier(Verifier):
    """PickScore: the preference logit of a transformers CLIPModel."""

    name: ClassVar[str] = "pickscore"
    needs_prompt: ClassVar[bool] = True
    input_size: ClassVar[int | None] = 224

    def __init__(self, device: str | torch.device = "cpu", model: str = DEFAULT_MODEL,
                 processor: str = DEFAULT_PROCESSOR, allow_download: bool = False,
                 dtype: str | None = None, chunk: int = DEFAULT_CHUNK, **options: Any) -> None:
        super().__init__(device, **options)
        from transformers import CLIPModel, CLIPProcessor

        clip = from_pretrained_local("pickscore processor", CLIPProcessor, processor,
                                     allow_download)
        network = from_pretrained_local("pickscore model", CLIPModel, model, allow_download)
        self._setup(network, clip, chunk, resolve_dtype(self.device, dtype),
                    weights=f"{model} (processor {processor})")

    @classmethod
    def from_transformers(cls, model: Any, processor: Any, device: str | torch.device = "cpu",
                          chunk: int = DEFAULT_CHUNK, dtype: str | None = None,
                          weights: str = "in-memory model") -> PickScoreVerifier:
        """Wrap an already-built CLIPModel and CLIPProcessor (benchmarks, fine-tuning)."""
        verifier = cls.__new__(cls)
        Verifier.__init__(verifier, device)
        verifier._setup(model, processor, chunk, resolve_dtype(verifier.device, dtype), weights)
        return verifier

    def _setup(self, model: Any, processor: Any, chunk: int, dtype: torch.dtype,
               weights: str) -> None:
        images = processor.image_processor
        crop = _field(images.crop_size, "height")
        self.input_size = int(crop)  # type: ignore[misc]
        self._resize_to = int(_field(images.size, "shortest_edge") or crop)
        self._mean, self._std = tuple(images.image_mean), tuple(images.image_std)
        self._interpolation = _RESAMPLE.get(int(images.resample), "bicubic")
        self.tokenizer = check_tokenizer(processor.tokenizer, "pickscore processor", weights)
        self.context = int(model.config.text_config.max_position_embeddings)
        self.model = model.to(device=self.device, dtype=dtype).eval().requires_grad_(False)
        self.dtype, self.chunk, self.weights = dtype, chunk, weights
        self._text_cache: dict[str, torch.Tensor] = {}

    def _image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.get_image_features(pixel_values=pixels).pooler_output

    def _text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            tokens = self.tokenizer(missing, padding="max_length", truncation=True,
                                    max_length=self.context, return_tensors="pt")
            inputs = (tokens["input_ids"].to(self.device),
                      tokens["attention_mask"].to(self.device))
            features = encode_fixed_chunks(self._text_features, inputs, self.chunk)
            normalised = F.normalize(features.float(), dim=-1)
            self._text_cache.update(zip(missing, normalised, strict=True))
        return torch.stack([self._text_cache[p] for p in prompts])

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        pixels = clip_pixels(images.to(self.device), self.input_size or 224, self._mean,
                             self._std, self._interpolation, resize_to=self._resize_to)
        features = encode_fixed_chunks(self._image_features, pixels.to(self.dtype), self.chunk)
        return F.normalize(features.float(), dim=-1)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_batch(self.name, images, prompts)
        cosine = (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)
        return (self.model.logit_scale.float().exp() * cosine).cpu()

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"weights": self.weights}
