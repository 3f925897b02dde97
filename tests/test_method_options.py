"""Each method is defined once, by its options class: the callback, the plain-PyTorch optimizer, the Hydra schema
and the config file all take their arguments from it, and its checks run before any training."""

from __future__ import annotations

import dataclasses
import inspect
import math
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import IN_FEATURES, NUM_CLASSES, SHRINK, TinyNet, compose_config, make_dataset
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

import lightning_slsam
from lightning_slsam import optim
from lightning_slsam.app.cli import instantiate_group
from lightning_slsam.app.config_schema import METHOD_SCHEMAS
from lightning_slsam.engine.method_options import MethodOptions
from lightning_slsam.engine.step_options import EXTRA, StepOptions
from lightning_slsam.lightning_adapter.callback import CALLBACKS, LightningOptions, SharpnessAware
from lightning_slsam.methods.registry import METHOD_OPTIONS

CONF = Path(__file__).resolve().parents[1] / "conf" / "method"
NAMES = sorted(METHOD_OPTIONS)
STEP = [f.name for f in dataclasses.fields(StepOptions)]
LIGHTNING = [f.name for f in dataclasses.fields(LightningOptions)]

#: what a plain-PyTorch optimizer takes besides the definition's arguments, where a closure does not give it
PLAIN_DATA = {"ssam_f": ["fisher_data", "fisher_loss"]}

#: one value per (method, argument) that its options must refuse, with the argument named in the error
BAD: list[tuple[str, str, Any]] = [
    *[(name, "rho", value) for name in NAMES if name != "base" for value in (-0.1, math.inf, math.nan, "0.1", True)],
    ("sam", "eta", -1.0),
    ("sam", "adaptive", "yes"),
    ("asam", "eta", -0.5),
    ("looksam", "k", 0),
    ("looksam", "k", 2.0),
    ("looksam", "alpha", -0.1),
    ("rst", "p", 1.5),
    ("rst", "seed", 1.5),
    ("lagnp", "alpha", 1.1),
    ("lagnp", "layer_fraction", 0.0),
    ("lagnp", "reselect_every", 0),
    ("arsam", "threshold", -1.0),
    ("arsam", "max_interval", 0),
    ("arsam", "mix_steps", -1),
    ("slsam", "sparsity", 0.0),
    ("slsam", "sparsity", 1.5),
    ("slsam", "bandit_lr", math.inf),
    ("slsam", "sampler", "thompson"),
    ("slsam", "norm_scale", "max"),
    ("slsam", "top_fraction", 0.0),
    ("slsam", "always_active", [""]),
    ("slsam", "max_update_scale", 0.5),
    ("slsam_noisy", "max_update_scale", math.inf),
    ("slsam", "seed", "zero"),
]


@pytest.mark.parametrize("name", NAMES)
def test_the_callback_and_the_optimizer_take_exactly_the_definitions_arguments(name: str) -> None:
    options = METHOD_OPTIONS[name]
    assert issubclass(options, MethodOptions) and options.name == name
    own = list(options.field_names())
    callback = CALLBACKS[name]
    assert callback.options_class is options
    assert list(inspect.signature(callback).parameters) == [*own, *LIGHTNING, *STEP, EXTRA]
    plain = getattr(optim, callback.__name__)
    assert plain.options_class is options
    leading = ["model", "base_optimizer", *PLAIN_DATA.get(name, []), "backward", "scaler"]
    assert list(inspect.signature(plain).parameters) == [*leading, *own, *STEP, EXTRA]
    assert getattr(lightning_slsam, callback.__name__) is callback


@pytest.mark.parametrize("name", NAMES)
def test_defaults_come_from_the_definition_everywhere(name: str) -> None:
    options = METHOD_OPTIONS[name]
    defaults = options().as_dict()
    callback = CALLBACKS[name]()
    assert callback.options == options()
    schema = OmegaConf.structured(METHOD_SCHEMAS[name])
    assert schema._target_ == f"lightning_slsam.{CALLBACKS[name].__name__}"
    for key, value in defaults.items():
        assert schema[key] == value, key
    assert schema.arms == options.default_arms or (schema.arms is None and options.default_arms == "tensor")
    assert set(schema) == {"_target_", *defaults, *LIGHTNING, *STEP}


