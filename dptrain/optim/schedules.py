"""Learning-rate schedules: pure functions of the step number.

A schedule is called with the index of the update about to be applied (0, 1, ...)
and returns the learning rate for it. Being a function of the step alone is what
lets a resumed or replayed run use exactly the same rates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCHEDULES = ("constant", "step", "cosine")


@dataclass(frozen=True)
class Schedule:
    """`name` in SCHEDULES, scaled from `lr`, with an optional linear warm-up.

    - constant: lr
    - step: lr * gamma ** (step // step_size)
    - cosine: from lr down to min_lr over total_steps (after the warm-up)
    - warmup_steps > 0: the rate rises linearly from lr / warmup_steps to lr over
      the first warmup_steps updates (Goyal et al., 2017), then follows the schedule.
    """

    name: str = "constant"
    lr: float = 0.1
    total_steps: int = 1
    warmup_steps: int = 0
    step_size: int = 1000
    gamma: float = 0.1
    min_lr: float = 0.0

    def __post_init__(self):
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.name!r}; expected one of {SCHEDULES}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"invalid learning rate: {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"invalid warmup: {self.warmup_steps} steps (must be >= 0)")
        if self.step_size < 1:
            raise ValueError(f"invalid step_size: {self.step_size} (must be >= 1)")
        if not 0 < self.gamma <= 1:
            raise ValueError(f"invalid gamma: {self.gamma} (must be in (0, 1])")
        if self.total_steps < 1:
            raise ValueError(f"invalid total_steps: {self.total_steps}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        t = step - self.warmup_steps
        if self.name == "step":
            return self.lr * self.gamma ** (t // self.step_size)
        if self.name == "cosine":
            span = max(self.total_steps - self.warmup_steps, 1)
            progress = min(t / span, 1.0)
            return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))
        return self.lr
