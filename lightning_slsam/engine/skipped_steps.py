"""Optimizer steps skipped for non-finite gradients: the check, the count, the warning and the limit.

A NaN or inf anywhere in the gradients that reach the optimizer (pass 1 at w, pass 2 at w + e, or the
gradient a method combines from them) skips the step: without a GradScaler the optimizer is not stepped;
with one it is, so that the scaler finds the inf itself, skips the update and backs off its scale. Either
way the weights, the optimizer state and the method's state (a bandit, stored gradients, masks, coins) stay
as they were before the step (``Method.discard_step``), a warning names the global step, and the running
count is logged as ``train/skipped_steps``. After ``max_consecutive`` skipped steps in a row training
stops with a :class:`NonFiniteTrainingError` instead of burning compute on a run that cannot recover.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

#: default of ``max_skipped_steps``: skipped steps in a row before training stops
DEFAULT_MAX_SKIPPED_STEPS = 50


class NonFiniteTrainingError(RuntimeError):
    """Raised when too many optimizer steps in a row had non-finite gradients."""


def check_max_skipped_steps(value: Any) -> int | None:
    """Validate ``max_skipped_steps`` (an int >= 1, or None for no limit); the error names the argument."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(
            f"max_skipped_steps: the number of skipped steps in a row that stops training must be an int >= 1 "
            f"or None (no limit), got {value!r}"
        )
    return value


def all_finite(tensors: Sequence[Tensor]) -> Tensor:
    """Whether every element of ``tensors`` is finite: a 0-d bool tensor, no host synchronisation.

    One fused ``_foreach_norm(inf)`` per device (the max ``|x|`` of each tensor, computed in float32: a NaN or
    inf anywhere makes it non-finite, a large finite fp16 value does not overflow it).
    """
    by_device: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    if not by_device:
        return torch.ones((), dtype=torch.bool)
    results = []
    for group in by_device.values():
        maxima = torch._foreach_norm(group, float("inf"))  # max |x|: exact in every dtype, NaN kept
        results.append(torch.isfinite(torch.stack(maxima)).all())
    first = results[0]
    for other in results[1:]:
        first = first & other.to(first.device)
    return first


class SkippedSteps:
    """The running count of skipped steps, the warning per skip, and the stop after too many in a row.

    Args:
        max_consecutive: skipped steps in a row that stop training (int >= 1; None: never stop).
        owner: the name that starts the warnings and the error (the callback's class name).
    """

    def __init__(self, max_consecutive: int | None = DEFAULT_MAX_SKIPPED_STEPS, owner: str = "SharpnessAware") -> None:
        self.max_consecutive = check_max_skipped_steps(max_consecutive)
        self.owner = owner
        #: skipped steps since training began (restored on resume)
        self.total = 0
        #: skipped steps since the last step that was taken
        self.consecutive = 0

    def record(self, skipped: bool, global_step: int, where: str, scaler: bool) -> None:
        """Count one finished step; warn if it was skipped; raise after ``max_consecutive`` skips in a row.

        Args:
            skipped: whether the step was skipped.
            global_step: the trainer's global step the skipped step would have been (0-based).
            where: which gradients were non-finite, e.g. ``"pass 2 (at w + e)"``.
            scaler: whether a GradScaler took the step (it backs off its scale).

        Raises:
            NonFiniteTrainingError: the ``max_consecutive``-th skipped step in a row.
        """
        if not skipped:
            self.consecutive = 0
            return
        self.total += 1
        self.consecutive += 1
        how = "the GradScaler skipped the update and backs off its scale" if scaler else "the optimizer was not stepped"
        _warn_on_rank_zero(
            f"{self.owner}: skipped global step {global_step}: non-finite gradients (NaN or inf) in {where}; {how}, "
            f"weights, optimizer and method state are unchanged ({self.consecutive} skipped in a row, "
            f"{self.total} in all)",
        )
        if self.max_consecutive is not None and self.consecutive >= self.max_consecutive:
            raise NonFiniteTrainingError(
                f"{self.owner}: {self.consecutive} optimizer steps in a row had non-finite gradients (NaN or inf), the "
                f"last at global step {global_step}; training stopped (max_skipped_steps={self.max_consecutive}). "
                "Check the loss and the data for NaN/inf, lower the learning rate or rho, or use bf16/fp32 "
                "instead of fp16"
            )

    def state_dict(self) -> dict[str, int]:
        return {"total": self.total, "consecutive": self.consecutive}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.total = int(state.get("total", 0))
        self.consecutive = int(state.get("consecutive", 0))


def _warn_on_rank_zero(message: str) -> None:
    """A ``RuntimeWarning``, from rank 0 only under ``torch.distributed`` (no Lightning import: the step engine
    uses this module)."""
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return
    warnings.warn(message, RuntimeWarning, stacklevel=3)
