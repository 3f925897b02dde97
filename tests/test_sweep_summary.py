"""The sweep summary (``lightning_slsam.app.sweep_summary``) of a fabricated sweep in slsam-train's formats.

The sweep has what ``slsam-train -m`` leaves: per run ``result.json`` (with the whole config), ``.hydra/``,
``cli.log``, the CSV logger's ``logs/version_0/metrics.csv`` and, for SL-SAM, ``probabilities.pt``; a
``multirun.yaml`` at the top. The summary must give ``slsam-report`` the same table as the run folders, keep every
record value exactly, and keep the validation curve and a downsampled history equal to plain references here.
"""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_slsam.app.report import (
    _history_figure,
    _probability_figure,
    load_records,
    main,
    markdown_table,
    records_from_summary,
    summarize,
    write_report,
)
from lightning_slsam.app.sweep_summary import (
    HISTORY_POINTS,
    build_summary,
    downsample_history,
    flatten_config,
    validation_curve,
    write_summary,
)
from lightning_slsam.app.sweep_summary import main as summary_main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# method label -> (method, seeds); the SL-SAM labels write probabilities.pt
METHODS = {
    "base": ("base", (0, 1, 2)),
    "sam": ("sam", (0, 1, 2)),
    "slsam_s0.2": ("slsam", (0, 1)),
    "slsam_uniform": ("slsam_uniform", (0,)),
}
ARM_NAMES = ["net.conv1.weight", "net.bn1.weight", "net.layer1.0.conv1.weight", "net.linear.weight", "net.linear.bias"]
EPOCHS = 5
STEPS_PER_EPOCH = 13  # 65 steps: 65 history records, more than HISTORY_POINTS


