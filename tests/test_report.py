"""Tests of the sweep report (``lightning_slsam.app.report``) on a fabricated Hydra multirun directory.

The expected numbers are recomputed here from the fabricated values with ``statistics.mean`` / ``statistics.stdev``
and compared with :func:`summarize`'s rows and with the numbers parsed back from the markdown table.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from matplotlib.colors import to_hex

from lightning_slsam import build_arms
from lightning_slsam.app.report import (
    MAX_LABELLED_ARMS,
    METHOD_ORDER,
    _accuracy_figure,
    _probability_figure,
    load_records,
    main,
    markdown_table,
    method_styles,
    plot_accuracy_vs_time,
    plot_probability_heatmap,
    summarize,
    write_report,
)
from lightning_slsam.models import resnet20_cifar

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SEEDS = (0, 1, 2)
# experiment -> (metric name, {method_label: (method, seeds)}); `cifar_wrn` has no base run.
SWEEP: dict[str, tuple[str, dict[str, tuple[str, tuple[int, ...]]]]] = {
    "digits_resnet20": (
        "val/acc",
        {
            "base": ("base", SEEDS),
            "sam": ("sam", SEEDS),
            "asam": ("asam", (0,)),  # one run: std 0
            "looksam": ("looksam", SEEDS),
            "slsam_s0.2": ("slsam", SEEDS),
            "slsam_uniform_s0.2": ("slsam_uniform", SEEDS),
            "zeta_custom": ("zeta_custom", SEEDS),
        },
    ),
    "cifar_wrn": (
        "val/mcc",
        {
            "sam": ("sam", SEEDS),
            "slsam_s0.5": ("slsam", SEEDS),
            "ssam_f": ("ssam_f", (1, 2)),
        },
    ),
}
SAMPLING = {"slsam", "slsam_uniform"}
ARM_NAMES = ["stem.conv", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "head.fc"]
EVERY = 5


def fabricate_record(experiment: str, metric: str, label: str, method: str, seed: int, rng: random.Random) -> dict:
    two_pass = method not in {"base"}
    active = 1.0 if method in {"base", "sam", "asam", "looksam", "zeta_custom"} else rng.uniform(0.15, 0.35)
    return {
        "method": method,
        "method_label": label,
        "experiment": experiment,
        "seed": seed,
        "metric_name": metric,
        "best_metric": rng.uniform(0.85, 0.97),
        "final_metric": rng.uniform(0.80, 0.95),
        "median_step_time_s": rng.uniform(0.010, 0.030),
        "mean_step_time_s": rng.uniform(0.010, 0.035),
        "peak_memory_mb": rng.uniform(50.0, 900.0),
        "active_ratio": active,
        "active_ratio_pass2": (active if two_pass else 0.0) * rng.uniform(0.8, 1.0),
        "passes_per_step": rng.uniform(1.2, 2.0) if two_pass else 1.0,
        "steps": 200,
        "device": "cpu (2 threads)",
        "config": {"method": {"name": method}, "seed": seed},
    }


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[dict[str, Any]]]:
    """``multirun/<date>/<time>/<job>/...`` with records at two depths, in a shuffled job order."""
    root = tmp_path_factory.mktemp("sweep") / "multirun" / "2025-01-02" / "10-11-12"
    rng = random.Random(1234)
    runs = [
        (experiment, metric, label, method, seed)
        for experiment, (metric, methods) in SWEEP.items()
        for label, (method, seeds) in methods.items()
        for seed in seeds
    ]
    rng.shuffle(runs)
    records = []
    for job, (experiment, metric, label, method, seed) in enumerate(runs):
        run_dir = root / str(job) if job % 3 else root / str(job) / "outputs" / f"seed{seed}"
        run_dir.mkdir(parents=True)
        record = fabricate_record(experiment, metric, label, method, seed, rng)
        (run_dir / "result.json").write_text(json.dumps(record))
        if method in SAMPLING:
            logits = torch.randn(12, len(ARM_NAMES), generator=torch.Generator().manual_seed(job)).cumsum(0)
            history = torch.softmax(logits, dim=1).to(torch.float32)
            torch.save({"history": history, "every": EVERY, "arm_names": ARM_NAMES}, run_dir / "probabilities.pt")
        records.append({**record, "run_dir": str(run_dir)})
    (root / ".hydra").mkdir()
    (root / "multirun.yaml").write_text("hydra: {}\n")
    return root, records


def expected_rows(records: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The summary recomputed with statistics.mean / stdev from the fabricated records."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        groups.setdefault((record["experiment"], record["method_label"]), []).append(record)
    expected = {}
    for (experiment, label), runs in groups.items():
        base = [r["median_step_time_s"] for r in records if r["experiment"] == experiment and r["method"] == "base"]
        step = statistics.median(r["median_step_time_s"] for r in runs)
        metric = [r["best_metric"] for r in runs]
        expected[experiment, label] = {
            "runs": len(runs),
            "seeds": sorted(r["seed"] for r in runs),
            "metric_mean": statistics.mean(metric),
            "metric_std": statistics.stdev(metric) if len(metric) > 1 else 0.0,
            "step_time_ratio": step / statistics.median(base) if base else None,
            "active_ratio": statistics.mean(r["active_ratio"] for r in runs),
            "active_ratio_pass2": statistics.mean(r["active_ratio_pass2"] for r in runs),
            "passes_per_step": statistics.mean(r["passes_per_step"] for r in runs),
            "peak_memory_mb": statistics.mean(r["peak_memory_mb"] for r in runs),
        }
    return expected


EXPECTED_ORDER = [
    ("cifar_wrn", "sam"),
    ("cifar_wrn", "ssam_f"),
    ("cifar_wrn", "slsam_s0.5"),
    ("digits_resnet20", "base"),
    ("digits_resnet20", "sam"),
    ("digits_resnet20", "asam"),
    ("digits_resnet20", "looksam"),
    ("digits_resnet20", "slsam_s0.2"),
    ("digits_resnet20", "slsam_uniform_s0.2"),
    ("digits_resnet20", "zeta_custom"),
]


def parse_table(markdown: str) -> list[list[str]]:
    """The body cells of the first markdown table in ``markdown``."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    assert lines[1].replace("|", "").replace("-", "").replace(":", "").strip() == ""
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_load_records_finds_every_nested_record(sweep: tuple[Path, list[dict]]) -> None:
    root, records = sweep
    loaded = load_records(root.parent.parent)  # from `multirun/`: two more levels
    assert len(loaded) == len(records)
    by_dir = {r["run_dir"]: r for r in loaded}
    for record in records:
        assert by_dir[record["run_dir"]] == record
        assert (Path(record["run_dir"]) / "result.json").is_file()


