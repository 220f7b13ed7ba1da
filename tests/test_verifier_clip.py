"""The ``clip`` verifier and the shared preprocessing, on a tiny open_clip model saved to disk."""

from __future__ import annotations

from pathlib import Path

import open_clip
import pytest
import torch
import torch.nn.functional as F
from verifier_fixtures import (
    PROMPTS,
    TINY_IMAGE,
    check_rows_independent,
    offline_hub,
    open_clip_cosines,
    pixel_batch,
    put_in_hub_cache,
    register_tiny_clip,
    to_pil,
    write_open_clip_checkpoint,
)

from diffsearch.verifiers._preprocess import CLIP_MEAN, CLIP_STD, clip_pixels
from diffsearch.verifiers.base import MissingWeightsError, VerifierError
from diffsearch.verifiers.clip import ClipVerifier
from diffsearch.verifiers.registry import create_verifier


@pytest.fixture(scope="module")
def arch(tmp_path_factory: pytest.TempPathFactory) -> str:
    return register_tiny_clip(tmp_path_factory.mktemp("open-clip-configs"))


@pytest.fixture(scope="module")
def checkpoint(arch: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_open_clip_checkpoint(tmp_path_factory.mktemp("weights") / "tiny.pt", seed=1)


@pytest.fixture(scope="module")
def verifier(arch: str, checkpoint: Path) -> ClipVerifier:
    return ClipVerifier(arch=arch, pretrained=str(checkpoint))


def _reference_scores(arch: str, seed: int, images: torch.Tensor, prompts: list[str]
                      ) -> torch.Tensor:
    """100 * cosine computed the way open_clip's own docs do it: PIL images through
    open_clip's validation transform, then encode_image / encode_text."""
    transform = open_clip.image_transform(TINY_IMAGE, is_train=False, mean=CLIP_MEAN,
                                          std=CLIP_STD)
    pixels = torch.stack([transform(pil) for pil in to_pil(images)])
    return 100 * open_clip_cosines(arch, seed, pixels, prompts)


def test_scores_match_open_clip_reference_pipeline(verifier: ClipVerifier, arch: str) -> None:
    images = pixel_batch(3, seed=5)
    scores = verifier.score(images, PROMPTS)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, _reference_scores(arch, 1, images, PROMPTS),
                               atol=1e-3, rtol=1e-4)
    assert ((scores >= -100) & (scores <= 100)).all()


def test_score_is_identical_alone_or_batched(verifier: ClipVerifier) -> None:
    images = pixel_batch(5, seed=6)
    prompts = [PROMPTS[i % 3] for i in range(5)]
    together = check_rows_independent(verifier, images, prompts)
    reordered = verifier.score(images.flip(0), prompts[::-1])
    assert torch.equal(reordered.flip(0), together)


def test_prompt_changes_score(verifier: ClipVerifier) -> None:
    image = pixel_batch(1, seed=7).expand(3, -1, -1, -1)
    scores = verifier.score(image, PROMPTS)
    assert len(set(scores.tolist())) == 3


def test_resizes_any_input_size_like_pil(verifier: ClipVerifier) -> None:
    """A 64x48 image is resized (shortest side) and centre-cropped; close to PIL's bicubic."""
    generator = torch.Generator().manual_seed(8)
    smooth = F.interpolate(torch.rand(1, 3, 6, 8, generator=generator), size=(48, 64),
                           mode="bilinear", align_corners=False)
    ours = clip_pixels(smooth, TINY_IMAGE)
    pil = to_pil(smooth)[0]
    transform = open_clip.image_transform(TINY_IMAGE, is_train=False)
    assert ours.shape == (1, 3, TINY_IMAGE, TINY_IMAGE)
    assert (ours[0] - transform(pil)).abs().mean() < 0.03
    assert verifier.score(smooth, PROMPTS[:1]).shape == (1,)


def test_built_by_registry_with_job_file_options(arch: str, checkpoint: Path) -> None:
    built = create_verifier({"name": "clip", "arch": arch, "pretrained": str(checkpoint),
                             "label": "clip-tiny", "chunk": 4})
    assert isinstance(built, ClipVerifier) and built.chunk == 4
    assert built.describe()["weights"] == f"{arch} {checkpoint}"


def test_missing_checkpoint_file_names_it(arch: str, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "clip.pt"
    with pytest.raises(MissingWeightsError, match="nowhere/clip.pt"):
        ClipVerifier(arch=arch, pretrained=str(missing))


def test_unknown_tag_lists_the_archs_tags() -> None:
    with pytest.raises(VerifierError, match="laion2b_s32b_b79k"):
        ClipVerifier(arch="ViT-H-14", pretrained="no-such-tag")


def test_uncached_tag_names_the_hub_file_and_never_downloads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    attempts = offline_hub(monkeypatch, tmp_path)
    with pytest.raises(MissingWeightsError,
                       match=r"open_clip_pytorch_model.bin of timm/vit_large_patch14_clip_224"):
        ClipVerifier(arch="ViT-L-14", pretrained="openai")
    assert attempts == []


def test_tag_found_in_local_hub_cache(arch: str, checkpoint: Path, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """A pretrained tag resolves to the file in the Hugging Face cache layout."""
    from open_clip import pretrained as oc_pretrained

    attempts = offline_hub(monkeypatch, tmp_path)
    monkeypatch.setitem(oc_pretrained._PRETRAINED, arch,
                        {"tiny": {"hf_hub": "diffsearch-test/tiny-clip/", "quick_gelu": False,
                                  "mean": CLIP_MEAN, "std": CLIP_STD}})
    put_in_hub_cache(tmp_path, "diffsearch-test/tiny-clip", "open_clip_pytorch_model.bin",
                     checkpoint)
    built = ClipVerifier(arch=arch, pretrained="tiny")
    assert attempts == []
    images = pixel_batch(2, seed=9)
    torch.testing.assert_close(built.score(images, PROMPTS[:2]),
                               _reference_scores(arch, 1, images, PROMPTS[:2]),
                               atol=1e-3, rtol=1e-4)


def test_checkpoint_of_another_architecture_is_refused(checkpoint: Path) -> None:
    with pytest.raises(VerifierError, match="does not fit open_clip ViT-B-32"):
        ClipVerifier(arch="ViT-B-32", pretrained=str(checkpoint))


def test_malformed_input_is_refused(verifier: ClipVerifier) -> None:
    with pytest.raises(VerifierError, match="2 images but 1 prompts"):
        verifier.score(pixel_batch(2, seed=1), PROMPTS[:1])
    with pytest.raises(VerifierError, match=r"\(B, 3, H, W\)"):
        verifier.score(torch.zeros(2, 32, 32), PROMPTS[:2])


def test_squash_resize_mode_keeps_the_whole_image() -> None:
    """open_clip's resize_mode 'squash' (SigLIP) distorts to the square instead of cropping."""
    wide = torch.zeros(1, 3, 32, 64)
    wide[..., :16] = 1.0  # a white band at the left edge, cropped away by centre-cropping
    squashed = clip_pixels(wide, 32, mean=(0, 0, 0), std=(1, 1, 1), squash=True)
    cropped = clip_pixels(wide, 32, mean=(0, 0, 0), std=(1, 1, 1))
    assert squashed[..., :6].min() > 0.99 and cropped[..., :6].max() < 0.01
