"""The ``hpsv2`` verifier: HPS checkpoints (wrapped or plain state dicts) on a tiny open_clip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from verifier_fixtures import (
    PROMPTS,
    check_rows_independent,
    offline_hub,
    open_clip_cosines,
    pixel_batch,
    put_in_hub_cache,
    register_tiny_clip,
    write_open_clip_checkpoint,
)

from diffsearch.verifiers._preprocess import clip_pixels
from diffsearch.verifiers.base import MissingWeightsError, VerifierError
from diffsearch.verifiers.hpsv2 import HPS_FILES, HPS_REPO, HpsV2Verifier
from diffsearch.verifiers.registry import create_verifier

SEED = 13


@pytest.fixture(scope="module")
def arch(tmp_path_factory: pytest.TempPathFactory) -> str:
    return register_tiny_clip(tmp_path_factory.mktemp("open-clip-configs"))


@pytest.fixture(scope="module")
def wrapped(arch: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The published layout: {"state_dict": ...}."""
    return write_open_clip_checkpoint(tmp_path_factory.mktemp("hps") / HPS_FILES["2.1"],
                                      seed=SEED, wrap="state_dict")


def _cosines(arch: str, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    return open_clip_cosines(arch, SEED, clip_pixels(images, 32), prompts)


def test_wrapped_checkpoint_scores_cosine(arch: str, wrapped: Path) -> None:
    verifier = HpsV2Verifier(weights=str(wrapped), arch=arch)
    images = pixel_batch(3, seed=14)
    scores = verifier.score(images, PROMPTS)
    torch.testing.assert_close(scores, _cosines(arch, images, PROMPTS), atol=1e-5, rtol=1e-4)
    assert scores.abs().max() <= 1.0  # the HPS convention: cosine, not 100 * cosine


def test_plain_and_ddp_prefixed_state_dicts_load(arch: str, wrapped: Path,
                                                 tmp_path: Path) -> None:
    state = torch.load(wrapped, weights_only=True)["state_dict"]
    plain, ddp = tmp_path / "plain.pt", tmp_path / "ddp.pt"
    torch.save(state, plain)
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, ddp)
    images = pixel_batch(2, seed=15)
    expected = _cosines(arch, images, PROMPTS[:2])
    for path in (plain, ddp):
        got = HpsV2Verifier(weights=str(path), arch=arch).score(images, PROMPTS[:2])
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_row_independent(arch: str, wrapped: Path) -> None:
    verifier = HpsV2Verifier(weights=str(wrapped), arch=arch)
    check_rows_independent(verifier, pixel_batch(4, seed=16), [PROMPTS[i % 3] for i in range(4)])


def test_found_in_hub_cache_by_version(arch: str, wrapped: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    attempts = offline_hub(monkeypatch, tmp_path)
    with pytest.raises(MissingWeightsError,
                       match=r"HPS_v2\.1_compressed\.pt of xswu/HPSv2.*hf download"):
        HpsV2Verifier(arch=arch)
    put_in_hub_cache(tmp_path, HPS_REPO, HPS_FILES["2.1"], wrapped)
    built = create_verifier({"name": "hpsv2", "arch": arch})
    assert built.describe()["weights"].endswith("HPS_v2.1_compressed.pt")
    with pytest.raises(MissingWeightsError, match=r"HPS_v2_compressed\.pt"):
        HpsV2Verifier(arch=arch, version="2.0")
    assert attempts == []


def test_bad_inputs(arch: str, tmp_path: Path) -> None:
    with pytest.raises(VerifierError, match="version must be one of 2.1, 2.0"):
        HpsV2Verifier(arch=arch, version="3")
    with pytest.raises(MissingWeightsError, match="HPS checkpoint not found: .*missing.pt"):
        HpsV2Verifier(arch=arch, weights=str(tmp_path / "missing.pt"))
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"visual.proj": torch.zeros(2, 2)}}, foreign)
    with pytest.raises(VerifierError, match="does not fit open_clip"):
        HpsV2Verifier(arch=arch, weights=str(foreign))
