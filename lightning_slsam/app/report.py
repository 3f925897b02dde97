"""Sweep report: tables and plots from the ``result.json`` records of a Hydra sweep (``slsam-report``).

Every training run writes ``result.json`` (and ``probabilities.pt`` for methods that sample arms) in its own
directory; see ``docs/results-record.md``. This module finds those records below a sweep directory, or reads them
from a sweep summary (one JSON file per sweep, written by :mod:`lightning_slsam.app.sweep_summary`), groups them by
``(experiment, method_label)`` over seeds and writes ``report.md`` with a markdown table, an accuracy-vs-step-time plot
and one sampling-probability heatmap per sampling method and experiment.

Plots use matplotlib's Agg canvas directly (no ``pyplot``, no global backend switch), so the report runs headless.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "METHOD_ORDER",
    "load_records",
    "main",
    "markdown_table",
    "method_styles",
    "plot_accuracy_vs_time",
    "plot_probability_heatmap",
    "plot_probability_history",
    "records_from_summary",
    "summarize",
    "write_heatmaps",
    "write_report",
]

RECORD_NAME = "result.json"
PROBABILITIES_NAME = "probabilities.pt"
REPORT_NAME = "report.md"
ACCURACY_PLOT_NAME = "accuracy_vs_time.png"
#: The ``format`` field of a sweep summary (:mod:`lightning_slsam.app.sweep_summary` writes it, this module reads it).
SUMMARY_FORMAT = "lightning-slsam sweep summary"
#: The ``version`` of the summary layout this module reads.
SUMMARY_VERSION = 1

#: Fixed display order of the methods; ``slsam*`` labels come next, then ``slsam_uniform*``, then any others.
METHOD_ORDER: tuple[str, ...] = ("base", "sam", "asam", "ssam_f", "ssam_d", "lagnp", "arsam", "looksam", "rst")
#: Heatmaps name every arm on their y axis up to this many arms, every k-th arm beyond (the figure grows with them).
MAX_LABELLED_ARMS = 160
#: Height of one named heatmap row, in inches (at 6-8 pt tick labels, rows never overlap).
ARM_ROW_INCHES = 0.15
#: Markers of the methods in the accuracy plot: filled shapes, pairwise distinct.
METHOD_MARKERS: tuple[str, ...] = ("o", "s", "D", "^", "v", "P", "X", "*", "<", ">", "p", "h", "d", "8", "H")
#: Colours of the methods: matplotlib's tab10, then ten darker ones of tab20b/tab20c, pairwise distinct.
METHOD_COLOURS: tuple[str, ...] = (
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf",
    "#000000", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1",
)  # fmt: skip
NA = "n/a"


# ---------------------------------------------------------------------------------------------------------------------
# Loading and summarising
# ---------------------------------------------------------------------------------------------------------------------


def load_records(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """Every ``result.json`` below ``sweep_dir`` (any depth, sorted by path), each with ``run_dir`` added (a str).

    Files that are not a JSON object are skipped with a warning (e.g. a run still writing its record).
    ``sweep_dir`` may also be a sweep summary file (``summary.json``): then the records are
    :func:`records_from_summary`'s.

    Raises:
        FileNotFoundError: ``sweep_dir`` does not exist, is not a directory, or holds no readable record.
        ValueError: ``sweep_dir`` is a file that is not a sweep summary.
    """
    root = Path(sweep_dir)
    if root.is_file():
        return records_from_summary(root)
    if not root.is_dir():
        raise FileNotFoundError(f"sweep directory {str(root)!r} does not exist or is not a directory")
    records: list[dict[str, Any]] = []
    for path in sorted(root.rglob(RECORD_NAME)):
        if not path.is_file():
            continue
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            warnings.warn(f"skipping unreadable record {path}: {error}", stacklevel=2)
            continue
        if not isinstance(record, dict):
            warnings.warn(f"skipping record {path}: not a JSON object", stacklevel=2)
            continue
        record["run_dir"] = str(path.parent)
        records.append(record)
    if not records:
        raise FileNotFoundError(f"no {RECORD_NAME} records found below {str(root)!r}")
    return records


def records_from_summary(path: str | Path) -> list[dict[str, Any]]:
    """The run records kept in a sweep summary, in its order, as :func:`load_records` gives them for run folders.

    Each record holds the run's ``result.json`` keys, ``config`` (the summary's common config keys merged with the
    run's own, as dotted keys: ``{"optimizer.lr": 0.001, ...}``), ``validation`` (the per-epoch validation curve),
    ``probabilities`` for runs that sampled arms (``{"every", "arm_names", "history"}``, downsampled) and ``run_dir``:
    where the run's folder was (``<summary's folder>/<run>``; it need not exist).

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is not a sweep summary of a version this module reads, or it holds no run.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no sweep summary at {str(path)!r}")
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not a sweep summary (not JSON: {error})") from error
    if not isinstance(summary, dict) or summary.get("format") != SUMMARY_FORMAT:
        raise ValueError(f"{str(path)!r} is not a sweep summary (its 'format' is not {SUMMARY_FORMAT!r})")
    if summary.get("version") != SUMMARY_VERSION:
        raise ValueError(
            f"{str(path)!r}: sweep summary 'version' {summary.get('version')!r} is not {SUMMARY_VERSION}, "
            "the one this module reads"
        )
    runs = summary.get("runs")
    if not isinstance(runs, list) or not runs:
        raise ValueError(f"{str(path)!r}: the sweep summary's 'runs' is not a non-empty list")
    common = summary.get("config") or {}
    records = []
    for run in runs:
        record = dict(run)
        record["config"] = {**common, **(run.get("config") or {})}
        record["run_dir"] = str(path.parent / str(run.get("run", "")))
        records.append(record)
    return records


