"""The ``pickscore`` verifier on a tiny transformers CLIPModel + CLIPProcessor saved to disk."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPProcessor
from verifier_fixtures import (
    PROMPTS,
    TINY_IMAGE,
    check_rows_independent,
    offline_hub,
    pixel_batch,
    put_in_hub_cache,
    to_pil,
    write_tiny_hf_clip,
)

from diffsearch.verifiers.base import MissingWeightsError, VerifierError
from diffsearch.verifiers.pickscore import PickScoreVerifier
from diffsearch.verifiers.registry import create_verifier


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_hf_clip(tmp_path_factory.mktemp("pickscore"), seed=7)


@pytest.fixture(scope="module")
def verifier(folder: Path) -> PickScoreVerifier:
    return PickScoreVerifier(model=str(folder), processor=str(folder))


def _reference(folder: Path, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """PickScore as its model card computes it: PIL images and text through the processor,
    unit-norm features, logit_scale.exp() * cosine."""
    processor = CLIPProcessor.from_pretrained(folder)
    model = CLIPModel.from_pretrained(folder).eval()
    image_inputs = processor(images=to_pil(images), return_tensors="pt")
    text_inputs = processor(text=prompts, padding=True, truncation=True, max_length=77,
                            return_tensors="pt")
    with torch.no_grad():
        image = F.normalize(model.get_image_features(**image_inputs).pooler_output, dim=-1)
        text = F.normalize(model.get_text_features(**text_inputs).pooler_output, dim=-1)
    return model.logit_scale.exp() * (image * text).sum(-1)


def test_scores_match_the_model_card_computation(verifier: PickScoreVerifier,
                                                 folder: Path) -> None:
    images = pixel_batch(3, seed=8)
    scores = verifier.score(images, PROMPTS)
    assert scores.shape == (3,) and verifier.input_size == TINY_IMAGE
    torch.testing.assert_close(scores, _reference(folder, images, PROMPTS), atol=1e-3,
                               rtol=1e-4)


def test_score_is_identical_alone_or_batched(verifier: PickScoreVerifier) -> None:
    check_rows_independent(verifier, pixel_batch(5, seed=9), [PROMPTS[i % 3] for i in range(5)])


def test_loads_hub_ids_from_the_local_cache_only(folder: Path, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    attempts = offline_hub(monkeypatch, tmp_path)
    with pytest.raises(MissingWeightsError, match="'diffsearch-test/tiny-pickscore'.*hf download"):
        PickScoreVerifier(model="diffsearch-test/tiny-pickscore", processor=str(folder))
    for file in folder.iterdir():
        put_in_hub_cache(tmp_path, "diffsearch-test/tiny-pickscore", file.name, file)
    built = create_verifier({"name": "pickscore", "model": "diffsearch-test/tiny-pickscore",
                             "processor": "diffsearch-test/tiny-pickscore"})
    images = pixel_batch(2, seed=10)
    assert attempts == []
    torch.testing.assert_close(built.score(images, PROMPTS[:2]),
                               _reference(folder, images, PROMPTS[:2]), atol=1e-3, rtol=1e-4)


def test_missing_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(MissingWeightsError, match="processor.*no-such-folder"):
        PickScoreVerifier(model=str(tmp_path / "no-such-folder"),
                          processor=str(tmp_path / "no-such-folder"))


def test_resize_and_crop_follow_the_processor(verifier: PickScoreVerifier) -> None:
    wide = F.interpolate(pixel_batch(1, seed=11), size=(40, 64), mode="bilinear")
    assert verifier.score(wide, PROMPTS[:1]).shape == (1,)
    with pytest.raises(VerifierError, match="1 images but 2 prompts"):
        verifier.score(wide, PROMPTS[:2])


def test_processor_without_vocabulary_is_refused(folder: Path, tmp_path: Path) -> None:
    """A processor folder that lost tokenizer.json loads (transformers 5) as an empty
    tokenizer; scoring prompts as [UNK]s must not happen silently."""
    hollow = tmp_path / "hollow"
    hollow.mkdir()
    for file in folder.iterdir():
        if file.name != "tokenizer.json":
            (hollow / file.name).write_bytes(file.read_bytes())
    with pytest.raises(MissingWeightsError, match="has no vocabulary"):
        PickScoreVerifier(model=str(folder), processor=str(hollow))
