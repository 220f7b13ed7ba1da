"""The shapes-world CLIP: a tiny open_clip architecture registered under ``shapes-clip``.

A 32x32 ViT (4x4 patches) and a 2-layer text transformer over the grammar tokenizer
(``tokenizer.py``, ~600 ids, so the token table is ~600 x 64 instead of 49408 x 512). open_clip
pools text at ``argmax(ids)``; the generated tokenizer gives end-of-text the largest id, so that
is the end of the prompt.

open_clip resolves a config's tokenizer from ``text_cfg.hf_tokenizer_name`` (an HF tokenizer
folder, loaded with ``AutoTokenizer.from_pretrained``, no hub access for a local path). The
shipped folder ``weights/clip/`` therefore holds the tokenizer files, ``open_clip_config.json``
and ``open_clip_model.safetensors``: it loads with ``create_model('local-dir:<folder>')``, and
:func:`register` also adds the architecture to open_clip's name registry with the tokenizer path
made absolute, so ``create_model('shapes-clip', pretrained=...)`` and
``get_tokenizer('shapes-clip')`` work too.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import open_clip
import torch

from diffsearch.pipelines.shapes.tokenizer import MAX_LENGTH
from diffsearch.pipelines.shapes.world import SIZE

MODEL_NAME = "shapes-clip"
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
WEIGHTS_DIR = Path(__file__).parent / "weights" / "clip"
"""``shapes-clip``: the guide every default uses."""
SMALL_WEIGHTS_DIR = Path(__file__).parent / "weights" / "clip-small"
"""``shapes-clip-small``: the first shipped guide, trained on renders only; kept because its
weaker agreement with the oracle is what makes reward hacking easy to see."""
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


def model_config(
    tokenizer_dir: str | Path,
    vocab_size: int,
    embed_dim: int = 64,
    vision_width: int = 96,
    vision_layers: int = 3,
    text_width: int = 64,
    text_layers: int = 2,
) -> dict[str, Any]:
    """The open_clip model config (``embed_dim``, ``vision_cfg``, ``text_cfg``)."""
    return {
        "embed_dim": embed_dim,
        "vision_cfg": {
            "image_size": SIZE,
            "patch_size": 4,
            "layers": vision_layers,
            "width": vision_width,
            "head_width": 32,
        },
        "text_cfg": {
            "context_length": MAX_LENGTH,
            "vocab_size": vocab_size,
            "width": text_width,
            "heads": max(1, text_width // 16),
            "layers": text_layers,
            "hf_tokenizer_name": str(tokenizer_dir),
            "pool_type": "argmax",
        },
    }


def write_config(folder: Path, cfg: dict[str, Any]) -> None:
    """Write open_clip's local-dir config (model + preprocessing) into ``folder``."""
    stored = json.loads(json.dumps(cfg))
    stored["text_cfg"]["hf_tokenizer_name"] = "."  # local-dir loading uses the folder itself
    preprocess = {"size": SIZE, "mean": list(MEAN), "std": list(STD)}
    payload = {"model_cfg": stored, "preprocess_cfg": preprocess}
    (folder / CONFIG_FILE).write_text(json.dumps(payload, indent=2) + "\n")


def register(weights_dir: str | Path = WEIGHTS_DIR) -> str:
    """Add ``shapes-clip`` (tokenizer in ``weights_dir``) to open_clip's config registry.

    The registry reads config files, and the tokenizer path in one must be absolute, so a
    resolved copy of the shipped config is written to a private temporary folder.
    """
    folder = Path(weights_dir).resolve()
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"no shapes-clip config at {config_path}; train it first")
    cfg = json.loads(config_path.read_text())["model_cfg"]
    cfg["text_cfg"]["hf_tokenizer_name"] = str(folder)
    target = Path(tempfile.mkdtemp(prefix="diffsearch-shapes-clip-")) / f"{MODEL_NAME}.json"
    target.write_text(json.dumps(cfg))
    open_clip.add_model_config(target)
    return MODEL_NAME


def load(weights_dir: str | Path = WEIGHTS_DIR, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer) from a shapes-clip folder, offline."""
    folder = Path(weights_dir)
    if not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(
            f"shapes-clip weights missing: {folder / WEIGHTS_FILE} "
            "(train them with python -m diffsearch.pipelines.shapes.train_clip)"
        )
    model = open_clip.create_model(f"local-dir:{folder}", device=device)
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    return model.eval(), tokenizer


def normalise(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> the model's input: SIZE x SIZE, mean/std normalised."""
    if images.shape[-2:] != (SIZE, SIZE):
        images = torch.nn.functional.interpolate(
            images, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False
        )
    mean = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std
