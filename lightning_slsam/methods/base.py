"""``base``: the plain optimizer, one pass at w, every arm active. The reference point of every benchmark."""

from __future__ import annotations

import dataclasses

from torch import nn

from lightning_slsam.engine.arms import ArmLayout
from lightning_slsam.engine.method import Method, PassOne
from lightning_slsam.engine.method_options import MethodOptions


@dataclasses.dataclass(frozen=True)
class BaseOptions(MethodOptions):
    """The base optimizer, one pass per step, with the same logging as the other methods (no arguments)."""

    name = "base"

    def build(self, module: nn.Module, layout: ArmLayout) -> Method:
        return BaseMethod()


class BaseMethod(Method):
    """One forward and backward pass per step; the optimizer sees g(w)."""

    name = "base"
    measures_norms = False
    shardable = True

    def __init__(self) -> None:
        super().__init__(rho=0.0)

    def pass2_arms(self, first: PassOne) -> None:
        return None
