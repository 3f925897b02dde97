"""What a callback keeps of the steps it ran, and what it logs for each: the running counters (steps, active
ratios, passes), how often each arm was active, and the bounded history of the per-arm sampling probabilities.
The counters are checkpoint state, under the same keys as before they had a module of their own."""

from __future__ import annotations

import functools
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from lightning_slsam.engine.method import PassOne
from lightning_slsam.lightning_adapter import pass_context, probability_logging


class StepRecord:
    """Counters over a run's steps and the probability history.

    Args:
        history_every: record the probabilities every this many steps (0: never).
        history_size: the most records kept; when full, every other record is dropped and the interval doubles, so
            the history spans the whole run in bounded memory (and checkpoint size).
    """

    def __init__(self, history_every: int, history_size: int) -> None:
        self.history_every = history_every
        self.history_size = history_size
        self.steps = 0
        self.active_ratio_sum = 0.0
        self.active_ratio2_sum = 0.0
        self.passes_sum = 0
        #: how often each arm was active in pass 1 (int64, one per arm)
        self.selection_counts = torch.zeros(0, dtype=torch.long)
        self.history: list[Tensor] = []
        #: the interval of the kept records: ``history_every``, doubled each time ``history_size`` is reached
        self.interval = history_every

    def start(self, arms: int) -> None:
        """A fit starts over ``arms`` arms: the selection counts and the history begin again (the counters go on)."""
        self.selection_counts = torch.zeros(arms, dtype=torch.long)
        self.history = []
        self.interval = self.history_every

    def add(self, ratio: float, ratio2: float, passes: int, active1: Tensor, probs: Tensor | None) -> None:
        """Count one finished step: pass 1's and pass 2's active ratios, 1 or 2 passes, pass 1's arms, and the
        probabilities after it (None for methods that do not sample)."""
        self.steps += 1
        self.active_ratio_sum += ratio
        self.active_ratio2_sum += ratio2
        self.passes_sum += passes
        self.selection_counts += active1.to(torch.long)
        if probs is not None and self.history_every and (self.steps - 1) % self.interval == 0:
            self.history.append(probs.to(torch.float32))
            if len(self.history) > self.history_size:
                self.history = self.history[::2]
                self.interval *= 2

    def mean(self, total: float) -> float:
        """``total`` over the steps so far; 0 before the first step."""
        return total / self.steps if self.steps else 0.0

    def probability_history(self) -> Tensor | None:
        """The recorded probabilities, float32 ``(records, N)``, or None."""
        return torch.stack(self.history) if self.history else None

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "active_ratio_sum": self.active_ratio_sum,
            "active_ratio2_sum": self.active_ratio2_sum,
            "passes_sum": self.passes_sum,
            "selection_counts": self.selection_counts.clone(),
            "history": list(self.history),
            "history_interval": self.interval,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.active_ratio_sum = float(state["active_ratio_sum"])
        self.active_ratio2_sum = float(state["active_ratio2_sum"])
        self.passes_sum = int(state["passes_sum"])
        self.selection_counts = state["selection_counts"].clone()
        self.history = list(state["history"])
        self.interval = int(state.get("history_interval", self.history_every))  # absent in older checkpoints


def log_step(
    module: pl.LightningModule,
    loss: Tensor,
    loss2: Tensor | None,
    first: PassOne,
    active1: Tensor,
    active2: Tensor | None,
    ratio: float,
    ratio2: float,
    grad_norm: bool,
    update_lrs: list[float] | None,
    probs: Tensor | None,
) -> None:
    """``self.log`` one finished step's values; a key the user's ``training_step`` logged this step keeps the
    user's value."""
    log = functools.partial(pass_context.log_unless_user_logged, module)
    log("train/loss", loss.detach(), prog_bar=True)
    log("train/active_ratio", ratio)
    log("train/passes", 1.0 if loss2 is None else 2.0)
    if grad_norm:
        log("train/grad_norm", first.norm_over(active1))
    if loss2 is not None and active2 is not None:
        log("train/loss_perturbed", loss2.detach())
        log("train/sharpness", (loss2 - loss).detach())
    # 0 on one-pass steps, so that its mean over steps is the average cost of the second backward pass
    log("train/active_ratio_pass2", ratio2)
    if update_lrs is not None:  # the learning rates of this step's update (none when it was skipped)
        for index, lr in enumerate(update_lrs):
            log("train/lr" if len(update_lrs) == 1 else f"train/lr_pg{index}", lr)
    if probs is not None:  # methods that sample arms: a summary of the per-arm probabilities, any logger
        for key, value in probability_logging.summary(probs).items():
            log(key, value)
