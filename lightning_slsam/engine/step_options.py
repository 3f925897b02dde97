"""The options of the shared step that every method takes (arms, BatchNorm, clipping, prefix replay, skips).

One definition, read by the Lightning callbacks (which add ``accumulate`` and ``history_every``), by the
plain-PyTorch optimizers of :mod:`lightning_slsam.optim` and by the generated Hydra schemas
(:mod:`lightning_slsam.app.config_schema`). A method's own arguments live in its options class
(:mod:`lightning_slsam.engine.method_options`).
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Sequence
from typing import Any

from lightning_slsam.engine.argument_checks import check_bool, check_choice, check_number
from lightning_slsam.engine.arms import ARM_MODES
from lightning_slsam.engine.skipped_steps import DEFAULT_MAX_SKIPPED_STEPS, check_max_skipped_steps

#: ``bn_running_stats`` values
BN_RUNNING_STATS: tuple[str, ...] = ("pass1", "both")


@dataclasses.dataclass(frozen=True)
class StepOptions:
    """What every method's step takes besides the method's own arguments.

    Args:
        arms: how parameters are grouped into arms: ``"tensor"``, ``"module"`` or ``"block"``; None (default)
            takes the method's own default (``"tensor"``, the paper's; ``"block"`` for layer-wise GNP).
        bn_running_stats: ``"pass1"`` (default) updates BatchNorm running statistics in pass 1 only;
            ``"both"`` lets pass 2 (at the perturbed weights) update them too.
        clip_grad_norm: clip the total L2 norm of the gradients the optimizer sees to this (default None),
            on unscaled gradients.
        clip_grad_value: clip every gradient element to ``[-value, value]`` (default None).
        check_ranks: under DDP, verify every step that all ranks sampled the same arms (default False).
        reuse_prefix: in pass 2 of a method whose pass 1 leaves arms out (SL-SAM), take the outputs of the
            module calls below the lowest active module from pass 1 instead of computing them again (default
            True; exact, see ``prefix_reuse.py``; False for a model whose modules read other modules'
            parameters without owning them).
        max_skipped_steps: a step whose gradients are not finite (NaN or inf, in any pass) is skipped with a
            warning, weights, optimizer and method state unchanged; this many skipped steps in a row stop
            training with :class:`~lightning_slsam.engine.skipped_steps.NonFiniteTrainingError` (int >= 1, default 50;
            None never stops).
    """

    arms: str | None = None
    bn_running_stats: str = "pass1"
    clip_grad_norm: float | None = None
    clip_grad_value: float | None = None
    check_ranks: bool = False
    reuse_prefix: bool = True
    max_skipped_steps: int | None = DEFAULT_MAX_SKIPPED_STEPS

    def __post_init__(self) -> None:
        if self.arms is not None:
            check_choice("arms", self.arms, ARM_MODES)
        check_choice("bn_running_stats", self.bn_running_stats, BN_RUNNING_STATS)
        for key in ("clip_grad_norm", "clip_grad_value"):
            value = getattr(self, key)
            if value is not None:
                object.__setattr__(self, key, check_number(key, value, minimum=0.0, low_open=True))
        check_bool("check_ranks", self.check_ranks)
        check_bool("reuse_prefix", self.reuse_prefix)
        check_max_skipped_steps(self.max_skipped_steps)


def split_arguments(owner: str, arguments: dict[str, Any], *definitions: type[Any]) -> list[dict[str, Any]]:
    """Split keyword ``arguments`` among dataclass ``definitions`` (each key goes to the first that has it).

    Raises a TypeError naming the unknown key and the accepted ones, as a function call would.
    """
    parts: list[dict[str, Any]] = [{} for _ in definitions]
    names = [{f.name for f in dataclasses.fields(d)} for d in definitions]
    for key, value in arguments.items():
        for part, known in zip(parts, names, strict=True):
            if key in known:
                part[key] = value
                break
        else:
            for definition in definitions:
                new = getattr(definition, "renamed", {}).get(key)
                if new is not None:
                    raise TypeError(f"{owner}: argument {key!r} was renamed {new!r} (same meaning); pass {new}=...")
            accepted = sorted(set().union(*names))
            raise TypeError(f"{owner}: unexpected argument {key!r}; it takes {', '.join(accepted)}")
    return parts


def keyword_parameters(*definitions: type[Any]) -> list[inspect.Parameter]:
    """The fields of dataclass ``definitions`` as typed keyword-only parameters (annotations resolved)."""
    parameters = []
    for definition in definitions:
        hints = typing.get_type_hints(definition)
        for f in dataclasses.fields(definition):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:  # a required argument
                default = inspect.Parameter.empty
            parameters.append(
                inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=hints[f.name])
            )
    return parameters


#: the name of the ``**`` parameter through which a generated ``__init__`` passes what its signature does not name
#: (an old argument name, a typo), so that the class's own check answers it with the new name or the accepted ones
EXTRA = "renamed_or_unknown"


def typed_init(
    explicit: Callable[..., None], keywords: Sequence[inspect.Parameter], qualname: str
) -> Callable[..., None]:
    """A real ``__init__`` whose signature is ``explicit``'s own parameters followed by ``keywords``.

    ``explicit`` is an ``__init__`` that takes the method's and the step's arguments as ``**``; the function
    returned names each of them as a typed keyword-only parameter with its default, so that ``inspect``, IDEs and
    jsonargparse (LightningCLI's ``init_args``) see them, and passes them all on to ``explicit``.
    """
    hints = typing.get_type_hints(explicit)
    own = [
        p.replace(annotation=hints.get(p.name, p.annotation))
        for p in list(inspect.signature(explicit).parameters.values())[1:]
        if p.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    names = [p.name for p in own] + [p.name for p in keywords]
    namespace: dict[str, Any] = {"_explicit": explicit}
    rendered = []
    keyword_only = False
    for p in [*own, *keywords]:
        if p.kind is inspect.Parameter.KEYWORD_ONLY and not keyword_only:
            rendered.append("*")
            keyword_only = True
        if p.default is inspect.Parameter.empty:
            rendered.append(p.name)
        else:
            namespace[f"_default_{p.name}"] = p.default
            rendered.append(f"{p.name}=_default_{p.name}")
    passed = ", ".join(f"{n}={n}" for n in names)
    source = f"def __init__(self, {', '.join(rendered)}, **{EXTRA}):\n    _explicit(self, {passed}, **{EXTRA})\n"
    exec(source, namespace)
    function = namespace["__init__"]
    function.__annotations__ = {p.name: p.annotation for p in [*own, *keywords] if p.annotation is not p.empty}
    function.__annotations__["return"] = None
    function.__qualname__ = f"{qualname}.__init__"
    function.__module__ = explicit.__module__
    function.__doc__ = explicit.__doc__
    return function


def install_typed_init(cls: type[Any], definitions: Sequence[type[Any]]) -> None:
    """Give ``cls`` (a subclass of a callback or optimizer base) a typed ``__init__`` from :func:`typed_init`.

    The base's ``__init__``, and one that a class of the base's own module defines with ``**`` (``optim.SSAMF``
    with its ``fisher_data``), is the explicit part; a subclass that defines its own ``__init__`` elsewhere keeps it,
    untouched, and so do its subclasses that define none.
    """
    own = cls.__dict__.get("__init__")
    if own is not None and own.__module__ != cls._typed_module:
        cls._typed = False
        return
    if own is None and not cls._typed:
        return
    explicit = own if own is not None else cls._explicit_init
    cls._explicit_init = explicit
    cls._typed = True
    cls.__init__ = typed_init(explicit, keyword_parameters(*definitions), cls.__qualname__)
