"""``SharpnessAwareMixin``: the manual-optimization training step shared by every method (docs/design.md#step).

The user keeps a ``training_step`` that returns the loss, or writes ``compute_loss(batch)``, and
``configure_optimizers`` (the plain base optimizer); the mixin owns the step Lightning calls
(``module_conversion.py`` says how, in any base order). With a
:class:`~lightning_slsam.lightning_adapter.callback.SharpnessAware` callback on the Trainer it runs that callback's
method;
without one it trains as the base optimizer, one pass per step.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerStatus
from torch import Tensor

from lightning_slsam.engine import step as step_engine
from lightning_slsam.engine.distributed import all_reduce_mean
from lightning_slsam.engine.skipped_steps import SkippedSteps, all_finite
from lightning_slsam.lightning_adapter import module_conversion, pass_context
from lightning_slsam.lightning_adapter.callback import Base, SharpnessAware, find_sharpness_callback
from lightning_slsam.lightning_adapter.lr_schedules import split_monitors, step_schedulers


class SharpnessAwareMixin:
    """Mix into a ``LightningModule`` (first or last among the bases) to train with the method of a
    ``SharpnessAware`` callback.

    Keep your ``training_step(batch, batch_idx)``: it returns the loss (a scalar tensor or a dict with a
    ``"loss"`` entry) and may call ``self.log``; the step runs it once per forward pass and keeps what it
    logs in pass 1 only. Or write ``compute_loss(batch) -> Tensor`` (the scalar training loss) instead.
    Return the plain base optimizer from ``configure_optimizers``. The mixin turns Lightning's automatic
    optimization off and calls ``optimizer.step()`` through Lightning, so ``global_step``, checkpoints,
    precision plugins and optimizer hooks work as usual.

    Example:
        >>> class Net(SharpnessAwareMixin, L.LightningModule):  # doctest: +SKIP
        ...     def compute_loss(self, batch):
        ...         x, y = batch
        ...         return F.cross_entropy(self.model(x), y)
    """

    #: marks the mixin among a module's bases, so that the callback recognises it without importing this module
    _sharpness_aware_mixin: ClassVar[bool] = True

    sam_pass: int = pass_context.OUTSIDE
    """Which pass of the step is running: 0 outside the step, 1 at the weights ``w``, 2 at ``w + e``, 3 an extra
    pass of a method (SSAM-F's Fisher score). ``self.log`` is kept in pass 1 only; guard other state updates
    (torchmetrics, counters) with ``if self.sam_pass == 1``."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # the mixin owns training_step (a user's becomes the loss of each pass), also when it comes last
        module_conversion.install(cls, SharpnessAwareMixin)
        # keep the schedulers' monitor keys, also of a configure_optimizers inherited from a plain LightningModule
        configure = inspect.getattr_static(cls, "configure_optimizers", None)
        if configure is not None and configure is not pl.LightningModule.__dict__["configure_optimizers"]:
            cls.configure_optimizers = _capturing_monitors(configure)  # type: ignore[attr-defined]

    def configure_callbacks(self) -> list[Any]:
        """The module's own callbacks; without a sharpness-aware callback on the Trainer, also
        :class:`~lightning_slsam.Base`, so the module trains as the base optimizer.

        (A module that overrides ``configure_callbacks`` without calling this still trains as the base
        optimizer, through a fallback step that does not step epoch-interval LR schedulers at the last epoch.)
        """
        return self._with_plain_fallback(module_conversion.inherited_callbacks(self, SharpnessAwareMixin))

    def _with_plain_fallback(self, callbacks: list[Any]) -> list[Any]:
        trainer = getattr(self, "_trainer", None)
        return [*callbacks, Base()] if trainer is not None and find_sharpness_callback(trainer) is None else callbacks

    @property
    def automatic_optimization(self) -> bool:
        """Always False: the mixin performs the optimization itself.

        Lightning reads this before any callback hook runs, so this is where Trainer flags that manual
        optimization ignores are refused, with the callback argument to use instead.
        """
        trainer = getattr(self, "_trainer", None)
        if trainer is not None and trainer.state.status == TrainerStatus.RUNNING:
            _refuse_automatic_only_flags(trainer)
        return False

    @automatic_optimization.setter
    def automatic_optimization(self, value: bool) -> None:
        if value:
            raise ValueError(
                "automatic_optimization: SharpnessAwareMixin runs manual optimization; it cannot be set to True"
            )

    def compute_loss(self, batch: Any) -> Tensor:
        """The scalar training loss of ``batch``. Called once per forward pass (twice per SAM step).

        A module that keeps its own ``training_step`` need not write it: this then returns that step's loss
        (run with ``batch_idx`` 0 and ``self.log`` muted), for methods that call it on other batches (SSAM-F).
        """
        return module_conversion.compute_loss_from_training_step(self, batch)

    # --- the step --------------------------------------------------------------------------------------
    @module_conversion.step_entry
    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        """One micro-batch; every ``accumulate``-th call runs the method's step (docs/design.md#step).

        The step itself is :func:`lightning_slsam.engine.step.run_step`; this adapter hands it Lightning's
        ``manual_backward`` (through the module's loss), the optimizer step through ``LightningOptimizer`` (its
        precision plugin, GradScaler and ``on_before_optimizer_step`` clipping), the LR schedulers, and logs
        what happened through the callback.
        """
        if pass_context.current(self) != pass_context.OUTSIDE:  # called inside a pass: the loss of the batch
            return module_conversion.run_after(SharpnessAwareMixin, self, batch, batch_idx)
        pass_context.start_step(self, batch_idx)
        module: Any = self
        step_schedulers(module.trainer, "epoch")
        callback = self._sharpness_callback()
        if callback is None:
            return self._plain_step(batch)
        group = callback.collect(batch, last=bool(module.trainer.is_last_batch))
        if group is None:  # accumulating: the step runs when the group of micro-batches is complete
            return None
        run = callback.run
        assert run is not None, "the SharpnessAware callback was not set up"
        optimizer = module.optimizers()
        scaler = _grad_scaler(module)
        global_step = int(module.trainer.global_step)
        result = run.step(
            functools.partial(self._forward_backward, group),
            optimizer,
            optimizer.step,
            scaler=scaler,
            after_optimizer_step=functools.partial(step_schedulers, module.trainer, "step"),
            all_reduce=all_reduce_mean,
            check_arms=callback.check_arms,
        )
        callback.record_step(module, result.loss, result.loss_perturbed, result.first, result.active1, result.active2)
        callback.record_skip(module, result.skipped, global_step, result.where, scaler is not None)
        return result.loss

    def _plain_step(self, batch: Any) -> Tensor:
        module: Any = self
        optimizer = module.optimizers()
        loss = self._forward_backward([batch])
        # a non-finite gradient skips the step here too (see step_engine.run_step)
        finite = bool(all_finite(step_engine.optimizer_grads(optimizer)))
        scaler = _grad_scaler(module)
        global_step = int(module.trainer.global_step)
        if finite or scaler is not None:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_schedulers(module.trainer, "step")
        pass_context.log_unless_user_logged(module, "train/loss", loss, prog_bar=True)
        skipped = module.__dict__.setdefault("_skipped_steps", SkippedSteps(owner=type(module).__name__))
        skipped.record(not finite, global_step, step_engine.PASS_ONE, scaler is not None)
        pass_context.log_unless_user_logged(module, "train/skipped_steps", float(skipped.total))
        return loss

    def _forward_backward(self, group: list[Any], sam_pass: int = pass_context.AT_W) -> Tensor:
        """Forward and backward over the micro-batches of one step; the mean loss (detached).

        ``sam_pass``: 1 (at w) or 2 (at w + e); the user's ``self.log`` is kept in pass 1 only.
        """
        total = None
        indices = pass_context.batch_indices(self, len(group))
        with pass_context.running(self, sam_pass):
            for batch, batch_idx in zip(group, indices, strict=True):
                loss = module_conversion.pass_loss(self, batch, batch_idx)  # training_step or compute_loss
                if loss.requires_grad:  # False when no active parameter took part in the forward pass
                    self.manual_backward(loss / len(group) if len(group) > 1 else loss)  # type: ignore[attr-defined]
                total = loss.detach() if total is None else total + loss.detach()
        assert total is not None
        return total / len(group) if len(group) > 1 else total

    def _sharpness_callback(self) -> SharpnessAware | None:
        trainer = getattr(self, "_trainer", None)
        return None if trainer is None else find_sharpness_callback(trainer)


def _capturing_monitors(configure_optimizers: Any) -> Any:
    """Wrap a module's ``configure_optimizers``: keep the schedulers' ``monitor`` keys, which Lightning drops
    (with a warning) under manual optimization, so that ``ReduceLROnPlateau`` can still be stepped."""
    if getattr(configure_optimizers, "_captures_monitors", False):
        return configure_optimizers

    @functools.wraps(configure_optimizers)
    def wrapper(self: Any) -> Any:
        conf, monitors = split_monitors(configure_optimizers(self))
        self.__dict__.setdefault("_scheduler_monitors", {}).update(monitors)
        return conf

    wrapper._captures_monitors = True  # type: ignore[attr-defined]
    return wrapper


def _refuse_automatic_only_flags(trainer: Any) -> None:
    clip = getattr(trainer, "gradient_clip_val", None)
    if clip:
        algorithm = getattr(trainer, "gradient_clip_algorithm", None) or "norm"
        key = "clip_grad_value" if algorithm == "value" else "clip_grad_norm"
        raise ValueError(
            f"Trainer(gradient_clip_val={clip}) does not apply to a SharpnessAwareMixin module (manual "
            f"optimization); pass {key}={clip} to the sharpness-aware callback instead, e.g. SLSAM(..., {key}={clip})"
        )
    accumulate = getattr(trainer, "accumulate_grad_batches", 1)
    if accumulate != 1:
        raise ValueError(
            f"Trainer(accumulate_grad_batches={accumulate}) does not apply to a SharpnessAwareMixin module (manual "
            f"optimization); pass accumulate={accumulate} to the sharpness-aware callback instead, "
            f"e.g. SLSAM(..., accumulate={accumulate})"
        )


# --- step helpers (module-private) -----------------------------------------------------------------------
def _grad_scaler(module: Any) -> torch.amp.GradScaler | None:
    plugin = getattr(module.trainer, "precision_plugin", None)
    scaler = getattr(plugin, "scaler", None)
    return scaler if isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled() else None
