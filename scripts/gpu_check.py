"""``make gpu-check``: first make sure the packages the check needs import, then run ``alr.gpu_check``.

A fresh GPU node often has PyTorch and little else. This launcher uses the standard library alone
to try each package the check needs, so that a missing one gives one line naming it and how to
install it (also without a network) instead of a traceback; then it runs ``python -m alr.gpu_check``
with the same arguments, from this checkout's ``src/``. pytest is one of them: without it step 2's checks
(the CUDA resume, the host-sync checks) cannot run, and a check that did not run must not pass. The
check's time budget counts from this script's start.

    python scripts/gpu_check.py [--budget SECONDS] [--out results/gpu] ...
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()  # the check's clock: its budget includes the imports of torch, Hydra and the suite
ROOT = Path(__file__).resolve().parents[1]
# import name -> the package to install. Hydra needs antlr4-python3-runtime 4.9.x exactly.
REQUIRED = {
    "torch": "torch (with CUDA: https://pytorch.org/get-started/locally/)",
    "torchvision": "torchvision (the one built for your torch)",
    "numpy": "numpy",
    "yaml": "pyyaml",
    "tqdm": "tqdm",
    "sklearn": "scikit-learn",
    "antlr4": "antlr4-python3-runtime==4.9.3",
    "omegaconf": "omegaconf>=2.3,<2.4",
    "hydra": "hydra-core>=1.3,<1.4",
    "pytest": "pytest>=8",  # step 2 runs pytest -m gpu
}
OFFLINE = (
    "Without a network: on a machine with one, `make gpu-wheels` saves these wheels into .whl/; copy the "
    "folder over and run `python -m pip install --no-index --find-links .whl hydra-core omegaconf "
    "antlr4-python3-runtime pytest` (docs/gpu-check.md)."
)


def missing_packages() -> list[tuple[str, str, str]]:
    """``(import name, package, why)`` for every required package that does not import."""
    out = []
    for module, package in REQUIRED.items():
        try:
            importlib.import_module(module)
        except Exception as e:  # ImportError, or a broken install failing on import
            out.append((module, package, f"{type(e).__name__}: {e}"))
    return out


def main(argv: list[str] | None = None) -> int:
    missing = missing_packages()
    if missing:
        names = ", ".join(f"{package} (import {module}: {why})" for module, package, why in missing)
        install = " ".join(f"'{package.split(' ')[0]}'" for _, package, _ in missing)
        print(
            f"error: the GPU check needs {names}. Install with: python -m pip install {install}. {OFFLINE}",
            file=sys.stderr,
        )
        return 2
    sys.path.insert(0, str(ROOT / "src"))  # this checkout's package, whatever is installed (as the benches do)
    from alr.gpu_check import main as check

    return check(argv, started=STARTED)


if __name__ == "__main__":
    sys.exit(main())
