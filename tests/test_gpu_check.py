"""The GPU check (experiments/gpu_check.py) through its CPU dry run, and its checks catching planted bugs.

No GPU is needed: the dry run runs every correctness case on the CPU (CPU autocast and a CPU GradScaler) and the
step benchmark on a tiny preset; the CUDA-only parts must be reported as skipped, with their reason.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import experiment_script

import lightning_slsam.engine.step as step_engine

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "experiments" / "gpu_check.py"

EXPECTED_CHECKS = {
    "correctness/sam/32-true",
    "correctness/sam/bf16-mixed",
    "correctness/sam/16-mixed",
    "correctness/slsam/32-true",
    "correctness/slsam/bf16-mixed",
    "correctness/slsam/16-mixed",
    "overflow/sam/16-mixed",
    "overflow/slsam/16-mixed",
    "bandit/slsam/16-mixed",
}
COST_METHODS = {"base", "sam", "looksam", "lagnp", "slsam"}


@pytest.fixture(scope="module")
def gpu_check():
    with experiment_script(SCRIPT) as module:
        yield module


@pytest.mark.slow
def test_dry_run_writes_every_section(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("OUT", None)
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check_dry-run-cpu.json").read_text())
    text = (tmp_path / "gpu_check_dry-run-cpu.md").read_text()

    assert report["mode"] == "dry-run"
    assert {"torch", "lightning", "lightning_slsam", "date"} <= set(report["machine"])

    # 1. correctness: every check present, each passed or skipped with a reason
    checks = {c["id"]: c for c in report["correctness"]["checks"]}
    assert set(checks) == EXPECTED_CHECKS
    for check in checks.values():
        assert check["status"] in ("pass", "skipped"), check
        if check["status"] == "skipped":
            assert check["reason"], check
        assert check["id"] in text
    for check in checks.values():
        if check["kind"] == "weights" and check["status"] == "pass":
            for key in ("max_abs_weight_diff", "rel_weight_diff", "update_rel_error"):
                assert math.isfinite(check[key]), (check["id"], key)
            assert check["same_start"] is True
    overflow = checks["overflow/slsam/16-mixed"]
    assert overflow["weights_unchanged"] and overflow["optimizer_state_unchanged"] and overflow["bandit_unchanged"]
    assert overflow["scale_after"] == overflow["scale_before"] / 2
    assert report["correctness"]["skipped"], "the dry run must say which CUDA-only parts it skipped"
    assert report["verdict"]["ok"] is True

    # 2. cost: the benchmark ran every method on the stand-in preset, LookSAM over whole periods
    cost = report["cost"]
    assert set(cost["methods"]) >= COST_METHODS
    assert ("slsam_plus" in cost["methods"]) != ("slsam_plus" in cost["skipped_methods"])
    (entry,) = cost["presets"].values()
    assert entry["status"] == "done", entry
    results = entry["record"]["results"]
    assert set(results) == set(cost["methods"])
    assert results["looksam"]["passes_per_step"] == pytest.approx(1 + 1 / 5)
    for row in results.values():
        assert math.isfinite(row["median_step_s"]) and row["median_step_s"] > 0
        assert math.isfinite(row["median_vs_base"]) and math.isfinite(row["median_vs_sam"])
    assert any("max_memory_allocated" in item for item in cost["skipped"])
    assert (tmp_path / "bench" / entry["markdown_file"]).exists()

    # 3. the sharded causal LM: SL-SAM on the tiny preset, gradients of about a fifth of the tensors at its step
    sharded = report["sharded"]
    assert "table" in sharded, sharded
    assert "| slsam | 1 |" in sharded["table"]
    ratio = float(sharded["table"].split("| slsam | 1 |")[1].split("|")[5].strip().rstrip("x"))
    assert 0.0 < ratio < 0.6

    for heading in ("# GPU check", "## 1. Correctness", "## 2. Cost", "## 3. Sharded causal LM", "- skipped:"):
        assert heading in text


def test_bandit_check_catches_scaled_norms(gpu_check, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bandit fed loss-scaled norms under 16-mixed fails the check; the real step passes it."""
    setup = gpu_check.CheckSetup(steps=3)
    batches = gpu_check.make_batches(setup)
    reference = gpu_check.run_fit("slsam_fast_bandit", "32-true", "cpu", setup, batches)
    honest = gpu_check.run_fit("slsam_fast_bandit", "16-mixed", "cpu", setup, batches)
    assert gpu_check.judge_bandit(gpu_check.compare_bandit(honest, reference))[0] == "pass"

    measure = step_engine.measure_pass_one

    def scaled_norms(*args, **kwargs):
        first = measure(*args, **kwargs)
        return dataclasses.replace(first, arm_norms=first.arm_norms * first.grad_scale)

    monkeypatch.setattr(step_engine, "measure_pass_one", scaled_norms)
    broken = gpu_check.run_fit("slsam_fast_bandit", "16-mixed", "cpu", setup, batches)
    metrics = gpu_check.compare_bandit(broken, reference)
    status, why = gpu_check.judge_bandit(metrics)
    assert status == "fail", metrics
    assert metrics["median_norm_ratio"] == pytest.approx(setup.loss_scale, rel=0.1)
    assert "norms off" in why


