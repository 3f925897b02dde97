"""experiments/results_from_summaries.py: the results page's tables equal what the committed summaries give, and
the command rewrites stale tables and writes the figures."""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

import pytest
from conftest import experiment_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "results_from_summaries.py"
PAGE = ROOT / "docs" / "results.md"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def regenerate():
    with experiment_script(SCRIPT) as module:
        yield module


def test_the_page_tables_are_those_of_the_summaries(regenerate, capsys: pytest.CaptureFixture[str]) -> None:
    assert regenerate.main(["--check"]) == 0, capsys.readouterr().out


def test_accuracy_table_against_a_plain_recomputation(regenerate) -> None:
    """The gap columns: mean best accuracy over seeds minus SAM's / base's, in points, from the records."""
    results = ROOT / "experiments" / "results"
    rows, records = regenerate.load_summaries(results, ["digits_resnet20"])
    table = regenerate.accuracy_table(rows["digits_resnet20"])
    by_label: dict[str, list[float]] = {}
    for record in records["digits_resnet20"]:
        by_label.setdefault(record["method_label"], []).append(record["best_metric"])
    sam, base = statistics.mean(by_label["sam"]), statistics.mean(by_label["base"])
    for line in table.splitlines()[2:]:
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        values = by_label[cells[0].strip("`")]
        mean = statistics.mean(values)
        assert cells[1] == str(len(values))
        assert cells[2] == f"{100 * mean:.2f} ± {100 * statistics.stdev(values):.2f}"
        assert float(cells[3]) == pytest.approx(100 * (mean - sam), abs=0.005)
        assert float(cells[4]) == pytest.approx(100 * (mean - base), abs=0.005)


def test_command_rewrites_stale_tables_and_writes_the_figures(
    regenerate, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    results = tmp_path / "results"
    for summary in (ROOT / "experiments" / "results").glob("*/summary.json"):
        (results / summary.parent.name).mkdir(parents=True)
        shutil.copy(summary, results / summary.parent.name / summary.name)
    page = tmp_path / "results.md"
    original = PAGE.read_text(encoding="utf-8")
    stale = original.replace("| `sam_40ep` | 40 (320) |", "| `sam_40ep` | 40 (999) |")
    assert stale != original
    page.write_text(stale, encoding="utf-8")
    args = ["--results", str(results), "--page", str(page), "--assets", str(tmp_path / "assets")]
    assert regenerate.main([*args, "--check"]) == 1
    assert "stale" in capsys.readouterr().out

    # one experiment's figures keep the test short; the page's experiments are written the same way
    monkeypatch.setattr(regenerate, "FIGURES", ("digits_resnet20_40ep",))
    assert regenerate.main(args) == 0
    assert page.read_text(encoding="utf-8") == original
    written = sorted(p.relative_to(tmp_path / "assets").as_posix() for p in (tmp_path / "assets").rglob("*.png"))
    assert written == [
        "digits_resnet20_40ep/accuracy_vs_time.png",
        "digits_resnet20_40ep/probabilities_slsam_s0.2_40ep_seed0.png",
    ]
    assert all((tmp_path / "assets" / p).read_bytes().startswith(PNG_MAGIC) for p in written)
    assert regenerate.main([*args, "--check"]) == 0


def test_blocks_that_do_not_match_the_tables_are_errors(
    regenerate, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    results = ROOT / "experiments" / "results"
    page = tmp_path / "results.md"
    original = PAGE.read_text(encoding="utf-8")
    page.write_text(original.replace("generated: active ratios -->", "generated: active ratio -->"))
    assert regenerate.main(["--results", str(results), "--page", str(page), "--check"]) == 2
    assert "active ratio" in capsys.readouterr().err
    page.write_text(original + "\n<!-- generated: nonsense -->\n|x|\n<!-- end generated: nonsense -->\n")
    assert regenerate.main(["--results", str(results), "--page", str(page), "--check"]) == 2
    assert "nonsense" in capsys.readouterr().err
    assert regenerate.main(["--results", str(tmp_path / "none"), "--page", str(page), "--check"]) == 2
    assert "summary" in capsys.readouterr().err
