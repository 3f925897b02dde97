"""The Hydra app: every experiment and group option composes, the default runs end to end, bad values fail
before a model is built with the key named, and a multirun feeds slsam-report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SHRINK, compose_config
from hydra.errors import ConfigCompositionException
from omegaconf.errors import MissingMandatoryValue

from lightning_slsam import SharpnessAware
from lightning_slsam.app.cli import ConfigError, error_line, instantiate_group, main, train

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SST2 = ROOT.parent / "shared" / "data" / "sst2"


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


# Offline stand-ins for what needs a network or a GPU, so that every config can also be instantiated here.
OFFLINE = {
    "vit_cifar10": ["model.pretrained=false", "model.image_size=32", "model.patch_size=8", "data.image_size=32"],
    "deit_cifar100": ["model.pretrained=false", "model.image_size=32", "model.patch_size=8", "data.image_size=32"],
    "roberta_mnli": ["model.model_name_or_path=${minilm_path:}"],
}


@pytest.mark.parametrize("experiment", options("experiment"))
def test_every_experiment_composes(experiment: str, tmp_path: Path) -> None:
    cfg = compose_config([f"experiment={experiment}", *SHRINK], str(tmp_path))
    assert cfg.metric.startswith("val/")
    method = instantiate_group("method", cfg.method)
    assert isinstance(method, SharpnessAware)
    optimizer = instantiate_group("optimizer", cfg.optimizer)
    assert optimizer.func in (torch.optim.AdamW, torch.optim.SGD)
    if experiment in ("vit_cifar10", "deit_cifar100", "roberta_mnli"):  # GPU and network settings
        assert cfg.trainer.accelerator == "gpu"
        assert cfg.method.rho == 0.01 and cfg.method.sparsity == 0.2 and cfg.rho == 0.01


@pytest.mark.parametrize("method", [m for m in options("method") if not m.startswith("schema")])
def test_every_method_option_instantiates(method: str, tmp_path: Path) -> None:
    cfg = compose_config([f"method={method}", *SHRINK], str(tmp_path))
    callback = instantiate_group("method", cfg.method)
    assert isinstance(callback, SharpnessAware)
    assert cfg.method_label == method


@pytest.mark.parametrize(
    ("group", "option"),
    [(g, o) for g in ("optimizer", "scheduler", "logger", "trainer", "model", "data") for o in options(g)],
)
def test_every_group_option_composes(group: str, option: str, tmp_path: Path) -> None:
    overrides = [*(o for o in SHRINK if not o.startswith(f"{group}=")), f"{group}={option}"]
    if group == "model" and option in ("bert_base", "roberta_base"):
        overrides.append("model.model_name_or_path=${minilm_path:}")  # offline stand-in for the hub model
    cfg = compose_config(overrides, str(tmp_path))
    node = cfg[group]
    if (group == "scheduler" and option == "none") or (group == "logger" and option == "none"):
        assert not node
        return
    assert "_target_" in node
    if group in ("optimizer", "scheduler", "logger"):
        instantiate_group(group, node)
    if group == "trainer" and option == "cpu":
        instantiate_group(group, node, logger=False)


def test_default_experiment_runs_end_to_end(tmp_path: Path) -> None:
    cfg = compose_config([*SHRINK, "data.train_limit=128"], str(tmp_path))
    assert cfg.model.arch == "resnet20_cifar" and cfg.data._target_.endswith("DigitsDataModule")
    best = train(cfg)
    record = json.loads((tmp_path / "result.json").read_text())
    assert record["method"] == "slsam" and record["experiment"] == "digits_resnet20"
    assert record["best_metric"] == best and 0.0 <= best <= 1.0
    assert record["steps"] == 2 and 1.0 <= record["passes_per_step"] <= 2.0
    assert 0.0 < record["active_ratio"] <= 1.0
    history = torch.load(tmp_path / "probabilities.pt", weights_only=False)
    assert history["history"].shape[1] == len(history["arm_names"])


def _build_nothing(*args: object, **kwargs: object) -> None:
    raise AssertionError("a model was built although the configuration is invalid")


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("method.rho=-1", "method.rho"),
        ("method.sparsity=2", "method.sparsity"),
        ("method.bandit_lr=-0.5", "method.bandit_lr"),
        ("method.arms=layers", "method.arms"),
        ("data.batch_size=0", "data.batch_size"),
        ("seed=1.5", "seed"),
        ("metric=accuracy", "metric"),
    ],
)
def test_bad_values_fail_before_the_model_is_built(override: str, key: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("lightning_slsam.models.factory.build_network", _build_nothing)
    try:
        cfg = compose_config([override, *SHRINK], str(tmp_path))
    except ConfigCompositionException as error:  # caught by the schema at composition
        assert key.split(".")[-1] in str(error.__cause__ or error)
        return
    with pytest.raises(ConfigError, match=f"^{key}"):
        train(cfg)


def test_wrong_type_is_refused_at_composition(tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException) as error:
        compose_config(["method.rho=abc"], str(tmp_path))
    assert "rho" in str(error.value.__cause__ or error.value)


def test_unknown_group_option_names_the_group(tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException, match="method"):
        compose_config(["method=adamw_sam"], str(tmp_path))


def test_missing_data_path_names_the_key(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("lightning_slsam.models.factory.build_network", _build_nothing)
    cfg = compose_config(["experiment=sst2_minilm", *SHRINK], str(tmp_path))
    with pytest.raises(MissingMandatoryValue, match=r"data\.path"):
        train(cfg)


@pytest.mark.slow
def test_slsam_train_prints_one_line_for_a_config_error(tmp_path: Path) -> None:
    """``slsam-train`` with a bad value (the issue's missing weights file): exactly one line on stderr naming the key,
    no traceback, exit status 2."""
    line = "ConfigError: model.weights: no file at 'no_such_file.th'"
    command = [sys.executable, "-m", "lightning_slsam.app.cli", "model.weights=no_such_file.th", *SHRINK]
    command.append(f"hydra.run.dir={tmp_path}")
    env = {k: v for k, v in os.environ.items() if k != "HYDRA_FULL_ERROR"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env, check=False)
    assert result.returncode == 2, result.stderr[-4000:]
    assert result.stderr.splitlines() == [line]
    assert not (tmp_path / "result.json").exists()


def test_slsam_train_raises_the_config_error_with_hydra_full_error(tmp_path: Path, monkeypatch) -> None:
    """With ``HYDRA_FULL_ERROR=1`` the ConfigError leaves ``main`` (Hydra prints its full traceback). In-process: the
    same entry point as the console script, without another interpreter start."""
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    overrides = ["model.weights=no_such_file.th", *SHRINK, "hydra/job_logging=none", "hydra/hydra_logging=none"]
    monkeypatch.setattr(sys, "argv", ["slsam-train", *overrides, f"hydra.run.dir={tmp_path}"])
    with pytest.raises(ConfigError, match=r"^model\.weights: no file at 'no_such_file.th'$"):
        main()


@pytest.mark.parametrize(
    ("override", "line"),
    [
        (
            "method.rho=-1",
            "ConfigError: method.rho: the perturbation radius must be a finite number >= 0 "
            "(at most 3.4e+38, float32's largest), got -1.0",
        ),
        (
            "experiment=sst2_minilm",
            "ConfigError: data.path: no value given; set one on the command line (data.path=...)",
        ),
    ],
)
def test_the_line_slsam_train_prints_names_the_key(override: str, line: str, tmp_path: Path, monkeypatch) -> None:
    """What :func:`error_line` makes of the errors ``train`` raises (``main`` prints it, as tested above)."""
    monkeypatch.setattr("lightning_slsam.models.factory.build_network", _build_nothing)
    cfg = compose_config([override, *SHRINK], str(tmp_path))
    with pytest.raises((ConfigError, MissingMandatoryValue)) as error:
        train(cfg)
    assert error_line(error.value) == line


def test_error_line_leaves_other_errors_to_hydra() -> None:
    assert error_line(ConfigError("method.rho: bad")) == "ConfigError: method.rho: bad"
    assert error_line(ImportError("DigitsDataModule needs scikit-learn: pip install 'lightning-slsam[app]'")) == (
        "ImportError: DigitsDataModule needs scikit-learn: pip install 'lightning-slsam[app]'"
    )
    assert error_line(ImportError("cannot import name 'x' from 'torch'")) is None
    assert error_line(RuntimeError("CUDA out of memory")) is None


@pytest.mark.slow
def test_multirun_then_report(tmp_path: Path) -> None:
    """``slsam-train -m method=base,slsam`` (shrunk) and ``slsam-report`` on the sweep directory."""
    sweep = tmp_path / "sweep"
    command = [sys.executable, "-m", "lightning_slsam.app.cli", "-m", "method=base,slsam", *SHRINK]
    command += ["data.train_limit=128", f"hydra.sweep.dir={sweep}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    records = sorted(sweep.rglob("result.json"))
    assert len(records) == 2
    report = subprocess.run(
        [sys.executable, "-m", "lightning_slsam.app.report", str(sweep)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert report.returncode == 0, report.stderr[-4000:]
    text = (sweep / "report.md").read_text()
    assert "base" in text and "slsam" in text
    assert (sweep / "accuracy_vs_time.png").stat().st_size > 0


@pytest.mark.slow
def test_optuna_sweeper(tmp_path: Path) -> None:
    """``hydra/sweeper=optuna`` runs trials and returns the best metric to the sweeper."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "optuna"
    command = [
        sys.executable,
        "-m",
        "lightning_slsam.app.cli",
        "-m",
        "hydra/sweeper=optuna",
        "hydra.sweeper.n_trials=2",
    ]
    command += ["hydra.sweeper.direction=maximize", "+hydra.sweeper.params.rho='interval(0.01,0.1)'", *SHRINK]
    command += ["data.train_limit=64", f"hydra.sweep.dir={sweep}"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = (sweep / "optimization_results.yaml").read_text()
    assert "best_params" in summary and "rho" in summary
    assert len(list(sweep.rglob("result.json"))) == 2
