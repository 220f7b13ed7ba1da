"""Tiny random-weight reward models written to disk in their REAL file formats.

The verifiers under test load these exactly as they load the published weights (an open_clip
checkpoint of a registered architecture, an aesthetic-predictor state dict with the LAION key
names, a transformers CLIPModel folder with a tokenizer and image processor, the Hugging Face cache
layout), so the loading code is what is tested, not a stub. Random initialisation happens inside
``torch.random.fork_rng`` so tests do not disturb global RNG state.

Also here: what several verifier tests check or recompute the same way (row independence, the
open_clip reference cosine, PIL conversion, an offline Hub cache), written once.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffsearch.verifiers.base import Verifier

PROMPTS = ["a red circle on the left", "two blue squares", "a green triangle"]
"""Three different prompts in words every tiny tokenizer here knows."""

TINY_CLIP_ARCH = "diffsearch-tiny-clip"
TINY_EMBED = 16
TINY_IMAGE = 32

_TINY_CLIP_CONFIG = {
    "embed_dim": TINY_EMBED,
    "vision_cfg": {"image_size": TINY_IMAGE, "layers": 1, "width": 32, "patch_size": 8,
                   "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2,
                 "layers": 1},
}


def register_tiny_clip(folder: Path) -> str:
    """Register the tiny open_clip architecture (config file in ``folder``); returns its name.
    ``folder`` must outlive the tests that use the arch: open_clip rescans config paths."""
    import open_clip

    if TINY_CLIP_ARCH not in open_clip.list_models():
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{TINY_CLIP_ARCH}.json"
        # Worker processes register it at once into one folder, and open_clip reads every .json
        # there: write aside and rename, so no reader ever sees a half-written config.
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(_TINY_CLIP_CONFIG))
        os.replace(partial, path)
        open_clip.add_model_config(path)
    return TINY_CLIP_ARCH


def tiny_open_clip(seed: int, arch: str = TINY_CLIP_ARCH) -> torch.nn.Module:
    """A randomly initialised open_clip model of ``arch`` (registered first)."""
    import open_clip

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model(arch, pretrained=None)
    return model.eval()


def open_clip_cosines(arch: str, seed: int, pixels: torch.Tensor, prompts: list[str]
                      ) -> torch.Tensor:
    """Cosine of image and text features of ``tiny_open_clip(seed, arch)`` through its own
    ``encode_image`` / ``encode_text``: the reference the open_clip-based verifiers must match.
    ``pixels`` are already preprocessed, so each test states the preprocessing it expects."""
    import open_clip

    model = tiny_open_clip(seed, arch)
    with torch.no_grad():
        image = F.normalize(model.encode_image(pixels), dim=-1)
        text = F.normalize(model.encode_text(open_clip.get_tokenizer(arch)(prompts)), dim=-1)
    return (image * text).sum(-1)


def write_open_clip_checkpoint(path: Path, seed: int, wrap: str | None = None) -> Path:
    """Save a tiny open_clip model's state dict as a ``.pt`` file; ``wrap`` puts it under that
    key (HPS checkpoints keep it under ``state_dict``)."""
    state = tiny_open_clip(seed).state_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({wrap: state} if wrap else state, path)
    return path


AESTHETIC_HIDDEN = (1024, 128, 64, 16, 1)
"""Layer widths of the LAION improved aesthetic predictor after its input."""
AESTHETIC_LINEAR_KEYS = ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7")
"""Where its Linear layers sit in its nn.Sequential (dropouts in between at 1, 3, 5)."""


def write_aesthetic_weights(path: Path, seed: int, input_dim: int = TINY_EMBED) -> Path:
    """A random aesthetic-predictor state dict with the real key names and layer sizes."""
    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    fan_in = input_dim
    for key, width in zip(AESTHETIC_LINEAR_KEYS, AESTHETIC_HIDDEN, strict=True):
        bound = fan_in ** -0.5
        state[f"{key}.weight"] = (torch.rand(width, fan_in, generator=generator) * 2 - 1) * bound
        state[f"{key}.bias"] = (torch.rand(width, generator=generator) * 2 - 1) * bound
        fan_in = width
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def _byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (printable ASCII/Latin-1 map
    to themselves, the rest to code points from 256 up)."""
    direct = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
              *range(ord("®"), ord("ÿ") + 1)]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in direct:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def tiny_clip_tokenizer_vocab() -> dict[str, int]:
    """A CLIP BPE vocabulary with no merges: every byte, every byte ending a word, specials."""
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


