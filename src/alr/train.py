"""Entry point: ``python -m alr.train [overrides]`` (Hydra; ``-m`` for a multirun sweep)."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from alr.checkpoint import write_json
from alr.config_check import ConfigError, validate
from alr.errors import RunError
from alr.preempt import Interrupted
from alr.trainer import NonFiniteLossError, fit

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        validate(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    try:
        result = fit(cfg, run_dir)
    except NonFiniteLossError as e:
        write_json({"status": "failed", "error": str(e)}, run_dir / "result.json")
        print(f"error: {run_dir}: {e}", file=sys.stderr)
        if HydraConfig.get().mode.name == "MULTIRUN":
            return None  # the sweep goes on with the other jobs; the tables show this cell as failed
        sys.exit(1)
    except RunError as e:  # bad data, checkpoint, run folder, full disk: nothing was written over
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Interrupted as e:  # a stop signal: last.pt is written; requeue (submitit) or exit
        print(f"[alr] {cfg.run_name}: {e}; rerun the same command to resume", file=sys.stderr)
        e.hand_over()
    print(
        f"[alr] {cfg.run_name}: test accuracy {result['final_test_acc']:.2f}% after {result['epochs']} epochs "
        f"(best {result['best_test_acc']:.2f}% at epoch {result['best_epoch']}) -> {run_dir}"
    )
    return result["final_test_acc"]


if __name__ == "__main__":
    main()
