"""Structured-config schemas (dataclasses in Hydra's ConfigStore): the types of every method's keys.

Each ``conf/method/*.yaml`` starts from its schema (``defaults: [schema_<method>]``), so a value of the
wrong type (``method.rho=abc``) or an unknown key fails at composition with the key named. Ranges are
checked by the callbacks' own constructors, which the CLI runs before building anything else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from hydra.core.config_store import ConfigStore


@dataclass
class CommonOptions:
    """Options of every method callback (:class:`lightning_slsam.SharpnessAware`)."""

    accumulate: int = 1
    clip_grad_norm: Optional[float] = None  # noqa: UP045 - OmegaConf needs typing.Optional
    clip_grad_value: Optional[float] = None  # noqa: UP045
    bn_running_stats: str = "pass1"
    check_ranks: bool = False
    history_every: int = 1
    reuse_prefix: bool = True
    max_skipped_steps: Optional[int] = 50  # noqa: UP045 - steps skipped in a row (non-finite) that stop training


@dataclass
class PlainSchema(CommonOptions):
    _target_: str = "lightning_slsam.Plain"


@dataclass
class SAMSchema(CommonOptions):
    _target_: str = "lightning_slsam.SAM"
    rho: float = 0.05
    adaptive: bool = False
    eta: float = 0.01


@dataclass
class ASAMSchema(CommonOptions):
    _target_: str = "lightning_slsam.ASAM"
    rho: float = 0.5
    eta: float = 0.01


@dataclass
class SSAMFSchema(CommonOptions):
    _target_: str = "lightning_slsam.SSAMF"
    rho: float = 0.05
    sparsity: float = 0.5
    num_samples: int = 128
    update_every_epochs: int = 1
    per_sample: str = "auto"


@dataclass
class SSAMDSchema(CommonOptions):
    _target_: str = "lightning_slsam.SSAMD"
    rho: float = 0.05
    sparsity: float = 0.5
    drop_rate: float = 0.5
    update_every_epochs: int = 1
    drop: str = "gradient"
    grow: str = "random"
    seed: Optional[int] = None  # noqa: UP045


@dataclass
class LayerwiseGNPSchema(CommonOptions):
    _target_: str = "lightning_slsam.LayerwiseGNP"
    rho: float = 0.05
    alpha: float = 0.8
    layer_fraction: float = 0.1
    reselect_every: int = 1
    arms: str = "block"


@dataclass
class ARSAMSchema(CommonOptions):
    _target_: str = "lightning_slsam.ARSAM"
    rho: float = 0.05
    threshold: float = 0.2
    max_interval: int = 5
    mix_decay: float = 0.7
    mix_steps: Optional[int] = 6  # noqa: UP045
    warmup_steps: int = 0
    warmup_epochs: int = 0
    last_arms: Optional[int] = None  # noqa: UP045


@dataclass
class LookSAMSchema(CommonOptions):
    _target_: str = "lightning_slsam.LookSAM"
    rho: float = 0.05
    k: int = 5
    alpha: float = 0.7


@dataclass
class RSTSchema(CommonOptions):
    _target_: str = "lightning_slsam.RST"
    rho: float = 0.05
    p: float = 0.5
    seed: Optional[int] = None  # noqa: UP045


@dataclass
class SLSAMSchema(CommonOptions):
    _target_: str = "lightning_slsam.SLSAM"
    rho: float = 0.05
    sparsity: float = 0.2
    bandit_lr: float = 1e-3
    arms: str = "tensor"
    seed: Optional[int] = None  # noqa: UP045
    sampler: str = "exp3"
    norm_scale: str = "raw"
    top_fraction: float = 1.0
    always_active: list[str] = field(default_factory=list)
    max_update_scale: Optional[float] = None  # noqa: UP045


@dataclass
class SLSAMPlusSchema(SLSAMSchema):
    _target_: str = "lightning_slsam.SLSAMPlus"
    max_update_scale: Optional[float] = 5.0  # noqa: UP045


METHOD_SCHEMAS: dict[str, type] = {
    "plain": PlainSchema,
    "sam": SAMSchema,
    "asam": ASAMSchema,
    "ssam_f": SSAMFSchema,
    "ssam_d": SSAMDSchema,
    "lagnp": LayerwiseGNPSchema,
    "arsam": ARSAMSchema,
    "looksam": LookSAMSchema,
    "rst": RSTSchema,
    "slsam": SLSAMSchema,
    "slsam_plus": SLSAMPlusSchema,
}


def register_schemas() -> None:
    """Store every schema as ``method/schema_<name>`` (idempotent)."""
    store = ConfigStore.instance()
    for name, schema in METHOD_SCHEMAS.items():
        store.store(group="method", name=f"schema_{name}", node=schema)
