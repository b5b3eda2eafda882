"""AG News, Yahoo! Answers and Yelp Review Full (Table 3; docs/deviations.md#data), encoded once and cached on disk.

Sources (``source``):

- ``csv`` (default): Zhang et al. 2015's CSV release unpacked under ``data_dir`` (``ag_news_csv/``,
  ``yahoo_answers_csv/``, ``yelp_review_full_csv/``, each with ``train.csv``, ``test.csv`` and, for
  AG News and Yahoo, ``classes.txt``). Header-less, class index from 1, then the text columns, which are
  joined with a space (AG News: title, description; Yahoo: title, question, best answer; Yelp: review).
  Fields are CSV-quoted (``""`` for a quote, commas and newlines inside quotes); the release also
  writes line breaks as the two characters ``\\n`` and some quotes as ``\\"``: both are unescaped.
- ``hub``: the same data through Hugging Face ``datasets`` (``fancyzhx/ag_news``,
  ``community-datasets/yahoo_answers_topics``, ``Yelp/yelp_review_full``; labels from 0). This downloads,
  so the user allows it explicitly; tests never use it.

Encodings (``encoding``):

- ``word`` (FastText, TextRNN, TextRCNN, Transformer): lower-cased, split into runs of word characters
  and runs of punctuation (the regex ``\\w+|[^\\w\\s]+``, the rule of Hugging Face ``tokenizers``'
  ``Whitespace`` pre-tokenizer, written out because it is 2-3× faster here than the library's word-level
  model for the same ids: docs/table3-text.md, "Choices"); a vocabulary of the ``vocab_size`` most
  frequent training words with at least ``min_count`` occurrences (ties in alphabetical order), counted
  on the training split only, over whole texts; id 0 is ``<pad>``, 1 is ``<unk>``, words from 2. Each text
  keeps its first ``max_len`` tokens and is padded with 0. FastText's n-grams are hashed from these ids
  inside the model (:class:`alr.models.text.FastText`).
- ``char`` (CharCNN): Zhang et al.'s 70-character alphabet, the text lower-cased and cut to its first
  ``char_length`` characters, id ``1 + position in the alphabet``; characters outside it and the padding
  are 0, which the model turns into all-zero vectors.

The encoded tensors are cached in ``cache_dir`` under a name derived from the source files' size and
mtime and every encoding setting; the cache is written atomically (:mod:`alr.checkpoint`), so a half-written
file is never read, and a changed file or setting makes a new one. Bad rows (wrong column count, class
out of range, empty text, invalid UTF-8) stop the build with the file and line, or with
``skip_bad_rows=true`` are counted, skipped and reported in the run's ``result.json`` (``data``).
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import json
import re
import sys
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from alr.checkpoint import save_checkpoint
from alr.data.batches import DataBundle, TensorBatches
from alr.errors import RunError

URL = "https://github.com/zhangxiangxiao/Crepe"  # Zhang et al.'s code, whose README links the CSV archives
PAD, UNK = 0, 1
SPECIALS = ("<pad>", "<unk>")
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789-,;.!?:'\"/\\|_@#$%^&*~`+-=<>()[]{}\n"
CACHE_FORMAT = 1
TOKEN = re.compile(r"\w+|[^\w\s]+")
_ESCAPE = re.compile(r'\\(n|")')


@dataclass(frozen=True)
class Release:
    folder: str
    text_columns: int
    num_classes: int
    class_names: tuple[str, ...]  # used where the release has no classes.txt
    hub: str
    hub_text: tuple[str, ...]
    hub_label: str


RELEASES = {
    "ag_news": Release(
        "ag_news_csv", 2, 4, ("World", "Sports", "Business", "Sci/Tech"), "fancyzhx/ag_news", ("text",), "label"
    ),
    "yahoo_answers": Release(
        "yahoo_answers_csv",
        3,
        10,
        tuple(f"topic {k}" for k in range(1, 11)),
        "community-datasets/yahoo_answers_topics",
        ("question_title", "question_content", "best_answer"),
        "topic",
    ),
    "yelp_full": Release(
        "yelp_review_full_csv",
        1,
        5,
        ("1 star", "2 stars", "3 stars", "4 stars", "5 stars"),
        "Yelp/yelp_review_full",
        ("text",),
        "label",
    ),
}


def release_of(
    name: str, folder: str | None = None, text_columns: int | None = None, num_classes: int | None = None
) -> Release:
    """One of :data:`RELEASES`, or a CSV of your own in their layout (``folder``, ``text_columns``, ``num_classes``)."""
    if folder is None and name in RELEASES:
        return RELEASES[name]
    if folder is None or text_columns is None or num_classes is None:
        raise RunError(
            f"dataset {name!r} is none of {', '.join(RELEASES)}: for a CSV of your own use dataset=text_csv and set "
            "dataset.folder, dataset.text_columns and dataset.num_classes (docs/table3-text.md)."
        )
    names = tuple(f"class {k}" for k in range(1, num_classes + 1))
    return Release(folder, text_columns, num_classes, names, hub="", hub_text=(), hub_label="")


def how_to_get(release: Release, data_dir: Path) -> str:
    folder = data_dir / release.folder
    if not release.hub:
        return f"Put train.csv and test.csv into {folder}, or point dataset.data_dir=... at the folder that holds it."
    return (
        f"Unpack Zhang et al.'s {release.folder}.tar.gz (linked from {URL}) so that {folder}/train.csv exists, "
        f"or point dataset.data_dir=... at the folder that holds {release.folder}/, or let Hugging Face "
        f"datasets download {release.hub} with dataset.source=hub."
    )


def unescape(text: str) -> str:
    """The release's ``\\n`` and ``\\"`` escapes as a line break and a quote."""
    return _ESCAPE.sub(lambda m: "\n" if m.group(1) == "n" else '"', text)


