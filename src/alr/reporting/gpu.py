"""What ``make gpu-check`` measured, as a report, and the GPU-hours each table's grid will take on that machine.

Everything here is arithmetic on a measurement dict (the ``.json`` the check writes beside the
``.md``), so the report and the predictions can be rebuilt and tested without a GPU.

Prediction of one run (docs/gpu-check.md, "Before you spend GPU-days"), from its method's ``cost``
(``configs/method/<name>.yaml``: ``like``, ``steps``, ``forwards``)::

    seconds = epochs × (steps × num_train ÷ train images/s of like
                        + Σ over forwards: num_train ÷ eval images/s of that model
                        + num_test ÷ eval images/s)

with the images/s that the check measured through the trainer for the run's backbone (a forward
model's for each of ``forwards``: KD's teacher) at a setting (precision, ``channels_last``,
``torch.compile``); a table's GPU-hours sum this over every cell and seed of its grid. Images ÷
images/s is steps per epoch ÷ steps/s with the last, partial batch counted by its size. Writing
``last.pt`` and ``metrics.jsonl`` once an epoch is not counted. Which methods the check measured is
read from the measurements (``methods``, else the order of the throughput cells): the first one is the
reference whose fastest cell sets each backbone's fastest setting, and the others' overhead is
against it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from omegaconf import OmegaConf

from alr.config import compose
from alr.reporting.grid import expected_grid

SETTING_KEYS = ("precision", "channels_last", "compile")


@dataclass(frozen=True)
class Cost:
    """What one training step of a method runs (its config's ``method.cost``)."""

    like: str  # the measured method whose training step this one's equals
    steps: float = 1.0  # how many such steps (DML: 2, a network each)
    forwards: tuple[str, ...] = field(default_factory=tuple)  # models run forward only (KD's teacher)

    @classmethod
    def from_config(cls, node: Any) -> Cost:
        cost = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node)
        return cls(str(cost["like"]), float(cost["steps"]), tuple(str(m) for m in cost["forwards"] or ()))


@dataclass
class RunRecipe:
    """One cell of a table's grid, as its composed config trains it."""

    experiment: str
    dataset: str
    model: str
    method: str
    seeds: int
    epochs: int
    batch_size: int
    num_train: int | None
    num_test: int | None
    precision: str
    channels_last: bool
    compile: bool
    cost: Cost


def setting_label(cell: dict[str, Any]) -> str:
    """``bf16, channels_last, compile``: a throughput cell's or recipe's setting in words."""
    return ", ".join(
        [cell["precision"], "channels_last" if cell["channels_last"] else "contiguous"]
        + (["compile"] if cell["compile"] else ["eager"])
    )


def _lookup(throughput: list[dict[str, Any]], model: str, method: str | None, setting: dict[str, Any]) -> dict | None:
    """The measured cell of ``model`` and ``method`` (None: any method) at ``setting``."""
    for cell in throughput:
        if (
            cell.get("status") == "ok"
            and cell["model"] == model
            and method in (None, cell["method"])
            and all(cell[k] == setting[k] for k in SETTING_KEYS)
        ):
            return cell
    return None


def measured_methods(report: dict[str, Any]) -> dict[str, str]:
    """The methods the check measured, name -> label, the reference first: the report's ``methods``, else the
    order in which its throughput cells name them."""
    if report.get("methods"):
        return dict(report["methods"])
    return {m: m for m in dict.fromkeys(c["method"] for c in report.get("throughput", []))}


def fastest_settings(throughput: list[dict[str, Any]], method: str) -> dict[str, dict[str, Any]]:
    """Per backbone, the measured cell of ``method`` (the reference) with the most training images/s."""
    best: dict[str, dict[str, Any]] = {}
    for cell in throughput:
        if cell.get("status") != "ok" or cell["method"] != method:
            continue
        if cell["model"] not in best or cell["train_images_per_s"] > best[cell["model"]]["train_images_per_s"]:
            best[cell["model"]] = cell
    return best


