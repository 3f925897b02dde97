"""The small interface every method implements on the shared two-pass step (docs/design.md#step, #methods).

The step itself lives in :mod:`lightning_slsam.engine.step` (run by the mixin and by :mod:`lightning_slsam.optim`).
Per step, a method decides:

0. ``start_epoch(start)``: once per epoch, with an :class:`EpochStart` (SSAM's mask refresh, ARSAM's warm-up);
1. ``pass1_arms()``: which arms take part in pass 1 (at w; at w + e for a method that ascends before pass 1,
   ``pass_one_ascent``);
2. ``pass2_arms(first)``: after pass 1, which arms are perturbed and take part in pass 2 (at w + e), or
   ``None`` for a one-pass step;
3. ``perturbation(...)``: the ascent e on those arms;
4. ``combine(...)`` after a two-pass step, ``single_pass_gradient(first)`` after a one-pass step: the
   gradient that reaches the optimizer (default: g(w + e) on the pass-2 arms and g(w) on pass-1 arms
   outside pass 2; g(w) on a one-pass step);
5. ``after_step(first)``: what it learns from the step (SL-SAM's bandit).

A step whose gradients are not finite is skipped (``skipped_steps.py``): ``begin_step()`` runs before
``pass1_arms`` and ``discard_step()`` replaces ``after_step``, so a method puts back whatever the skipped step
changed in its state (random draws included) and learns nothing from it.

Gradients in ``p.grad`` carry the AMP loss scale ``first.grad_scale`` (1 without a GradScaler) until the
optimizer step unscales them; a method that stores a gradient across steps stores it divided by that
scale and multiplies by the current scale when it reuses it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from lightning_slsam.engine.arms import ArmLayout
from lightning_slsam.engine.perturbation import sam_perturbation


@dataclass
class PassOne:
    """What pass 1 measured, handed to the method's decisions.

    Attributes:
        active: bool ``(N,)`` on the CPU, the arms that had ``requires_grad`` in pass 1.
        params: the parameters of those arms that received a gradient, in layout order.
        arm_of_param: int64, the arm index of each entry of ``params`` (on their device).
        arm_norms: float32 ``(N,)`` on the parameters' device: ``||g_i||`` of each active arm, unscaled
            (divided by the AMP loss scale), 0 for inactive arms; under DDP the mean over ranks, so every
            rank's decisions and sampler updates agree.
        grad_scale: the AMP loss scale the raw gradients carry (0-d tensor, 1 without a scaler).
        finite: 0-d bool tensor, whether every entry of ``arm_norms`` is finite (on every rank).
        local_arm_norms: like ``arm_norms`` but of this rank's own gradients (the ascent's norm).
    """

    active: Tensor
    params: list[nn.Parameter]
    arm_of_param: Tensor
    arm_norms: Tensor
    grad_scale: Tensor
    finite: Tensor
    local_arm_norms: Tensor

    def norm_over(self, arms: Tensor, local: bool = False) -> Tensor:
        """``||g||`` over the given arms (bool ``(N,)``), unscaled, as a 0-d float32 tensor.

        ``local=True`` uses this rank's own norms instead of the rank mean.
        """
        norms = self.local_arm_norms if local else self.arm_norms
        return torch.where(arms.to(norms.device), norms, 0.0).square().sum().sqrt()


@dataclass(frozen=True)
class EpochStart:
    """What a method is told at the start of a training epoch: by the callback from the Trainer, or by
    :meth:`lightning_slsam.optim.SharpnessAwareOptimizer.start_epoch` in a plain loop.

    Attributes:
        epoch: the epoch about to begin, 0-based.
        total_epochs: the epochs the run lasts (``max_epochs``, or estimated from ``max_steps``); None when
            unbounded or unknown.
        module: the model being trained (None when the caller has none to give).
        draw_samples: ``n -> batches`` holding the first ``n`` samples of a fresh pass over the training data,
            on the model's device (SSAM-F's Fisher samples); None when no training data was given.
        loss_of: the scalar loss of one batch; None means ``module.compute_loss`` (as under the Trainer).
    """

    epoch: int
    total_epochs: int | None = None
    module: nn.Module | None = None
    draw_samples: Callable[[int], list[Any]] | None = None
    loss_of: Callable[[Any], Tensor] | None = None


class Method:
    """Base class of all methods; the defaults describe SAM on every arm.

    Subclasses set ``name`` and override the decisions they change. ``setup`` is called once the model's
    arms are known, before the first step.
    """

    name: ClassVar[str] = "sam"
    #: whether ``combine`` needs the pass-1 gradients of the pass-2 arms (the step keeps a copy); read
    #: every step after ``pass2_arms``, so a method may set it per step on the instance
    keeps_first_gradient: bool = False
    #: whether the step measures per-arm pass-1 gradient norms (False only for one-pass methods that never
    #: look at them, so that ``base`` costs exactly a plain step)
    measures_norms: ClassVar[bool] = True
    #: whether pass 1 can leave arms out, so that pass 2 may replay the calls below the lowest active module
    #: (``prefix_reuse.py``); False for methods whose pass 1 always differentiates every arm
    sparse_pass_one: ClassVar[bool] = False
    #: whether the method is exact on FSDP2-sharded parameters (``sharding.py``): its ascent and gradient use only
    #: elementwise arithmetic on the local shards and the global norms of ``PassOne``. A method that computes a
    #: norm or a statistic of its own over a whole tensor is not, and is refused on a sharded model
    shardable: bool = False
    #: whether pass 1 runs at a point ``w + e`` chosen before it, from state the method or the optimizer already
    #: holds (:meth:`pass_one_ascent`: Momentum-SAM's momentum); False for every method whose pass 1 is at ``w``
    ascends_before_pass_one: ClassVar[bool] = False

    def __init__(self, rho: float) -> None:
        self.rho = float(rho)  # checked by the method's options (methods/options.py)
        self.layout: ArmLayout | None = None
        self.all_arms: Tensor = torch.ones(0, dtype=torch.bool)

    def setup(self, layout: ArmLayout) -> None:
        """Bind to the model's arms; called once before training."""
        self.layout = layout
        self.all_arms = torch.ones(len(layout), dtype=torch.bool)

    def set_trainable(self, arms: Tensor) -> None:
        """The arms that have a trainable parameter (bool ``(N,)`` on the CPU; ``trainable.py``).

        Called before the first step and again whenever the set changes (a layer frozen or unfrozen, a parameter
        group added to the optimizer); the step also leaves every other arm out of both passes. The default makes
        them :attr:`all_arms`, the arms of a dense pass. Idempotent.
        """
        self.all_arms = arms.clone()

    def start_epoch(self, start: EpochStart) -> None:
        """Called at the start of every training epoch (before its first step)."""

    # --- decisions of one step -------------------------------------------------------------------------
    def pass1_arms(self) -> Tensor:
        """The arms with gradients in pass 1 (bool ``(N,)`` on the CPU)."""
        return self.all_arms

    def pass_one_ascent(
        self, params: Sequence[nn.Parameter], optimizer: Any
    ) -> tuple[list[nn.Parameter], list[Tensor], Tensor] | None:
        """Where pass 1 runs, for a method with :attr:`ascends_before_pass_one`: ``(moved, directions, scale)``
        puts each ``moved[i]`` at ``w + scale * directions[i]`` for pass 1 (``scale`` a 0-d float32 tensor on the
        parameters' device, so no value goes to the host); None runs pass 1 at ``w``.

        ``params`` are the trainable parameters of pass 1's arms; ``optimizer`` is the base optimizer (its
        ``state`` holds the momentum). The step keeps ``w`` in the guard and restores it bitwise right after
        pass 1, before any gradient is read, so ``directions`` may be the optimizer's own state tensors.
        """
        return None

    def pass2_arms(self, first: PassOne) -> Tensor | None:
        """The arms perturbed and differentiated in pass 2, or None for a one-pass step."""
        return first.active

    def perturbation(self, params: Sequence[nn.Parameter], grads: Sequence[Tensor], grad_norm: Tensor) -> list[Tensor]:
        """The ascent e for ``params`` given their raw pass-1 ``grads`` and ``grad_norm`` = ``||grads||``.

        ``grads`` may carry the AMP loss scale; ``grad_norm`` carries the same scale, so ``g / ||g||`` is
        exact. The step discards ``grads`` afterwards unless ``keeps_first_gradient``, so the default
        scales them in place.
        """
        return sam_perturbation(grads, self.rho, grad_norm, in_place=not self.keeps_first_gradient)

    def combine(self, params: Sequence[nn.Parameter], first_grads: Sequence[Tensor] | None, first: PassOne) -> None:
        """Turn ``p.grad`` (g at w + e for ``params``, the pass-2 params) into the gradient the optimizer sees.

        ``first_grads`` are their pass-1 gradients when ``keeps_first_gradient`` was set, else None.
        """

    def single_pass_gradient(self, first: PassOne) -> None:
        """After a one-pass step: turn ``p.grad`` (g at w for ``first.params``) into the optimizer's gradient."""

    def after_step(self, first: PassOne) -> None:
        """Learn from the finished step (called after the optimizer step, only when the step was taken)."""

    # --- skipped steps ---------------------------------------------------------------------------------
    def begin_step(self) -> None:
        """Called before ``pass1_arms``: remember the state this step may change, for ``discard_step``.

        Keep it cheap (references, counters, a CPU generator's state): it runs every step.
        """

    def discard_step(self) -> None:
        """The step was skipped (non-finite gradients); called instead of ``after_step``.

        Put back the state ``begin_step`` saw, so that the skipped step leaves no trace in the method.
        """

    # --- reporting and checkpoints ---------------------------------------------------------------------
    def probabilities(self) -> Tensor | None:
        """Per-arm sampling probabilities, for methods that sample arms."""
        return None

    def state_dict(self) -> dict[str, Any]:
        """State needed to resume exactly."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
