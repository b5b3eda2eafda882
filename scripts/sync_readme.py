"""Copy generated result files into the docs, between ``<!-- begin:NAME -->`` / ``<!-- end:NAME -->`` markers.

So that README.md and docs/*.md show generated numbers only: ``python scripts/sync_readme.py`` (run by
``make demo``, ``make results`` and ``make bench``). A block is filled wherever its markers sit, in any of
those pages; relative links and images of the copied text are rewritten for the page they land in.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# marker name -> generated file whose body (without its "# title" line) goes between the markers
SOURCES = {
    "demo-table": "results/demo/table.md",
    "status": "results/status.md",
    "table1": "results/table1.md",
    "table2": "results/table2.md",
    "table3": "results/table3.md",
    "table4": "results/table4.md",
    "fmnist": "results/fmnist.md",
    "fmnist_resnet32": "results/fmnist_resnet32.md",
    "bench": "results/bench.md",
}
MARKER = re.compile(r"<!-- begin:([\w-]+) -->\n.*?<!-- end:\1 -->", re.S)
LINK = re.compile(r"(\]\()([^)\s]+)(\))")


def pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def relink(body: str, source: Path, page: Path) -> str:
    """Rewrite the relative links of ``body`` (written for ``source``'s folder) for ``page``'s folder."""

    def fix(m: re.Match) -> str:
        target = m.group(2)
        if "://" in target or target.startswith(("#", "/", "mailto:")):
            return m.group(0)
        moved = os.path.relpath(source.parent / target, page.parent)
        return m.group(1) + Path(moved).as_posix() + m.group(3)

    return LINK.sub(fix, body)


def sync(root: Path = ROOT) -> list[str]:
    """Fill every generated block of every page whose source exists; return ``page: source`` for each."""
    done = []
    for page in pages(root):
        text = page.read_text()

        def fill(m: re.Match, page: Path = page) -> str:
            name = m.group(1)
            if name not in SOURCES:
                sys.exit(f"error: {page.relative_to(root)} has a block '{name}' that no generated file fills")
            source = root / SOURCES[name]
            if not source.exists():
                return m.group(0)
            body = "\n".join(line for line in source.read_text().splitlines() if not line.startswith("# ")).strip()
            done.append(f"{page.relative_to(root)}: {SOURCES[name]}")
            return f"<!-- begin:{name} -->\n{relink(body, source, page)}\n<!-- end:{name} -->"

        page.write_text(MARKER.sub(fill, text))
    return done


if __name__ == "__main__":
    filled = sync()
    print("generated blocks filled:" if filled else "no generated files yet", *filled, sep="\n  ")
