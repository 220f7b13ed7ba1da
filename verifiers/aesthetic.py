"""``aesthetic``: the LAION improved aesthetic predictor (prompt-free, scores ~1..10).

It is a small MLP on L2-normalised CLIP ViT-L/14 (OpenAI) image embeddings, trained to regress
human ratings (SAC + LOGOS + AVA). The checkpoint is the MLP's plain ``state_dict``:
``layers.{0,2,4,6,7}.{weight,bias}``, widths 768 -> 1024 -> 128 -> 64 -> 16 -> 1 (dropouts sit at
1, 3, 5; there are no activations, so it is affine in the embedding).

Weights: ``sac+logos+ava1-l14-linearMSE.pth`` from
https://github.com/christophschuhmann/improved-aesthetic-predictor, plus the CLIP model it was
trained on (open_clip ``ViT-L-14`` tag ``openai``, in the local Hugging Face cache).

Options: ``weights`` (path to the .pth, required), ``clip_arch`` / ``clip_pretrained`` (as the
``clip`` verifier's ``arch`` / ``pretrained``; change them only with an MLP trained on that
CLIP), ``allow_download`` (for the CLIP weights), ``dtype``, ``chunk``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from diffsearch.verifiers._preprocess import DEFAULT_CHUNK, check_batch, encode_fixed_chunks
from diffsearch.verifiers._weights import local_file
from diffsearch.verifiers.base import MissingWeightsError, Verifier, VerifierError
from diffsearch.verifiers.clip import ClipVerifier, OpenClipVerifier

WEIGHTS_FILE = "sac+logos+ava1-l14-linearMSE.pth"
WEIGHTS_URL = "https://github.com/christophschuhmann/improved-aesthetic-predictor"


class AestheticMlp(nn.Module):
    """The predictor's layer layout, so its published state dict loads with strict key checks."""

    def __init__(self, input_dim: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024), nn.Dropout(0.2),
            nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings).squeeze(-1)

    @classmethod
    def load(cls, path: str) -> AestheticMlp:
        """Read a predictor checkpoint; a file of another layout is refused with the keys."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise VerifierError(f"cannot read aesthetic weights {path}: "
                                f"{type(error).__name__}: {error}") from error
        return cls.from_state_dict(state, path)

    @classmethod
    def from_state_dict(cls, state: Any, source: str) -> AestheticMlp:
        """The MLP holding ``state`` (input width read from it). ImageReward's reward head has
        this same layout, which is why it lives here."""
        if not isinstance(state, dict) or "layers.0.weight" not in state:
            keys = ", ".join(list(state)[:5]) if isinstance(state, dict) else type(state).__name__
            raise VerifierError(f"{source} is not an aesthetic-predictor state dict "
                                f"(expected layers.0.weight ...; found {keys})")
        mlp = cls(int(state["layers.0.weight"].shape[1]))
        try:
            mlp.load_state_dict(state, strict=True)
        except RuntimeError as error:
            reason = " ".join(str(error).split())[:300]
            raise VerifierError(f"{source} does not fit the aesthetic-predictor MLP: "
                                f"{reason}") from error
        return mlp.eval().requires_grad_(False)


class AestheticVerifier(Verifier):
    """LAION aesthetic score of the image alone (prompts are ignored)."""

    name: ClassVar[str] = "aesthetic"
    needs_prompt: ClassVar[bool] = False
    input_size: ClassVar[int | None] = 224

    def __init__(self, device: str | torch.device = "cpu", weights: str | None = None,
                 clip_arch: str = "ViT-L-14", clip_pretrained: str = "openai",
                 allow_download: bool = False, dtype: str | None = None,
                 chunk: int = DEFAULT_CHUNK, **options: Any) -> None:
        super().__init__(device, **options)
        if weights is None:
            raise MissingWeightsError(f"aesthetic needs the option weights: the path to "
                                      f"{WEIGHTS_FILE} (get it from {WEIGHTS_URL})")
        mlp = AestheticMlp.load(local_file(weights, "aesthetic predictor weights", WEIGHTS_URL))
        clip = ClipVerifier(self.device, arch=clip_arch, pretrained=clip_pretrained,
                            allow_download=allow_download, dtype=dtype, chunk=chunk)
        self._setup(clip, mlp, weights)

    def _setup(self, clip: OpenClipVerifier, mlp: AestheticMlp, weights: str) -> None:
        width = mlp.layers[0].in_features
        produced = getattr(clip.model.visual, "output_dim", None)  # timm towers may lack it
        if produced is not None and width != produced:
            raise VerifierError(f"aesthetic weights expect {width}-d CLIP embeddings but "
                                f"{clip.weights} gives {produced}-d")
        self.clip, self.mlp, self.weights = clip, mlp.to(self.device), weights
        self.input_size = clip.input_size  # type: ignore[misc]

    @classmethod
    def from_parts(cls, clip: OpenClipVerifier, mlp: AestheticMlp,
                   weights: str = "in-memory model") -> AestheticVerifier:
        """Assemble from a loaded CLIP verifier and MLP (benchmarks with random weights)."""
        verifier = cls.__new__(cls)
        Verifier.__init__(verifier, clip.device)
        verifier._setup(clip, mlp, weights)
        return verifier

    def score(self, images: torch.Tensor, prompts: Sequence[str] | None = None) -> torch.Tensor:
        check_batch(self.name, images, None)
        embeddings = self.clip.image_embeddings(images)
        return encode_fixed_chunks(self.mlp, embeddings, self.clip.chunk).float().cpu()

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"weights": self.weights, "clip": self.clip.weights}
