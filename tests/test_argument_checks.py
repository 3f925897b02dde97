"""The argument checks of ``lightning_slsam/engine/argument_checks.py``, one function at a time.

For every check: the values it accepts and the normalised value it returns (``float`` for numbers, the value itself
otherwise), the values it refuses (a bool where a number is expected, NaN, inf, out of range, the wrong type), and
that the ValueError starts with the argument's name followed by ``:`` and shows the bad value. The accepted ranges
are compared with a plain reference written here over a grid of values and bounds.
"""

from __future__ import annotations

import inspect
import itertools
import math
from typing import Any

import numpy as np
import pytest
import torch

from lightning_slsam.engine import argument_checks
from lightning_slsam.engine.argument_checks import (
    check_bool,
    check_choice,
    check_fraction,
    check_int,
    check_number,
    check_rho,
    check_seed,
)

#: every public check function of the module; a new one must be added here (and tested below)
CHECKS = {"check_rho", "check_number", "check_fraction", "check_int", "check_choice", "check_bool", "check_seed"}

#: values of the wrong type for a number, whatever the bounds
NOT_NUMBERS: list[Any] = [True, False, "0.5", "1", None, [0.5], (1,), {"x": 1}, torch.tensor(0.5), 1j]


def refused(check: Any, name: str, value: Any, *args: Any, **kwargs: Any) -> str:
    """Call ``check``, expect a ValueError that starts with ``name:`` and shows ``value``; return its message."""
    with pytest.raises(ValueError) as info:
        check(*args, **kwargs)
    message = str(info.value)
    assert message.startswith(f"{name}: "), message
    assert repr(value) in message, f"{message!r} does not show {value!r}"
    return message


def test_the_module_has_exactly_the_checks_tested_here() -> None:
    public = {
        name
        for name, obj in vars(argument_checks).items()
        if inspect.isfunction(obj) and obj.__module__ == argument_checks.__name__ and not name.startswith("_")
    }
    assert public == CHECKS


# --- check_rho ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [0, 0.0, 1, 0.05, 2.5, 3.4e38, np.float64(0.25)])
def test_rho_accepts_finite_non_negative_numbers_as_float(value: Any) -> None:
    out = check_rho(value)
    assert type(out) is float and out == float(value)


@pytest.mark.parametrize("value", [-0.1, -1, -1e-300, 3.5e38, 1e40, math.inf, -math.inf, math.nan, *NOT_NUMBERS])
def test_rho_refuses_negative_non_finite_and_non_numbers(value: Any) -> None:
    """Above float32's largest value the ascent's scale overflows to inf, which the step would treat as e = 0."""
    refused(check_rho, "rho", value, value)


# --- check_number ------------------------------------------------------------------------------------------------
def reference_accepts(
    value: Any, minimum: float, maximum: float, low_open: bool, high_open: bool, allow_inf: bool
) -> bool:
    """Written out case by case: a real number (not a bool), not NaN, finite unless allowed, inside the bounds."""
    if type(value) not in (int, float):
        return False
    if value != value:  # NaN
        return False
    if value in (math.inf, -math.inf) and not allow_inf:
        return False
    if low_open and not value > minimum:
        return False
    if not low_open and not value >= minimum:
        return False
    if high_open and not value < maximum:
        return False
    return high_open or value <= maximum


GRID_VALUES: list[Any] = [-math.inf, -2, -1.0, -1e-9, 0, 0.0, 1e-9, 0.5, 1, 1.0, 1.5, 7, math.inf, math.nan, True]
BOUNDS = [(-math.inf, math.inf), (0.0, math.inf), (0.0, 1.0), (-1.0, 1.0), (1.0, 1.0), (0.5, 7.0)]


@pytest.mark.parametrize(("minimum", "maximum"), BOUNDS)
@pytest.mark.parametrize(("low_open", "high_open", "allow_inf"), list(itertools.product([False, True], repeat=3)))
def test_number_accepts_what_the_reference_accepts(
    minimum: float, maximum: float, low_open: bool, high_open: bool, allow_inf: bool
) -> None:
    bounds = {"minimum": minimum, "maximum": maximum, "low_open": low_open, "high_open": high_open}
    for value in GRID_VALUES:
        if reference_accepts(value, minimum, maximum, low_open, high_open, allow_inf):
            out = check_number("x", value, allow_inf=allow_inf, **bounds)
            assert type(out) is float and out == value, (value, bounds)
        else:
            refused(check_number, "x", value, "x", value, allow_inf=allow_inf, **bounds)


@pytest.mark.parametrize("value", NOT_NUMBERS)
def test_number_refuses_non_numbers_even_without_bounds(value: Any) -> None:
    refused(check_number, "lr", value, "lr", value, allow_inf=True)


@pytest.mark.parametrize(
    ("kwargs", "value", "expected"),
    [
        ({"minimum": 0.0}, -1.0, "x: must be a finite number >= 0, got -1.0"),
        ({"minimum": 0.0, "low_open": True}, 0.0, "x: must be a finite number > 0, got 0.0"),
        ({"minimum": 0.0, "low_open": True, "allow_inf": True}, math.nan, "x: must be a number > 0, got nan"),
        ({"minimum": 0.0, "maximum": 1.0}, 2, "x: must be a number in [0, 1], got 2"),
        ({"minimum": 0.0, "maximum": 1.0, "low_open": True}, 0, "x: must be a number in (0, 1], got 0"),
        ({"minimum": 0.0, "maximum": 1.0, "high_open": True}, 1.0, "x: must be a number in [0, 1), got 1.0"),
        (
            {"minimum": 0.5, "maximum": 2.0, "what": "the scale"},
            3.0,
            "x: the scale must be a number in [0.5, 2], got 3.0",
        ),
    ],
)
def test_number_message_names_the_interval_with_its_open_ends(kwargs: dict[str, Any], value: Any, expected: str):
    assert refused(check_number, "x", value, "x", value, **kwargs) == expected


