"""Video verifiers: per-frame prompt scores on the frame schedule, temporal consistency."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffsearch.pipelines.frame_chain import frame_prompts
from diffsearch.pipelines.shapes.world import ANCHORS, DrawnObject, draw, render_prompt
from diffsearch.verifiers.base import VerifierError
from diffsearch.verifiers.video import (
    ShapesVideoOracleVerifier,
    ShapesVideoVerifier,
    temporal_consistency,
)

MOTION = "a red circle moving from left to right"


def to_tensor(frames: list[np.ndarray]) -> torch.Tensor:
    """uint8 (H, W, 3) frames -> one clip (1, F, 3, H, W) in [0, 1]."""
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float().div(255)[None]


def rendered_clip(clip_prompt: str, num_frames: int, seed: int = 0) -> torch.Tensor:
    return to_tensor([render_prompt(p, seed) for p in frame_prompts(clip_prompt, num_frames)])


def circle_clip(colours: list[str], sizes: list[float], positions: list[str]) -> torch.Tensor:
    return to_tensor([draw([DrawnObject(c, "circle", *ANCHORS[p], s)])
                      for c, s, p in zip(colours, sizes, positions)])


def test_video_oracle_is_one_exactly_when_every_frame_is_right() -> None:
    oracle = ShapesVideoOracleVerifier()
    right = rendered_clip(MOTION, 3)
    backwards = right.flip(1)  # right, centre, left: the middle frame is still right
    scores = oracle.score(torch.cat([right, backwards]), [MOTION, MOTION])
    assert scores[0] == 1.0
    assert 0.5 < scores[1] < 1.0
    # a partial clip is judged like the start of the finished one
    assert oracle.score(right[:, :2], [MOTION]).item() == 1.0


def test_moving_is_consistent_flicker_is_not() -> None:
    moving = circle_clip(["red"] * 3, [10] * 3, ["left", "centre", "right"])
    static = circle_clip(["red"] * 3, [10] * 3, ["left"] * 3)
    colour_flicker = circle_clip(["red", "blue", "red"], [10] * 3, ["left", "centre", "right"])
    size_flicker = circle_clip(["red"] * 3, [10, 14, 8], ["left", "centre", "right"])
    c = temporal_consistency(torch.cat([moving, static, colour_flicker, size_flicker]))
    assert c[1] == 0.0
    assert c[0] > -0.01  # where the object is does not matter
    assert c[2] < c[0] - 0.05 and c[3] < c[0] - 0.02
    assert temporal_consistency(moving[:, :1]).item() == 0.0


def test_shapes_video_adds_weighted_consistency_to_the_frame_scores() -> None:
    verifier = ShapesVideoVerifier(frame_verifier="shapes-oracle", consistency_weight=2.0)
    # every frame of both clips is right for its prompt; only the flicker differs
    steady = circle_clip(["red"] * 3, [10] * 3, ["left", "centre", "right"])
    flicker = circle_clip(["red"] * 3, [10, 13, 9], ["left", "centre", "right"])
    clips = torch.cat([steady, flicker])
    scores = verifier.score(clips, [MOTION, MOTION])
    expected = 1.0 + 2.0 * temporal_consistency(clips)
    assert torch.allclose(scores, expected)
    assert scores[0] > scores[1]
    # a clip whose frames miss their prompts loses even when perfectly consistent
    frozen = circle_clip(["red"] * 3, [10] * 3, ["left"] * 3)
    assert verifier.score(frozen, [MOTION]).item() < scores[1].item()


def test_scores_do_not_depend_on_batch_mates() -> None:
    verifier = ShapesVideoVerifier(frame_verifier="shapes-oracle")
    clips = torch.cat([rendered_clip(MOTION, 3, seed) for seed in range(3)])
    together = verifier.score(clips, [MOTION] * 3)
    alone = torch.cat([verifier.score(clips[i:i + 1], [MOTION]) for i in range(3)])
    assert torch.equal(together, alone)


def test_images_are_refused_with_a_message_that_says_what_to_do() -> None:
    with pytest.raises(VerifierError, match=r"scores clips \(B, F, 3, H, W\).*tree-of-frames"):
        ShapesVideoOracleVerifier().score(torch.zeros(2, 3, 32, 32), [MOTION] * 2)
    with pytest.raises(VerifierError, match="2 clips but 1 prompts"):
        ShapesVideoOracleVerifier().score(torch.zeros(2, 3, 3, 32, 32), [MOTION])
    with pytest.raises(VerifierError, match="frame_verifier must be an image verifier"):
        ShapesVideoVerifier(frame_verifier="shapes-video-oracle")
    with pytest.raises(VerifierError, match="takes no option"):
        ShapesVideoOracleVerifier(colour="red")
