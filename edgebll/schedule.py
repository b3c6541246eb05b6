"""Learning-rate schedules, set by the runtime on every step.

ORT's own LinearLRScheduler swaps warmup and total steps (docs/design.md), so the runtime computes
the rate itself and calls ``Optimizer.set_learning_rate`` before each step.
"""

from __future__ import annotations

import math

from edgebll.errors import EdgeBLLError

SCHEDULES = ("cosine", "step", "constant")


def learning_rate(schedule: str, base_lr: float, step: int, total_steps: int, warmup_steps: int = 0) -> float:
    """Rate for ``step`` (0-based) of ``total_steps``: linear warmup, then the schedule.

    cosine: half a cosine from ``base_lr`` to 0; step: x0.1 at 50 % and again at 75 %; constant.
    """
    if schedule not in SCHEDULES:
        raise EdgeBLLError(f"unknown learning-rate schedule {schedule!r}; choose one of {list(SCHEDULES)}")
    if warmup_steps and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    done = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))
    if schedule == "step":
        return base_lr * (0.1 if done >= 0.5 else 1.0) * (0.1 if done >= 0.75 else 1.0)
    return base_lr
