"""Verifiers for the bundled shapes model: the exact oracle and the shapes-world CLIP.

``shapes-oracle`` reads the image (colour segmentation, components, shape features) and scores
the share of the prompt's aspects it gets right, so it is exact but only speaks the grammar.
``shapes-clip`` is a learned judge (cosine similarity of a tiny CLIP trained on the world):
imperfect like any real reward model, which is what makes it useful for studying search with an
exact held-out metric beside it. ``shapes-clip-small`` is the first shipped version of it,
trained on renders only, which agrees with the oracle less (see pipelines/shapes/README.md): a
guide that search over-optimises readily.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from diffsearch.pipelines.shapes import clip_model
from diffsearch.pipelines.shapes.oracle import judge
from diffsearch.pipelines.shapes.world import SIZE, PromptError
from diffsearch.verifiers.base import MissingWeightsError, Verifier, VerifierError


def _check(images: torch.Tensor, prompts: Sequence[str]) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise VerifierError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    if len(prompts) != images.shape[0]:
        raise VerifierError(f"{images.shape[0]} images but {len(prompts)} prompts")


class ShapesOracleVerifier(Verifier):
    """The share of applicable aspects (object, colour, count, position, binding) right."""

    name: ClassVar[str] = "shapes-oracle"
    input_size: ClassVar[int | None] = SIZE

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        _check(images, prompts)
        pixels = images.detach().float().cpu().clamp(0, 1).permute(0, 2, 3, 1).numpy()
        scores = []
        for image, prompt in zip(pixels, prompts, strict=True):
            try:
                scores.append(judge(np.ascontiguousarray(image), prompt).score)
            except PromptError as error:
                raise VerifierError(
                    f"shapes-oracle only scores shapes-world prompts: {error}"
                ) from None
        return torch.tensor(scores, dtype=torch.float32)


class ShapesClipVerifier(Verifier):
    """Cosine similarity between the shapes CLIP's image and prompt embeddings (-1..1)."""

    name: ClassVar[str] = "shapes-clip"
    input_size: ClassVar[int | None] = SIZE
    default_weights: ClassVar[Path] = clip_model.WEIGHTS_DIR
    """The shipped folder used when no ``weights`` option is given."""
    chunk: ClassVar[int] = 16
    """Images are encoded in padded chunks of exactly this many rows, so a row's score does not
    depend on how many images came with it (CPU kernels vary with batch shape)."""

    def __init__(
        self, device: str | torch.device = "cpu", weights: str | None = None, **options: object
    ) -> None:
        super().__init__(device, **options)
        folder = Path(weights) if weights else self.default_weights
        try:
            self.model, self.tokenizer = clip_model.load(folder, device=self.device)
        except FileNotFoundError as error:
            raise MissingWeightsError(str(error)) from None
        self.weights = str(folder)
        self._text_cache: dict[str, torch.Tensor] = {}

    def _text(self, prompts: Sequence[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            with torch.no_grad():
                ids = self.tokenizer(missing).to(self.device)
                emb = F.normalize(self.model.encode_text(ids), dim=-1)
            self._text_cache.update(zip(missing, emb, strict=True))
        return torch.stack([self._text_cache[p] for p in prompts])

    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings (B, D), each row independent of the others (the image
        features ``temporal-consistency`` can compare frames on)."""
        x = clip_model.normalise(images.detach().float().to(self.device).clamp(0, 1))
        out = []
        with torch.no_grad():
            for begin in range(0, x.shape[0], self.chunk):
                part = x[begin : begin + self.chunk]
                real = part.shape[0]
                if real < self.chunk:
                    part = torch.cat([part, part[-1:].expand(self.chunk - real, -1, -1, -1)])
                out.append(F.normalize(self.model.encode_image(part), dim=-1)[:real])
        return torch.cat(out)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        _check(images, prompts)
        return (self.image_embeddings(images) * self._text(prompts)).sum(-1).float().cpu()

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"weights": self.weights}


class ShapesClipSmallVerifier(ShapesClipVerifier):
    """The first shipped shapes CLIP (renders only): a weaker guide, for studying hacking."""

    name: ClassVar[str] = "shapes-clip-small"
    default_weights: ClassVar[Path] = clip_model.SMALL_WEIGHTS_DIR
