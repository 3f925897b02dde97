"""``base``: the plain optimizer, one pass at w, every arm active. The reference point of every benchmark."""

from __future__ import annotations

from lightning_slsam.methods.interface import Method, PassOne


class PlainMethod(Method):
    """One forward and backward pass per step; the optimizer sees g(w)."""

    name = "base"
    measures_norms = False

    def __init__(self) -> None:
        super().__init__(rho=0.0)

    def pass2_arms(self, first: PassOne) -> None:
        return None