def _label(record: dict[str, Any]) -> str:
    return str(record.get("method_label") or record.get("method") or "unknown")


def _natural_key(text: str) -> tuple[tuple[int, float, str], ...]:
    """Sort key comparing embedded numbers numerically: ``slsam_s0.05 < slsam_s0.2 < slsam_s1``."""
    parts = re.split(r"(\d+(?:\.\d+)?)", text)
    return tuple((1, float(part), "") if i % 2 else (0, 0.0, part) for i, part in enumerate(parts))


def _method_rank(method: str) -> int:
    if method in METHOD_ORDER:
        return METHOD_ORDER.index(method)
    if method.startswith("slsam_uniform"):
        return len(METHOD_ORDER) + 1
    if method.startswith("slsam"):
        return len(METHOD_ORDER)
    return len(METHOD_ORDER) + 2


def _method_sort_key(method: str, label: str) -> tuple[int, tuple[tuple[int, float, str], ...]]:
    """Display order: :data:`METHOD_ORDER`, ``slsam*``, ``slsam_uniform*``, then the rest; ties by label (natural).

    The rank comes from the record's ``method`` (so ``sam_rho0.1`` of method ``sam`` sits with ``sam``), or from the
    label when the method is not a known one.
    """
    rank = _method_rank(method)
    if rank > len(METHOD_ORDER) + 1:
        rank = _method_rank(label)
    return (rank, _natural_key(label))


def _experiment_key(experiment: str | None) -> tuple[int, str]:
    return (1, "") if experiment is None else (0, str(experiment))


def _numbers(records: Iterable[dict[str, Any]], key: str) -> list[float]:
    values = []
    for record in records:
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        values.append(float(value))
    return values


def _mean(values: Sequence[float]) -> float | None:
    if not values:
        return None
    if all(math.isfinite(v) for v in values):
        return statistics.mean(values)
    return sum(values) / len(values)  # NaN (e.g. a diverged run) or inf: statistics cannot take them


