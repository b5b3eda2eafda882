"""Methods that keep state across steps resume bit for bit, and agree on every rank.

State a method keeps (OLS's per-class sums, PS-KD's per-sample predictions, DisturbLabel's draw counter,
LS++'s learned matrix, ALR's running-mean ``S`` and its weight ramp) is its ``state_dict`` and its
``partial_sums``. Two checks over all of them:

- stopped by SIGTERM in the middle of epoch 2 and run again, a run ends with the weights, method state,
  optimizer and ``metrics.jsonl`` of a run trained straight through (each run in this process: the
  trainer's signal handler turns the signal into a checkpoint and :class:`~alr.preempt.Interrupted`);
- trained by two gloo processes (each with its shard of every global batch), every rank ends with the
  same backbone and the same method state (``identical_on_all_ranks``, a hash of each rank's bytes).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from alr.preempt import Interrupted
from alr.trainer import fit
from conftest import compose
from faults import wrap_method
from test_resume import _assert_same_state

# A name for the test id, and the overrides that select the method and its stateful setting.
STATEFUL = {
    "ols": ["method=ols"],
    "pskd": ["method=pskd"],
    "disturblabel": ["method=disturblabel"],
    "lspp": ["method=lspp"],
    "alr_running_mean": ["method=alr", "method.module.criterion.s_update=running_mean"],
    "alr_ramp": ["method=alr_s", "method.module.criterion.weight=ramp"],
}
TINY = ["debug=fast", "trainer.batch_size=32", "trainer.epochs=2"]  # debug=fast: 3 steps an epoch
TIMING = {"seconds", "train/images_per_s"}


def _config(overrides: list[str], out: Path):
    cfg = compose(*TINY, *overrides, f"paths.output_dir={out}")
    wrap_method(cfg)
    return cfg


def _metrics(run_dir: Path) -> list[dict]:
    lines = [json.loads(s) for s in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if k not in TIMING} for m in lines]


@pytest.mark.parametrize("name", list(STATEFUL))
def test_sigterm_mid_epoch_then_rerun_is_bit_identical(name: str, tmp_path: Path, monkeypatch):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    fit(_config(STATEFUL[name], tmp_path), straight)

    monkeypatch.setenv("ALR_FAULT", "term@2:1")  # after the second step of the second epoch
    with pytest.raises(Interrupted, match="after step 2 of epoch 2"):
        fit(_config(STATEFUL[name], tmp_path), resumed)
    assert torch.load(resumed / "last.pt", weights_only=True)["step"] == 2
    monkeypatch.delenv("ALR_FAULT")
    fit(_config(STATEFUL[name], tmp_path), resumed)

    a, b = (torch.load(d / "last.pt", weights_only=True) for d in (straight, resumed))
    for key in ("model", "method", "optimizer", "scheduler", "epoch", "step"):
        _assert_same_state(a[key], b[key], key)
    assert _metrics(straight) == _metrics(resumed)
    assert any(k.startswith("train/") and k not in ("train/loss", "train/acc") for k in _metrics(straight)[0])


def _two_process_worker(rank: int, size: int, folder: str, data: str) -> None:
    """Rank ``rank``: every stateful method, trained in turn by the trainer itself on ImageNet's tiny tree."""
    import torch.distributed as dist

    from test_distributed import TWO_PROCESS_RUN

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), MASTER_ADDR="127.0.0.1", MASTER_PORT="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/group", rank=rank, world_size=size)
    try:
        results = {}
        for name, overrides in STATEFUL.items():
            cfg = compose(*TWO_PROCESS_RUN, *overrides, f"dataset.data_dir={data}", "trainer.epochs=2")
            result = fit(cfg, Path(folder) / name)
            results[name] = result["identical_on_all_ranks"]
        Path(folder, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_hold_the_same_method_state(tmp_path: Path):
    import torch.multiprocessing as mp

    from test_imagenet import write_tree

    data = tmp_path / "data"
    write_tree(data / "imagenet", train_per_class=4, val_per_class=3)  # 12 images: 3 global batches of 4
    mp.spawn(_two_process_worker, args=(2, str(tmp_path), str(data)), nprocs=2, join=True)
    for rank in range(2):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == dict.fromkeys(STATEFUL, True)
