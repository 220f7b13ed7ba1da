"""Video verifiers: per-frame prompt scores on the frame schedule, any image verifier over
sampled frames (``frames``), temporal consistency (``temporal-consistency``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffsearch.pipelines.frame_chain import frame_prompts
from diffsearch.pipelines.shapes.world import ANCHORS, DrawnObject, draw, render_prompt
from diffsearch.verifiers.base import VerifierError
from diffsearch.verifiers.frames import FramesVerifier, keyframe_indices, sampled_indices
from diffsearch.verifiers.registry import UnknownVerifierError, check_verifier_spec, create_verifier
from diffsearch.verifiers.shapes import ShapesClipVerifier, ShapesOracleVerifier
from diffsearch.verifiers.temporal import TemporalConsistencyVerifier
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


STILL = "a red circle on the left"


def test_frame_sampling_picks_the_documented_frames() -> None:
    assert [keyframe_indices(n) for n in (1, 2, 3, 9)] == [[0], [0, 1], [0, 1, 2], [0, 4, 8]]
    assert sampled_indices(10, every=3, count=None) == [0, 3, 6, 9]
    assert sampled_indices(10, every=None, count=4) == [0, 3, 6, 9]
    assert sampled_indices(10, every=None, count=1) == [0]
    assert sampled_indices(3, every=None, count=5) == [0, 1, 2]
    assert sampled_indices(4, every=None, count=None) == [0, 1, 2, 3]


def test_frames_aggregates_an_image_verifier_over_the_sampled_frames() -> None:
    # frames 1 and 3 show the wrong colour; 0, 2 and 4 (the keyframes) are right
    clip = circle_clip(["red", "blue", "red", "green", "red"], [10] * 5, ["left"] * 5)
    per_frame = ShapesOracleVerifier().score(clip[0], [STILL] * 5)
    assert per_frame[[0, 2, 4]].tolist() == [1.0] * 3 and per_frame[[1, 3]].max() < 1.0

    def score(**options: object) -> float:
        verifier = create_verifier({"name": "frames", "verifier": "shapes-oracle", **options})
        return verifier.score(clip, [STILL]).item()

    assert score() == pytest.approx(per_frame.mean().item())
    assert score(aggregate="min") == pytest.approx(per_frame.min().item())
    assert score(aggregate="keyframes") == 1.0
    assert score(every=2) == 1.0 and score(count=3) == 1.0 and score(count=2) == 1.0
    assert score(every=3) == pytest.approx(per_frame[[0, 3]].mean().item())
    assert score(aggregate="min", count=4) == pytest.approx(per_frame[[0, 1, 3, 4]].min().item())


def test_frames_judges_each_frame_against_its_own_frame_prompt() -> None:
    verifier = FramesVerifier(verifier="shapes-oracle", aggregate="keyframes")
    right = rendered_clip(MOTION, 3)
    scores = verifier.score(torch.cat([right, right.flip(1)]), [MOTION, MOTION])
    assert scores[0] == 1.0 and scores[1] < 1.0
    assert verifier.calls_per_score == 3
    long = rendered_clip(MOTION, 9)
    assert verifier.score(long, [MOTION]).item() == 1.0
    assert verifier.calls_per_score == 3  # three keyframes at any length
    sampled = FramesVerifier(verifier="shapes-oracle", count=4)
    assert sampled.score(long, [MOTION]).item() == 1.0 and sampled.calls_per_score == 4
    assert sampled.score(long.flip(1), [MOTION]).item() < 1.0
    assert verifier.describe()["verifier"]["name"] == "shapes-oracle"


def test_frames_and_consistency_scores_do_not_depend_on_batch_mates() -> None:
    clips = torch.cat([rendered_clip(MOTION, 4, seed) for seed in range(3)])
    for verifier in (FramesVerifier(verifier="shapes-clip", aggregate="min", every=2),
                     TemporalConsistencyVerifier(features="shapes-clip"),
                     TemporalConsistencyVerifier(features="pixels")):
        together = verifier.score(clips, [MOTION] * 3)
        alone = torch.cat([verifier.score(clips[i:i + 1], [MOTION]) for i in range(3)])
        assert torch.allclose(together, alone, atol=1e-6), verifier.name


def test_consistency_on_histograms_pixels_and_image_features() -> None:
    moving = circle_clip(["red"] * 3, [10] * 3, ["left", "centre", "right"])
    static = circle_clip(["red"] * 3, [10] * 3, ["left"] * 3)
    flicker = circle_clip(["red", "blue", "red"], [10] * 3, ["left", "centre", "right"])
    clips = torch.cat([moving, static, flicker])
    prompts = [MOTION] * 3
    histogram = TemporalConsistencyVerifier().score(clips, prompts)
    assert torch.allclose(histogram, 1 + temporal_consistency(clips))
    assert histogram[1] == 1.0 and histogram[0] > 0.99 > histogram[2]
    pixels = TemporalConsistencyVerifier(features="pixels").score(clips, prompts)
    assert pixels[1] == 1.0 and pixels[0] < 0.99  # pixels, unlike histograms, see motion
    features = TemporalConsistencyVerifier(features="shapes-clip")
    learned = features.score(clips, prompts)
    embeddings = ShapesClipVerifier().image_embeddings(clips.flatten(0, 1)).view(3, 3, -1)
    cosines = (embeddings[:, 1:] * embeddings[:, :-1]).sum(-1).mean(-1)
    assert torch.allclose(learned, cosines, atol=1e-5)
    assert learned[1] == pytest.approx(1.0, abs=1e-5) and learned[2] < learned[0]
    assert features.describe()["features"] == "shapes-clip"
    assert TemporalConsistencyVerifier().score(moving[:, :1], [MOTION]).item() == 1.0


def test_video_verifier_options_are_checked_in_one_line() -> None:
    cases = [
        ({"aggregate": "median"}, "aggregate must be one of mean, min, keyframes"),
        ({"every": 2, "count": 3}, "give every or count, not both"),
        ({"aggregate": "keyframes", "count": 3}, "keyframes picks its own frames"),
        ({"every": 0}, "every must be a whole number >= 1"),
        ({"count": True}, "count must be a whole number >= 1"),
        ({"verifier": "shapes-video"}, "verifier must be an image verifier"),
        ({"verifier": None}, "verifier is required"),
    ]
    for options, message in cases:
        spec = {"name": "frames", "verifier": "shapes-oracle", **options}
        with pytest.raises(VerifierError, match=message):
            create_verifier(spec)
    with pytest.raises(VerifierError, match=r"histogram or pixels.*clip, hpsv2, pickscore.*"
                                            r"'shapes-oracle' exposes none"):
        TemporalConsistencyVerifier(features="shapes-oracle")
    with pytest.raises(VerifierError, match=r"features must be histogram or pixels.*unknown "
                                            r"verifier 'histograms'"):
        TemporalConsistencyVerifier(features="histograms")
    with pytest.raises(VerifierError, match=r"scores clips \(B, F, 3, H, W\)"):
        TemporalConsistencyVerifier().score(torch.zeros(2, 3, 8, 8), ["a", "b"])


def test_the_image_verifier_frames_wraps_is_checked_before_a_run() -> None:
    with pytest.raises(UnknownVerifierError,
                       match="frames: verifier: unknown verifier 'shapes-clp'"):
        check_verifier_spec({"name": "frames", "verifier": "shapes-clp"})
    check_verifier_spec({"name": "frames", "verifier": {"name": "shift-average",
                                                        "verifier": "shapes-clip"}})
