"""The verifier interface: a reward model that scores a batch of images, higher is better.

Images arrive as float32 tensors (B, 3, H, W) in [0, 1] on the CPU, decoded once per task and
shared by every verifier of that task. Each verifier resizes/normalises to what it needs
(``input_size``) and moves them to its own device.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from diffsearch.errors import DiffsearchError


class VerifierError(DiffsearchError):
    """A verifier could not be built or could not score; the message says what to do."""


class MissingWeightsError(VerifierError):
    """A verifier's weights are not on disk. The message names the file and where to get it."""


class Verifier(ABC):
    """Base class of every verifier, built-in or plugin.

    Subclasses set the class attributes and implement :meth:`score`. The constructor takes the
    device and the options given in a job file (``verifiers: [{name: clip, arch: ViT-B-32}]``),
    so options must be plain YAML/JSON values.
    """

    name: ClassVar[str]
    """The registry name (``clip``, ``shapes-oracle``, ...)."""
    needs_prompt: ClassVar[bool] = True
    """False for prompt-free judges (aesthetic): they ignore ``prompts``."""
    input_size: ClassVar[int | None] = None
    """Square side the verifier resizes images to, or None if it takes any size."""
    noise_aware: ClassVar[bool] = False
    """True when trained to score x0 estimates of noisy intermediates (TTSnap distillation)."""
    calls_per_score: int = 1
    """Judge calls one score costs (a judge sampled k times and combined sets k), so the
    verifier calls a run reports count what was spent."""

    def usage(self) -> dict[str, int]:
        """Running counters of what this verifier spent since it was built (an API judge's
        requests and tokens); results.json sums their growth per verifier. None by default."""
        return {}

    def __init__(self, device: str | torch.device = "cpu", **options: Any) -> None:
        self.device = torch.device(device)
        if options:
            unknown = ", ".join(sorted(options))
            raise VerifierError(f"verifier {self.name!r} takes no option(s): {unknown}")

    @abstractmethod
    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Scores of ``images`` (B, 3, H, W) in [0, 1] against ``prompts`` (len B).

        Returns a 1-D float tensor of length B (any device). Must not depend on the other images
        in the batch: a candidate's score is the same alone or batched.
        """

    def describe(self) -> dict[str, Any]:
        """Metadata shown by ``diffsearch verifiers list`` and stored with a run."""
        return {
            "name": self.name,
            "needs_prompt": self.needs_prompt,
            "input_size": self.input_size,
            "noise_aware": self.noise_aware,
            "device": str(self.device),
        }