@pytest.mark.parametrize("name", NAMES)
def test_the_callback_reads_its_arguments_as_attributes(name: str) -> None:
    callback = CALLBACKS[name]()
    for key, value in callback.options.as_dict().items():
        assert getattr(callback, key) == value, key
    with pytest.raises(AttributeError, match="no_such_argument"):
        callback.no_such_argument  # noqa: B018
    with pytest.raises(dataclasses.FrozenInstanceError):
        callback.options.rho = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("name", NAMES)
def test_config_file_sets_only_what_differs_from_the_definition(name: str) -> None:
    raw = OmegaConf.load(CONF / f"{name}.yaml")
    assert list(raw.defaults) == [f"schema_{name}"]
    fields = set(METHOD_OPTIONS[name].field_names()) | set(LIGHTNING) | set(STEP)
    defaults = METHOD_OPTIONS[name]().as_dict()
    for key in raw:
        if key == "defaults":
            continue
        assert key in fields, f"{name}.yaml: {key} is not an argument of {name}"
        text = OmegaConf.to_container(raw, resolve=False)[key]
        interpolation = isinstance(text, str) and text.startswith("${")
        assert interpolation or defaults.get(key) != text, f"{name}.yaml repeats the default of {key}"


@pytest.mark.parametrize("name", NAMES)
def test_every_config_builds_the_callback_of_its_name(name: str, tmp_path: Path) -> None:
    cfg = compose_config([f"method={name}", *SHRINK], str(tmp_path))
    callback = instantiate_group("method", cfg.method)
    assert type(callback) is CALLBACKS[name]
    assert callback.options.name == name
    module = TinyNet()
    method = callback.method_for(module, lightning_slsam.build_arms(module, callback.arms))
    assert method.name == name


@pytest.mark.parametrize(("name", "argument", "value"), BAD, ids=[f"{n}-{a}-{v!r}" for n, a, v in BAD])
def test_bad_values_are_refused_by_the_options_the_callback_and_the_optimizer(name: str, argument: str, value: Any):
    with pytest.raises(ValueError, match=rf"^{argument}:"):
        METHOD_OPTIONS[name](**{argument: value})
    with pytest.raises(ValueError, match=rf"^{argument}:"):
        CALLBACKS[name](**{argument: value})
    plain = getattr(optim, CALLBACKS[name].__name__)
    module = TinyNet()
    data = {"fisher_data": [(torch.zeros(2, 2), torch.zeros(2, dtype=torch.long))]} if name in PLAIN_DATA else {}
    with pytest.raises(ValueError, match=rf"^{argument}:"):
        plain(module, torch.optim.SGD(module.parameters(), lr=0.1), **data, **{argument: value})


@pytest.mark.parametrize(
    ("argument", "value"),
    [
        ("arms", "layer"),
        ("bn_running_stats", "pass2"),
        ("clip_grad_norm", 0.0),
        ("clip_grad_value", math.inf),
        ("check_ranks", "yes"),
        ("reuse_prefix", 1),
        ("max_skipped_steps", 0),
        ("accumulate", 0),
        ("history_every", -1),
    ],
)
@pytest.mark.parametrize("name", ["base", "sam", "slsam"])
def test_bad_step_options_are_refused(name: str, argument: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"^{argument}:"):
        CALLBACKS[name](**{argument: value})


@pytest.mark.parametrize("name", NAMES)
def test_an_unknown_argument_is_named_with_the_accepted_ones(name: str) -> None:
    with pytest.raises(TypeError, match=r"unexpected argument 'rh0'; it takes .*\brho\b|unexpected argument 'rh0'"):
        CALLBACKS[name](rh0=0.1)


def test_slsam_noisy_is_slsam_with_head_and_vectors_pinned_and_the_update_scaled() -> None:
    plus, plain = METHOD_OPTIONS["slsam_noisy"](), METHOD_OPTIONS["slsam"]()
    assert plus.max_update_scale == 5.0 and plain.max_update_scale is None
    assert plus.always_active == ["head", "vectors"] and plain.always_active == []
    assert dataclasses.replace(plus, max_update_scale=None, always_active=[]).as_dict() == plain.as_dict()
    assert METHOD_OPTIONS["slsam_noisy"]().always_active is not plus.always_active  # no shared default list


