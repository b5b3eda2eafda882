"""The front page and docs/: every relative link resolves, every `make` target they name exists."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\]\(([^)\s]+)\)")
MAKE = re.compile(r"\bmake ([a-z][a-z0-9-]*)")


def _links(page: Path) -> list[str]:
    return [t for t in LINK.findall(page.read_text()) if "://" not in t and not t.startswith(("#", "mailto:"))]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files_that_exist(page: Path):
    missing = [t for t in _links(page) if not (page.parent / t.split("#")[0]).exists()]
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_every_page_is_reachable_from_the_front_page():
    seen, todo = set(), [ROOT / "README.md"]
    while todo:
        page = todo.pop()
        if page in seen or page.suffix != ".md":
            continue
        seen.add(page)
        todo += [(page.parent / t.split("#")[0]).resolve() for t in _links(page)]
    assert not set(PAGES) - seen, f"not linked from README.md: {sorted(map(str, set(PAGES) - seen))}"


def test_every_make_target_the_docs_name_exists():
    targets = sorted({t for page in PAGES for t in MAKE.findall(page.read_text())})
    assert "reproduce-table1" in targets and "demo" in targets
    for target in targets:
        proc = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, f"`make {target}` is named in the docs but fails: {proc.stderr.strip()}"


def test_sync_fills_blocks_wherever_they_sit_and_rewrites_their_links(tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    from sync_readme import sync

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "status.md").write_text("# Status\n\n| [Table 1](table1.md) | ![f](plots/a.png) |\n")
    (tmp_path / "docs").mkdir()
    block = "<!-- begin:status -->\nold\n<!-- end:status -->\n"
    (tmp_path / "README.md").write_text("# Front\n" + block)
    (tmp_path / "docs" / "page.md").write_text("# Page\n" + block)
    assert sorted(sync(tmp_path)) == ["README.md: results/status.md", "docs/page.md: results/status.md"]
    assert "| [Table 1](results/table1.md) | ![f](results/plots/a.png) |" in (tmp_path / "README.md").read_text()
    page = (tmp_path / "docs" / "page.md").read_text()
    assert "[Table 1](../results/table1.md)" in page and "old" not in page and "# Status" not in page
