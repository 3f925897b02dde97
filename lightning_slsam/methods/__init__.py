"""One file per method, all on the interface of :mod:`lightning_slsam.methods.interface`."""

from lightning_slsam.methods.interface import Method, PassOne
from lightning_slsam.methods.plain import PlainMethod
from lightning_slsam.methods.sam import SAMMethod
from lightning_slsam.methods.slsam import SLSAMMethod

__all__ = ["Method", "PassOne", "PlainMethod", "SAMMethod", "SLSAMMethod"]
