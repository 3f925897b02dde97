"""``rst``: randomized sharpness-aware training, the SL-SAM authors' baseline.

Each step is a SAM step with probability ``p`` and a plain base step otherwise (expected passes per step
``1 + p`` forward and backward).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor, nn

from lightning_slsam.engine.argument_checks import check_fraction, check_rho, check_seed
from lightning_slsam.engine.arms import ArmLayout
from lightning_slsam.engine.distributed import broadcast_seed
from lightning_slsam.engine.method import Method, PassOne
from lightning_slsam.engine.method_options import MethodOptions


@dataclasses.dataclass(frozen=True)
class RSTOptions(MethodOptions):
    """Randomized SAM (the SL-SAM authors' baseline): a SAM step with probability ``p``, else a base step.

    Args:
        rho: perturbation radius (>= 0; default 0.05).
        p: probability of a SAM step, in [0, 1] (default 0.5).
        seed: the coin's seed; None draws it from the global torch RNG (equal on every rank).
    """

    name = "rst"

    rho: float = 0.05
    p: float = 0.5
    seed: int | None = None

    def __post_init__(self) -> None:
        self._set("rho", check_rho(self.rho))
        self._set("p", check_fraction("p", self.p, low_open=False, what="the probability of a SAM step"))
        check_seed("seed", self.seed)

    def build(self, module: nn.Module, layout: ArmLayout) -> Method:
        return RSTMethod(self.rho, self.p, seed=broadcast_seed(self.seed))


class RSTMethod(Method):
    """Randomized SAM on the shared step; arguments: :class:`RSTOptions` (``seed`` here is the coin's resolved
    seed, equal on every rank)."""

    name = "rst"
    shardable = True

    def __init__(self, rho: float, p: float, seed: int) -> None:
        super().__init__(rho)
        self.p = float(p)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.sam_steps = 0
        self.steps = 0
        self._before_step: tuple[Tensor, int, int] | None = None

    def pass2_arms(self, first: PassOne) -> Tensor | None:
        self.steps += 1
        if float(torch.rand((), generator=self.generator, dtype=torch.float64)) < self.p:
            self.sam_steps += 1
            return first.active
        return None

    def begin_step(self) -> None:
        self._before_step = (self.generator.get_state(), self.sam_steps, self.steps)

    def discard_step(self) -> None:  # a skipped step does not toss the coin
        if self._before_step is not None:
            state, self.sam_steps, self.steps = self._before_step
            self.generator.set_state(state)
            self._before_step = None

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "sam_steps": self.sam_steps, "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.sam_steps = int(state["sam_steps"])
        self.steps = int(state["steps"])
