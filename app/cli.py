"""`interp app RUN_DIR`: the feature browser, `streamlit run app/main.py -- RUN_DIR` in a subprocess."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

MAIN = Path(__file__).with_name("main.py")


def streamlit_command(run_dir: str, host: str = "127.0.0.1", port: int = 8501, browser: bool = False) -> list[str]:
    """The `streamlit run` command line for a run directory."""
    return [sys.executable, "-m", "streamlit", "run", str(MAIN),
            "--server.headless", "false" if browser else "true",
            "--server.address", host, "--server.port", str(port),
            "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none",
            "--client.toolbarMode", "minimal",
            "--", str(run_dir)]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("app", help="browse a run's features in a Streamlit app",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="Overview, feature list, feature pages, image explorer and steering playground "
                                   "for one run directory (made by `interp demo` or the stages one by one).")
    p.add_argument("run", help="run directory (features.h5, activations.h5, sae/, eval/, ... as the stages write them)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 to serve other machines)")
    p.add_argument("--port", type=int, default=8501, help="port to listen on")
    p.add_argument("--browser", action="store_true", help="open a browser tab (default: headless server)")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    run = Path(args.run)
    if not run.is_dir():
        raise FileNotFoundError(f"no run directory at {run}: make one with `interp demo --out {run}`")
    print(f"lmmscope app on {run} at http://{args.host}:{args.port}  (Ctrl+C to stop)", flush=True)
    try:
        return subprocess.call(streamlit_command(str(run.resolve()), args.host, args.port, args.browser))
    except KeyboardInterrupt:
        return 0