def run_seconds(recipe: RunRecipe, throughput: list[dict[str, Any]], setting: dict[str, Any]) -> float | str:
    """Seconds one run of ``recipe`` takes under ``setting``, or why it cannot be predicted.

    A model run forward only (``cost.forwards``) is priced at its evaluation images/s, whichever method was
    measured with it: evaluation runs the model alone.
    """
    if recipe.num_train is None or recipe.num_test is None:
        return f"dataset {recipe.dataset} has no num_train/num_test in its config"
    like = recipe.cost.like
    cell = _lookup(throughput, recipe.model, like, setting)
    if cell is None:
        return f"{recipe.model} / {like} not measured at {setting_label(setting)}"
    train = recipe.num_train * recipe.cost.steps / cell["train_images_per_s"]
    for model in recipe.cost.forwards:
        forward = _lookup(throughput, model, None, setting)
        if forward is None:
            return f"{model} (forward pass of {recipe.method}) not measured at {setting_label(setting)}"
        train += recipe.num_train / forward["eval_images_per_s"]
    evaluate = recipe.num_test / cell["eval_images_per_s"]
    return recipe.epochs * (train + evaluate)


def predict(
    recipes: list[RunRecipe], throughput: list[dict[str, Any]], reference: str | None = None
) -> dict[str, dict[str, Any]]:
    """Per experiment: its runs, and GPU-hours as configured and at each backbone's fastest measured setting.

    ``reference``: the method whose fastest cell sets a backbone's fastest setting (default: the first method
    the throughput cells name, :func:`measured_methods`). A cell that cannot be predicted is left out of the
    sum, with the reason listed (once per cell) under ``missing``.
    """
    reference = reference or next(iter(measured_methods({"throughput": throughput})), "")
    fastest = fastest_settings(throughput, reference)
    out: dict[str, dict[str, Any]] = {}
    for r in recipes:
        table = out.setdefault(
            r.experiment,
            {"runs": 0, "configured": {"hours": 0.0, "missing": []}, "fastest": {"hours": 0.0, "missing": []}},
        )
        table["runs"] += r.seeds
        configured = {k: getattr(r, k) for k in SETTING_KEYS}
        for name, setting in (("configured", configured), ("fastest", fastest.get(r.model))):
            seconds = run_seconds(r, throughput, setting) if setting else f"{r.model} not measured"
            if isinstance(seconds, str):
                table[name]["missing"].append(seconds)
            else:
                table[name]["hours"] += r.seeds * seconds / 3600
    return out


def overhead(throughput: list[dict[str, Any]], cell: dict[str, Any], method: str, reference: str) -> float | None:
    """``method``'s extra time per image over ``reference``'s at ``cell``'s backbone and setting, in percent."""
    setting = {k: cell[k] for k in SETTING_KEYS}
    base = _lookup(throughput, cell["model"], reference, setting)
    other = _lookup(throughput, cell["model"], method, setting)
    if not base or not other:
        return None
    return 100.0 * (base["train_images_per_s"] / other["train_images_per_s"] - 1.0)


def _num(value: float | None, fmt: str = ",.0f") -> str:
    return "—" if value is None else format(value, fmt)


def _hours(h: float) -> str:
    return f"{h:,.1f} h" if h >= 1 else f"{60 * h:.0f} min"


def _prediction_rows(report: dict[str, Any]) -> list[str]:
    rows = []
    fastest = fastest_settings(report["throughput"], next(iter(measured_methods(report)), ""))
    for experiment, p in report["predictions"].items():
        settings = "; ".join(
            f"{m}: {setting_label(c)}" for m, c in fastest.items() if m in {r["model"] for r in report["recipes"]}
        )

        def cell(side: dict[str, Any]) -> str:
            if side["missing"] and not side["hours"]:
                return "not measured"
            text = _hours(side["hours"])
            n = len(side["missing"])
            return text + (f" (+ {n} {'cell' if n == 1 else 'cells'} not measured)" if n else "")

        rows.append(
            f"| {experiment} | {p['runs']} | {cell(p['configured'])} | {cell(p['fastest'])} | "
            f"{_hours(p['fastest']['hours'] / 8) if p['fastest']['hours'] else '—'} | {settings or '—'} |"
        )
    return rows


