"""Regenerate the results page's tables and figures from the sweep summaries: one command.

    python experiments/results_from_summaries.py           # rewrite the tables in docs/results.md, write the figures
    python experiments/results_from_summaries.py --check   # exit 1 when a table in docs/results.md is stale

The sweeps of ``docs/results.md`` ran with ``hydra.sweep.dir=experiments/results/<experiment>/...``; each
experiment folder keeps only ``summary.json`` in git (``python -m lightning_slsam.app.sweep_summary
experiments/results/<experiment>``: every run's record, config, validation curve and downsampled sampling-probability
history). This script reads those summaries and

- replaces every generated table of the page, the lines between ``<!-- generated: NAME -->`` and
  ``<!-- end generated: NAME -->`` (the names are the keys of :data:`TABLES`; each must appear once), and
- writes the page's figures into ``docs/assets/results/<experiment>/``: ``accuracy_vs_time.png`` and, for each
  sampling method, the probability heatmap of its first seed (``probabilities_<label>_seed<seed>.png``), with
  ``slsam-report``'s own functions (:mod:`lightning_slsam.app.report`).

The tables: ``slsam-report``'s table (:func:`lightning_slsam.app.report.markdown_table`), the accuracy table with the
gaps to SAM and to the base optimizer (percent), the table of the longer schedules, and the active ratios next to
the paper's. Prose numbers of the page are written by hand.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lightning_slsam.app.report import (
    ACCURACY_PLOT_NAME,
    load_records,
    markdown_table,
    plot_accuracy_vs_time,
    summarize,
    write_heatmaps,
)
from lightning_slsam.app.sweep_summary import SUMMARY_NAME

ROOT = Path(__file__).resolve().parents[1]
#: Experiments whose figures the page shows (written into ``<assets>/<experiment>/``).
FIGURES: tuple[str, ...] = ("digits_resnet20", "sst2_minilm")
#: The longer-schedule table: (experiment folder, method labels), in the table's order; the gap is to the row of
#: method ``sam`` of the same folder.
EPOCH_ROWS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("digits_resnet20", ("sam", "slsam_s0.2")),
    ("digits_resnet20_40ep", ("sam_40ep", "slsam_s0.2_40ep")),
)
#: The active-ratio table: (setting, experiment folder, method label, the paper's ratio).
ACTIVE_RATIO_ROWS: tuple[tuple[str, str, str, str], ...] = (
    ("digits, ResNet-20, tensor arms, sparsity 0.2 (the paper's setting)", "digits_resnet20", "slsam_s0.2",
     "47 % (vision)"),
    ("digits, tensor arms, sparsity 0.5", "digits_resnet20", "slsam_s0.5", ""),
    ("digits, low-cost (block arms, top half, sparsity 0.5)", "digits_resnet20", "slsam_block_top0.5_s0.5", ""),
    ("SST-2, MiniLM, tensor arms, sparsity 0.2 (the paper's setting)", "sst2_minilm", "slsam", "21-22 % (language)"),
    ("SST-2, low-cost (block arms, top half, sparsity 0.5)", "sst2_minilm", "slsam_block_top0.5_s0.5", ""),
)  # fmt: skip

Rows = dict[str, list[dict[str, Any]]]  # experiment folder -> summarize()'s rows


def _percent(value: float) -> str:
    return f"{100 * value:.2f}"


def accuracy_table(rows: list[dict[str, Any]]) -> str:
    """Per method: runs, best metric in percent (mean ± std), gap to ``sam`` and to ``base`` in points (signed),
    active ratio of pass 1."""

    def reference(method: str) -> float:
        found = [row["metric_mean"] for row in rows if row["method_label"] == method]
        if len(found) != 1:
            raise ValueError(f"the accuracy table needs exactly one {method!r} row, found {len(found)}")
        return found[0]

    sam, base = reference("sam"), reference("base")
    lines = [
        "| method | runs | val acc (mean ± std, %) | gap to SAM (points) | gap to base (points) | active ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        mean = row["metric_mean"]
        lines.append(
            f"| `{row['method_label']}` | {row['runs']} | {_percent(mean)} ± {_percent(row['metric_std'])} | "
            f"{100 * (mean - sam):+.2f} | {100 * (mean - base):+.2f} | {row['active_ratio']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _row(rows: Rows, folder: str, label: str) -> dict[str, Any]:
    found = [row for row in rows[folder] if row["method_label"] == label]
    if len(found) != 1:
        raise ValueError(f"{folder}/{SUMMARY_NAME}: expected one row of method label {label!r}, found {len(found)}")
    return found[0]


def epochs_table(rows: Rows, records: dict[str, list[dict[str, Any]]]) -> str:
    """:data:`EPOCH_ROWS`: epochs (steps), best metric in percent, gap to SAM at the same epochs, active ratio."""
    lines = [
        "| method | epochs (steps) | val acc (mean ± std, %) | gap to SAM, same epochs (points) | active ratio |",
        "|---|---:|---:|---:|---:|",
    ]
    for folder, labels in EPOCH_ROWS:
        sam = [row for row in rows[folder] if row["method"] == "sam"]
        if len(sam) != 1:
            raise ValueError(f"{folder}/{SUMMARY_NAME}: the epochs table needs one run group of method 'sam'")
        for label in labels:
            row = _row(rows, folder, label)
            epochs = {
                r["config"].get("trainer.max_epochs")
                for r in records[folder]
                if (r.get("method_label") or r.get("method")) == label
            }
            if len(epochs) != 1:
                raise ValueError(f"{folder}/{SUMMARY_NAME}: runs of {label!r} differ in trainer.max_epochs: {epochs}")
            gap = 100 * (row["metric_mean"] - sam[0]["metric_mean"])
            lines.append(
                f"| `{label}` | {epochs.pop()} ({row['steps']:.0f}) | {_percent(row['metric_mean'])} ± "
                f"{_percent(row['metric_std'])} | {gap:.2f} | {row['active_ratio']:.3f} |"
            )
    return "\n".join(lines) + "\n"


def active_ratio_table(rows: Rows) -> str:
    """:data:`ACTIVE_RATIO_ROWS`: SL-SAM's mean active ratio of pass 1 per setting, beside the paper's."""
    lines = ["| setting | SL-SAM active ratio (mean over steps) | paper |", "|---|---:|---:|"]
    for setting, folder, label, paper in ACTIVE_RATIO_ROWS:
        ratio = _row(rows, folder, label)["active_ratio"]
        lines.append(f"| {setting} | {ratio:.3f} | {paper} |" if paper else f"| {setting} | {ratio:.3f} | |")
    return "\n".join(lines) + "\n"


#: Generated table name -> (the summaries it reads, its renderer from the rows and records of those).
TABLES: dict[str, tuple[tuple[str, ...], Callable[[Rows, dict[str, list[dict[str, Any]]]], str]]] = {
    "digits_resnet20 accuracy": (("digits_resnet20",), lambda rows, _: accuracy_table(rows["digits_resnet20"])),
    "digits_resnet20 report": (("digits_resnet20",), lambda rows, _: markdown_table(rows["digits_resnet20"])),
    "digits_resnet20 epochs": (tuple(folder for folder, _ in EPOCH_ROWS), epochs_table),
    "sst2_minilm accuracy": (("sst2_minilm",), lambda rows, _: accuracy_table(rows["sst2_minilm"])),
    "sst2_minilm report": (("sst2_minilm",), lambda rows, _: markdown_table(rows["sst2_minilm"])),
    "active ratios": (
        tuple(sorted({folder for _, folder, _, _ in ACTIVE_RATIO_ROWS})), lambda rows, _: active_ratio_table(rows)
    ),
}  # fmt: skip

_BLOCK = re.compile(
    r"(?P<open><!-- generated: (?P<name>[^>]*?) -->\n)(?P<body>.*?)(?P<close><!-- end generated: (?P=name) -->)",
    re.DOTALL,
)


def load_summaries(results: Path, folders: Sequence[str]) -> tuple[Rows, dict[str, list[dict[str, Any]]]]:
    """``summarize`` rows and records of ``<results>/<folder>/summary.json`` for each folder."""
    rows: Rows = {}
    records: dict[str, list[dict[str, Any]]] = {}
    for folder in folders:
        records[folder] = load_records(results / folder / SUMMARY_NAME)
        rows[folder] = summarize(records[folder])
    return rows, records


def render_page(page: str, rows: Rows, records: dict[str, list[dict[str, Any]]]) -> str:
    """``page`` with every generated block replaced by its table (a blank line either side of it).

    Raises:
        ValueError: a block name that :data:`TABLES` does not know, or a table whose block is missing or repeated.
    """
    names = [match["name"] for match in _BLOCK.finditer(page)]
    unknown = sorted(set(names) - set(TABLES))
    if unknown:
        raise ValueError(f"generated block(s) {unknown} are not tables of this script (known: {sorted(TABLES)})")
    for name in TABLES:
        if names.count(name) != 1:
            raise ValueError(
                f"the page needs exactly one block '<!-- generated: {name} -->' ... "
                f"'<!-- end generated: {name} -->', found {names.count(name)}"
            )

    def replace(match: re.Match[str]) -> str:
        table = TABLES[match["name"]][1](rows, records)
        return f"{match['open']}\n{table}\n{match['close']}"

    return _BLOCK.sub(replace, page)


def write_figures(assets: Path, rows: Rows, records: dict[str, list[dict[str, Any]]]) -> list[Path]:
    """The figures of :data:`FIGURES` into ``<assets>/<experiment>/``; returns their paths."""
    written = []
    for folder in FIGURES:
        out = assets / folder
        written.append(plot_accuracy_vs_time(rows[folder], out / ACCURACY_PLOT_NAME))
        heatmaps = write_heatmaps(rows[folder], records[folder], out, experiment_folders=False)
        written += [path for _, _, path in heatmaps]
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Rewrite the page's tables and write the figures (or, with ``--check``, only compare the tables).

    Returns 0, or 1 when ``--check`` finds a stale table, or 2 (message on stderr) for a missing summary or a page
    whose generated blocks do not match :data:`TABLES`.
    """
    parser = argparse.ArgumentParser(description="Regenerate docs/results.md's tables and figures from summaries.")
    parser.add_argument("--results", type=Path, default=ROOT / "experiments" / "results", help="summaries' root")
    parser.add_argument("--page", type=Path, default=ROOT / "docs" / "results.md", help="the page with the tables")
    parser.add_argument("--assets", type=Path, default=ROOT / "docs" / "assets" / "results", help="figures' root")
    parser.add_argument("--check", action="store_true", help="compare the page's tables, write nothing")
    args = parser.parse_args(argv)

    folders = sorted({folder for needed, _ in TABLES.values() for folder in needed} | set(FIGURES))
    try:
        rows, records = load_summaries(args.results, folders)
        page = args.page.read_text(encoding="utf-8")
        new_page = render_page(page, rows, records)
    except (FileNotFoundError, ValueError) as error:
        print(f"results_from_summaries: error: {error}", file=sys.stderr)
        return 2
    if args.check:
        if new_page != page:
            print(f"{args.page}: generated tables are stale; run python experiments/results_from_summaries.py")
            return 1
        print(f"{args.page}: generated tables are up to date")
        return 0
    if new_page != page:
        args.page.write_text(new_page, encoding="utf-8")
    for path in write_figures(args.assets, rows, records):
        print(f"wrote {path}")
    print(f"{'rewrote' if new_page != page else 'unchanged'}: {args.page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