def test_weight_check_catches_a_lost_ascent(gpu_check) -> None:
    """SAM without its ascent (rho = 0) fails the fp32 and 16-mixed bounds against SAM's reference."""
    setup = gpu_check.CheckSetup(steps=3)
    batches = gpu_check.make_batches(setup)
    reference = gpu_check.run_fit("sam", "32-true", "cpu", setup, batches)
    no_ascent = gpu_check.run_fit("sam", "32-true", "cpu", dataclasses.replace(setup, rho=0.0), batches)
    metrics = gpu_check.compare_weights(no_ascent, reference)
    assert metrics["same_start"]
    for precision in ("32-true", "16-mixed"):
        assert gpu_check.judge_weights(metrics, gpu_check.TOLERANCES[precision])[0] == "fail", precision
    # the comparison itself, by hand: the relative error of the update over all parameters
    error = update = 0.0
    for n in reference.final:
        step_case = no_ascent.final[n] - no_ascent.initial[n]
        step_ref = reference.final[n] - reference.initial[n]
        error += float((step_case - step_ref).square().sum())
        update += float(step_ref.square().sum())
    assert metrics["update_rel_error"] == pytest.approx(math.sqrt(error / update), rel=1e-5)
    worst = max(float((no_ascent.final[n] - reference.final[n]).abs().max()) for n in reference.final)
    assert metrics["max_abs_weight_diff"] == worst


def test_overflow_judge_names_what_changed(gpu_check) -> None:
    seen = {
        "weights_unchanged": True,
        "optimizer_state_unchanged": True,
        "forward_passes": 1,
        "scale_before": 4096.0,
        "scale_after": 2048.0,
        "bandit_unchanged": True,
        "trained_after": True,
        "final_finite": True,
    }
    assert gpu_check.judge_overflow(seen) == ("pass", "")
    for key, bad, words in (
        ("weights_unchanged", False, "parameters changed"),
        ("optimizer_state_unchanged", False, "optimizer state"),
        ("forward_passes", 2, "pass 2"),
        ("scale_after", 4096.0, "loss scale"),
        ("bandit_unchanged", False, "bandit"),
        ("trained_after", False, "did not train"),
    ):
        status, why = gpu_check.judge_overflow({**seen, key: bad})
        assert status == "fail" and words in why, key


def test_bad_arguments_name_the_flag(gpu_check, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--dry-run", "--cost-steps", "7"])
    assert "--cost-steps" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--dry-run", "--presets", "resnet20_cifar", "no_such_preset"])
    assert "--presets: unknown preset(s) no_such_preset" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            gpu_check.parse_args([])
        assert "--dry-run" in capsys.readouterr().err