def test_slsam_plus_is_slsam_with_the_head_pinned_a_top_third_window_and_a_dense_update() -> None:
    plus, plain = METHOD_OPTIONS["slsam_plus"](), METHOD_OPTIONS["slsam"]()
    assert plus.dense_update and not plain.dense_update and plus.max_update_scale is None
    assert plus.always_active == ["head"] and plus.top_fraction == 0.34
    assert (
        dataclasses.replace(plus, dense_update=False, always_active=[], top_fraction=1.0).as_dict() == plain.as_dict()
    )
    assert (plus.label, dataclasses.replace(plus, dense_update=False).label) == ("slsam_plus", "slsam_plus_sparse")
    noisy = METHOD_OPTIONS["slsam_noisy"](dense_update=True, max_update_scale=None)
    assert noisy.label == "slsam_noisy_dense"


def test_slsam_plus_names_the_way_back_to_the_scaled_sparse_update() -> None:
    with pytest.raises(ValueError, match=r"^dense_update: .*max_update_scale=None, or dense_update=False"):
        METHOD_OPTIONS["slsam_plus"](max_update_scale=5.0)


def test_a_subclass_may_build_its_own_method() -> None:
    """``build_method`` stays the extension point for a method of one's own on the shared step."""

    class Mine(SharpnessAware):
        options_class = METHOD_OPTIONS["sam"]

        def build_method(self, layout: Any) -> lightning_slsam.Method:
            return lightning_slsam.SAMMethod(rho=0.0, adaptive=False, eta=0.01)

    module = TinyNet()
    method = Mine().method_for(module, lightning_slsam.build_arms(module, "tensor"))
    assert method.rho == 0.0 and method.layout is not None


@pytest.mark.parametrize("name", NAMES)
def test_a_methods_defaults_live_only_in_its_options(name: str) -> None:
    """The ``Method`` a definition builds takes its arguments without defaults of its own, so a default cannot
    drift from the options class (as ``RSTMethod(seed=0)`` once did from ``RSTOptions.seed=None``)."""
    options = METHOD_OPTIONS[name]
    module = TinyNet()
    method = options().build(module, lightning_slsam.build_arms(module, options.default_arms))
    fields = set(options.field_names())
    for parameter in inspect.signature(type(method)).parameters.values():
        if parameter.name in fields:
            assert parameter.default is inspect.Parameter.empty, f"{type(method).__name__}({parameter.name}=...)"


# --- a method of one's own: its file plus the registry line --------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class HalfSAMOptions(lightning_slsam.engine.method_options.MethodOptions):
    """A toy method, as its own file would define it: SAM whose ascent is half as long.

    Args:
        rho: the radius before halving (>= 0; default 0.1).
    """

    name = "half_sam"

    rho: float = 0.1

    def __post_init__(self) -> None:
        self._set("rho", lightning_slsam.engine.argument_checks.check_rho(self.rho))

    def build(self, module: torch.nn.Module, layout: Any) -> lightning_slsam.Method:
        return lightning_slsam.SAMMethod(self.rho / 2, adaptive=False, eta=0.0)


@pytest.fixture
def half_sam(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[HalfSAMOptions]]:
    """HalfSAMOptions in the registry for one test (the one line a new method adds to methods/registry.py)."""
    from lightning_slsam.methods import registry

    monkeypatch.setitem(registry.METHOD_OPTIONS, "half_sam", HalfSAMOptions)
    yield HalfSAMOptions
    from hydra.core.config_store import ConfigStore

    for node in ("half_sam.yaml", "schema_half_sam.yaml"):  # the schemas register_schemas() stored for it
        ConfigStore.instance().repo.get("method", {}).pop(node, None)


def test_a_registered_method_gets_its_callback_optimizer_and_config(half_sam: type[HalfSAMOptions]) -> None:
    from lightning_slsam.app.config_schema import register_schemas
    from lightning_slsam.lightning_adapter.callback import callback_class

    callback = CALLBACKS["half_sam"]
    assert callback is callback_class("half_sam") and callback.__name__ == "HalfSAM"
    assert list(inspect.signature(callback).parameters) == ["rho", *LIGHTNING, *STEP, EXTRA]
    with pytest.raises(ValueError, match=r"^rho: "):
        callback(rho=-1.0)
    plain = optim.optimizer_class("half_sam")
    assert plain.options_class is half_sam and "rho" in inspect.signature(plain).parameters

    # the plain optimizer takes SAM's step at half the radius
    model, reference = TinyNet(), TinyNet()
    reference.load_state_dict(model.state_dict())
    x, y = torch.randn(8, IN_FEATURES), torch.randint(0, NUM_CLASSES, (8,))
    loss_of = lambda m: torch.nn.functional.cross_entropy(m.model(x), y)  # noqa: E731
    opt = plain(model, torch.optim.SGD(model.parameters(), lr=0.1), rho=0.2)
    ref = optim.SAM(reference, torch.optim.SGD(reference.parameters(), lr=0.1), rho=0.1)
    opt.step(lambda: loss_of(model))
    ref.step(lambda: loss_of(reference))
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q)

    # method=half_sam composes from the derived schema and instantiates the derived callback
    register_schemas()
    cfg = compose_config(["method=half_sam", "method.rho=0.3", *SHRINK])
    built = instantiate_group("method", cfg.method)
    assert type(built) is callback and built.options.rho == 0.3


