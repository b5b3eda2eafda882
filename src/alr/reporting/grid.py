"""The runs an experiment expects, read from its own sweep (``configs/experiment/<name>.yaml``), which of its
cells still miss seeds, and what its tables compare (its ``report`` key): so the grid of a table, the order of
its methods and its comparisons are typed once, in the file that launches it. Reporting names no method: a
method's label comes from its config (``method.label``), its place from the sweep."""

from __future__ import annotations

import functools
import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from alr.config import compose
from alr.config_check import excluded
from alr.reporting.runs import Run

CellKey = tuple[str, str, str]  # (dataset name, model, method name), as in Run.key
GRID_KEYS = ("dataset", "model", "method")
HEATMAP_KEYS = ("dataset", "model", "method", "seed")


@dataclass(frozen=True)
class Comparisons:
    """What an experiment's tables compare: its config's ``report`` key.

    Each key is described in docs/runs-and-results.md#what-a-table-compares. Only reporting reads it (a run
    resumes whatever it says: ``run_folder.RESUMABLE_CHANGES``); it may name methods, the code reading it names none.
    """

    reference: str | None = None  # the Δ column: a compared method's mean minus this one's, with Welch's test
    compared: tuple[str, ...] | None = None  # the methods that get the Δ column; None: all but the reference
    versus: str | None = None  # Table 4's column: this method's mean minus each other row's
    verdict: tuple[str, str] | None = None  # the status page: (method, reference), cell by cell
    heatmap: Mapping[str, Any] = field(default_factory=dict)  # the run whose residual labels the figure draws
    networks: Mapping[str, int] = field(default_factory=dict)  # method -> networks it is scored by, before runs say
    curves: tuple[str, ...] | None = None  # the methods a focused learning-curve figure draws; None: every one
    page: str | None = None  # the docs page that says what the table tests and what it does not

    KEYS = ("reference", "compared", "versus", "verdict", "heatmap", "networks", "curves", "page")

    def compares(self, method: str) -> bool:
        """Whether ``method``'s rows get the Δ-vs-reference column."""
        if self.reference is None or method == self.reference:
            return False
        return self.compared is None or method in self.compared

    @classmethod
    def from_config(cls, node: Any, experiment: str) -> Comparisons:
        """Read an experiment's ``report`` node; a key it does not know, or a value of the wrong shape, fails
        in one line naming it."""
        spec = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node or {})
        where = f"configs/experiment/{experiment}.yaml: report"
        unknown = sorted(set(spec) - set(cls.KEYS))
        if unknown:
            raise ValueError(f"{where} has no key {', '.join(unknown)}; it holds {', '.join(cls.KEYS)}")
        verdict = spec.get("verdict")
        if verdict is not None and not (isinstance(verdict, dict) and set(verdict) == {"method", "reference"}):
            raise ValueError(f"{where}.verdict must be {{method: <name>, reference: <name>}}, got {verdict!r}")
        heatmap = spec.get("heatmap") or {}
        if heatmap and (not isinstance(heatmap, dict) or set(heatmap) - set(HEATMAP_KEYS) or "method" not in heatmap):
            raise ValueError(f"{where}.heatmap names a method and optionally {', '.join(HEATMAP_KEYS)}: {heatmap!r}")
        compared, curves = spec.get("compared"), spec.get("curves")
        return cls(
            reference=spec.get("reference"),
            compared=None if compared is None else tuple(compared),
            versus=spec.get("versus"),
            verdict=None if verdict is None else (verdict["method"], verdict["reference"]),
            heatmap=heatmap,
            networks={str(k): int(v) for k, v in (spec.get("networks") or {}).items()},
            curves=None if curves is None else tuple(curves),
            page=spec.get("page"),
        )


@dataclass
class Grid:
    experiment: str
    cells: list[CellKey]
    seeds: list[int]
    epochs: int  # the recipe's; a run with fewer is shortened
    methods: list[str] = field(default_factory=list)  # method names in the sweep's order
    labels: dict[str, str] = field(default_factory=dict)  # method name -> method.label of its composed config
    report: Comparisons = field(default_factory=Comparisons)


def _values(params: dict[str, str]) -> dict[str, list[str]]:
    """Each swept key's values, parsed as Hydra's basic sweeper parses them (``a,b``, ``range(0,5)``...)."""
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return {
        o.get_key_element(): list(o.sweep_string_iterator())
        if o.is_sweep_override()
        else [o.get_value_element_as_str()]
        for o in parsed
    }


