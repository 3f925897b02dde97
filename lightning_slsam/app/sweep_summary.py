"""Sweep summary: one JSON file that keeps, from every run of a sweep, what the report's tables and figures need.

A sweep's run folders (``result.json``, ``.hydra/``, ``logs/.../metrics.csv``, ``probabilities.pt``, ``cli.log``) are
large and machine-specific; the summary is small and is what ``experiments/results/<experiment>/`` keeps in git.
``slsam-report`` (:func:`lightning_slsam.app.report.main`) reads a summary as it reads the run folders (same table, same
plots), and ``experiments/results_from_summaries.py`` regenerates the docs' tables and figures from the summaries.

Layout (``version`` 1)::

    {"format": "lightning-slsam sweep summary", "version": 1,
     "sweep": "<the sweep folder's name>",
     "config": {dotted config keys equal in every run: "trainer.max_epochs": 8, ...},
     "runs": [{"run": "<run folder, relative to the sweep folder>",
               <every result.json key but "config">,
               "config": {dotted config keys that differ between runs},
               "validation": {"epoch": [...], "step": [...], "val/acc": [...], ...},
               "probabilities": {"every": <steps between points>, "arm_names": [...],
                                 "history": [[per-arm probability, ...], ...],
                                 "pinned_arms": [...]}},   # runs that sampled arms; pinned_arms: always_active
              ...]}

The result.json values are kept exactly (so the tables from a summary equal those from the run folders); the
validation curve (every ``val/*`` column of the CSV logger, one point per epoch) is rounded to
:data:`CURVE_DECIMALS` decimals, and the probability history is cut to at most :data:`HISTORY_POINTS` records (every
k-th, from the first) with :data:`HISTORY_DECIMALS` decimals. The config leaves ``logger.save_dir`` (the run folder's
absolute path) out.

Command: ``python -m lightning_slsam.app.sweep_summary SWEEP_DIR [--out FILE]`` (default ``SWEEP_DIR/summary.json``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_slsam.app.report import PROBABILITIES_NAME, SUMMARY_FORMAT, SUMMARY_VERSION, load_records

__all__ = [
    "CURVE_DECIMALS",
    "HISTORY_DECIMALS",
    "HISTORY_POINTS",
    "SUMMARY_NAME",
    "build_summary",
    "downsample_history",
    "flatten_config",
    "main",
    "validation_curve",
    "write_summary",
]

#: The summary's default file name, in the sweep folder.
SUMMARY_NAME = "summary.json"
#: At most this many records of a probability history are kept (every k-th, from the first).
HISTORY_POINTS = 40
#: Decimals of the kept probabilities (the Exp3 floor, 1e-5, rounds to 0).
HISTORY_DECIMALS = 4
#: Decimals of the validation curve's values.
CURVE_DECIMALS = 6
#: Config leaves left out of the summary: they hold the per-run folder's absolute path.
DROPPED_CONFIG_KEYS = frozenset({"logger.save_dir"})


def flatten_config(config: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as ``{"dotted.key": leaf}``; lists are leaves, an empty mapping is a leaf ``{}``."""
    if not isinstance(config, dict):
        return {prefix: config} if prefix else {}
    if not config and prefix:
        return {prefix: {}}
    flat: dict[str, Any] = {}
    for key, value in config.items():
        flat.update(flatten_config(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _number(text: str | None) -> float | None:
    if text is None or text.strip() == "":
        return None
    try:
        return float(text)
    except ValueError:
        return None


def _rounded(value: float | None, decimals: int) -> float | None:
    if value is None or not math.isfinite(value):
        return value
    return round(value, decimals)


def validation_curve(run_dir: str | Path) -> dict[str, list[Any]]:
    """The run's validation values per epoch from the CSV logger's ``metrics.csv`` (any depth below ``run_dir``).

    Returns ``{"epoch": [...], "step": [...], "<val/...>": [...], ...}``: one entry per epoch with a validation
    value, epochs ascending, a column per ``val/*`` metric (None where an epoch lacks it), values rounded to
    :data:`CURVE_DECIMALS` decimals. Several CSV files (a resumed run's ``version_0``, ``version_1``) are read in
    path order, a later value of an epoch replacing an earlier one. ``{}`` when the run has no CSV log.
    """
    points: dict[int, dict[str, float | None]] = {}
    metrics: list[str] = []
    for path in sorted(Path(run_dir).rglob("metrics.csv")):
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            columns = [name for name in reader.fieldnames or [] if name.startswith("val/")]
            metrics += [name for name in columns if name not in metrics]
            for row in reader:
                values = {name: _number(row.get(name)) for name in columns}
                values = {name: value for name, value in values.items() if value is not None}
                epoch = _number(row.get("epoch"))
                if not values or epoch is None:
                    continue
                point = points.setdefault(int(epoch), {})
                point.update(values)
                step = _number(row.get("step"))
                if step is not None:
                    point["step"] = step
    if not points:
        return {}
    epochs = sorted(points)
    curve: dict[str, list[Any]] = {"epoch": epochs}
    curve["step"] = [None if points[e].get("step") is None else int(points[e]["step"]) for e in epochs]
    for name in metrics:
        curve[name] = [_rounded(points[e].get(name), CURVE_DECIMALS) for e in epochs]
    return curve


def downsample_history(
    history: Any,
    every: int,
    arm_names: Sequence[str],
    points: int = HISTORY_POINTS,
    decimals: int = HISTORY_DECIMALS,
) -> dict[str, Any] | None:
    """A probability history ``(records, arms)`` cut to at most ``points`` records, for the summary.

    Keeps records ``0, k, 2k, ...`` with ``k = ceil(records / points)`` (evenly spaced, so the result is again a
    history with a single step spacing: ``every * k``), values rounded to ``decimals``. Returns
    ``{"every", "arm_names", "history"}`` or None for an empty history.

    Raises:
        ValueError: ``points`` or ``every`` is not a positive int.
    """
    if not (isinstance(points, int) and points >= 1):
        raise ValueError(f"points: must be an int >= 1, got {points!r}")
    if not (isinstance(every, int) and every >= 1):
        raise ValueError(f"every: must be an int >= 1, got {every!r}")
    rows = [list(row) if isinstance(row, Sequence) else [row] for row in _as_rows(history)]
    if not rows or not rows[0]:
        return None
    stride = math.ceil(len(rows) / points)
    kept = rows[::stride]
    return {
        "every": every * stride,
        "arm_names": [str(name) for name in arm_names],
        "history": [[_rounded(float(p), decimals) for p in row] for row in kept],
    }


def _as_rows(history: Any) -> list[Any]:
    tolist = getattr(history, "tolist", None)
    rows = tolist() if callable(tolist) else list(history)
    return rows if isinstance(rows, list) else [rows]


def _probabilities(run_dir: Path, points: int) -> dict[str, Any] | None:
    source = run_dir / PROBABILITIES_NAME
    if not source.is_file():
        return None
    import torch

    data = torch.load(source, map_location="cpu", weights_only=True)
    history = torch.as_tensor(data["history"]).detach().to(torch.float64)
    if history.ndim == 1:
        history = history.unsqueeze(1)
    kept = downsample_history(history, int(data.get("every") or 1), list(data.get("arm_names") or []), points)
    if kept is not None and data.get("pinned_arms"):  # SL-SAM's always_active arms, marked on the heatmap
        kept["pinned_arms"] = [str(name) for name in data["pinned_arms"]]
    return kept


def build_summary(sweep_dir: str | Path, *, history_points: int = HISTORY_POINTS) -> dict[str, Any]:
    """The summary of every run below ``sweep_dir`` (the layout in this module's docstring).

    Raises:
        FileNotFoundError: as :func:`lightning_slsam.app.report.load_records` (no sweep folder, no record).
    """
    root = Path(sweep_dir)
    if root.is_file():
        raise FileNotFoundError(f"sweep directory {str(root)!r} is a file, not a sweep directory")
    records = load_records(root)
    configs = []
    for record in records:
        flat = flatten_config(record.get("config") or {})
        configs.append({key: value for key, value in flat.items() if key not in DROPPED_CONFIG_KEYS})
    common = {
        key: value
        for key, value in configs[0].items()
        if all(key in config and config[key] == value for config in configs[1:])
    }
    runs = []
    for record, config in zip(records, configs, strict=True):
        run_dir = Path(record["run_dir"])
        run: dict[str, Any] = {"run": run_dir.relative_to(root).as_posix()}
        run.update({key: value for key, value in record.items() if key not in {"config", "run_dir"}})
        run["config"] = {key: value for key, value in config.items() if key not in common}
        run["validation"] = validation_curve(run_dir)
        probabilities = _probabilities(run_dir, history_points)
        if probabilities is not None:
            run["probabilities"] = probabilities
        runs.append(run)
    return {
        "format": SUMMARY_FORMAT,
        "version": SUMMARY_VERSION,
        "sweep": root.resolve().name,
        "config": common,
        "runs": runs,
    }


def _dumps(value: Any, indent: int = 0) -> str:
    """JSON with one key of an object per line and a list on one line unless it holds objects or lists."""
    pad = " " * (indent + 1)
    if isinstance(value, dict) and value:
        items = [
            f"{pad}{json.dumps(key, ensure_ascii=False)}: {_dumps(child, indent + 1)}" for key, child in value.items()
        ]
        return "{\n" + ",\n".join(items) + "\n" + " " * indent + "}"
    if isinstance(value, list) and any(isinstance(child, dict | list) for child in value):
        items = [pad + _dumps(child, indent + 1) for child in value]
        return "[\n" + ",\n".join(items) + "\n" + " " * indent + "]"
    return json.dumps(value, ensure_ascii=False)


def write_summary(
    sweep_dir: str | Path, path: str | Path | None = None, *, history_points: int = HISTORY_POINTS
) -> Path:
    """Write :func:`build_summary` of ``sweep_dir`` as JSON at ``path`` (default ``<sweep_dir>/summary.json``).

    Raises:
        FileNotFoundError: as :func:`build_summary`.
    """
    summary = build_summary(sweep_dir, history_points=history_points)
    target = Path(sweep_dir) / SUMMARY_NAME if path is None else Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(_dumps(summary) + "\n", encoding="utf-8")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m lightning_slsam.app.sweep_summary SWEEP_DIR [--out FILE] [--points N]``: write the summary.

    Returns 0, or 2 (with a message on stderr) when the sweep directory is missing or holds no record.
    """
    parser = argparse.ArgumentParser(
        prog="python -m lightning_slsam.app.sweep_summary",
        description="Keep what the report needs from every run of a sweep in one JSON file.",
    )
    parser.add_argument("sweep_dir", metavar="SWEEP_DIR", help="the sweep directory (records at any depth)")
    parser.add_argument("--out", metavar="FILE", default=None, help=f"default: SWEEP_DIR/{SUMMARY_NAME}")
    parser.add_argument(
        "--points", type=int, default=HISTORY_POINTS, help="probability-history records kept per run (default 40)"
    )
    args = parser.parse_args(argv)
    if args.points < 1:
        parser.error(f"--points: must be >= 1, got {args.points}")
    try:
        target = write_summary(args.sweep_dir, args.out, history_points=args.points)
    except FileNotFoundError as error:
        print(f"sweep_summary: error: {error}", file=sys.stderr)
        return 2
    runs = len(json.loads(target.read_text(encoding="utf-8"))["runs"])
    print(f"{runs} run(s) -> {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
