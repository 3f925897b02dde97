"""``lagnp``: layer-wise gradient-norm penalising (Lee 2025, arXiv 2503.14205).

Pass 1 runs on every arm. The ``layer_fraction`` of arms with the largest pass-1 gradient norms (at
least one) are perturbed with ``rho g/||g||`` (norm over those arms) and are the only arms in pass 2, so
the second backward stops early when they sit near the output. Their gradient is the mix
``(1 - alpha) g(w) + alpha g(w + e)``; every other arm keeps ``g(w)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_slsam.engine.argument_checks import check_fraction, check_int, check_rho
from lightning_slsam.engine.arms import ArmLayout
from lightning_slsam.engine.method import Method, PassOne
from lightning_slsam.engine.method_options import MethodOptions


@dataclasses.dataclass(frozen=True)
class LayerwiseGNPOptions(MethodOptions):
    """Layer-wise gradient-norm penalising (Lee 2025): perturb only the arms with the largest gradients.

    Pass 1 on every arm; the ``layer_fraction`` of arms with the largest gradient norms are perturbed and
    are the only arms in pass 2; they get ``(1 - alpha) g(w) + alpha g(w + e)``, the rest ``g(w)``. Its arms
    default to ``"block"`` (the step option ``arms``).

    Args:
        rho: perturbation radius (>= 0; default 0.05).
        alpha: weight of g(w + e), in [0, 1] (default 0.8).
        layer_fraction: share of arms perturbed, in (0, 1]; ``max(1, round(fraction * N))`` arms (default 0.1).
        reselect_every: choose the arms again every this many steps, reusing the choice in between (default 1).
    """

    name = "lagnp"
    default_arms = "block"

    rho: float = 0.05
    alpha: float = 0.8
    layer_fraction: float = 0.1
    reselect_every: int = 1

    def __post_init__(self) -> None:
        self._set("rho", check_rho(self.rho))
        self._set("alpha", check_fraction("alpha", self.alpha, low_open=False, what="the weight of g(w + e)"))
        self._set("layer_fraction", check_fraction("layer_fraction", self.layer_fraction))
        check_int("reselect_every", self.reselect_every, 1)

    def build(self, module: nn.Module, layout: ArmLayout) -> Method:
        return LayerwiseGNPMethod(self.rho, self.alpha, self.layer_fraction, self.reselect_every)


class LayerwiseGNPMethod(Method):
    """Layer-wise GNP on the shared step; arguments: :class:`LayerwiseGNPOptions`."""

    name = "lagnp"

    def __init__(self, rho: float, alpha: float, layer_fraction: float, reselect_every: int) -> None:
        super().__init__(rho)
        self.alpha = float(alpha)
        self.layer_fraction = float(layer_fraction)
        self.reselect_every = reselect_every
        self.keeps_first_gradient = self.alpha < 1.0
        self.steps = 0
        self.chosen: Tensor | None = None
        self._before_step: tuple[int, Tensor | None] | None = None

    def num_chosen(self) -> int:
        """How many arms are perturbed per step."""
        eligible = int(self.all_arms.sum())  # the arms with a trainable parameter
        return max(1, min(eligible, round(self.layer_fraction * eligible)))

    def pass2_arms(self, first: PassOne) -> Tensor:
        if self.chosen is None or self.steps % self.reselect_every == 0:
            top = torch.topk(first.arm_norms, self.num_chosen()).indices.cpu()  # rank-mean norms: same on all ranks
            self.chosen = torch.zeros(len(first.active), dtype=torch.bool).index_fill_(0, top, True) & first.active
        self.steps += 1
        return self.chosen

    def combine(self, params: Sequence[nn.Parameter], first_grads: Sequence[Tensor] | None, first: PassOne) -> None:
        if first_grads is None or not params:  # alpha == 1: the optimizer sees g(w + e) on the chosen arms
            return
        second = [p.grad for p in params]
        torch._foreach_lerp_(list(first_grads), second, self.alpha)  # (1 - alpha) g(w) + alpha g(w + e)
        for p, mixed in zip(params, first_grads, strict=True):
            p.grad = mixed

    def begin_step(self) -> None:
        self._before_step = (self.steps, self.chosen)  # pass2_arms replaces chosen, never edits it in place

    def discard_step(self) -> None:
        if self._before_step is not None:
            self.steps, self.chosen = self._before_step
            self._before_step = None

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "chosen": None if self.chosen is None else self.chosen.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.chosen = None if state["chosen"] is None else state["chosen"].clone()