def test_summarize_matches_recomputed_statistics(sweep: tuple[Path, list[dict]]) -> None:
    _, records = sweep
    rows = summarize(records)
    expected = expected_rows(records)
    assert [(row["experiment"], row["method_label"]) for row in rows] == EXPECTED_ORDER
    for row in rows:
        want = expected[row["experiment"], row["method_label"]]
        assert row["runs"] == want["runs"]
        assert row["seeds"] == want["seeds"]
        for key in ("metric_mean", "metric_std", "active_ratio", "active_ratio_pass2", "passes_per_step"):
            assert row[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), key
        assert row["peak_memory_mb"] == pytest.approx(want["peak_memory_mb"], rel=1e-12)
        if want["step_time_ratio"] is None:
            assert row["step_time_ratio"] is None
        else:
            assert row["step_time_ratio"] == pytest.approx(want["step_time_ratio"], rel=1e-12)
    base = rows[EXPECTED_ORDER.index(("digits_resnet20", "base"))]
    assert base["step_time_ratio"] == pytest.approx(1.0)
    asam = rows[EXPECTED_ORDER.index(("digits_resnet20", "asam"))]
    assert asam["runs"] == 1 and asam["metric_std"] == 0.0
    assert {row["method_label"] for row in rows if row["has_probabilities"]} == {
        "slsam_s0.5",
        "slsam_s0.2",
        "slsam_uniform_s0.2",
    }


