"""A generic classification LightningModule on the sharpness-aware mixin (the configs' image classifier)."""

from __future__ import annotations

import functools
import numbers
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_slsam.lightning_adapter.mixin import SharpnessAwareMixin
from lightning_slsam.models.optimizer_config import (
    OptimizerFactory,
    SchedulerFactory,
    check_factories,
    configure_optimizer_and_scheduler,
)

__all__ = ["Classifier", "OptimizerFactory", "SchedulerFactory"]


class Classifier(SharpnessAwareMixin, pl.LightningModule):
    """Cross-entropy classification of ``(inputs, labels)`` batches with validation accuracy.

    Args:
        net: the network; ``net(inputs)`` returns logits of shape ``(batch, num_classes)``.
        num_classes: number of classes (>= 2).
        optimizer: a factory ``params -> Optimizer`` (e.g. ``functools.partial(torch.optim.AdamW, lr=1e-3)``);
            default AdamW with lr 1e-3, weight decay 0.01.
        scheduler: an LR scheduler factory ``optimizer -> scheduler`` (a ``functools.partial``), or None (default:
            constant LR). A factory with an open ``total_steps`` parameter gets the run's optimizer-step count
            (see :mod:`lightning_slsam.models.optimizer_config`).
        scheduler_interval: when the scheduler steps: ``"step"`` (each optimizer step; default, as the configs'
            warm-up schedules expect) or ``"epoch"``.
        scheduler_monitor: the metric a ``ReduceLROnPlateau`` scheduler watches (default ``"val/loss"``).

    Logged: ``val/loss`` and ``val/acc`` (in [0, 1]) each validation epoch.
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "step",
        scheduler_monitor: str = "val/loss",
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net: expected an nn.Module, got {type(net).__name__}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 2:
            raise ValueError(f"num_classes: must be an int >= 2, got {num_classes!r}")
        num_classes = int(num_classes)
        check_factories(optimizer, scheduler, scheduler_interval)
        self.net = net
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.scheduler_monitor = scheduler_monitor
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, inputs: Tensor) -> Tensor:
        return self.net(inputs)

    def compute_loss(self, batch: Any) -> Tensor:
        inputs, labels = batch
        return F.cross_entropy(self.net(inputs), labels)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        inputs, labels = batch
        logits = self.net(inputs)
        self.val_acc.update(logits, labels)
        self.log("val/loss", F.cross_entropy(logits, labels), prog_bar=True)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        return configure_optimizer_and_scheduler(
            self,
            self.optimizer_factory,
            functools.partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.01),
            self.scheduler_factory,
            self.scheduler_interval,
            self.scheduler_monitor,
        )
