"""The ``imagereward`` verifier: an ImageReward.pt-layout checkpoint on transformers' BLIP.

The reference below recomputes ImageReward from the ORIGINAL key names with plain tensor ops
(timm-style pre-norm ViT, post-norm BERT with cross-attention, the MLP head, the standardisation),
so a wrong key mapping, head split, LayerNorm eps or token position would show up as a mismatch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import BertTokenizer
from verifier_fixtures import (
    IR_TEXT,
    IR_VISION,
    check_rows_independent,
    offline_hub,
    pixel_batch,
    write_tiny_imagereward,
)

from diffsearch.verifiers._preprocess import clip_pixels
from diffsearch.verifiers.base import MissingWeightsError, VerifierError
from diffsearch.verifiers.imagereward import (
    PROMPT_TOKENS,
    REWARD_MEAN,
    REWARD_STD,
    ImageRewardVerifier,
)
from diffsearch.verifiers.registry import create_verifier

PROMPTS = ["a red circle on the left", "two blue squares", "a green triangle on the right"]


@pytest.fixture(scope="module")
def options(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return write_tiny_imagereward(tmp_path_factory.mktemp("imagereward"), seed=17)


@pytest.fixture(scope="module")
def verifier(options: dict[str, str]) -> ImageRewardVerifier:
    return ImageRewardVerifier(**options)


def _linear(x: torch.Tensor, s: dict, key: str) -> torch.Tensor:
    return x @ s[f"{key}.weight"].T + s[f"{key}.bias"]


def _norm(x: torch.Tensor, s: dict, key: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], s[f"{key}.weight"], s[f"{key}.bias"], eps)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    b, n, d = q.shape
    split = [t.reshape(b, t.shape[1], heads, d // heads).transpose(1, 2) for t in (q, k, v)]
    scores = split[0] @ split[1].transpose(-1, -2) / (d // heads) ** 0.5
    if bias is not None:
        scores = scores + bias
    return (scores.softmax(-1) @ split[2]).transpose(1, 2).reshape(b, n, d)


def _reference(state: dict, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor
               ) -> torch.Tensor:
    v = "blip.visual_encoder"
    x = F.conv2d(pixels, state[f"{v}.patch_embed.proj.weight"],
                 state[f"{v}.patch_embed.proj.bias"], stride=IR_VISION["patch"])
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([state[f"{v}.cls_token"].expand(x.shape[0], -1, -1), x], 1)
    x = x + state[f"{v}.pos_embed"]
    heads = IR_VISION["width"] // 64
    for i in range(IR_VISION["layers"]):
        block = f"{v}.blocks.{i}"
        h = _norm(x, state, f"{block}.norm1", 1e-6)
        q, k, val = _linear(h, state, f"{block}.attn.qkv").chunk(3, dim=-1)
        x = x + _linear(_attend(q, k, val, heads), state, f"{block}.attn.proj")
        h = _norm(x, state, f"{block}.norm2", 1e-6)
        x = x + _linear(F.gelu(_linear(h, state, f"{block}.mlp.fc1")), state,
                        f"{block}.mlp.fc2")
    image_tokens = _norm(x, state, f"{v}.norm", 1e-6)

    t, eps, heads = "blip.text_encoder", IR_TEXT["layer_norm_eps"], IR_TEXT["num_attention_heads"]
    y = state[f"{t}.embeddings.word_embeddings.weight"][ids]
    y = y + state[f"{t}.embeddings.position_embeddings.weight"][: ids.shape[1]]
    y = _norm(y, state, f"{t}.embeddings.LayerNorm", eps)
    pad_bias = (1.0 - mask[:, None, None, :].float()) * torch.finfo(torch.float32).min
    for i in range(IR_TEXT["num_hidden_layers"]):
        layer = f"{t}.encoder.layer.{i}"
        for kind, source, bias in (("attention", y, pad_bias),
                                   ("crossattention", image_tokens, None)):
            attended = _attend(_linear(y, state, f"{layer}.{kind}.self.query"),
                               _linear(source, state, f"{layer}.{kind}.self.key"),
                               _linear(source, state, f"{layer}.{kind}.self.value"), heads, bias)
            y = _norm(_linear(attended, state, f"{layer}.{kind}.output.dense") + y, state,
                      f"{layer}.{kind}.output.LayerNorm", eps)
        inner = F.gelu(_linear(y, state, f"{layer}.intermediate.dense"))
        y = _norm(_linear(inner, state, f"{layer}.output.dense") + y, state,
                  f"{layer}.output.LayerNorm", eps)
    z = y[:, 0]
    for key in ("layers.0", "layers.2", "layers.4", "layers.6", "layers.7"):
        z = _linear(z, state, f"mlp.{key}")
    return (z.squeeze(-1) - REWARD_MEAN) / REWARD_STD


def test_scores_match_the_original_layout_recomputed(verifier: ImageRewardVerifier,
                                                     options: dict[str, str]) -> None:
    images = pixel_batch(3, seed=18)
    state = torch.load(options["weights"], weights_only=True)
    tokens = BertTokenizer.from_pretrained(options["tokenizer"])(
        PROMPTS, padding="max_length", truncation=True, max_length=PROMPT_TOKENS,
        return_tensors="pt")
    with torch.no_grad():
        expected = _reference(state, clip_pixels(images, IR_VISION["image"]),
                              tokens["input_ids"], tokens["attention_mask"])
    scores = verifier.score(images, PROMPTS)
    assert scores.shape == (3,) and verifier.input_size == IR_VISION["image"]
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-4)
    assert len(set(verifier.score(images[:1].expand(3, -1, -1, -1), PROMPTS).tolist())) == 3


def test_row_independent(verifier: ImageRewardVerifier) -> None:
    check_rows_independent(verifier, pixel_batch(5, seed=19), [PROMPTS[i % 3] for i in range(5)])


def test_registry_and_sibling_med_config(options: dict[str, str]) -> None:
    built = create_verifier({"name": "imagereward", **options})
    assert isinstance(built, ImageRewardVerifier)
    assert built.describe()["weights"] == options["weights"]


def test_missing_files_are_named(options: dict[str, str], tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    attempts = offline_hub(monkeypatch, tmp_path)
    with pytest.raises(MissingWeightsError, match="ImageReward.pt of THUDM/ImageReward"):
        ImageRewardVerifier(tokenizer=options["tokenizer"])
    lone = tmp_path / "lone" / "ImageReward.pt"
    lone.parent.mkdir()
    lone.write_bytes(Path(options["weights"]).read_bytes())
    with pytest.raises(MissingWeightsError, match="med_config.json not found: .*lone"):
        ImageRewardVerifier(weights=str(lone), tokenizer=options["tokenizer"])
    with pytest.raises(MissingWeightsError, match="'bert-base-uncased'.*hf download"):
        ImageRewardVerifier(weights=options["weights"])
    assert attempts == []


def test_foreign_checkpoints_are_refused(options: dict[str, str], tmp_path: Path) -> None:
    state = torch.load(options["weights"], weights_only=True)
    broken = tmp_path / "ImageReward.pt"
    (tmp_path / "med_config.json").write_text(
        Path(options["weights"]).with_name("med_config.json").read_text())
    torch.save({k: v for k, v in state.items() if not k.startswith("mlp.")}, broken)
    with pytest.raises(VerifierError, match=r"no mlp\.\* tensors"):
        ImageRewardVerifier(weights=str(broken), tokenizer=options["tokenizer"])
    state["blip.visual_encoder.blocks.0.attn.extra.weight"] = torch.zeros(1)
    torch.save(state, broken)
    with pytest.raises(VerifierError, match="unexpected vision key .*attn.extra.weight"):
        ImageRewardVerifier(weights=str(broken), tokenizer=options["tokenizer"])


def test_tokenizer_folder_without_vocabulary_is_refused(options: dict[str, str],
                                                        tmp_path: Path) -> None:
    """transformers 5 quietly builds an empty tokenizer from a folder that lost its vocab."""
    hollow = tmp_path / "hollow-tokenizer"
    hollow.mkdir()
    (hollow / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer"}')
    with pytest.raises(MissingWeightsError, match="has no vocabulary"):
        ImageRewardVerifier(weights=options["weights"], tokenizer=str(hollow))