class BadRows:
    """Counts skipped rows per reason, or raises at the first one when skipping is off."""

    def __init__(self, skip: bool) -> None:
        self.skip, self.counts = skip, Counter()

    def __call__(self, where: str, problem: str) -> None:
        if not self.skip:
            raise RunError(
                f"{where}: {problem}. Fix the file (or get a fresh copy), or set dataset.skip_bad_rows=true to "
                "skip such rows (the run's result.json then counts them)."
            )
        self.counts[problem.split(":")[0]] += 1

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def _decoded_lines(f: Iterable[bytes], undecodable: list[int], bar: tqdm) -> Iterator[str]:
    """Each line as text; numbers of lines that are not UTF-8 go into ``undecodable``."""
    for number, raw in enumerate(f, 1):
        bar.update(len(raw))
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            undecodable.append(number)
            yield raw.decode("utf-8", "replace")


def read_csv(
    path: Path, text_columns: int, num_classes: int, bad: BadRows, progress: bool = False
) -> tuple[list[str], list[int]]:
    """Texts (text columns unescaped, stripped and joined by a space) and 0-based labels of one release file."""
    csv.field_size_limit(max(csv.field_size_limit(), 1 << 26))
    texts, labels, undecodable = [], [], []
    bar = tqdm(
        total=path.stat().st_size, desc=path.name, unit="B", unit_scale=True, disable=not progress, mininterval=1.0
    )
    with path.open("rb") as f, bar:
        reader = csv.reader(_decoded_lines(f, undecodable, bar))
        while True:
            first = reader.line_num + 1  # a record may span several lines
            where = f"{path}, line {first}"
            try:
                row = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                bad(where, f"not a CSV row: {e}")
                continue
            if not row:  # a blank line holds no row
                continue
            if undecodable and undecodable[-1] >= first:
                bad(where, f"invalid UTF-8: line {undecodable[-1]} is not UTF-8 text")
                continue
            if len(row) != 1 + text_columns:
                bad(where, f"wrong column count: {len(row)} columns, expected {1 + text_columns} (class, text)")
                continue
            try:
                label = int(row[0])
            except ValueError:
                label = 0
            if not 1 <= label <= num_classes:
                bad(where, f"class out of range: {row[0]!r}, expected 1 to {num_classes}")
                continue
            text = " ".join(t for t in (unescape(c).strip() for c in row[1:]) if t)
            if not text:
                bad(where, "empty text")
                continue
            texts.append(text)
            labels.append(label - 1)
    return texts, labels


def read_classes(folder: Path, release: Release) -> list[str]:
    """``classes.txt`` (one name a line) where the release has it, else the names in :data:`RELEASES`."""
    path = folder / "classes.txt"
    if not path.is_file():
        return list(release.class_names)
    names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(names) != release.num_classes:
        raise RunError(
            f"{path} lists {len(names)} classes, expected {release.num_classes}: one name a line. Fix it or delete it."
        )
    return names


