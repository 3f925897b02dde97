"""``rst``: randomized sharpness-aware training, the SL-SAM authors' baseline.

Each step is a SAM step with probability ``p`` and a plain base step otherwise (expected passes per step
``1 + p`` forward and backward).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_slsam.methods.interface import Method, PassOne


class RSTMethod(Method):
    """Args:
    rho: perturbation radius (>= 0; default 0.05).
    p: probability of a SAM step, in [0, 1] (default 0.5).
    seed: seed of the coin (the callback passes one that is equal on every rank).
    """

    name = "rst"

    def __init__(self, rho: float = 0.05, p: float = 0.5, seed: int = 0) -> None:
        super().__init__(rho)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p: the probability of a SAM step must lie in [0, 1], got {p!r}")
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