def test_markdown_table_numbers_equal_the_records(sweep: tuple[Path, list[dict]]) -> None:
    _, records = sweep
    table = markdown_table(summarize(records))
    header = table.splitlines()[0]
    assert header == (
        "| experiment | method | runs | metric (mean ± std) | step time / base | active ratio (pass 1 / pass 2) "
        "| passes/step | peak memory (MiB) |"
    )
    body = parse_table(table)
    assert [(cells[0], cells[1]) for cells in body] == EXPECTED_ORDER
    expected = expected_rows(records)
    for experiment, label, runs, metric, ratio, active, passes, memory in body:
        want = expected[experiment, label]
        assert int(runs) == want["runs"]
        name, mean_std = metric.split(" ", 1)  # two metric names in this sweep: each cell names its metric
        assert name == SWEEP[experiment][0]
        mean, std = (float(x) for x in mean_std.split(" ± "))
        assert mean == pytest.approx(want["metric_mean"], abs=0.5e-4 + 1e-12)
        assert std == pytest.approx(want["metric_std"], abs=0.5e-4 + 1e-12)
        assert mean_std == f"{want['metric_mean']:.4f} ± {want['metric_std']:.4f}"
        if want["step_time_ratio"] is None:
            assert ratio == "n/a"
        else:
            assert ratio == f"{want['step_time_ratio']:.2f}x"
        assert active == f"{want['active_ratio']:.3f} / {want['active_ratio_pass2']:.3f}"
        assert float(passes) == pytest.approx(want["passes_per_step"], abs=0.5e-2 + 1e-12)
        assert float(memory) == pytest.approx(want["peak_memory_mb"], abs=0.05 + 1e-9)


def test_single_metric_header_and_missing_base(sweep: tuple[Path, list[dict]]) -> None:
    _, records = sweep
    cifar = [r for r in records if r["experiment"] == "cifar_wrn"]
    table = markdown_table(summarize(cifar))
    assert "| val/mcc (mean ± std) |" in table.splitlines()[0]
    body = parse_table(table)
    assert [cells[4] for cells in body] == ["n/a"] * 3
    assert all(" ± " in cells[3] and not cells[3].startswith("val/") for cells in body)


@pytest.mark.parametrize(
    "labels",
    [
        ["zzz", "slsam_uniform_s0.2", "slsam_s0.5", "rst", "slsam_s0.05", "base", "aaa", "ssam_d", "arsam", "asam"],
        ["looksam", "lagnp", "ssam_f", "sam", "slsam_uniform_s0.1", "slsam_s0.2", "slsam", "mystery"],
    ],
)
def test_method_order(labels: list[str]) -> None:
    known = ["base", "sam", "asam", "ssam_f", "ssam_d", "lagnp", "arsam", "looksam", "rst"]

    def method_of(label: str) -> str:
        if label.startswith("slsam_uniform"):
            return "slsam_uniform"
        return "slsam" if label.startswith("slsam") else label

    records = [
        {"experiment": "e", "method": method_of(label), "method_label": label, "seed": 0, "best_metric": 0.5}
        for label in labels
    ]
    order = [row["method_label"] for row in summarize(records)]
    fixed = [label for label in known if label in labels]
    slsam = sorted((lb for lb in labels if method_of(lb) == "slsam"), key=lambda lb: (lb != "slsam", lb))
    if "slsam_s0.05" in slsam:  # numbers compare as numbers: 0.05 < 0.5
        assert slsam.index("slsam_s0.05") < slsam.index("slsam_s0.5")
    uniform = sorted(lb for lb in labels if method_of(lb) == "slsam_uniform")
    others = sorted(lb for lb in labels if lb not in known and not lb.startswith("slsam"))
    assert order == fixed + slsam + uniform + others


