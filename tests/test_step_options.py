"""The shared step's options of ``lightning_slsam/engine/step_options.py``: ``StepOptions`` (defaults, normalisation and
refusals), ``split_arguments`` (each keyword goes to the first definition that has it; an unknown or renamed one is a
TypeError that says what to pass instead) and ``keyword_parameters`` (the fields as keyword-only parameters).

The expected splits are computed by a plain loop written here, on small dataclasses of the test's own and on the
real definitions (SSAM-F's options, which rename ``sparsity``, and ``StepOptions``).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import typing
from typing import Any, ClassVar

import pytest

from lightning_slsam.engine.arms import ARM_MODES
from lightning_slsam.engine.skipped_steps import DEFAULT_MAX_SKIPPED_STEPS
from lightning_slsam.engine.step_options import BN_RUNNING_STATS, StepOptions, keyword_parameters, split_arguments
from lightning_slsam.methods.ssam import SSAMDOptions, SSAMFOptions


# --- StepOptions -------------------------------------------------------------------------------------------------
def test_defaults() -> None:
    options = StepOptions()
    assert dataclasses.asdict(options) == {
        "arms": None,
        "bn_running_stats": "pass1",
        "clip_grad_norm": None,
        "clip_grad_value": None,
        "check_ranks": False,
        "reuse_prefix": True,
        "max_skipped_steps": 50,
    }
    assert DEFAULT_MAX_SKIPPED_STEPS == 50
    assert BN_RUNNING_STATS == ("pass1", "both")


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        *[("arms", mode) for mode in ("tensor", "module", "block")],
        ("bn_running_stats", "both"),
        ("clip_grad_norm", 1e-6),
        ("clip_grad_norm", 5.0),
        ("clip_grad_value", 0.5),
        ("check_ranks", True),
        ("reuse_prefix", False),
        ("max_skipped_steps", 1),
        ("max_skipped_steps", 10**6),
        ("max_skipped_steps", None),
    ],
)
def test_accepted_values_are_kept(argument: str, value: Any) -> None:
    options = StepOptions(**{argument: value})
    assert getattr(options, argument) == value and type(getattr(options, argument)) is type(value)
    others = {k: v for k, v in dataclasses.asdict(options).items() if k != argument}
    assert others == {k: v for k, v in dataclasses.asdict(StepOptions()).items() if k != argument}


def test_every_arms_mode_is_accepted() -> None:
    assert ARM_MODES == ("tensor", "module", "block")
    for mode in ARM_MODES:
        assert StepOptions(arms=mode).arms == mode


@pytest.mark.parametrize("argument", ["clip_grad_norm", "clip_grad_value"])
def test_an_int_clip_becomes_a_float(argument: str) -> None:
    value = getattr(StepOptions(**{argument: 3}), argument)
    assert type(value) is float and value == 3.0


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("arms", "layer"),
        ("arms", "Tensor"),
        ("arms", ""),
        ("arms", True),
        ("bn_running_stats", "pass2"),
        ("bn_running_stats", None),
        *[
            (key, value)
            for key in ("clip_grad_norm", "clip_grad_value")
            for value in (0.0, 0, -1.0, math.inf, -math.inf, math.nan, True, "1.0")
        ],
        ("check_ranks", 1),
        ("check_ranks", "yes"),
        ("check_ranks", None),
        ("reuse_prefix", 0),
        ("reuse_prefix", "false"),
        ("reuse_prefix", None),
        ("max_skipped_steps", 0),
        ("max_skipped_steps", -1),
        ("max_skipped_steps", 1.5),
        ("max_skipped_steps", 2.0),
        ("max_skipped_steps", True),
        ("max_skipped_steps", "50"),
    ],
    ids=lambda v: repr(v),
)
def test_refused_values_name_the_argument(argument: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"^{argument}: ") as info:
        StepOptions(**{argument: value})
    assert repr(value) in str(info.value)


def test_the_options_are_frozen() -> None:
    options = StepOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.clip_grad_norm = 1.0  # type: ignore[misc]


# --- split_arguments ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class First:
    a: int = 1
    shared: str = "first"


@dataclasses.dataclass
class Second:
    shared: str = "second"
    b: float = 2.0
    renamed: ClassVar[dict[str, str]] = {"old_b": "b"}


@dataclasses.dataclass
class Third:
    c: list[int] = dataclasses.field(default_factory=lambda: [1, 2])
    z: None = None


def reference_split(arguments: dict[str, Any], *definitions: type[Any]) -> list[dict[str, Any]]:
    """Each key to the first definition, in order, that has a field of that name."""
    parts: list[dict[str, Any]] = [{} for _ in definitions]
    for key, value in arguments.items():
        owners = [i for i, d in enumerate(definitions) if key in [f.name for f in dataclasses.fields(d)]]
        assert owners, key
        parts[owners[0]][key] = value
    return parts


@pytest.mark.parametrize(
    "arguments",
    [
        {},
        {"a": 5},
        {"shared": "x"},
        {"b": 3.0, "a": 0, "c": [9]},
        {"z": None, "shared": "y", "b": -1.0, "c": [], "a": 7},
    ],
)
@pytest.mark.parametrize("order", [(First, Second, Third), (Second, First, Third), (Third, Second, First)])
def test_split_sends_each_key_to_the_first_definition_that_has_it(arguments: dict[str, Any], order: tuple) -> None:
    parts = split_arguments("owner", arguments, *order)
    assert parts == reference_split(arguments, *order)
    assert len(parts) == len(order)
    for part, definition in zip(parts, order, strict=True):
        definition(**part)  # each part is a valid constructor call of its definition


def test_split_on_the_real_definitions() -> None:
    arguments = {"rho": 0.1, "clip_grad_norm": 1.0, "num_samples": 8, "arms": "module", "per_sample": "loop"}
    own, step = split_arguments("ssam_f", arguments, SSAMFOptions, StepOptions)
    assert own == {"rho": 0.1, "num_samples": 8, "per_sample": "loop"}
    assert step == {"clip_grad_norm": 1.0, "arms": "module"}
    assert own == reference_split(arguments, SSAMFOptions, StepOptions)[0]


@pytest.mark.parametrize("key", ["rh0", "A", "old", "renamed", "__init__"])
def test_an_unknown_key_is_a_type_error_naming_it_and_every_accepted_name(key: str) -> None:
    with pytest.raises(TypeError) as info:
        split_arguments("Mine", {"a": 1, key: 0}, First, Second, Third)
    message = str(info.value)
    assert message.startswith(f"Mine: unexpected argument {key!r}"), message
    accepted = re.search(r"it takes (.*)$", message)
    assert accepted is not None, message
    assert accepted.group(1).split(", ") == sorted({"a", "shared", "b", "c", "z"})


def test_an_unknown_key_on_the_real_definitions_names_rho() -> None:
    with pytest.raises(TypeError, match=r"^ssam_f: unexpected argument 'rh0'; it takes .*\brho\b"):
        split_arguments("ssam_f", {"rh0": 0.1}, SSAMFOptions, StepOptions)


@pytest.mark.parametrize("order", [(First, Second, Third), (Third, First, Second)])
def test_a_renamed_key_names_its_new_name(order: tuple) -> None:
    with pytest.raises(TypeError) as info:
        split_arguments("Mine", {"old_b": 1.0}, *order)
    message = str(info.value)
    assert message.startswith("Mine: argument 'old_b' was renamed 'b'"), message
    assert "b=..." in message


@pytest.mark.parametrize("options", [SSAMFOptions, SSAMDOptions])
def test_ssam_refuses_sparsity_with_unperturbed_fraction(options: type[Any]) -> None:
    assert options.renamed == {"sparsity": "unperturbed_fraction"}
    with pytest.raises(TypeError, match=r"argument 'sparsity' was renamed 'unperturbed_fraction'") as info:
        split_arguments(options.name, {"rho": 0.1, "sparsity": 0.5}, options, StepOptions)
    assert str(info.value).startswith(f"{options.name}: ")
    assert "pass unperturbed_fraction=..." in str(info.value)


def test_a_renamed_key_that_is_also_a_field_goes_to_the_field() -> None:
    """``renamed`` only speaks for keys no definition has."""

    @dataclasses.dataclass
    class HasOldB:
        old_b: int = 0

    assert split_arguments("Mine", {"old_b": 3}, Second, HasOldB) == [{}, {"old_b": 3}]


# --- keyword_parameters ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "definitions", [(First,), (First, Second, Third), (Third, First), (SSAMFOptions, StepOptions), (StepOptions,)]
)
def test_keyword_parameters_are_the_fields_keyword_only_with_their_defaults(definitions: tuple) -> None:
    parameters = keyword_parameters(*definitions)
    expected = [(f.name, getattr(d(), f.name)) for d in definitions for f in dataclasses.fields(d)]
    assert [(p.name, p.default) for p in parameters] == expected
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in parameters)
    hints = {f.name: typing.get_type_hints(d)[f.name] for d in definitions for f in dataclasses.fields(d)}
    assert all(p.annotation == hints[p.name] for p in parameters)  # resolved types, not strings


def test_keyword_parameters_make_a_signature() -> None:
    signature = inspect.Signature(keyword_parameters(SSAMFOptions, StepOptions))
    bound = signature.bind(rho=0.2, arms="block")
    bound.apply_defaults()
    assert bound.arguments["rho"] == 0.2 and bound.arguments["arms"] == "block"
    assert bound.arguments["num_samples"] == SSAMFOptions().num_samples == 128
    assert bound.arguments["max_skipped_steps"] == 50
    with pytest.raises(TypeError):
        signature.bind(0.2)  # keyword-only


def test_a_default_factory_gives_a_fresh_default() -> None:
    first, second = keyword_parameters(Third)[0], keyword_parameters(Third)[0]
    assert first.name == "c" and first.default == [1, 2] == second.default
    assert first.default is not second.default


def test_keyword_parameters_of_a_required_field_have_no_default() -> None:
    @dataclasses.dataclass(frozen=True)
    class Required:
        needed: int
        optional: int = 1

    parameters = keyword_parameters(Required)
    assert [(p.name, p.default) for p in parameters] == [("needed", inspect.Parameter.empty), ("optional", 1)]
