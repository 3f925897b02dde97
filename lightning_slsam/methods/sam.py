"""``sam`` and ``asam``: every arm in both passes (Foret et al. 2021; adaptive: Kwon et al. 2021)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from lightning_slsam.arms import ArmLayout
from lightning_slsam.methods.interface import Method
from lightning_slsam.perturbation import adaptive_perturbation


class SAMMethod(Method):
    """SAM: ``e = rho g / ||g||`` over all arms; the optimizer sees g(w + e).

    Args:
        rho: perturbation radius (>= 0; default 0.05).
        adaptive: use ASAM's scale-invariant ascent ``rho T^2 g / ||T g||``, ``T = |w| + eta`` on weights.
        eta: ASAM's offset in T (>= 0; default 0.01); ignored unless ``adaptive``.
    """

    def __init__(self, rho: float = 0.05, adaptive: bool = False, eta: float = 0.01) -> None:
        super().__init__(rho)
        if not eta >= 0.0:
            raise ValueError(f"eta: ASAM's offset must be >= 0, got {eta!r}")
        self.adaptive = bool(adaptive)
        self.eta = float(eta)
        self.name = "asam" if adaptive else "sam"
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
