"""The module paths of release 0.1 (``lightning_slsam.callback``, ``lightning_slsam.step_engine``, ...) keep
importing, for one release, the module that now lives in a layer folder, with a ``DeprecationWarning`` that names
the new path. ``lightning_slsam.callback is lightning_slsam.lightning_adapter.callback``: one module object, so
``isinstance`` checks, ``mock.patch`` targets and pickles agree whichever path was used.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

#: old dotted path (below ``lightning_slsam.``) -> where the module lives now
MOVED: dict[str, str] = {
    "arms": "engine.arms",
    "arm_groups": "engine.arm_groups",
    "samplers": "engine.samplers",
    "perturbation": "engine.perturbation",
    "argument_checks": "engine.argument_checks",
    "step_options": "engine.step_options",
    "prefix_reuse": "engine.prefix_reuse",
    "attention_inputs": "engine.attention_inputs",
    "distributed": "engine.distributed",
    "skipped_steps": "engine.skipped_steps",
    "step_engine": "engine.step",
    "methods.interface": "engine.method",
    "methods.options": "engine.method_options",
    "callback": "lightning_adapter.callback",
    "mixin": "lightning_adapter.mixin",
    "pass_context": "lightning_adapter.pass_context",
    "fisher_samples": "lightning_adapter.fisher_samples",
    "probability_logging": "lightning_adapter.probability_logging",
    "rng_state": "lightning_adapter.rng_state",
    "module_conversion": "lightning_adapter.module_conversion",
    "lr_schedules": "lightning_adapter.lr_schedules",
    "cli": "app.cli",
    "config_schema": "app.config_schema",
    "run_stats": "app.run_stats",
    "warmup_schedule": "app.warmup_schedule",
    "report": "app.report",
    "sweep_summary": "app.sweep_summary",
    "checkpoint_files": "loading.checkpoint_files",
    "optional_dependencies": "loading.optional_dependencies",
}

PACKAGE = "lightning_slsam"


class _Alias(importlib.abc.Loader):
    """Hands out the module at its new path for an import of the old one."""

    def __init__(self, new: str) -> None:
        self.new = new
        self.spec: importlib.machinery.ModuleSpec | None = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(
            f"{spec.name} moved to {self.new}; the old path works until the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        module = importlib.import_module(self.new)
        self.spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        """The module ran when it was imported at its new path; the import system set its ``__spec__`` to the
        old path's, which is put back."""
        module.__spec__ = self.spec


class OldPathFinder(importlib.abc.MetaPathFinder):
    """Finds ``lightning_slsam.<old path>`` for the modules in :data:`MOVED`; nothing else."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        prefix = PACKAGE + "."
        if not fullname.startswith(prefix) or fullname[len(prefix) :] not in MOVED:
            return None
        new = prefix + MOVED[fullname[len(prefix) :]]
        return importlib.machinery.ModuleSpec(fullname, _Alias(new))


def install() -> None:
    """Put the finder on ``sys.meta_path`` once."""
    if not any(isinstance(finder, OldPathFinder) for finder in sys.meta_path):
        sys.meta_path.append(OldPathFinder())
