"""The ``aesthetic`` verifier: the LAION predictor's checkpoint layout on a tiny open_clip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from verifier_fixtures import (
    TINY_EMBED,
    pixel_batch,
    register_tiny_clip,
    tiny_open_clip,
    write_aesthetic_weights,
    write_open_clip_checkpoint,
)

from diffsearch.verifiers._preprocess import clip_pixels
from diffsearch.verifiers.aesthetic import WEIGHTS_FILE, AestheticVerifier
from diffsearch.verifiers.base import MissingWeightsError, VerifierError
from diffsearch.verifiers.registry import create_verifier


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    arch = register_tiny_clip(tmp_path_factory.mktemp("open-clip-configs"))
    folder = tmp_path_factory.mktemp("weights")
    return {
        "clip_arch": arch,
        "clip_pretrained": str(write_open_clip_checkpoint(folder / "clip.pt", seed=3)),
        "weights": str(write_aesthetic_weights(folder / WEIGHTS_FILE, seed=4)),
    }


@pytest.fixture(scope="module")
def verifier(files: dict[str, str]) -> AestheticVerifier:
    return AestheticVerifier(**files)


def test_checkpoint_has_the_real_layout(files: dict[str, str]) -> None:
    state = torch.load(files["weights"], weights_only=True)
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "layers.0.weight": (1024, TINY_EMBED), "layers.0.bias": (1024,),
        "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
        "layers.4.weight": (64, 128), "layers.4.bias": (64,),
        "layers.6.weight": (16, 64), "layers.6.bias": (16,),
        "layers.7.weight": (1, 16), "layers.7.bias": (1,),
    }


def test_score_is_the_affine_chain_on_normalised_embeddings(
    verifier: AestheticVerifier, files: dict[str, str]
) -> None:
    """Recompute by hand: unit-norm CLIP image embedding through the five Linear layers."""
    images = pixel_batch(3, seed=5)
    state = torch.load(files["weights"], weights_only=True)
    with torch.no_grad():
        x = F.normalize(tiny_open_clip(3, files["clip_arch"]).encode_image(
            clip_pixels(images, 32)), dim=-1)
        for layer in (0, 2, 4, 6, 7):
            x = x @ state[f"layers.{layer}.weight"].T + state[f"layers.{layer}.bias"]
    scores = verifier.score(images, ["ignored"] * 3)
    assert scores.shape == (3,)
    torch.testing.assert_close(scores, x.squeeze(-1), atol=1e-5, rtol=1e-4)


def test_prompt_free_and_row_independent(verifier: AestheticVerifier) -> None:
    images = pixel_batch(5, seed=6)
    together = verifier.score(images, ["a"] * 5)
    assert torch.equal(verifier.score(images, ["b"] * 5), together)
    for row in range(5):
        assert torch.equal(verifier.score(images[row:row + 1], ["c"])[0], together[row])
    assert not verifier.needs_prompt


def test_built_from_a_job_spec(files: dict[str, str]) -> None:
    built = create_verifier({"name": "aesthetic", **files})
    assert isinstance(built, AestheticVerifier)
    assert built.describe()["weights"] == files["weights"]


def test_missing_weights_name_the_file(files: dict[str, str], tmp_path: Path) -> None:
    options = {k: v for k, v in files.items() if k != "weights"}
    with pytest.raises(MissingWeightsError, match=r"sac\+logos\+ava1-l14-linearMSE\.pth.*github"):
        AestheticVerifier(**options)
    with pytest.raises(MissingWeightsError, match=r"gone/sac\+logos"):
        AestheticVerifier(weights=str(tmp_path / "gone" / WEIGHTS_FILE), **options)


def test_foreign_files_are_refused(files: dict[str, str], tmp_path: Path) -> None:
    options = {k: v for k, v in files.items() if k != "weights"}
    wrong_width = write_aesthetic_weights(tmp_path / "768.pth", seed=1, input_dim=768)
    with pytest.raises(VerifierError, match="expect 768-d CLIP embeddings .* gives 16-d"):
        AestheticVerifier(weights=str(wrong_width), **options)
    other = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(1, 16)}, other)
    with pytest.raises(VerifierError, match="not an aesthetic-predictor state dict.*fc.weight"):
        AestheticVerifier(weights=str(other), **options)
    truncated = tmp_path / "truncated.pth"
    state = torch.load(files["weights"], weights_only=True)
    del state["layers.7.bias"]
    torch.save(state, truncated)
    with pytest.raises(VerifierError, match="layers.7.bias"):
        AestheticVerifier(weights=str(truncated), **options)
