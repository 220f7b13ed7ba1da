"""A time-boxed training plan shared by the shapes trainers."""

from __future__ import annotations

import math
import time


class Plan:
    """Fixes a phase's step count from a timed warm-up, then gives the LR at each step."""

    def __init__(self, budget_s: float, warmup_steps: int, max_steps: int | None) -> None:
        self.start = time.monotonic()
        self.deadline = self.start + budget_s
        self.warmup = warmup_steps
        self.max_steps = max_steps
        self.total: int | None = max_steps

    def observe(self, step: int) -> None:
        """After 20 timed steps, plan the rest of the budget at the speed seen."""
        if self.total is None and step == 20:
            per_step = (time.monotonic() - self.start) / step
            self.total = max(21, int((self.deadline - self.start) / per_step * 0.97))

    def lr_factor(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        total = self.total or 10**9
        progress = min(1.0, (step - self.warmup) / max(1, total - self.warmup))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    def done(self, step: int) -> bool:
        if self.total is not None and step >= self.total:
            return True
        return self.max_steps is None and time.monotonic() >= self.deadline
