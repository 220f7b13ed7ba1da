"""The ``ensemble`` verifier: weighted raw sums and per-batch rank normalisation."""

from __future__ import annotations

import pytest
import torch
from verifier_fixtures import pixel_batch, register_tiny_clip, write_open_clip_checkpoint

from diffsearch.verifiers.base import VerifierError
from diffsearch.verifiers.clip import ClipVerifier
from diffsearch.verifiers.ensemble import EnsembleVerifier, batch_ranks
from diffsearch.verifiers.registry import UnknownVerifierError, create_verifier

PROMPTS = ["a red circle", "two blue squares", "a green triangle", "a red circle"]


@pytest.fixture(scope="module")
def members(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    arch = register_tiny_clip(tmp_path_factory.mktemp("open-clip-configs"))
    folder = tmp_path_factory.mktemp("weights")
    return [
        {"name": "clip", "arch": arch,
         "pretrained": str(write_open_clip_checkpoint(folder / "a.pt", seed=11))},
        {"name": "clip", "arch": arch,
         "pretrained": str(write_open_clip_checkpoint(folder / "b.pt", seed=12)),
         "weight": -0.5},
    ]


@pytest.fixture(scope="module")
def member_scores(members: list[dict]) -> list[torch.Tensor]:
    images = pixel_batch(4, seed=20)
    return [ClipVerifier(**{k: v for k, v in m.items() if k not in ("name", "weight")})
            .score(images, PROMPTS) for m in members]


def test_raw_is_the_weighted_sum(members: list[dict], member_scores: list[torch.Tensor]) -> None:
    ensemble = create_verifier({"name": "ensemble", "members": members})
    assert isinstance(ensemble, EnsembleVerifier) and ensemble.normalize == "raw"
    scores = ensemble.score(pixel_batch(4, seed=20), PROMPTS)
    expected = member_scores[0] - 0.5 * member_scores[1]
    torch.testing.assert_close(scores, expected)
    assert ensemble.needs_prompt


def test_raw_is_row_independent(members: list[dict]) -> None:
    ensemble = EnsembleVerifier(members=members)
    images = pixel_batch(4, seed=21)
    together = ensemble.score(images, PROMPTS)
    for row in range(4):
        assert torch.equal(ensemble.score(images[row:row + 1], PROMPTS[row:row + 1])[0],
                           together[row])


def test_rank_sums_weighted_batch_ranks(members: list[dict],
                                       member_scores: list[torch.Tensor]) -> None:
    ensemble = EnsembleVerifier(members=members, normalize="rank")
    scores = ensemble.score(pixel_batch(4, seed=20), PROMPTS)
    expected = batch_ranks(member_scores[0].double()) - 0.5 * batch_ranks(
        member_scores[1].double())
    torch.testing.assert_close(scores, expected.float())
    # ranks depend on batch-mates: alone, every member rank is 0.5
    alone = ensemble.score(pixel_batch(4, seed=20)[:1], PROMPTS[:1])
    assert alone.item() == pytest.approx(0.5 - 0.25)


def test_batch_ranks_scale_and_ties() -> None:
    ranks = batch_ranks(torch.tensor([3.0, 1.0, 2.0, 3.0, 0.0], dtype=torch.float64))
    assert ranks.tolist() == pytest.approx([0.875, 0.25, 0.5, 0.875, 0.0])
    assert batch_ranks(torch.tensor([7.0])).tolist() == [0.5]


def test_describe_lists_members_with_weights(members: list[dict]) -> None:
    described = EnsembleVerifier(members=members).describe()
    assert [m["weight"] for m in described["members"]] == [1.0, -0.5]
    assert all(m["name"] == "clip" for m in described["members"])


@pytest.mark.parametrize(("options", "message"), [
    ({"members": []}, "at least one"),
    ({"members": ["clip"], "normalize": "zscore"}, "normalize must be one of raw, rank"),
    ({"members": [{"name": "clip", "weight": "high"}]}, r"members\[0\].weight must be a number"),
    ({"members": [3]}, r"members\[0\] must be a name or a mapping"),
])
def test_bad_options_are_refused(options: dict, message: str) -> None:
    with pytest.raises(VerifierError, match=message):
        EnsembleVerifier(**options)


def test_unknown_member_is_named() -> None:
    with pytest.raises(UnknownVerifierError, match="'nonexistent'"):
        EnsembleVerifier(members=["nonexistent"])