def _config(method: str, label: str, seed: int, run_dir: Path) -> dict[str, Any]:
    return {
        "model": {"_target_": "lightning_slsam.models.factory.image_classifier", "arch": "resnet20_cifar"},
        "data": {"_target_": "lightning_slsam.data.DigitsDataModule", "batch_size": 64, "seed": seed},
        "method": {"_target_": f"lightning_slsam.{method}", "rho": 0.05, "always_active": ["head"]},
        "optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 0.001},
        "scheduler": {},
        "trainer": {"max_epochs": EPOCHS, "precision": "32-true"},
        "logger": {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": str(run_dir), "name": "logs"},
        "seed": seed,
        "metric": "val/acc",
        "method_label": label,
    }


def _write_metrics_csv(path: Path, curve: list[tuple[int, int, float, float]], rng: random.Random) -> None:
    """The CSV logger's layout: validation rows and training rows interleaved, empty cells for absent columns."""
    path.parent.mkdir(parents=True)
    columns = ["epoch", "step", "train/active_ratio", "train/loss", "val/acc", "val/loss"]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for epoch, step, acc, loss in curve:
            writer.writerow({"epoch": epoch, "step": step - 3, "train/loss": rng.uniform(0.1, 2.0)})
            writer.writerow({"epoch": epoch, "step": step, "val/acc": repr(acc), "val/loss": repr(loss)})
            writer.writerow({"epoch": epoch, "step": step, "train/active_ratio": rng.uniform(0, 1)})


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("sweep") / "digits_resnet20"
    rng = random.Random(7)
    runs = {}
    job = 0
    for label, (method, seeds) in METHODS.items():
        folder = root / ("slsam" if method.startswith("slsam") else "methods")
        for seed in seeds:
            run_dir = folder / f"{job}_{label}_seed{seed}"
            (run_dir / ".hydra").mkdir(parents=True)
            for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
                (run_dir / ".hydra" / name).write_text(f"# {name}\nseed: {seed}\n")
            (run_dir / "cli.log").write_text("")
            curve = [
                (epoch, (epoch + 1) * STEPS_PER_EPOCH - 1, rng.uniform(0.1, 0.95), rng.uniform(0.2, 3.0))
                for epoch in range(EPOCHS)
            ]
            _write_metrics_csv(run_dir / "logs" / "version_0" / "metrics.csv", curve, rng)
            active = 1.0 if method in {"base", "sam"} else rng.uniform(0.15, 0.3)
            record = {
                "method": method,
                "method_label": label,
                "experiment": "digits_resnet20",
                "seed": seed,
                "metric_name": "val/acc",
                "best_metric": max(acc for _, _, acc, _ in curve),
                "final_metric": curve[-1][2],
                "median_step_time_s": rng.uniform(0.1, 0.4),
                "mean_step_time_s": rng.uniform(0.1, 0.5),
                "peak_memory_mb": rng.uniform(1.0, 300.0),
                "active_ratio": active,
                "active_ratio_pass2": 0.0 if method == "base" else active,
                "passes_per_step": 1.0 if method == "base" else 2.0,
                "steps": EPOCHS * STEPS_PER_EPOCH,
                "device": "cpu (2 threads)",
                "config": _config(method, label, seed, run_dir),
            }
            (run_dir / "result.json").write_text(json.dumps(record, indent=2))
            history = None
            if method.startswith("slsam"):
                logits = torch.randn(
                    EPOCHS * STEPS_PER_EPOCH, len(ARM_NAMES), generator=torch.Generator().manual_seed(job)
                )
                history = torch.softmax(logits.cumsum(0), dim=1).to(torch.float32)
                torch.save({"history": history, "every": 1, "arm_names": ARM_NAMES}, run_dir / "probabilities.pt")
            runs[run_dir.relative_to(root).as_posix()] = {"record": record, "curve": curve, "history": history}
            job += 1
        (folder / "multirun.yaml").write_text("hydra: {}\n")
    summary_path = write_summary(root, root.parent / "summary.json")
    return {"root": root, "runs": runs, "summary_path": summary_path}


def test_summary_gives_the_report_table_of_the_run_folders(sweep: dict[str, Any]) -> None:
    from_folders = summarize(load_records(sweep["root"]))
    from_summary = summarize(load_records(sweep["summary_path"]))
    assert markdown_table(from_summary) == markdown_table(from_folders)
    for folder_row, summary_row in zip(from_folders, from_summary, strict=True):
        assert {k: v for k, v in summary_row.items() if k != "run_dirs"} == {
            k: v for k, v in folder_row.items() if k != "run_dirs"
        }
    assert [row["has_probabilities"] for row in from_summary] == [False, False, True, True]


def test_summary_keeps_every_record_value_and_the_config(sweep: dict[str, Any]) -> None:
    summary = json.loads(sweep["summary_path"].read_text())
    assert summary["format"] == "lightning-slsam sweep summary" and summary["version"] == 1
    assert summary["sweep"] == "digits_resnet20"
    assert sorted(run["run"] for run in summary["runs"]) == sorted(sweep["runs"])
    # keys equal in every run sit once at the top; the seed-dependent ones in each run
    assert summary["config"]["optimizer.lr"] == 0.001 and summary["config"]["method.always_active"] == ["head"]
    assert "seed" not in summary["config"] and "data.seed" not in summary["config"]
    for record in records_from_summary(sweep["summary_path"]):
        original = sweep["runs"][record["run"]]["record"]
        for key, value in original.items():
            if key != "config":
                assert record[key] == value, key  # exactly: floats go through JSON unchanged
        expected_config = {
            key: value for key, value in flatten_config(original["config"]).items() if key != "logger.save_dir"
        }
        assert record["config"] == expected_config
        assert str(sweep["root"]) not in json.dumps(record["config"])


def test_flatten_config_reference() -> None:
    nested = {"a": {"b": 1, "c": {"d": [1, 2]}, "e": {}}, "f": None}
    assert flatten_config(nested) == {"a.b": 1, "a.c.d": [1, 2], "a.e": {}, "f": None}


def test_validation_curve_equals_the_logged_values(sweep: dict[str, Any]) -> None:
    summary_runs = {run["run"]: run for run in json.loads(sweep["summary_path"].read_text())["runs"]}
    for name, run in sweep["runs"].items():
        curve = summary_runs[name]["validation"]
        assert curve["epoch"] == [epoch for epoch, _, _, _ in run["curve"]]
        assert curve["step"] == [step for _, step, _, _ in run["curve"]]
        assert curve["val/acc"] == [round(acc, 6) for _, _, acc, _ in run["curve"]]
        assert curve["val/loss"] == [round(loss, 6) for _, _, _, loss in run["curve"]]
        assert set(curve) == {"epoch", "step", "val/acc", "val/loss"}  # no training columns


def test_validation_curve_of_a_resumed_run_takes_the_later_value(tmp_path: Path) -> None:
    rng = random.Random(0)
    _write_metrics_csv(tmp_path / "logs" / "version_0" / "metrics.csv", [(0, 9, 0.5, 1.0), (1, 19, 0.6, 0.9)], rng)
    _write_metrics_csv(tmp_path / "logs" / "version_1" / "metrics.csv", [(1, 19, 0.7, 0.8), (2, 29, 0.8, 0.7)], rng)
    assert validation_curve(tmp_path) == {
        "epoch": [0, 1, 2],
        "step": [9, 19, 29],
        "val/acc": [0.5, 0.7, 0.8],
        "val/loss": [1.0, 0.8, 0.7],
    }
    assert validation_curve(tmp_path / "nothing") == {}


def test_downsampled_history_is_every_kth_record_rounded(sweep: dict[str, Any]) -> None:
    summary_runs = {run["run"]: run for run in json.loads(sweep["summary_path"].read_text())["runs"]}
    for name, run in sweep["runs"].items():
        kept = summary_runs[name].get("probabilities")
        if run["history"] is None:
            assert kept is None
            continue
        records = run["history"].shape[0]
        stride = math.ceil(records / HISTORY_POINTS)
        assert stride == 2 and len(kept["history"]) <= HISTORY_POINTS
        reference = [[round(float(p), 4) for p in run["history"][i]] for i in range(0, records, stride)]
        assert kept == {"every": stride, "arm_names": ARM_NAMES, "history": reference}


def test_downsample_keeps_a_short_history_whole_and_checks_its_arguments() -> None:
    history = [[0.25, 0.75], [0.5, 0.5], [0.123456, 0.876544]]
    assert downsample_history(history, 5, ["a", "b"]) == {
        "every": 5,
        "arm_names": ["a", "b"],
        "history": [[0.25, 0.75], [0.5, 0.5], [0.1235, 0.8765]],
    }
    assert downsample_history([], 1, []) is None
    with pytest.raises(ValueError, match="points"):
        downsample_history(history, 1, ["a", "b"], points=0)
    with pytest.raises(ValueError, match="every"):
        downsample_history(history, 0, ["a", "b"])


def test_heatmap_from_the_summary_matches_the_run_folders(sweep: dict[str, Any]) -> None:
    """Same arm names, same step axis, and the kept probabilities equal the file's every-k-th record (to 4
    decimals): the summary's heatmap is the run's, at half the time resolution."""
    record = next(r for r in records_from_summary(sweep["summary_path"]) if r.get("probabilities"))
    run_dir = sweep["root"] / record["run"]  # the summary sits beside the sweep folder, not in it
    from_file = _probability_figure(run_dir).axes[0]
    kept = record["probabilities"]
    from_summary = _history_figure(kept["history"], kept["every"], kept["arm_names"], "t").axes[0]
    assert [t.get_text() for t in from_summary.get_yticklabels()] == [t.get_text() for t in from_file.get_yticklabels()]
    assert from_summary.images[0].get_extent()[2:] == from_file.images[0].get_extent()[2:]
    full = torch.as_tensor(from_file.images[0].get_array())  # (arms, records)
    torch.testing.assert_close(
        torch.as_tensor(from_summary.images[0].get_array()), full[:, ::2], atol=5e-5, rtol=0, check_dtype=False
    )
    left, right = from_summary.images[0].get_extent()[:2]
    kept_records = math.ceil(full.shape[1] / 2)  # records 0, 2, ..., 64 of 65, two steps apart
    assert (left, right) == (-0.5 * 2, (kept_records - 0.5) * 2)


def test_report_from_a_summary_writes_the_plots(sweep: dict[str, Any], tmp_path: Path) -> None:
    report = write_report(sweep["summary_path"], tmp_path)
    text = report.read_text()
    assert "Summary: `" in text and markdown_table(summarize(load_records(sweep["root"]))) in text
    pngs = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png"))
    assert pngs == [
        "accuracy_vs_time.png",
        "digits_resnet20/probabilities_slsam_s0.2_seed0.png",
        "digits_resnet20/probabilities_slsam_uniform_seed0.png",
    ]
    assert all((tmp_path / p).read_bytes().startswith(PNG_MAGIC) for p in pngs)


def test_main_prints_the_same_table_for_the_folders_and_the_summary(
    sweep: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([str(sweep["root"]), "--out", str(tmp_path / "a")]) == 0
    from_folders = capsys.readouterr().out.split("\nreport:")[0]
    assert main([str(sweep["summary_path"]), "--out", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out.split("\nreport:")[0] == from_folders


def test_bad_inputs_name_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"task": "x", "runs": []}))
    with pytest.raises(ValueError, match=r"other\.json.*not a sweep summary"):
        records_from_summary(other)
    assert main([str(other)]) == 2 and "other.json" in capsys.readouterr().err
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps({"format": "lightning-slsam sweep summary", "version": 99, "runs": [{}]}))
    with pytest.raises(ValueError, match="'version' 99"):
        records_from_summary(wrong)
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"format": "lightning-slsam sweep summary", "version": 1, "runs": []}))
    with pytest.raises(ValueError, match="'runs'"):
        records_from_summary(empty)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        build_summary(tmp_path / "nowhere")
    assert summary_main([str(tmp_path / "nowhere")]) == 2
    assert "nowhere" in capsys.readouterr().err


def test_summary_command_writes_the_default_file(sweep: dict[str, Any], tmp_path: Path) -> None:
    assert summary_main([str(sweep["root"]), "--out", str(tmp_path / "s.json"), "--points", "7"]) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    kept = [run["probabilities"] for run in summary["runs"] if "probabilities" in run]
    assert kept and all(len(p["history"]) <= 7 and p["every"] == math.ceil(65 / 7) for p in kept)
