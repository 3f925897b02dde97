"""One whole sharpness-aware optimizer step, without Lightning (docs/design.md#step).

:func:`run_step` runs the step every method shares, in this order:

1. clear the arms' gradients, ``method.begin_step()``, ``method.pass1_arms()``; ``requires_grad`` on those arms;
2. pass 1 at the weights ``w`` (``forward_backward(1)``), recording the calls below the lowest active module when
   pass 1 leaves arms out (``prefix_reuse.py``); a method that ascends before pass 1 (``pass_one_ascent``:
   Momentum-SAM) runs it at ``w + e`` instead, with ``w`` restored bitwise right after it;
3. the per-arm gradient norms of pass 1, unscaled (:func:`measure_pass_one`); a non-finite pass 1 gets neither
   an ascent nor a pass 2;
4. ``method.pass2_arms(first)``: a two-pass step ascends to ``w + e`` on those arms, runs pass 2
   (``forward_backward(2)``, replaying the prefix when pass 2 adds no arm below it), restores ``w`` bitwise in a
   ``finally`` and lets the method ``combine`` the gradients; a one-pass step calls ``single_pass_gradient``;
5. the gradients the optimizer sees are averaged over ranks (``all_reduce``) and checked for NaN/inf in one fused
   kernel (``skipped_steps.all_finite``);
6. ``step_optimizer()`` when they are finite, or when a GradScaler is there to find the inf itself; then
   ``optimizer.zero_grad(set_to_none=True)`` and ``after_optimizer_step()`` (the adapters' LR schedulers);
7. ``method.after_step(first)``, or ``method.discard_step()`` after a skipped step.

The adapters supply what differs: :mod:`lightning_slsam.lightning_adapter.mixin` (Lightning's ``manual_backward``,
the optimizer step through ``LightningOptimizer`` and its precision plugin, the callback's logging) and
:mod:`lightning_slsam.optim` (a closure, ``loss.backward`` or ``fabric.backward``, a GradScaler). This module
imports nothing from Lightning.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_slsam.engine import perturbation
from lightning_slsam.engine.arms import ArmLayout
from lightning_slsam.engine.distributed import all_reduce_mean
from lightning_slsam.engine.method import Method, PassOne
from lightning_slsam.engine.perturbation import PerturbationGuard
from lightning_slsam.engine.prefix_reuse import PrefixReuse
from lightning_slsam.engine.sharding import Sharding, locals_of
from lightning_slsam.engine.skipped_steps import all_finite
from lightning_slsam.engine.trainable import TrainableSet

#: ``sam_pass`` numbers handed to ``forward_backward`` (the same as ``pass_context.AT_W`` / ``PERTURBED``)
AT_W = 1
PERTURBED = 2

#: ``where`` of a step whose pass 1 (or a one-pass step) was not finite, and of a two-pass step's pass 2
PASS_ONE = "pass 1 (at w)"
PASS_TWO = "pass 2 (at w + e)"


@dataclass
class StepResult:
    """What one step did.

    Attributes:
        loss: the loss at ``w`` (pass 1), detached.
        loss_perturbed: the loss at ``w + e`` (pass 2), detached; None on a one-pass step.
        first: what pass 1 measured (per-arm norms, AMP scale, finiteness).
        active1: bool ``(N,)`` on the CPU, the arms with gradients in pass 1.
        active2: the arms perturbed and differentiated in pass 2; None on a one-pass step.
        skipped: whether the step was skipped for non-finite gradients (weights and method state unchanged).
        where: which gradients decided a skip: ``"pass 1 (at w)"`` or ``"pass 2 (at w + e)"``.
    """

    loss: Tensor
    loss_perturbed: Tensor | None
    first: PassOne
    active1: Tensor
    active2: Tensor | None
    skipped: bool
    where: str

    @property
    def passes(self) -> int:
        """Forward-backward passes this step ran: 1 or 2."""
        return 1 if self.loss_perturbed is None else 2


def run_step(
    layout: ArmLayout,
    method: Method,
    forward_backward: Callable[[int], Tensor],
    optimizer: Any,
    step_optimizer: Callable[[], None],
    *,
    scaler: torch.amp.GradScaler | None = None,
    after_optimizer_step: Callable[[], None] | None = None,
    all_reduce: Callable[[Sequence[Tensor]], None] = all_reduce_mean,
    check_arms: Callable[[Tensor], None] | None = None,
    prefix_reuse: PrefixReuse | None = None,
    second_pass_context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
    trainable: TrainableSet | None = None,
    guard: PerturbationGuard | None = None,
    sharding: Sharding | None = None,
) -> StepResult:
    """Run one whole step of ``method`` on the arms ``layout`` (the order is in the module docstring).

    Args:
        layout: the model's arms (``arms.build_arms``); ``method.setup(layout)`` was called.
        method: the method deciding the arms, the ascent and the gradient.
        forward_backward: ``forward_backward(sam_pass)`` computes the loss of the step's batch at the current
            weights, calls backward on it (scaled when a GradScaler is used; skipping backward when the loss
            does not require a gradient) and returns it detached. ``sam_pass`` is 1 (at ``w``) or 2 (at ``w + e``).
        optimizer: the base optimizer (anything with ``param_groups`` and ``zero_grad``).
        step_optimizer: steps the optimizer once (with a GradScaler: unscale, clip, ``scaler.step``, ``update``).
        scaler: the enabled GradScaler whose scale the gradients carry, or None.
        after_optimizer_step: called after the optimizer step and ``zero_grad`` (the adapter's LR schedulers).
        all_reduce: averages gradients and norms over data-parallel ranks in place (default: a no-op outside an
            initialised process group of several processes).
        check_arms: called with pass 1's arms (the rank-consistency check), or None.
        prefix_reuse: the pass-2 replay of pass 1's prefix calls, for methods whose pass 1 leaves arms out.
        second_pass_context: a context manager factory around pass 2 (BatchNorm running statistics frozen).
        trainable: the model's trainable parameters, refreshed here from ``requires_grad`` and the optimizer's
            parameter groups (``trainable.py``); keep one across steps (default: a new one each step).
        guard: where the step keeps ``w`` while the weights are perturbed (``perturbation.PerturbationGuard``);
            keep one across steps so that a checkpoint taken mid-step can read it (default: a new one).
        sharding: the FSDP2 shard group of the layout's parameters (``sharding.sharding_of``), or None. With it
            the norms are summed over the shard group, the arithmetic acts on the local shards, the finite flag
            is agreed over ranks and ``all_reduce`` is not called (FSDP2 reduced the gradients).

    Returns:
        What the step did (:class:`StepResult`).
    """
    if trainable is None:
        trainable = TrainableSet(layout)
    if trainable.refresh(optimizer):
        method.set_trainable(trainable.arms)
    if guard is None:
        guard = PerturbationGuard()
    # optimizer.zero_grad clears only the optimizer's parameters; any other parameter of the layout must not
    # carry a stale gradient into this step's norms, nor add it to pass 2's
    for p in layout.params:
        p.grad = None
    method.begin_step()  # a skipped step puts the method back as it is now (discard_step)
    active1 = method.pass1_arms() & trainable.arms
    if check_arms is not None:
        check_arms(active1)
    reuse = prefix_reuse if not bool(active1.all()) else None
    try:
        trainable.enable(active1)
        with (
            reuse.record(reuse.owners_of(trainable.params_of(active1)))
            if reuse is not None
            else contextlib.nullcontext()
        ):
            loss = _pass_one(method, forward_backward, optimizer, trainable, active1, guard)
        first = measure_pass_one(
            layout, active1, scaler if method.measures_norms else False, all_reduce, sharding=sharding
        )
        _check_gradients_arrived(first, active1, trainable)
        # One small host read: a non-finite pass 1 (fp16 overflow) gets neither an ascent nor a pass 2.
        finite = bool(first.finite) if method.measures_norms else True
        finite_pass1 = finite
        active2 = method.pass2_arms(first) if finite else None
        if active2 is not None:
            active2 = active2 & trainable.arms
        loss2 = None
        if active2 is not None:
            loss2 = _second_pass(
                layout,
                method,
                forward_backward,
                first,
                active1,
                active2,
                prefix_reuse,
                second_pass_context,
                trainable,
                guard,
            )
        elif finite:
            method.single_pass_gradient(first)
    finally:
        guard.restore()  # a no-op unless an exception left a perturbation live
        trainable.restore()
        if reuse is not None:
            reuse.clear()

    if sharding is None:  # FSDP2 reduced the gradients it computed (and no others) in each backward pass
        all_reduce([p.grad for p in layout.params if p.grad is not None])
    # Skip a step whose gradients are not finite, in any pass: one fused check (and one host read) of the
    # gradients that reach the optimizer, after the method combined them and DDP averaged them (so every rank
    # decides alike; sharded gradients are checked shard by shard and the flag agreed over ranks). A
    # non-finite pass 1 is known already.
    if finite:
        finite_here = all_finite(locals_of(optimizer_grads(optimizer)))
        finite = sharding.all_ranks(finite_here) if sharding is not None else bool(finite_here)
    # After a non-finite step a GradScaler still gets its step: it finds the inf, skips the update and
    # backs off its scale, as in plain training. Without a scaler the optimizer is not stepped at all.
    if finite or scaler is not None:
        step_optimizer()
    optimizer.zero_grad(set_to_none=True)
    if after_optimizer_step is not None:
        after_optimizer_step()
    if finite:
        method.after_step(first)
    else:
        method.discard_step()  # the method learns nothing from a skipped step
    where = PASS_TWO if finite_pass1 and loss2 is not None else PASS_ONE
    return StepResult(loss, loss2, first, active1, active2, not finite, where)


#: sparse steps in a row without any gradient after which the step warns that the loss may be detached
NO_GRADIENT_WARN_STEPS = 20

_DETACHED = (
    "the loss was computed under torch.no_grad() or inference_mode, or detached (.detach(), .item()); return the "
    "loss as computed, the step differentiates it itself"
)


def _check_gradients_arrived(first: PassOne, active: Tensor, trainable: TrainableSet) -> None:
    """A dense pass 1 without a single gradient cannot train: refuse it. A sparse one may have sampled only
    unused parameters (an idle head); that many in a row gets a warning."""
    if first.params:
        trainable.steps_without_gradient = 0
        return
    if torch.equal(active, trainable.arms):
        raise RuntimeError(f"loss: no trainable parameter received a gradient: {_DETACHED}")
    trainable.steps_without_gradient += 1
    if trainable.steps_without_gradient == NO_GRADIENT_WARN_STEPS:
        warnings.warn(
            f"loss: no sampled parameter received a gradient in {NO_GRADIENT_WARN_STEPS} steps in a row; unless "
            f"most of the model is unused, {_DETACHED}",
            stacklevel=3,
        )


def _pass_one(
    method: Method,
    forward_backward: Callable[[int], Tensor],
    optimizer: Any,
    trainable: TrainableSet,
    active1: Tensor,
    guard: PerturbationGuard,
) -> Tensor:
    """Pass 1 at ``w``, or, for a method that ascends before it (``Method.pass_one_ascent``: Momentum-SAM), at
    ``w + e``: ``w`` is copied into ``guard`` before the move and put back bitwise in a ``finally`` right after
    the pass, so the gradients, the method and the optimizer step all see ``w``."""
    if not method.ascends_before_pass_one:
        return forward_backward(AT_W)
    ascent = method.pass_one_ascent(trainable.params_of(active1), optimizer)
    if ascent is None or not ascent[0]:
        return forward_backward(AT_W)
    moved, directions, scale = ascent
    guard.hold(moved, perturbation.save(moved))
    try:
        with torch.no_grad():
            # w + scale * d one tensor at a time (the 0-d scale broadcasts): no list of e the size of the model
            torch._foreach_addcmul_(moved, directions, [scale] * len(moved))
        return forward_backward(AT_W)
    finally:
        guard.restore()


def _second_pass(
    layout: ArmLayout,
    method: Method,
    forward_backward: Callable[[int], Tensor],
    first: PassOne,
    active1: Tensor,
    active2: Tensor,
    prefix_reuse: PrefixReuse | None,
    second_pass_context: Callable[[], contextlib.AbstractContextManager[Any]],
    trainable: TrainableSet,
    guard: PerturbationGuard,
) -> Tensor:
    """Ascend on ``active2``, differentiate at w + e, restore w bitwise, combine the gradients.

    From the copy of ``w`` on, ``guard`` holds it: whatever interrupts the pass (an exception, Ctrl-C, a signal
    handler that saves a checkpoint) finds the true weights there, and the ``finally`` puts them back.
    """
    on_both = active2 & active1
    params = [p for p in layout.params_of(on_both) if p.grad is not None]
    values = locals_of(params)  # the parameters themselves, or their local shards under FSDP2
    grads = locals_of([p.grad for p in params])
    first_grads = [g.clone() for g in grads] if method.keeps_first_gradient else None
    saved = perturbation.save(values)
    guard.hold(values, saved)
    try:
        with torch.no_grad():
            raw_norm = first.norm_over(on_both, local=True) * first.grad_scale
            if params:
                perturbation.apply(values, method.perturbation(values, grads, raw_norm))
        del grads
        for p in params:
            p.grad = None
        if not torch.equal(active2, active1):
            trainable.enable(active2)
        # the calls below the lowest active module of pass 1 give the same outputs at w + e: replay them
        reuse = prefix_reuse if not bool((active2 & ~active1).any()) else None
        with second_pass_context(), reuse.replay() if reuse is not None else contextlib.nullcontext():
            loss2 = forward_backward(PERTURBED)
    finally:  # w is restored even when pass 2 raises (KeyboardInterrupt, OOM, a bug in the loss)
        guard.restore()
    method.combine(params, first_grads, first)
    return loss2


def optimizer_grads(optimizer: Any) -> list[Tensor]:
    """The gradients the optimizer is about to see (its parameters' ``grad``, where not None)."""
    return [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]


def measure_pass_one(
    layout: ArmLayout,
    active: Tensor,
    scaler: torch.amp.GradScaler | bool | None,
    all_reduce: Callable[[Sequence[Tensor]], None] = all_reduce_mean,
    *,
    sharding: Sharding | None = None,
) -> PassOne:
    """Per-arm L2 norms of the pass-1 gradients, unscaled; one foreach kernel, no host sync.

    ``scaler=False`` skips the norms (methods that never look at them, such as ``base``): zeros, finite.
    Under DDP the norms that decide are the rank mean of each rank's own; under FSDP2 (``sharding``) the
    gradients are already the ranks' mean and the norms are those of the whole tensors (local shards' squares
    summed over the shard group), the same as ``local_arm_norms``.
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
    tensor_norms = perturbation.tensor_norms(locals_of([p.grad for p in params])).to(device)
    raw = perturbation.arm_norms(tensor_norms, arm_of_param, len(layout))
    if sharding is not None:
        raw = sharding.arm_norms(raw.square())
    scale = scaler._scale if scaler is not None and scaler._scale is not None else None
    grad_scale = scale.to(device=device, dtype=torch.float32) if scale is not None else raw.new_ones(())
    local = raw / grad_scale
    shared = local.clone()
    if sharding is None:
        all_reduce([shared])  # rank-mean (N floats): every rank decides and learns from the same norms
    return PassOne(active, params, arm_of_param, shared, grad_scale, torch.isfinite(shared).all(), local)


def batch_norms(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers of ``module``, in ``modules()`` order."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def frozen_running_stats(layers: Sequence[nn.modules.batchnorm._BatchNorm]) -> Iterator[None]:
    """For the block: training BatchNorm layers normalise with batch statistics but leave their running
    statistics alone (pass 2 with ``bn_running_stats="pass1"``)."""
    frozen = [m for m in layers if m.training and m.track_running_stats]
    for m in frozen:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in frozen:
            m.track_running_stats = True
