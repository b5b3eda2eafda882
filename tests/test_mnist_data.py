"""Fashion-MNIST and MNIST: the IDX reader on files written here, each bad file's one line, the stratified
subset, the on-device batches, the backbones on one channel, downloads through local sockets, and a
smoke run of the real entry point."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import json
import socket
import struct
import threading
import time
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from torchvision import datasets

from alr.data import mnist
from alr.data.samples import main as write_samples
from alr.errors import RunError
from conftest import compose, run_train

# Xiao et al. 2017 (arXiv:1708.07747), Table 1's labels.
FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
DEBIAN = Path("/usr/share/datasets/fashion-mnist")
TRAIN_PER_CLASS = [20 + 2 * k for k in range(10)]  # unequal, so stratification shows
N_TEST = 12


def idx(array: np.ndarray) -> bytes:
    """IDX bytes, written from the format's definition (not by the suite's own writer)."""
    return struct.pack(">4B", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_release(
    folder: Path, gz: bool = True, seed: int = 0, per_class: list[int] = TRAIN_PER_CLASS
) -> dict[str, np.ndarray]:
    """Four IDX files of random 28×28 images in ``folder``, gzipped or not; the arrays they hold."""
    rng = np.random.default_rng(seed)
    y_train = rng.permutation(np.repeat(np.arange(10), per_class)).astype(np.uint8)
    y_test = (np.arange(N_TEST) % 10).astype(np.uint8)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (len(y_train), 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": y_train,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (N_TEST, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": y_test,
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        data = idx(array)
        (folder / f"{name}.gz").write_bytes(gzip.compress(data)) if gz else (folder / name).write_bytes(data)
    return arrays


def path_of(folder: Path, name: str) -> Path:
    return next(p for p in (folder / name, folder / f"{name}.gz") if p.exists())


# --- reading -------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("layout", ["torchvision", "flat"])
def test_both_layouts_gzipped_or_not(tmp_path: Path, layout: str, gz: bool) -> None:
    folder = tmp_path / "FashionMNIST" / "raw" if layout == "torchvision" else tmp_path
    arrays = write_release(folder, gz)
    data = mnist.load_arrays("fashion_mnist", tmp_path)
    assert data["folder"] == folder and data["class_names"] == FASHION
    assert data["x_train"].shape == (sum(TRAIN_PER_CLASS), 1, 28, 28) and data["x_train"].dtype == np.uint8
    assert np.array_equal(data["x_train"][:, 0], arrays["train-images-idx3-ubyte"])
    assert np.array_equal(data["x_test"][:, 0], arrays["t10k-images-idx3-ubyte"])
    assert np.array_equal(data["y_train"], arrays["train-labels-idx1-ubyte"]) and data["y_train"].dtype == np.int64
    assert np.array_equal(data["y_test"], arrays["t10k-labels-idx1-ubyte"])


def test_mnist_reads_its_own_folder_and_names(tmp_path: Path) -> None:
    write_release(tmp_path / "FashionMNIST" / "raw", seed=1)
    arrays = write_release(tmp_path / "MNIST" / "raw", seed=2)
    data = mnist.load_arrays("mnist", tmp_path)
    assert np.array_equal(data["x_test"][:, 0], arrays["t10k-images-idx3-ubyte"])
    assert data["class_names"][:2] == ["0 - zero", "1 - one"] and len(data["class_names"]) == 10


@pytest.mark.skipif(not DEBIAN.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_the_real_release_from_debians_package() -> None:
    data = mnist.load_arrays("fashion_mnist", DEBIAN)
    assert data["x_train"].shape == (60000, 1, 28, 28) and data["x_test"].shape == (10000, 1, 28, 28)
    assert np.bincount(data["y_train"]).tolist() == [6000] * 10 and np.bincount(data["y_test"]).tolist() == [1000] * 10
    mean, std = mnist._pixel_stats(data["x_train"])
    assert abs(mean - 0.2860) < 1e-4 and abs(std - 0.3530) < 1e-4  # the constants torchvision users type in


# --- bad files ------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def _gunzip_in_place(path: Path) -> None:
    path.write_bytes(gzip.decompress(path.read_bytes()))


BAD = {
    # case: (file changed, how, words of the message)
    "truncated gzip": ("train-images-idx3-ubyte.gz", _truncate, "cannot be read (EOFError"),
    "not gzip": ("t10k-labels-idx1-ubyte.gz", _gunzip_in_place, "cannot be read (BadGzipFile"),
    "truncated raw": (
        "t10k-images-idx3-ubyte",
        _truncate,
        "where its header announces 12×28×28 = 9408; the file is truncated",
    ),
    "trailing bytes": (
        "t10k-images-idx3-ubyte",
        lambda p: p.write_bytes(p.read_bytes() + b"\0"),
        "holds 9409 bytes of data where its header announces 12×28×28 = 9408; the file is corrupt",
    ),
    "header cut": ("train-labels-idx1-ubyte", lambda p: p.write_bytes(p.read_bytes()[:6]), "holds 6 bytes, fewer than"),
    "wrong magic": (
        "t10k-images-idx3-ubyte",
        lambda p: p.write_bytes(idx(np.zeros(N_TEST, np.uint8))),  # a labels file where the images belong
        "magic number 0x00000801 is not 0x00000803",
    ),
    "gzipped without .gz": (
        "t10k-labels-idx1-ubyte",
        lambda p: p.write_bytes(gzip.compress(p.read_bytes())),
        "is gzipped; name it t10k-labels-idx1-ubyte.gz",
    ),
    "counts disagree": (
        "t10k-labels-idx1-ubyte",
        lambda p: p.write_bytes(idx(np.zeros(N_TEST - 1, np.uint8))),
        "holds 12 images but",
    ),
    "label out of range": (
        "train-labels-idx1-ubyte",
        lambda p: p.write_bytes(idx(np.full(sum(TRAIN_PER_CLASS), 10, np.uint8))),
        "holds label 10, outside [0, 10)",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_file_gives_one_line_naming_it(tmp_path: Path, case: str) -> None:
    name, change, words = BAD[case]
    write_release(tmp_path, gz=name.endswith(".gz"))
    path = tmp_path / name
    change(path)
    with pytest.raises(RunError) as e:
        mnist.load_arrays("fashion_mnist", tmp_path)
    message = str(e.value)
    assert str(path) in message and words in message and "\n" not in message, message
    assert "dataset.download=true" in message


def test_missing_files_say_where_they_were_looked_for(tmp_path: Path) -> None:
    with pytest.raises(RunError) as e:
        mnist.load_arrays("fashion_mnist", tmp_path)
    assert f"no IDX files in {tmp_path / 'FashionMNIST' / 'raw'} nor in {tmp_path}" in str(e.value)
    assert "/usr/share/datasets/fashion-mnist" in str(e.value) and "dataset.download=true" in str(e.value)
    write_release(tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    with pytest.raises(RunError, match="missing file .*t10k-images-idx3-ubyte \\(or t10k-images-idx3-ubyte.gz\\)"):
        mnist.load_arrays("fashion_mnist", tmp_path)


def test_a_bad_file_stops_the_run_before_anything_is_written(tmp_path: Path) -> None:
    from alr.trainer import fit

    write_release(tmp_path / "data")
    _truncate(tmp_path / "data" / "train-images-idx3-ubyte.gz")
    cfg = compose("debug=fast", "dataset=fashion_mnist", "model=resnet32", f"dataset.data_dir={tmp_path / 'data'}")
    try:
        with pytest.raises(RunError, match="train-images-idx3-ubyte.gz: cannot be read"):
            fit(cfg, tmp_path / "run")
    finally:
        torch.use_deterministic_algorithms(False)  # debug=fast turns it on for the whole process
    assert not [p for p in (tmp_path / "run").rglob("*") if p.is_file()]


# --- batches --------------------------------------------------------------------------------------


def bundle(root: Path, **options):
    return mnist.build(batch_size=32, device="cpu", data_dir=root, eval_batch_size=5, **options)


def test_the_subset_is_stratified_and_the_same_for_every_seed(tmp_path: Path) -> None:
    arrays = write_release(tmp_path)
    labels = arrays["train-labels-idx1-ubyte"]
    first = bundle(tmp_path, seed=0, train_subset=100).train
    again = bundle(tmp_path, seed=3, train_subset=100).train
    assert torch.equal(first.inputs, again.inputs) and torch.equal(first.targets, again.targets)
    counts = np.bincount(first.targets.numpy(), minlength=10)
    share = 100 * np.array(TRAIN_PER_CLASS) / len(labels)
    assert counts.sum() == 100 and (np.abs(counts - share) < 1).all(), counts
    # Each kept image is a training image with its own label.
    images = torch.from_numpy(arrays["train-images-idx3-ubyte"])
    where = [int((images == x[0]).flatten(1).all(1).nonzero()[0]) for x in first.inputs]
    assert len(set(where)) == 100 and np.array_equal(labels[where], first.targets.numpy())
    other = bundle(tmp_path, train_subset=100, split_seed=1).train
    assert not torch.equal(first.inputs, other.inputs)
    assert len(bundle(tmp_path).train.targets) == len(labels)


@pytest.mark.parametrize("n", [9, sum(TRAIN_PER_CLASS) + 1, 10.5])
def test_a_subset_that_cannot_be_drawn_names_the_key(tmp_path: Path, n) -> None:
    write_release(tmp_path)
    with pytest.raises(RunError, match=f"config key 'dataset.train_subset' is {n}, but it must be a whole number"):
        bundle(tmp_path, train_subset=n)


def test_normalisation_uses_the_whole_training_split(tmp_path: Path) -> None:
    arrays = write_release(tmp_path)
    data = bundle(tmp_path, train_subset=50)
    pixels = arrays["train-images-idx3-ubyte"].astype(np.float64) / 255
    assert data.info["pixel_mean"] == pytest.approx(pixels.mean(), abs=1e-12)
    assert data.info["pixel_std"] == pytest.approx(pixels.std(), abs=1e-12)
    x, y, _ = next(data.test.epoch(0))
    expected = (arrays["t10k-images-idx3-ubyte"][:5, None] / 255 - pixels.mean()) / pixels.std()
    torch.testing.assert_close(x, torch.from_numpy(expected).float())
    assert data.class_names == FASHION and data.info["train_images"] == 50


def _crops(out: torch.Tensor, source: torch.Tensor, padding: int = 4) -> tuple[list[int], list[bool]]:
    """For each output image, which source image it was cut from and whether it was flipped."""
    size = source.shape[-1]
    windows = torch.nn.functional.pad(source.float(), [padding] * 4).unfold(2, size, 1).unfold(3, size, 1)
    origin, flipped = [], []
    for image in out:
        plain = (windows == image[0]).flatten(-2).all(-1).flatten(1).any(1)
        mirrored = (windows == image[0].flip(-1)).flatten(-2).all(-1).flatten(1).any(1)
        assert (plain | mirrored).sum() == 1, "not a crop of exactly one source image"
        origin.append(int((plain | mirrored).nonzero()[0]))
        flipped.append(not bool(plain.any()))
    return origin, flipped


@pytest.mark.parametrize(("name", "flips"), [("fashion_mnist", True), ("mnist", False)])
def test_training_batches_are_crops_flipped_as_the_config_says(tmp_path: Path, name: str, flips: bool) -> None:
    arrays = write_release(tmp_path / mnist.RELEASES[name].torchvision_class / "raw", per_class=[6] * 10)
    cfg = compose(f"dataset={name}", f"dataset.data_dir={tmp_path}")
    data = hydra.utils.instantiate(cfg.dataset.build, batch_size=60, device="cpu", seed=0)
    x, y, _ = next(data.train.epoch(0))
    pixels = (x * data.info["pixel_std"] + data.info["pixel_mean"]) * 255
    assert torch.allclose(pixels, pixels.round(), atol=1e-3)
    origin, flipped = _crops(pixels.round(), torch.from_numpy(arrays["train-images-idx3-ubyte"])[:, None])
    assert sorted(origin) == list(range(len(y)))
    assert np.array_equal(y.numpy(), arrays["train-labels-idx1-ubyte"][origin])
    assert (0.2 < np.mean(flipped) < 0.8) if flips else not any(flipped)


# --- configs and models ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "params"), [("resnet32", 464_154), ("preact_resnet18", 11_172_170), ("wrn28_10", 36_479_194)]
)
@pytest.mark.parametrize("dataset", ["fashion_mnist", "mnist"])
def test_cifar_backbones_take_one_channel_without_overrides(dataset: str, model: str, params: int) -> None:
    cfg = compose(f"dataset={dataset}", f"model={model}")
    net = hydra.utils.instantiate(cfg.model).eval()
    stem = next(m for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    assert stem.in_channels == 1
    assert sum(p.numel() for p in net.parameters()) == params - 2 * stem.out_channels * 9  # two fewer input planes
    with torch.no_grad():
        assert net(torch.randn(1, 1, 28, 28)).shape == (1, 10)
    assert "in_channels" not in compose("dataset=cifar10", f"model={model}").model


def test_loader_keys_may_change_on_resume_and_the_data_keys_may_not() -> None:
    from alr.run_folder import resumable_keys

    keys = resumable_keys(compose("dataset=fashion_mnist", "model=resnet32"))
    assert {f"dataset.build.{k}" for k in ("data_dir", "download", "download_timeout_s")} <= keys
    fixed = ("train_subset", "split_seed", "padding", "flip", "eval_batch_size", "name")
    assert not {f"dataset.build.{k}" for k in fixed} & keys and "dataset.train_subset" not in keys


# --- downloads ------------------------------------------------------------------------------------


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def local_urls():
    """URLs on this machine: ``refused`` (nobody listens), ``silent`` (accepts, never answers), and
    ``serve(folder)`` (an HTTP server of ``folder``'s files)."""
    closing = []

    def port(listen: bool) -> str:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        closing.append(sock)
        url = f"http://127.0.0.1:{sock.getsockname()[1]}/"
        if listen:
            sock.listen(8)  # the kernel accepts the connection; nobody ever answers
        else:
            sock.close()
        return url

    def serve(folder: Path) -> str:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), lambda *a: _Quiet(*a, directory=str(folder)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        closing.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield port, serve
    for thing in closing:
        if isinstance(thing, http.server.HTTPServer):
            thing.shutdown()
            thing.server_close()
        else:
            thing.close()


def _served_release(folder: Path, cls, monkeypatch: pytest.MonkeyPatch) -> dict[str, np.ndarray]:
    """A release in ``folder`` whose md5s torchvision's ``cls`` now expects."""
    arrays = write_release(folder)
    resources = [(gz, hashlib.md5((folder / gz).read_bytes()).hexdigest()) for gz, _ in cls.resources]
    monkeypatch.setattr(cls, "resources", resources)
    return arrays


def test_download_tries_each_mirror_checks_md5_and_unpacks(tmp_path, local_urls, monkeypatch, capsys) -> None:
    port, serve = local_urls
    arrays = _served_release(tmp_path / "server", datasets.MNIST, monkeypatch)
    refused = port(listen=False)
    monkeypatch.setattr(datasets.MNIST, "mirrors", [refused, serve(tmp_path / "server")])
    data = mnist.build(batch_size=8, device="cpu", name="mnist", data_dir=tmp_path / "data", download=True)
    raw = tmp_path / "data" / "MNIST" / "raw"
    assert sorted(p.name for p in raw.iterdir()) == sorted([*arrays, *(f"{n}.gz" for n in arrays)])
    assert torch.equal(data.train.targets, torch.from_numpy(arrays["train-labels-idx1-ubyte"]).long())
    names = (
        "train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz"
    )
    assert f"downloading {names} from {refused} (11.5 MB) into {raw}" in capsys.readouterr().err


def test_refused_download_names_the_urls_and_leaves_no_file(tmp_path, local_urls, monkeypatch, capsys) -> None:
    port, _ = local_urls
    url = port(listen=False)
    monkeypatch.setattr(datasets.FashionMNIST, "mirrors", [url])
    with pytest.raises(RunError) as e:
        mnist.download_idx("fashion_mnist", tmp_path, timeout_s=5)
    raw = tmp_path / "FashionMNIST" / "raw"
    message = str(e.value)
    assert f"could not download {url}train-images-idx3-ubyte.gz into {raw}" in message and "refused" in message.lower()
    assert "\n" not in message and "put it in" in message and not list(raw.iterdir())
    assert f"from {url} (30.8 MB) into {raw}" in capsys.readouterr().err  # said before it starts


def test_a_file_failing_its_md5_is_removed(tmp_path, local_urls, monkeypatch) -> None:
    _, serve = local_urls
    write_release(tmp_path / "server")
    monkeypatch.setattr(datasets.FashionMNIST, "mirrors", [serve(tmp_path / "server")])
    with pytest.raises(RunError, match="File not found or corrupted"):
        mnist.download_idx("fashion_mnist", tmp_path / "data", timeout_s=5)
    assert not list((tmp_path / "data" / "FashionMNIST" / "raw").iterdir())


def test_a_server_that_never_answers_times_out(tmp_path, local_urls, monkeypatch) -> None:
    port, _ = local_urls
    monkeypatch.setattr(datasets.FashionMNIST, "mirrors", [port(listen=True)])
    start = time.monotonic()
    with pytest.raises(RunError, match="timed out"):
        mnist.download_idx("fashion_mnist", tmp_path, timeout_s=1)
    assert time.monotonic() - start < 30 and socket.getdefaulttimeout() is None


def test_files_already_there_are_not_downloaded(tmp_path, local_urls, monkeypatch) -> None:
    port, _ = local_urls
    monkeypatch.setattr(datasets.FashionMNIST, "mirrors", [port(listen=False)])
    write_release(tmp_path, gz=False)  # Debian's way: the folder itself; their md5s are not torchvision's
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert bundle(tmp_path, download=True).class_names == FASHION
    assert before == {p.name: p.read_bytes() for p in tmp_path.iterdir()}


# --- end to end -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_smoke_run_on_sample_files_and_skipped_after_the_data_moves(tmp_path: Path) -> None:
    data, out = tmp_path / "data", tmp_path / "runs"
    write_samples(["--out", str(data), "fashion_mnist", "mnist"])
    cell = ["debug=smoke", "dataset=fashion_mnist", "model=resnet32", "method=alr", "dataset.train_subset=100"]
    run_train(*cell, f"dataset.data_dir={data}", out=out)
    run_dir = out / "default" / "fashion_mnist-resnet32-alr-s0"
    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "finished" and result["data"]["train_images"] == 100
    assert json.loads((run_dir / "classes.json").read_text()) == FASHION
    data.rename(tmp_path / "moved")
    proc = run_train(*cell, f"dataset.data_dir={tmp_path / 'moved'}", "dataset.download=true", out=out)
    assert "has finished already: skipping" in proc.stdout
