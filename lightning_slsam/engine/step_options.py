"""The options of the shared step that every method takes (arms, BatchNorm, clipping, prefix replay, skips).

One definition, read by the Lightning callbacks (which add ``accumulate`` and ``history_every``), by the
plain-PyTorch optimizers of :mod:`lightning_slsam.optim` and by the generated Hydra schemas
(:mod:`lightning_slsam.app.config_schema`). A method's own arguments live in its options class
(:mod:`lightning_slsam.engine.method_options`).
"""

from __future__ import annotations

import dataclasses
import inspect
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
    """The fields of dataclass ``definitions`` as keyword-only parameters, for the classes' ``__signature__``."""
    parameters = []
    for definition in definitions:
        for f in dataclasses.fields(definition):
            if f.default is not dataclasses.MISSING:
                default = f.default
            elif f.default_factory is not dataclasses.MISSING:
                default = f.default_factory()
            else:  # a required argument
                default = inspect.Parameter.empty
            parameters.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default))
    return parameters
