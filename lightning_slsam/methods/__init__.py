"""One file per method, all on the interface of :mod:`lightning_slsam.engine.method`."""

from lightning_slsam.engine.method import EpochStart, Method, PassOne
from lightning_slsam.methods.arsam import ARSAMMethod
from lightning_slsam.methods.base import BaseMethod
from lightning_slsam.methods.lagnp import LayerwiseGNPMethod
from lightning_slsam.methods.looksam import LookSAMMethod
from lightning_slsam.methods.msam import MSAMMethod
from lightning_slsam.methods.rst import RSTMethod
from lightning_slsam.methods.sam import SAMMethod
from lightning_slsam.methods.slsam import SLSAMMethod
from lightning_slsam.methods.sparse_msam import SparseMSAMMethod
from lightning_slsam.methods.ssam import SSAMDMethod, SSAMFMethod

__all__ = [
    "ARSAMMethod",
    "BaseMethod",
    "EpochStart",
    "LayerwiseGNPMethod",
    "LookSAMMethod",
    "MSAMMethod",
    "Method",
    "PassOne",
    "RSTMethod",
    "SAMMethod",
    "SLSAMMethod",
    "SSAMDMethod",
    "SSAMFMethod",
    "SparseMSAMMethod",
]
