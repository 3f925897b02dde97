"""A method's one definition: its arguments (dataclass fields with defaults and docs), their checks, the method.

Every method file defines a frozen dataclass on :class:`MethodOptions` (``SAMOptions`` in ``methods/sam.py``,
...). It is the only place a method's arguments are written down; the rest is derived from it:

- the Lightning callback of the same name (``lightning_slsam.SAM``) takes exactly these fields plus the step's
  common options (:class:`lightning_slsam.engine.step_options.StepOptions`) as keyword arguments;
- the plain-PyTorch optimizer ``lightning_slsam.optim.SAM`` takes the same;
- the Hydra structured schema ``method/schema_<name>`` is generated from the fields
  (:mod:`lightning_slsam.app.config_schema`), so ``conf/method/<name>.yaml`` holds only what differs from the
  defaults (``rho: ${rho}``);
- :mod:`lightning_slsam.methods.registry` maps each ``name`` to its options.

Constructing the options checks every argument (``__post_init__``, with :mod:`argument_checks`), so a bad value
fails when the callback or optimizer is built, before any training.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from torch import nn

from lightning_slsam.engine.arms import ArmLayout
from lightning_slsam.engine.method import Method


@dataclasses.dataclass(frozen=True)
class MethodOptions:
    """Base of the per-method options; subclasses add fields, ``__post_init__`` checks and ``build``."""

    #: the method's one name: config file ``conf/method/<name>.yaml``, ``Method.name``, benchmark and report label
    name: ClassVar[str] = ""
    #: the arms mode when the user gives none (``arms`` is a step option; layer-wise GNP defaults to ``"block"``)
    default_arms: ClassVar[str] = "tensor"
    #: old argument names and their new ones; an old name is refused with the new one in the message
    renamed: ClassVar[dict[str, str]] = {}

    def build(self, module: nn.Module, layout: ArmLayout) -> Method:
        """The method of these options for ``module`` and its arms (not yet ``setup``)."""
        raise NotImplementedError

    def check_model(self, module: nn.Module, arms: str) -> None:
        """Raise a ValueError naming the argument when these options do not fit ``module`` (default: fit)."""

    def method_for(self, module: nn.Module, layout: ArmLayout) -> Method:
        """:meth:`build` then ``Method.setup(layout)``: the method ready for the first step."""
        method = self.build(module, layout)
        method.setup(layout)
        return method

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The method's argument names, in definition order."""
        return tuple(f.name for f in dataclasses.fields(cls))

    def as_dict(self) -> dict[str, Any]:
        """The arguments as a plain dict (for logs and results)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def _set(self, name: str, value: Any) -> None:
        """Store a checked, normalised value on the frozen instance (for ``__post_init__``)."""
        object.__setattr__(self, name, value)
