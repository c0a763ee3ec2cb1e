"""Learning-rate schedule: linear warm-up, then cosine (or linear, or constant) decay to a floor."""

from __future__ import annotations

import math


def lr_at(step: int, lr: float, warmup_steps: int, decay_steps: int, min_lr_ratio: float = 0.1,
          schedule: str = "cosine", time_fraction: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Warm-up: ``lr * (step + 1) / warmup_steps``. Then the decay progress is
    ``p = (step - warmup) / (decay_steps - warmup)``, or ``time_fraction`` (elapsed / time budget)
    when that is larger, so a run stopped by a wall-clock budget still ends its schedule; past the end
    the rate stays at ``lr * min_lr_ratio``.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    p = (step - warmup_steps) / max(1, decay_steps - warmup_steps)
    p = min(1.0, max(p, float(time_fraction), 0.0))
    floor = lr * min_lr_ratio
    if schedule == "linear":
        return lr - (lr - floor) * p
    return floor + 0.5 * (lr - floor) * (1.0 + math.cos(math.pi * p))