def test_missing_base_everywhere_gives_na(tmp_path: Path) -> None:
    records = [
        {"experiment": "x", "method": "sam", "method_label": "sam", "seed": s, "best_metric": 0.9 + s / 100,
         "median_step_time_s": 0.02, "metric_name": "val/f1"}
        for s in range(2)
    ]  # fmt: skip
    rows = summarize(records)
    assert rows[0]["step_time_ratio"] is None
    assert rows[0]["active_ratio"] is None and rows[0]["peak_memory_mb"] is None  # absent keys: n/a, no crash
    cells = parse_table(markdown_table(rows))[0]
    assert cells[4] == "n/a" and cells[5] == "n/a / n/a" and cells[7] == "n/a"
    path = plot_accuracy_vs_time(rows, tmp_path / "plot.png")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_diverged_run_nan_metric(tmp_path: Path) -> None:
    """``result.json`` holds NaN (json.dumps writes ``NaN``) for a diverged run: NaN mean/std, no crash."""
    records = [
        {"experiment": "x", "method": m, "method_label": m, "seed": s, "metric_name": "val/acc",
         "best_metric": math.nan if (m, s) == ("sam", 1) else 0.5 + s / 10, "median_step_time_s": 0.01 * (1 + s)}
        for m in ("base", "sam") for s in range(2)
    ]  # fmt: skip
    for i, record in enumerate(records):
        (tmp_path / str(i)).mkdir()
        (tmp_path / str(i) / "result.json").write_text(json.dumps(record))
    rows = summarize(load_records(tmp_path))
    assert rows[0]["metric_mean"] == pytest.approx(0.55) and rows[0]["metric_std"] == pytest.approx(0.0707106781)
    assert math.isnan(rows[1]["metric_mean"]) and math.isnan(rows[1]["metric_std"])
    assert rows[1]["step_time_ratio"] == pytest.approx(1.0)
    assert parse_table(markdown_table(rows))[1][3] == "nan ± nan"
    assert write_report(tmp_path).is_file()


def test_write_report_files_and_contents(sweep: tuple[Path, list[dict]], tmp_path: Path) -> None:
    root, _ = sweep
    out = tmp_path / "report"
    report = write_report(root, out)
    assert report == out / "report.md"
    text = report.read_text()
    assert text.startswith("# ")
    assert str(root.resolve()) in text
    # the table in the report is exactly markdown_table of the summary
    assert markdown_table(summarize(load_records(root))) in text
    plot = out / "accuracy_vs_time.png"
    assert "](accuracy_vs_time.png)" in text
    heatmaps = {
        out / "digits_resnet20" / "probabilities_slsam_s0.2_seed0.png",
        out / "digits_resnet20" / "probabilities_slsam_uniform_s0.2_seed0.png",
        out / "cifar_wrn" / "probabilities_slsam_s0.5_seed0.png",
    }
    assert set(out.rglob("*.png")) == heatmaps | {plot}
    for png in [plot, *heatmaps]:
        data = png.read_bytes()
        assert len(data) > 1000 and data[:8] == PNG_MAGIC, png
        assert f"]({png.relative_to(out).as_posix()})" in text
    # notes: which seeds ran, per experiment and method
    assert "seeds in this experiment: 0, 1, 2" in text
    assert "`asam`: seeds 0 (missing 1, 2)" in text
    assert "`ssam_f`: seeds 1, 2 (missing 0)" in text
    assert "`slsam_s0.2`: seeds 0, 1, 2\n" in text
    assert "no `base` run" in text
    # nothing was written into the sweep itself
    assert not (root / "report.md").exists()


def test_write_report_defaults_to_the_sweep_dir_and_is_rerunnable(tmp_path: Path) -> None:
    sweep = tmp_path / "multirun" / "d" / "t"
    rng = random.Random(0)
    for job, (label, method) in enumerate([("base", "base"), ("slsam_s0.2", "slsam"), ("slsam_s0.2", "slsam")]):
        run_dir = sweep / str(job)
        run_dir.mkdir(parents=True)
        record = fabricate_record("e", "val/acc", label, method, job, rng)
        (run_dir / "result.json").write_text(json.dumps(record))
    history = torch.full((4, 3), 1 / 3)
    torch.save({"history": history, "every": 10, "arm_names": ["a", "b", "c"]}, sweep / "2" / "probabilities.pt")
    first = write_report(sweep)
    assert first == sweep / "report.md"
    # the first seed *with* probabilities (seed 2; seed 1 has none)
    assert (sweep / "e" / "probabilities_slsam_s0.2_seed2.png").is_file()
    assert write_report(sweep).read_text() == first.read_text()
    assert len(load_records(sweep)) == 3


def test_probability_heatmap(sweep: tuple[Path, list[dict]], tmp_path: Path) -> None:
    _, records = sweep
    sampling = next(r for r in records if r["method"] == "slsam")
    plain = next(r for r in records if r["method"] == "sam")
    assert plot_probability_heatmap(sampling["run_dir"], tmp_path / "p.png") is True
    assert (tmp_path / "p.png").read_bytes()[:8] == PNG_MAGIC
    assert plot_probability_heatmap(plain["run_dir"], tmp_path / "none.png") is False
    assert not (tmp_path / "none.png").exists()
    # many arms: still a figure, every arm named
    many = tmp_path / "many"
    many.mkdir()
    history = torch.softmax(torch.randn(30, 150), dim=1)
    torch.save(
        {"history": history, "every": 1, "arm_names": [f"arm{i}" for i in range(150)]}, many / "probabilities.pt"
    )
    assert plot_probability_heatmap(many, tmp_path / "many.png") is True
    assert (tmp_path / "many.png").stat().st_size > 1000


