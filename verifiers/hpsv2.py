"""``hpsv2``: Human Preference Score v2 / v2.1 (Wu et al. 2023), without the ``hpsv2`` package.

HPS v2 is open_clip ViT-H-14 fine-tuned on human preference pairs; the published checkpoint is a
full open_clip state dict (under ``state_dict``, or plain), so upstream open_clip loads it with
strict key checks and the ``hpsv2`` package (which pins old test tools) is not needed.

Score = cosine(image, prompt) of the fine-tuned model, the HPS convention (not 100 * cosine):
typical values are 0.20..0.35, and published HPS numbers are on this scale.

Weights: ``HPS_v2.1_compressed.pt`` (or ``HPS_v2_compressed.pt``) of the Hugging Face repo
``xswu/HPSv2``, looked up in the local cache. Options: ``weights`` (a local checkpoint file,
overrides the cache lookup), ``version`` (``"2.1"`` default, or ``"2.0"``), ``arch`` (default
``ViT-H-14``; only change it for a checkpoint trained on another open_clip arch),
``allow_download``, ``dtype``, ``chunk``.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from diffsearch.verifiers._preprocess import DEFAULT_CHUNK, resolve_dtype
from diffsearch.verifiers._weights import hub_file, local_file
from diffsearch.verifiers.base import VerifierError
from diffsearch.verifiers.clip import OpenClipVerifier, load_open_clip, open_clip_tokenizer

HPS_REPO = "xswu/HPSv2"
HPS_FILES = {"2.1": "HPS_v2.1_compressed.pt", "2.0": "HPS_v2_compressed.pt"}


class HpsV2Verifier(OpenClipVerifier):
    """HPS v2.x: cosine of a preference-tuned open_clip ViT-H-14."""

    name: ClassVar[str] = "hpsv2"
    scale: ClassVar[float] = 1.0

    def __init__(self, device: str | torch.device = "cpu", weights: str | None = None,
                 version: str = "2.1", arch: str = "ViT-H-14", allow_download: bool = False,
                 dtype: str | None = None, chunk: int = DEFAULT_CHUNK, **options: Any) -> None:
        super().__init__(device, **options)
        version = str(version)
        if version not in HPS_FILES:
            raise VerifierError(f"hpsv2: version must be one of {', '.join(HPS_FILES)}, "
                                f"got {version!r}")
        if weights is not None:
            checkpoint = local_file(weights, "HPS checkpoint",
                                    f"the Hugging Face repo {HPS_REPO} ({HPS_FILES[version]})")
        else:
            checkpoint = hub_file(HPS_REPO, HPS_FILES[version], allow_download)
        torch_dtype = resolve_dtype(self.device, dtype)
        model = load_open_clip(arch, checkpoint, self.device, torch_dtype)
        self._setup(model, open_clip_tokenizer(arch), chunk, torch_dtype, weights=checkpoint)