def render(report: dict[str, Any]) -> str:
    """The Markdown report of one machine's check, from its measurement dict."""
    m = report["machine"]
    peak = m.get("peak_tflops")
    methods = measured_methods(report)  # the reference first, then the methods compared with it
    reference, reference_label = next(iter(methods.items()), ("", "the reference"))
    others = {name: label for name, label in methods.items() if name != reference}
    lines = [
        f"# GPU check: {m['gpu']}",
        "",
        f"Generated by `{report['command']}` on {report['date']} in {report['elapsed_s']:.0f} s; never edited by hand "
        "(rerun the check to update it). The figures hold for this machine only.",
    ]
    if steps := report.get("steps_s"):
        names = {"machine": "machine", "tests": "GPU tests", "end_to_end": "end to end", "throughput": "throughput"}
        spent = ", ".join(f"{names.get(k, k)} {v:.0f} s" for k, v in steps.items())
        budget = report.get("settings", {}).get("budget_s")
        lines += [
            "",
            f"Time{f' of the {budget:.0f} s budget' if budget else ''}: {spent} (the throughput gets what is left).",
        ]
    lines += [
        "",
        "## Machine",
        "",
        "| | |",
        "|---|---|",
        f"| GPU | {m['gpu']}, {m['memory_gib']:.1f} GiB, compute capability {m['capability']}, {m['sms']} SMs |",
        f"| driver / CUDA / cuDNN | {m['driver']} / {m['cuda']} / {m['cudnn']} |",
        f"| torch / Python | {m['torch']} / {m['python']} |",
        f"| suite | alr {m['version']} ({m['commit']}) |",
        f"| dense fp16/bf16 peak | {f'{peak:g} TFLOP/s' if peak else 'unknown (not in alr.flops.PEAK_TFLOPS)'} |",
        f"| fp32 matmuls / convolutions | {m['fp32_matmul']} / {m['fp32_conv']} |",
    ]
    lines += [f"| {name} | {state} |" for name, state in report["optional"].items()]
    t = report["tests"]
    lines += ["", "## GPU tests (`pytest -m gpu`)", "", t["summary"]]
    if t.get("checks"):
        lines += ["", "| check | test | result |", "|---|---|---|"]
        lines += [f"| {c['check']} | `{c['test']}` | {c['result']} |" for c in t["checks"]]
        lines.append("")
    lines += [f"- failed: `{name}`: {why}" for name, why in t.get("failures", [])]
    lines += [
        "",
        "## End to end: `python -m alr.train`, Table 1's composition on sample CIFAR-10 files",
        "",
        "| precision | result | final train loss | test acc (%) | seconds |",
        "|---|---|---|---|---|",
    ]
    for e in report["end_to_end"]:
        lines.append(
            f"| {e['precision']} | {e['status']} | {_num(e.get('final_loss'), '.4f')} | "
            f"{_num(e.get('test_acc'), '.2f')} | {_num(e.get('seconds'), '.1f')} |"
        )
    lines += [
        "",
        "## Training throughput through the trainer",
        "",
        "Steady state: images/s of each measured epoch after a warm-up epoch (cuDNN autotuning, compilation), "
        "the device synchronised at each epoch's end, as `metrics.jsonl` records `train/images_per_s`; the range "
        "is the slowest and fastest measured epoch. Synthetic on-device images (`dataset=synthetic`), the "
        "table's optimizer and batch size. Overhead: a method's time per image over "
        f"{reference_label}'s, same setting (the target for ALR's loss: docs/gpu-check.md). Of peak: training "
        "FLOPs per image × images/s ÷ the dense fp16/bf16 peak.",
        "",
        f"| backbone | input | batch | precision | memory format | mode | {reference_label} img/s | range | "
        + "".join(f"{label} img/s | {label} overhead | " for label in others.values())
        + "eval img/s | of peak |",
        "|---|---|---|---|---|---|---|---|" + "---|---|" * len(others) + "---|---|",
    ]
    flops = report.get("flops_per_image", {})
    for cell in report["throughput"]:
        if cell["method"] != reference:
            continue
        head = (
            f"| {cell['model']} | {cell['image_size']}² K={cell['num_classes']} | {cell['batch_size']} | "
            f"{cell['precision']} | {'channels_last' if cell['channels_last'] else 'contiguous'} | "
            f"{'compile' if cell['compile'] else 'eager'} | "
        )
        if cell["status"] != "ok":
            lines.append(head + cell["status"] + " |" * (4 + 2 * len(others)))
            continue
        ips = cell["train_images_per_s"]
        compared = ""
        for method in others:
            other = _lookup(report["throughput"], cell["model"], method, cell)
            extra = overhead(report["throughput"], cell, method, reference)
            compared += f"{_num(other['train_images_per_s']) if other else '—'} | "
            compared += f"{f'{extra:+.1f} %' if extra is not None else '—'} | "
        frac = f"{100 * flops[cell['model']] * ips / (peak * 1e12):.1f} %" if peak and cell["model"] in flops else "—"
        lines.append(
            head + f"{ips:,.0f} | {cell['range'][0]:,.0f}–{cell['range'][1]:,.0f} | "
            f"{compared}{cell['eval_images_per_s']:,.0f} | {frac} |"
        )
    if flops:
        lines += ["", "Training GFLOPs per image: " + ", ".join(f"{k} {v / 1e9:.2f}" for k, v in flops.items()) + "."]
    lines += ["", "## Fastest settings found", ""]
    best = fastest_settings(report["throughput"], reference)
    lines += [f"- {model}: {setting_label(c)} ({c['train_images_per_s']:,.0f} images/s)" for model, c in best.items()]
    if not best:
        lines.append("none measured")
    lines += [
        "",
        "## Predicted GPU-hours per table on this machine",
        "",
        "Each table's grid from `configs/experiment/<table>.yaml` (its cells × seeds; epochs, batch size and "
        "data set sizes from the composed configs): Σ epochs × (train images ÷ train images/s + test images ÷ "
        "eval images/s). As configured: the precision, memory format and compile setting the table's runs use "
        "now; fastest: each backbone's fastest setting above (a different precision changes the numerics: check "
        "before adopting it). With N GPUs (`GPUS=0,1,...`), the wall time is about the GPU-hours ÷ N.",
        "",
        "| table | runs | GPU-hours as configured | GPU-hours at the fastest settings | wall time on 8 GPUs "
        "(fastest) | fastest settings used |",
        "|---|---|---|---|---|---|",
        *_prediction_rows(report),
    ]
    missing = [
        f"- {exp}, {side.replace('configured', 'as configured')}: {reason} ({n} {'cell' if n == 1 else 'cells'})"
        for exp, p in report["predictions"].items()
        for side in ("configured", "fastest")
        for reason, n in sorted(Counter(p[side]["missing"]).items())
    ]
    if missing:
        lines += ["", "Cells left out of the sums:", "", *missing]
    if report.get("skipped_experiments"):
        lines += ["", "Not predicted: " + "; ".join(report["skipped_experiments"]) + "."]
    return "\n".join(lines) + "\n"


