"""Table 3: the CSV reader on the release's quirks, bad rows, the cache, the encodings, the text models,
the configs, and the smoke grid end to end (every model trained with ALR-S on tiny CSVs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from omegaconf import OmegaConf

from alr.config_check import ConfigError, validate
from alr.data import samples, text
from alr.errors import RunError
from alr.models.text import CharCNN, FastText, TextRCNN, TextRNN, Transformer
from alr.reporting.runs import load_runs
from alr.reporting.tables import load_paper
from conftest import ROOT, compose, run_train

QUIRKY = (
    b'"1","Wall St. Bears, Claw Back","Reuters - Short-sellers, Wall Street\'s \\""dwindling\\""\\nband"\n'
    b'"2","Two\nlines, inside quotes","He said ""no"" \xe2\x80\x94 caf\xc3\xa9"\n'
    b'"4","","Only the description"\n'
)


def _folder(root: Path, name: str = "ag_news") -> Path:
    folder = root / text.RELEASES[name].folder
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_csv_reader_handles_the_releases_quirks(tmp_path: Path):
    path = _folder(tmp_path) / "train.csv"
    path.write_bytes(QUIRKY)
    texts, labels = text.read_csv(path, 2, 4, text.BadRows(skip=False))
    assert labels == [0, 1, 3]
    assert texts == [
        'Wall St. Bears, Claw Back Reuters - Short-sellers, Wall Street\'s "dwindling"\nband',
        'Two\nlines, inside quotes He said "no" — café',
        "Only the description",
    ]


BAD_ROWS = {
    "wrong column count": b'"1","a title"\n',
    "class out of range": b'"5","title","text"\n',
    "empty text": b'"2"," ",""\n',
    "invalid UTF-8": b'"2","caf\xe9","text"\n',
}


@pytest.mark.parametrize("problem", list(BAD_ROWS))
def test_each_bad_row_names_file_and_line_or_is_counted(tmp_path: Path, problem: str):
    path = _folder(tmp_path) / "train.csv"
    path.write_bytes(QUIRKY + BAD_ROWS[problem] + b'"3","fine","row"\n')
    with pytest.raises(RunError) as err:
        text.read_csv(path, 2, 4, text.BadRows(skip=False))
    assert f"{path}, line 5: {problem}" in str(err.value) and "dataset.skip_bad_rows=true" in str(err.value)
    bad = text.BadRows(skip=True)
    texts, labels = text.read_csv(path, 2, 4, bad)
    assert len(texts) == 4 and labels[-1] == 2 and bad.counts == {problem: 1}


def test_missing_data_says_where_it_looked_and_both_ways_to_get_it(tmp_path: Path):
    with pytest.raises(RunError) as err:
        text.load_encoded("yahoo_answers", tmp_path, tmp_path / "cache")
    message = str(err.value)
    assert str(tmp_path / "yahoo_answers_csv" / "train.csv") in message
    assert "dataset.source=hub" in message and "yahoo_answers_csv.tar.gz" in message


def test_word_and_char_encodings_of_known_strings():
    vocab = text.build_vocab(["The cat, the DOG!", "dog dog cat? it's"], size=4, min_count=1, progress=False)
    # dog 3, cat 2, the 2, then ties at 1 in alphabetical order: "!" < "'" < ...
    assert vocab == {"dog": 2, "cat": 3, "the": 4, "!": 5}
    ids = text.encode_words(["the Dog barks!", "cat"], vocab, max_len=3, progress=False)
    assert ids.tolist() == [[4, 2, text.UNK], [3, 0, 0]]
    assert text.build_vocab(["a a b"], size=10, min_count=2, progress=False) == {"a": 2}
    chars = text.encode_chars(["Ab-\né", "z"], length=6, progress=False)
    alphabet = text.ALPHABET
    assert chars.dtype == np.uint8 and len(alphabet) == 70
    assert chars[0].tolist() == [1, 2, alphabet.rindex("-") + 1, alphabet.index("\n") + 1, 0, 0]
    assert chars[1].tolist() == [26, 0, 0, 0, 0, 0]


def _calls(monkeypatch) -> list[str]:
    calls: list[str] = []
    read = text.read_csv
    monkeypatch.setattr(text, "read_csv", lambda path, *a: calls.append(path.name) or read(path, *a))
    return calls


def test_cache_is_built_once_reused_and_rebuilt_on_a_changed_setting_or_file(tmp_path: Path, monkeypatch):
    samples.write_text_csv(tmp_path, "ag_news", n_train=40, n_test=8)
    cache = tmp_path / "cache"
    calls = _calls(monkeypatch)
    first = text.load_encoded("ag_news", tmp_path, cache, max_len=8, progress=False)
    assert calls == ["train.csv", "test.csv"] and len(list(cache.iterdir())) == 1
    again = text.load_encoded("ag_news", tmp_path, cache, max_len=8, progress=False)
    assert len(calls) == 2 and torch.equal(first["x_train"], again["x_train"])
    assert first["x_train"].shape == (40, 8) and first["class_names"][3] == "Sci/Tech"
    text.load_encoded("ag_news", tmp_path, cache, max_len=9, progress=False)
    assert len(calls) == 4 and len(list(cache.iterdir())) == 2
    test_csv = tmp_path / "ag_news_csv" / "test.csv"
    test_csv.write_text(test_csv.read_text() + '"1","one more","row"\n')
    changed = text.load_encoded("ag_news", tmp_path, cache, max_len=8, progress=False)
    assert len(calls) == 6 and len(changed["y_test"]) == 9


def test_a_half_written_cache_is_never_read(tmp_path: Path, monkeypatch):
    samples.write_text_csv(tmp_path, "yelp_full", n_train=20, n_test=5)
    cache = tmp_path / "cache"

    def killed(obj, f):
        f.write(b"PK\x03\x04 half")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        text.load_encoded("yelp_full", tmp_path, cache, encoding="char", progress=False)
    assert list(cache.iterdir()) == []  # the temporary file is gone, the final name never existed
    monkeypatch.undo()
    built = text.load_encoded("yelp_full", tmp_path, cache, encoding="char", progress=False)
    (final,) = cache.iterdir()
    final.write_bytes(final.read_bytes()[:100])  # damaged after the fact: rebuilt, not read
    calls = _calls(monkeypatch)
    again = text.load_encoded("yelp_full", tmp_path, cache, encoding="char", progress=False)
    assert calls == ["train.csv", "test.csv"] and torch.equal(built["x_test"], again["x_test"])
    assert built["x_train"].shape == (20, 1014) and built["class_names"][0] == "1 star"


def test_a_csv_of_your_own(tmp_path: Path):
    folder = tmp_path / "reviews"
    folder.mkdir()
    (folder / "train.csv").write_text('"3","good, very good","!"\n"1","bad","."\n"2","so-so","?"\n')
    (folder / "test.csv").write_text('"3","good, fine","x"\n')
    data = text.load_encoded("text_csv", tmp_path, tmp_path / "c", folder="reviews", text_columns=2, num_classes=3)
    assert data["y_train"].tolist() == [2, 0, 1] and data["class_names"] == ["class 1", "class 2", "class 3"]
    assert data["num_classes"] == 3 and data["x_test"][0, :2].tolist() == data["x_train"][0, :2].tolist()
    with pytest.raises(ConfigError) as err:
        validate(compose("dataset=text_csv", "model=fasttext", "dataset.num_classes=3"))
    assert err.value.key == "dataset.folder"
    validate(compose("dataset=text_csv", "model=fasttext", "dataset.num_classes=3", "dataset.folder=reviews"))


def test_hub_source_reads_the_same_columns(tmp_path: Path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features(
        {
            "topic": datasets.ClassLabel(names=[f"t{k}" for k in range(10)]),
            **{c: datasets.Value("string") for c in ("question_title", "question_content", "best_answer")},
        }
    )
    rows = {
        "topic": [3, 7],
        "question_title": ["Why?", "How"],
        "question_content": ["", None],
        "best_answer": ["x\\ny", "z"],
    }
    split = datasets.Dataset.from_dict(rows, features=features)
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda name: asked.append(name) or {"train": split, "test": split})
    data = text.load_encoded("yahoo_answers", tmp_path, tmp_path / "cache", source="hub", progress=False)
    assert asked == ["community-datasets/yahoo_answers_topics"]
    assert data["y_train"].tolist() == [3, 7] and data["class_names"][3] == "t3"
    assert (data["x_train"] > text.UNK).sum(dim=1).tolist() == [4, 2]  # why ? x y; how z
    assert data["info"]["source"] == "hub"


V = 50
MODELS = {
    "fasttext": lambda: FastText(4, V, buckets=97),
    "textrnn": lambda: TextRNN(4, V),
    "textrcnn": lambda: TextRCNN(4, V),
    "transformer": lambda: Transformer(4, V),
    "charcnn": lambda: CharCNN(4),
}
E = 300  # embedding width of the word models
PARAMS = {
    # words (V + <pad>, <unk>) and two bucket tables, hidden 900 -> 256, classifier 256 -> 4
    "fasttext": (V + 2 + 2 * 97) * E + 900 * 256 + 256 + 256 * 4 + 4,
    # embedding; LSTM layer 1 (input 300) and 2 (input 256), 2 directions, 4 gates of 128, two biases; classifier
    "textrnn": (V + 2) * E + 2 * 4 * 128 * (300 + 128 + 2) + 2 * 4 * 128 * (256 + 128 + 2) + 256 * 4 + 4,
    "textrcnn": (V + 2) * E + 2 * 4 * 128 * (300 + 128 + 2) + (300 + 256) * 256 + 256 + 256 * 4 + 4,
    # embedding; per layer: attention 4·(300² + 300), FFN 300·1024 + 1024 + 1024·300 + 300, two LayerNorms
    "transformer": (V + 2) * E + 2 * (4 * (E * E + E) + E * 1024 + 1024 + 1024 * E + E + 4 * E) + E * 4 + 4,
    # Zhang et al.'s small model at K = 4 (34 positions of 256 features after the convolutions)
    "charcnn": 70 * 256 * 7
    + 256
    + 256 * 256 * 7
    + 256
    + 4 * (256 * 256 * 3 + 256)
    + 8704 * 1024
    + 1024
    + 1024 * 1024
    + 1024
    + 1024 * 4
    + 4,
}


@pytest.mark.parametrize("name", list(MODELS))
def test_padding_never_changes_the_output_and_parameter_counts_are_exact(name: str):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]
    high = 71 if name == "charcnn" else V + 2
    x = torch.randint(1, high, (3, 12))
    x[0, 5:], x[1, 1:] = 0, 0  # texts of 5, 1 and 12 tokens
    with torch.no_grad():
        out = model(x)
        assert out.shape == (3, 4)
        assert torch.allclose(model(torch.nn.functional.pad(x, (0, 20))), out, atol=1e-5)  # padded differently
        assert torch.allclose(model(x[1:2, :1]), out[1:2], atol=1e-5)  # a batch of 1, a text of 1 token
        assert torch.allclose(model(x[:1, :5]), out[:1], atol=1e-5)


def test_a_text_run_resumes_from_another_data_folder_or_cache_but_not_other_settings():
    from alr.run_folder import config_differences, resumable_keys

    def differences(*overrides: str) -> list[str]:
        now = compose("dataset=ag_news", "model=fasttext", *overrides)
        return config_differences(saved, OmegaConf.to_container(now, resolve=True), resumable_keys(now))

    saved = OmegaConf.to_container(compose("dataset=ag_news", "model=fasttext"), resolve=True)
    assert differences("dataset.data_dir=/elsewhere", "dataset.cache_dir=/tmp/c", "trainer.progress=false") == []
    assert differences("dataset.max_len=64") == [
        "dataset.build.max_len (32 -> 64)",
        "dataset.max_len (32 -> 64)",
    ]


def test_text_configs_compose_and_refuse_mismatches():
    cfg = compose("experiment=table3")
    OmegaConf.resolve(cfg)
    assert (cfg.trainer.epochs, cfg.trainer.batch_size, cfg.seed) == (30, 128, 0)
    assert (cfg.optim.optimizer._target_, cfg.optim.optimizer.lr) == ("torch.optim.Adam", 1e-4)
    assert (cfg.optim.scheduler.step_size, cfg.optim.scheduler.gamma) == (10, 0.5)
    assert (cfg.dataset.max_len, cfg.dataset.vocab_size, cfg.model.embed_dim, cfg.model.hidden) == (32, 10000, 300, 256)
    grid = yaml.safe_load((ROOT / "configs/experiment/table3.yaml").read_text())["hydra"]["sweeper"]["params"]
    paper = {(r["dataset"], r["model"], r["method"]) for r in load_paper("table3")}
    axes = [grid[k].split(",") for k in ("dataset", "model", "method")]
    assert paper == {(d, m, k) for d in axes[0] for m in axes[1] if m != "textrcnn" for k in axes[2]}
    validate(cfg)
    char = compose("dataset=yelp_full", "model=charcnn")
    assert char.dataset.encoding == "char" and char.model.length == 1014
    validate(char)
    for overrides, key in (
        (["model=textrnn"], "model"),
        (["dataset=ag_news"], "model"),
        (["dataset=ag_news", "model=charcnn", "dataset.encoding=word"], "dataset.encoding"),
    ):
        with pytest.raises(ConfigError) as err:
            validate(compose(*overrides))
        assert err.value.key == key


@pytest.mark.slow
def test_table3_smoke_grid_end_to_end(tmp_path: Path):
    """`make reproduce-table3 SMOKE=1`, cut to fit the test budget: every model with ALR-S on AG News, FastText
    (small hash tables) with both methods on all three data sets, Yelp's with two bad rows skipped; the table."""
    data = tmp_path / "data"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    cmd = [sys.executable, "-m", "alr.data.samples", "--out", str(data), *text.RELEASES]
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    yelp = data / "yelp_review_full_csv" / "train.csv"
    yelp.write_text(yelp.read_text() + '"9","a review with class nine"\n"1",""\n')
    common = ["experiment=table3", "debug=smoke", f"dataset.data_dir={data}", "dataset.vocab_size=500"]
    common.append("trainer.keep_checkpoint=false")
    models = ["dataset=ag_news", "model=textrnn,textrcnn,charcnn,transformer", "method=alr_s"]
    run_train(*common, *models, out=tmp_path, multirun=True)
    run_train(
        *common, "model=fasttext", "model.buckets=1000", "dataset.skip_bad_rows=true", out=tmp_path, multirun=True
    )
    runs = load_runs(tmp_path / "table3")
    assert len(runs) == 10 and all(r.status == "finished" for r in runs)
    charcnn = next(r for r in runs if r.key == ("ag_news", "charcnn", "alr_s"))
    assert charcnn.result["params"] == {"backbone": PARAMS["charcnn"], "method": 12}
    assert charcnn.result["data"]["encoding"] == "char" and charcnn.result["data"]["rows"]["train"] == 200
    assert json.loads((charcnn.path / "classes.json").read_text())[3] == "Sci/Tech"
    fasttext = next(r for r in runs if r.key == ("yelp_full", "fasttext", "baseline"))
    info = fasttext.result["data"]
    assert info["skipped_rows"] == {"train": {"class out of range": 1, "empty text": 1}, "test": {}}
    assert info["rows"] == {"train": 200, "test": 50} and 4 < info["vocab_words"] <= 500
    # Built once per setting: AG News words (with and without skip_bad_rows) and characters, Yahoo and Yelp words.
    assert len(list((data / "cache").iterdir())) == 5

    out = tmp_path / "results"
    cmd = [sys.executable, "-m", "alr.report", "table3", "--runs", str(tmp_path / "table3"), "--out", str(out)]
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)
    table = (out / "table3.md").read_text()
    assert table.count("| not run |") == 20 and "10 of 10 runs were shortened" in table
    assert "| AG News | TextRCNN (extra) | ALR-S |" in table and "| Yelp Review Full | FastText | Baseline |" in table
    assert len((out / "table3.csv").read_text().splitlines()) == 31


def test_make_reproduce_table3_runs_the_grid_and_the_smoke_mode():
    def dry_run(*args: str) -> str:
        proc = subprocess.run(["make", "-n", "reproduce-table3", *args], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    plain = dry_run()
    assert "-m alr.train -m experiment=table3 paths.output_dir=runs" in plain
    assert "-m alr.report table3 --runs runs/table3 --out results" in plain
    smoke = dry_run("SMOKE=1")
    assert "-m alr.data.samples --out runs/smoke/data ag_news yahoo_answers yelp_full" in smoke
    assert "smoke/data trainer.keep_checkpoint=false model=textrnn,textrcnn,charcnn,transformer" in smoke
    assert "model=fasttext model.buckets=1000" in smoke
    assert 'gpus="0 1"' in dry_run("GPUS=0,1")
    sharded_smoke = dry_run("GPUS=0,1", "SMOKE=1")  # the two sweeps' shard logs apart
    assert "table3-networks-shard$i.log" in sharded_smoke and "table3-fasttext-shard$i.log" in sharded_smoke
