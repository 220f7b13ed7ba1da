"""shapes-oracle, shapes-clip and shapes-clip-small as diffsearch verifiers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffsearch.pipelines.shapes import clip_model, world
from diffsearch.verifiers.base import MissingWeightsError, VerifierError
from diffsearch.verifiers.registry import create_verifier
from diffsearch.verifiers.shapes import (
    ShapesClipSmallVerifier,
    ShapesClipVerifier,
    ShapesOracleVerifier,
)


def _batch(prompts: list[str], seed: int = 0) -> torch.Tensor:
    images = np.stack([world.render_prompt(p, seed + i) for i, p in enumerate(prompts)])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


@pytest.fixture(scope="module", params=[ShapesClipVerifier, ShapesClipSmallVerifier])
def clip(request) -> ShapesClipVerifier:
    """Both shipped shapes CLIPs: every property below holds for each."""
    return request.param()


def _near_misses(prompts: list[str], seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [world.prompt_of(world.near_miss(world.parse(p), rng)) for p in prompts]


def test_oracle_verifier_scores_truth_one_and_near_misses_lower() -> None:
    verifier = ShapesOracleVerifier()
    prompts = world.train_prompts(40, seed=1) + world.heldout_prompts(20, seed=1)
    images = _batch(prompts)
    right = verifier.score(images, prompts)
    assert right.shape == (60,) and torch.all(right == 1.0)
    wrong = verifier.score(images, _near_misses(prompts, 1))
    # a changed relation can still hold (an object left of another may also be above it)
    assert (wrong < 1.0).float().mean() >= 0.9 and wrong.mean() < 0.85


def test_oracle_verifier_rejects_bad_input() -> None:
    verifier = ShapesOracleVerifier()
    with pytest.raises(VerifierError, match="shapes-world"):
        verifier.score(_batch(["two red circles"]), ["a photo of a cat"])
    with pytest.raises(VerifierError, match="prompts"):
        verifier.score(_batch(["two red circles"]), ["two red circles", "one red circle"])
    with pytest.raises(VerifierError, match="no option"):
        ShapesOracleVerifier(threshold=3)


def test_clip_ranks_the_true_caption_above_near_misses(clip) -> None:
    prompts = world.train_prompts(64, seed=2) + world.heldout_prompts(64, seed=2)
    images = _batch(prompts, seed=100)
    right = clip.score(images, prompts)
    wins = torch.zeros(len(prompts))
    for k in range(3):
        wins += (right > clip.score(images, _near_misses(prompts, 10 + k))).float()
    assert (wins / 3).mean() >= 0.85
    shuffled = prompts[1:] + prompts[:1]
    assert (right > clip.score(images, shuffled)).float().mean() >= 0.9


def test_clip_score_of_a_row_does_not_depend_on_its_batch(clip) -> None:
    prompts = world.train_prompts(21, seed=3)
    images = _batch(prompts)
    together = clip.score(images, prompts)
    alone = torch.cat([clip.score(images[i : i + 1], prompts[i : i + 1]) for i in range(21)])
    assert torch.equal(together, alone)
    assert together.shape == (21,) and together.abs().max() <= 1.0


def test_clip_weights_option(tmp_path, clip) -> None:
    same = ShapesClipVerifier(weights=clip.weights)
    assert same.describe()["weights"] == clip.weights
    with pytest.raises(MissingWeightsError, match="open_clip_model.safetensors"):
        ShapesClipVerifier(weights=str(tmp_path))
    with pytest.raises(VerifierError, match="no option"):
        ShapesClipVerifier(temperature=2)


def test_both_shipped_clips_are_registered_with_their_own_weights() -> None:
    big, small = create_verifier("shapes-clip"), create_verifier("shapes-clip-small")
    assert type(small) is ShapesClipSmallVerifier and small.name == "shapes-clip-small"
    assert big.weights == str(clip_model.WEIGHTS_DIR)
    assert small.weights == str(clip_model.SMALL_WEIGHTS_DIR)
    prompts = world.train_prompts(8, seed=4)
    images = _batch(prompts)
    assert not torch.allclose(big.score(images, prompts), small.score(images, prompts))
    # an explicit folder still wins over the default one
    assert ShapesClipSmallVerifier(weights=big.weights).weights == big.weights
