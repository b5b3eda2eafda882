"""Every config in configs/ composes, and the model is built with the data set's class count."""

from __future__ import annotations

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import OmegaConf

from alr.config_check import ConfigError, validate
from conftest import CONFIGS, compose

GROUPS = ["dataset", "model", "method", "optim", "trainer", "logger", "paths"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


TEXT_DATASETS = ("ag_news", "yahoo_answers", "yelp_full", "text_csv")
TEXT_MODELS = ("fasttext", "textrnn", "textrcnn", "charcnn", "transformer")


def _partners(group: str, option: str) -> list[str]:
    """What an option needs beside it: text data sets go with text models (Table 3), and back."""
    if group == "dataset" and option in TEXT_DATASETS:
        own = ["dataset.folder=mine", "dataset.num_classes=3"] if option == "text_csv" else []
        return ["model=textrnn", *own]
    if group == "model" and option in TEXT_MODELS:
        return ["dataset=ag_news"]
    return []


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_group_option_composes(group: str, option: str):
    cfg = compose(f"{group}={option}", *_partners(group, option))
    OmegaConf.resolve(cfg)
    validate(cfg)


@pytest.mark.parametrize("name", _options("experiment"))
def test_every_experiment_composes(name: str):
    cfg = compose(f"experiment={name}")
    OmegaConf.resolve(cfg)
    validate(cfg)
    assert cfg.experiment_name == name


@pytest.mark.parametrize("name", _options("debug"))
def test_every_debug_config_composes(name: str):
    validate(compose(f"debug={name}"))


@pytest.mark.parametrize("name", _options("debug"))
def test_a_debug_config_logs_nothing_unless_the_command_line_says_logger_wandb(name: str):
    assert compose(f"debug={name}").logger.name == "none"
    assert compose("logger=wandb", f"debug={name}").logger.name == "wandb"
    assert compose(f"debug={name}", "logger=wandb").logger.name == "wandb"


@pytest.mark.parametrize("dataset", _options("dataset"))
def test_model_is_built_with_the_dataset_class_count(dataset: str):
    cfg = compose(f"dataset={dataset}", "model=digits_cnn", *_partners("dataset", dataset))
    model = instantiate(cfg.model)
    assert model.head[-1].out_features == cfg.dataset.num_classes


@pytest.mark.parametrize(
    "method,smoothing,extra", [("baseline", 0.0, 0), ("slr", 0.1, 0), ("alr", 0.0, 90), ("alr_s", 0.1, 90)]
)
def test_methods_compose_to_their_losses(method: str, smoothing: float, extra: int):
    cfg = compose(f"method={method}")
    module = instantiate(cfg.method.module)
    assert module.criterion.label_smoothing == smoothing
    assert sum(p.numel() for p in module.parameters()) == extra


def test_run_name_and_folders():
    cfg = compose("method=alr_s", "seed=3")
    assert cfg.run_name == "digits-digits_cnn-alr_s-s3"
    assert HydraConfig.get().run.dir == "runs/default/digits-digits_cnn-alr_s-s3"


@pytest.mark.parametrize(
    "override,key",
    [
        ("trainer.epochs=-1", "trainer.epochs"),
        ("trainer.epochs=0", "trainer.epochs"),
        ("trainer.batch_size=0", "trainer.batch_size"),
        ("trainer.precision=fp8", "trainer.precision"),
        ("trainer.device=tpu", "trainer.device"),
        ("seed=-2", "seed"),
        ("method.label=", "method.label"),
        ("method.cost.steps=0", "method.cost.steps"),
        ("~method.cost", "method.cost"),
        ("config_version=0", "config_version"),
    ],
)
def test_bad_values_name_the_key(override: str, key: str):
    with pytest.raises(ConfigError) as err:
        validate(compose(override))
    assert err.value.key == key
    assert f"'{key}'" in str(err.value)
