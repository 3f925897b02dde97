"""Structured-config schemas (dataclasses in Hydra's ConfigStore), generated from each method's one definition.

The schema ``method/schema_<name>`` of a method has ``_target_`` (its callback), the step's options
(:class:`~lightning_slsam.engine.step_options.StepOptions`), the callbacks' own (``accumulate``, ``history_every``) and
the method's arguments (its options class, :mod:`lightning_slsam.methods.registry`), with their types and
defaults. Each ``conf/method/*.yaml`` starts from its schema (``defaults: [schema_<method>]``) and sets only what
differs (``rho: ${rho}``), so a value of the wrong type (``method.rho=abc``) or an unknown key fails at
composition with the key named; ranges are checked by the options' own constructors, which the CLI runs before
building anything else.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

import lightning_slsam
from lightning_slsam.engine.step_options import StepOptions
from lightning_slsam.lightning_adapter.callback import CALLBACKS, LightningOptions
from lightning_slsam.methods.registry import METHOD_OPTIONS


def _omegaconf_type(annotation: Any) -> Any:
    """``X | None`` as ``typing.Optional[X]``: OmegaConf reads the one, not the other."""
    if isinstance(annotation, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return Optional[args[0]]  # noqa: UP045 - OmegaConf needs typing.Optional
    return annotation


def _fields(definition: type[Any]) -> list[tuple[str, Any, Any]]:
    hints = typing.get_type_hints(definition)
    out = []
    for f in dataclasses.fields(definition):
        if f.default is not dataclasses.MISSING:
            default = dataclasses.field(default=f.default)
        else:
            default = dataclasses.field(default_factory=f.default_factory)  # type: ignore[arg-type]
        out.append((f.name, _omegaconf_type(hints[f.name]), default))
    return out


def schema_for(name: str) -> type[Any]:
    """The structured schema of method ``name``: a dataclass of ``_target_`` and every argument it takes."""
    options = METHOD_OPTIONS[name]
    callback = CALLBACKS[name]
    step = _fields(StepOptions)
    if options.default_arms != "tensor":
        step = [(n, t, dataclasses.field(default=options.default_arms) if n == "arms" else d) for n, t, d in step]
    # the named callbacks by their public path; a derived one by its module's path (found by its __getattr__)
    public = getattr(lightning_slsam, callback.__name__, None) is callback
    path = f"lightning_slsam.{callback.__name__}" if public else f"{callback.__module__}.{callback.__name__}"
    target = ("_target_", str, dataclasses.field(default=path))
    fields = [target, *_fields(LightningOptions), *step, *_fields(options)]
    return dataclasses.make_dataclass(f"{callback.__name__}Schema", fields)


#: the schema of every method registered when this module was imported, by name (``method/schema_<name>``)
METHOD_SCHEMAS: dict[str, type[Any]] = {name: schema_for(name) for name in METHOD_OPTIONS}

#: the config group of the methods shipped as ``conf/method/<name>.yaml``
METHOD_CONFIGS = Path(__file__).resolve().parents[1] / "conf" / "method"


def register_schemas() -> None:
    """Store every registered method's schema as ``method/schema_<name>``, and as ``method/<name>`` itself when
    no ``conf/method/<name>.yaml`` exists, so that ``method=<name>`` works for a method added with
    :func:`~lightning_slsam.methods.registry.register` (idempotent)."""
    store = ConfigStore.instance()
    for name in METHOD_OPTIONS:
        schema = METHOD_SCHEMAS.get(name) or schema_for(name)
        store.store(group="method", name=f"schema_{name}", node=schema)
        if not (METHOD_CONFIGS / f"{name}.yaml").exists():
            store.store(group="method", name=name, node=schema)