def expected_grid(experiment: str, overrides: Sequence[str] = ()) -> Grid:
    """The (dataset, model, method) cells and seeds of ``experiment``'s ``hydra.sweeper.params``, its methods'
    order and labels, and what its tables compare (:class:`Comparisons`, its ``report`` key).

    ``overrides`` go into every composition (``hydra.searchpath=[file://<folder>]`` for configs kept
    elsewhere, such as a test's own method). A key the sweep leaves out takes the experiment's composed value
    (the demo fixes dataset and model); the cells of the experiment's ``grid_exclude`` are not in the grid.
    Cells are named as run folders name them (``dataset.name``, the model option, ``method.name``).
    A data set's name and a method's name and label come from its own option, so each option is composed
    once, not each cell of the product (a composition takes about 0.1 s here): the grid of Table 3 takes 6
    compositions instead of 30. ``grid_exclude`` is matched on the cell's three choices.
    """
    base = [*overrides, f"experiment={experiment}"]
    cfg = compose(base, keep_hydra=True)
    values = _values(dict(cfg.hydra.sweeper.params or {}))
    choices = dict(cfg.hydra.runtime.choices)
    axes = [values.get(k, [choices[k]]) for k in GRID_KEYS]
    dataset_names = {d: compose([*base, f"dataset={d}"]).dataset.name for d in axes[0]}
    methods = {m: compose([*base, f"method={m}"]).method for m in axes[2]}
    cells = []
    for dataset, model, method in itertools.product(*axes):
        if excluded(cfg, {**choices, "dataset": dataset, "model": model, "method": method}):
            continue
        cells.append((dataset_names[dataset], model, str(methods[method].name)))
    seeds = [int(s) for s in values.get("seed", [str(cfg.seed)])]
    return Grid(
        experiment,
        cells,
        seeds,
        int(cfg.trainer.epochs),
        methods=list(dict.fromkeys(str(m.name) for m in methods.values())),
        labels={str(m.name): str(m.label) for m in methods.values()},
        report=Comparisons.from_config(cfg.get("report"), experiment),
    )


def grid_if_configured(experiment: str, grids: Mapping[str, Grid] | None = None) -> Grid | None:
    """``grids[experiment]``, else its :func:`expected_grid`; None for an experiment name without a config file
    (runs of ``experiment_name=...`` set by hand)."""
    if grids and experiment in grids:
        return grids[experiment]
    try:
        return expected_grid(experiment)
    except MissingConfigException:
        return None


@functools.cache
def configured_label(method: str) -> str:
    """``method.label`` of ``configs/method/<method>.yaml``; the name itself where no such config composes."""
    try:
        return str(compose([f"method={method}"]).method.label)
    except (HydraException, OmegaConfBaseException):
        return method


def run_label(run: Run) -> str:
    """How reports name ``run``'s method: its saved config's ``method.label``; a run folder of a version before
    labels has none, and takes the label its method's config has now (:func:`configured_label`)."""
    return str(run.config.get("method", {}).get("label") or configured_label(run.key[2]))


def method_order(grid: Grid | None, runs: Iterable[Run] = ()) -> list[str]:
    """Method names in the experiment's sweep order, then those only ``runs`` have, by name."""
    known = list(grid.methods) if grid else []
    return known + sorted({r.key[2] for r in runs} - set(known))


def method_labels(grid: Grid | None, runs: Iterable[Run] = ()) -> dict[str, str]:
    """Method name -> label: the runs' own (their saved ``method.label``), else the grid's composed config's,
    else the label its method's config has now (:func:`run_label`)."""
    labels = dict(grid.labels) if grid else {}
    saved: dict[str, str] = {}
    for run in runs:
        if label := run.config.get("method", {}).get("label"):
            saved.setdefault(run.key[2], str(label))
        elif run.key[2] not in labels:
            labels[run.key[2]] = run_label(run)
    return labels | saved


def table_cells(*sources: Iterable[CellKey]) -> list[CellKey]:
    """The cells of ``sources`` (the paper's rows, the grid, the runs), each once: (data set, model) blocks in
    the order they first appear, and within a block the methods in the order they first appear."""
    keys = list(dict.fromkeys(k for source in sources for k in source))
    blocks = {b: i for i, b in enumerate(dict.fromkeys(k[:2] for k in keys))}
    methods = {m: i for i, m in enumerate(dict.fromkeys(k[2] for k in keys))}
    return sorted(keys, key=lambda k: (blocks[k[:2]], methods[k[2]]))


def matches(run: Run, heatmap: Mapping[str, Any]) -> bool:
    """Whether ``run`` is one that an experiment's ``report.heatmap`` names (every key it gives must agree)."""
    have = dict(zip(HEATMAP_KEYS, (*run.key, run.seed)))
    return bool(heatmap) and all(str(have[k]) == str(v) for k, v in heatmap.items())


def heatmap_run(runs: Iterable[Run], heatmap: Mapping[str, Any]) -> Run | None:
    """The finished run with residual-label snapshots that ``heatmap`` names, the lowest seed of them."""
    found = [r for r in runs if r.status == "finished" and matches(r, heatmap) and r.snapshot_epochs()]
    return min(found, key=lambda r: r.seed, default=None)


def missing_cells(grid: Grid, runs: list[Run]) -> list[str]:
    """One line per cell with fewer finished seeds than the grid expects: which seeds, and why."""
    status = {(r.key, r.seed): r.status for r in runs if r.config.get("experiment_name") == grid.experiment}
    lines = []
    for cell in grid.cells:
        finished = [s for s in grid.seeds if status.get((cell, s)) == "finished"]
        if len(finished) == len(grid.seeds):
            continue
        failed = [s for s in grid.seeds if status.get((cell, s)) == "failed"]
        running = [s for s in grid.seeds if status.get((cell, s)) == "running"]
        absent = [s for s in grid.seeds if (cell, s) not in status]
        why = [
            f"{label} {', '.join(map(str, seeds))}"
            for label, seeds in (("failed:", failed), ("unfinished:", running), ("not run:", absent))
            if seeds
        ]
        lines.append(
            f"{grid.experiment} / {' / '.join(cell)}: {len(finished)}/{len(grid.seeds)} seeds ({'; '.join(why)})"
        )
    return lines
