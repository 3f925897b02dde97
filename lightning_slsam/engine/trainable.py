"""Which parameters a step may train, read again at every step: the user's ``requires_grad`` and the optimizer's
parameter groups are theirs, never the step's.

The step's layout holds every parameter of the model (``build_arms(..., include_frozen=True)``). A parameter is
*trainable* at a step when, at the step's start, it has ``requires_grad=True`` and the base optimizer holds it in
one of its parameter groups. An arm is *eligible* when it has a trainable parameter. So:

- a layer frozen during training (``BaseFinetuning.freeze``, ``requires_grad_(False)``) is left alone from the next
  step on: no gradient, no ascent, no update;
- a layer unfrozen and added with ``optimizer.add_param_group`` (``BackboneFinetuning``) takes part from the next
  step on, with one gradient per step like every other parameter;
- a parameter outside the optimizer (an optimizer over part of the model) is neither perturbed nor counted in the
  ascent's norm, and a sampler never picks an arm without an optimizer parameter.

During a step the engine sets ``requires_grad`` per pass on the trainable parameters of the active arms only
(:meth:`TrainableSet.enable`), and afterwards puts back exactly the flags the user had (:meth:`TrainableSet.restore`),
also when the step raises.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_slsam.engine.arms import ArmLayout


class TrainableSet:
    """The trainable parameters and eligible arms of ``layout``, refreshed from the model and optimizer each step.

    Args:
        layout: the model's arms, built with ``include_frozen=True`` (a layout of trainable parameters only works
            too; its arms are then all eligible until a parameter is frozen).
        argument: what errors call the optimizer (``base_optimizer`` in ``lightning_slsam.optim``).

    Attributes:
        flags: the user's ``requires_grad`` of each layout parameter, read by the last :meth:`refresh`.
        trainable: bool per layout parameter: ``requires_grad`` and held by the optimizer.
        arms: bool ``(N,)`` on the CPU, the arms with at least one trainable parameter.
        numels: int64 ``(N,)``, the trainable elements of each arm (the active-parameter ratio's units).
        version: how many times the trainable set changed since the first refresh (0 after the first).
    """

    def __init__(self, layout: ArmLayout, argument: str = "optimizer") -> None:
        self.layout = layout
        self.argument = argument
        self._index = {id(p): i for i, p in enumerate(layout.params)}
        #: each layout parameter's arm index, as Python ints (read by enable and params_of at every step)
        self._param_arms: list[int] = layout.param_arm.tolist()
        self.flags: list[bool] = [p.requires_grad for p in layout.params]
        self.trainable: list[bool] = list(self.flags)
        self.arms: Tensor = torch.ones(len(layout), dtype=torch.bool)
        self.numels: Tensor = layout.numels.clone()
        self.version = -1
        #: sparse steps in a row whose pass 1 gave no parameter a gradient (the engine warns after many)
        self.steps_without_gradient = 0
        self._key: tuple[bool, ...] | None = None

    def refresh(self, optimizer: Any) -> bool:
        """Read the user's ``requires_grad`` and the optimizer's parameters; True when the trainable set changed.

        Raises:
            ValueError: the optimizer holds a parameter that is not the model's (its gradient would be the sum
                of both passes'), or no parameter is trainable (nothing would learn).
        """
        params = self.layout.params
        self.flags = [p.requires_grad for p in params]
        held = held_parameters(optimizer)
        foreign = held.keys() - self._index.keys()
        if foreign:
            shapes = ", ".join(str(tuple(held[i].shape)) for i in list(foreign)[:3])
            raise ValueError(
                f"{self.argument}: it holds {len(foreign)} parameter(s) that are not the model's (shapes {shapes}); "
                "the sharpness-aware step perturbs and differentiates the model's parameters only: give the "
                "optimizer the model's parameters, or make the extra tensors parameters of the model"
            )
        trainable = [flag and id(p) in held for flag, p in zip(self.flags, params, strict=True)]
        key = tuple(trainable)
        if key == self._key:
            return False
        if not any(trainable):
            raise ValueError(
                f"{self.argument}: none of its parameters requires grad (every parameter the optimizer holds is "
                "frozen); nothing would train: unfreeze a layer or give the optimizer a trainable parameter"
            )
        self._key = key
        self.trainable = trainable
        arm_index = self.layout.param_arm
        weights = torch.tensor([p.numel() if t else 0 for p, t in zip(params, trainable, strict=True)])
        self.numels = torch.zeros(len(self.layout), dtype=torch.long).index_add_(0, arm_index, weights)
        self.arms = torch.zeros(len(self.layout), dtype=torch.bool).index_fill_(
            0, arm_index[torch.tensor(trainable, dtype=torch.bool)], True
        )
        self.version += 1
        return True

    @property
    def total_numel(self) -> int:
        """Trainable elements in all."""
        return int(self.numels.sum())

    def active_ratio(self, active: Tensor) -> float:
        """Fraction of the trainable elements in the ``active`` arms (the paper's active-parameter ratio)."""
        total = self.total_numel
        return float(self.numels[active.cpu()].sum()) / total if total else 0.0

    def params_of(self, active: Tensor | None) -> list[nn.Parameter]:
        """The trainable parameters of the ``active`` arms (of every arm when None), in layout order."""
        flags = [True] * len(self.layout) if active is None else active.tolist()
        return [
            p
            for p, arm, t in zip(self.layout.params, self._param_arms, self.trainable, strict=True)
            if t and flags[arm]
        ]

    def enable(self, active: Tensor) -> None:
        """``requires_grad`` on the trainable parameters of the ``active`` arms only (bool ``(N,)``, CPU)."""
        flags = active.tolist()
        for p, arm, t in zip(self.layout.params, self._param_arms, self.trainable, strict=True):
            p.requires_grad_(t and flags[arm])

    def restore(self) -> None:
        """Put back the ``requires_grad`` flags the user had at the step's start."""
        for p, flag in zip(self.layout.params, self.flags, strict=True):
            if p.requires_grad != flag:
                p.requires_grad_(flag)


def held_parameters(optimizer: Any) -> dict[int, Tensor]:
    """The parameters of every parameter group of ``optimizer``, by ``id``."""
    return {id(p): p for group in optimizer.param_groups for p in group["params"]}


def check_parameters(named: Iterable[tuple[str, nn.Parameter]], modules: Iterable[tuple[str, nn.Module]]) -> None:
    """Refuse, by name, the parameters the step cannot perturb: complex ones and sparse-gradient embeddings.

    Raises:
        ValueError: naming the parameter or module and what to do instead.
    """
    for name, p in named:
        if p.is_complex():
            raise ValueError(
                f"{name}: complex parameters are not supported by the sharpness-aware step (the ascent's norm and "
                "the update scaling are real); keep the real and imaginary parts as two real parameters"
            )
    for path, module in modules:
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse and module.weight.requires_grad:
            raise ValueError(
                f"{path or type(module).__name__}: {type(module).__name__}(sparse=True) gives sparse gradients, which "
                "the step cannot normalise or perturb; build it with sparse=False (or freeze it)"
            )