def _save_history(run_dir: Path, names: list[str] | None, records: int = 10) -> None:
    run_dir.mkdir(parents=True)
    arms = len(names) if names is not None else 7
    history = torch.softmax(torch.randn(records, arms, generator=torch.Generator().manual_seed(arms)), dim=1)
    data: dict[str, Any] = {"history": history, "every": 2}
    if names is not None:
        data["arm_names"] = names
    torch.save(data, run_dir / "probabilities.pt")


def _tick_labels(figure: Any) -> list[str]:
    figure.canvas.draw()
    (ax, _colorbar) = figure.axes
    return [label.get_text() for label in ax.get_yticklabels()]


def test_heatmap_names_the_arms_of_a_resnet20_run(tmp_path: Path) -> None:
    """ResNet-20 has 59 tensor arms (more than the old limit of 40 named ones): each row is labelled with its name,
    as the run record stores them (``arm_names`` of probabilities.pt, written by slsam-train from the layout)."""
    names = ["net." + name for name in build_arms(resnet20_cifar(), "tensor").names]
    assert len(names) == 59
    _save_history(tmp_path / "run", names)
    figure = _probability_figure(tmp_path / "run")
    assert _tick_labels(figure) == names
    (ax, _colorbar) = figure.axes
    assert list(ax.get_yticks()) == list(range(59))
    assert ax.get_ylabel() == "arm"


def test_heatmap_names_every_kth_arm_beyond_the_limit_and_indices_without_names(tmp_path: Path) -> None:
    names = [f"blocks.{i}.weight" for i in range(MAX_LABELLED_ARMS * 2 + 5)]
    _save_history(tmp_path / "many", names, records=3)
    assert _tick_labels(_probability_figure(tmp_path / "many")) == names[::3]
    _save_history(tmp_path / "unnamed", None)  # an old record without arm_names
    figure = _probability_figure(tmp_path / "unnamed")
    assert figure.axes[0].get_ylabel().startswith("arm index")


def _plotted_styles(figure: Any) -> list[tuple[str, str, str, str]]:
    """(subplot title, method label, marker, colour as hex) of every errorbar point in ``figure``."""
    styles = []
    for ax in figure.axes:
        for container in ax.containers:
            line = container.lines[0]
            styles.append((ax.get_title(), container.get_label(), line.get_marker(), to_hex(line.get_color())))
    return styles


def test_accuracy_plot_gives_each_method_its_own_marker_and_colour(sweep: tuple[Path, list[dict]]) -> None:
    _, records = sweep
    rows = summarize(records)
    figure = _accuracy_figure(rows)
    plotted = _plotted_styles(figure)
    assert len(plotted) == len(rows)  # one point per (experiment, method)
    style_of: dict[str, tuple[str, str]] = {}
    for _, label, marker, colour in plotted:
        assert style_of.setdefault(label, (marker, colour)) == (marker, colour), label  # same in every subplot
    markers = [marker for marker, _ in style_of.values()]
    colours = [colour for _, colour in style_of.values()]
    assert len(style_of) == 9
    assert len(set(markers)) == len(markers) and len(set(colours)) == len(colours)


def test_accuracy_plot_labels_sit_in_one_legend_beside_the_plots(sweep: tuple[Path, list[dict]]) -> None:
    """No annotation next to the points (labels of close points overlapped): a single figure legend, outside every
    subplot, naming each method once."""
    _, records = sweep
    rows = summarize(records)
    figure = _accuracy_figure(rows)
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    assert all(not ax.texts for ax in figure.axes)
    assert all(ax.get_legend() is None for ax in figure.axes)
    (legend,) = figure.legends
    labels = [text.get_text() for text in legend.get_texts()]
    assert labels == list(dict.fromkeys(row["method_label"] for row in rows))
    box = legend.get_window_extent(renderer)
    for ax in figure.axes:
        assert not box.overlaps(ax.get_window_extent(renderer)), ax.get_title()
    boxes = [text.get_window_extent(renderer) for text in legend.get_texts()]
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1 :])


