"""``dataset.download=true`` without a usable network, and over files that fail the checksum: one clear line."""

from __future__ import annotations

import socket
import time

import pytest
from torchvision import datasets

from alr.data.cifar import download_cifar
from alr.data.samples import write_cifar
from alr.errors import RunError


@pytest.fixture
def local_url(monkeypatch):
    """Point CIFAR-10's download at a port on this machine: one that refuses, or one that accepts and stays silent."""
    open_sockets = []

    def point(listen: bool) -> str:
        sock = socket.socket()
        open_sockets.append(sock)
        sock.bind(("127.0.0.1", 0))
        if listen:
            sock.listen(4)  # the kernel accepts the connection; nobody ever answers
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/cifar-10-python.tar.gz"
        if not listen:
            sock.close()
        monkeypatch.setattr(datasets.CIFAR10, "url", url)
        return url

    yield point
    for sock in open_sockets:
        sock.close()


def test_refused_download_names_the_url_the_folder_and_the_manual_way(tmp_path, local_url, capsys):
    url = local_url(listen=False)
    with pytest.raises(RunError) as e:
        download_cifar("cifar10", tmp_path, timeout_s=5)
    message = str(e.value)
    assert f"could not download {url} into {tmp_path}" in message and "refused" in message.lower()
    assert f"tar xzf cifar-10-python.tar.gz -C {tmp_path}" in message and "\n" not in message
    assert f"downloading {url} (163 MB) into {tmp_path}" in capsys.readouterr().err  # said before it starts


def test_a_server_that_never_answers_times_out(tmp_path, local_url):
    url = local_url(listen=True)
    start = time.monotonic()
    with pytest.raises(RunError, match="timed out") as e:
        download_cifar("cifar10", tmp_path, timeout_s=1)
    assert time.monotonic() - start < 30 and url in str(e.value)
    assert socket.getdefaulttimeout() is None  # the time limit is not left behind


def test_files_failing_the_checksum_are_not_downloaded_over(tmp_path, local_url):
    local_url(listen=False)
    folder = write_cifar(tmp_path, "cifar10")  # readable CIFAR files, but not the real ones
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(RunError, match="fail torchvision's checksum, so dataset.download=true would replace them"):
        download_cifar("cifar10", tmp_path)
    assert before == {p.name: p.read_bytes() for p in folder.iterdir()}