def test_registering_refuses_a_taken_or_missing_name(half_sam: type[HalfSAMOptions]) -> None:
    from lightning_slsam.methods.registry import register

    @dataclasses.dataclass(frozen=True)
    class Nameless(lightning_slsam.engine.method_options.MethodOptions):
        pass

    with pytest.raises(ValueError, match=r"^Nameless\.name: a method needs a name"):
        register(Nameless)
    assert register(half_sam) is half_sam  # registering the same class again changes nothing
    with pytest.raises(ValueError, match=r"^OtherOptions\.name: 'half_sam' is already HalfSAMOptions's"):
        register(type("OtherOptions", (half_sam,), {}))
    with pytest.raises(ValueError, match=r"^method: unknown method 'nope'; registered: base, "):
        optim.optimizer_class("nope")


@pytest.mark.parametrize("name", NAMES)
def test_the_signatures_are_real_and_typed(name: str) -> None:
    """``__init__`` itself names every argument with its type and default (what IDEs and jsonargparse read), and
    keyword arguments given by name reach the options as they would through ``**``."""
    options = METHOD_OPTIONS[name]
    hints = typing.get_type_hints(options)
    for cls in (CALLBACKS[name], getattr(optim, CALLBACKS[name].__name__)):
        parameters = inspect.signature(cls.__init__).parameters
        for field in dataclasses.fields(options):
            parameter = parameters[field.name]
            assert parameter.annotation == hints[field.name], (cls, field.name)
            assert parameter.kind is inspect.Parameter.KEYWORD_ONLY
            if field.default is not dataclasses.MISSING:
                assert parameter.default == field.default, (cls, field.name)
    assert CALLBACKS[name](arms="module").options == options()


def test_a_subclass_with_its_own_init_keeps_it() -> None:
    class Tagged(lightning_slsam.SLSAM):
        def __init__(self, tag: str, **arguments: Any) -> None:
            super().__init__(**arguments)
            self.tag = tag

    class Fixed(lightning_slsam.SAM):
        def __init__(self) -> None:
            super().__init__(rho=0.2)

    class TaggedAgain(Tagged):
        pass

    tagged = TaggedAgain("x", sparsity=0.5)
    assert tagged.tag == "x" and tagged.options.sparsity == 0.5
    assert list(inspect.signature(TaggedAgain).parameters) == ["tag", "arguments"]  # the user's, untouched
    assert Fixed().options.rho == 0.2 and list(inspect.signature(Fixed).parameters) == []

    class FixedSLSAM(lightning_slsam.SLSAM):  # no __init__ of its own: the typed one, for its options
        pass

    assert list(inspect.signature(FixedSLSAM).parameters)[:2] == ["rho", "sparsity"]


def test_lightning_cli_passes_init_args_to_a_callback(tmp_path: Path) -> None:
    """LightningCLI (jsonargparse) reads the callback's typed signature: ``init_args`` reach the method's options."""
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n  max_steps: 2\n  logger: false\n  enable_checkpointing: false\n  enable_progress_bar: false\n"
        "  enable_model_summary: false\n  accelerator: cpu\n  callbacks:\n    - class_path: lightning_slsam.SLSAM\n"
        "      init_args:\n        rho: 0.07\n        sparsity: 0.5\n        arms: module\n        seed: 3\n"
    )
    cli = LightningCLI(TinyNet, run=False, save_config_callback=None, args=["--config", str(config)])
    callback = next(c for c in cli.trainer.callbacks if isinstance(c, lightning_slsam.SLSAM))
    assert callback.options == lightning_slsam.SLSAM(rho=0.07, sparsity=0.5, seed=3).options
    assert callback.arms == "module"
    cli.trainer.fit(cli.model, DataLoader(make_dataset(), batch_size=16))
    assert callback.steps == 2
