"""Open to new methods: no method is named in the code that trains, checks configs and reports, and a method
that only its runs and its config know is reported with its label in its experiment's order.

The scan (:func:`named_methods`) covers src/alr/reporting/*.py, src/alr/trainer.py and src/alr/config_check.py.
The method names are the ``name`` of every configs/method/*.yaml. Each file is read by Python's own parser
(``ast``), and a method name is flagged where it is code, not prose:

- an identifier equal to a method name: a variable, an argument, an attribute, a keyword argument, a function
  or a class (``alr_s = ...``, ``cells.baseline``, ``f(kd=...)``). A name that an import statement of the file
  binds is exempt (``import alr``: the package shares its name with a method);
- a string constant equal to a method name, or holding one as a segment when the string is split at every
  character other than letters, digits, ``_`` and ``.`` (``"method=alr_s"``, ``"baseline,alr"``, the literal
  part ``-alr-s0`` of an f-string). A dotted path is one segment (``"alr.methods.Supervised"`` names a module).

Not flagged: a string that holds whitespace, which is prose for a reader (an error message, a table's note), and
docstrings and comments. Prose that depends on what a table compares is built from the experiment's ``report``
key and the methods' labels, as the tables here show; configs/ may name methods, the code reading them may not.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from alr.reporting.grid import Comparisons, expected_grid, method_labels, method_order
from alr.reporting.plots import learning_curves, style
from alr.reporting.runs import load_runs
from alr.reporting.tables import demo_table
from alr.run_folder import config_differences
from conftest import CONFIGS, ROOT, compose

SCANNED = sorted((ROOT / "src" / "alr" / "reporting").glob("*.py")) + [
    ROOT / "src" / "alr" / "trainer.py",
    ROOT / "src" / "alr" / "config_check.py",
]
SEGMENT = re.compile(r"[^\w.]+")


def method_names() -> set[str]:
    return {str(yaml.safe_load(p.read_text()).get("name") or p.stem) for p in (CONFIGS / "method").glob("*.yaml")}


def _docstrings(tree: ast.AST) -> set[int]:
    """The ids of the string constants that are docstrings (first statement of a module, class or function)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def named_methods(source: str, names: set[str]) -> list[tuple[int, str, str]]:
    """(line, method name, what names it) for every place ``source`` names a method in code (module docstring)."""
    tree = ast.parse(source)
    imported = {
        (alias.asname or alias.name).split(".")[0]
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom))
        for alias in node.names
    }
    docstrings = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        identifiers = []
        if isinstance(node, ast.Name):
            identifiers = [("identifier", node.id)] if node.id not in imported else []
        elif isinstance(node, ast.arg):
            identifiers = [("argument", node.arg)]
        elif isinstance(node, ast.Attribute):
            identifiers = [("attribute", node.attr)]
        elif isinstance(node, ast.keyword) and node.arg:
            identifiers = [("keyword argument", node.arg)]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            identifiers = [("definition", node.name)]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            prose = any(c.isspace() for c in node.value)
            identifiers = [] if prose else [("string", part) for part in SEGMENT.split(node.value)]
        found += [(node.lineno, name, kind) for kind, name in identifiers if name in names]
    return sorted(set(found))


def test_reporting_the_trainer_and_config_check_name_no_method():
    names = method_names()
    assert {"baseline", "alr", "alr_s", "kd", "dml"} <= names
    found = [
        f"{path.relative_to(ROOT)}:{line}: {kind} {name!r}"
        for path in SCANNED
        for line, name, kind in named_methods(path.read_text(), names)
    ]
    why = "a method is named in code; name it in configs/ (its method config, an experiment's report key):\n"
    assert not found, why + "\n".join(found)


def test_the_scan_finds_a_method_named_in_code_and_lets_prose_be():
    source = '''"""Compares alr_s with the baseline (a docstring: prose)."""
import alr
from alr.reporting import tables

REFERENCE = "baseline"
NOTE = "Δ vs baseline: prose for a reader"


def rows(cells, alr_s=None):
    for key in cells:
        if key[2] in ("alr", "dml"):
            yield f"{key[0]}-{key[1]}-alr_sum-s0", cells.kd, alr.__version__, tables
'''
    assert named_methods(source, {"baseline", "alr", "alr_s", "alr_sum", "kd", "dml"}) == [
        (5, "baseline", "string"),
        (9, "alr_s", "argument"),
        (11, "alr", "string"),
        (11, "dml", "string"),
        (12, "alr_sum", "string"),
        (12, "kd", "attribute"),
    ]


def _run(root: Path, method: str, seed: int, acc: float, label: str | None = None) -> None:
    """A finished run folder of the demo's cell (``label``: the run's saved ``method.label``)."""
    folder = root / f"digits-digits_cnn-{method}-s{seed}"
    folder.mkdir(parents=True)
    config = {
        "experiment_name": "demo",
        "dataset": {"name": "digits"},
        "model_name": "digits_cnn",
        "method": {"name": method, **({"label": label} if label else {})},
        "seed": seed,
        "trainer": {"epochs": 30, "limit_train_batches": None},
    }
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    result = {"status": "finished", "final_test_acc": acc, "params": {"backbone": 94_186}, "wall_time_s": 1.0}
    (folder / "result.json").write_text(json.dumps(result))
    metrics = [{"epoch": e, "test/acc": acc - 3 + e, "train/acc": acc - 4 + e} for e in (1, 2, 3)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))