def table_recipes(experiment: str, overrides: Sequence[str] = ()) -> list[RunRecipe]:
    """The cells of ``experiment``'s grid (:func:`~alr.reporting.grid.expected_grid`), each as its config trains it,
    with its method's ``cost``. ``overrides`` go into every composition (``hydra.searchpath=...``).

    Each cell is composed as ``experiment=<name> dataset=<d> model=<m> method=<k>``: the data set and method
    options are named as their ``name`` fields are, which holds for every config of the suite.
    """
    grid = expected_grid(experiment, overrides)
    recipes = []
    for dataset, model, method in grid.cells:
        cfg = compose(
            [*overrides, f"experiment={experiment}", f"dataset={dataset}", f"model={model}", f"method={method}"]
        )
        t, d = cfg.trainer, cfg.dataset
        recipes.append(
            RunRecipe(
                experiment=experiment,
                dataset=dataset,
                model=model,
                method=method,
                seeds=len(grid.seeds),
                epochs=int(t.epochs),
                batch_size=int(t.batch_size),
                num_train=d.get("num_train"),
                num_test=d.get("num_test"),
                precision=str(t.precision),
                channels_last=t.channels_last in ("cuda", True),  # on a GPU: trainer.channels_last_on
                compile=bool(t.compile),
                cost=Cost.from_config(cfg.method.cost),
            )
        )
    return recipes
