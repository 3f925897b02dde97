"""``SharpnessAwareMixin``: the manual-optimization training step shared by every method (docs/design.md#step).

The user keeps a ``training_step`` that returns the loss, or writes ``compute_loss(batch)``, and
``configure_optimizers`` (the plain base optimizer); the mixin owns the step Lightning calls
(``module_conversion.py`` says how, in any base order). With a
:class:`~lightning_slsam.callback.SharpnessAware` callback on the Trainer it runs that callback's method;
without one it trains as the base optimizer, one pass per step.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerStatus
from torch import Tensor, nn

from lightning_slsam import module_conversion, pass_context, perturbation
from lightning_slsam.arms import ArmLayout
from lightning_slsam.distributed import all_reduce_mean
from lightning_slsam.lr_schedules import split_monitors, step_schedulers
from lightning_slsam.methods.interface import Method, PassOne
from lightning_slsam.skipped_steps import SkippedSteps, all_finite

if TYPE_CHECKING:
    from lightning_slsam.callback import SharpnessAware


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
        :class:`~lightning_slsam.Plain`, so the module trains as the base optimizer.

        (A module that overrides ``configure_callbacks`` without calling this still trains as the base
        optimizer, through a fallback step that does not step epoch-interval LR schedulers at the last epoch.)
        """
        return self._with_plain_fallback(module_conversion.inherited_callbacks(self, SharpnessAwareMixin))

    def _with_plain_fallback(self, callbacks: list[Any]) -> list[Any]:
        from lightning_slsam.callback import Plain, find_sharpness_callback

        trainer = getattr(self, "_trainer", None)
        return [*callbacks, Plain()] if trainer is not None and find_sharpness_callback(trainer) is None else callbacks

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
        """One micro-batch; every ``accumulate``-th call runs the method's step (docs/design.md#step)."""
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
        method, layout = callback.method, callback.layout
        assert method is not None and layout is not None, "the SharpnessAware callback was not set up"
        optimizer = module.optimizers()
        scaler = _grad_scaler(module)

        # optimizer.zero_grad clears only the optimizer's parameters; a trainable parameter outside it must not
        # carry a stale gradient into this step's norms
        for p in layout.params:
            p.grad = None
        method.begin_step()  # issue 15: a skipped step puts the method back as it is now (discard_step)
        active1 = method.pass1_arms()
        callback.check_arms(active1)
        _set_requires_grad(layout, active1)
        reuse = callback.prefix_reuse if not bool(active1.all()) else None
        try:
            with (
                reuse.record(reuse.owners_of(layout.params_of(active1)))
                if reuse is not None
                else contextlib.nullcontext()
            ):
                loss = self._forward_backward(group)
            first = _measure_pass_one(layout, active1, scaler if method.measures_norms else False)
            # One small host read: a non-finite pass 1 (fp16 overflow) gets neither an ascent nor a pass 2.
            finite = bool(first.finite) if method.measures_norms else True
            finite_pass1 = finite
            active2 = method.pass2_arms(first) if finite else None
            loss2 = None
            if active2 is not None:
                loss2 = self._second_pass(group, method, layout, first, active1, active2, callback)
            elif finite:
                method.single_pass_gradient(first)
        finally:
            _set_requires_grad(layout, None)
            if reuse is not None:
                reuse.clear()

        all_reduce_mean([p.grad for p in layout.params if p.grad is not None])
        # --- issue 15: skip a step whose gradients are not finite, in any pass ---
        # One fused check (and one host read) of the gradients that reach the optimizer, after the method
        # combined them and DDP averaged them (so every rank decides alike). A non-finite pass 1 is known already.
        if finite:
            finite = bool(all_finite(_optimizer_grads(optimizer)))
        global_step = int(module.trainer.global_step)
        # After a non-finite step a GradScaler still gets its step: it finds the inf, skips the update and
        # backs off its scale, as in plain training. Without a scaler the optimizer is not stepped at all.
        if finite or scaler is not None:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_schedulers(module.trainer, "step")
        if finite:
            method.after_step(first)
        else:
            method.discard_step()  # the method learns nothing from a skipped step
        where = "pass 2 (at w + e)" if finite_pass1 and loss2 is not None else "pass 1 (at w)"
        callback.record_step(module, loss, loss2, first, active1, active2)
        callback.record_skip(module, not finite, global_step, where, scaler is not None)
        return loss

    def _plain_step(self, batch: Any) -> Tensor:
        module: Any = self
        optimizer = module.optimizers()
        loss = self._forward_backward([batch])
        # issue 15: a non-finite gradient skips the step here too (see training_step)
        finite = bool(all_finite(_optimizer_grads(optimizer)))
        scaler = _grad_scaler(module)
        global_step = int(module.trainer.global_step)
        if finite or scaler is not None:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_schedulers(module.trainer, "step")
        pass_context.log_unless_user_logged(module, "train/loss", loss, prog_bar=True)
        skipped = module.__dict__.setdefault("_skipped_steps", SkippedSteps(owner=type(module).__name__))
        skipped.record(not finite, global_step, "pass 1 (at w)", scaler is not None)
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

    def _second_pass(
        self,
        group: list[Any],
        method: Method,
        layout: ArmLayout,
        first: PassOne,
        active1: Tensor,
        active2: Tensor,
        callback: SharpnessAware,
    ) -> Tensor:
        """Ascend on ``active2``, differentiate at w + e, restore w bitwise, combine the gradients."""
        on_both = active2 & active1
        params = [p for p in layout.params_of(on_both) if p.grad is not None]
        grads = [p.grad for p in params]
        first_grads = [g.clone() for g in grads] if method.keeps_first_gradient else None
        saved = perturbation.save(params)
        with torch.no_grad():
            raw_norm = first.norm_over(on_both, local=True) * first.grad_scale
            ascent = method.perturbation(params, grads, raw_norm)
            perturbation.apply(params, ascent)
        del ascent, grads
        for p in params:
            p.grad = None
        try:
            if not torch.equal(active2, active1):
                _set_requires_grad(layout, active2)
            # the calls below the lowest active module of pass 1 give the same outputs at w + e: replay them
            reuse = callback.prefix_reuse if not bool((active2 & ~active1).any()) else None
            with callback.second_pass_context(), reuse.replay() if reuse is not None else contextlib.nullcontext():
                loss2 = self._forward_backward(group, pass_context.PERTURBED)
        finally:  # w is restored even when pass 2 raises (KeyboardInterrupt, OOM, a bug in compute_loss)
            perturbation.restore(params, saved)
        method.combine(params, first_grads, first)
        return loss2

    def _sharpness_callback(self) -> SharpnessAware | None:
        from lightning_slsam.callback import find_sharpness_callback

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
def _set_requires_grad(layout: ArmLayout, active: Tensor | None) -> None:
    """``requires_grad`` on the parameters of the active arms only (all arms when ``active`` is None)."""
    if active is None:
        for p in layout.params:
            p.requires_grad_(True)
        return
    for arm, on in zip(layout.arms, active.tolist(), strict=True):
        for p in arm.params:
            p.requires_grad_(on)


