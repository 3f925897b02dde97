"""The argument checks of every method and of the step's options: one function per kind of value.

Each raises a ValueError that starts with the argument's name and shows the bad value, and returns the value
normalised (``float`` for numbers), so a method's options read ``self.rho = check_rho(rho)``. Booleans are
refused where a number is expected (``True`` is an ``int`` to Python, never a radius to a user).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


#: the largest float32: the ascent ``rho * g / ||g||`` is computed in the gradients' precision, and a larger
#: radius would overflow to inf, which the step treats as no ascent at all
MAX_RHO = 3.4028234663852886e38

#: the range ``torch.Generator.manual_seed`` takes
SEED_RANGE = (-(2**63), 2**64 - 1)


def check_rho(rho: Any) -> float:
    """The perturbation radius: a finite number >= 0 that float32 can hold."""
    if not (_is_number(rho) and 0.0 <= rho <= MAX_RHO):
        raise ValueError(
            f"rho: the perturbation radius must be a finite number >= 0 (at most {MAX_RHO:.3g}, float32's largest), "
            f"got {rho!r}"
        )
    return float(rho)


def check_number(
    name: str,
    value: Any,
    *,
    minimum: float = -math.inf,
    maximum: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
    allow_inf: bool = False,
    what: str = "",
) -> float:
    """A number in ``[minimum, maximum]`` (``low_open`` / ``high_open`` exclude the ends); finite unless
    ``allow_inf``. ``what`` says what the value is, for the message."""
    ok = _is_number(value) and not math.isnan(value) and (allow_inf or math.isfinite(value))
    if ok:
        ok = (value > minimum if low_open else value >= minimum) and (
            value < maximum if high_open else value <= maximum
        )
    if not ok:
        low = "(" if low_open else "["
        high = ")" if high_open else "]"
        if maximum == math.inf:
            bound = f"> {minimum:g}" if low_open else f">= {minimum:g}"
        else:
            bound = f"in {low}{minimum:g}, {maximum:g}{high}"
        kind = "a number" if allow_inf or maximum != math.inf else "a finite number"
        raise ValueError(f"{name}: {what + ' ' if what else ''}must be {kind} {bound}, got {value!r}")
    return float(value)


def check_fraction(name: str, value: Any, *, low_open: bool = True, high_open: bool = False, what: str = "") -> float:
    """A fraction in ``(0, 1]`` by default (``low_open`` / ``high_open`` choose the ends)."""
    return check_number(name, value, minimum=0.0, maximum=1.0, low_open=low_open, high_open=high_open, what=what)


def check_int(name: str, value: Any, minimum: int, *, optional: bool = False, what: str = "") -> int | None:
    """An int >= ``minimum`` (None too when ``optional``)."""
    if optional and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        tail = " or None" if optional else ""
        raise ValueError(f"{name}: {what + ' ' if what else ''}must be an int >= {minimum}{tail}, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """One of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(map(repr, choices))}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    """True or False (not 0/1, not a string)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}: must be True or False, got {value!r}")
    return value


def check_seed(name: str, value: Any) -> int | None:
    """A generator seed: an int, or None to draw one from the global torch RNG."""
    low, high = SEED_RANGE
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
        raise ValueError(
            f"{name}: must be an int in [-2**63, 2**64 - 1] (a torch generator's seed) or None, got {value!r}"
        )
    return value