def test_a_method_only_its_runs_know_is_reported_with_its_label_after_the_sweeps_methods(tmp_path: Path):
    """A method that no file of the suite names (its config lives elsewhere: the runs carry its label) gets its
    row after the demo's sweep, a colour and dash of its own, and no comparison the experiment did not ask for."""
    for seed in range(2):
        _run(tmp_path, "baseline", seed, 99.0 + seed / 10)  # a run of a version before labels: configs/ names it
        _run(tmp_path, "alr", seed, 99.2 + seed / 10, label="ALR")
        _run(tmp_path, "toy_smoothing", seed, 98.0 + seed / 10, label="Toy smoothing")
    runs = load_runs(tmp_path)
    grid = expected_grid("demo")
    text = demo_table(runs, tmp_path / "table.md", grid=grid)
    rows = [line.split(" | ")[0].lstrip("| ") for line in text.splitlines()[4:9]]
    assert rows == ["Baseline", "SLR", "ALR", "ALR-S", "Toy smoothing"]
    toy = next(line for line in text.splitlines() if line.startswith("| Toy smoothing |"))
    assert toy.endswith("| 2 | 94,186 |  |")  # not in the demo's report.compared
    order = method_order(grid, runs)
    assert order == ["baseline", "slr", "alr", "alr_s", "toy_smoothing"]
    assert len({style(m, order) for m in order}) == len(order)
    png = learning_curves(runs, tmp_path / "curves.png", "demo", order)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_report_key_never_refuses_a_resume():
    """Run folders made before ``report`` existed, or under another one, resume: only reporting reads it."""
    now = OmegaConf.to_container(compose("experiment=table1"), resolve=True)
    saved = {k: v for k, v in now.items() if k != "report"}
    assert config_differences(saved, now) == []
    assert config_differences({**now, "report": {"reference": "slr"}}, now) == []


@pytest.mark.parametrize(
    "report,message",
    [
        ({"refrence": "baseline"}, "report has no key refrence; it holds reference, compared"),
        ({"verdict": ["alr_s", "baseline"]}, "report.verdict must be {method: <name>, reference: <name>}"),
        ({"heatmap": {"seed": 0}}, "report.heatmap names a method"),
    ],
)
def test_a_bad_report_key_is_named_in_one_line(report: dict, message: str):
    with pytest.raises(ValueError, match=re.escape(f"configs/experiment/t.yaml: {message}")):
        Comparisons.from_config(report, "t")


@pytest.mark.slow
def test_a_method_kept_in_tests_alone_is_trained_reported_and_priced(tmp_path: Path):
    """``tests/toy_method.py`` and ``tests/toy_configs/`` (a method and an experiment) through Hydra's search
    path: the sweep trains it, its table, curves and status verdict name it, the GPU forecast prices it, and
    nothing under src/ knows its name."""
    from alr.reporting.gpu import predict, table_recipes
    from alr.reporting.plots import write_plots
    from alr.reporting.status import verdict
    from alr.reporting.zoo import comparison_table
    from conftest import run_train

    search = f"hydra.searchpath=[file://{ROOT / 'tests' / 'toy_configs'}]"
    run_train(search, "experiment=toy", out=tmp_path, multirun=True)
    runs = load_runs(tmp_path / "toy")
    assert sorted((r.key[2], r.seed) for r in runs) == [("baseline", 0), ("baseline", 1), ("brier", 0), ("brier", 1)]
    assert all(r.status == "finished" for r in runs)
    brier = next(r for r in runs if r.key[2] == "brier")
    assert "train/L_brier" in brier.metrics()[0] and brier.config["method"]["label"] == "Brier"
    state = __import__("torch").load(brier.path / "last.pt", weights_only=True)["method"]
    assert int(state["criterion.epochs_started"]) == 2  # its start_epoch hook ran once per epoch

    grid = expected_grid("toy", [search])
    assert grid.methods == ["baseline", "brier"] and grid.labels["brier"] == "Brier"
    table = comparison_table("toy", "Toy", runs, tmp_path / "toy.md", grid=grid)
    row = next(line for line in table.splitlines() if "| Brier |" in line)
    assert "| 2/2 |" in row and "n/a" not in row.split("|")[-2]  # Δ vs baseline with Welch's test
    assert any(p.suffix == ".png" for p in write_plots(runs, tmp_path / "plots", {"toy": grid}))
    assert verdict(runs, grid.epochs, grid.report, method_labels(grid, runs)).startswith("Brier above baseline in ")

    recipes = table_recipes("toy", [search])
    setting = {"precision": "fp32", "channels_last": True, "compile": False}  # the trainer's defaults
    measured = [
        {"status": "ok", "model": "digits_cnn", "method": "baseline", **setting, "train_images_per_s": 1437.0,
         "eval_images_per_s": 360.0}
    ]  # fmt: skip
    p = predict(recipes, measured)["toy"]
    assert p["runs"] == 4 and p["configured"]["missing"] == []
    assert p["configured"]["hours"] == pytest.approx(4 * 2 * (1 + 1) / 3600)  # 4 runs × 2 epochs × (1 s + 1 s)

    assert not [p for p in (ROOT / "src").rglob("*.py") if "brier" in p.read_text().lower()]