def write_tiny_hf_clip(folder: Path, seed: int) -> Path:
    """A tiny transformers CLIPModel + CLIPProcessor saved with ``save_pretrained``, as a
    PickScore-style folder."""
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
    )

    vocab = tiny_clip_tokenizer_vocab()
    eos, bos = vocab["<|endoftext|>"], vocab["<|startoftext|>"]
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64,
                     "num_hidden_layers": 1, "num_attention_heads": 2,
                     "max_position_embeddings": 77, "eos_token_id": eos, "bos_token_id": bos,
                     "pad_token_id": eos},
        vision_config={"image_size": TINY_IMAGE, "patch_size": 8, "hidden_size": 32,
                       "intermediate_size": 64, "num_hidden_layers": 1,
                       "num_attention_heads": 2},
        projection_dim=TINY_EMBED,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPModel(config).eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    vocab_file = folder / "vocab-src.json"
    merges_file = folder / "merges-src.txt"
    vocab_file.write_text(json.dumps(vocab))
    merges_file.write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(vocab=str(vocab_file), merges=str(merges_file))
    vocab_file.unlink()
    merges_file.unlink()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": TINY_IMAGE},
                                           crop_size={"height": TINY_IMAGE,
                                                      "width": TINY_IMAGE}),
        tokenizer=tokenizer,
    )
    processor.save_pretrained(folder)
    return folder


def put_in_hub_cache(cache: Path, repo_id: str, filename: str, source: Path) -> Path:
    """Place ``source`` where the Hugging Face cache keeps ``repo_id/filename`` (the layout
    ``hf download`` writes: refs/main -> snapshots/<commit>/<file>)."""
    commit = "0" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    target = repo / "snapshots" / commit / filename
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(source.read_bytes())
    return target


def pixel_batch(count: int, seed: int, size: int = TINY_IMAGE) -> torch.Tensor:
    """Random images in [0, 1] on the 8-bit grid (k/255), so PIL round trips are exact."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (count, 3, size, size), generator=generator).float() / 255


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) images in [0, 1] as 8-bit PIL images, the input of the reference
    preprocessors (exact for ``pixel_batch`` images)."""
    return [Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
            for image in images]


def check_rows_independent(verifier: Verifier, images: torch.Tensor, prompts: list[str]
                           ) -> torch.Tensor:
    """Each (image, prompt) row scored alone equals its row of the batch, bit for bit: a search
    compares candidates scored in different batches. Returns the batch's scores."""
    together = verifier.score(images, prompts)
    for row in range(len(images)):
        alone = verifier.score(images[row:row + 1], prompts[row:row + 1])
        assert torch.equal(alone[0], together[row]), row
    return together