# --- check_fraction ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("low_open", "high_open"), list(itertools.product([False, True], repeat=2)))
def test_fraction_is_a_number_in_zero_one_with_the_chosen_ends(low_open: bool, high_open: bool) -> None:
    for value in [*GRID_VALUES, 0.999, 1e-300]:
        if reference_accepts(value, 0.0, 1.0, low_open, high_open, allow_inf=False):
            out = check_fraction("p", value, low_open=low_open, high_open=high_open)
            assert type(out) is float and out == value
        else:
            refused(check_fraction, "p", value, "p", value, low_open=low_open, high_open=high_open)


def test_fraction_default_is_zero_open_one_closed() -> None:
    assert check_fraction("p", 1) == 1.0
    assert check_fraction("p", 1e-12) == 1e-12
    message = refused(check_fraction, "p", 0.0, "p", 0.0, what="the keep probability")
    assert message == "p: the keep probability must be a number in (0, 1], got 0.0"


@pytest.mark.parametrize("value", NOT_NUMBERS)
def test_fraction_refuses_non_numbers(value: Any) -> None:
    refused(check_fraction, "p", value, "p", value, low_open=False)


# --- check_int ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "minimum"), [(0, 0), (1, 1), (5, 1), (-3, -3), (2**70, 1), (7, -10)])
def test_int_accepts_ints_at_or_above_the_minimum_unchanged(value: int, minimum: int) -> None:
    out = check_int("k", value, minimum)
    assert type(out) is int and out == value
    assert check_int("k", value, minimum, optional=True) == value


@pytest.mark.parametrize(
    ("value", "minimum"),
    [(0, 1), (-1, 0), (True, 0), (False, 0), (2.0, 1), (1.5, 1), (math.inf, 1), (math.nan, 1), ("3", 1), (None, 1)],
)
def test_int_refuses_bools_floats_strings_none_and_small_ints(value: Any, minimum: int) -> None:
    message = refused(check_int, "k", value, "k", value, minimum, what="the interval")
    assert message == f"k: the interval must be an int >= {minimum}, got {value!r}"


def test_int_optional_takes_none_and_says_so_when_refusing() -> None:
    assert check_int("k", None, 1, optional=True) is None
    message = refused(check_int, "k", 0, "k", 0, 1, optional=True)
    assert message == "k: must be an int >= 1 or None, got 0"
    refused(check_int, "k", True, "k", True, 0, optional=True)


# --- check_choice ------------------------------------------------------------------------------------------------
CHOICES = ("tensor", "module", "block")


@pytest.mark.parametrize("value", CHOICES)
def test_choice_accepts_each_choice_as_is(value: str) -> None:
    assert check_choice("arms", value, CHOICES) is value


@pytest.mark.parametrize("value", ["layer", "Tensor", "tensor ", "", None, 0, True, ["tensor"], ("tensor",)])
def test_choice_refuses_anything_else_and_lists_the_choices(value: Any) -> None:
    message = refused(check_choice, "arms", value, "arms", value, CHOICES)
    assert message == f"arms: expected one of 'tensor', 'module', 'block', got {value!r}"


# --- check_bool --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [True, False])
def test_bool_accepts_true_and_false(value: bool) -> None:
    assert check_bool("flag", value) is value


@pytest.mark.parametrize("value", [0, 1, 1.0, "true", "False", "yes", None, np.bool_(True), torch.tensor(True)])
def test_bool_refuses_numbers_strings_and_array_bools(value: Any) -> None:
    message = refused(check_bool, "flag", value, "flag", value)
    assert message == f"flag: must be True or False, got {value!r}"


# --- check_seed --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [None, 0, 1, -7, 2**63 - 1, 2**64 - 1, -(2**63)])
def test_seed_accepts_any_int_a_generator_takes_and_none(value: int | None) -> None:
    assert check_seed("seed", value) is value
    if value is not None:
        torch.Generator().manual_seed(value)  # the reference: torch takes it


@pytest.mark.parametrize("value", [2**64, 2**80, -(2**63) - 1])
def test_seed_refuses_ints_a_generator_cannot_take(value: int) -> None:
    with pytest.raises((ValueError, RuntimeError, OverflowError)):
        torch.Generator().manual_seed(value)  # the reference: torch refuses it, with another message
    message = refused(check_seed, "seed", value, "seed", value)
    assert message.startswith("seed: must be an int in [-2**63, 2**64 - 1]")


@pytest.mark.parametrize("value", [True, False, 1.0, 1.5, "0", "zero", math.nan, [0]])
def test_seed_refuses_bools_floats_and_strings(value: Any) -> None:
    message = refused(check_seed, "seed", value, "seed", value)
    assert message == f"seed: must be an int in [-2**63, 2**64 - 1] (a torch generator's seed) or None, got {value!r}"
