"""Run records: how each stage that wrote into a run directory was run (command, config, versions,
seed, argv, time), at RunLayout.run_info(stage); the package versions that caches and SAEs record."""

from __future__ import annotations

import platform
import sys
import time
from importlib import metadata
from pathlib import Path

from interp.infra.durable import write_json

TRACKED = ("lmmscope", "torch", "transformers", "nnsight", "transformer-lens", "sae-lens", "h5py", "numpy")


def versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in TRACKED:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def write_run_info(path: str | Path, info: dict) -> Path:
    """Write `info` plus versions, argv and a timestamp to `path` (a RunLayout.run_info file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {**info, "versions": versions(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
              "argv": sys.argv}
    write_json(path, record, indent=1, default=str)
    return path
