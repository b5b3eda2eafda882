"""Entry point: ``python -m alr.train [overrides]`` (Hydra; ``-m`` for a multirun sweep)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from alr.checkpoint import write_json
from alr.config import CONFIG_DIR
from alr.config_check import ConfigError, excluded, parse_shard, validate
from alr.distributed import is_main
from alr.errors import Refused, RunError
from alr.preempt import Interrupted
from alr.run_folder import prepare_run_dir
from alr.sweep import REFUSED
from alr.trainer import NonFiniteLossError, fit


class CheckOutputDir(Callback):
    """Refuse an unwritable run (or sweep) folder with one line, before Hydra itself fails on it with a traceback."""

    def _check(self, config: DictConfig, key: str) -> None:
        HydraConfig.instance().set_config(config)  # so that ${hydra:...} in the folder's name resolves
        try:
            prepare_run_dir(Path(str(config.hydra[key].dir)))
        except RunError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(1)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "run")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config, "sweep")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        validate(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    multirun = HydraConfig.get().mode.name == "MULTIRUN"
    if excluded(cfg, HydraConfig.get().runtime.choices):
        if multirun:
            return None  # a cell of the sweep's product that is not in the table
        print(
            f"error: {cfg.run_name} is not a cell of experiment {cfg.experiment_name} (its grid_exclude leaves it "
            "out of the table). Choose another model= or method=.",
            file=sys.stderr,
        )
        sys.exit(2)
    if cfg.shard is not None and multirun:
        index, count = parse_shard(cfg.shard)
        if HydraConfig.get().job.num % count != index:
            return None  # another shard's job
    try:
        result = fit(cfg, run_dir)
    except NonFiniteLossError as e:
        if is_main():  # under several processes, rank 0 writes the run folder
            write_json({"status": "failed", "error": str(e)}, run_dir / "result.json")
        print(f"error: {run_dir}: {e}", file=sys.stderr)
        if multirun:
            return None  # the sweep goes on with the other jobs; the tables show this cell as failed
        sys.exit(1)
    except Refused as e:  # nothing written: another config's folder, a KD teacher not finished; a sweep goes on
        print(f"error: {e}", file=sys.stderr)
        if multirun:
            REFUSED.append(str(e))  # ExitOnRefused names them when the sweep ends
            return None
        sys.exit(1)
    except RunError as e:  # bad data, checkpoint, run folder, full disk: nothing was written over
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as e:  # a stop signal: last.pt is written; requeue (submitit) or exit
        print(f"[alr] {cfg.run_name}: {e}; rerun the same command to resume", file=sys.stderr)
        e.hand_over(lead_s=OmegaConf.select(HydraConfig.get(), "launcher.signal_delay_s", default=0))
    print(
        f"[alr] {cfg.run_name}: test accuracy {result['final_test_acc']:.2f}% after {result['epochs']} epochs "
        f"(best {result['best_test_acc']:.2f}% at epoch {result['best_epoch']}) -> {run_dir}"
    )
    return result["final_test_acc"]


if __name__ == "__main__":
    main()
