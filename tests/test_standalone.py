"""The repository stands alone: no file points at a path outside it, a tracker or the place it was built.

A clone has the paper's arXiv id and ``docs/deviations.md``, nothing beside the repository. The
patterns are assembled from pieces so that this file does not match them itself.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SECTION = "\N{SECTION SIGN}"

# (what it finds, the pattern); each needs a word boundary, so e.g. SPECIALS or "issues" alone pass.
FORBIDDEN = [
    ("a path beside the repository", re.compile(re.escape(".." + "/") + "shared" + r"\b")),
    ("the unpublished spec", re.compile(r"\b" + "SP" + "EC" + r"(?:\.md\b|\s*" + SECTION + r"|\s+\d)")),
    ("a tracker issue", re.compile(r"\b" + "iss" + r"ues?\s+#?\d+\b", re.IGNORECASE)),
    ("a tracker item", re.compile(r"\b" + "it" + r"ems?\s+\d+\b", re.IGNORECASE)),
    ("the place it was built in", re.compile(r"\b" + "work" + r"place\b", re.IGNORECASE)),
    ("a device-tool block", re.compile(r"(?:^|\s)" + "car" + r"ry:\s*\[")),
    ("that place's GPU tool", re.compile(r"\b" + "device" + r"\s+machine\b", re.IGNORECASE)),
]


def _files() -> list[Path]:
    """Tracked files plus new ones not yet committed (but not ignored ones), as a clone will see them."""
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the file list comes from `git ls-files`")
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout
    return [ROOT / name for name in sorted(set(out.decode().split("\0"))) if name and (ROOT / name).is_file()]


def _text(path: Path) -> str | None:
    """The file's text, or None for a binary file (a NUL byte or not UTF-8)."""
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        return None
    try:
        return data.decode()
    except UnicodeDecodeError:
        return None


def find(text: str) -> list[tuple[int, str, str]]:
    """``(line number, what, line)`` for every forbidden mention in ``text``."""
    return [
        (n, what, line.strip())
        for n, line in enumerate(text.splitlines(), 1)
        for what, pattern in FORBIDDEN
        if pattern.search(line)
    ]


def test_no_file_points_outside_the_repository():
    files = _files()
    assert any(p.relative_to(ROOT).parts[0] == "results" for p in files), "the generated results are not covered"
    hits = [
        f"{path.relative_to(ROOT)}:{n}: {what}: {line[:160]}"
        for path in files
        if (text := _text(path)) is not None
        for n, what, line in find(text)
    ]
    assert not hits, (
        "cite the paper (arXiv:1908.05474, its sections and equations) and docs/deviations.md instead:\n"
        + "\n".join(hits)
    )


@pytest.mark.parametrize(
    "line",
    [
        "The paper is in `" + ".." + "/shared/paper/`",
        "(" + "SP" + "EC " + SECTION + "2)",
        "SP" + "EC" + SECTION + "1",
        "SP" + "EC 3 says",
        "`" + ".." + "/" + ".." + "/shared/" + "SP" + "EC.md`",
        "### Targets (" + "is" + "sue 6)",
        "It" + "em 6 (" + "Is" + "sue #12): text",
        "It" + "em 5: images per second",
        "(it" + "ems 2 and 3)",
        "In this project's work" + "place, a session",
        "car" + 'ry: [".whl"]    timeout_s: 600',
        "a device" + " machine runs it",
    ],
)
def test_each_pattern_finds_what_it_is_for(line: str):
    assert find(line), line


@pytest.mark.parametrize(
    "line",
    [
        "from alr.data.text import ALPHABET, PAD, SPECIALS",
        "docs/deviations.md, " + SECTION + "Normalisation; the specification of eq. 4",
        "known issues: none; open items below",
        "for item in items: total += item",
        "shared memory; ../results/table1.md",
        "the device's dense tensor-core peak",
    ],
)
def test_the_patterns_pass_ordinary_text(line: str):
    assert not find(line), find(line)


def _slugs(markdown: str) -> set[str]:
    """GitHub's anchors for the headings of a page: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#{1,6}\s+(.+?)\s*$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


def test_every_citation_of_the_deviations_page_names_one_of_its_sections():
    sections = _slugs((ROOT / "docs" / "deviations.md").read_text())
    cite = re.compile(r"deviations\.md#([\w-]+)")
    broken = [
        f"{path.relative_to(ROOT)}:{n}: #{anchor}"
        for path in _files()
        if (text := _text(path)) is not None
        for n, line in enumerate(text.splitlines(), 1)
        for anchor in cite.findall(line)
        if anchor not in sections
    ]
    assert not broken, f"no such section in docs/deviations.md (its anchors: {sorted(sections)}):\n" + "\n".join(broken)
