"""Copy generated result files into README.md between ``<!-- begin:NAME -->`` / ``<!-- end:NAME -->`` markers.

So that the README shows generated numbers only: ``python scripts/sync_readme.py`` (run by ``make demo``
and ``make bench``).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# marker name -> generated file whose body (without its "# title" line) goes between the markers
SOURCES = {"demo-table": "results/demo/table.md", "table1": "results/table1.md", "bench": "results/bench.md"}


def sync(readme: Path = ROOT / "README.md") -> list[str]:
    text = readme.read_text()
    done = []
    for name, source in SOURCES.items():
        path = ROOT / source
        if not path.exists():
            continue
        body = "\n".join(line for line in path.read_text().splitlines() if not line.startswith("# ")).strip()
        pattern = re.compile(rf"(<!-- begin:{name} -->\n).*?(<!-- end:{name} -->)", re.S)
        if not pattern.search(text):
            sys.exit(f"error: README.md has no <!-- begin:{name} --> ... <!-- end:{name} --> markers")
        text = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), text)
        done.append(source)
    readme.write_text(text)
    return done


if __name__ == "__main__":
    print("README.md now shows:", ", ".join(sync()) or "nothing (no generated files yet)")
