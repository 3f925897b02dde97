"""lightning-slsam: Sparse-Layer Sharpness-Aware Minimization and its competitors for PyTorch Lightning."""

from lightning_slsam import old_paths
from lightning_slsam.engine.arms import Arm, ArmLayout, build_arms
from lightning_slsam.engine.samplers import (
    ArmSampler,
    Exp3Sampler,
    FixedSampler,
    PinnedArmsSampler,
    TopArmsSampler,
    UniformSampler,
    project_capped_simplex,
)
from lightning_slsam.lightning_adapter.callback import (
    ARSAM,
    ASAM,
    MSAM,
    RST,
    SAM,
    SLSAM,
    SSAMD,
    SSAMF,
    Base,
    LayerwiseGNP,
    LookSAM,
    SharpnessAware,
    SLSAMNoisy,
    SLSAMPlus,
    SparseMSAM,
)
from lightning_slsam.lightning_adapter.mixin import SharpnessAwareMixin
from lightning_slsam.methods import (
    ARSAMMethod,
    BaseMethod,
    EpochStart,
    LayerwiseGNPMethod,
    LookSAMMethod,
    Method,
    MSAMMethod,
    PassOne,
    RSTMethod,
    SAMMethod,
    SLSAMMethod,
    SparseMSAMMethod,
    SSAMDMethod,
    SSAMFMethod,
)

old_paths.install()

__version__ = "0.1.0"

__all__ = [
    "ARSAM",
    "ASAM",
    "MSAM",
    "RST",
    "SAM",
    "SLSAM",
    "SSAMD",
    "SSAMF",
    "ARSAMMethod",
    "Arm",
    "ArmLayout",
    "ArmSampler",
    "Base",
    "BaseMethod",
    "EpochStart",
    "Exp3Sampler",
    "FixedSampler",
    "LayerwiseGNP",
    "LayerwiseGNPMethod",
    "LookSAM",
    "LookSAMMethod",
    "MSAMMethod",
    "Method",
    "PassOne",
    "PinnedArmsSampler",
    "RSTMethod",
    "SAMMethod",
    "SLSAMMethod",
    "SLSAMNoisy",
    "SLSAMPlus",
    "SSAMDMethod",
    "SSAMFMethod",
    "SharpnessAware",
    "SharpnessAwareMixin",
    "SparseMSAM",
    "SparseMSAMMethod",
    "TopArmsSampler",
    "UniformSampler",
    "build_arms",
    "project_capped_simplex",
]
