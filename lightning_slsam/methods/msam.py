"""``msam``: Momentum-SAM (Becker et al. 2024, arXiv 2401.12033): one pass per step, at the point the
optimizer's momentum leads to.

Each step the gradient is taken at ``w + e`` with ``e = -rho m / (||m|| + 1e-12)``, where ``m`` is the base
optimizer's momentum (AdamW's ``exp_avg``, SGD's ``momentum_buffer``) after the previous step and the norm runs
over every parameter that has one; ``w`` is restored bitwise after the pass and the optimizer steps from ``w`` with
``g(w + e)``. A parameter without momentum yet (the first step, a group just added) is not moved, so the first
step is a plain step. No second pass, no stored gradient: the step costs one forward and one backward pass and
keeps one copy of the moved weights during the pass (the bitwise restore).

From the authors' code (github.com/MarlonBecker/MSAM): ``optimizer/adamW_msam.py`` keeps the weights at
``w - rho m / ||m||`` between steps (``param.sub_(exp_avgs[i], alpha=norm_factor)`` after the update, with
``norm_factor = rho / (||m|| + 1e-12)`` over the group's ``exp_avg``), so the next gradient is taken there, and
moves back (``param.add_(exp_avg, alpha=norm_factor)``) before the update; ``optimizer/msam.py`` does the same
with SGD's ``momentum_buffer``. Here the move happens at the start of the step and the return is a copy, which is
the same point and the same update (the bitwise restore instead of ``+ e`` is the engine's guarantee).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_slsam.engine.argument_checks import check_rho
from lightning_slsam.engine.arms import ArmLayout
from lightning_slsam.engine.method import Method, PassOne
from lightning_slsam.engine.method_options import MethodOptions
from lightning_slsam.engine.perturbation import NORM_EPS, tensor_norms

#: the optimizer state entries read as the momentum, in order: Adam/AdamW's first moment, SGD's momentum buffer
MOMENTUM_KEYS: tuple[str, ...] = ("exp_avg", "momentum_buffer")


@dataclasses.dataclass(frozen=True)
class MSAMOptions(MethodOptions):
    """Momentum-SAM (Becker et al. 2024): the gradient at ``w - rho m / ||m||``, m the optimizer's momentum; one pass.

    Args:
        rho: perturbation radius, in parameter-space L2 units (>= 0; default 3.0, the value of every MSAM run in
            the authors' README, for SGD and for AdamW, where their SAM runs use 0.2: MSAM's radius is an order of
            magnitude above SAM's, so it does not read the global ``rho`` of the configs). Fine-tuning a
            pretrained transformer needs far less: on noisy SST-2 with MiniLM, 3 and 1 collapsed to chance and
            0.3 trained (docs/methods/msam.md). ``rho=0`` is the base optimizer.

    The base optimizer must keep a momentum: ``exp_avg`` (Adam, AdamW) or ``momentum_buffer`` (SGD with
    ``momentum > 0``).
    """

    name = "msam"

    rho: float = 3.0

    def __post_init__(self) -> None:
        self._set("rho", check_rho(self.rho))

    def build(self, module: nn.Module, layout: ArmLayout) -> Method:
        return MSAMMethod(self.rho)


def momentum_ascent(
    params: Sequence[nn.Parameter], optimizer: Any, rho: float
) -> tuple[list[nn.Parameter], list[Tensor], Tensor] | None:
    """MSAM's move ``w <- w - rho m / (||m|| + 1e-12)`` on ``params``, as ``Method.pass_one_ascent`` returns it.

    ``m`` is each parameter's ``exp_avg`` or ``momentum_buffer`` in ``optimizer.state``; the norm is over every
    parameter of ``params`` that has one, and only those move. A non-finite norm moves nothing (scale 0). None when
    ``rho`` is 0 or no parameter has a momentum yet (the first step).

    Raises:
        ValueError: the optimizer keeps no momentum for these parameters (SGD with ``momentum=0``, Adagrad).
    """
    if rho == 0.0:
        return None
    state = optimizer.state
    moved: list[nn.Parameter] = []
    directions: list[Tensor] = []
    stateful = False
    for p in params:
        entry = state.get(p)
        if not entry:
            continue
        stateful = True
        for key in MOMENTUM_KEYS:
            momentum = entry.get(key)
            if isinstance(momentum, Tensor):
                moved.append(p)
                directions.append(momentum)
                break
    if not moved:
        # SGD without momentum keeps no state at all: its groups' momentum of 0 says so before any step
        if stateful or any(group.get("momentum") == 0 for group in optimizer.param_groups):
            name = type(getattr(optimizer, "optimizer", optimizer)).__name__  # Lightning's wrapper: the user's class
            raise ValueError(
                f"base optimizer: {name} keeps no momentum ({' or '.join(MOMENTUM_KEYS)} in its state); "
                "Momentum-SAM perturbs along it: use AdamW, Adam or SGD with momentum > 0"
            )
        return None
    norm = tensor_norms(directions).to(moved[0].device).norm()
    scale = -rho / (norm + NORM_EPS)
    return moved, directions, torch.where(torch.isfinite(scale), scale, torch.zeros_like(scale))


class MSAMMethod(Method):
    """Momentum-SAM on the shared step: every arm, one pass at ``w + e``; arguments: :class:`MSAMOptions`."""

    name = "msam"
    measures_norms = False  # nothing here reads the gradient norms: the step costs what the base optimizer's does
    ascends_before_pass_one = True

    def pass_one_ascent(
        self, params: Sequence[nn.Parameter], optimizer: Any
    ) -> tuple[list[nn.Parameter], list[Tensor], Tensor] | None:
        return momentum_ascent(params, optimizer, self.rho)

    def pass2_arms(self, first: PassOne) -> None:
        return None
