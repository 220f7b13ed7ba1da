"""Motion prompts for the shapes world: one object moving between named positions.

A clip prompt ``a red circle moving from left to right`` becomes one single-object grammar
prompt per frame (``a red circle on the left``, ``... in the centre``, ``... on the right``),
which the bundled text-to-image model knows, so a frame-chain video can be made and judged
frame by frame with the exact oracle.

Grammar: ``a {colour} {shape} moving from {A} to {B}`` with A != B taken from ``left``,
``right``, ``top``, ``bottom``, ``centre``. The path visits the centre between two outer
positions (``left -> centre -> right``, ``left -> centre -> top``); a motion to or from the
centre is two positions long.

Frame ``f`` shows the path's ``f``-th position and holds the end position once reached. So
the prompt of frame ``f`` depends only on ``f``, never on how many frames the clip will have:
a partial clip (a Tree-of-Frames branch being pruned) is judged exactly like the start of the
finished clip, and a verifier needs nothing but the clip prompt.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from diffsearch.pipelines.shapes.world import (
    COLOURS,
    POSITIONS,
    SHAPES,
    PromptError,
    Single,
    prompt_of,
)
from diffsearch.seeding import derive_seed, numpy_rng

_MOTION_RE = re.compile(
    rf"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)}) moving from "
    rf"({'|'.join(POSITIONS)}) to ({'|'.join(POSITIONS)})"
)


@dataclass(frozen=True)
class Motion:
    colour: str
    shape: str
    start: str
    end: str

    @property
    def path(self) -> tuple[str, ...]:
        """The named positions visited, in order (through the centre between outer ones)."""
        if "centre" in (self.start, self.end):
            return (self.start, self.end)
        return (self.start, "centre", self.end)

    @property
    def prompt(self) -> str:
        return f"a {self.colour} {self.shape} moving from {self.start} to {self.end}"


def parse_motion(prompt: str) -> Motion:
    """The motion of a clip prompt (case and spacing normalised); PromptError if none."""
    text = " ".join(prompt.lower().split())
    match = _MOTION_RE.fullmatch(text)
    if match is None:
        raise PromptError(
            f"not a shapes motion prompt: {prompt!r} (e.g. 'a red circle moving from left "
            "to right'; positions: " + ", ".join(POSITIONS) + ")"
        )
    motion = Motion(*match.groups())
    if motion.start == motion.end:
        raise PromptError(f"a motion needs two different positions: {prompt!r}")
    return motion


def is_motion_prompt(prompt: str) -> bool:
    try:
        parse_motion(prompt)
    except PromptError:
        return False
    return True


def motion_frame_prompts(prompt: str, num_frames: int) -> list[str]:
    """The single-object prompt of each of ``num_frames`` frames (see the module docstring)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    motion = parse_motion(prompt)
    path = motion.path
    return [
        prompt_of(Single(motion.colour, motion.shape, path[min(frame, len(path) - 1)]))
        for frame in range(num_frames)
    ]


def all_motions() -> list[Motion]:
    """Every motion of the grammar, in a fixed order."""
    return [
        Motion(colour, shape, start, end)
        for colour, shape in itertools.product(COLOURS, SHAPES)
        for start, end in itertools.permutations(POSITIONS, 2)
    ]


def motion_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct motion prompts drawn uniformly (fixed for a given seed), for benchmarks."""
    motions = all_motions()
    if not 1 <= n <= len(motions):
        raise ValueError(f"n must be between 1 and {len(motions)} (the motions there are)")
    rng = numpy_rng(derive_seed(seed, "", 0, "shapes-motion-prompts"))
    picks = rng.choice(len(motions), size=n, replace=False)
    return [motions[int(i)].prompt for i in picks]