def _load_hub(release: Release) -> Any:
    """Both splits from the Hugging Face hub (or its local cache), as ``datasets`` objects."""
    try:
        from datasets import load_dataset

        return load_dataset(release.hub)
    except Exception as e:  # network, authentication, a missing package: all say the same thing to the user
        raise RunError(
            f"could not load {release.hub} with Hugging Face datasets ({type(e).__name__}: {e}). Check the network "
            "(or HF_HUB_OFFLINE and the datasets cache), or use the CSV release with dataset.source=csv."
        ) from e


def _hub_rows(ds: Any, release: Release, bad: dict[str, BadRows]) -> dict[str, tuple[list[str], list[int]]]:
    """Texts and labels of both hub splits, joined and checked like the CSV rows."""
    splits = {}
    for split in ("train", "test"):
        texts, labels = [], []
        columns = [ds[split][c] for c in (release.hub_label, *release.hub_text)]
        for i, (label, *parts) in enumerate(zip(*columns)):
            where = f"{release.hub} split {split}, row {i}"
            if not 0 <= label < release.num_classes:
                bad[split](where, f"class out of range: {label!r}, expected 0 to {release.num_classes - 1}")
                continue
            text = " ".join(t for t in (unescape(p or "").strip() for p in parts) if t)
            if not text:
                bad[split](where, "empty text")
                continue
            texts.append(text)
            labels.append(label)
        splits[split] = (texts, labels)
    return splits


def build_vocab(texts: list[str], size: int, min_count: int, progress: bool = True) -> dict[str, int]:
    """Word -> id for the ``size`` most frequent words seen at least ``min_count`` times (ties: alphabetical)."""
    counts: Counter[str] = Counter()
    for text in tqdm(texts, desc="vocabulary", unit="row", disable=not progress, mininterval=1.0):
        counts.update(TOKEN.findall(text.lower()))
    words = [w for _, w in heapq.nsmallest(size, ((-c, w) for w, c in counts.items() if c >= min_count))]
    return {w: i for i, w in enumerate(words, len(SPECIALS))}


def encode_words(texts: list[str], vocab: dict[str, int], max_len: int, progress: bool = True) -> np.ndarray:
    """``int32 N×max_len``: each text's first ``max_len`` token ids (``<unk>`` = 1), padded with 0."""
    out = np.zeros((len(texts), max_len), dtype=np.int32)
    get = vocab.get
    for i, text in enumerate(tqdm(texts, desc="words", unit="row", disable=not progress, mininterval=1.0)):
        ids = [get(w, UNK) for w in TOKEN.findall(text.lower())[:max_len]]
        out[i, : len(ids)] = ids
    return out


_CHAR_IDS = np.zeros(0x110000, dtype=np.uint8)  # code point -> 1 + index in ALPHABET; 0 elsewhere
for _i, _c in enumerate(ALPHABET):
    _CHAR_IDS[ord(_c)] = _i + 1  # the alphabet lists "-" twice; like Zhang et al.'s code, the later one wins


def encode_chars(texts: list[str], length: int, progress: bool = True) -> np.ndarray:
    """``uint8 N×length``: each text lower-cased and cut to ``length`` characters, as alphabet ids (0: other)."""
    out = np.zeros((len(texts), length), dtype=np.uint8)
    for i, text in enumerate(tqdm(texts, desc="characters", unit="row", disable=not progress, mininterval=1.0)):
        codes = np.frombuffer(text[:length].lower()[:length].encode("utf-32-le"), dtype=np.uint32)
        out[i, : len(codes)] = _CHAR_IDS[codes]
    return out


