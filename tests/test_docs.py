"""The documentation site: ``mkdocs build --strict`` passes, the API reference covers every public name, and every
python example of the docs runs (CPU, tiny models, in seconds).

Examples run in one namespace per page, in page order, with the working directory a fresh temporary folder. A block
is skipped only when it is marked: ``<!-- no-test -->`` on the line before its fence (blank lines allowed between),
or a fence title naming what it needs, e.g. ```` ```python title="gpu-only" ````.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import lightning_slsam

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: pages whose code is not ours to run here: the benchmark page is written with the benchmark scripts, by their owner
EXCLUDED_PAGES = {"benchmarks.md"}
#: fence titles that mark an example which cannot run here (no GPU, no second process, no network)
SKIP_TITLES = {"gpu-only", "ddp-only", "network-only", "no-test"}
NO_TEST = "<!-- no-test -->"
#: pages that must show runnable code, not only skipped blocks: the home page, the Hydra guide and every user guide
MUST_RUN = ["index.md", "hydra.md", *sorted(p.relative_to(DOCS).as_posix() for p in (DOCS / "guide").glob("*.md"))]
#: skipped blocks are the exception: keep them few
MAX_SKIPPED = 8
#: modules documented beside lightning_slsam.__all__ on the reference pages, with the members that must appear
DOCUMENTED_MODULES = {
    "lightning_slsam.app.cli": ["ConfigError", "train", "instantiate_group", "error_line", "main"],
    "lightning_slsam.loading.optional_dependencies": ["OPTIONAL_MODULES", "import_optional", "install_hint"],
    "lightning_slsam.app.report": None,  # None: the module's __all__
    "lightning_slsam.optim": None,
    "lightning_slsam.engine.step": ["run_step", "StepResult", "measure_pass_one"],
    "lightning_slsam.app.sweep_summary": [
        "write_summary",
        "build_summary",
        "validation_curve",
        "downsample_history",
        "flatten_config",
        "main",
    ],
    "lightning_slsam.data": None,
    "lightning_slsam.models": None,
    "lightning_slsam.engine.arm_groups": ["ARM_GROUPS", "select_arms", "check_spec"],
}
FENCE = re.compile(r"^(?P<indent>\s*)(?P<fence>`{3,}|~{3,})\s*(?P<info>.*)$")
TITLE = re.compile(r'title="(?P<title>[^"]*)"')


@dataclass
class Block:
    """One fenced python block of a page."""

    page: str
    line: int  # 1-based line of the opening fence
    code: str
    skipped: bool


def python_blocks(path: Path) -> list[Block]:
    """The ```` ```python ```` (or ``py``) blocks of a markdown page, in order, with their skip marks."""
    lines = path.read_text(encoding="utf-8").splitlines()
    page = path.relative_to(DOCS).as_posix()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        indent, fence, info = match["indent"], match["fence"], match["info"].strip()
        end = index + 1
        while end < len(lines) and not lines[end].strip().startswith(fence):
            end += 1
        language = info.split()[0].strip("{}.").lower() if info else ""
        if language in ("python", "py"):
            body = [
                line[len(indent) :] if line.startswith(indent) else line.lstrip() for line in lines[index + 1 : end]
            ]
            title = TITLE.search(info)
            previous = next((lines[i].strip() for i in range(index - 1, -1, -1) if lines[i].strip()), "")
            skipped = previous == NO_TEST or (title is not None and title["title"] in SKIP_TITLES)
            blocks.append(Block(page, index + 1, "\n".join(body) + "\n", skipped))
        index = end + 1
    return blocks


def doc_pages() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if p.relative_to(DOCS).as_posix() not in EXCLUDED_PAGES)


PAGES_WITH_CODE = [p.relative_to(DOCS).as_posix() for p in doc_pages() if python_blocks(p)]


# --- the examples ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("page", PAGES_WITH_CODE)
def test_examples_run(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every unmarked python block of ``page`` runs, in order, in one namespace."""
    monkeypatch.chdir(tmp_path)
    # an example that starts a process group (docs/guide/sharded.md) sets these; they go when the test ends, so
    # that later tests' subprocesses do not inherit a port this process may still hold
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "NODE_RANK"):
        monkeypatch.delenv(name, raising=False)
    namespace: dict[str, object] = {"__name__": "docs_example_" + re.sub(r"\W", "_", page)}
    for block in python_blocks(DOCS / page):
        if block.skipped:
            continue
        code = compile(block.code, f"docs/{page}:{block.line}", "exec")
        try:
            exec(code, namespace)
        except Exception as error:
            raise AssertionError(f"the example at docs/{page}:{block.line} failed: {error!r}") from error


def test_guides_have_runnable_examples_and_few_skipped() -> None:
    assert len(MUST_RUN) >= 4, MUST_RUN
    for page in MUST_RUN:
        blocks = python_blocks(DOCS / page)
        assert any(not b.skipped for b in blocks), f"docs/{page} has no runnable python example"
    skipped = [f"{b.page}:{b.line}" for p in doc_pages() for b in python_blocks(p) if b.skipped]
    assert len(skipped) <= MAX_SKIPPED, f"too many examples marked as not runnable here: {skipped}"


def test_block_extraction_honours_the_marks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.modules[__name__], "DOCS", tmp_path)
    page = tmp_path / "page.md"
    page.write_text(
        "```python\na = 1\n```\n\n<!-- no-test -->\n\n```python\nb = 2\n```\n\n"
        '```python title="gpu-only"\nc = 3\n```\n\n```bash\nls\n```\n\n!!! note\n    ```py\n    d = 4\n    ```\n'
    )
    blocks = python_blocks(page)
    assert [(b.code, b.skipped) for b in blocks] == [
        ("a = 1\n", False),
        ("b = 2\n", True),
        ("c = 3\n", True),
        ("d = 4\n", False),
    ]


# --- the site -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The site built by ``mkdocs build --strict`` into a temporary folder."""
    missing = [m for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python") if not _importable(m)]
    if missing:
        pytest.skip(
            f"the docs build needs mkdocs, mkdocs-material and mkdocstrings[python] ({', '.join(missing)} not "
            "installed); pip install -e '.[docs]'"
        )
    out = tmp_path_factory.mktemp("site")
    command = [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(ROOT / "mkdocs.yml")]
    result = subprocess.run(
        [*command, "--site-dir", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        check=False,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
    return out


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # the parent package is missing
        return False


def _anchor_ids(folder: Path) -> set[str]:
    ids: set[str] = set()
    for html in folder.rglob("*.html"):
        ids.update(re.findall(r'\bid="([^"]+)"', html.read_text(encoding="utf-8")))
    return ids


def test_site_builds_strict(site: Path) -> None:
    assert (site / "index.html").is_file()
    assert (site / "reference" / "index.html").is_file()


def test_api_reference_covers_every_public_name(site: Path) -> None:
    ids = _anchor_ids(site / "reference")
    missing = [name for name in lightning_slsam.__all__ if f"lightning_slsam.{name}" not in ids]
    assert not missing, f"public names without an entry in the API reference: {missing}"


@pytest.mark.parametrize("module_name", sorted(DOCUMENTED_MODULES))
def test_api_reference_covers_the_documented_modules(site: Path, module_name: str) -> None:
    ids = _anchor_ids(site / "reference")
    members = DOCUMENTED_MODULES[module_name] or importlib.import_module(module_name).__all__
    missing = [name for name in members if f"{module_name}.{name}" not in ids]
    assert not missing, f"{module_name}: members without an entry in the API reference: {missing}"


def test_every_page_is_built(site: Path) -> None:
    """Each markdown page became a page of the site (``--strict`` already refuses pages missing from the nav)."""
    for path in DOCS.rglob("*.md"):
        relative = path.relative_to(DOCS).with_suffix("")
        folder = relative.parent if relative.name == "index" else relative
        assert (site / folder / "index.html").is_file(), f"docs/{path.relative_to(DOCS)} was not built"
