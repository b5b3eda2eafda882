"""The runs an experiment expects, read from its own sweep (``configs/experiment/<name>.yaml``), and which
of its cells still miss seeds: so the grid of a table is typed once, in the file that launches it."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

from hydra.core.override_parser.overrides_parser import OverridesParser

from alr.config import compose
from alr.config_check import excluded
from alr.reporting.runs import Run

CellKey = tuple[str, str, str]  # (dataset name, model, method name), as in Run.key
GRID_KEYS = ("dataset", "model", "method")


@dataclass
class Grid:
    experiment: str
    cells: list[CellKey]
    seeds: list[int]
    epochs: int  # the recipe's; a run with fewer is shortened


def _values(params: dict[str, str]) -> dict[str, list[str]]:
    """Each swept key's values, parsed as Hydra's basic sweeper parses them (``a,b``, ``range(0,5)``...)."""
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return {
        o.get_key_element(): list(o.sweep_string_iterator())
        if o.is_sweep_override()
        else [o.get_value_element_as_str()]
        for o in parsed
    }


def expected_grid(experiment: str) -> Grid:
    """The (dataset, model, method) cells and seeds of ``experiment``'s ``hydra.sweeper.params``.

    A key the sweep leaves out takes the experiment's composed value (the demo fixes dataset and model);
    the cells of the experiment's ``grid_exclude`` are not in the grid.
    Cells are named as run folders name them (``dataset.name``, the model option, ``method.name``).
    A data set's name and a method's name come from its own option, so each option is composed once, not
    each cell of the product (a composition takes about half a second here): the grid of Table 3 takes 6
    compositions instead of 30. ``grid_exclude`` is matched on the cell's three choices.
    """
    cfg = compose([f"experiment={experiment}"], keep_hydra=True)
    values = _values(dict(cfg.hydra.sweeper.params or {}))
    choices = dict(cfg.hydra.runtime.choices)
    axes = [values.get(k, [choices[k]]) for k in GRID_KEYS]
    dataset_names = {d: compose([f"experiment={experiment}", f"dataset={d}"]).dataset.name for d in axes[0]}
    method_names = {m: compose([f"experiment={experiment}", f"method={m}"]).method.name for m in axes[2]}
    cells = []
    for dataset, model, method in itertools.product(*axes):
        if excluded(cfg, {**choices, "dataset": dataset, "model": model, "method": method}):
            continue
        cells.append((dataset_names[dataset], model, method_names[method]))
    seeds = [int(s) for s in values.get("seed", [str(cfg.seed)])]
    return Grid(experiment, cells, seeds, int(cfg.trainer.epochs))


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