def write_distribution(site: Path, name: str, version: str, entry_points: dict[str, str],
                       modules: dict[str, str]) -> Path:
    """An installed distribution as pip leaves it (``<name>-<version>.dist-info`` with METADATA
    and entry_points.txt, plus its modules) in ``site``; put ``site`` on sys.path to use it."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = ["[diffsearch.verifiers]", *(f"{k} = {v}" for k, v in entry_points.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")
    for module, source in modules.items():
        (site / f"{module}.py").write_text(source)
    return info


IR_VISION = {"width": 64, "patch": 8, "image": TINY_IMAGE, "mlp": 128, "layers": 1}
IR_TEXT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
           "intermediate_size": 64, "max_position_embeddings": 40, "layer_norm_eps": 1e-12,
           "hidden_act": "gelu", "pad_token_id": 0}
IR_WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "blue", "green", "circle",
            "square", "##s", "triangle", "on", "the", "left", "right", "two", "three"]


def imagereward_state(seed: int) -> dict[str, torch.Tensor]:
    """Random tensors under the key names and shapes of ``ImageReward.pt`` (BLIP's timm-style
    ViT, BLIP's "med" BERT with cross-attention, the MLP head), tiny widths."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.2, offset: float = 0.0) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * scale + offset

    v, t = IR_VISION, IR_TEXT
    width, hidden = v["width"], t["hidden_size"]
    state = {
        "blip.visual_encoder.cls_token": rand(1, 1, width),
        "blip.visual_encoder.pos_embed": rand(1, (v["image"] // v["patch"]) ** 2 + 1, width),
        "blip.visual_encoder.patch_embed.proj.weight": rand(width, 3, v["patch"], v["patch"],
                                                            scale=0.05),
        "blip.visual_encoder.patch_embed.proj.bias": rand(width),
        "blip.visual_encoder.norm.weight": rand(width, scale=0.1, offset=1.0),
        "blip.visual_encoder.norm.bias": rand(width, scale=0.1),
    }
    for i in range(v["layers"]):
        block = f"blip.visual_encoder.blocks.{i}"
        for name, (rows, cols) in {"attn.qkv": (3 * width, width), "attn.proj": (width, width),
                                   "mlp.fc1": (v["mlp"], width),
                                   "mlp.fc2": (width, v["mlp"])}.items():
            state[f"{block}.{name}.weight"] = rand(rows, cols, scale=cols ** -0.5)
            state[f"{block}.{name}.bias"] = rand(rows, scale=0.05)
        for norm in ("norm1", "norm2"):
            state[f"{block}.{norm}.weight"] = rand(width, scale=0.1, offset=1.0)
            state[f"{block}.{norm}.bias"] = rand(width, scale=0.1)

    text = "blip.text_encoder"
    state[f"{text}.embeddings.word_embeddings.weight"] = rand(len(IR_WORDS), hidden)
    state[f"{text}.embeddings.position_embeddings.weight"] = rand(t["max_position_embeddings"],
                                                                  hidden)
    state[f"{text}.embeddings.position_ids"] = torch.arange(
        t["max_position_embeddings"]).expand(1, -1)
    layer_norms = ["embeddings.LayerNorm"]
    for i in range(t["num_hidden_layers"]):
        layer = f"encoder.layer.{i}"
        shapes = {
            "attention.self.query": (hidden, hidden), "attention.self.key": (hidden, hidden),
            "attention.self.value": (hidden, hidden), "attention.output.dense": (hidden, hidden),
            "crossattention.self.query": (hidden, hidden),
            "crossattention.self.key": (hidden, width),
            "crossattention.self.value": (hidden, width),
            "crossattention.output.dense": (hidden, hidden),
            "intermediate.dense": (t["intermediate_size"], hidden),
            "output.dense": (hidden, t["intermediate_size"]),
        }
        for name, (rows, cols) in shapes.items():
            state[f"{text}.{layer}.{name}.weight"] = rand(rows, cols, scale=cols ** -0.5)
            state[f"{text}.{layer}.{name}.bias"] = rand(rows, scale=0.05)
        layer_norms += [f"{layer}.attention.output.LayerNorm",
                        f"{layer}.crossattention.output.LayerNorm", f"{layer}.output.LayerNorm"]
    for norm in layer_norms:
        state[f"{text}.{norm}.weight"] = rand(hidden, scale=0.1, offset=1.0)
        state[f"{text}.{norm}.bias"] = rand(hidden, scale=0.1)
    # contrastive projections: present in the release, unused by the reward
    state["blip.vision_proj.weight"], state["blip.vision_proj.bias"] = rand(8, width), rand(8)
    state["blip.text_proj.weight"], state["blip.text_proj.bias"] = rand(8, hidden), rand(8)

    fan_in = hidden
    for key, out in zip(AESTHETIC_LINEAR_KEYS, AESTHETIC_HIDDEN, strict=True):
        state[f"mlp.{key}.weight"] = rand(out, fan_in, scale=fan_in ** -0.5)
        state[f"mlp.{key}.bias"] = rand(out, scale=0.05)
        fan_in = out
    return state


def write_tiny_imagereward(folder: Path, seed: int) -> dict[str, str]:
    """ImageReward.pt + med_config.json (as in the THUDM/ImageReward repo) and a WordPiece
    tokenizer folder; returns the verifier options that point at them."""
    from transformers import BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    torch.save(imagereward_state(seed), folder / "ImageReward.pt")
    med = {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": len(IR_WORDS),
           "type_vocab_size": 2, "add_cross_attention": True, "hidden_dropout_prob": 0.1,
           "attention_probs_dropout_prob": 0.1, **IR_TEXT}
    (folder / "med_config.json").write_text(json.dumps(med))
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(IR_WORDS) + "\n")
    BertTokenizer(vocab=str(vocab)).save_pretrained(folder / "tokenizer")
    vocab.unlink()
    return {"weights": str(folder / "ImageReward.pt"), "tokenizer": str(folder / "tokenizer")}


def forbid_network(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record (and refuse) every DNS lookup and socket connection; returns the record.

    Hugging Face offline mode is switched OFF here, so a verifier that stays offline does so by
    its own choice, not because the test environment sets HF_HUB_OFFLINE.
    """
    import socket

    import huggingface_hub.constants

    attempts: list[str] = []

    def refuse_lookup(host: object, *args: object, **kwargs: object) -> None:
        attempts.append(f"lookup {host}")
        raise OSError("network disabled by the test")

    def refuse_connect(sock: socket.socket, address: object) -> None:
        attempts.append(f"connect {address}")
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse_lookup)
    monkeypatch.setattr(socket.socket, "connect", refuse_connect)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    return attempts


def offline_hub(monkeypatch: pytest.MonkeyPatch, cache: Path) -> list[str]:
    """``forbid_network`` with the Hugging Face cache moved to ``cache``: a verifier must find
    Hub files there or name the missing one, never download. Returns the attempt record."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return forbid_network(monkeypatch)
