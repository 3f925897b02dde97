"""The README's two quick-start commands are what CI and users run: keep them honest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    assert 'slsam-train = "lightning_slsam.cli:main"' in (ROOT / "pyproject.toml").read_text()
    config = (ROOT / "conf" / "config.yaml").read_text()
    assert "- experiment: digits_resnet20" in config


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
