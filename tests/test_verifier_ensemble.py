"""The ``ensemble`` verifier: weighted raw sums, per-batch rank normalisation and the
row-independent calibrated normalisation."""

from __future__ import annotations

import json

import pytest
import torch
from verifier_fixtures import pixel_batch, register_tiny_clip, write_open_clip_checkpoint

from diffsearch.verifiers.base import VerifierError
from diffsearch.verifiers.clip import ClipVerifier
from diffsearch.verifiers.ensemble import Calibration, EnsembleVerifier, batch_ranks, load_reference
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
    ({"members": ["clip"], "normalize": "zscore"},
     "normalize must be one of raw, rank, calibrated"),
    ({"members": [{"name": "clip", "weight": "high"}]}, r"members\[0\].weight must be a number"),
    ({"members": [3]}, r"members\[0\] must be a name or a mapping"),
])
def test_bad_options_are_refused(options: dict, message: str) -> None:
    with pytest.raises(VerifierError, match=message):
        EnsembleVerifier(**options)


def test_unknown_member_is_named() -> None:
    with pytest.raises(UnknownVerifierError, match="'nonexistent'"):
        EnsembleVerifier(members=["nonexistent"])


def test_calibration_is_the_reference_cdf_with_strict_tails() -> None:
    calibration = Calibration([3.0, 0.0, 2.0, 1.0], "reference")
    inside = calibration(torch.tensor([0.0, 1.5, 3.0], dtype=torch.float64))
    assert inside.tolist() == pytest.approx([0.125, 0.5, 0.875])
    outside = calibration(torch.tensor([-50.0, -1.0, 3.5, 4.0, 50.0], dtype=torch.float64))
    assert 0 <= outside[0] < outside[1] < 0.125 < 0.875 < outside[2] < outside[3] < outside[4] <= 1
    # past the maximum the CDF rises by at most 0.5 / n more: a saturated member stops steering
    assert outside[4] - 0.875 <= 0.125
    # tied reference scores share their mean position
    tied = Calibration([0.0, 1.0, 1.0, 2.0], "reference")
    assert tied(torch.tensor([1.0], dtype=torch.float64)).item() == pytest.approx(0.5)


def test_calibrated_is_each_members_cdf_and_row_independent(members: list[dict],
                                                      member_scores: list[torch.Tensor]) -> None:
    references = [(s.double() * 1.1 + 0.01).tolist() + [s.min().item() - 1, s.max().item() + 1]
                  for s in member_scores]
    calibrated = [m | {"reference": r} for m, r in zip(members, references)]
    ensemble = EnsembleVerifier(members=calibrated, normalize="calibrated")
    images = pixel_batch(4, seed=20)
    together = ensemble.score(images, PROMPTS)
    expected = (Calibration(references[0], "r")(member_scores[0].double())
                - 0.5 * Calibration(references[1], "r")(member_scores[1].double()))
    torch.testing.assert_close(together, expected.float())
    for row in range(4):
        assert torch.equal(ensemble.score(images[row:row + 1], PROMPTS[row:row + 1])[0],
                           together[row])
    assert [m["reference_size"] for m in ensemble.describe()["members"]] == [6, 6]


def test_a_reference_can_be_a_runs_results(members: list[dict], tmp_path) -> None:
    results = {"prompts": [{"candidates": [{"scores": {"mine": 0.1}}, {"scores": {"mine": 0.3},
                                                                       "reward": 1}]},
                           {"candidates": [{"scores": {"other": 5.0}}, {"scores": {"mine": 0.2}}]}]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert load_reference(str(path), "mine", "r") == [0.1, 0.3, 0.2]
    (tmp_path / "list.json").write_text("[1, 2, 3]")
    assert load_reference(tmp_path / "list.json", "mine", "r") == [1.0, 2.0, 3.0]
    with pytest.raises(VerifierError, match="holds no candidate scored by 'absent'"):
        load_reference(str(path), "absent", "members[0].reference")


@pytest.mark.parametrize(("options", "message"), [
    ({"members": [{"name": "clip"}], "normalize": "calibrated"},
     r"members\[0\].reference is required by normalize: calibrated"),
    ({"members": ["clip"], "normalize": "calibrated"},
     r"members\[0\].reference is required by normalize: calibrated"),
    ({"members": [{"name": "clip", "reference": [1, 2]}]},
     r"members\[0\].reference is used only by normalize: calibrated, not 'raw'"),
    ({"members": [{"name": "clip", "reference": [1, 1]}], "normalize": "calibrated"},
     "at least two distinct finite scores"),
    ({"members": [{"name": "clip", "reference": "nowhere.json"}], "normalize": "calibrated"},
     "cannot read nowhere.json as JSON"),
    ({"members": [{"name": "clip", "reference": [1, "a"]}], "normalize": "calibrated"},
     "must be a list of scores"),
])
def test_bad_calibrations_are_refused(options: dict, message: str) -> None:
    with pytest.raises(VerifierError, match=message):
        EnsembleVerifier(**options)
