"""Sequence classification with a pretrained Hugging Face transformer, on the sharpness-aware mixin."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import BinaryF1Score, MatthewsCorrCoef, MulticlassAccuracy

from lightning_slsam.lightning_adapter.mixin import SharpnessAwareMixin
from lightning_slsam.loading.optional_dependencies import import_optional
from lightning_slsam.models.hf_pretrained import hub_fetch, minilm_path, resolve_pretrained
from lightning_slsam.models.optimizer_config import (
    OptimizerFactory,
    SchedulerFactory,
    check_factories,
    configure_optimizer_and_scheduler,
)

#: validation metrics by name (GLUE's: accuracy, Matthews correlation for CoLA, F1 of class 1 for MRPC/QQP)
TEXT_METRICS: tuple[str, ...] = ("acc", "mcc", "f1")

__all__ = ["TEXT_METRICS", "TextClassifier", "minilm_path"]


def build_metric(metric: str, num_labels: int) -> Metric:
    """The torchmetrics object for ``metric`` (``"acc"``, ``"mcc"`` or ``"f1"``), updated with predicted labels."""
    if metric == "acc":
        return MulticlassAccuracy(num_classes=num_labels, average="micro")
    if metric == "mcc":
        return MatthewsCorrCoef(task="multiclass", num_classes=num_labels)
    if metric == "f1":
        if num_labels != 2:
            raise ValueError(f"metric: 'f1' is the binary F1 of class 1 and needs num_labels=2, got {num_labels}")
        return BinaryF1Score()
    raise ValueError(f"metric: expected one of {', '.join(TEXT_METRICS)}, got {metric!r}")


class TextClassifier(SharpnessAwareMixin, pl.LightningModule):
    """A Hugging Face ``AutoModelForSequenceClassification`` fine-tuned on tokenized batches.

    Batches are dicts as the text data modules make them (``input_ids``, ``attention_mask``, optionally
    ``token_type_ids``, and ``labels`` as int64 class indices); ``compute_loss`` returns the model's
    cross-entropy loss.

    Args:
        model_name_or_path: a local model folder (loaded with ``local_files_only=True``: nothing is downloaded),
            a hub name (needs a network or a warm cache), or None (default) for the offline MiniLM of
            :func:`minilm_path`. A new classification head is initialised (from the global torch seed).
        num_labels: number of classes (>= 2; default 2).
        optimizer: a factory ``params -> Optimizer``; default AdamW with lr 2e-5, weight decay 0.01.
        scheduler: an LR scheduler factory (``optimizer -> scheduler``, or with an open ``total_steps``
            parameter, see :mod:`lightning_slsam.models.optimizer_config`), or None (default) for a constant LR.
        scheduler_interval: ``"step"`` (default: each optimizer step) or ``"epoch"``.
        scheduler_monitor: the metric a ``ReduceLROnPlateau`` watches (default ``"val/loss"``).
        metric: validation metric: ``"acc"`` (default), ``"mcc"`` (Matthews correlation, CoLA) or ``"f1"``
            (binary F1 of class 1, MRPC; needs ``num_labels=2``).

    Logged: ``val/loss`` and ``val/<metric>`` each validation epoch.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        num_labels: int = 2,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        scheduler_interval: str = "step",
        scheduler_monitor: str = "val/loss",
        metric: str = "acc",
    ) -> None:
        super().__init__()
        if not (isinstance(num_labels, int) and num_labels >= 2):
            raise ValueError(f"num_labels: must be an int >= 2, got {num_labels!r}")
        check_factories(optimizer, scheduler, scheduler_interval)
        self.val_metric = build_metric(metric, num_labels)
        source = resolve_pretrained(model_name_or_path, "model_name_or_path")
        transformers = import_optional("transformers", "TextClassifier")
        fetch = contextlib.nullcontext() if source.local else hub_fetch("model_name_or_path", source.name_or_path)
        with fetch:  # offline, a hub name fails at once in one line instead of retrying for about 45 s
            self.model = transformers.AutoModelForSequenceClassification.from_pretrained(
                source.name_or_path,
                num_labels=num_labels,
                problem_type="single_label_classification",
                **source.from_pretrained_kwargs(),
            )
        # from_pretrained returns the model in eval mode, and Lightning keeps submodules' modes: train mode
        # here, so that dropout is on during fit (Lightning switches to eval for validation and back).
        self.model.train()
        self.model_name_or_path = source.name_or_path
        self.num_labels = num_labels
        self.metric = metric
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.scheduler_interval = scheduler_interval
        self.scheduler_monitor = scheduler_monitor

    def forward(self, **inputs: Tensor) -> Tensor:
        """Logits ``(batch, num_labels)`` of tokenized inputs (``labels`` is ignored if present)."""
        inputs = {key: value for key, value in inputs.items() if key != "labels"}
        return self.model(**inputs).logits

    def compute_loss(self, batch: dict[str, Tensor]) -> Tensor:
        if "labels" not in batch:
            raise KeyError(f"batch: a TextClassifier batch needs a 'labels' entry, got keys {sorted(batch)}")
        return self.model(**batch).loss

    def validation_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        output = self.model(**batch)
        self.val_metric.update(output.logits.argmax(dim=-1), batch["labels"])
        batch_size = int(batch["labels"].shape[0])
        self.log("val/loss", output.loss, prog_bar=True, batch_size=batch_size)
        self.log(f"val/{self.metric}", self.val_metric, prog_bar=True, batch_size=batch_size)

    def configure_optimizers(self) -> torch.optim.Optimizer | dict[str, Any]:
        return configure_optimizer_and_scheduler(
            self,
            self.optimizer_factory,
            functools.partial(torch.optim.AdamW, lr=2e-5, weight_decay=0.01),
            self.scheduler_factory,
            self.scheduler_interval,
            self.scheduler_monitor,
        )
