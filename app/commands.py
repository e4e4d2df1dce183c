"""`interp app RUN_DIR`: the feature browser, `streamlit run app/main.py -- RUN_DIR` in a subprocess."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from interp.infra.cli_config import Command, positional

MAIN = Path(__file__).with_name("main.py")


def streamlit_command(run_dir: str, host: str = "127.0.0.1", port: int = 8501, browser: bool = False) -> list[str]:
    """The `streamlit run` command line for a run directory."""
    return [sys.executable, "-m", "streamlit", "run", str(MAIN),
            "--server.headless", "false" if browser else "true",
            "--server.address", host, "--server.port", str(port),
            "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
            "--client.toolbarMode", "minimal",
            "--", str(run_dir)]


@dataclass
class AppConfig:
    """`interp app`: the feature browser on one run directory."""

    run: str | None = field(default=None, metadata=positional())
    """run directory (made by `interp demo` or the stages one by one)"""
    host: str = "127.0.0.1"
    """address to listen on (0.0.0.0 to serve other machines)"""
    port: int = 8501
    """port to listen on"""
    browser: bool = False
    """open a browser tab (otherwise a headless server)"""


def run_app(cfg: AppConfig) -> int:
    run = Path(cfg.run)
    if not run.is_dir():
        raise FileNotFoundError(f"no run directory at {run}: make one with `interp demo {run}`")
    print(f"lmmscope app on {run} at http://{cfg.host}:{cfg.port}  (Ctrl+C to stop)", flush=True)
    try:
        return subprocess.call(streamlit_command(str(run.resolve()), cfg.host, cfg.port, cfg.browser))
    except KeyboardInterrupt:
        return 0


COMMANDS = [Command("app", AppConfig, run_app, "browse a run's features in a Streamlit app",
                    "Overview, feature list, feature pages, sample explorer and steering playground for one run "
                    "directory (made by `interp demo` or the stages one by one).", report=lambda code, cfg: code)]
