"""CIFAR loading and augmentation, run on tiny files in torchvision's real on-disk format."""

from __future__ import annotations

import pickle
from pathlib import Path

import hydra
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from alr.data import cifar

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
N_PER_BATCH, N_TEST = 8, 6
# Ids avoid the bare word "gpu": conftest skips tests with that keyword when CUDA is absent.
LOADERS = pytest.mark.parametrize("loader", ["gpu", "torchvision"], ids=["on-device", "dataloader"])


def _dump(path: Path, obj: dict) -> None:
    with path.open("wb") as f:
        pickle.dump(obj, f)


def write_cifar(root: Path, name: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a tiny CIFAR-10 (5 batches of 8 + 6 test) or CIFAR-100 (40 + 6) in the real pickle format."""
    rng = np.random.default_rng(seed)
    k = cifar.LAYOUTS[name].num_classes
    x = rng.integers(0, 256, (5 * N_PER_BATCH + N_TEST, 3072), dtype=np.uint8)
    y = rng.integers(0, k, len(x))
    x_train, y_train, x_test, y_test = x[:-N_TEST], y[:-N_TEST], x[-N_TEST:], y[-N_TEST:]
    folder = root / cifar.LAYOUTS[name].folder
    folder.mkdir(parents=True)
    if name == "cifar10":
        for i in range(5):
            rows = slice(i * N_PER_BATCH, (i + 1) * N_PER_BATCH)
            _dump(
                folder / f"data_batch_{i + 1}",
                {
                    b"batch_label": f"training batch {i + 1} of 5".encode(),
                    b"labels": y_train[rows].tolist(),
                    b"data": x_train[rows],
                    b"filenames": [b"img.png"] * N_PER_BATCH,
                },
            )
        _dump(folder / "test_batch", {b"labels": y_test.tolist(), b"data": x_test})
        _dump(folder / "batches.meta", {b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072})
    else:
        for split, xs, ys in (("train", x_train, y_train), ("test", x_test, y_test)):
            _dump(
                folder / split,
                {b"fine_labels": ys.tolist(), b"coarse_labels": (ys // 5).tolist(), b"data": xs},
            )
        _dump(
            folder / "meta",
            {
                b"fine_label_names": [f"class{i}".encode() for i in range(100)],
                b"coarse_label_names": [f"super{i}".encode() for i in range(20)],
            },
        )
    return dict(
        x_train=x_train.reshape(-1, 3, 32, 32),
        y_train=y_train,
        x_test=x_test.reshape(-1, 3, 32, 32),
        y_test=y_test,
    )


@pytest.fixture
def cifar10(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    return tmp_path, write_cifar(tmp_path, "cifar10")


def normalised(x: np.ndarray, name: str) -> torch.Tensor:
    layout = cifar.LAYOUTS[name]
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (layout.mean, layout.std))
    return (torch.from_numpy(x).float() / 255 - mean) / std


def to_pixels(x: torch.Tensor, name: str) -> torch.Tensor:
    """Undo the normalisation: back to integer pixel values (as float)."""
    layout = cifar.LAYOUTS[name]
    mean, std = (torch.tensor(v, device=x.device).view(1, 3, 1, 1) for v in (layout.mean, layout.std))
    pixels = (x * std + mean) * 255
    assert torch.allclose(pixels, pixels.round(), atol=1e-3)
    return pixels.round().cpu()


def crop_params(out: torch.Tensor, source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each output image, the unique ``(top, left, flipped)`` making it a crop of its 4-padded source."""
    padded = torch.nn.functional.pad(source.float(), (4, 4, 4, 4))
    matches = []
    for top in range(9):
        for left in range(9):
            crop = padded[:, :, top : top + 32, left : left + 32]
            for flip in (False, True):
                same = (out == (crop.flip(-1) if flip else crop)).flatten(1).all(1)
                matches += [(i, top, left, flip) for i in same.nonzero().flatten().tolist()]
    assert sorted(m[0] for m in matches) == list(range(len(out))), "some output is not exactly one crop"
    params = torch.tensor(sorted(matches))
    return params[:, 1], params[:, 2], params[:, 3].bool()


@LOADERS
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_build_reads_the_real_layout(tmp_path: Path, name: str, loader: str) -> None:
    data = write_cifar(tmp_path, name)
    bundle = cifar.build(
        batch_size=16,
        device=DEVICE,
        seed=0,
        name=name,
        data_dir=tmp_path,
        loader=loader,
        eval_batch_size=4,
        num_workers=0,
    )
    k = cifar.LAYOUTS[name].num_classes
    assert bundle.num_classes == k and len(bundle.class_names) == k
    assert bundle.class_names[:2] == (["airplane", "automobile"] if name == "cifar10" else ["class0", "class1"])
    assert len(bundle.train) == 3 and len(bundle.test) == 2  # ceil(40 / 16), ceil(6 / 4)

    batches = list(bundle.train.epoch(0))
    assert [len(y) for _, y, _ in batches] == [16, 16, 8]
    for x, y, index in batches:
        assert x.shape == (len(y), 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.device.type == y.device.type == index.device.type == torch.device(DEVICE).type
        assert y.cpu().tolist() == data["y_train"][index.cpu().numpy()].tolist()  # each sample's row of the split
    assert sorted(torch.cat([i for *_, i in batches]).tolist()) == list(range(40))
    assert bundle.train.num_samples == 40 and bundle.train.indexed
    targets = torch.cat([y for _, y, _ in batches]).cpu()
    assert sorted(targets.tolist()) == sorted(data["y_train"].tolist())  # a permutation of the labels

    test = list(bundle.test.epoch(0))  # in file order, normalised, not augmented
    assert torch.equal(torch.cat([y for _, y, _ in test]).cpu(), torch.from_numpy(data["y_test"]))
    torch.testing.assert_close(torch.cat([x for x, *_ in test]).cpu(), normalised(data["x_test"], name))

    if loader == "gpu":  # the training set lives on the device as one uint8 tensor
        inputs = bundle.train.inputs
        assert inputs.dtype == torch.uint8 and inputs.shape == (40, 3, 32, 32)
        assert inputs.device.type == torch.device(DEVICE).type
        assert torch.equal(inputs.cpu(), torch.from_numpy(data["x_train"]))


def _is_crop_of(image: torch.Tensor, source: torch.Tensor) -> bool:
    """Whether ``image`` is a 32×32 window, flipped or not, of ``source`` zero-padded by 4."""
    padded = torch.nn.functional.pad(source.float(), (4, 4, 4, 4))
    windows = padded.unfold(1, 32, 1).unfold(2, 32, 1).permute(1, 2, 0, 3, 4)  # 9×9×3×32×32
    return bool(((windows == image).flatten(2).all(2) | (windows == image.flip(-1)).flatten(2).all(2)).any())


@LOADERS
def test_training_batches_are_crops_of_the_padded_images(cifar10, loader: str) -> None:
    root, data = cifar10
    bundle = cifar.build(batch_size=40, device=DEVICE, data_dir=root, loader=loader, num_workers=0)
    x, y, _ = next(bundle.train.epoch(0))
    source = torch.from_numpy(data["x_train"])
    pixels = to_pixels(x, "cifar10")
    # Which training image each output was cut from; each image is used once, with its own label.
    origin = [next(i for i in range(len(source)) if _is_crop_of(p, source[i])) for p in pixels]
    assert sorted(origin) == list(range(len(source)))
    assert torch.equal(y.cpu(), torch.from_numpy(data["y_train"])[origin])


def test_gpu_augmentation_matches_a_manual_crop() -> None:
    g = torch.Generator(device=DEVICE).manual_seed(3)
    x = torch.randint(0, 256, (64, 3, 32, 32), dtype=torch.uint8, device=DEVICE)
    identity = cifar.Normalize((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255), DEVICE)
    out = cifar.CropFlipNormalize(identity)(x, g).round().cpu()
    top, left, flipped = crop_params(out, x.cpu())
    i = int((~flipped).nonzero()[0])  # an un-flipped sample, against a crop by hand
    manual = torch.zeros(3, 40, 40)
    manual[:, 4:36, 4:36] = x[i].cpu().float()
    assert torch.equal(out[i], manual[:, top[i] : top[i] + 32, left[i] : left[i] + 32])


def test_gpu_augmentation_flips_half_and_uses_every_offset() -> None:
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randint(0, 256, (1000, 3, 32, 32), dtype=torch.uint8, device=DEVICE)
    identity = cifar.Normalize((0.0, 0.0, 0.0), (1 / 255, 1 / 255, 1 / 255), DEVICE)
    out = cifar.CropFlipNormalize(identity)(x, g).round().cpu()
    top, left, flipped = crop_params(out, x.cpu())
    assert 0.44 < flipped.float().mean() < 0.56
    assert set(top.tolist()) == set(left.tolist()) == set(range(9))


def test_gpu_epochs_are_a_function_of_seed_and_epoch(cifar10) -> None:
    root, _ = cifar10

    def epoch(seed: int, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        bundle = cifar.build(batch_size=16, device=DEVICE, seed=seed, data_dir=root)
        xs, ys, _ = zip(*bundle.train.epoch(e), strict=True)
        return torch.cat(xs), torch.cat(ys)

    x0, y0 = epoch(0, 0)
    x0_again, y0_again = epoch(0, 0)
    assert torch.equal(x0, x0_again) and torch.equal(y0, y0_again)
    for other in (epoch(0, 1), epoch(1, 0)):
        assert not torch.equal(y0, other[1]) and not torch.equal(x0, other[0])


def test_torchvision_loader_order_and_augmentation_follow_seed_and_epoch(cifar10) -> None:
    root, _ = cifar10
    bundle = cifar.build(batch_size=16, device=DEVICE, seed=0, data_dir=root, loader="torchvision", num_workers=1)

    def epoch(e: int) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys, _ = zip(*bundle.train.epoch(e), strict=True)
        return torch.cat(xs), torch.cat(ys)

    (x0, y0), (x0_again, y0_again), (x1, y1) = epoch(0), epoch(0), epoch(1)
    assert torch.equal(y0, y0_again) and torch.equal(x0, x0_again)  # workers are seeded from the generator
    assert not torch.equal(y0, y1) and not torch.equal(x0, x1)


def test_normalize_uses_the_dataset_constants() -> None:
    layout = cifar.LAYOUTS["cifar100"]
    norm = cifar.Normalize(layout.mean, layout.std, "cpu")
    x = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 3, 1, 1)
    out = norm(x)
    mean, std = torch.tensor(layout.mean), torch.tensor(layout.std)
    torch.testing.assert_close(out[0].flatten(), -mean / std)
    torch.testing.assert_close(out[1].flatten(), (1 - mean) / std)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_dataset_configs_build_the_real_loader(tmp_path: Path, name: str) -> None:
    write_cifar(tmp_path, name)
    cfg = OmegaConf.create(
        {"paths": {"data_dir": str(tmp_path)}, "dataset": OmegaConf.load(CONFIGS / f"dataset/{name}.yaml")}
    )
    cfg.dataset.loader, cfg.dataset.num_workers = "torchvision", 0
    bundle = hydra.utils.instantiate(cfg.dataset.build, batch_size=8, device=DEVICE, seed=0)
    assert isinstance(bundle.train, cifar.LoaderBatches)
    assert bundle.num_classes == cfg.dataset.num_classes == cifar.LAYOUTS[name].num_classes
    cfg.dataset.loader = "gpu"
    bundle = hydra.utils.instantiate(cfg.dataset.build, batch_size=8, device=DEVICE, seed=0)
    assert bundle.train.inputs.dtype == torch.uint8 and len(bundle.train) == 5


def test_download_is_used_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def fake_download(name: str, data_dir: Path, timeout_s: float) -> None:
        calls.append(name)
        write_cifar(Path(data_dir), name)

    monkeypatch.setattr(cifar, "download_cifar", fake_download)
    with pytest.raises(FileNotFoundError):
        cifar.build(batch_size=8, device=DEVICE, name="cifar100", data_dir=tmp_path)
    assert calls == []
    bundle = cifar.build(batch_size=8, device=DEVICE, name="cifar100", data_dir=tmp_path, download=True)
    assert calls == ["cifar100"] and bundle.num_classes == 100


def _assert_helpful(error: pytest.ExceptionInfo, path: Path) -> None:
    message = str(error.value)
    assert str(path) in message
    assert "dataset.download=true" in message and cifar.URL in message and "dataset.data_dir=" in message


def test_missing_folder_says_where_it_looked(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        cifar.build(batch_size=8, device=DEVICE, name="cifar10", data_dir=tmp_path / "nowhere")
    _assert_helpful(error, tmp_path / "nowhere" / "cifar-10-batches-py")


def test_missing_batch_file(cifar10) -> None:
    root, _ = cifar10
    missing = root / "cifar-10-batches-py" / "data_batch_3"
    missing.unlink()
    with pytest.raises(FileNotFoundError) as error:
        cifar.build(batch_size=8, device=DEVICE, data_dir=root)
    _assert_helpful(error, missing)


def test_truncated_pickle(cifar10) -> None:
    root, _ = cifar10
    path = root / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(ValueError, match="truncated") as error:
        cifar.build(batch_size=8, device=DEVICE, data_dir=root)
    _assert_helpful(error, path)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda b: b.update({b"labels": b[b"labels"][:-1]}), "8 images but 7 labels"),
        (lambda b: b.update({b"data": b[b"data"][:, :1024]}), "expected uint8"),
        (lambda b: b.pop(b"data"), "missing"),
        (lambda b: b[b"labels"].__setitem__(0, 10), r"outside \[0, 10\)"),
    ],
    ids=["labels-vs-rows", "columns", "no-data", "label-range"],
)
def test_inconsistent_batch(cifar10, change, expected: str) -> None:
    root, _ = cifar10
    path = root / "cifar-10-batches-py" / "data_batch_2"
    with path.open("rb") as f:
        batch = pickle.load(f)
    change(batch)
    _dump(path, batch)
    with pytest.raises(ValueError, match=expected) as error:
        cifar.build(batch_size=8, device=DEVICE, data_dir=root)
    _assert_helpful(error, path)


def test_wrong_class_names(cifar10) -> None:
    root, _ = cifar10
    path = root / "cifar-10-batches-py" / "batches.meta"
    _dump(path, {b"label_names": [b"cat"]})
    with pytest.raises(ValueError, match="lists 1 label_names") as error:
        cifar.build(batch_size=8, device=DEVICE, data_dir=root)
    _assert_helpful(error, path)


def test_unknown_name_or_loader_is_refused(cifar10) -> None:
    root, _ = cifar10
    with pytest.raises(ValueError, match="unknown CIFAR data set 'cifar1000'"):
        cifar.build(batch_size=8, device=DEVICE, name="cifar1000", data_dir=root, download=True)
    with pytest.raises(ValueError, match="loader must be"):
        cifar.build(batch_size=8, device=DEVICE, data_dir=root, loader="dali")
