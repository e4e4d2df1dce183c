"""Run directories record how they were made: command, config, versions, seed."""

from __future__ import annotations

import json
import platform
import sys
import time
from importlib import metadata
from pathlib import Path

TRACKED = ("lmmscope", "torch", "transformers", "nnsight", "transformer-lens", "sae-lens", "h5py", "numpy")


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in TRACKED:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def write_run_info(run_dir: str | Path, info: dict, name: str = "run.json") -> Path:
    """Write `info` plus versions and a timestamp to run_dir/name."""
    path = Path(run_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**info, "versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "argv": sys.argv}
    path.write_text(json.dumps(record, indent=1, default=str))
    return path
