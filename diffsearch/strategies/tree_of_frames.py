"""Tree-of-Frames (Video-T1) and its linear baseline, over chained clips
(:mod:`diffsearch.clips`).

A clip is a chain of candidates linked by ``parent``; the last candidate's id names the clip,
and scoring it with :attr:`ScoreOn.CLIP` makes the worker decode the whole chain and ask the
job's (video) verifier about it against the clip prompt. What a candidate is depends on the
model (``unit``):

* ``frame`` (image models: :mod:`diffsearch.pipelines.frame_chain`): frame 0 comes from noise,
  frame f >= 1 is img2img from its parent frame with a fresh seed;
* ``chunk`` (image-to-video models, e.g. Wan I2V): every candidate is a whole clip of the
  model's frames from fresh noise, continuing the last frame of its parent chunk; the first
  chunk continues ``image``. The clip is the chunks joined, each continuation without its first
  frame (the model's copy of the frame it continued).

Tree-of-Frames, one ``ask`` per depth:

* depth 0: ``first_frame_candidates`` first frames scored on their image by ``image_verifier``
  (image-level alignment), or first chunks scored by the video verifier; the best becomes the
  root;
* depth d >= 1: every open branch gets ``branching`` children (frame or chunk d). At the
  depths in ``prune_depths`` the partial clips are scored by the video verifier and only the
  top ``keep`` share (at least one) stays open; at the last depth the finished clips are scored
  and ranked.

The cost is known before the first ask (pruning counts do not depend on scores), so the tree is
fitted to the NFE budget: unset ``branching`` / ``first_frame_candidates`` are the largest that
fit, and a tree that does not fit is refused. :class:`LinearClips` is the baseline: N
independent clips, the best picked by the same video verifier.

Ties are broken by candidate id, so equal outcomes give equal tasks (replay, determinism).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image

from diffsearch.pipelines.frame_chain import FrameChain, frame_prompts
from diffsearch.seeding import derive_seed
from diffsearch.strategies import options
from diffsearch.strategies.base import Strategy
from diffsearch.strategies.common import best_of, count_within_budget, kept, ranked
from diffsearch.tasks import Outcome, ScoreOn, Task

DEFAULT_STRENGTH = 0.75
"""img2img strength of frames >= 1. Measured on the bundled shapes model (20 steps, motion
prompts, single chains): at 0.6 the object stays where the previous frame had it (frames 1-2
right 5% of the time), at 0.75 about half the frames move as asked, at 0.9 nearly all do but
each frame is then almost a fresh sample. 0.75 keeps frames tied to their predecessor while
leaving the search something to find."""
DEFAULT_LENGTH = 3
"""Frames (``unit: frame``) or chunks (``unit: chunk``) of a clip when unset."""
DEFAULT_IMAGE_VERIFIER = "shapes-clip"
"""The judge of first frames when unset (``unit: frame``)."""

UNITS = ("frame", "chunk")
_UNIT_ONLY = {"num_frames": "frame", "strength": "frame", "image_verifier": "frame",
              "num_chunks": "chunk", "image": "chunk"}
"""The options that mean something for one unit only: set for the other, they are refused."""
_WHAT = {"frame": "one frame, img2img from the one before",
         "chunk": "a whole image-to-video clip continuing the last frame of the one before"}
"""What a candidate is, per unit (for the refusals)."""

_CHAIN_OPTIONS: dict[str, options.Check] = {
    "num_frames": options.rule(options.integer, minimum=2, allow_none=True),
    "strength": options.rule(options.number, low=0.0, high=1.0, low_open=True,
                             allow_none=True),
    "unit": options.rule(options.choice, choices=UNITS),
    "num_chunks": options.rule(options.integer, minimum=2, allow_none=True),
    "image": options.rule(options.text, allow_none=True),
}
"""The options of both clip strategies (one frame is an image, one chunk a whole clip: use
best-of-n)."""


@dataclass(frozen=True)
class Chunks:
    """A clip strategy's declaration that its candidates are image-to-video chunks (its
    ``chunks`` attribute; None or absent: they are not)."""

    image: str | None
    """The image file the first chunk continues (None: the model needs none)."""


def chunks_of(strategy: object) -> Chunks | None:
    """What ``strategy`` declares of its chunks: the driver tells each chunk what it continues
    (:class:`~diffsearch.runtime.FirstFrame`), and the pre-run checks match it to the model.
    Only the clip strategies declare any, so the attribute is read where present."""
    chunks = getattr(strategy, "chunks", None)
    return chunks if isinstance(chunks, Chunks) else None


def _check_image(path: str) -> None:
    """Refuse, before anything loads, an ``image`` that is not a readable image file."""
    try:
        with Image.open(path) as image:
            image.verify()
    except (OSError, ValueError) as error:
        raise options.OptionError("image", f"cannot read an image from {path!r}: "
                                           f"{error}") from None


class _Chain(Protocol):
    """How a clip's candidates are made, one depth of the chain each."""

    def frame_nfe(self, frame: int, num_steps: int) -> int: ...

    def clip_nfe(self, num_steps: int) -> int: ...

    def first_frame_task(self, *, prompt_index: int, candidate: int, seed: int, num_steps: int,
                         score_on: ScoreOn, verifier: str | None = None) -> Task: ...

    def next_frame_task(self, *, prompt_index: int, frame: int, candidate: int, parent: int,
                        seed: int, num_steps: int, score_on: ScoreOn) -> Task: ...


