"""Tree-of-Frames (Video-T1) and its linear baseline, over the frame-chain video adapter.

A frame is a candidate (see :mod:`diffsearch.pipelines.frame_chain`): frame 0 comes from noise,
frame f >= 1 is img2img from its parent frame with a fresh seed. A clip is a chain of
candidates linked by ``parent``; the last frame's candidate id names the clip, and scoring it
with :attr:`ScoreOn.CLIP` makes the worker decode the whole chain and ask the job's (video)
verifier about it against the clip prompt.

Tree-of-Frames, one ``ask`` per depth:

* depth 0: ``first_frame_candidates`` first frames scored on their image by ``image_verifier``
  (image-level alignment); the best becomes the root;
* depth d >= 1: every open branch gets ``branching`` children (frame d). At the depths in
  ``prune_depths`` the partial clips are scored by the video verifier and only the top ``keep``
  share (at least one) stays open; at the last depth the finished clips are scored and ranked.

The cost is known before the first ask (pruning counts do not depend on scores), so the tree is
fitted to the NFE budget: unset ``branching`` / ``first_frame_candidates`` are the largest that
fit, and a tree that does not fit is refused. :class:`LinearClips` is the baseline: N
independent clips, the best picked by the same video verifier.

Ties are broken by candidate id, so equal outcomes give equal tasks (replay, determinism).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from diffsearch.pipelines.frame_chain import FrameChain
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


_CHAIN_OPTIONS: dict[str, options.Check] = {
    "num_frames": options.rule(options.integer, minimum=2),
    "strength": options.rule(options.number, low=0.0, high=1.0, low_open=True),
}
"""The options of both clip strategies (one frame is an image: use best-of-n)."""


class _FrameChainStrategy(Strategy):
    """What both clip strategies share: the chain, candidate ids, seeds and the clip ranking."""

    sampler_needs = frozenset({"resume"})  # frames after the first start at step k (img2img)

    def __init__(self, *, num_frames: int, strength: float, **common: Any) -> None:
        super().__init__(**common)
        self.chain = FrameChain.for_prompt(self.prompt, num_frames, strength)
        try:  # refuse a strength that leaves no step now
            self.chain.start_step(self.num_steps)
        except ValueError as error:
            raise options.OptionError("strength", str(error)) from None
        self._next_candidate = 0
        self._depth = 0
        self._open: list[int] = []
        """Candidates whose frame ``self._depth - 1`` the next ask extends."""
        self._clips: set[int] = set()
        """Candidates asked as the last frame: the finished clips, the only answers."""
        self._finished: list[Outcome] = []
        self._done = False

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
        return self.chain.num_frames - 1

    @property
    def done(self) -> bool:
        return self._done

    def is_answer(self, task: Task) -> bool:
        """Only finished clips answer: partial clips (scored at pruning depths) and first
        frames (scored by the image verifier) are judged on other scales."""
        return task.score_on is ScoreOn.CLIP and task.candidate in self._clips

    def best(self) -> Outcome | None:
        """The best finished clip, as its last frame's outcome."""
        return best_of(self._finished)


class TreeOfFrames(_FrameChainStrategy):
    """Tree-of-Frames search; see the module docstring. Options:

    ``num_frames`` (3), ``strength`` (img2img strength of frames >= 1, 0.75: see
    :data:`DEFAULT_STRENGTH`),
    ``first_frame_candidates`` and ``branching`` (None: fitted to the budget),
    ``prune_depths`` (None: every depth between the first and the last frame), ``keep`` (share
    of open branches kept at a pruning depth, 0.5 = the median), ``image_verifier`` (judge of
    the first frames, "shapes-clip"; the job's verifier must be a video verifier).
    """

    name = "tree-of-frames"
    option_checks = {
        **_CHAIN_OPTIONS,
        "first_frame_candidates": options.rule(options.integer, minimum=1, allow_none=True),
        "branching": options.rule(options.integer, minimum=1, allow_none=True),
        "prune_depths": options.rule(options.integer_list, minimum=1, allow_none=True),
        "keep": options.rule(options.number, low=0.0, high=1.0, low_open=True),
        "image_verifier": options.rule(options.text),
    }

    def __init__(
        self, *, num_frames: int = 3, strength: float = DEFAULT_STRENGTH,
        first_frame_candidates: int | None = None, branching: int | None = None,
        prune_depths: Sequence[int] | None = None, keep: float = 0.5,
        image_verifier: str = "shapes-clip", **common: Any,
    ) -> None:
        super().__init__(num_frames=num_frames, strength=strength, **common)
        last = self.last_depth
        depths = range(1, last) if prune_depths is None else prune_depths
        self.prune_depths = frozenset(depths)
        bad = sorted(d for d in self.prune_depths if not 1 <= d < last)
        if bad:
            raise options.OptionError(
                "prune_depths", f"must lie between the first and the last frame "
                                f"(1..{last - 1}), got {bad}")
        self.keep = keep
        self.image_verifier = image_verifier
        self.first_frame_candidates, self.branching = self._fit(first_frame_candidates,
                                                                branching)

    def named_verifiers(self) -> dict[str, str]:
        return {"image_verifier": self.image_verifier}

    # ---- the plan -------------------------------------------------------------------------
    def open_branches(self, branching: int) -> list[int]:
        """How many frames are made at each depth 1..F-1 (before pruning there)."""
        counts, open_ = [], 1
        for depth in range(1, self.chain.num_frames):
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
                f"a tree of {first} first frame(s) and branching {branching} over "
                f"{self.chain.num_frames} frames needs {cost} NFE, over the budget of {budget}")
        return first, branching

    # ---- ask / tell -------------------------------------------------------------------------
    def ask(self) -> list[Task]:
        if self._done:
            return []
        if self._depth == 0:
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
    """N independent clips (frame-chain, same strength), the best by the video verifier.

    Options: ``num_frames`` (3), ``strength`` (0.75), ``n`` (None: as many clips as the budget
    buys). Frames before the last are not scored; one ask per frame depth, all clips together.
    """

    name = "linear-clips"
    option_checks = {**_CHAIN_OPTIONS,
                     "n": options.rule(options.integer, minimum=1, allow_none=True)}

    def __init__(self, *, num_frames: int = 3, strength: float = DEFAULT_STRENGTH,
                 n: int | None = None,
                 **common: Any) -> None:
        super().__init__(num_frames=num_frames, strength=strength, **common)
        per_clip = self.chain.clip_nfe(self.num_steps)
        self.n = count_within_budget(
            n, budget_nfe=self.budget_nfe, cost=per_clip, plural="clips",
            none_affordable=f"budget of {self.budget_nfe} NFE buys no clip of "
                            f"{self.chain.num_frames} frames ({per_clip} NFE each)")

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
