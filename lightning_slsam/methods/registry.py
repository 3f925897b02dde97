"""Every method by its one name: ``conf/method/<name>.yaml``, the benchmark's and the reports' label."""

from __future__ import annotations

from lightning_slsam.engine.method_options import MethodOptions
from lightning_slsam.methods.arsam import ARSAMOptions
from lightning_slsam.methods.base import BaseOptions
from lightning_slsam.methods.lagnp import LayerwiseGNPOptions
from lightning_slsam.methods.looksam import LookSAMOptions
from lightning_slsam.methods.rst import RSTOptions
from lightning_slsam.methods.sam import ASAMOptions, SAMOptions
from lightning_slsam.methods.slsam import SLSAMOptions, SLSAMPlusOptions
from lightning_slsam.methods.ssam import SSAMDOptions, SSAMFOptions

#: each method's options class by its name
METHOD_OPTIONS: dict[str, type[MethodOptions]] = {
    options.name: options
    for options in (
        BaseOptions,
        SAMOptions,
        ASAMOptions,
        SSAMFOptions,
        SSAMDOptions,
        LayerwiseGNPOptions,
        ARSAMOptions,
        LookSAMOptions,
        RSTOptions,
        SLSAMOptions,
        SLSAMPlusOptions,
    )
}