@dataclass(frozen=True)
class ChunkChain:
    """A clip of image-to-video chunks: every chunk is the model's whole clip, from fresh noise
    0 -> T (T NFE-steps), and one with a parent continues that parent's last frame (the worker
    conditions it: :mod:`diffsearch.clips`). Chunk d's prompt is frame d's of
    :func:`~diffsearch.pipelines.frame_chain.frame_prompts`, so a motion prompt moves its
    object chunk by chunk and a partial clip is judged like the start of the finished one."""

    num_chunks: int
    chunk_prompts: tuple[str, ...]

    @classmethod
    def for_prompt(cls, clip_prompt: str, num_chunks: int) -> ChunkChain:
        return cls(num_chunks, tuple(frame_prompts(clip_prompt, num_chunks)))

    def frame_nfe(self, frame: int, num_steps: int) -> int:
        """NFEs of one chunk: every chunk runs the whole schedule."""
        return num_steps

    def clip_nfe(self, num_steps: int) -> int:
        return self.num_chunks * num_steps

    def first_frame_task(self, *, prompt_index: int, candidate: int, seed: int, num_steps: int,
                         score_on: ScoreOn, verifier: str | None = None) -> Task:
        """The first chunk (it continues the strategy's image, if any)."""
        return Task(prompt_index=prompt_index, prompt=self.chunk_prompts[0],
                    candidate=candidate, seed=seed, start=0, end=num_steps,
                    score_on=score_on, verifier=verifier)

    def next_frame_task(self, *, prompt_index: int, frame: int, candidate: int, parent: int,
                        seed: int, num_steps: int, score_on: ScoreOn) -> Task:
        """Chunk ``frame`` >= 1, continuing ``parent``'s last frame (not resumed from it: the
        parent is the condition, the noise is the chunk's own)."""
        if not 1 <= frame < self.num_chunks:
            raise ValueError(f"chunk must be in 1..{self.num_chunks - 1}, got {frame}")
        return Task(prompt_index=prompt_index, prompt=self.chunk_prompts[frame],
                    candidate=candidate, seed=seed, start=0, end=num_steps, parent=parent,
                    score_on=score_on)


class _FrameChainStrategy(Strategy):
    """What both clip strategies share: the chain, candidate ids, seeds and the clip ranking."""

    sampler_needs = frozenset({"resume"})  # frames after the first start at step k (img2img)
    """What frames need; a chain of chunks needs nothing (:class:`ChunkChain`)."""

    def __init__(self, *, unit: str, num_frames: int | None, strength: float | None,
                 num_chunks: int | None, image: str | None, **common: Any) -> None:
        super().__init__(**common)
        self.unit = unit
        self.chunks: Chunks | None = None
        """Declared for ``unit: chunk`` (:func:`chunks_of`)."""
        self.chain: _Chain
        if unit == "frame":
            self.length = DEFAULT_LENGTH if num_frames is None else num_frames
            chain = FrameChain.for_prompt(self.prompt, self.length,
                                          DEFAULT_STRENGTH if strength is None else strength)
            try:  # refuse a strength that leaves no step now
                chain.start_step(self.num_steps)
            except ValueError as error:
                raise options.OptionError("strength", str(error)) from None
            self.chain = chain
        else:
            self.length = DEFAULT_LENGTH if num_chunks is None else num_chunks
            self.chain = ChunkChain.for_prompt(self.prompt, self.length)
            self.sampler_needs = frozenset()  # chunks run 0 -> T in one call: any sampler
            if image is not None:
                _check_image(image)
            self.chunks = Chunks(image=image)
        self._next_candidate = 0
        self._depth = 0
        self._open: list[int] = []
        """Candidates whose frame ``self._depth - 1`` the next ask extends."""
        self._clips: set[int] = set()
        """Candidates asked as the last frame: the finished clips, the only answers."""
        self._finished: list[Outcome] = []
        self._done = False

    @staticmethod
    def refuse_other_unit(unit: str, given: dict[str, Any]) -> None:
        """Refuse an option set for the unit it does not apply to, naming it."""
        for option, value in given.items():
            if value is not None and _UNIT_ONLY[option] != unit:
                raise options.OptionError(
                    option, f"applies to unit: {_UNIT_ONLY[option]} only; with unit: {unit} a "
                            f"candidate is {_WHAT[unit]}")

    def _candidate_id(self) -> int:
        self._next_candidate += 1
        return self._next_candidate - 1

    def _first_frames(self, n: int, score_on: ScoreOn, verifier: str | None) -> list[Task]:
        tasks = []
        for _ in range(n):
            candidate = self._candidate_id()
            tasks.append(self.chain.first_frame_task(
                prompt_index=self.prompt_index, candidate=candidate,
                seed=derive_seed(self.seed, self.prompt, candidate, "noise"),
                num_steps=self.num_steps, score_on=score_on, verifier=verifier))
        return tasks

    def _children(self, parents: Sequence[int], per_parent: int, score_on: ScoreOn
                  ) -> list[Task]:
        tasks = []
        for parent in parents:
            for _ in range(per_parent):
                candidate = self._candidate_id()
                tasks.append(self.chain.next_frame_task(
                    prompt_index=self.prompt_index, frame=self._depth, candidate=candidate,
                    parent=parent, seed=derive_seed(self.seed, self.prompt, candidate, "frame"),
                    num_steps=self.num_steps, score_on=score_on))
        if self._depth == self.last_depth:
            self._clips.update(t.candidate for t in tasks)
        return tasks

    @property
    def last_depth(self) -> int:
        return self.length - 1

    @property
    def done(self) -> bool:
        return self._done

    def is_answer(self, task: Task) -> bool:
        """Only finished clips answer: partial clips (scored at pruning depths) and first
        frames (scored by the image verifier) are judged on other scales."""
        return task.score_on is ScoreOn.CLIP and task.candidate in self._clips

    def best(self) -> Outcome | None:
        """The best finished clip, as its last candidate's outcome."""
        return best_of(self._finished)


