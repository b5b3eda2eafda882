"""ImageNet and Table 2: the ResNets, the ImageFolder tree and its errors, both loaders, the recipe, the smoke grid."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from alr.data import imagenet
from alr.errors import RunError
from alr.reporting.runs import load_runs
from alr.reporting.tables import load_paper
from alr.trainer import Parts, _shard
from conftest import ROOT, compose, run_train

CLASSES = ("n01440764", "n01443537", "n01484850")
SMALL = ["dataset.num_classes=3", "dataset.image_size=32", "dataset.resize_size=36", "dataset.num_workers=1"]


def write_tree(root: Path, train_per_class: int = 4, val_per_class: int = 3) -> Path:
    """A tiny ILSVRC-like tree: three classes of JPEG files of several sizes, one greyscale, each class one colour."""
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for label, wnid in enumerate(CLASSES):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for i in range(per_class):
                size = (48 + 8 * i, 40 + 4 * label)
                pixel = [(200, 30, 30), (30, 200, 30), (30, 30, 200)][label]
                image = Image.new("RGB", size, pixel) if i else Image.new("L", size, 60 * label + 40)
                image.save(folder / f"{wnid}_{split}_{i}.JPEG", quality=95)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return write_tree(tmp_path_factory.mktemp("data") / "imagenet")


@pytest.mark.parametrize(
    "model,params", [("resnet50", 25_557_032), ("resnet101", 44_549_160), ("resnet152", 60_192_808)]
)
def test_resnets_are_v1_5_with_the_exact_parameter_counts(model: str, params: int):
    cfg = compose("experiment=table2", f"model={model}")
    net = instantiate(cfg.model)
    assert sum(p.numel() for p in net.parameters()) == params
    block = net.layer2[0]  # v1.5: the stride is on the bottleneck's 3×3 convolution, not its first 1×1
    assert block.conv1.stride == (1, 1) and block.conv2.stride == (2, 2)
    assert cfg.model.zero_init_last is False and float(net.layer1[0].bn3.weight.detach().min()) == 1.0


def test_table2_experiment_is_the_papers_recipe_and_grid():
    cfg = compose("experiment=table2")
    OmegaConf.resolve(cfg)
    assert (cfg.experiment_name, cfg.dataset.name, cfg.dataset.num_classes) == ("table2", "imagenet", 1000)
    assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.trainer.precision) == (90, 256, "fp16")
    assert cfg.optim.weight_decay == 1e-4 and cfg.dataset.loader == "dali"
    assert (cfg.dataset.image_size, cfg.dataset.resize_size) == (224, 256)
    grid = yaml.safe_load((ROOT / "configs/experiment/table2.yaml").read_text())["hydra"]["sweeper"]["params"]
    assert {k: str(v).split(",") for k, v in grid.items()} == {
        "model": ["resnet50", "resnet101", "resnet152"],
        "method": ["baseline", "slr", "alr", "alr_s"],
        "seed": ["0"],
    }
    assert sorted((r["model"], r["method"]) for r in load_paper("table2")) == sorted(
        (m, k) for m in grid["model"].split(",") for k in grid["method"].split(",")
    )


@pytest.mark.parametrize("batch,lrs", [(256, [0.1, 0.1, 0.01, 0.001]), (1024, [0.08, 0.4, 0.04, 0.004])])
def test_learning_rate_follows_the_global_batch_with_warm_up_above_256(batch: int, lrs: list[float]):
    cfg = compose("experiment=table2", f"trainer.batch_size={batch}")
    optimizer = instantiate(cfg.optim.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    scheduler = instantiate(cfg.optim.scheduler)(optimizer)
    seen = {}
    for epoch in range(90):
        seen[epoch] = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
    assert [seen[e] for e in (0, 29, 30, 60)] == pytest.approx(lrs)
    assert optimizer.param_groups[0]["momentum"] == 0.9 and not optimizer.param_groups[0]["nesterov"]
    assert seen[89] == pytest.approx(lrs[1] * 1e-3)


def _batches(tree: Path, loader: str, **kw):
    args = dict(batch_size=4, device="cpu", seed=3, data_dir=tree.parent, num_classes=3, loader=loader)
    return imagenet.build(**{**args, "image_size": 32, "resize_size": 36, "eval_batch_size": 4, "num_workers": 1, **kw})


@pytest.mark.parametrize("loader", ["dali", "torchvision"])
def test_loader_batches_have_the_right_shape_range_and_labels(tree: Path, loader: str):
    data = _batches(tree, loader)
    assert data.class_names == list(CLASSES) and data.num_classes == 3
    train = list(data.train.epoch(0))
    assert len(train) == len(data.train) == 3  # 12 images, batches of 4
    for x, y, index in train:
        assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert (index // 4).tolist() == y.tolist()  # the tree's files are class by class, 4 each
        assert float(x.min()) > -2.2 and float(x.max()) < 2.7  # normalised [0, 1] pixels
    # Each class is one flat colour: the mean of the dominant channel tells the label.
    for x, y, _ in train:
        colour = x[:, :, 8:24, 8:24].mean(dim=(2, 3))
        colour_rows = y.tolist()
        for row, label in zip(colour, colour_rows):
            if row.std() > 0.5:  # not the greyscale image
                assert int(row.argmax()) == label
    val = list(data.test.epoch(0))
    assert [len(y) for _, y, _ in val] == [4, 4, 1]  # the last partial batch is kept
    assert torch.cat([y for _, y, _ in val]).tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert torch.equal(torch.cat([x for x, *_ in val]), torch.cat([x for x, *_ in data.test.epoch(1)]))


def test_dali_and_torchvision_give_the_same_label_order(tree: Path):
    orders = {}
    for loader in ("dali", "torchvision"):
        data = _batches(tree, loader)
        orders[loader] = [torch.cat([y for _, y, _ in data.train.epoch(e)]).tolist() for e in (0, 1)]
    assert orders["dali"] == orders["torchvision"]
    assert orders["dali"][0] != orders["dali"][1] and sorted(orders["dali"][0]) == [0] * 4 + [1] * 4 + [2] * 4


@pytest.mark.parametrize("loader", ["dali", "torchvision"])
def test_two_ranks_share_each_global_batch_and_count_validation_once(tree: Path, loader: str):
    ranks = [_batches(tree, loader, rank=r, world_size=2, eval_batch_size=2) for r in range(2)]
    train = [[y for _, y, _ in data.train.epoch(1)] for data in ranks]
    assert [len(b) for b in train[0]] == [2] * 3  # the global batch of 4, 2 per rank
    one = _batches(tree, loader)
    for step, (y_one, y0, y1) in enumerate(zip([y for _, y, _ in one.train.epoch(1)], *train)):
        assert sorted(y_one.tolist()) == sorted(y0.tolist() + y1.tolist()), f"global batch {step}"
    val = [torch.cat([y for _, y, _ in data.test.epoch(0)]) for data in ranks]
    assert (len(val[0]), len(val[1])) == (5, 4) and sorted(torch.cat(val).tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_epoch_order_is_a_function_of_seed_and_epoch_whatever_the_process_count():
    one = imagenet.epoch_indices(103, seed=5, epoch=7, batch_size=8)
    again = imagenet.epoch_indices(103, seed=5, epoch=7, batch_size=8)
    four = [imagenet.epoch_indices(103, 5, 7, 2, rank=r, world_size=4) for r in range(4)]
    assert torch.equal(one, again) and len(one) == 96
    for step in range(12):
        assert torch.equal(one[8 * step : 8 * step + 8], torch.cat([f[2 * step : 2 * step + 2] for f in four]))
    assert not torch.equal(one, imagenet.epoch_indices(103, 5, 8, 8))


def _bad(root: Path, problem: str) -> Path:
    write_tree(root, 1, 1)
    if problem == "empty class folder":
        for f in (root / "train" / CLASSES[1]).iterdir():
            f.unlink()
    elif problem == "non-image file":
        (root / "val" / CLASSES[0] / "notes.txt").write_text("not an image")
    elif problem == "class sets differ":
        (root / "val" / CLASSES[2]).rename(root / "val" / "n09999999")
    elif problem == "no val":
        for f in (root / "val").rglob("*.JPEG"):
            f.unlink()
        for d in (root / "val").iterdir():
            d.rmdir()
        (root / "val").rmdir()
    return root


@pytest.mark.parametrize(
    "problem,message",
    [
        ("no tree", "imagenet: no folder {root}. Put the ILSVRC-2012 images at"),
        ("no val", "imagenet: no folder {root}/val."),
        ("empty class folder", "imagenet: the class folder {root}/train/n01443537 is empty"),
        ("non-image file", "imagenet: {root}/val/n01440764/notes.txt is not an image"),
        ("class sets differ", "only in train: ['n01484850'], only in val: ['n09999999']"),
        ("class count", "imagenet: {root} has 3 classes but dataset.num_classes is 1000. Set dataset.num_classes=3"),
    ],
)
def test_a_bad_tree_gives_one_clear_error_naming_the_path(tmp_path: Path, problem: str, message: str):
    root = tmp_path / "imagenet"
    if problem != "no tree":
        _bad(root, problem)
    cfg = compose("dataset=imagenet", f"dataset.data_dir={tmp_path}", "model=resnet50", "trainer.device=cpu", *SMALL)
    if problem == "class count":
        cfg.dataset.num_classes = 1000
    with pytest.raises(RunError) as err:
        from alr.distributed import setup

        Parts(cfg, setup("cpu"))
    text = str(err.value)
    assert message.format(root=root) in text and "\n" not in text


def test_several_processes_need_a_divisible_global_batch_and_a_shardable_data_set():
    from alr.distributed import World

    two = World(torch.device("cpu"), rank=1, size=2)
    cfg = compose("dataset=imagenet", "trainer.batch_size=5")
    with pytest.raises(RunError, match="'trainer.batch_size' is the global batch, 5, which 2 processes"):
        _shard(cfg, two)
    assert _shard(compose("dataset=imagenet", "trainer.batch_size=6"), two) == {"rank": 1, "world_size": 2}
    with pytest.raises(RunError, match="dataset 'digits' is read by one process only"):
        _shard(compose("dataset=digits"), two)


@pytest.mark.gpu
@pytest.mark.skipif(
    not imagenet._has_dali(),  # optional: its wheel is too large to carry to an offline GPU node
    reason="NVIDIA DALI is not installed (optional: pip install -e '.[dali]'): its GPU decoding is not tested",
)
def test_dali_mixed_decoding_on_the_gpu_matches_the_cpu_pipeline(tree: Path):
    cpu, gpu = _batches(tree, "dali"), _batches(tree, "dali", device="cuda")
    (x_cpu, y_cpu, _), (x_gpu, y_gpu, _) = next(iter(cpu.test.epoch(0))), next(iter(gpu.test.epoch(0)))
    assert x_gpu.is_cuda and x_gpu.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y_cpu, y_gpu.cpu())
    assert float((x_cpu - x_gpu.cpu()).abs().mean()) < 0.1  # nvJPEG and libjpeg differ by rounding only


@pytest.mark.slow
def test_smoke_grid_end_to_end(tmp_path: Path):
    """`make reproduce-table2 SMOKE=1`: all 12 cells on the sample tree, then results/table2.md from them."""
    data, env = tmp_path / "data", {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    samples = [sys.executable, "-m", "alr.data.samples", "--out", str(data)]
    subprocess.run([*samples, "imagenet"], check=True, cwd=ROOT, env=env)
    small = ["dataset.num_classes=10", "dataset.image_size=32", "dataset.resize_size=36", "dataset.num_workers=1"]
    small.append("trainer.keep_checkpoint=false")  # 3.8 GB of ResNet weights otherwise
    run_train("experiment=table2", "debug=smoke", f"dataset.data_dir={data}", *small, out=tmp_path, multirun=True)
    runs = load_runs(tmp_path / "table2")
    assert len(runs) == 12 and all(r.status == "finished" for r in runs)
    assert not list((tmp_path / "table2").rglob("last.pt"))
    assert {r.key for r in runs} == {(r["dataset"], r["model"], r["method"]) for r in load_paper("table2")}
    alr = next(r for r in runs if r.key == ("imagenet", "resnet50", "alr"))
    assert alr.result["params"] == {"backbone": 23_528_522, "method": 90}
    last = alr.metrics()[-1]
    assert last["test/images"] == 2 and {"test/acc", "test/acc5"} <= last.keys()
    assert alr.result["final_test_acc5"] == last["test/acc5"]

    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "alr.report", "table2", "--runs", str(tmp_path / "table2"), "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True, env=env)
    text = (out / "table2.md").read_text()
    assert "not run" not in text and "12 of 12 runs were shortened" in text
    assert "| ResNet-152 | ALR-S |" in text and (out / "table2.csv").read_text().count("\n") == 13


def test_make_reproduce_table2_runs_the_grid_with_torchrun_shards_and_smoke_mode():
    def dry(*args: str) -> str:
        proc = subprocess.run(["make", "-n", "reproduce-table2", *args], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    plain = dry()
    assert "-m alr.train -m experiment=table2 paths.output_dir=runs" in plain
    assert "-m alr.report table2 --runs runs/table2 --out results" in plain
    assert "torchrun --standalone --nproc_per_node=8 -m alr.train -m experiment=table2" in dry("NPROC=8")
    assert 'gpus="0 1"' in dry("GPUS=0,1")
    smoke = dry("SMOKE=1")
    assert "-m alr.data.samples --out runs/smoke/data imagenet" in smoke
    assert "smoke/data trainer.keep_checkpoint=false dataset.num_classes=10" in smoke


def test_sample_tree_is_a_real_imagefolder_of_jpegs(tmp_path: Path):
    from alr.data import samples

    folder = samples.write_imagenet(tmp_path, n_train=60, n_test=20)
    tree = imagenet.scan_tree(folder, 10)
    assert len(tree["train"][0]) == 60 and len(tree["val"][0]) == 20 and tree["classes"][0] == "n00000000"
    image = np.asarray(Image.open(tree["train"][0][0]))
    assert image.shape == (64, 80, 3) and Image.open(tree["val"][0][0]).format == "JPEG"