def test_method_styles_differ_for_every_method_of_a_full_sweep() -> None:
    labels = [*METHOD_ORDER, "slsam", "slsam_s0.5", "slsam_block_top0.5_s0.5", "slsam_uniform", "custom"]
    assert len(labels) == 14
    styles = method_styles(labels)
    assert list(styles) == labels
    assert len({marker for marker, _ in styles.values()}) == len(labels)
    assert len({to_hex(colour) for _, colour in styles.values()}) == len(labels)
    many = method_styles(f"m{i}" for i in range(60))
    assert len(set(many.values())) == 60  # beyond 15 markers and 20 colours the pairs still differ


def test_no_records_is_an_error_naming_the_directory(tmp_path: Path) -> None:
    empty = tmp_path / "empty_sweep"
    (empty / "0" / ".hydra").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="empty_sweep"):
        load_records(empty)
    with pytest.raises(FileNotFoundError, match="no_such_sweep"):
        write_report(tmp_path / "no_such_sweep")


def test_unreadable_record_is_skipped_with_a_warning(tmp_path: Path) -> None:
    (tmp_path / "0").mkdir()
    (tmp_path / "1").mkdir()
    (tmp_path / "0" / "result.json").write_text('{"method": "base", "seed": 0')  # truncated
    (tmp_path / "1" / "result.json").write_text(json.dumps({"method": "base", "seed": 1, "best_metric": 0.5}))
    with pytest.warns(UserWarning, match="skipping unreadable record"):
        records = load_records(tmp_path)
    assert [r["seed"] for r in records] == [1]


