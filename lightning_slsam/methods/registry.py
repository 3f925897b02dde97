"""Every method by its one name: ``conf/method/<name>.yaml``, the benchmark's and the reports' label.

Adding a method is its own file under ``methods/`` and one line in :data:`METHOD_OPTIONS`' tuple below; its
callback (``lightning_adapter.callback.callback_class``), plain-PyTorch optimizer (``optim.optimizer_class``) and
Hydra schema (``method/schema_<name>``, and ``method=<name>`` itself when ``conf/method/<name>.yaml`` does not
exist) are derived from its options class. :func:`register` does the same at run time for a method of one's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

from lightning_slsam.engine.method_options import MethodOptions
from lightning_slsam.methods.arsam import ARSAMOptions
from lightning_slsam.methods.base import BaseOptions
from lightning_slsam.methods.lagnp import LayerwiseGNPOptions
from lightning_slsam.methods.looksam import LookSAMOptions
from lightning_slsam.methods.msam import MSAMOptions
from lightning_slsam.methods.rst import RSTOptions
from lightning_slsam.methods.sam import ASAMOptions, SAMOptions
from lightning_slsam.methods.slsam import SLSAMNoisyOptions, SLSAMOptions, SLSAMPlusOptions
from lightning_slsam.methods.sparse_msam import SparseMSAMOptions
from lightning_slsam.methods.ssam import SSAMDOptions, SSAMFOptions

T = TypeVar("T")

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
        SLSAMNoisyOptions,
        MSAMOptions,
        SparseMSAMOptions,
    )
}


def register(options: type[MethodOptions]) -> type[MethodOptions]:
    """Add a method of one's own under ``options.name`` (its callback, optimizer and schema follow); returns it.

    Raises:
        ValueError: the options class has no name, or the name is taken by another method.
    """
    if not (isinstance(options, type) and issubclass(options, MethodOptions)):
        raise ValueError(f"options: must be a MethodOptions subclass, got {options!r}")
    if not options.name:
        raise ValueError(f"{options.__name__}.name: a method needs a name (the config's method=<name>)")
    known = METHOD_OPTIONS.get(options.name)
    if known is not None and known is not options:
        raise ValueError(f"{options.__name__}.name: {options.name!r} is already {known.__name__}'s")
    METHOD_OPTIONS[options.name] = options
    return options


def class_name(options: type[MethodOptions]) -> str:
    """The name of the callback and optimizer classes derived for ``options``: ``SLSAMPlusOptions`` -> ``SLSAMPlus``."""
    return options.__name__.removesuffix("Options") or options.__name__


#: the classes derived by :func:`class_for`, by (adapter base class, options class)
_DERIVED: dict[tuple[type, type[MethodOptions]], type] = {}


def class_for(name: str, base: type[T], named: Sequence[type[T]]) -> type[T]:
    """The adapter class of the registered method ``name``: the class of ``named`` whose ``options_class`` is the
    method's, or a subclass of ``base`` derived from its options class (``class <Name>(base): options_class =
    <Name>Options``, in ``base``'s module), the same class at every call.

    Raises:
        ValueError: no method of that name is registered (the message lists them).
    """
    options = METHOD_OPTIONS.get(name)
    if options is None:
        raise ValueError(f"method: unknown method {name!r}; registered: {', '.join(METHOD_OPTIONS)}")
    for cls in named:
        if cls.options_class is options:  # type: ignore[attr-defined]
            return cls
    key = (base, options)
    if key not in _DERIVED:
        _DERIVED[key] = type(
            class_name(options),
            (base,),
            {"options_class": options, "__module__": base.__module__, "__doc__": options.__doc__},
        )
    return _DERIVED[key]
