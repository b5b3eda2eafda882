"""Upload the W&B runs written offline: ``python -m alr.wandb_sync --runs runs`` (``make wandb-sync``).

Runs without credentials write their W&B data offline into ``<run folder>/wandb/offline-run-*``; this
finds those not yet uploaded and hands them to ``wandb sync``, which replays a resumed run's logs in order
into the one W&B run (the id kept in ``wandb_id.txt``).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from alr.loggers import has_credentials


def unsynced(root: Path) -> list[Path]:
    """Offline W&B run folders under ``root`` whose transaction log has no ``.wandb.synced`` marker."""
    return sorted(
        log.parent for log in root.rglob("offline-run-*/run-*.wandb") if not log.with_suffix(".wandb.synced").exists()
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m alr.wandb_sync", description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs"), help="root of the run folders")
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded")
    args = parser.parse_args(argv)
    folders = unsynced(args.runs)
    if not folders:
        print(f"nothing to sync: no offline W&B runs under {args.runs} that are not uploaded yet")
        return 0
    print(f"{len(folders)} offline W&B run(s) under {args.runs} to upload")
    if args.dry_run:
        print("\n".join(f"  {f}" for f in folders))
        return 0
    if not has_credentials():
        print(
            "error: no W&B credentials. Run `wandb login` (or set WANDB_API_KEY), then `make wandb-sync` again.",
            file=sys.stderr,
        )
        return 1
    cmd = [sys.executable, "-m", "wandb", "sync", "--yes", *map(str, folders)]
    return subprocess.run(cmd).returncode


if __name__ == "__main__":
    sys.exit(main())
