"""Where the suite's configs live, and composing one the way the entry point ``python -m alr.train`` does."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


def compose(overrides: Iterable[str] = (), keep_hydra: bool = False) -> DictConfig:
    """``configs/train.yaml`` composed with ``overrides``, with Hydra's runtime values set as in a run (so
    ``${hydra:runtime.choices.model}`` resolves). The ``hydra`` node is dropped, as the entry point's config
    has none, unless ``keep_hydra`` (the sweeper's parameters of an experiment's grid live there)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    if not keep_hydra:
        with open_dict(cfg):
            del cfg["hydra"]
    GlobalHydra.instance().clear()
    return cfg
