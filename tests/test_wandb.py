"""A real offline W&B run through the entry point, read back from the transaction log W&B wrote."""

from __future__ import annotations

import json
import signal
import struct
import zlib
from pathlib import Path

import pytest
from wandb.proto import wandb_internal_pb2 as pb

from alr import wandb_sync
from conftest import run_train
from faults import faulty

EPOCH_KEYS = {
    "epoch",
    "lr",
    "seconds",
    "train/loss",
    "train/L_hard",
    "train/L_res",
    "train/L_upd",
    "train/w",
    "train/acc",
    "train/images_per_s",
    "test/acc",
    "test/acc5",
    "test/loss",
}


def read_transaction_log(path: Path) -> list[pb.Record]:
    """Decode a ``run-<id>.wandb`` file: W&B's header, then LevelDB's log format of protobuf records.

    W&B 0.31 ships no reader in Python (its Go core writes and replays the log), so the format is decoded
    here: a 7-byte header ``:W&B``, 0xBEE1, version 0; 32 KiB blocks of chunks, each with a CRC-32 of its
    type byte and data, a length and a type (1 full, 2 first, 3 middle, 4 last).
    """
    data, block = path.read_bytes(), 32768
    assert struct.unpack("<4sHB", data[:7]) == (b":W&B", 0xBEE1, 0)
    records, pos, pending = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at byte {pos}"
        pending += chunk
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def history_rows(records: list[pb.Record]) -> dict[int, dict[str, object]]:
    """``{step: {key: value}}``; a media item's nested keys are gathered into one dict per key."""
    rows: dict[int, dict[str, object]] = {}
    for record in records:
        if record.WhichOneof("record_type") != "history":
            continue
        row: dict[str, object] = {}
        for item in record.history.item:
            keys = list(item.nested_key) or [item.key]
            value = json.loads(item.value_json)
            if len(keys) == 1:
                row[keys[0]] = value
            else:
                row.setdefault(keys[0], {})[keys[1]] = value
        rows[int(row["_step"])] = row
    return rows


def wandb_files(run_dir: Path) -> list[Path]:
    return sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))


@pytest.mark.slow
def test_offline_wandb_run_logs_the_layout_and_resumes_the_same_run(tmp_path):
    overrides = ("experiment=demo", "method=alr_s", "seed=3", "debug=fast", "logger=wandb", "logger.project=alr-test")
    overrides += ("trainer.epochs=4", *faulty("alr.ALRLoss"))
    # SIGTERM at the first step of epoch 3: the trainer finishes that step, writes last.pt and exits.
    stopped = run_train(*overrides, out=tmp_path, check=False, env={"ALR_FAULT": "term@3:0"})
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr
    run_dir = tmp_path / "demo" / "digits-digits_cnn-alr_s-s3"
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    [log] = wandb_files(run_dir)
    assert log.name == f"run-{run_id}.wandb"
    records = read_transaction_log(log)

    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_id == run_id and run.project == "alr-test"
    assert run.display_name == "digits-digits_cnn-alr_s-s3"
    assert run.run_group == "demo/digits/digits_cnn/alr_s"
    assert run.job_type == "demo"
    assert list(run.tags) == ["demo", "digits", "digits_cnn", "alr_s", "seed3"]
    config = {u.key: json.loads(u.value_json) for u in run.config.update}
    resolved = (run_dir / "config.yaml").read_text()
    assert config["seed"] == 3 and config["method"]["name"] == "alr_s" and config["experiment_name"] == "demo"
    assert config["logger"] == {"name": "wandb", "project": "alr-test", "entity": None, "mode": "auto"}
    assert config["trainer"]["epochs"] == 4 and "epochs: 4" in resolved

    rows = history_rows(records)
    assert sorted(rows) == [1, 2]
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for step, row in rows.items():
        assert row.keys() >= EPOCH_KEYS, EPOCH_KEYS - row.keys()
        assert row["test/acc"] == pytest.approx(metrics[step - 1]["test/acc"])
        heatmap, matrix = row["residual_labels/heatmap"], row["residual_labels/matrix"]
        assert heatmap["_type"] == "image-file" and heatmap["format"] == "png"
        assert (log.parent / "files" / heatmap["path"]).read_bytes()[:4] == b"\x89PNG"
        assert matrix["_type"] == "table-file" and (matrix["nrows"], matrix["ncols"]) == (10, 11)
        table = json.loads((log.parent / "files" / matrix["path"]).read_text())
        assert table["columns"] == ["class", *map(str, range(10))]
        assert all(row[1 + k] == 0.0 for k, row in enumerate(table["data"]))  # the diagonal is blank
    assert any(r.WhichOneof("record_type") == "exit" and r.exit.exit_code != 0 for r in records)

    # The same command again: the trainer resumes from last.pt, W&B continues the same run.
    run_train(*overrides, out=tmp_path)
    assert (run_dir / "wandb_id.txt").read_text().strip() == run_id
    first, second = wandb_files(run_dir)
    assert first == log and second.name == log.name
    resumed = read_transaction_log(second)
    assert [r.run.run_id for r in resumed if r.WhichOneof("record_type") == "run"] == [run_id]
    assert sorted(history_rows(resumed)) == [3, 4]
    assert any(r.WhichOneof("record_type") == "exit" and r.exit.exit_code == 0 for r in resumed)


def test_wandb_sync_says_what_there_is_to_sync_and_what_it_needs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("NETRC", raising=False)
    runs = ["--runs", str(tmp_path / "runs")]
    assert wandb_sync.main(runs) == 0 and "nothing to sync" in capsys.readouterr().out
    offline = tmp_path / "runs" / "demo" / "digits-digits_cnn-alr-s0" / "wandb" / "offline-run-20260101_000000-abc"
    offline.mkdir(parents=True)
    (offline / "run-abc.wandb").write_bytes(b"")
    assert wandb_sync.main(runs) == 1
    out, err = capsys.readouterr()
    assert "1 offline W&B run(s)" in out and "no W&B credentials" in err and "wandb login" in err
    (offline / "run-abc.wandb.synced").write_bytes(b"")
    assert wandb_sync.main(runs) == 0 and "nothing to sync" in capsys.readouterr().out
