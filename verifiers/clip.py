"""``clip``: CLIP score with any open_clip architecture and checkpoint.

Score = 100 * cosine(image embedding, prompt embedding), the scale of CLIPScore (Hessel et al.
use 2.5 * max(cos, 0); we keep negative values so a search can still rank bad candidates). Typical
values for matching pairs are 20..35 with OpenAI ViT-L/14.

Options (job file ``{name: clip, ...}``):

- ``arch``: an open_clip model name (``open_clip.list_models()``), default ``ViT-L-14``.
- ``pretrained``: an open_clip pretrained tag of ``arch`` (``openai``, ``laion2b_s32b_b82k``...),
  looked up in the local Hugging Face cache (or ``~/.cache/clip``) only; or a checkpoint file.
  With a file, name the QuickGELU variant of the arch yourself (``ViT-L-14-quickgelu`` for
  OpenAI weights): open_clip cannot tell from a bare state dict.
- ``allow_download``: fetch a missing tag's weights from the network (default false).
- ``dtype``: ``float32`` / ``float16`` / ``bfloat16`` (default float16 on CUDA, else float32).
- ``chunk``: rows per model call (default 8); scores are bit-identical alone or batched.

:class:`OpenClipVerifier` is the shared machinery (also used by ``hpsv2``): loading, cached prompt
embeddings, fixed-chunk encoding.
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
from diffsearch.verifiers._weights import open_clip_checkpoint
from diffsearch.verifiers.base import MissingWeightsError, Verifier, VerifierError


def load_open_clip(
    arch: str, checkpoint: str, device: torch.device, dtype: torch.dtype,
    quick_gelu: bool = False, preprocess: dict[str, Any] | None = None,
) -> torch.nn.Module:
    """An open_clip model of ``arch`` with the weights of ``checkpoint`` (a local file), in eval
    mode on ``device``. Raises VerifierError when the file does not fit the architecture."""
    import open_clip

    if arch not in open_clip.list_models():
        raise VerifierError(f"unknown open_clip arch {arch!r}; see open_clip.list_models()")
    try:
        model = open_clip.create_model(
            arch, pretrained=checkpoint, device="cpu", force_quick_gelu=quick_gelu,
            force_preprocess_cfg=preprocess,
        )
    except Exception as error:  # strict load (key/shape mismatches), corrupt or foreign files
        reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
        raise VerifierError(f"{checkpoint} does not fit open_clip {arch}: {reason}") from error
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def open_clip_tokenizer(arch: str) -> Any:
    """open_clip's tokenizer for ``arch``; HF-text-tower archs need their tokenizer cached."""
    import open_clip

    try:
        return open_clip.get_tokenizer(arch)
    except OSError as error:
        raise MissingWeightsError(f"tokenizer of open_clip {arch} is not available locally: "
                                  f"{' '.join(str(error).split())}") from error


class OpenClipVerifier(Verifier):
    """Cosine similarity of an open_clip model's image and text embeddings, times ``scale``."""

    needs_prompt: ClassVar[bool] = True
    input_size: ClassVar[int | None] = 224
    scale: ClassVar[float] = 1.0
    """What the cosine is multiplied by (100 for CLIP score, 1 for the HPS convention)."""

    def _setup(self, model: torch.nn.Module, tokenizer: Any, chunk: int,
               dtype: torch.dtype, weights: str) -> None:
        """Adopt a loaded model: read its preprocessing, prepare the prompt cache."""
        import open_clip

        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg.get("size", 224)
        self.input_size = size if isinstance(size, int) else int(size[0])  # type: ignore[misc]
        self._mean, self._std = tuple(cfg["mean"]), tuple(cfg["std"])
        self._interpolation = cfg.get("interpolation", "bicubic")
        self._squash = cfg.get("resize_mode") == "squash"
        self.model, self.tokenizer, self.chunk, self.dtype = model, tokenizer, chunk, dtype
        self.weights = weights
        self._text_cache: dict[str, torch.Tensor] = {}

    @classmethod
    def from_open_clip(cls, model: torch.nn.Module, tokenizer: Any,
                       device: str | torch.device = "cpu", chunk: int = DEFAULT_CHUNK,
                       dtype: str | None = None, weights: str = "in-memory model"
                       ) -> OpenClipVerifier:
        """Wrap an already-built open_clip model (benchmarks with random weights, a model being
        fine-tuned) without going through checkpoint files."""
        verifier = cls.__new__(cls)
        Verifier.__init__(verifier, device)
        torch_dtype = resolve_dtype(verifier.device, dtype)
        model = model.to(device=verifier.device, dtype=torch_dtype).eval().requires_grad_(False)
        verifier._setup(model, tokenizer, chunk, torch_dtype, weights)
        return verifier

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm float32 image embeddings (B, D), each row independent of the others."""
        pixels = clip_pixels(images.to(self.device), self.input_size or 224, self._mean,
                             self._std, self._interpolation, squash=self._squash).to(self.dtype)
        embeddings = encode_fixed_chunks(self.model.encode_image, pixels, self.chunk)
        return F.normalize(embeddings.float(), dim=-1)

    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm float32 prompt embeddings (B, D); each distinct prompt is encoded once."""
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            tokens = self.tokenizer(missing).to(self.device)
            embeddings = encode_fixed_chunks(self.model.encode_text, tokens, self.chunk)
            normalised = F.normalize(embeddings.float(), dim=-1)
            self._text_cache.update(zip(missing, normalised, strict=True))
        return torch.stack([self._text_cache[p] for p in prompts])

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_batch(self.name, images, prompts)
        cosine = (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)
        return (self.scale * cosine).cpu()

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"weights": self.weights}


class ClipVerifier(OpenClipVerifier):
    """CLIP score: 100 * cosine of open_clip image and prompt embeddings."""

    name: ClassVar[str] = "clip"
    scale: ClassVar[float] = 100.0

    def __init__(self, device: str | torch.device = "cpu", arch: str = "ViT-L-14",
                 pretrained: str = "openai", allow_download: bool = False,
                 dtype: str | None = None, chunk: int = DEFAULT_CHUNK, **options: Any) -> None:
        super().__init__(device, **options)
        import open_clip

        checkpoint = open_clip_checkpoint(arch, pretrained, allow_download)
        tag = open_clip.get_pretrained_cfg(arch, pretrained)
        preprocess = {k: tag[k] for k in ("mean", "std", "interpolation", "resize_mode")
                      if k in tag}
        torch_dtype = resolve_dtype(self.device, dtype)
        model = load_open_clip(arch, checkpoint, self.device, torch_dtype,
                               quick_gelu=bool(tag.get("quick_gelu", False)),
                               preprocess=preprocess or None)
        self._setup(model, open_clip_tokenizer(arch), chunk, torch_dtype,
                    weights=f"{arch} {pretrained}")
