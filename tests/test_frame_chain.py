"""The frame-chain adapter description and the shapes motion prompts."""

from __future__ import annotations

import pytest

from diffsearch.pipelines.frame_chain import FrameChain, frame_prompts, renoise_step
from diffsearch.pipelines.shapes.motion import (
    all_motions,
    is_motion_prompt,
    motion_frame_prompts,
    motion_prompts,
    parse_motion,
)
from diffsearch.pipelines.shapes.world import PromptError, Single, parse
from diffsearch.tasks import PerturbKind, ScoreOn


def test_left_to_right_goes_through_the_centre() -> None:
    assert motion_frame_prompts("a red circle moving from left to right", 3) == [
        "a red circle on the left", "a red circle in the centre", "a red circle on the right"]
    assert motion_frame_prompts("A  Blue square moving from top to bottom", 3) == [
        "a blue square at the top", "a blue square in the centre", "a blue square at the bottom"]


def test_motion_to_the_centre_is_two_positions_and_the_end_is_held() -> None:
    assert motion_frame_prompts("a green triangle moving from centre to left", 4) == [
        "a green triangle in the centre", "a green triangle on the left",
        "a green triangle on the left", "a green triangle on the left"]


@pytest.mark.parametrize("motion", all_motions()[::13])
def test_every_frame_prompt_is_a_single_object_grammar_prompt(motion) -> None:
    prompts = motion_frame_prompts(motion.prompt, 5)
    specs = [parse(p) for p in prompts]
    assert all(isinstance(s, Single) for s in specs)
    assert {(s.colour, s.shape) for s in specs} == {(motion.colour, motion.shape)}
    assert specs[0].position == motion.start and specs[-1].position == motion.end


def test_schedules_are_prefix_consistent() -> None:
    """Frame f's prompt must not depend on the clip length: partial clips are judged by it."""
    for prompt in ("a red circle moving from left to right", "two blue squares"):
        longest = frame_prompts(prompt, 6)
        for n in range(1, 6):
            assert frame_prompts(prompt, n) == longest[:n]


def test_non_motion_prompts_condition_every_frame() -> None:
    assert frame_prompts("a cat walking on a beach", 3) == ["a cat walking on a beach"] * 3


@pytest.mark.parametrize("bad", ["a red circle moving from left to left",
                                 "a red circle moving from left to middle",
                                 "a red circle on the left"])
def test_bad_motion_prompts_are_refused_by_name(bad: str) -> None:
    assert not is_motion_prompt(bad)
    with pytest.raises(PromptError, match="motion"):
        parse_motion(bad)


def test_motion_prompts_are_seeded_distinct_and_parse() -> None:
    prompts = motion_prompts(20, seed=3)
    assert prompts == motion_prompts(20, seed=3) != motion_prompts(20, seed=4)
    assert len(set(prompts)) == 20
    assert all(is_motion_prompt(p) for p in prompts)
    with pytest.raises(ValueError, match="between 1 and 300"):
        motion_prompts(301)


def test_renoise_step_rounds_half_up() -> None:
    assert renoise_step(20, 0.6) == 8
    assert renoise_step(10, 0.7) == 3
    assert renoise_step(10, 0.75) == 3  # 2.5 -> 3, not banker's 2
    assert renoise_step(20, 1.0) == 0


def test_chain_tasks_are_img2img_from_the_parent() -> None:
    chain = FrameChain.for_prompt("a red circle moving from left to right", 3, 0.6)
    first = chain.first_frame_task(prompt_index=2, candidate=0, seed=11, num_steps=20,
                                   score_on=ScoreOn.FINAL, verifier="shapes-clip")
    assert (first.prompt, first.start, first.end, first.source_candidate) == (
        "a red circle on the left", 0, 20, None)
    assert first.verifier == "shapes-clip" and first.perturbation is None
    second = chain.next_frame_task(prompt_index=2, frame=1, candidate=5, parent=0, seed=12,
                                   num_steps=20, score_on=ScoreOn.CLIP)
    assert second.prompt == "a red circle in the centre"
    assert (second.start, second.end, second.parent, second.source_candidate) == (8, 20, 0, 0)
    assert second.perturbation.kind is PerturbKind.RENOISE and second.perturbation.to_step == 8
    assert second.prompt_index == 2 and second.score_on is ScoreOn.CLIP
    assert second.denoise_nfe(20) == 12 == chain.frame_nfe(1, 20)
    assert chain.clip_nfe(20) == 20 + 12 + 12


@pytest.mark.parametrize(("frames", "strength", "message"), [
    (1, 0.5, "num_frames must be at least 2"),
    (3, 0.0, "strength must be in"),
    (3, 1.5, "strength must be in"),
])
def test_chain_validation_names_the_field(frames: int, strength: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FrameChain.for_prompt("a red circle moving from left to right", frames, strength)


def test_a_strength_that_leaves_no_step_is_refused() -> None:
    chain = FrameChain.for_prompt("x", 2, 0.02)
    with pytest.raises(ValueError, match="leaves no denoising step"):
        chain.start_step(20)
    with pytest.raises(ValueError, match="frame must be in 1..1"):
        FrameChain.for_prompt("x", 2, 0.5).next_frame_task(
            prompt_index=0, frame=2, candidate=1, parent=0, seed=1, num_steps=10,
            score_on=ScoreOn.NONE)
