"""``dataset.download=true``: torchvision's downloads, with a time limit and one-line errors.

torchvision fetches and checks each file (its md5) and unpacks it; :func:`fetch` adds what a run needs
around that: a time limit on every connection (torchvision's ``urlopen`` takes none of its own), the next
mirror when one fails, no half-written file left behind, and one :class:`RunError` line when none serves it.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from alr.errors import RunError


@contextmanager
def socket_timeout(seconds: float) -> Iterator[None]:
    """Sockets opened inside give up after ``seconds`` without data; the previous default comes back after."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def announce(name: str, what: str, size_mb: float, folder: Path, timeout_s: float) -> None:
    """Say on stderr what is about to be downloaded, where to, and when it gives up."""
    print(
        f"[alr] {name}: downloading {what} ({size_mb:.3g} MB) into {folder}; "
        f"it gives up after {timeout_s:g} s without data",
        file=sys.stderr,
    )


def fetch(name: str, urls: Sequence[str], folder: Path, filename: str, md5: str, timeout_s: float, manual: str) -> None:
    """Download ``filename`` into ``folder`` from the first of ``urls`` that serves it intact, and unpack it there.

    A file this call started is removed when the download fails, so that a rerun does not take it for
    the user's. When every URL fails: a :class:`RunError` naming the URLs, the folder and the reasons,
    then ``manual`` (how to put the file there by hand).
    """
    from torchvision.datasets.utils import download_and_extract_archive

    target = folder / filename
    existed = target.exists()
    reasons: list[str] = []
    with socket_timeout(timeout_s):
        for url in urls:
            try:
                download_and_extract_archive(url, str(folder), filename=filename, md5=md5)
                return
            # no network, refused, timed out (OSErrors); a file failing its checksum or a bad archive (RuntimeError)
            except (OSError, RuntimeError) as e:
                reasons.append(str(getattr(e, "reason", None) or e))
                if not existed:
                    target.unlink(missing_ok=True)
    raise RunError(
        f"{name}: could not download {' or '.join(urls)} into {folder} ({'; '.join(dict.fromkeys(reasons))}). {manual}"
    )