def _file_stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def load_encoded(
    name: str,
    data_dir: str | Path,
    cache_dir: str | Path,
    source: str = "csv",
    encoding: str = "word",
    max_len: int = 32,
    vocab_size: int = 10_000,
    min_count: int = 1,
    char_length: int = 1014,
    skip_bad_rows: bool = False,
    progress: bool = True,
    folder: str | None = None,
    text_columns: int | None = None,
    num_classes: int | None = None,
) -> dict[str, Any]:
    """The encoded splits ``x_train, y_train, x_test, y_test`` (tensors), ``class_names`` and ``info``.

    Read from the cache when one matches the source files and every setting; built and cached otherwise.
    ``folder``, ``text_columns``, ``num_classes``: a CSV of your own in the release's layout (:func:`release_of`).
    """
    release, data_dir = release_of(name, folder, text_columns, num_classes), Path(data_dir)
    if source not in ("csv", "hub") or (source == "hub" and not release.hub):
        raise RunError(
            f"config key 'dataset.source' is {source!r}: use csv (the files under data_dir)"
            + (" or hub." if release.hub else "; hub serves only " + ", ".join(RELEASES) + ".")
        )
    if encoding not in ("word", "char"):
        raise RunError(f"config key 'dataset.encoding' is {encoding!r}: use word or char (model=charcnn sets it).")
    settings: dict[str, Any] = {"format": CACHE_FORMAT, "name": name, "source": source, "encoding": encoding}
    settings["layout"] = [release.folder, release.text_columns, release.num_classes]
    settings.update(
        {"max_len": max_len, "vocab_size": vocab_size, "min_count": min_count}
        if encoding == "word"
        else {"char_length": char_length, "alphabet": ALPHABET}
    )
    settings["skip_bad_rows"] = skip_bad_rows
    folder = data_dir / release.folder
    files = {split: folder / f"{split}.csv" for split in ("train", "test")}
    bad = {split: BadRows(skip_bad_rows) for split in files}
    if source == "csv":
        missing = [p for p in files.values() if not p.is_file()]
        if missing:
            raise RunError(f"{name}: no file {missing[0]}. {how_to_get(release, data_dir)}")
        stamps = {p.name: _file_stamp(p) for p in [*files.values(), folder / "classes.txt"] if p.is_file()}
        settings["files"] = {"folder": str(folder.resolve()), **stamps}
        hub = None
    else:
        hub = _load_hub(release)
        settings["files"] = {"hub": release.hub, **{s: hub[s]._fingerprint for s in files}}  # the version read

    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"{name}-{encoding}-{key}.pt"
    if cache.is_file():
        try:
            cached = torch.load(cache, map_location="cpu", weights_only=True)
            if cached.get("settings") == settings:
                return cached
        except Exception as e:  # only a rename ever creates this name, but the disk may have been damaged since
            print(f"[alr] {cache} is unreadable ({type(e).__name__}); building it again", file=sys.stderr)

    if hub is None:
        splits = {s: read_csv(p, release.text_columns, release.num_classes, bad[s], progress) for s, p in files.items()}
        class_names = read_classes(folder, release)
    else:
        splits, class_names = _hub_rows(hub, release, bad), list(hub["train"].features[release.hub_label].names)
    for split, (texts, _) in splits.items():
        if not texts:
            raise RunError(f"{name}: the {split} split has no usable rows ({bad[split].total} skipped).")
    info: dict[str, Any] = {"source": source, "encoding": encoding, "cache": str(cache)}
    if encoding == "word":
        vocab = build_vocab(splits["train"][0], vocab_size, min_count, progress)
        info["vocab_words"] = len(vocab)
        encode = lambda texts: encode_words(texts, vocab, max_len, progress)  # noqa: E731
    else:
        encode = lambda texts: encode_chars(texts, char_length, progress)  # noqa: E731
    out: dict[str, Any] = {"settings": settings, "class_names": class_names, "num_classes": release.num_classes}
    for split, (texts, labels) in splits.items():
        out[f"x_{split}"] = torch.from_numpy(encode(texts))
        out[f"y_{split}"] = torch.tensor(labels, dtype=torch.int64)
    info["rows"] = {split: len(labels) for split, (_, labels) in splits.items()}
    info["skipped_rows"] = {split: dict(b.counts) for split, b in bad.items()}
    out["info"] = info
    try:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        save_checkpoint(out, cache)
    except PermissionError as e:
        raise RunError(
            f"cannot write the encoded {name} into {cache_dir} ({e.strerror}). Point dataset.cache_dir=... at a "
            "folder you can write to."
        ) from e
    return out


def build(
    batch_size: int,
    device: torch.device | str,
    seed: int = 0,
    name: str = "ag_news",
    data_dir: str | Path = "data",
    cache_dir: str | Path = "data/cache",
    eval_batch_size: int = 1000,
    **settings: Any,
) -> DataBundle:
    """``name``'s splits, encoded (``settings``: see :func:`load_encoded`), as batches on ``device``."""
    data = load_encoded(name, data_dir, cache_dir, **settings)
    skipped = {s: n for s, counts in data["info"]["skipped_rows"].items() if (n := sum(counts.values()))}
    if skipped:
        print(f"[alr] {name}: skipped bad rows {skipped} (dataset.skip_bad_rows=true; counted in result.json)")
    return DataBundle(
        train=TensorBatches(
            data["x_train"].to(device), data["y_train"].to(device), batch_size, shuffle=True, seed=seed
        ),
        test=TensorBatches(data["x_test"].to(device), data["y_test"].to(device), eval_batch_size, shuffle=False),
        num_classes=data["num_classes"],
        class_names=data["class_names"],
        info=data["info"],
    )
