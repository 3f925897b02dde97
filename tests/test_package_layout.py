"""The tests mirror the package: every module under ``lightning_slsam/`` has a test module.

A module ``lightning_slsam/<path>/<stem>.py`` (``__init__.py`` files aside) is covered when ``tests/test_<stem>.py``
exists, or when :data:`TESTED_IN` names the test modules that exercise it; each of those must exist and name the
module in its source (its dotted import path or its stem as a word, or one of the names in :data:`REACHED_AS`
through which it reaches the module). A module that no test exercises goes in :data:`NOT_YET_TESTED`, with why.
A new module without any of these fails here.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
PACKAGE = TESTS.parent / "lightning_slsam"

#: module (relative to ``lightning_slsam/``) -> the test modules that exercise it, for a module without its own
#: ``tests/test_<stem>.py``. List only a test that really runs the module's code and checks what it does.
TESTED_IN: dict[str, list[str]] = {
    "engine/arm_groups.py": ["test_slsam_levers.py"],  # select_arms and SL-SAM's always_active
    "lightning_adapter/callback.py": ["test_lightning_features.py", "test_method_options.py", "test_methods.py"],
    "loading/checkpoint_files.py": ["test_faults.py"],  # empty, truncated, foreign checkpoint and weights files
    "app/config_schema.py": ["test_method_options.py"],  # METHOD_SCHEMAS against each method's definition
    "data/cifar.py": ["test_data.py"],
    "data/digits.py": ["test_data.py"],
    "data/glue.py": ["test_data.py"],
    "data/instruction.py": ["test_causal_lm.py"],  # the label mask, the authors' split, packing, bad records
    "data/label_noise.py": ["test_data.py"],
    "data/resumable_loader.py": ["test_faults.py"],  # exact mid-epoch resume with a ResumableDataLoader
    "data/text_tsv.py": ["test_data.py", "test_faults.py"],
    "data/tokenized_text.py": ["test_data.py"],  # PaddingCollate, the text data modules' datasets
    "data/tsv_file.py": ["test_data.py", "test_faults.py"],  # quoted fields; a non-UTF-8 line named
    # SSAM-F's samples drawn from the Trainer's loader (num_samples)
    "lightning_adapter/fisher_samples.py": ["test_ssam.py"],
    # schedulers stepped under manual optimization
    "lightning_adapter/lr_schedules.py": ["test_lightning_features.py", "test_models.py"],
    "methods/base.py": ["test_methods.py"],
    "engine/method.py": ["test_arsam.py"],  # PassOne handed to a method's hooks by hand
    "methods/lagnp.py": ["test_methods.py"],
    "methods/looksam.py": ["test_methods.py"],
    "engine/method_options.py": ["test_method_options.py"],
    "methods/registry.py": ["test_method_options.py"],
    "methods/rst.py": ["test_methods.py"],
    "methods/sam.py": ["test_methods.py"],
    "methods/slsam.py": ["test_methods.py", "test_slsam_levers.py"],
    "methods/sparse_msam.py": ["test_msam.py"],  # sparse_msam against its reference, in both APIs
    "lightning_adapter/mixin.py": ["test_step.py", "test_module_conversion.py"],
    "models/byte_tokenizer.py": ["test_causal_lm.py"],  # the tiny causal LM's tokenizer
    "models/classifier.py": ["test_models.py"],
    "models/factory.py": ["test_cli.py", "test_faults.py"],  # the configs' image networks, built by slsam-train
    "models/hf_pretrained.py": ["test_models.py", "test_data.py"],  # the bundled MiniLM (minilm_path)
    "models/optimizer_config.py": ["test_models.py"],  # the classifier's optimizer and scheduler factories
    "models/resnet_cifar.py": ["test_models.py"],
    "models/small_cnn.py": ["test_readme.py"],  # experiments/digits_quickstart.py trains Classifier(SmallCNN())
    "models/text_classifier.py": ["test_models.py"],
    "models/timm_vit_weights.py": ["test_models.py"],
    "models/vision.py": ["test_models.py"],  # torchvision_resnet and vit
    "loading/optional_dependencies.py": ["test_light_install.py"],
    # sam_pass in each pass of a converted training_step
    "lightning_adapter/pass_context.py": ["test_module_conversion.py"],
    "lightning_adapter/probability_logging.py": ["test_logged_values.py"],
    "lightning_adapter/rng_state.py": ["test_faults.py"],
    "engine/run.py": ["test_finetuning.py", "test_faults.py"],  # the trainable set, the guard, recovery
    "old_paths.py": ["test_package_layout.py"],  # every 0.1 module path still imports, with a warning
    "app/run_stats.py": ["test_cli.py", "test_faults.py"],  # best/final metric in result.json, across a resume
    "engine/skipped_steps.py": ["test_faults.py"],
    "engine/sharding.py": ["test_sharded.py"],
    "app/warmup_schedule.py": ["test_faults.py"],  # scheduler=cosine in the resume runs (no test checks its LR values)
}

#: module -> names by which the tests in TESTED_IN reach it without naming the module itself (a class the package
#: re-exports, a config value or key, an error message it writes); any one of them, as a word, counts as a mention
REACHED_AS: dict[str, list[str]] = {
    "loading/checkpoint_files.py": ["is truncated or corrupt"],
    "data/resumable_loader.py": ["ResumableDataLoader"],
    "data/text_tsv.py": ["TextTSVDataModule"],
    "data/tsv_file.py": ["quoted", "not UTF-8"],
    "lightning_adapter/fisher_samples.py": ["num_samples"],
    "lightning_adapter/lr_schedules.py": ["lr_scheduler"],
    "engine/method.py": ["PassOne"],
    "engine/method_options.py": ["MethodOptions"],
    "methods/lagnp.py": ["LayerwiseGNP"],
    "lightning_adapter/mixin.py": ["SharpnessAwareMixin"],
    "models/hf_pretrained.py": ["minilm_path"],
    "models/optimizer_config.py": ["scheduler_interval"],
    "models/small_cnn.py": ["digits_quickstart"],
    "models/vision.py": ["torchvision_resnet", "vit"],
    "lightning_adapter/pass_context.py": ["sam_pass"],
    "app/run_stats.py": ["best_metric"],
    "app/warmup_schedule.py": ["scheduler=cosine"],
}

#: modules that no test exercises yet, each with why (empty today: every module is covered above)
NOT_YET_TESTED: set[str] = set()


def package_modules() -> list[str]:
    """Every module file under ``lightning_slsam/``, recursively, ``__init__.py`` aside, as ``methods/sam.py``
    (files reached through a link out of the package, such as ``lightning_slsam/conf``, are not the package's)."""
    root = PACKAGE.resolve()
    modules = []
    for path in PACKAGE.rglob("*.py"):
        if path.name == "__init__.py" or not path.resolve().is_relative_to(root):
            continue
        modules.append(path.relative_to(PACKAGE).as_posix())
    return sorted(modules)


MODULES = package_modules()


def own_test(module: str) -> Path:
    return TESTS / f"test_{Path(module).stem}.py"


def dotted(module: str) -> str:
    return "lightning_slsam." + module.removesuffix(".py").replace("/", ".")


def mentions(source: str, name: str) -> bool:
    """Whether ``name`` occurs in ``source`` as a whole word (not inside a longer identifier)."""
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", source) is not None


def test_the_modules_are_found() -> None:
    assert len(MODULES) >= 50, MODULES
    assert {
        "lightning_adapter/callback.py",
        "engine/perturbation.py",
        "methods/sam.py",
        "data/cifar.py",
        "models/vision.py",
    } <= set(MODULES)
    assert not any(m.endswith("__init__.py") or m.startswith("conf/") for m in MODULES)


@pytest.mark.parametrize("module", MODULES)
def test_every_module_has_a_test(module: str) -> None:
    assert own_test(module).exists() or module in TESTED_IN or module in NOT_YET_TESTED, (
        f"lightning_slsam/{module} has no test: add tests/{own_test(module).name}, or name the test modules that "
        f"exercise it in TESTED_IN (or, if none does, add it to NOT_YET_TESTED with why) in {Path(__file__).name}"
    )


@pytest.mark.parametrize(("module", "tests"), sorted(TESTED_IN.items()))
def test_the_tests_named_for_a_module_exist_and_name_it(module: str, tests: list[str]) -> None:
    names = [dotted(module), Path(module).stem, *REACHED_AS.get(module, [])]
    assert tests and len(set(tests)) == len(tests), tests
    for test in tests:
        assert re.fullmatch(r"test_\w+\.py", test), test
        path = TESTS / test
        assert path.exists(), f"{module}: tests/{test} does not exist"
        source = path.read_text()
        assert any(mentions(source, name) for name in names), f"tests/{test} names none of {names}"


def test_the_mappings_name_only_modules_of_the_package() -> None:
    modules = set(MODULES)
    assert set(TESTED_IN) <= modules, set(TESTED_IN) - modules
    assert set(REACHED_AS) <= set(TESTED_IN), set(REACHED_AS) - set(TESTED_IN)
    assert not NOT_YET_TESTED - modules, NOT_YET_TESTED - modules
    assert not NOT_YET_TESTED & set(TESTED_IN), NOT_YET_TESTED & set(TESTED_IN)
    tested = {m for m in NOT_YET_TESTED if own_test(m).exists()}
    assert not tested, f"{tested} have their own test now: take them out of NOT_YET_TESTED"


@pytest.mark.parametrize(("module", "names"), sorted(REACHED_AS.items()))
def test_each_name_a_module_is_reached_as_is_used_by_one_of_its_tests(module: str, names: list[str]) -> None:
    """No stale alias: every name listed is used by at least one of the module's tests."""
    sources = [(TESTS / test).read_text() for test in TESTED_IN[module] if (TESTS / test).exists()]
    for name in names:
        assert any(mentions(source, name) for source in sources), f"{module}: no test in TESTED_IN uses {name!r}"


@pytest.mark.parametrize(
    ("source", "name", "expected"),
    [
        ("from lightning_slsam.methods.sam import SAMOptions", "lightning_slsam.methods.sam", True),
        ("from lightning_slsam.methods.sam_extra import X", "lightning_slsam.methods.sam", False),
        ("import lightning_slsam.models.factory.build_network", "factory", True),
        ("def test_text_tsv_quoted(): ...", "text_tsv", False),
        ("data=text_tsv", "text_tsv", True),
        ("match='not UTF-8 text'", "not UTF-8", True),
    ],
)
def test_a_mention_is_a_whole_word(source: str, name: str, expected: bool) -> None:
    assert mentions(source, name) is expected


# --- the layers: folders whose imports point one way -------------------------------------------------------------
#: folder (or top-level module) -> the package folders its modules may import, its own included; a folder lower in
#: this list never imports one above it. ``engine`` and ``methods`` import no Lightning either (below).
LAYERS: dict[str, set[str]] = {
    "engine": {"engine"},
    "methods": {"engine", "methods"},
    "loading": {"loading"},
    "lightning_adapter": {"engine", "methods", "lightning_adapter"},
    "optim.py": {"engine", "methods"},
    "models": {"engine", "methods", "lightning_adapter", "loading", "models"},
    "data": {"loading", "models", "data"},
    "app": {"engine", "methods", "lightning_adapter", "loading", "models", "data", "app"},
}
#: modules outside the layers: the package's exports and the old import paths
OUTSIDE_LAYERS = {"old_paths.py"}


def layer_of(module: str) -> str:
    return module.split("/")[0] if "/" in module else module


def package_imports(module: str) -> set[str]:
    """The ``lightning_slsam`` modules (dotted, below the package) that ``module`` imports, at any depth of its code."""
    tree = ast.parse((PACKAGE / module).read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lightning_slsam":
            base = node.module.removeprefix("lightning_slsam").lstrip(".")
            found |= {a.name for a in node.names} if not base else {base}
        elif isinstance(node, ast.Import):
            found |= {
                a.name.removeprefix("lightning_slsam.") for a in node.names if a.name.startswith("lightning_slsam.")
            }
    return found


def other_imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / module).read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
    return names


def test_every_module_sits_in_a_layer() -> None:
    top_level = {m for m in MODULES if "/" not in m} - OUTSIDE_LAYERS
    assert top_level == {"optim.py"}, f"a module outside the layer folders: {sorted(top_level - {'optim.py'})}"
    assert {layer_of(m) for m in MODULES} - OUTSIDE_LAYERS == set(LAYERS)


@pytest.mark.parametrize("module", [m for m in MODULES if m not in OUTSIDE_LAYERS])
def test_imports_point_down_the_layers(module: str) -> None:
    allowed = LAYERS[layer_of(module)]
    for target in package_imports(module):
        assert target.split(".")[0] in allowed, (
            f"lightning_slsam/{module} imports lightning_slsam.{target}, from a layer {layer_of(module)} may not use"
        )


@pytest.mark.parametrize("module", [m for m in MODULES if layer_of(m) in {"engine", "methods"} or m == "optim.py"])
def test_the_engine_methods_and_plain_adapter_import_no_lightning(module: str) -> None:
    assert not {"lightning", "pytorch_lightning", "lightning_fabric"} & other_imports(module), module


def test_the_layer_rule_catches_an_upward_import(tmp_path: Path) -> None:
    """The rule reads real imports: an engine module that imported the callback would be caught."""
    source = (PACKAGE / "engine/arms.py").read_text()
    assert package_imports("engine/arms.py") == set()
    fake = PACKAGE / "engine" / "_layer_probe.py"
    fake.write_text(source + "\n\ndef _f():\n    from lightning_slsam.lightning_adapter import callback\n")
    try:
        assert package_imports("engine/_layer_probe.py") == {"lightning_adapter"}
        with pytest.raises(AssertionError, match="from a layer engine may not use"):
            test_imports_point_down_the_layers("engine/_layer_probe.py")
    finally:
        fake.unlink()


def test_old_import_paths_give_the_same_module_with_a_warning() -> None:
    import importlib
    import sys

    from lightning_slsam.old_paths import MOVED

    for old, new in MOVED.items():
        sys.modules.pop(f"lightning_slsam.{old}", None)
        with pytest.warns(DeprecationWarning, match=rf"^lightning_slsam\.{re.escape(old)} moved to lightning_slsam\."):
            module = importlib.import_module(f"lightning_slsam.{old}")
        assert module is importlib.import_module(f"lightning_slsam.{new}")
        assert module.__spec__.name == f"lightning_slsam.{new}"