def _optimizer_grads(optimizer: Any) -> list[Tensor]:
    """The gradients the optimizer is about to see (its parameters' ``grad``, where not None)."""
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def _grad_scaler(module: Any) -> torch.amp.GradScaler | None:
    plugin = getattr(module.trainer, "precision_plugin", None)
    scaler = getattr(plugin, "scaler", None)
    return scaler if isinstance(scaler, torch.amp.GradScaler) and scaler.is_enabled() else None


def _measure_pass_one(layout: ArmLayout, active: Tensor, scaler: torch.amp.GradScaler | bool | None) -> PassOne:
    """Per-arm L2 norms of the pass-1 gradients, unscaled; one foreach kernel, no host sync.

    ``scaler=False`` skips the norms (methods that never look at them, such as ``base``): zeros, finite.
    """
    params: list[nn.Parameter] = []
    arms: list[int] = []
    for index, (arm, on) in enumerate(zip(layout.arms, active.tolist(), strict=True)):
        if on:
            for p in arm.params:
                if p.grad is not None:
                    params.append(p)
                    arms.append(index)
    device = params[0].device if params else layout.params[0].device
    arm_of_param = torch.tensor(arms, dtype=torch.long).to(device, non_blocking=True)
    if scaler is False:
        zeros = torch.zeros(len(layout), device=device)
        finite = torch.ones((), dtype=torch.bool, device=device)
        return PassOne(active, params, arm_of_param, zeros, zeros.new_ones(()), finite, zeros)
    tensor_norms = perturbation.tensor_norms([p.grad for p in params]).to(device)
    raw = perturbation.arm_norms(tensor_norms, arm_of_param, len(layout))
    scale = scaler._scale if scaler is not None and scaler._scale is not None else None
    grad_scale = scale.to(device=device, dtype=torch.float32) if scale is not None else raw.new_ones(())
    local = raw / grad_scale
    shared = local.clone()
    all_reduce_mean([shared])  # rank-mean (N floats): every rank decides and learns from the same norms
    return PassOne(active, params, arm_of_param, shared, grad_scale, torch.isfinite(shared).all(), local)
