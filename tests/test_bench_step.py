"""Smoke test of the step-cost benchmark (experiments/bench_step.py): it runs and writes valid records.

No timing is asserted: the numbers depend on the machine. The real runs are in experiments/results/.
"""

from __future__ import annotations

import json
import math
import shlex
import threading
from pathlib import Path

import pytest
from conftest import experiment_script

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "bench_step.py"


@pytest.fixture(scope="module")
def bench():
    with experiment_script(SCRIPT) as module:
        yield module


@pytest.mark.slow
def test_smallest_preset_writes_json_and_markdown(bench, tmp_path):
    argv = shlex.split("--preset resnet20_cifar --methods base slsam --steps 2 --warmup 1 --batch-size 8 --threads 1")
    argv += ["--memory", "off", "--out", str(tmp_path), "--tag", "smoke"]
    record = bench.main(argv)

    written = json.loads((tmp_path / "step_smoke.json").read_text())
    assert written["config"]["preset"] == "resnet20_cifar"
    assert written["config"]["methods"] == ["base", "slsam"]
    assert written["machine"]["torch_threads"] == 1
    assert {"cpu", "torch", "lightning", "date"} <= set(written["machine"])
    assert set(written["results"]) == {"base", "slsam"} == set(record["results"])
    for row in written["results"].values():
        assert row["steps_timed"] == 2
        assert len(row["step_times_s"]) == 1 and len(row["step_times_s"][0]) == 2
        for key in ("median_step_s", "mean_step_s", "median_vs_base", "active_ratio_pass1", "passes_per_step"):
            assert math.isfinite(row[key]), key
    base, slsam = written["results"]["base"], written["results"]["slsam"]
    assert base["median_vs_base"] == 1.0
    assert base["passes_per_step"] == 1.0 and base["active_ratio_pass1"] == 1.0 and base["active_ratio_pass2"] == 0.0
    assert slsam["passes_per_step"] == 2.0
    assert 0.0 < slsam["active_ratio_pass1"] < 1.0
    assert slsam["active_ratio_pass2"] == slsam["active_ratio_pass1"]  # the same arms in both passes

    table = (tmp_path / "step_smoke.md").read_text()
    assert "| method | median step (ms) | x base |" in table
    assert "| `base` |" in table and "| `slsam` |" in table


@pytest.mark.slow
def test_memory_child_reports_a_peak(bench, capsys):
    argv = shlex.split("--preset resnet20_cifar --memory-child base --memory-steps 1 --batch-size 4 --threads 1")
    result = bench.main(argv)
    assert result["peak_rss_growth_mib"] >= 0.0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result


def test_method_names_are_the_configs_names_with_callback_arguments(bench):
    assert {"slsam", "slsam:arms=block", "slsam_uniform", "slsam_noisy"} <= set(bench.expand_methods(["all"]))
    assert bench.expand_methods(["base", "slsam:sparsity=0.5,arms=module", "base"]) == [
        "base",
        "slsam:sparsity=0.5,arms=module",
    ]
    callback = bench.make_callback("slsam_uniform:sparsity=0.3,arms=block")
    assert (callback.options.sparsity, callback.arms, callback.options.sampler) == (0.3, "block", "uniform")
    low_cost = bench.make_callback("slsam:sparsity=0.5,arms=block,top_fraction=0.5,reuse_prefix=false")
    options = low_cost.options
    assert (options.sparsity, low_cost.arms, options.top_fraction, low_cost.reuse_prefix) == (0.5, "block", 0.5, False)
    paper = bench.make_callback("slsam")
    assert paper.reuse_prefix and paper.options.top_fraction == 1.0 and paper.options.sparsity == 0.2
    assert (paper.options.rho, paper.options.seed) == (0.05, 0)
    # the methods with a radius of their own keep it; the one-pass momentum methods are in 'all'
    assert {"msam", "sparse_msam"} <= set(bench.expand_methods(["all"]))
    assert bench.make_callback("msam").options.rho == bench.make_callback("sparse_msam").options.rho == 3.0
    assert bench.make_callback("asam").options.rho == 0.5
    pinned = bench.make_callback("slsam_noisy:always_active=[head,vectors],max_update_scale=2")
    assert pinned.options.always_active == ["head", "vectors"] and pinned.options.max_update_scale == 2
    assert "top_fraction=0.5" in bench.describe_method("slsam:sparsity=0.5,arms=block,top_fraction=0.5")
    assert bench.describe_method("sam").startswith("Sharpness-aware minimization")
    with pytest.raises(ValueError, match="unknown method"):
        bench.make_callback("slsam-0.2")
    with pytest.raises(ValueError, match="arms: "):
        bench.make_callback("slsam:arms=layers")
    with pytest.raises(ValueError, match="unexpected argument 'spars'"):
        bench.make_callback("slsam:spars=0.5")


def test_baton_runs_one_thread_at_a_time_in_rotating_turns(bench):
    names = ["a", "b", "c"]
    baton = bench.Baton(names)
    order: list[str] = []

    def worker(name: str, steps: int) -> None:
        baton.wait(name)
        for _ in range(steps):
            baton.pass_and_wait(name)
            order.append(name)
        baton.finish(name)

    threads = [threading.Thread(target=worker, args=(n, 3 if n != "b" else 2)) for n in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    assert not any(thread.is_alive() for thread in threads)
    # set-up turns a, b, c; then steps in cycles whose order rotates by one each time; b leaves after 2 steps
    assert order == ["b", "c", "a", "c", "a", "b", "c", "a"]
