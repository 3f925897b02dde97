"""A generic classification LightningModule on the sharpness-aware mixin."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_slsam.mixin import SharpnessAwareMixin

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]


class Classifier(SharpnessAwareMixin, pl.LightningModule):
    """Cross-entropy classification of ``(inputs, labels)`` batches with validation accuracy.

    Args:
        net: the network; ``net(inputs)`` returns logits of shape ``(batch, num_classes)``.
        num_classes: number of classes.
        optimizer: a factory ``params -> Optimizer`` (e.g. ``functools.partial(torch.optim.AdamW, lr=1e-3)``);
            default AdamW with lr 1e-3, weight decay 0.01.

    Logged: ``val/loss`` and ``val/acc`` (in [0, 1]) each validation epoch.
    """

    def __init__(self, net: nn.Module, num_classes: int, optimizer: OptimizerFactory | None = None) -> None:
        super().__init__()
        self.net = net
        self.optimizer_factory = optimizer
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

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_factory is None:
            return torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
        return self.optimizer_factory(params)
