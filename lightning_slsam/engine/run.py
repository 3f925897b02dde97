"""``Run``: one model attached to one method's step, held by both adapters between steps.

The Lightning callback (``callback.py``) and the plain-PyTorch optimizers (``optim.py``) differ in how they compute
a loss, differentiate it and step the optimizer; everything else they hold is here, once: the arms, the method, the
trainable set (``trainable.py``), the perturbation guard, the BatchNorm layers of pass 2, the attention-input hooks,
the prefix replay, clipping, and the method's checkpoint state with the checks that it fits. No Lightning import.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_slsam.engine import attention_inputs
from lightning_slsam.engine.arms import ArmLayout
from lightning_slsam.engine.distributed import all_reduce_mean
from lightning_slsam.engine.method import Method
from lightning_slsam.engine.perturbation import PerturbationGuard
from lightning_slsam.engine.prefix_reuse import PrefixReuse
from lightning_slsam.engine.sharding import check_not_fsdp1, sharding_of
from lightning_slsam.engine.step import StepResult, batch_norms, frozen_running_stats, run_step
from lightning_slsam.engine.step_options import StepOptions
from lightning_slsam.engine.trainable import TrainableSet, check_parameters


class Run:
    """The engine's state for one model trained with one method.

    Args:
        model: the bare model (not a DDP or Fabric wrapper): its hooks and BatchNorm layers.
        layout: its arms, built with ``include_frozen=True`` (every parameter; which ones train is read each step).
        method: the method, ``setup(layout)`` done.
        step_options: the shared step's options (BatchNorm, clipping, prefix replay).
        optimizer: the base optimizer, whose parameter groups say which parameters train.
        owner: the name errors start with (the callback's or optimizer's class).
        optimizer_argument: what errors call the optimizer (default ``optimizer``).

    Raises:
        ValueError: a parameter the step cannot perturb (complex, a sparse embedding), an optimizer parameter
            outside the model, or nothing to train; the message names it.
    """

    def __init__(
        self,
        model: nn.Module,
        layout: ArmLayout,
        method: Method,
        step_options: StepOptions,
        optimizer: Any,
        owner: str,
        optimizer_argument: str = "optimizer",
    ) -> None:
        self.owner = owner
        check_parameters(model.named_parameters(), model.named_modules())
        self.model = model
        self.layout = layout
        self.method = method
        self.step_options = step_options
        #: the FSDP2 shard group of the parameters, or None (one device, DDP)
        check_not_fsdp1(model, owner)
        self.sharding = sharding_of(layout.params, owner)
        if self.sharding is not None and not method.shardable:
            raise ValueError(
                f"{owner}: method {method.name!r} is not supported on FSDP2-sharded parameters (it computes "
                "whole-tensor statistics of its own); use sam, slsam, slsam_plus, slsam_noisy, slsam_uniform, rst "
                "or base"
            )
        #: which parameters train at this step (the user's ``requires_grad`` and the optimizer's groups)
        self.trainable = TrainableSet(layout, optimizer_argument)
        self.trainable.refresh(optimizer)
        method.set_trainable(self.trainable.arms)
        #: the values at ``w`` of the weights a step has perturbed, while they are perturbed
        self.guard = PerturbationGuard()
        self.batch_norms = batch_norms(model)
        self._hooks = attention_inputs.install(model)
        #: the pass-2 replay of pass 1's prefix calls, for methods whose pass 1 leaves arms out
        self.prefix_reuse: PrefixReuse | None = None
        if step_options.reuse_prefix and method.sparse_pass_one:
            self.prefix_reuse = PrefixReuse(model, replayable=self.replayable)

    # --- one step ------------------------------------------------------------------------------------------
    def step(
        self,
        forward_backward: Callable[[int], Tensor],
        optimizer: Any,
        step_optimizer: Callable[[], None],
        *,
        scaler: torch.amp.GradScaler | None = None,
        after_optimizer_step: Callable[[], None] | None = None,
        all_reduce: Callable[[Sequence[Tensor]], None] = all_reduce_mean,
        check_arms: Callable[[Tensor], None] | None = None,
    ) -> StepResult:
        """One whole step (:func:`lightning_slsam.engine.step.run_step`) with this run's state."""
        return run_step(
            self.layout,
            self.method,
            forward_backward,
            optimizer,
            step_optimizer,
            scaler=scaler,
            after_optimizer_step=after_optimizer_step,
            all_reduce=all_reduce,
            check_arms=check_arms,
            prefix_reuse=self.prefix_reuse,
            second_pass_context=self.second_pass_context,
            trainable=self.trainable,
            guard=self.guard,
            sharding=self.sharding,
        )

    @contextlib.contextmanager
    def second_pass_context(self) -> Iterator[None]:
        """During pass 2: BatchNorm layers normalise with batch statistics but do not update running ones
        (``bn_running_stats="pass1"``)."""
        with frozen_running_stats(self.batch_norms if self.step_options.bn_running_stats == "pass1" else []):
            yield

    def replayable(self, module: nn.Module) -> bool:
        """Pass 2 may skip ``module``'s call unless it is a BatchNorm that updates running stats in pass 2."""
        bn = isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training and module.track_running_stats
        return not (bn and self.step_options.bn_running_stats == "both")

    def clip(self, optimizer: Any) -> None:
        """Clip the gradients the optimizer is about to see (``clip_grad_value``, then ``clip_grad_norm``); they
        must be unscaled."""
        value, norm = self.step_options.clip_grad_value, self.step_options.clip_grad_norm
        if value is None and norm is None:
            return
        grads = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if value is not None:
            torch.nn.utils.clip_grad_value_(grads, value)
        if norm is not None:
            torch.nn.utils.clip_grad_norm_(grads, norm)

    def active_ratio(self, active: Tensor) -> float:
        """Fraction of the trainable elements in the ``active`` arms."""
        return self.trainable.active_ratio(active)

    # --- interruptions and checkpoints ---------------------------------------------------------------------
    def recover(self) -> None:
        """After an interrupted step: ``w`` back if the weights were perturbed, and the user's ``requires_grad``
        flags back (idempotent; the step's own ``finally`` does both, this covers an interrupt inside it)."""
        self.guard.restore()
        self.trainable.restore()

    def patch_state_dict(self, state_dict: dict[str, Any]) -> int:
        """In a model ``state_dict`` taken during a step, the perturbed weights at their values at ``w``."""
        return self.guard.patch_state_dict(state_dict)

    def state_dict(self) -> dict[str, Any]:
        """The method's name, the arms' fingerprint and the method's state."""
        return {"method": self.method.name, "arms": self.layout.fingerprint(), "method_state": self.method.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; refuses another method's, another model's or a damaged state."""
        if not isinstance(state, dict) or "method_state" not in state:
            keys = sorted(state)[:4] if isinstance(state, dict) else type(state).__name__
            raise ValueError(
                f"state_dict: {self.owner} takes the dict its own state_dict() returned (keys method, arms, "
                f"method_state, ...), got {keys}"
                + (" (a base optimizer's state_dict?)" if isinstance(state, dict) and "param_groups" in state else "")
            )
        if state.get("method") != self.method.name:
            raise ValueError(
                f"state_dict: written by method {state.get('method')!r}, this {self.owner} runs {self.method.name!r}; "
                "resume with the same method or load only the weights"
            )
        if state.get("arms") != self.layout.fingerprint():
            saved = state.get("arms") or {}
            raise ValueError(
                f"state_dict: its arms ({saved.get('mode')!r}, {len(saved.get('names', []))} arms) do not match "
                f"this model's ({self.layout.mode!r}, {len(self.layout)} arms); use the same arms= and model "
                f"({self.owner})"
            )
        try:
            self.method.load_state_dict(state["method_state"])
        except KeyError as missing:
            raise ValueError(
                f"state_dict: the method state has no {missing} entry; pass what {self.owner}.state_dict() returned"
            ) from None

    def close(self) -> None:
        """Remove the hooks this run put on the model (attention inputs, prefix replay); weights back at ``w``."""
        self.recover()
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        if self.prefix_reuse is not None:
            self.prefix_reuse.remove()
            self.prefix_reuse = None
