"""What the ready modules' ``configure_optimizers`` return: the base optimizer and an optional LR scheduler.

The modules take two factories (from Hydra, ``_partial_: true``):

- ``optimizer``: ``params -> Optimizer``, e.g. ``functools.partial(torch.optim.AdamW, lr=1e-3)``.
- ``scheduler``: ``optimizer -> LRScheduler``, e.g. ``functools.partial(CosineAnnealingLR, T_max=50)``. A factory
  with a ``total_steps`` parameter that the partial leaves open (such as
  :func:`lightning_slsam.app.warmup_schedule.warmup_linear`) is called as ``factory(optimizer, total_steps=N)`` with
  N the number of times the scheduler will step: with ``scheduler_interval="step"`` the run's optimizer steps
  (``max_steps``, or batches per epoch / the callback's ``accumulate`` times ``max_epochs``), with ``"epoch"``
  the Trainer's ``max_epochs``.

The mixin steps the scheduler at ``scheduler_interval`` ("step": each optimizer step; "epoch": each epoch).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

OptimizerFactory = Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer]
SchedulerFactory = Callable[..., Any]
SCHEDULER_INTERVALS: tuple[str, ...] = ("step", "epoch")


def check_factories(optimizer: Any, scheduler: Any, scheduler_interval: str) -> None:
    """Raise (naming the argument) unless the factories are callables or None and the interval is known."""
    if optimizer is not None and not callable(optimizer):
        raise TypeError(
            f"optimizer: expected a factory params -> Optimizer (e.g. functools.partial(torch.optim.AdamW, lr=1e-3), "
            f"or a Hydra config with _partial_: true) or None, got {type(optimizer).__name__}"
        )
    if scheduler is not None and not callable(scheduler):
        raise TypeError(
            f"scheduler: expected a factory optimizer -> LR scheduler (e.g. functools.partial(CosineAnnealingLR, "
            f"T_max=10), or a Hydra config with _partial_: true) or None, got {type(scheduler).__name__}"
        )
    if scheduler_interval not in SCHEDULER_INTERVALS:
        raise ValueError(
            f"scheduler_interval: expected one of {', '.join(SCHEDULER_INTERVALS)}, got {scheduler_interval!r}"
        )


def wants_total_steps(factory: Callable[..., Any]) -> bool:
    """Whether ``factory`` has a ``total_steps`` parameter that is still open (not bound by a partial)."""
    if isinstance(factory, functools.partial) and "total_steps" in factory.keywords:
        return False
    try:
        parameters = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins / C callables without a signature
        return False
    return "total_steps" in parameters


def total_optimizer_steps(module: Any) -> int:
    """The number of optimizer steps the module's Trainer will run (for schedules that decay to an end).

    Counts the sharpness-aware callback's ``accumulate`` (the mixin steps once per group of micro-batches,
    the epoch's last group possibly short) and honours ``max_steps``. Raises if the run has no end.
    """
    from lightning_slsam.lightning_adapter.callback import find_sharpness_callback

    trainer = module.trainer
    estimate = trainer.estimated_stepping_batches  # also loads the train dataloader when needed
    callback = find_sharpness_callback(trainer)
    accumulate = getattr(callback, "accumulate", 1) if callback is not None else 1
    if accumulate > 1 and math.isfinite(trainer.num_training_batches) and trainer.max_epochs not in (None, -1):
        estimate = math.ceil(trainer.num_training_batches / accumulate) * max(trainer.max_epochs, 1)
        if trainer.max_steps != -1:
            estimate = min(estimate, trainer.max_steps)
    if not math.isfinite(estimate) or estimate < 1:
        raise ValueError(
            f"scheduler: the schedule needs total_steps, but the run's length is unknown ({estimate}); set the "
            "Trainer's max_steps or max_epochs, or bind total_steps in the scheduler config"
        )
    return int(estimate)


def total_scheduler_steps(module: Any, scheduler_interval: str) -> int:
    """How often the scheduler will step: optimizer steps (``"step"``) or ``max_epochs`` (``"epoch"``)."""
    if scheduler_interval == "step":
        return total_optimizer_steps(module)
    epochs = module.trainer.max_epochs
    if epochs is None or epochs < 1:
        raise ValueError(
            f"scheduler: the schedule needs total_steps, but the Trainer's max_epochs is {epochs}; set max_epochs, "
            "use scheduler_interval='step', or bind total_steps in the scheduler config"
        )
    return int(epochs)


def configure_optimizer_and_scheduler(
    module: Any,
    optimizer: OptimizerFactory | None,
    default_optimizer: OptimizerFactory,
    scheduler: SchedulerFactory | None = None,
    scheduler_interval: str = "step",
    scheduler_monitor: str = "val/loss",
) -> torch.optim.Optimizer | dict[str, Any]:
    """The ``configure_optimizers`` return value for ``module``'s trainable parameters.

    Args:
        module: the LightningModule (its trainable parameters, and its Trainer for ``total_steps``).
        optimizer: the user's optimizer factory, or None for ``default_optimizer``.
        default_optimizer: the module's default factory.
        scheduler: an LR scheduler factory (see the module docstring), or None for a constant LR.
        scheduler_interval: ``"step"`` (default) or ``"epoch"``.
        scheduler_monitor: the metric a ``ReduceLROnPlateau`` watches (default ``"val/loss"``; unused otherwise).

    Returns:
        The optimizer alone without a scheduler, else Lightning's dict form
        ``{"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": ...}}``.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    opt = (optimizer or default_optimizer)(params)
    if scheduler is None:
        return opt
    if wants_total_steps(scheduler):
        sched = scheduler(opt, total_steps=total_scheduler_steps(module, scheduler_interval))
    else:
        sched = scheduler(opt)
    config: dict[str, Any] = {"scheduler": sched, "interval": scheduler_interval, "frequency": 1}
    if isinstance(sched, ReduceLROnPlateau):
        config["monitor"] = scheduler_monitor
    return {"optimizer": opt, "lr_scheduler": config}
