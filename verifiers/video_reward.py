"""``video-reward``: a Qwen2-VL video reward model with a linear reward head, from a folder.

The architecture of VideoAlign's VideoReward (Liu et al. 2025, github.com/KwaiVGI/VideoAlign):
a Qwen2-VL backbone reads the clip as a video and a question holding the prompt, and a
bias-free linear head maps the last layer's hidden states to named rewards (VideoReward's
``VQ``, ``MQ``, ``TA``: visual quality, motion quality, text alignment), read either at the
last token of the rendered conversation (``pooling: last``) or at special reward tokens placed
in the question (``pooling: tokens``, one per reward; VideoReward's ``<|VQ_reward|>`` ...).
Each reward may be standardised by a mean and a standard deviation, and the score is one of
them or their sum (``overall``, VideoReward's Overall).

It loads a folder by path only and never downloads. The folder::

    my-video-reward/
      config.json, model.safetensors, ...   a Qwen2-VL checkpoint (Qwen2VLForConditionalGeneration;
                                            LoRA adapters merged in), with the reward tokens in
                                            its vocabulary when pooling is ``tokens``
      tokenizer and processor files         AutoProcessor's, with a chat template that renders a
                                            {"type": "video"} content part (Qwen2-VL's does)
      reward_head.safetensors               "weight": (N, hidden_size), optionally "bias": (N,)
      reward_head.json                      what the head means (:data:`MANIFEST_KEYS`)

``reward_head.json``: ``outputs`` (the reward names, required), ``pooling`` (``last`` or
``tokens``), ``reward_tokens`` (with ``tokens``: one per output, each a single token of the
vocabulary), ``question`` (the user text, where ``{prompt}`` is replaced by the clip prompt; no
other braces are read, so JSON in it is fine), ``mean`` and ``std`` (optional mappings of
output name to number). The head has N = len(outputs) rows, read at the last token or reward
i's row at reward token i (VideoReward's 3-output head), or N = 1, the one row read at each
reward token (its 1-output head).

What was not reproduced: VideoAlign's own loader (its ``model_config.json`` and LoRA
checkpoints) and its frame sampling from video files (``fps: 2`` with a per-frame pixel cap,
through qwen-vl-utils). A clip here is frames already: ``frames: n`` gives the model n of them
evenly spaced (default all), and they are resized by the folder's video processor settings.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from diffsearch.verifiers._preprocess import DEFAULT_CHUNK, encode_fixed_chunks
from diffsearch.verifiers.base import MissingWeightsError, VerifierError
from diffsearch.verifiers.frames import sampled_indices
from diffsearch.verifiers.video import VideoVerifier

HEAD_WEIGHTS = "reward_head.safetensors"
MANIFEST = "reward_head.json"
MANIFEST_KEYS = ("outputs", "pooling", "reward_tokens", "question", "mean", "std")
POOLINGS = ("last", "tokens")
OVERALL = "overall"
DEFAULT_QUESTION = 'Rate this video for the prompt: "{prompt}".'
SUPPORTED_MODEL_TYPES = ("qwen2_vl",)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _fail(folder: Path, message: str) -> VerifierError:
    return VerifierError(f"video-reward: {folder / MANIFEST}: {message}")


def read_manifest(folder: Path) -> dict[str, Any]:
    """``reward_head.json`` checked and with its defaults filled in."""
    path = folder / MANIFEST
    if not path.is_file():
        raise MissingWeightsError(f"video-reward: {path} not found (it names the reward head's "
                                  f"outputs; see docs/verifiers.md, video-reward)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise _fail(folder, f"cannot read it: {error}") from error
    if not isinstance(data, dict):
        raise _fail(folder, "must hold a JSON object")
    unknown = sorted(set(data) - set(MANIFEST_KEYS))
    if unknown:
        raise _fail(folder, f"unknown key(s) {', '.join(unknown)}; allowed: "
                            f"{', '.join(MANIFEST_KEYS)}")
    outputs = data.get("outputs")
    if (not isinstance(outputs, list) or not outputs or len(set(outputs)) != len(outputs)
            or not all(isinstance(o, str) and o and o != OVERALL for o in outputs)):
        raise _fail(folder, f"outputs must be a list of distinct reward names (not "
                            f"{OVERALL!r}), got {outputs!r}")
    pooling = data.get("pooling", "last")
    if pooling not in POOLINGS:
        raise _fail(folder, f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    tokens = data.get("reward_tokens")
    if pooling == "tokens" and (not isinstance(tokens, list) or len(tokens) != len(outputs)
                                or not all(isinstance(t, str) and t for t in tokens)):
        raise _fail(folder, f"pooling: tokens needs reward_tokens, one token per output "
                            f"({len(outputs)}), got {tokens!r}")
    if pooling == "last" and tokens is not None:
        raise _fail(folder, "reward_tokens apply to pooling: tokens")
    question = data.get("question", DEFAULT_QUESTION)
    if not isinstance(question, str) or "{prompt}" not in question:
        raise _fail(folder, "question must be a string holding {prompt}")
    if pooling == "tokens" and not all(token in question for token in tokens):
        raise _fail(folder, "with pooling: tokens, question must hold every reward token")
    stats = {}
    for key in ("mean", "std"):
        values = data.get(key, {})
        if not isinstance(values, dict) or not set(values) <= set(outputs) or not all(
                isinstance(v, int | float) and not isinstance(v, bool) for v in values.values()):
            raise _fail(folder, f"{key} must map output names ({', '.join(outputs)}) to "
                                f"numbers, got {values!r}")
        stats[key] = {name: float(values.get(name, 0.0 if key == "mean" else 1.0))
                      for name in outputs}
    if any(v <= 0 for v in stats["std"].values()):
        raise _fail(folder, "every std must be > 0")
    return {"outputs": outputs, "pooling": pooling, "reward_tokens": tokens,
            "question": question, **stats}


class VideoRewardVerifier(VideoVerifier):
    """A Qwen2-VL backbone and a linear reward head over the clip (VideoAlign's design)."""

    name: ClassVar[str] = "video-reward"

    def __init__(self, device: str | torch.device = "cpu", model: str | None = None,
                 output: str = OVERALL, frames: int | None = None, dtype: str | None = None,
                 chunk: int = DEFAULT_CHUNK, **options: Any) -> None:
        super().__init__(device, **options)
        if not isinstance(model, str) or not model:
            raise VerifierError("video-reward: model is required (the path of a folder with a "
                                "Qwen2-VL checkpoint and its reward head)")
        if frames is not None and (isinstance(frames, bool) or not isinstance(frames, int)
                                   or frames < 1):
            raise VerifierError(f"video-reward: frames must be a whole number >= 1, got "
                                f"{frames!r}")
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise VerifierError(f"video-reward: chunk must be a whole number >= 1, got "
                                f"{chunk!r}")
        if dtype is not None and dtype not in DTYPES:
            raise VerifierError(f"video-reward: dtype must be one of {', '.join(DTYPES)}, got "
                                f"{dtype!r}")
        folder = Path(model).expanduser()
        if not folder.is_dir():
            raise MissingWeightsError(f"video-reward: model folder not found: {folder} (it is "
                                      f"loaded by path only, never downloaded)")
        self.manifest = read_manifest(folder)
        choices = [*self.manifest["outputs"], OVERALL]
        if output not in choices:
            raise VerifierError(f"video-reward: output must be one of {', '.join(choices)}, got "
                                f"{output!r}")
        self.folder, self.output, self.frames, self.chunk = folder, output, frames, chunk
        self.mean = torch.tensor([self.manifest["mean"][o] for o in self.manifest["outputs"]])
        self.std = torch.tensor([self.manifest["std"][o] for o in self.manifest["outputs"]])
        self.dtype = DTYPES[dtype] if dtype else (
            torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self._load()

    def _load(self) -> None:
        """Config, head and tokenizer first, each checked; the (slow) backbone last."""
        from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor

        folder = self.folder
        try:
            config = AutoConfig.from_pretrained(folder, local_files_only=True)
            if config.model_type not in SUPPORTED_MODEL_TYPES:
                raise VerifierError(f"video-reward: {folder} holds a {config.model_type!r} "
                                    f"model; the backbone must be one of "
                                    f"{', '.join(SUPPORTED_MODEL_TYPES)}")
            self._load_head(config.get_text_config().hidden_size)
            self.processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
            self.tokenizer = self.processor.tokenizer
            self.tokenizer.padding_side = "right"  # as the head was trained: rows end unpadded
            self.reward_token_ids = [self._token_id(t)
                                     for t in self.manifest["reward_tokens"] or []]
            model = AutoModelForImageTextToText.from_pretrained(
                folder, local_files_only=True, dtype=self.dtype)
        except OSError as error:
            reason = " ".join(str(error).split())[:240]
            raise MissingWeightsError(f"video-reward: {folder} is not a complete Qwen2-VL "
                                      f"folder: {reason}") from error
        self.model = model.to(self.device).eval().requires_grad_(False)

    def _load_head(self, hidden: int) -> None:
        from safetensors.torch import load_file

        head_path = self.folder / HEAD_WEIGHTS
        if not head_path.is_file():
            raise MissingWeightsError(f"video-reward: {head_path} not found (the reward head: "
                                      f"'weight' (N, hidden_size), optionally 'bias' (N,))")
        head = load_file(str(head_path))
        outputs = len(self.manifest["outputs"])
        allowed = [outputs] if self.manifest["pooling"] == "last" else sorted({outputs, 1})
        weight, bias = head.get("weight"), head.get("bias")
        if (set(head) - {"weight", "bias"} or weight is None or weight.ndim != 2
                or weight.shape[0] not in allowed or weight.shape[1] != hidden
                or (bias is not None and tuple(bias.shape) != (weight.shape[0],))):
            shapes = {k: tuple(v.shape) for k, v in head.items()}
            raise VerifierError(f"video-reward: {head_path} must hold 'weight' of shape "
                                f"({' or '.join(map(str, allowed))}, {hidden}) and optionally "
                                f"'bias' of one value per row; got {shapes}")
        self.weight = weight.float().to(self.device)
        self.bias = None if bias is None else bias.float().to(self.device)

    def _token_id(self, token: str) -> int:
        ids = self.tokenizer(token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise VerifierError(f"video-reward: reward token {token!r} is not one token of "
                                f"{self.folder}'s tokenizer (add it as a special token)")
        return int(ids[0])

    def _text(self, prompt: str) -> str:
        question = self.manifest["question"].replace("{prompt}", prompt)
        conversation = [{"role": "user", "content": [{"type": "video"},
                                                      {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True,
                                                  tokenize=False)

    def rewards(self, clips: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """Every output's standardised reward, (B, len(outputs)), in float32."""
        self._check(clips, prompts)
        picked = sampled_indices(clips.shape[1], None, self.frames)
        videos = (clips[:, picked].detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        videos = videos.permute(0, 1, 3, 4, 2).cpu().numpy()  # (B, F, H, W, 3)
        texts = [self._text(p) for p in prompts]

        def judge(rows: torch.Tensor) -> torch.Tensor:
            index = rows.tolist()
            batch = self.processor(text=[texts[i] for i in index],
                                   videos=[videos[i] for i in index], padding=True,
                                   return_tensors="pt")
            inputs = {k: v.to(self.device, self.dtype) if v.is_floating_point()
                      else v.to(self.device) for k, v in batch.items()}
            with torch.no_grad():
                hidden = self.model.model(**inputs).last_hidden_state.float()
            return self._pool(hidden, inputs["input_ids"], inputs["attention_mask"]).cpu()

        raw = encode_fixed_chunks(judge, torch.arange(len(texts)), self.chunk)
        return (raw.float() - self.mean) / self.std

    def _pool(self, hidden: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
              ) -> torch.Tensor:
        """The head's outputs (B, len(outputs)) read where the manifest says."""
        rows = torch.arange(ids.shape[0], device=ids.device)
        if self.manifest["pooling"] == "last":
            at = hidden[rows, mask.sum(1) - 1]  # right padding: each row's last real token
            return at @ self.weight.T + (0 if self.bias is None else self.bias)
        values = []
        for reward, token in enumerate(self.reward_token_ids):
            found = ids == token
            if not bool((found.sum(1) == 1).all()):
                raise VerifierError(f"video-reward: reward token "
                                    f"{self.manifest['reward_tokens'][reward]!r} must occur "
                                    f"exactly once in each rendered question")
            at = hidden[rows, found.int().argmax(1)]
            row = reward if self.weight.shape[0] > 1 else 0
            bias = 0 if self.bias is None else self.bias[row]
            values.append(at @ self.weight[row] + bias)
        return torch.stack(values, dim=1)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        rewards = self.rewards(images, prompts)
        if self.output == OVERALL:
            return rewards.sum(1)
        return rewards[:, self.manifest["outputs"].index(self.output)]

    def describe(self) -> dict[str, Any]:
        return super().describe() | {"model": str(self.folder), "output": self.output,
                                     "outputs": self.manifest["outputs"],
                                     "pooling": self.manifest["pooling"], "frames": self.frames,
                                     "dtype": str(self.dtype).removeprefix("torch.")}