def test_main_prints_table_and_report_path(
    sweep: tuple[Path, list[dict]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, records = sweep
    out = tmp_path / "cli"
    assert main([str(root), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert markdown_table(summarize(records)) in stdout
    assert str(out / "report.md") in stdout
    assert (out / "report.md").is_file()


def test_without_matplotlib_the_report_holds_the_table_and_no_plots(
    sweep: tuple[Path, list[dict]], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The markdown table needs no plots: with matplotlib missing (its import fails as it would uninstalled), the
    report is still written, with the table, no image, and a line that says how to get the plots."""
    import lightning_slsam.app.report as report

    def missing(*args: Any) -> Any:
        raise ImportError(
            "slsam-report's plots need matplotlib, which is not installed: pip install x", name="matplotlib"
        )

    monkeypatch.setattr(report, "_new_figure", missing)
    root, records = sweep
    out = tmp_path / "no_plots"
    assert main([str(root), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    text = (out / "report.md").read_text()
    assert markdown_table(summarize(records)) in text and "No plots: slsam-report's plots need matplotlib" in text
    assert not list(out.rglob("*.png")) and "![" not in text
    assert "matplotlib is not installed" in captured.err


def test_main_bad_directory_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing_sweep"
    assert main([str(missing)]) == 2
    err = capsys.readouterr().err
    assert "slsam-report: error" in err and "missing_sweep" in err
    assert main([str(tmp_path)]) == 2  # exists, holds no record
    assert str(tmp_path) in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # usage error: argparse's own exit code 2
        main([])
    assert exit_info.value.code == 2


def test_script_entry_point_exit_code(tmp_path: Path) -> None:
    """``python lightning_slsam/app/report.py DIR`` (the ``__main__`` guard; the module imports only the standard
    library at the top, so this runs without importing torch or lightning)."""
    script = Path(__file__).resolve().parents[1] / "lightning_slsam" / "app" / "report.py"
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "nowhere" in result.stderr


# --- costs that cannot be compared, and pinned arms ------------------------------------------------------------------
def _write_run(root: Path, name: str, **record: Any) -> None:
    run = root / name
    run.mkdir(parents=True)
    (run / "result.json").write_text(json.dumps({"experiment": "e", "seed": 0, "best_metric": 0.5, **record}))


def test_a_peak_measured_in_a_shared_process_is_left_out_and_the_notes_say_why(tmp_path: Path) -> None:
    """A 2-job multirun on a CPU: the second job's peak RSS growth (3.8 MiB) is not its footprint."""
    _write_run(tmp_path, "0_sam", method="sam", method_label="sam", peak_memory_mb=251.7)
    _write_run(
        tmp_path, "1_slsam", method="slsam", method_label="slsam", peak_memory_mb=3.8, peak_memory_shared_process=True
    )
    rows = {row["method_label"]: row for row in summarize(load_records(tmp_path))}
    assert rows["sam"]["peak_memory_mb"] == 251.7 and rows["sam"]["peak_memory_shared_runs"] == 0
    assert rows["slsam"]["peak_memory_mb"] is None and rows["slsam"]["peak_memory_shared_runs"] == 1
    cells = {c[1]: c for c in parse_table(markdown_table(list(rows.values())))}
    assert cells["sam"][7] == "251.7" and cells["slsam"][7] == "n/a"
    text = write_report(tmp_path).read_text()
    assert "- peak memory of `slsam` is n/a: 1 of 1 run(s) ran on the CPU in a process that had already run" in text
    assert "peak memory of `sam`" not in text


def test_without_a_base_run_the_notes_give_the_reason_and_the_step_times(tmp_path: Path) -> None:
    _write_run(tmp_path, "0_sam", method="sam", method_label="sam", median_step_time_s=0.0123)
    _write_run(tmp_path, "1_slsam", method="slsam", method_label="slsam", median_step_time_s=0.0081)
    text = write_report(tmp_path).read_text()
    assert (
        "- step time / base is n/a: no `base` run in this experiment; median step times: `sam` 12.30 ms, "
        "`slsam` 8.10 ms" in text
    )


def test_with_a_base_run_an_untimed_one_is_explained_not_blamed_on_the_base(tmp_path: Path) -> None:
    _write_run(tmp_path, "0_base", method="base", method_label="base", median_step_time_s=None)
    _write_run(tmp_path, "1_sam", method="sam", method_label="sam", median_step_time_s=0.02)
    text = write_report(tmp_path).read_text()
    assert "no `base` run" not in text
    assert "- step time / base is n/a: the `base` runs timed no step" in text
    timed_root = tmp_path / "timed"
    _write_run(timed_root, "0_base", method="base", method_label="base", median_step_time_s=0.01)
    _write_run(timed_root, "1_sam", method="sam", method_label="sam", median_step_time_s=None)
    text = write_report(timed_root).read_text()
    assert "- base median step time: 10.00 ms" in text
    assert "- step time n/a for `sam`: no timed step" in text


def test_heatmap_marks_the_pinned_arms(tmp_path: Path) -> None:
    names = [f"layer{i}.weight" for i in range(2 * MAX_LABELLED_ARMS)] + ["head.weight", "head.bias"]
    _save_history(tmp_path / "run", names)
    data = torch.load(tmp_path / "run" / "probabilities.pt", weights_only=True)
    data["pinned_arms"] = ["head.weight", "head.bias", "layer1.weight"]  # layer1 falls between the ticks
    torch.save(data, tmp_path / "run" / "probabilities.pt")
    figure = _probability_figure(tmp_path / "run")
    labels = _tick_labels(figure)
    (ax, _colorbar) = figure.axes
    pinned = [label for label in ax.get_yticklabels() if label.get_text().endswith(" [pinned]")]
    assert [label.get_text() for label in pinned] == [
        "layer1.weight [pinned]",
        "head.weight [pinned]",
        "head.bias [pinned]",
    ]
    assert all(to_hex(label.get_color()) == to_hex("tab:red") for label in pinned)
    assert "layer3.weight" in labels and "layer2.weight" not in labels  # every 3rd arm named, and the pinned ones
    (marker,) = [line for line in ax.get_lines() if line.get_marker() == ">"]
    assert sorted(marker.get_ydata()) == sorted(names.index(n) for n in data["pinned_arms"])
    unpinned = _probability_figure(_copy_without_pins(tmp_path))
    assert not [line for line in unpinned.axes[0].get_lines() if line.get_marker() == ">"]


def _copy_without_pins(tmp_path: Path) -> Path:
    data = torch.load(tmp_path / "run" / "probabilities.pt", weights_only=True)
    data.pop("pinned_arms")
    (tmp_path / "plain").mkdir()
    torch.save(data, tmp_path / "plain" / "probabilities.pt")
    return tmp_path / "plain"