def _median(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def _std(values: Sequence[float]) -> float | None:
    """Sample standard deviation; 0 for one value, NaN when a value is not finite, None for none."""
    if not values:
        return None
    if len(values) == 1:
        return 0.0
    if all(math.isfinite(v) for v in values):
        return statistics.stdev(values)
    return math.nan


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per ``(experiment, method_label)``, in display order.

    Order: experiments alphabetically (records without one last), then methods as :data:`METHOD_ORDER`, labels of
    method ``slsam*``, ``slsam_uniform*``, then any others alphabetically (numbers in labels compared as numbers).

    Row keys: ``experiment``, ``method``, ``method_label``, ``metric_name``, ``runs`` (number of records),
    ``seeds`` (sorted), ``metric_mean`` / ``metric_std`` (``best_metric``; sample std, 0 for one run),
    ``final_metric_mean``, ``median_step_time_s`` (median of the runs' medians: a run slowed by a busy machine does
    not move it), ``step_time_ratio`` (that over the same median of the experiment's ``base`` runs; None without a
    base run), ``active_ratio``, ``active_ratio_pass2``, ``passes_per_step``, ``peak_memory_mb``, ``steps`` (means;
    None where no record has the key; ``peak_memory_mb`` only over the runs not flagged
    ``peak_memory_shared_process``), ``peak_memory_shared_runs`` (how many runs were left out of it), ``run_dirs``
    (aligned with ``seeds``; None for a record without one) and ``has_probabilities`` (some run wrote
    ``probabilities.pt``, or holds a ``probabilities`` history, as records from a summary do).
    """
    groups: dict[tuple[str | None, str], list[dict[str, Any]]] = {}
    for record in records:
        experiment = record.get("experiment")
        experiment = None if experiment is None else str(experiment)
        groups.setdefault((experiment, _label(record)), []).append(record)

    base_time: dict[str | None, float | None] = {}
    for experiment in {experiment for experiment, _ in groups}:
        base_runs = [
            r
            for (e, label), runs in groups.items()
            if e == experiment
            for r in runs
            if str(r.get("method") or label) == "base"
        ]
        base_time[experiment] = _median(_numbers(base_runs, "median_step_time_s"))

    rows = []
    for (experiment, label), runs in groups.items():
        runs = sorted(runs, key=lambda r: (_seed_key(r.get("seed")), str(r.get("run_dir", ""))))
        metric = _numbers(runs, "best_metric")
        step_time = _median(_numbers(runs, "median_step_time_s"))
        base = base_time[experiment]
        ratio = step_time / base if step_time is not None and base else None
        if ratio is not None and not math.isfinite(ratio):
            ratio = None
        metric_names = sorted({str(r["metric_name"]) for r in runs if r.get("metric_name")})
        rows.append(
            {
                "experiment": experiment,
                "method": str(runs[0].get("method") or label),
                "method_label": label,
                "metric_name": metric_names[0] if len(metric_names) == 1 else ", ".join(metric_names) or "metric",
                "runs": len(runs),
                "seeds": [r.get("seed") for r in runs],
                "metric_mean": _mean(metric),
                "metric_std": _std(metric),
                "final_metric_mean": _mean(_numbers(runs, "final_metric")),
                "median_step_time_s": step_time,
                "step_time_ratio": ratio,
                "active_ratio": _mean(_numbers(runs, "active_ratio")),
                "active_ratio_pass2": _mean(_numbers(runs, "active_ratio_pass2")),
                "passes_per_step": _mean(_numbers(runs, "passes_per_step")),
                # a CPU peak measured in a process that had run an earlier job is not the run's footprint
                "peak_memory_mb": _mean(_numbers(_own_process(runs), "peak_memory_mb")),
                "peak_memory_shared_runs": len(runs) - len(_own_process(runs)),
                "steps": _mean(_numbers(runs, "steps")),
                "run_dirs": [r.get("run_dir") for r in runs],
                "has_probabilities": any(_has_probabilities(r) for r in runs),
            }
        )
    rows.sort(
        key=lambda row: (_experiment_key(row["experiment"]), _method_sort_key(row["method"], row["method_label"]))
    )
    return rows


def _own_process(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs whose peak memory was measured for them alone (``peak_memory_shared_process`` not true; records
    written before that key existed count as their own)."""
    return [r for r in runs if r.get("peak_memory_shared_process") is not True]


def _has_probabilities(record: dict[str, Any]) -> bool:
    if isinstance(record.get("probabilities"), dict):
        return True
    return "run_dir" in record and (Path(record["run_dir"]) / PROBABILITIES_NAME).is_file()


def _seed_key(seed: Any) -> tuple[int, Any]:
    if isinstance(seed, int | float) and not isinstance(seed, bool):
        return (0, seed)
    return (1, str(seed))


# ---------------------------------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    if value is None:
        return NA
    return f"{value:{spec}}{suffix}"


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|")


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The rows of :func:`summarize` as a markdown table (one line per row, header and rule first).

    Formats: metric ``0.9512 ± 0.0031``, step time ratio ``1.93x`` (``n/a`` without a base run), active ratios
    ``0.200 / 0.000`` (pass 1 / pass 2), passes per step ``1.50``, peak memory ``123.4``. When the rows use several
    metric names the header says ``metric`` and each cell is prefixed with its metric name.
    """
    names = {row["metric_name"] for row in rows}
    single = len(names) <= 1
    metric_header = (next(iter(names)) if names else "metric") if single else "metric"
    header = [
        "experiment",
        "method",
        "runs",
        f"{metric_header} (mean ± std)",
        "step time / base",
        "active ratio (pass 1 / pass 2)",
        "passes/step",
        "peak memory (MiB)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    for row in rows:
        if row["metric_mean"] is None:
            metric = NA
        else:
            metric = f"{row['metric_mean']:.4f} ± {row['metric_std']:.4f}"
            if not single:
                metric = f"{row['metric_name']} {metric}"
        active = f"{_fmt(row['active_ratio'], '.3f')} / {_fmt(row['active_ratio_pass2'], '.3f')}"
        cells = [
            "—" if row["experiment"] is None else row["experiment"],
            row["method_label"],
            row["runs"],
            metric,
            _fmt(row["step_time_ratio"], ".2f", "x"),
            active,
            _fmt(row["passes_per_step"], ".2f"),
            _fmt(row["peak_memory_mb"], ".1f"),
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------------------------------------


def _new_figure(width: float, height: float) -> Any:
    # the message of lightning_slsam.loading.optional_dependencies.import_optional; this module imports only the
    # standard library at the top, so that ``python lightning_slsam/app/report.py`` runs without the package's imports
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ModuleNotFoundError as error:
        raise ImportError(
            "slsam-report's plots need matplotlib, which is not installed: pip install 'lightning-slsam[report]'",
            name="matplotlib",
        ) from error
    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def method_styles(labels: Iterable[str]) -> dict[str, tuple[str, str]]:
    """``{label: (marker, colour)}`` in the order given (duplicates ignored): the ``i``-th label gets
    ``METHOD_MARKERS[i % 15]`` and ``METHOD_COLOURS[i % 20]``, so up to 15 methods differ in both marker and colour,
    and up to 60 in their (marker, colour) pair."""
    unique = list(dict.fromkeys(labels))
    return {
        label: (METHOD_MARKERS[i % len(METHOD_MARKERS)], METHOD_COLOURS[i % len(METHOD_COLOURS)])
        for i, label in enumerate(unique)
    }


def _accuracy_figure(rows: Sequence[dict[str, Any]]) -> Any:
    """The figure of :func:`plot_accuracy_vs_time` (a matplotlib ``Figure``)."""
    experiments: dict[str | None, list[dict[str, Any]]] = {}
    for row in rows:
        if row["metric_mean"] is not None:
            experiments.setdefault(row["experiment"], []).append(row)
    styles = method_styles(row["method_label"] for group in experiments.values() for row in group)
    count = max(len(experiments), 1)
    columns = min(count, 2)
    lines = math.ceil(count / columns)
    longest = max((len(label) for label in styles), default=0)
    figure = _new_figure(5.6 * columns + 1.0 + 0.075 * longest, 4.6 * lines)
    axes = figure.subplots(lines, columns, squeeze=False).ravel()
    if not experiments:
        axes[0].text(0.5, 0.5, "no metric values", ha="center", va="center", transform=axes[0].transAxes)
        axes[0].set_axis_off()
    handles: dict[str, Any] = {}
    for ax, (experiment, group) in zip(axes, experiments.items(), strict=False):
        relative = all(row["step_time_ratio"] is not None for row in group)
        for row in group:
            if relative:
                x = row["step_time_ratio"]
            else:
                step = row["median_step_time_s"]
                x = math.nan if step is None else 1e3 * step
            marker, colour = styles[row["method_label"]]
            container = ax.errorbar(
                x,
                row["metric_mean"],
                yerr=row["metric_std"],
                fmt=marker,
                color=colour,
                ecolor=colour,
                elinewidth=1.2,
                capsize=4,
                markersize=8,
                markeredgecolor="black",
                markeredgewidth=0.5,
                label=row["method_label"],
            )
            handles.setdefault(row["method_label"], container)
        if relative:
            ax.axvline(1.0, color="0.75", linewidth=0.8, linestyle="--", zorder=0)
            ax.set_xlabel("median step time / base")
        else:
            ax.set_xlabel("median step time (ms; no base run)")
        metric = group[0]["metric_name"]
        ax.set_ylabel(f"best {metric} (mean ± std)")
        ax.set_title("(no experiment)" if experiment is None else str(experiment))
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.12, y=0.1)
    for ax in axes[len(experiments) or 1 :]:
        ax.set_axis_off()
    if handles:  # one legend for all subplots (a method has one style everywhere), beside them: it covers no point
        figure.legend(
            list(handles.values()), list(handles), loc="outside right upper", fontsize=8, title="method", frameon=False
        )
    return figure


def plot_accuracy_vs_time(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """A PNG with one subplot per experiment: one point per method at (step time / base, metric mean), with the
    metric's std as error bar. An experiment without a base run is plotted against the absolute median step time (ms)
    instead. Each method has its own marker and colour (:func:`method_styles`, the same in every subplot), named in
    one legend to the right of the subplots, so no label covers a point or another label. Returns ``path``."""
    path = Path(path)
    figure = _accuracy_figure(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    return path


def _probability_figure(run_dir: str | Path, title: str | None = None) -> Any:
    """The figure of :func:`plot_probability_heatmap`, or None when the run has no (or an empty) history."""
    source = Path(run_dir) / PROBABILITIES_NAME
    if not source.is_file():
        return None
    import torch

    data = torch.load(source, map_location="cpu", weights_only=True)
    history = torch.as_tensor(data["history"]).detach().to(torch.float32).numpy()
    if title is None:
        title = _run_title(Path(run_dir))
    pinned = data.get("pinned_arms")
    return _history_figure(history, int(data.get("every") or 1), data.get("arm_names"), title, pinned)


#: what a pinned arm's y tick label ends with, and the colour of its label and marker
PINNED_SUFFIX = " [pinned]"
PINNED_COLOR = "tab:red"


def _history_figure(
    history: Any,
    every: int,
    arm_names: Sequence[Any] | None,
    title: str,
    pinned_arms: Sequence[str] | None = None,
) -> Any:
    """The figure of :func:`plot_probability_history`, or None for an empty history."""
    import numpy as np

    history = np.asarray(history, dtype=np.float32)
    if history.ndim == 1:
        history = history[:, None]
    if history.ndim != 2 or history.size == 0:
        return None
    records, arms = history.shape
    every = max(int(every), 1)
    names = [str(name) for name in arm_names or []]

    named = len(names) == arms
    # one tick per arm up to MAX_LABELLED_ARMS, every k-th arm beyond, so that the names never overlap
    stride = max(1, math.ceil(arms / MAX_LABELLED_ARMS)) if named else 1
    longest = max((len(name) for name in names), default=4) if named else 4
    width = max(min(4.0 + 0.06 * longest + 0.02 * records, 18.0), 7.0)
    height = min(max(2.5, 0.8 + ARM_ROW_INCHES * math.ceil(arms / stride)), 40.0) if named else 4.8
    finite = history[np.isfinite(history)]
    figure = _new_figure(width, height)
    ax = figure.subplots()
    image = ax.imshow(
        history.T,
        aspect="auto",
        interpolation="nearest",
        cmap="viridis",
        origin="upper",
        extent=(-0.5 * every, (records - 0.5) * every, arms - 0.5, -0.5),
        vmin=0.0,
        vmax=max(float(finite.max()), 1e-12) if finite.size else 1.0,
    )
    pinned = [i for i, name in enumerate(names) if name in set(pinned_arms or ())] if named else []
    if named:
        # every pinned arm gets a tick, whatever the stride, so that none goes unmarked
        ticks = sorted(set(range(0, arms, stride)) | set(pinned))
        labels = [names[i] + (PINNED_SUFFIX if i in pinned else "") for i in ticks]
        ax.set_yticks(ticks, labels, fontsize=8 if arms <= 12 else 7 if arms <= 40 else 6)
        for tick, index in zip(ax.get_yticklabels(), ticks, strict=True):
            if index in pinned:
                tick.set_color(PINNED_COLOR)
        ax.set_ylabel("arm" if stride == 1 else f"arm (every {stride}th named)")
    else:
        ax.set_ylabel("arm index (the record holds no arm names)")
    if pinned:  # a marker left of each pinned arm's row, outside the plot
        ax.plot(
            [-0.5 * every] * len(pinned),
            pinned,
            linestyle="none",
            marker=">",
            color=PINNED_COLOR,
            clip_on=False,
            label="pinned (always_active): p = 1, not sampled",
        )
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.12), fontsize=8, frameon=False)
    ax.set_xlabel("training step")
    ax.set_title(title, fontsize=10)
    figure.colorbar(image, ax=ax, label="sampling probability", fraction=0.05, pad=0.02)
    return figure


def _save(figure: Any, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)


def plot_probability_heatmap(run_dir: str | Path, path: str | Path, title: str | None = None) -> bool:
    """Heatmap of the per-arm sampling probabilities in ``run_dir/probabilities.pt`` (arms on y, labelled with their
    names from the file's ``arm_names``; training steps = record index * ``every`` on x; with a colorbar), saved as
    PNG at ``path``: :func:`plot_probability_history` of the file's contents. Every arm is named up to
    :data:`MAX_LABELLED_ARMS` arms (the figure grows with the arm count), every k-th beyond; a file without names
    falls back to arm indices. ``title`` defaults to the run's experiment, label and seed from its ``result.json``.

    Returns False (writing nothing) when the run has no ``probabilities.pt`` or an empty history, True otherwise.
    """
    figure = _probability_figure(run_dir, title)
    if figure is None:
        return False
    _save(figure, path)
    return True


def plot_probability_history(
    history: Any,
    path: str | Path,
    *,
    every: int = 1,
    arm_names: Sequence[str] | None = None,
    title: str = "arm sampling probabilities",
    pinned_arms: Sequence[str] | None = None,
) -> bool:
    """Heatmap of a per-arm probability history, saved as PNG at ``path``.

    Args:
        history: ``(records, arms)`` probabilities (nested lists, a NumPy array or a CPU tensor); record ``i`` is the
            state after training step ``i * every``.
        path: the PNG to write (folders are created).
        every: training steps between two records (default 1).
        arm_names: one name per arm for the y axis (every arm named up to :data:`MAX_LABELLED_ARMS`, every k-th
            beyond); without them (or with a count that does not match) the axis shows arm indices.
        title: the figure's title.
        pinned_arms: names of the arms SL-SAM's ``always_active`` pinned (probability 1, outside the bandit): their
            labels end with ``[pinned]`` in red and a red marker sits left of their rows (default None: none).

    Returns:
        False (writing nothing) for an empty history, True otherwise.
    """
    figure = _history_figure(history, every, arm_names, title, pinned_arms)
    if figure is None:
        return False
    _save(figure, path)
    return True


def _record_heatmap(record: dict[str, Any], path: Path) -> bool:
    """The heatmap of one record: from its ``probabilities`` (a summary's record) or its run folder's file."""
    kept = record.get("probabilities")
    if isinstance(kept, dict):
        return plot_probability_history(
            kept.get("history") or [],
            path,
            every=int(kept.get("every") or 1),
            arm_names=kept.get("arm_names"),
            title=_record_title(record),
            pinned_arms=kept.get("pinned_arms"),
        )
    return plot_probability_heatmap(record["run_dir"], path)


def _run_title(run_dir: Path) -> str:
    try:
        record = json.loads((run_dir / RECORD_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return f"arm sampling probabilities: {run_dir.name}"
    return _record_title(record)


def _record_title(record: dict[str, Any]) -> str:
    experiment = record.get("experiment")
    parts = [str(experiment)] if experiment else []
    parts.append(_label(record))
    if record.get("seed") is not None:
        parts.append(f"seed {record['seed']}")
    return "arm sampling probabilities: " + ", ".join(parts)


# ---------------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------------


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "unnamed"


def _seed_list(seeds: Sequence[Any]) -> str:
    return ", ".join(str(seed) for seed in seeds) if seeds else "none"


def _notes(rows: Sequence[dict[str, Any]], records: Sequence[dict[str, Any]]) -> list[str]:
    lines: list[str] = []
    by_experiment: dict[str | None, list[dict[str, Any]]] = {}
    for row in rows:
        by_experiment.setdefault(row["experiment"], []).append(row)
    for experiment, group in by_experiment.items():
        name = "(no experiment)" if experiment is None else f"`{experiment}`"
        runs = sum(row["runs"] for row in group)
        lines.append(f"### {name}")
        lines.append("")
        metric_names = sorted({row["metric_name"] for row in group})
        lines.append(f"- metric: {', '.join(f'`{m}`' for m in metric_names)} (best over validation epochs)")
        lines.append(f"- {runs} run(s) of {len(group)} method(s)")
        lines += _cost_notes(group)
        all_seeds = sorted({seed for row in group for seed in row["seeds"]}, key=_seed_key)
        lines.append(f"- seeds in this experiment: {_seed_list(all_seeds)}")
        for row in group:
            seeds = row["seeds"]
            extra = []
            missing = [seed for seed in all_seeds if seed not in seeds]
            if missing:
                extra.append(f"missing {_seed_list(missing)}")
            repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1}, key=_seed_key)
            if repeated:
                extra.append(f"repeated {_seed_list(repeated)}")
            suffix = f" ({'; '.join(extra)})" if extra else ""
            lines.append(f"  - `{row['method_label']}`: seeds {_seed_list(seeds)}{suffix}")
        devices = sorted({str(r["device"]) for r in records if r.get("experiment") == experiment and r.get("device")})
        if devices:
            lines.append(f"- device(s): {', '.join(devices)}")
        lines.append("")
    return lines


def _ms(seconds: float | None) -> str:
    return NA if seconds is None else f"{1e3 * seconds:.2f} ms"


def _cost_notes(group: Sequence[dict[str, Any]]) -> list[str]:
    """Why a ``step time / base`` or a peak memory cell of this experiment is n/a, with the median step times
    themselves when there is no ratio to show them."""
    lines: list[str] = []
    base = next((row for row in group if row["method"] == "base"), None)
    untimed = [f"`{row['method_label']}`" for row in group if row["median_step_time_s"] is None]
    if base is None:
        times = ", ".join(f"`{row['method_label']}` {_ms(row['median_step_time_s'])}" for row in group)
        lines.append(f"- step time / base is n/a: no `base` run in this experiment; median step times: {times}")
    elif base["median_step_time_s"] is None:
        lines.append(
            "- step time / base is n/a: the `base` runs timed no step (the first 2 optimizer steps of a run are "
            "left out as warm-up, so a run needs at least 3)"
        )
    else:
        lines.append(f"- base median step time: {_ms(base['median_step_time_s'])}")
        if untimed:
            lines.append(f"- step time n/a for {', '.join(untimed)}: no timed step (runs of at most 2 steps)")
    shared = [row for row in group if row.get("peak_memory_shared_runs")]
    for row in shared:
        left_out = f"{row['peak_memory_shared_runs']} of {row['runs']} run(s)"
        what = "n/a" if row["peak_memory_mb"] is None else "the mean of the other runs"
        lines.append(
            f"- peak memory of `{row['method_label']}` is {what}: {left_out} ran on the CPU in a process that had "
            "already run an earlier job (a multirun's later jobs), whose peak RSS cannot be reset; run an arm as its "
            "own `slsam-train` command to measure it"
        )
    return lines


def write_heatmaps(
    rows: Sequence[dict[str, Any]],
    records: Sequence[dict[str, Any]],
    out_dir: str | Path,
    *,
    experiment_folders: bool = True,
) -> list[tuple[str | None, str, Path]]:
    """One probability heatmap per sampling method of :func:`summarize`'s ``rows``: its first seed's run that has a
    history (``probabilities.pt`` in its folder, or a summary record's ``probabilities``), as
    ``<out_dir>/<experiment>/probabilities_<method_label>_seed<seed>.png`` (``<out_dir>/probabilities_...`` when
    ``experiment_folders`` is False or the records name no experiment). ``records`` are the records the rows were
    summarised from (matched through ``run_dir``). Returns ``(experiment, method_label, path)`` per heatmap written.
    """
    out = Path(out_dir)
    by_dir = {str(r["run_dir"]): r for r in records if r.get("run_dir") is not None}
    heatmaps: list[tuple[str | None, str, Path]] = []
    for row in rows:
        if not row["has_probabilities"]:
            continue
        for run_dir, seed in zip(row["run_dirs"], row["seeds"], strict=True):
            if run_dir is None:
                continue
            nested = experiment_folders and row["experiment"] is not None
            folder = out / _safe_name(row["experiment"]) if nested else out
            target = folder / f"probabilities_{_safe_name(row['method_label'])}_seed{_safe_name(str(seed))}.png"
            record = by_dir.get(str(run_dir), {"run_dir": run_dir})
            if _record_heatmap(record, target):
                heatmaps.append((row["experiment"], row["method_label"], target))
                break
    return heatmaps


def write_report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write ``report.md``, ``accuracy_vs_time.png`` and the probability heatmaps of a sweep; return the report path.

    ``sweep_dir`` is a sweep directory (records at any depth) or a sweep summary file (``summary.json`` of
    :mod:`lightning_slsam.app.sweep_summary`): the report is the same. ``report.md`` holds the title, the sweep path,
    the :func:`markdown_table`, links to the plots and per-experiment notes (metric, base step time, which seeds each
    method ran, missing or repeated seeds, devices).
    The heatmaps: for each experiment and each sampling method (a label with some ``probabilities.pt``, or a
    summary's history), the run of the first seed that has one, as
    ``<out_dir>/<experiment>/probabilities_<method_label>_seed<seed>.png`` (:func:`write_heatmaps`; directly in
    ``out_dir`` for records without an experiment; one folder per experiment, since the same label and seed usually
    run in every experiment). ``out_dir`` defaults to ``sweep_dir`` (the summary's folder for a summary).

    Raises:
        FileNotFoundError: as :func:`load_records`.
        ValueError: ``sweep_dir`` is a file that is not a sweep summary.
    """
    return _write_report(sweep_dir, out_dir)[0]


def _write_report(sweep_dir: str | Path, out_dir: str | Path | None = None) -> tuple[Path, str]:
    """:func:`write_report`, returning the report path and the markdown table."""
    sweep = Path(sweep_dir)
    records = load_records(sweep)
    out = (sweep.parent if sweep.is_file() else sweep) if out_dir is None else Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = summarize(records)
    table = markdown_table(rows)
    plots_missing = None  # the table needs no plots: without matplotlib the report is written without them
    try:
        plot_accuracy_vs_time(rows, out / ACCURACY_PLOT_NAME)
        heatmaps = write_heatmaps(rows, records, out)
    except ImportError as error:
        if error.name != "matplotlib":
            raise
        plots_missing, heatmaps = str(error), []

    lines = [
        "# Sweep report",
        "",
        f"{'Summary' if sweep.is_file() else 'Sweep'}: `{sweep.resolve()}`",
        "",
        f"{len(records)} run record(s), {len(rows)} (experiment, method) group(s). The metric is each run's best "
        "validation value (`best_metric`, higher is better): mean ± sample std over seeds. Step time is the median "
        "over runs of each run's median optimizer step time, relative to the same figure of the `base` runs of the "
        "same experiment (runs in one sweep run one after another, so a busy machine slows some runs: compare "
        "costs with `experiments/bench_step.py`, which interleaves the methods). Peak memory is each run's "
        "process peak-RSS growth on a CPU (max allocated on a GPU); runs of a multirun share one process, so on a "
        "CPU only a sweep's first run measures its own footprint and the later runs are left out (see the notes).",
        "",
        "## Results",
        "",
        table,
    ]
    if plots_missing is None:
        lines += ["## Metric vs step time", "", f"![metric vs step time]({ACCURACY_PLOT_NAME})", ""]
    else:
        lines += [f"No plots: {plots_missing}.", ""]
    if heatmaps:
        lines += ["## Arm sampling probabilities", "", "First seed of each sampling method.", ""]
        for experiment, label, target in heatmaps:
            link = target.relative_to(out).as_posix()
            name = "" if experiment is None else f"{experiment}: "
            lines += [f"### {name}{label}", "", f"![{name}{label}]({link})", ""]
    lines += ["## Notes", "", *_notes(rows, records)]
    report = out / REPORT_NAME
    report.write_text("\n".join(lines).rstrip("\n") + "\n", encoding="utf-8")
    return report, table


def main(argv: Sequence[str] | None = None) -> int:
    """``slsam-report SWEEP_DIR [--out DIR]``: write the report, print the table and the report path.

    ``SWEEP_DIR`` may also be a sweep summary file (``summary.json``, :mod:`lightning_slsam.app.sweep_summary`).
    Returns 0, or 2 (with a message on stderr) when the sweep directory is missing or holds no record, or the file
    given is not a sweep summary; without matplotlib the report holds the table and no plots (a line on stderr says
    so).
    """
    parser = argparse.ArgumentParser(
        prog="slsam-report",
        description="Summarise the result.json records of a Hydra sweep into report.md, a table and plots.",
    )
    parser.add_argument(
        "sweep_dir", metavar="SWEEP_DIR", help="the sweep directory (records at any depth), or a sweep summary file"
    )
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="where to write the report (default: SWEEP_DIR, or the summary's folder)",
    )
    args = parser.parse_args(argv)
    try:
        report, table = _write_report(args.sweep_dir, args.out)
    except (FileNotFoundError, ImportError, ValueError) as error:
        print(f"slsam-report: error: {error}", file=sys.stderr)
        return 2
    print(table, end="")
    print(f"\nreport: {report}")
    if "No plots: " in report.read_text(encoding="utf-8"):
        print(
            "slsam-report: the report has no plots: matplotlib is not installed (pip install "
            "'lightning-slsam[report]')",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
