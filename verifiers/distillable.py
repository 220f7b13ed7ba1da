"""Teachers for TTSnap self-distillation: verifiers whose score is a differentiable torch model.

``diffsearch distill`` (``diffsearch/distill.py``) trains a noise-aware student that starts as a
copy of the teacher and learns to give the x0 estimate at step k the score the teacher gives the
final image of the same trajectory. It needs three things from a teacher, the
:class:`Distillable` protocol:

- a trainable copy of its network (:meth:`Distillable.new_student`);
- the verifier's score as a differentiable function of that network, with the verifier's own
  preprocessing and arithmetic (:meth:`Distillable.score`), so what is regressed is exactly what
  scores at search time;
- how to write a trained network as a verifier folder (``verifiers/registry.py``), so a
  checkpoint is used by path like any verifier (:meth:`Distillable.save`).

:func:`distillable` picks the implementation for a built verifier: ``shapes-clip`` and ``clip``
have one. Other verifiers are refused with a one-line error that says what they lack.
"""

from __future__ import annotations

import copy
import json
import shutil
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from diffsearch.pipelines.shapes import clip_model
from diffsearch.verifiers.base import Verifier, VerifierError
from diffsearch.verifiers.clip import ClipVerifier
from diffsearch.verifiers.registry import FOLDER_MANIFEST
from diffsearch.verifiers.shapes import ShapesClipSmallVerifier, ShapesClipVerifier

CLIP_STUDENT_WEIGHTS = "open_clip_model.safetensors"
"""The student's weights file in a ``clip`` student folder (open_clip reads safetensors)."""


class NotDistillableError(VerifierError):
    """The teacher verifier has no differentiable network a student could start from."""


