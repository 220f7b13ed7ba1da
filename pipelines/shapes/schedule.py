"""The learning-rate plan shared by the shapes trainers."""

from __future__ import annotations

import math
import time


class Plan:
    """Linear warm-up, then a cosine from 1 to 0.1, over a step count, a time box, or both.

    ``steps`` ends the phase after that many steps; ``budget_s`` is a hard deadline. When
    ``follow_clock`` is set, progress is the larger of the step share and the time share: the
    CPU is shared with other work whose load comes and goes, and following the clock still
    finishes the decay by the deadline instead of being cut off at a high learning rate. Without
    it (smoke tests) the schedule depends on the step only and runs are exactly reproducible.
    """

    def __init__(
        self, budget_s: float, warmup_steps: int, steps: int | None, follow_clock: bool = True
    ) -> None:
        self.start = time.monotonic()
        self.deadline = self.start + budget_s
        self.warmup = warmup_steps
        self.steps = steps
        self.follow_clock = follow_clock

    def progress(self, step: int) -> float:
        by_steps = step / self.steps if self.steps else 0.0
        by_clock = (time.monotonic() - self.start) / max(1e-9, self.deadline - self.start)
        return min(1.0, max(by_steps, by_clock) if self.follow_clock else by_steps)

    def lr_factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * self.progress(step)))

    def done(self, step: int) -> bool:
        if self.steps is not None and step >= self.steps:
            return True
        return time.monotonic() >= self.deadline
