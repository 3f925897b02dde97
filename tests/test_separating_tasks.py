"""experiments/separating_tasks.py: learning-rate choice, accuracy at a time budget, summary and report.

The run folders are written here in the formats ``slsam-train`` writes (``result.json``, the CSV logger's
``metrics.csv``); one real ``slsam-train`` run checks that the summary reads what the CLI really writes.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import experiment_script

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "separating_tasks.py"


@pytest.fixture(scope="module")
def tasks():
    with experiment_script(SCRIPT) as module:
        yield module


def write_run(root: Path, method: str, lr: float, seed: int, accs: list[float], steps_per_epoch: int = 10) -> None:
    folder = root / f"{method}_lr{lr:g}_s{seed}"
    (folder / "logs" / "version_0").mkdir(parents=True)
    record = {
        "finished": True,
        "method": method,
        "method_label": method,
        "seed": seed,
        "best_metric": max(accs),
        "final_metric": accs[-1],
        "steps": steps_per_epoch * len(accs),
        "active_ratio": 1.0,
        "passes_per_step": 2.0,
        "config": {"optimizer": {"lr": lr}},
    }
    (folder / "result.json").write_text(json.dumps(record))
    rows = ["epoch,step,train/loss,val/acc"]
    for epoch, acc in enumerate(accs):
        rows.append(f"{epoch},{(epoch + 1) * steps_per_epoch - 1},0.5,")  # a training row: no val/acc
        rows.append(f"{epoch},{(epoch + 1) * steps_per_epoch - 1},,{acc}")
    (folder / "logs" / "version_0" / "metrics.csv").write_text("\n".join(rows) + "\n")


def test_best_learning_rate_is_the_highest_mean_final(tasks) -> None:
    runs = [
        {"method": "sam", "lr": 1e-3, "final": 0.70},
        {"method": "sam", "lr": 1e-3, "final": 0.74},  # mean 0.72
        {"method": "sam", "lr": 3e-3, "final": 0.73},  # mean 0.73, one seed
        {"method": "base", "lr": 1e-3, "final": 0.66},
        {"method": "base", "lr": 3e-3, "final": 0.60},
    ]
    assert tasks.best_learning_rates(runs) == {"sam": 3e-3, "base": 1e-3}
    for r in runs:
        r["best"] = 1.0 - r["final"]  # the other metric picks the other rates
    assert tasks.best_learning_rates(runs, "best") == {"sam": 1e-3, "base": 3e-3}


def test_bench_names_follow_the_overrides(tasks) -> None:
    assert tasks.bench_name("sam") == "sam"
    assert tasks.bench_name("slsam_scaled_s05") == "slsam:max_update_scale=5.0,sparsity=0.5"
    assert tasks.bench_name("slsam_all_levers") == (
        "slsam:always_active=[head,vectors],norm_scale=running_mean,max_update_scale=5.0"
    )
    with experiment_script(SCRIPT.parent / "bench_step.py", "bench_step_names") as bench_step:
        for method in tasks.METHODS:  # the benchmark builds every sweep method from its name
            callback = bench_step.make_callback(tasks.bench_name(method))
            assert callback.options.name == tasks.METHODS[method][0].removeprefix("method=")
        assert bench_step.make_callback(tasks.bench_name("slsam_scaled_s05")).sparsity == 0.5


def test_accuracy_at_time_is_the_best_within_the_budget(tasks) -> None:
    curve = [
        {"epoch": 0, "step": 9, "acc": 0.5},
        {"epoch": 1, "step": 19, "acc": 0.7},
        {"epoch": 2, "step": 29, "acc": 0.6},
    ]
    assert tasks._accuracy_at_time(curve, 2.0, 40.0) == 0.7  # steps 9 and 19 cost 18 and 38 <= 40
    assert tasks._accuracy_at_time(curve, 2.0, 37.0) == 0.5
    assert tasks._accuracy_at_time(curve, 1.0, 5.0) is None


def test_summary_and_report(tasks, tmp_path: Path) -> None:
    sweep = tmp_path / "digits_noisy"
    for seed in (0, 1):
        write_run(sweep, "base", 1e-3, seed, [0.5, 0.6, 0.62])
        write_run(sweep, "sam", 1e-3, seed, [0.5, 0.7, 0.72])
        write_run(sweep, "sam", 3e-3, seed, [0.4, 0.5, 0.55])
    summary = tmp_path / "summary.json"
    assert tasks.main(["summarize", str(sweep), "--out", str(summary)]) == 0
    data = json.loads(summary.read_text())
    assert data["task"] == "digits_noisy" and data["overrides"] == tasks.TASKS["digits_noisy"]
    assert len(data["runs"]) == 6
    run = next(r for r in data["runs"] if r["method"] == "sam" and r["lr"] == 1e-3 and r["seed"] == 0)
    assert [p["acc"] for p in run["curve"]] == [0.5, 0.7, 0.72]

    bench = tmp_path / "bench.json"
    bench.write_text(
        json.dumps(
            {
                "results": {
                    "base": {"cost_vs_base": 1.0, "memory_vs_base": 1.0},
                    "sam": {"cost_vs_base": 2.0, "cost_vs_sam": 1.0, "memory_vs_base": 1.1},
                }
            }
        )
    )
    markdown = tmp_path / "report.md"
    assets = tmp_path / "assets"
    page = tmp_path / "results.md"
    page.write_text(
        "# Results\n\n<!-- separating: digits_noisy -->\nold\n<!-- end separating: digits_noisy -->\ntail\n"
    )
    command = ["report", str(summary), "--bench", str(bench), "--assets", str(assets), "--out", str(markdown)]
    assert tasks.main([*command, "--page", str(page), "--image-prefix", "assets/"]) == 0
    text = markdown.read_text()
    best_table, final_table = text.split("Last-epoch")[0], text.split("Last-epoch")[1].split("Learning rates")[0]
    sam_best = next(line for line in best_table.splitlines() if line.startswith("| `sam`"))
    # best epoch: SAM at 1e-3 (72.0), 2 seeds; at 2.0x base's step time it has had 15 of base's 30 steps when base
    # ends, so the best epoch reached by then is epoch 0 (step 9 = 18 base steps): 50.0
    assert (
        sam_best == "| `sam` | 0.001 | lowest of 2 | 2 | 72.0 ± 0.0 | +0.0 | +10.0 | 0/2; 0 of 2 rates | 50.0 ± 0.0 |"
    )
    base_final = next(line for line in final_table.splitlines() if line.startswith("| `base`"))
    assert base_final == "| `base` | 0.001 | only rate | 2 | 62.0 ± 0.0 | -10.0 | +0.0 | 0/2; 0 of 1 rates |"
    assert "| `sam` | 2.00 | 1.00 | 1.10 |" in text  # the cost table
    # the frontier's points: base (62.0 at 1.0x) and SAM (72.0 at 2.0x), listed; with 2 seeds neither is on it
    assert "| `base` | 0.001 | 2 | 62.0 ± 0.0 | 1.00 | 1.00 |  |" in text
    assert "| `sam` | 0.001 | 2 | 72.0 ± 0.0 | 2.00 | 1.10 |  |" in text
    record = json.loads(markdown.with_suffix(".frontier.json").read_text())
    assert record["task"] == "digits_noisy" and record["bench"] == ["bench.json"]
    assert [p["method"] for p in record["points"]] == ["base", "sam"]
    assert "old" not in page.read_text() and "| `sam` | 0.001 | 2 |" in page.read_text()
    assert page.read_text().endswith("<!-- end separating: digits_noisy -->\ntail\n")
    pytest.importorskip("matplotlib")
    assert (assets / "digits_noisy_accuracy_vs_time.png").is_file()
    assert (assets / "digits_noisy_frontier.png").is_file()
    assert "digits_noisy_frontier.png" in text


def test_benches_are_merged_first_file_first(tasks, tmp_path: Path) -> None:
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    first.write_text(json.dumps({"results": {"base": {"cost_vs_base": 1.0}, "sam": {"cost_vs_base": 2.0}}}))
    second.write_text(json.dumps({"results": {"sam": {"cost_vs_base": 9.0}, "sparse_msam": {"cost_vs_base": 0.9}}}))
    rows = tasks.read_benches([str(first), str(second)])
    assert rows["sam"]["cost_vs_base"] == 2.0 and rows["sam"]["bench"] == "a.json"
    assert rows["sparse_msam"]["cost_vs_base"] == 0.9 and rows["sparse_msam"]["bench"] == "b.json"
    # a method that differs from a measured one only in a nonzero radius costs what that one costs
    assert rows["sparse_msam_r0.3"]["cost_vs_base"] == 0.9 and "sparse_msam's row" in rows["sparse_msam_r0.3"]["bench"]
    assert set(rows) == {"base", "sam", "sparse_msam", "sparse_msam_r0.3"}
    # ... but not one at rho=0, whose step skips work
    second.write_text(json.dumps({"results": {"sparse_msam": {"cost_vs_base": 0.9}}}))
    assert "sparse_msam_rho0" not in tasks.read_benches([str(second)])


def test_a_gated_method_costs_its_two_kinds_of_step_weighted_by_how_often_training_took_pass_2(tasks, tmp_path) -> None:
    bench = tmp_path / "gate.json"
    one = {"cost_vs_base": 0.7, "median_vs_base": 0.7, "memory_vs_base": 0.6}
    two = {"cost_vs_base": 1.5, "median_vs_base": 1.5, "memory_vs_base": 0.62}
    bench.write_text(json.dumps({"results": {"slsam_noisy": two, "slsam_noisy:second_pass_gate=1e9": one}}))
    runs = [
        {"method": "slsam_noisy_gate0", "lr": 1e-2, "best": 0.9, "passes_per_step": 1.2},
        {"method": "slsam_noisy_gate0", "lr": 1e-2, "best": 0.9, "passes_per_step": 1.4},
        # a worse rate's runs do not count: the cost is the one of the rate whose accuracy is reported
        {"method": "slsam_noisy_gate0", "lr": 3e-2, "best": 0.5, "passes_per_step": 1.9},
        {"method": "slsam_noisy", "lr": 1e-2, "best": 0.9, "passes_per_step": 2.0},
    ]
    rows = tasks.gated_rows([str(bench)], runs)
    assert set(rows) == {"slsam_noisy_gate0"}  # the other gated method has no runs
    row = rows["slsam_noisy_gate0"]
    assert row["cost_vs_base"] == pytest.approx(0.3 * 1.5 + 0.7 * 0.7)
    assert row["memory_vs_base"] == 0.62 and row["pass2_fraction"] == pytest.approx(0.3)
    # without the one-pass row there is nothing to weigh
    bench.write_text(json.dumps({"results": {"slsam_noisy": two}}))
    assert tasks.gated_rows([str(bench)], runs) == {}


def _reference_frontier(means: dict[str, float], cost: dict[str, float]) -> set[str]:
    """By the definition, pair by pair: a method is off the frontier when some other method costs no more and has
    a higher mean accuracy."""
    return {m for m in means if not any(o != m and cost[o] <= cost[m] and means[o] > means[m] for o in means)}


@pytest.mark.parametrize("seed", range(5))
def test_frontier_equals_the_pairwise_definition(tasks, seed: int) -> None:
    import random

    rng = random.Random(seed)
    methods = ["base", "sam", "looksam", "slsam", "slsam_noisy", "slsam_noisy_rho0", "msam", "sparse_msam"]
    cost = {m: rng.choice([0.8, 1.0, 1.2, 1.5, 2.0]) for m in methods}
    runs, means = [], {}
    for m in methods:
        for lr in (1e-3, 1e-2):
            accs = [rng.uniform(0.5, 0.9) for _ in range(3)]
            runs += [{"method": m, "lr": lr, "seed": i, "best": a, "final": a} for i, a in enumerate(accs)]
            means[m] = max(means.get(m, 0.0), 100 * sum(accs) / 3)
    points = tasks.frontier(runs, cost, {m: 1.0 for m in methods})
    assert {p["method"] for p in points if p["frontier"]} == _reference_frontier(means, cost)
    for p in points:
        assert p["accuracy"] == pytest.approx(means[p["method"]])
    assert [p["time"] for p in points] == sorted(p["time"] for p in points)
    # a method with fewer seeds at its best rate is listed but is never on the frontier and hides no other point
    lone = [{"method": "rst", "lr": 1e-3, "seed": 0, "best": 1.0, "final": 1.0}]
    points = tasks.frontier([*runs, *lone], {**cost, "rst": 0.1}, {})
    assert not next(p for p in points if p["method"] == "rst")["frontier"]
    assert {p["method"] for p in points if p["frontier"]} == _reference_frontier(means, cost)
    # a method without a step time is not a point
    assert "rst" not in {p["method"] for p in tasks.frontier([*runs, dict(runs[0], method="rst")], cost, {})}


def test_budget_table_takes_the_most_accurate_method_within_each_budget(tasks, tmp_path: Path) -> None:
    def point(method: str, accuracy: float, time: float) -> dict:
        return {"method": method, "accuracy": accuracy, "std": 0.5, "time": time}

    clean = {
        "task": "clean",
        "points": [point("sparse_msam", 90.0, 0.9), point("base", 91.0, 1.0), point("sam", 92.0, 2.0)],
    }
    noisy = {
        "task": "noisy",
        "points": [point("base", 80.0, 1.0), point("slsam_noisy", 85.0, 1.5), dict(point("rst", 99.0, 1.1), seeds=1)],
    }
    paths = []
    for record in (clean, noisy):
        paths.append(tmp_path / f"{record['task']}.frontier.json")
        paths[-1].write_text(json.dumps(record))
    page = tmp_path / "results.md"
    page.write_text("<!-- separating: budget -->\nold\n<!-- end separating: budget -->\n")
    assert tasks.main(["budget", *map(str, paths), "--page", str(page)]) == 0
    rows = {line.split(" | ")[0]: line for line in page.read_text().splitlines() if line.startswith("| ")}
    at_adamw = rows["| AdamW's step time (≤ 1.0x)"]
    assert "`base` 91.0 ± 0.5, +0.0 vs AdamW (1.00x)" in at_adamw and "`base` 80.0" in at_adamw
    assert "`slsam_noisy` 85.0 ± 0.5, +5.0 vs AdamW (1.50x)" in rows["| ≤ 1.6x AdamW"]
    assert "`sam` 92.0 ± 0.5, +1.0 vs AdamW (2.00x)" in rows["| any (SAM is about 2x)"]
    assert "old" not in page.read_text()


def test_merge_keeps_earlier_runs_and_replaces_reruns(tasks, tmp_path: Path) -> None:
    first = tmp_path / "first" / "digits_noisy"
    write_run(first, "base", 1e-3, 0, [0.5, 0.6])
    write_run(first, "sam", 1e-3, 0, [0.5, 0.7])
    summary = tmp_path / "summary.json"
    assert tasks.main(["summarize", str(first), "--out", str(summary)]) == 0
    second = tmp_path / "second" / "digits_noisy"
    write_run(second, "sam", 1e-3, 0, [0.5, 0.8])  # a rerun replaces the old record
    write_run(second, "rst", 1e-3, 0, [0.5, 0.65])
    assert tasks.main(["summarize", str(second), "--out", str(summary), "--merge"]) == 0
    runs = {(r["method"], r["seed"]): r["final"] for r in json.loads(summary.read_text())["runs"]}
    assert runs == {("base", 0): 0.6, ("sam", 0): 0.8, ("rst", 0): 0.65}
    other = tmp_path / "third" / "sst2_noisy"
    write_run(other, "base", 1e-3, 0, [0.5, 0.6])
    with pytest.raises(SystemExit, match="task 'digits_noisy'"):
        tasks.main(["summarize", str(other), "--out", str(summary), "--merge"])
    assert tasks.main(["summarize", str(second), "--out", str(summary)]) == 0  # without --merge: only this sweep
    assert len(json.loads(summary.read_text())["runs"]) == 2


def test_summary_reads_a_real_run(tasks, tmp_path: Path) -> None:
    from conftest import SHRINK, compose_config

    from lightning_slsam.app.cli import train

    folder = tmp_path / "digits_noisy" / "base_lr0.001_s0"
    overrides = [o for o in SHRINK if o not in ("trainer.max_epochs=1", "logger=none")]
    cfg = compose_config(
        ["method=base", "model.weights=null", "trainer.max_epochs=2", "logger=csv", *overrides], str(folder)
    )
    train(cfg)
    assert json.loads((folder / "result.json").read_text())["finished"] is True
    summary = tmp_path / "summary.json"
    assert tasks.main(["summarize", str(tmp_path / "digits_noisy"), "--out", str(summary)]) == 0
    (run,) = json.loads(summary.read_text())["runs"]
    assert run["method"] == "base" and run["seed"] == 0 and run["lr"] == cfg.optimizer.lr
    assert [p["epoch"] for p in run["curve"]] == [0, 1]
    assert run["curve"][-1]["acc"] == pytest.approx(run["final"])


def test_unfinished_runs_are_left_out_and_rerun(tasks, tmp_path: Path) -> None:
    sweep = tmp_path / "digits_noisy"
    write_run(sweep, "base", 1e-3, 0, [0.5, 0.6])
    write_run(sweep, "sam", 1e-3, 0, [0.5])
    record_path = sweep / "sam_lr0.001_s0" / "result.json"
    record = json.loads(record_path.read_text())
    record["finished"] = False  # as written at a validation of a run still going (or killed)
    record_path.write_text(json.dumps(record))
    assert tasks.finished(sweep / "base_lr0.001_s0") and not tasks.finished(sweep / "sam_lr0.001_s0")
    summary = tmp_path / "summary.json"
    assert tasks.main(["summarize", str(sweep), "--out", str(summary)]) == 0
    assert [r["method"] for r in json.loads(summary.read_text())["runs"]] == ["base"]


def test_divergence_is_a_collapse_below_the_first_epoch_or_chance(tasks) -> None:
    def run(accs: list[float]) -> dict:
        return {"final": accs[-1], "curve": [{"epoch": e, "step": e, "acc": a} for e, a in enumerate(accs)]}

    assert tasks.divergence(run([0.6, 0.9, 0.95]), 0.1) is None
    assert tasks.divergence(run([0.8, 0.97, 0.55]), 0.1) == "collapsed"  # 25 points below epoch 1
    assert tasks.divergence(run([0.8, 0.97, 0.65]), 0.1) is None  # 15 below: a fall, not a collapse
    assert tasks.divergence(run([0.3, 0.9, 0.12]), 0.1) == "chance"  # within 5 points of chance, 18 below epoch 1
    assert tasks.divergence(run([0.51, 0.52, 0.53]), 0.509) == "chance"  # SST-2: never left the majority class
    assert tasks.divergence(run([0.51, 0.52, 0.53]), None) is None  # chance unknown: only the collapse is checked
    # late noise fitting (digits_noisy's AdamW: 35 % at epoch 1, 82 % peak, 75 % last) is not a divergence
    assert tasks.divergence(run([0.35, 0.82, 0.75]), 0.1) is None
    assert tasks.divergence({"final": 0.3, "curve": []}, 0.1) is None  # no curve: chance only


def test_summary_flags_diverged_runs_and_the_report_counts_them(tasks, tmp_path: Path) -> None:
    sweep = tmp_path / "digits_clean"
    for seed in (0, 1, 2):
        write_run(sweep, "base", 1e-2, seed, [0.8, 0.95, 0.96])
        write_run(sweep, "slsam_noisy", 3e-3, seed, [0.7, 0.9, 0.93])
        write_run(sweep, "slsam_noisy", 1e-2, seed, [0.8, 0.94, 0.95] if seed else [0.8, 0.6, 0.4])  # seed 0 collapses
        write_run(sweep, "slsam_noisy", 3e-2, seed, [0.3, 0.12, 0.11])  # every seed ends at chance
    summary = tmp_path / "summary.json"
    assert tasks.main(["summarize", str(sweep), "--out", str(summary)]) == 0
    data = json.loads(summary.read_text())
    assert data["chance"] == 0.1
    flags = {(r["method"], r["lr"], r["seed"]): r["diverged"] for r in data["runs"]}
    assert flags[("slsam_noisy", 1e-2, 0)] == "collapsed"
    assert [flags[("slsam_noisy", 3e-2, s)] for s in (0, 1, 2)] == ["chance"] * 3
    assert sum(bool(f) for f in flags.values()) == 4
    assert tasks.diverged_by_rate(data["runs"], "slsam_noisy", 0.1) == {3e-3: (0, 3), 1e-2: (1, 3), 3e-2: (3, 3)}

    markdown = tmp_path / "report.md"
    command = ["report", str(summary), "--assets", str(tmp_path / "assets"), "--out", str(markdown)]
    assert tasks.main(command) == 0
    text = markdown.read_text()
    best_table, final_table = text.split("Last-epoch")[0], text.split("Last-epoch")[1].split("Learning rates")[0]
    # both metrics pick 3e-3 (93.0; 1e-2's collapsed seed pulls its mean to 90.0 best / 76.7 last): the row says
    # that two of the three rates had diverged seeds
    plus_best = next(line for line in best_table.splitlines() if line.startswith("| `slsam_noisy`"))
    assert plus_best.endswith("| 0/3; 2 of 3 rates (0.01: 1/3, 0.03: 3/3) |")
    plus_final = next(line for line in final_table.splitlines() if line.startswith("| `slsam_noisy`"))
    assert plus_final.startswith("| `slsam_noisy` | 0.003 | lowest of 3 | 3 | 93.0 ± 0.0 |")
    assert plus_final.endswith("| 0/3; 2 of 3 rates (0.01: 1/3, 0.03: 3/3) |")
    base_final = next(line for line in final_table.splitlines() if line.startswith("| `base`"))
    assert base_final.endswith("| 0/3; 0 of 1 rates |") and "| only rate |" in base_final
    assert (
        "`slsam_noisy` 0.003 (93.0 / 93.0), 0.01 (90.0 / 76.7, 1/3 diverged), 0.03 (30.0 / 11.0, 3/3 diverged)" in text
    )
    assert "within 5 points of chance (10.0 %)" in text


def test_rate_place_says_whether_the_best_rate_is_bracketed(tasks) -> None:
    runs = [{"method": "sam", "lr": lr, "seed": 0} for lr in (3e-2, 1e-3, 1e-2)] + [{"method": "base", "lr": 1e-2}]
    assert [tasks.rate_place(runs, "sam", lr) for lr in (1e-3, 1e-2, 3e-2)] == [
        "lowest of 3",
        "interior of 3",
        "highest of 3",
    ]  # ordered by value, not by the order the runs were listed in
    assert tasks.rate_place(runs, "base", 1e-2) == "only rate"
    assert tasks.rate_place([*runs, {"method": "sam", "lr": 1e-3, "seed": 1}], "sam", 1e-3) == "lowest of 3"


def test_report_flags_divergence_in_summaries_written_before_the_flag(tasks, tmp_path: Path) -> None:
    runs = [
        {"method": "sam", "lr": 1e-3, "seed": 0, "best": 0.9, "final": 0.88, "steps": 3,
         "curve": [{"epoch": 0, "step": 1, "acc": 0.7}, {"epoch": 1, "step": 2, "acc": 0.88}]},
        {"method": "sam", "lr": 1e-2, "seed": 0, "best": 0.8, "final": 0.5, "steps": 3,
         "curve": [{"epoch": 0, "step": 1, "acc": 0.8}, {"epoch": 1, "step": 2, "acc": 0.5}]},
    ]  # fmt: skip
    assert tasks.divergence_cell(runs, "sam", 1e-3, 0.1) == "0/1; 1 of 2 rates (0.01: 1/1)"
    runs[1]["diverged"] = None  # a flag written by summarize wins over the recomputation
    assert tasks.divergence_cell(runs, "sam", 1e-3, 0.1) == "0/1; 0 of 2 rates"


def test_control_table_splits_the_gain_into_sparsity_and_ascent(tasks) -> None:
    def runs_of(method: str, lr: float, best: float, final: float) -> list[dict]:
        return [{"method": method, "lr": lr, "seed": s, "best": best, "final": final} for s in (0, 1)]

    runs = [
        *runs_of("base", 1e-2, 0.90, 0.80),
        *runs_of("slsam_noisy", 1e-2, 0.95, 0.94),
        *runs_of("slsam_noisy_rho0", 1e-2, 0.92, 0.85),
        *runs_of("slsam_noisy_rho0", 3e-3, 0.93, 0.84),  # best epoch at 3e-3, last at 1e-2: each its own rate
        *runs_of("slsam", 1e-2, 0.91, 0.90),  # no control swept: no row
        # at rho=0 the radius is gone: sparse_msam at either radius is split against the one control
        *runs_of("sparse_msam_r0.3", 1e-2, 0.89, 0.88),
        *runs_of("sparse_msam_rho0", 1e-2, 0.87, 0.86),
        # the dense update's control is AdamW: all of its gain is the ascent's
        *runs_of("slsam_plus", 1e-2, 0.91, 0.83),
    ]
    assert tasks.control_table(runs) == [
        "| method | − base (best / last) | sparsity alone: `rho=0` − base | the ascent: method − `rho=0` |",
        "|---|---:|---:|---:|",
        "| `slsam_noisy` | +5.0 / +14.0 | +3.0 / +5.0 | +2.0 / +9.0 |",
        "| `sparse_msam_r0.3` | -1.0 / +8.0 | -3.0 / +6.0 | +2.0 / +2.0 |",
        "| `slsam_plus` | +1.0 / +3.0 | +0.0 / +0.0 | +1.0 / +3.0 |",
    ]
    assert tasks.control_table([r for r in runs if r["method"] != "base"]) == []


ROOT = SCRIPT.parents[1]
SEPARATING = ROOT / "experiments" / "results" / "separating"
#: the step benchmarks each task's report reads, as in the results page's commands
PAGE_BENCHES = {
    "digits": [
        "step_resnet20_digits_frontier_cpu-1t.json",
        "step_resnet20_digits_cpu-1t.json",
        "step_resnet20_digits_gate_cpu-1t.json",
        "step_resnet20_digits_dense_cpu-1t.json",
        "step_resnet20_digits_top_cpu-1t.json",
    ],
    "sst2": [
        "step_minilm_sst2_frontier_cpu-1t.json",
        "step_minilm_sst2_cpu-1t.json",
        "step_minilm_sst2_gate_cpu-1t.json",
        "step_minilm_sst2_dense_cpu-1t.json",
        "step_minilm_sst2_top_cpu-1t.json",
    ],
}


def _page_block(page: str, task: str) -> str:
    start = f"<!-- separating: {task} -->\n"
    return page[page.index(start) + len(start) : page.index(f"<!-- end separating: {task} -->")]


@pytest.mark.parametrize("task", ["digits_noisy", "sst2_noisy", "digits_clean", "digits_clean_long", "sst2_clean"])
def test_the_results_page_shows_what_the_committed_summary_gives(tasks, task: str, tmp_path: Path) -> None:
    """Each task's block of docs/results.md is the report of the committed summary, and the budget table is the one
    the reports' frontiers give: no number on the page is typed by hand."""
    pytest.importorskip("matplotlib")  # the block links the figures only when they can be drawn
    page = (ROOT / "docs" / "results.md").read_text()
    summary = SEPARATING / f"{task}.json"
    benches = [str(SEPARATING / name) for name in PAGE_BENCHES[task.split("_")[0]]]
    out = tmp_path / f"{task}.md"
    command = ["report", str(summary), "--bench", *benches, "--assets", str(tmp_path / "assets"), "--out", str(out)]
    assert tasks.main([*command, "--image-prefix", "assets/results/separating/"]) == 0
    assert _page_block(page, task).strip() == out.read_text().strip()
    committed = json.loads((SEPARATING / f"{task}.frontier.json").read_text())
    assert committed == json.loads(out.with_suffix(".frontier.json").read_text())


def test_the_results_page_budget_table_is_the_frontiers(tasks, tmp_path: Path) -> None:
    names = ["digits_noisy", "sst2_noisy", "digits_clean", "digits_clean_long", "sst2_clean"]
    page = tmp_path / "results.md"
    page.write_text("<!-- separating: budget -->\n<!-- end separating: budget -->\n")
    frontiers = [str(SEPARATING / f"{name}.frontier.json") for name in names]
    assert tasks.main(["budget", *frontiers, "--page", str(page)]) == 0
    committed = (ROOT / "docs" / "results.md").read_text()
    assert _page_block(committed, "budget").strip() == _page_block(page.read_text(), "budget").strip()
