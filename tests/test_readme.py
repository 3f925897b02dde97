"""The README's two quick-start commands are what CI and users run: keep them honest."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = quick.split("```bash\n")[1:]
    return [line for block in blocks for line in block.split("```")[0].splitlines() if not line.startswith("#")]


def test_readme_has_exactly_two_commands() -> None:
    commands = _readme_commands()
    assert len(commands) == 2, commands
    assert all(c.startswith("python3 -m venv .venv && ") for c in commands)


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    test_command = _readme_commands()[1]
    assert "pytest" in test_command
    assert test_command in ci


def test_main_job_is_slsam_train_on_the_offline_default() -> None:
    """The main command runs slsam-train with no overrides: the offline default experiment (it runs end to end,
    shrunk, in tests/test_cli.py::test_default_experiment_runs_end_to_end)."""
    main = _readme_commands()[0]
    assert main.endswith("&& .venv/bin/slsam-train")
    assert 'slsam-train = "lightning_slsam.app.cli:main"' in (ROOT / "pyproject.toml").read_text()
    config = (ROOT / "conf" / "config.yaml").read_text()
    assert "- experiment: digits_resnet20" in config


def _installed_packages(command: str) -> set[str]:
    """The packages of the extras that ``pip install ... -e '.[x,y]'`` in ``command`` pulls, following the extras
    that name other extras of lightning-slsam (``lightning-slsam[all]``)."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (requested,) = re.findall(r"-e '\.\[([\w,-]+)\]'", command)
    pending, seen, packages = requested.split(","), set(), set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for requirement in extras[extra]:
            name = re.match(r"[\w.-]+", requirement).group(0).lower()
            if name == "lightning-slsam":
                pending += re.search(r"\[(.*)\]", requirement).group(1).split(",")
            else:
                packages.add(name)
    return packages


def test_the_commands_install_the_extras_they_use() -> None:
    """The main job (the default experiment reads scikit-learn's digits) installs the extra with scikit-learn; the
    test command installs every extra the library knows (the tests use them all)."""
    main, tests = _readme_commands()
    assert "scikit-learn" in _installed_packages(main)
    from lightning_slsam.loading.optional_dependencies import OPTIONAL_MODULES

    hub_only = {"datasets", "timm"}  # need a network; the tests stand in for them
    assert {package for package, _ in OPTIONAL_MODULES.values()} - hub_only <= _installed_packages(tests)


def test_quickstart_script_runs_shrunk(tmp_path: Path) -> None:
    """experiments/digits_quickstart.py (the comparison without Hydra), one epoch and one seed."""
    out = tmp_path / "records.json"
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "digits_quickstart.py"),
            "--epochs",
            "1",
            "--seeds",
            "0",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| slsam |" in result.stdout
    records = json.loads(out.read_text())
    assert {r["method"] for r in records} == {"base", "sam", "slsam"}
    for record in records:
        assert 0.0 <= record["best_val_acc"] <= 1.0
        assert 0.0 < record["active_ratio"] <= 1.0


def _copy_checkout(destination: Path) -> None:
    """What a fresh clone of this working tree holds: the tracked files and the untracked ones git does not ignore
    (so uncommitted work is tested too), symlinks kept as symlinks; nothing else (no .venv, no ../shared)."""
    try:
        listing = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError) as error:
        pytest.skip(f"not a git checkout, or no git: {error}")
    for name in sorted({n for n in listing.decode().split("\0") if n}):
        source, target = ROOT / name, destination / name
        if not (source.exists() or source.is_symlink()):  # deleted in the working tree, not yet committed
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(os.readlink(source))
        else:
            shutil.copy2(source, target)


@pytest.mark.slow
def test_main_command_runs_on_a_clone_without_shared(tmp_path: Path) -> None:
    """The README's main job (``slsam-train``, no overrides but a shrunk run) from a copy of the checkout that has no
    ``../shared`` beside it and no weights variable: the default experiment finds everything in the package."""
    clone = tmp_path / "lightning-slsam"
    _copy_checkout(clone)
    assert not (clone.parent / "shared").exists()
    env = {k: v for k, v in os.environ.items() if k not in ("SLSAM_RESNET20_WEIGHTS", "HYDRA_FULL_ERROR")}
    env["PYTHONPATH"] = str(clone)
    # slsam-train is lightning_slsam.app.cli:main; run it as the clone's module and check it is the clone's package
    launcher = (
        "import runpy, sys\n"
        "import lightning_slsam\n"
        f"assert lightning_slsam.__file__.startswith({str(clone)!r}), lightning_slsam.__file__\n"
        "sys.argv = ['slsam-train', *sys.argv[1:]]\n"
        "runpy.run_module('lightning_slsam.app.cli', run_name='__main__')\n"
    )
    shrink = ["trainer.max_epochs=1", "data.train_limit=64", "trainer.limit_val_batches=2"]
    result = subprocess.run(
        [sys.executable, "-c", launcher, *shrink],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "best val/acc:" in result.stdout
    (record_path,) = (clone / "outputs").rglob("result.json")
    record = json.loads(record_path.read_text())
    assert record["experiment"] == "digits_resnet20" and record["method"] == "slsam"
    assert record["config"]["model"]["weights"] == "packaged"
    assert record["steps"] == 1 and 0.0 <= record["best_metric"] <= 1.0