class TreeOfFrames(_FrameChainStrategy):
    """Tree-of-Frames search; see the module docstring. Options:

    ``unit`` ("frame": a candidate is one frame of an image model; "chunk": one clip of an
    image-to-video model), ``num_frames`` / ``num_chunks`` (3: the tree's depth),
    ``strength`` (frames: img2img strength of frames >= 1, 0.75: see :data:`DEFAULT_STRENGTH`),
    ``image`` (chunks: the image file the first chunk continues),
    ``first_frame_candidates`` and ``branching`` (None: fitted to the budget),
    ``prune_depths`` (None: every depth between the first and the last), ``keep`` (share
    of open branches kept at a pruning depth, 0.5 = the median), ``image_verifier`` (frames:
    judge of the first frames, "shapes-clip"; the job's verifier must be a video verifier).
    """

    name = "tree-of-frames"
    option_checks = {
        **_CHAIN_OPTIONS,
        "first_frame_candidates": options.rule(options.integer, minimum=1, allow_none=True),
        "branching": options.rule(options.integer, minimum=1, allow_none=True),
        "prune_depths": options.rule(options.integer_list, minimum=1, allow_none=True),
        "keep": options.rule(options.number, low=0.0, high=1.0, low_open=True),
        "image_verifier": options.rule(options.text, allow_none=True),
    }

    def __init__(
        self, *, unit: str = "frame", num_frames: int | None = None,
        strength: float | None = None, num_chunks: int | None = None, image: str | None = None,
        first_frame_candidates: int | None = None, branching: int | None = None,
        prune_depths: Sequence[int] | None = None, keep: float = 0.5,
        image_verifier: str | None = None, **common: Any,
    ) -> None:
        self.refuse_other_unit(unit, {"num_frames": num_frames, "strength": strength,
                                      "num_chunks": num_chunks, "image": image,
                                      "image_verifier": image_verifier})
        super().__init__(unit=unit, num_frames=num_frames, strength=strength,
                         num_chunks=num_chunks, image=image, **common)
        last = self.last_depth
        depths = range(1, last) if prune_depths is None else prune_depths
        self.prune_depths = frozenset(depths)
        bad = sorted(d for d in self.prune_depths if not 1 <= d < last)
        if bad:
            raise options.OptionError(
                "prune_depths", f"must lie between the first and the last {unit} "
                                f"(1..{last - 1}), got {bad}")
        self.keep = keep
        self.image_verifier = (None if unit == "chunk" else
                               image_verifier or DEFAULT_IMAGE_VERIFIER)
        """The first frames' judge; None for chunks, which the job's video verifier judges."""
        self.first_frame_candidates, self.branching = self._fit(first_frame_candidates,
                                                                branching)

    def named_verifiers(self) -> dict[str, str]:
        return {} if self.image_verifier is None else {"image_verifier": self.image_verifier}

    # ---- the plan -------------------------------------------------------------------------
    def open_branches(self, branching: int) -> list[int]:
        """How many candidates are made at each depth 1..F-1 (before pruning there)."""
        counts, open_ = [], 1
        for depth in range(1, self.length):
            made = open_ * branching
            counts.append(made)
            open_ = kept(self.keep, made) if depth in self.prune_depths else made
        return counts

    def planned_nfe(self, first_frame_candidates: int, branching: int) -> int:
        """The NFEs the whole tree spends when no candidate fails (failures only save)."""
        per_frame = self.chain.frame_nfe(1, self.num_steps)
        return (first_frame_candidates * self.num_steps
                + per_frame * sum(self.open_branches(branching)))

    def _fit(self, first: int | None, branching: int | None) -> tuple[int, int]:
        """Fill unset sizes from the budget: the largest branching whose tree fits (with as
        many first frames as branches when those are unset too), then as many first frames as
        the rest of the budget buys."""
        budget = self.budget_nfe
        if branching is None:
            def fits(b: int) -> bool:
                return self.planned_nfe(b if first is None else first, b) <= budget
            branching = 1
            while fits(branching + 1):
                branching += 1
        if first is None:
            first = max(1, (budget - self.planned_nfe(0, branching)) // self.num_steps)
        cost = self.planned_nfe(first, branching)
        if cost > budget:
            raise ValueError(
                f"a tree of {first} first {self.unit}(s) and branching {branching} over "
                f"{self.length} {self.unit}s needs {cost} NFE, over the budget of {budget}")
        return first, branching

    # ---- ask / tell -------------------------------------------------------------------------
    def ask(self) -> list[Task]:
        if self._done:
            return []
        if self._depth == 0:
            if self.image_verifier is None:  # first chunks: clips the video verifier judges
                return self._first_frames(self.first_frame_candidates, ScoreOn.CLIP, None)
            return self._first_frames(self.first_frame_candidates, ScoreOn.FINAL,
                                      self.image_verifier)
        scored = self._depth == self.last_depth or self._depth in self.prune_depths
        return self._children(self._open, self.branching,
                              ScoreOn.CLIP if scored else ScoreOn.NONE)

    def tell(self, outcomes: list[Outcome]) -> None:
        if self._depth == 0:
            scored = ranked(outcomes)
            self._open = [scored[0].candidate] if scored else []
        elif self._depth == self.last_depth:
            self._finished = list(outcomes)
            self._open = []
        elif self._depth in self.prune_depths:
            scored = ranked(outcomes)
            survivors = scored[:kept(self.keep, len(scored))] if scored else []
            self._open = sorted(o.candidate for o in survivors)
        else:
            self._open = [o.candidate for o in outcomes if o.ok]
        self._depth += 1
        self._done = not self._open


class LinearClips(_FrameChainStrategy):
    """N independent clips (chained like Tree-of-Frames'), the best by the video verifier.

    Options: ``unit``, ``num_frames`` / ``num_chunks`` (3), ``strength`` (frames: 0.75),
    ``image`` (chunks: what the first chunk continues), ``n`` (None: as many clips as the
    budget buys). Candidates before the last are not scored; one ask per depth, all clips
    together.
    """

    name = "linear-clips"
    option_checks = {**_CHAIN_OPTIONS,
                     "n": options.rule(options.integer, minimum=1, allow_none=True)}

    def __init__(self, *, unit: str = "frame", num_frames: int | None = None,
                 strength: float | None = None, num_chunks: int | None = None,
                 image: str | None = None, n: int | None = None, **common: Any) -> None:
        self.refuse_other_unit(unit, {"num_frames": num_frames, "strength": strength,
                                      "num_chunks": num_chunks, "image": image})
        super().__init__(unit=unit, num_frames=num_frames, strength=strength,
                         num_chunks=num_chunks, image=image, **common)
        per_clip = self.chain.clip_nfe(self.num_steps)
        self.n = count_within_budget(
            n, budget_nfe=self.budget_nfe, cost=per_clip, plural="clips",
            none_affordable=f"budget of {self.budget_nfe} NFE buys no clip of "
                            f"{self.length} {unit}s ({per_clip} NFE each)")

    def ask(self) -> list[Task]:
        if self._done:
            return []
        if self._depth == 0:
            return self._first_frames(self.n, ScoreOn.NONE, None)
        score_on = ScoreOn.CLIP if self._depth == self.last_depth else ScoreOn.NONE
        return self._children(self._open, 1, score_on)

    def tell(self, outcomes: list[Outcome]) -> None:
        if self._depth == self.last_depth:
            self._finished = list(outcomes)
            self._open = []
        else:
            self._open = [o.candidate for o in outcomes if o.ok]
        self._depth += 1
        self._done = not self._open
