"""Per-step LR schedules with linear warm-up, as ``LambdaLR`` factories for the configs' ``scheduler`` group.

The LightningModule calls ``factory(optimizer, total_steps=...)`` with the run's optimizer-step count.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def _check(total_steps: int, warmup_steps: int) -> None:
    if total_steps < 1:
        raise ValueError(f"total_steps: must be >= 1, got {total_steps!r}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps: must lie in [0, total_steps={total_steps}], got {warmup_steps!r}")


def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> LambdaLR:
    """Linear warm-up over ``warmup_steps`` optimizer steps, then cosine decay to ``min_lr_ratio`` x the base LR."""
    _check(total_steps, warmup_steps)
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio: must lie in [0, 1], got {min_lr_ratio!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)


def warmup_linear(optimizer: Optimizer, total_steps: int, warmup_steps: int = 0) -> LambdaLR:
    """Linear warm-up over ``warmup_steps`` optimizer steps, then linear decay to 0 at ``total_steps``."""
    _check(total_steps, warmup_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return LambdaLR(optimizer, factor)
