"""The step engine imports nothing from Lightning, and mixin, callback and engine import one another one way.

Read from the source (every ``import`` statement, also inside functions), since importing ``lightning_slsam``
itself loads the callbacks and Lightning.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_slsam"


def imported_modules(module: str) -> set[str]:
    """The modules a ``lightning_slsam`` module's source imports, anywhere in the file (absolute names)."""
    path = PACKAGE.joinpath(*module.split(".")[1:])
    source = path.with_suffix(".py") if path.with_suffix(".py").exists() else path / "__init__.py"
    names: set[str] = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names.add(node.module)
            # ``from lightning_slsam import perturbation``: the submodule itself
            names.update(
                f"{node.module}.{alias.name}"
                for alias in node.names
                if PACKAGE.joinpath(*f"{node.module}.{alias.name}".split(".")[1:]).with_suffix(".py").exists()
            )
    return names


def closure_of(module: str) -> set[str]:
    """``module`` and every ``lightning_slsam`` module it imports, transitively (package ``__init__`` aside)."""
    seen: set[str] = set()
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        todo += [m for m in imported_modules(name) if m.startswith("lightning_slsam.")]
    return seen


def _lightning_imports(name: str) -> set[str]:
    return {m for m in imported_modules(name) if m == "lightning" or m.startswith(("lightning.", "pytorch_"))}


METHOD_MODULES = sorted(f"lightning_slsam.methods.{p.stem}" for p in (PACKAGE / "methods").glob("*.py"))


@pytest.mark.parametrize("top", ["lightning_slsam.engine.step", "lightning_slsam.optim", *METHOD_MODULES])
def test_the_engine_the_methods_and_optim_import_no_lightning(top: str) -> None:
    """The step engine, every module under ``methods/`` (SSAM's Fisher samples reach it through the adapter)
    and the plain-PyTorch API, with everything they import, never import Lightning."""
    modules = closure_of(top)
    assert top in modules
    for name in sorted(modules):
        assert not _lightning_imports(name), f"{name} imports {_lightning_imports(name)}"
    assert (
        "lightning_slsam.lightning_adapter.mixin" not in modules
        and "lightning_slsam.lightning_adapter.callback" not in modules
    )


def test_the_lightning_sample_drawing_is_the_adapters() -> None:
    assert _lightning_imports("lightning_slsam.lightning_adapter.fisher_samples")
    assert "lightning_slsam.lightning_adapter.fisher_samples" in closure_of(
        "lightning_slsam.lightning_adapter.callback"
    )
    assert "lightning_slsam.methods.fisher_score" in closure_of("lightning_slsam.methods.ssam")
    assert len(METHOD_MODULES) >= 10


@pytest.mark.parametrize(
    ("module", "must_not_reach"),
    [
        ("lightning_slsam.lightning_adapter.callback", "lightning_slsam.lightning_adapter.mixin"),
        ("lightning_slsam.engine.step", "lightning_slsam.lightning_adapter.callback"),
        ("lightning_slsam.engine.step", "lightning_slsam.optim"),
    ],
)
def test_no_import_cycle(module: str, must_not_reach: str) -> None:
    assert must_not_reach not in closure_of(module)
    assert "lightning_slsam.engine.step" in closure_of("lightning_slsam.lightning_adapter.mixin")
    assert "lightning_slsam.engine.step" in closure_of("lightning_slsam.optim")
