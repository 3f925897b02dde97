"""``looksam``: LookSAM (Liu et al. 2022, "Towards Efficient and Scalable Sharpness-Aware Minimization").

Every ``k`` steps a full SAM step, which also stores, per tensor, the part of the SAM gradient g_s
orthogonal to the plain gradient g:  ``g_v = g_s - ||g_s|| cos(g, g_s) g / ||g||``.
In between, one pass and the optimizer sees ``g + alpha (||g|| / ||g_v||) g_v`` (per tensor).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from lightning_slsam.engine.argument_checks import check_int, check_number, check_rho
from lightning_slsam.engine.arms import ArmLayout
from lightning_slsam.engine.method import Method, PassOne
from lightning_slsam.engine.method_options import MethodOptions


@dataclasses.dataclass(frozen=True)
class LookSAMOptions(MethodOptions):
    """LookSAM (Liu et al. 2022): a SAM step every ``k`` steps, reusing its orthogonal gradient in between.

    Args:
        rho: perturbation radius (>= 0; default 0.05).
        k: SAM-step interval, the first step included (int >= 1; default 5); ``k=1`` is SAM.
        alpha: weight of the reused orthogonal component (>= 0; default 0.7).
    """

    name = "looksam"

    rho: float = 0.05
    k: int = 5
    alpha: float = 0.7

    def __post_init__(self) -> None:
        self._set("rho", check_rho(self.rho))
        check_int("k", self.k, 1, what="the SAM-step interval")
        self._set("alpha", check_number("alpha", self.alpha, minimum=0.0))

    def build(self, module: nn.Module, layout: ArmLayout) -> Method:
        return LookSAMMethod(self.rho, self.k, self.alpha)


_EPS = 1e-12


class LookSAMMethod(Method):
    """LookSAM on the shared step; arguments: :class:`LookSAMOptions`."""

    name = "looksam"

    def __init__(self, rho: float, k: int, alpha: float) -> None:
        super().__init__(rho)
        self.k = k
        self.alpha = float(alpha)
        self.steps = 0
        #: the stored orthogonal components, by parameter index in the layout
        self.g_v: dict[int, Tensor] = {}
        self._index: dict[int, int] = {}
        self._before_step: tuple[int, dict[int, Tensor]] | None = None

    def setup(self, layout: Any) -> None:
        super().setup(layout)
        self._index = {id(p): i for i, p in enumerate(layout.params)}

    def pass2_arms(self, first: PassOne) -> Tensor | None:
        refresh = self.steps % self.k == 0
        self.steps += 1
        self.keeps_first_gradient = refresh
        return first.active if refresh else None

    def combine(self, params: Sequence[nn.Parameter], first_grads: Sequence[Tensor] | None, first: PassOne) -> None:
        assert first_grads is not None
        for p, g in zip(params, first_grads, strict=True):
            g_s = p.grad
            g_norm, s_norm = g.norm(), g_s.norm()
            cos = (g * g_s).sum() / (g_norm * s_norm + _EPS)
            # scale-free: g_v is only ever used through g_v / ||g_v||
            self.g_v[self._index[id(p)]] = g_s - (s_norm * cos / (g_norm + _EPS)) * g

    def single_pass_gradient(self, first: PassOne) -> None:
        for p in first.params:
            g_v = self.g_v.get(self._index[id(p)])
            if g_v is None or p.grad is None:
                continue
            ratio = p.grad.norm() / (g_v.norm() + _EPS)
            p.grad.add_(g_v * (self.alpha * ratio))

    def begin_step(self) -> None:
        self._before_step = (self.steps, dict(self.g_v))  # combine replaces entries, never edits them in place

    def discard_step(self) -> None:
        if self._before_step is not None:
            self.steps, self.g_v = self._before_step
            self._before_step = None

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "g_v": {i: g.clone() for i, g in self.g_v.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state["steps"])
        assert self.layout is not None
        self.g_v = {int(i): g.to(self.layout.params[int(i)].device).clone() for i, g in state["g_v"].items()}
