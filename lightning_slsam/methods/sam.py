"""``sam`` and ``asam``: every arm in both passes (Foret et al. 2021; adaptive: Kwon et al. 2021)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from torch import Tensor, nn

from lightning_slsam.engine.argument_checks import check_bool, check_number, check_rho
from lightning_slsam.engine.arms import ArmLayout
from lightning_slsam.engine.method import Method
from lightning_slsam.engine.method_options import MethodOptions
from lightning_slsam.engine.perturbation import adaptive_perturbation


@dataclasses.dataclass(frozen=True)
class SAMOptions(MethodOptions):
    """Sharpness-aware minimization on every parameter (Foret et al. 2021): two passes per step.

    Args:
        rho: perturbation radius, in parameter-space L2 units (>= 0; default 0.05).
        adaptive: ASAM's scale-invariant ascent ``rho T^2 g / ||T g||`` with ``T = |w| + eta`` on weights
            and 1 on biases (Kwon et al. 2021); default False.
        eta: ASAM's offset (>= 0; default 0.01), used when ``adaptive``.
    """

    name = "sam"

    rho: float = 0.05
    adaptive: bool = False
    eta: float = 0.01

    def __post_init__(self) -> None:
        self._set("rho", check_rho(self.rho))
        self._set("adaptive", check_bool("adaptive", self.adaptive))
        self._set("eta", check_number("eta", self.eta, minimum=0.0, what="ASAM's offset"))

    def build(self, module: nn.Module, layout: ArmLayout) -> Method:
        return SAMMethod(self.rho, self.adaptive, self.eta)


@dataclasses.dataclass(frozen=True)
class ASAMOptions(MethodOptions):
    """Adaptive SAM (Kwon et al. 2021): ``e = rho T^2 g / ||T g||``, ``T = |w| + eta`` on weights, 1 on biases.

    Args:
        rho: perturbation radius in the T-scaled space (>= 0; default 0.5, the paper's).
        eta: offset in T (>= 0; default 0.01).
    """

    name = "asam"

    rho: float = 0.5
    eta: float = 0.01

    def __post_init__(self) -> None:
        self._set("rho", check_rho(self.rho))
        self._set("eta", check_number("eta", self.eta, minimum=0.0, what="ASAM's offset"))

    def build(self, module: nn.Module, layout: ArmLayout) -> Method:
        return SAMMethod(self.rho, adaptive=True, eta=self.eta)


class SAMMethod(Method):
    """SAM: ``e = rho g / ||g||`` over all arms; the optimizer sees g(w + e). Arguments: :class:`SAMOptions`."""

    def __init__(self, rho: float, adaptive: bool, eta: float) -> None:
        super().__init__(rho)
        self.adaptive = bool(adaptive)
        self.eta = float(eta)
        self.name = "asam" if adaptive else "sam"
        self.shardable = not self.adaptive  # ASAM's ||T g|| is a norm of its own over whole tensors
        self._is_bias: dict[int, bool] = {}

    def setup(self, layout: ArmLayout) -> None:
        super().setup(layout)
        self._is_bias = {
            id(p): name.rsplit(".", 1)[-1] == "bias"
            for arm in layout
            for name, p in zip(arm.param_names, arm.params, strict=True)
        }

    def perturbation(self, params: Sequence[nn.Parameter], grads: Sequence[Tensor], grad_norm: Tensor) -> list[Tensor]:
        if not self.adaptive:
            return super().perturbation(params, grads, grad_norm)
        return adaptive_perturbation(params, grads, [self._is_bias[id(p)] for p in params], self.rho, self.eta)