class Distillable(ABC):
    """How to distil a noise-aware student from one teacher verifier (see the module docstring).

    Students are float32 copies of the teacher's network kept in eval mode while they train:
    dropout stays off and normalisation statistics stay frozen, so the training score is the
    score the saved checkpoint gives at search time.
    """

    def __init__(self, teacher: Verifier) -> None:
        self.teacher = teacher

    @property
    @abstractmethod
    def network(self) -> torch.nn.Module:
        """The teacher's network, which the first student copies."""

    def new_student(self) -> torch.nn.Module:
        """A trainable float32 copy of the teacher's network on the teacher's device."""
        student = copy.deepcopy(self.network).float()
        return student.eval().requires_grad_(True)

    @abstractmethod
    def score(self, student: torch.nn.Module, images: torch.Tensor, prompts: Sequence[str]
              ) -> torch.Tensor:
        """The teacher's score of ``images`` (B, 3, H, W) in [0, 1], computed by ``student``
        with gradients: (B,) float32 on the teacher's device."""

    @abstractmethod
    def save(self, student: torch.nn.Module, folder: Path, meta: dict[str, Any],
             dtype: torch.dtype = torch.float32) -> None:
        """Write ``student`` as a verifier folder (``diffsearch-verifier.json`` + weights stored
        as ``dtype``) into ``folder``; ``meta`` goes into the manifest's ``meta``. Loading casts
        the weights back to the verifier's own dtype."""

    def _write_manifest(self, folder: Path, options: dict[str, Any], meta: dict[str, Any]
                        ) -> None:
        manifest = {"verifier": self.teacher.name, "options": options, "meta": meta}
        (folder / FOLDER_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _state(student: torch.nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The student's tensors on the CPU, floating-point ones as ``dtype``."""
    return {k: (v.to(dtype) if v.is_floating_point() else v).detach().to("cpu").contiguous()
            for k, v in student.state_dict().items()}


class _OpenClipDistillable(Distillable):
    """Teachers whose network is an open_clip model scoring the cosine of the normalised image
    and prompt embeddings; subclasses add their preprocessing and scale."""

    teacher: ShapesClipVerifier | ClipVerifier

    @property
    def network(self) -> torch.nn.Module:
        return self.teacher.model

    def _cosine(self, student: torch.nn.Module, pixels: torch.Tensor, prompts: Sequence[str]
                ) -> torch.Tensor:
        """Cosine of ``student``'s embeddings of preprocessed ``pixels`` and of ``prompts``
        (tokenised by the teacher), with gradients."""
        image = F.normalize(student.encode_image(pixels), dim=-1)
        tokens = self.teacher.tokenizer(list(prompts)).to(self.teacher.device)
        text = F.normalize(student.encode_text(tokens), dim=-1)
        return (image * text).sum(-1)


class ShapesClipDistillable(_OpenClipDistillable):
    """``shapes-clip``: cosine of the normalised open_clip image and prompt embeddings.

    A student folder is a shapes-clip folder (the teacher's ``open_clip_config.json`` and
    tokenizer files, the student's ``open_clip_model.safetensors``) with a manifest pointing
    ``shapes-clip``'s ``weights`` option at the folder itself.
    """

    teacher: ShapesClipVerifier

    def score(self, student: torch.nn.Module, images: torch.Tensor, prompts: Sequence[str]
              ) -> torch.Tensor:
        pixels = clip_model.normalise(images.float().to(self.teacher.device).clamp(0, 1))
        return self._cosine(student, pixels, prompts)

    def save(self, student: torch.nn.Module, folder: Path, meta: dict[str, Any],
             dtype: torch.dtype = torch.float32) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for file in Path(self.teacher.weights).iterdir():  # config and tokenizer files
            if file.is_file() and file.name not in (clip_model.WEIGHTS_FILE, FOLDER_MANIFEST):
                shutil.copyfile(file, folder / file.name)
        save_file(_state(student, dtype), str(folder / clip_model.WEIGHTS_FILE))
        self._write_manifest(folder, {"weights": "."}, meta)


class ClipDistillable(_OpenClipDistillable):
    """``clip``: 100 x cosine of open_clip embeddings, with the teacher's CLIP preprocessing.

    A student folder holds the weights as ``open_clip_model.safetensors`` and a manifest naming
    the teacher's arch. A checkpoint file carries no activation flag, so a teacher whose
    pretrained tag uses QuickGELU (OpenAI weights) is saved under the ``-quickgelu`` arch.
    """

    teacher: ClipVerifier

    def __init__(self, teacher: ClipVerifier) -> None:
        import open_clip

        super().__init__(teacher)
        arch, _, pretrained = teacher.weights.partition(" ")  # ClipVerifier: "arch pretrained"
        if open_clip.get_pretrained_cfg(arch, pretrained).get("quick_gelu") \
                and not arch.endswith("-quickgelu"):
            if f"{arch}-quickgelu" not in open_clip.list_models():
                raise NotDistillableError(
                    f"verifier 'clip' ({teacher.weights}) cannot be distilled: its weights need "
                    f"QuickGELU and open_clip has no {arch}-quickgelu arch to save a student as")
            arch = f"{arch}-quickgelu"
        self.arch = arch
        cfg = open_clip.get_model_preprocess_cfg(teacher.model)
        self._mean, self._std = tuple(cfg["mean"]), tuple(cfg["std"])
        self._interpolation = cfg.get("interpolation", "bicubic")

    def score(self, student: torch.nn.Module, images: torch.Tensor, prompts: Sequence[str]
              ) -> torch.Tensor:
        from diffsearch.verifiers._preprocess import clip_pixels

        pixels = clip_pixels(images.to(self.teacher.device), self.teacher.input_size or 224,
                             self._mean, self._std, self._interpolation)
        return self.teacher.scale * self._cosine(student, pixels, prompts)

    def save(self, student: torch.nn.Module, folder: Path, meta: dict[str, Any],
             dtype: torch.dtype = torch.float32) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file(_state(student, dtype), str(folder / CLIP_STUDENT_WEIGHTS))
        self._write_manifest(folder, {"arch": self.arch, "pretrained": CLIP_STUDENT_WEIGHTS},
                             meta)


DISTILLABLE: dict[type[Verifier], type[Distillable]] = {
    ShapesClipVerifier: ShapesClipDistillable,
    ShapesClipSmallVerifier: ShapesClipDistillable,  # the same network, other weights
    ClipVerifier: ClipDistillable,
}
"""Verifier class -> its distillation; exact classes, since a subclass may score differently."""


def distillable(teacher: Verifier) -> Distillable:
    """The :class:`Distillable` for ``teacher``, or a NotDistillableError naming it."""
    implementation = DISTILLABLE.get(type(teacher))
    if implementation is None:
        names = ", ".join(sorted(cls.name for cls in DISTILLABLE))
        raise NotDistillableError(
            f"verifier {teacher.name!r} cannot be distilled: it exposes no differentiable torch "
            f"network a student could start from (distillable teachers: {names})")
    return implementation(teacher)
