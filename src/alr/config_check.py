"""Checks of a composed config, so a typo fails at once with the key and what to do."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf

from alr import CONFIG_VERSION

PRECISIONS = ("fp32", "bf16", "fp16")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and how to fix it."""

    def __init__(self, key: str, problem: str, fix: str) -> None:
        super().__init__(f"config key '{key}': {problem}. {fix}")
        self.key = key


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def validate(cfg: DictConfig) -> None:
    """Raise :class:`ConfigError` for the first value that cannot work."""
    for key in cfg.dataset:
        if OmegaConf.is_missing(cfg.dataset, key):
            raise ConfigError(f"dataset.{key}", "has no value", f"Set dataset.{key}=... (see configs/dataset/).")
    t = cfg.trainer
    for key in ("epochs", "batch_size"):
        if not _positive_int(t[key]):
            raise ConfigError(f"trainer.{key}", f"must be an integer >= 1, got {t[key]!r}", f"Set trainer.{key}=N.")
    for key in ("limit_train_batches", "limit_test_batches", "snapshot_every", "log_every"):
        if t[key] is not None and not _positive_int(t[key]):
            raise ConfigError(f"trainer.{key}", f"must be null or an integer >= 1, got {t[key]!r}", "")
    if t.precision not in PRECISIONS:
        raise ConfigError(
            "trainer.precision", f"unknown precision {t.precision!r}", f"Use one of {', '.join(PRECISIONS)}."
        )
    device = str(t.device)
    if device not in ("auto", "cpu", "mps") and not device.startswith("cuda"):
        raise ConfigError("trainer.device", f"unknown device {device!r}", "Use auto, cpu, cuda or cuda:N.")
    if not isinstance(cfg.seed, int) or isinstance(cfg.seed, bool) or cfg.seed < 0:
        raise ConfigError("seed", f"must be a non-negative integer, got {cfg.seed!r}", "Set seed=N.")
    _check_method(cfg.method)
    if not _positive_int(cfg.dataset.num_classes) or cfg.dataset.num_classes < 2:
        raise ConfigError("dataset.num_classes", f"must be an integer >= 2, got {cfg.dataset.num_classes!r}", "")
    _check_text(cfg)
    if cfg.get("shard") is not None:
        parse_shard(cfg.shard)
    if cfg.get("config_version") != CONFIG_VERSION:
        raise ConfigError(
            "config_version",
            f"this config is version {cfg.get('config_version')!r}, the suite reads version {CONFIG_VERSION}",
            "Recompose the run from this version's configs/ (python -m alr.train ...).",
        )


def _check_method(method: DictConfig) -> None:
    """What every method config declares (docs/development.md#how-a-method-joins): a name, a label, the module
    the trainer builds, and what one training step runs."""
    fix = "Every file of configs/method/ sets name, label, module._target_ and cost (see configs/method/baseline.yaml)."
    for key in ("name", "label"):
        if not isinstance(method.get(key), str) or not method.get(key):
            raise ConfigError(f"method.{key}", f"must be a non-empty string, got {method.get(key)!r}", fix)
    if not isinstance(method.get("module"), DictConfig) or "_target_" not in method.module:
        raise ConfigError("method.module._target_", "is not set", fix)
    cost = method.get("cost")
    if not isinstance(cost, DictConfig) or set(cost) != {"like", "steps", "forwards"}:
        raise ConfigError("method.cost", f"must hold like, steps and forwards, got {cost!r}", fix)
    if not isinstance(cost.steps, (int, float)) or isinstance(cost.steps, bool) or cost.steps <= 0:
        raise ConfigError("method.cost.steps", f"must be a number > 0, got {cost.steps!r}", fix)


def _check_text(cfg: DictConfig) -> None:
    """Text models go with text data sets (Table 3), CharCNN with characters, the others with words."""
    target = str(cfg.model.get("_target_", ""))
    text_model = target.startswith("alr.models.text.")
    text_data = cfg.dataset.get("build", {}).get("_target_") == "alr.data.text.build"
    if text_model != text_data:
        kinds = {True: "text", False: "images"}
        raise ConfigError(
            "model",
            f"{target.rsplit('.', 1)[-1]} reads {kinds[text_model]} but dataset={cfg.dataset.name} holds "
            f"{kinds[text_data]}",
            "Use the text models (fasttext, textrnn, textrcnn, charcnn, transformer) with dataset=ag_news, text_csv, "
            "yahoo_answers or yelp_full, and the image models with the image data sets.",
        )
    if text_model:
        wanted = "char" if target.endswith(".CharCNN") else "word"
        if cfg.dataset.encoding != wanted:
            raise ConfigError(
                "dataset.encoding",
                f"{target.rsplit('.', 1)[-1]} reads {wanted} ids, not {cfg.dataset.encoding!r}",
                f"Leave dataset.encoding out (model=charcnn sets char, the word models word) or set {wanted}.",
            )


def parse_shard(value: Any) -> tuple[int, int]:
    """``"i/n"`` as ``(i, n)`` with ``0 <= i < n``; a :class:`ConfigError` naming ``shard`` otherwise."""
    try:
        index, count = (int(part) for part in str(value).split("/"))
    except ValueError:
        index, count = -1, 0
    if not 0 <= index < count:
        raise ConfigError(
            "shard", f"must be 'i/n' with 0 <= i < n, got {value!r}", "For 4 GPUs: shard=0/4 ... shard=3/4."
        )
    return index, count


def excluded(cfg: DictConfig, choices: Any) -> bool:
    """Whether the composition (Hydra's ``runtime.choices``) is a cell the experiment's ``grid_exclude``
    leaves out of its sweep's product (Table 4: KD of a WRN-28-10 from a WRN-28-10 teacher)."""
    for cell in cfg.get("grid_exclude") or []:
        if all(str(choices.get(key)) == str(value) for key, value in cell.items()):
            return True
    return False
