"""Drive the app in a real browser: serve a run directory with `streamlit run` on a free local port,
open pages in Debian's Chromium through Playwright, wait until they have rendered, screenshot them.

Used by the end-to-end test (tests/test_app_browser.py) and to refresh the README's screenshots:

    python -m app.browser runs/demo docs/images          # overview and feature page PNGs

Chromium comes from Debian (scripts/install_browser.sh), never from `playwright install`.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextmanager
def serve(run_dir: str | Path, port: int | None = None, host: str = "127.0.0.1", timeout: float = 90) -> Iterator[str]:
    """The app on `run_dir`, served in a subprocess for the duration of the block; yields its base URL."""
    from app.commands import streamlit_command

    port = port or free_port(host)
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", prefix="lmmscope-app-")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    env.pop("LMMSCOPE_RUN_DIR", None)  # the command line names the run directory
    proc = subprocess.Popen(streamlit_command(str(run_dir), host, port), stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://{host}:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                log.seek(0)
                raise RuntimeError(f"the app did not start on {url}:\n{log.read()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def chromium_missing() -> str | None:
    """Why the browser cannot run here (None when it can)."""
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} is missing: run scripts/install_browser.sh (Debian's chromium package)"
    import importlib.util

    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright==1.65.2; never `playwright install`)"
    return None


@contextmanager
def browser(width: int = 1400, height: int = 1000) -> Iterator:
    """A Playwright page in Debian's Chromium with a fresh profile."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="lmmscope-chromium-") as profile, sync_playwright() as p:
        ctx = p.chromium.launch_persistent_context(profile, executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                                   headless=True, viewport={"width": width, "height": height})
        try:
            yield ctx.pages[0] if ctx.pages else ctx.new_page()
        finally:
            ctx.close()


def open_page(page, url: str, wait_for: tuple[str, ...] = (), timeout: float = 90) -> None:
    """Go to `url` and wait until the script run has finished and every `wait_for` selector is visible."""
    page.goto(url, timeout=timeout * 1000)
    page.wait_for_selector("[data-testid='stApp']", timeout=timeout * 1000)
    for selector in wait_for:
        page.wait_for_selector(selector, state="visible", timeout=timeout * 1000)
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')",
                           timeout=timeout * 1000)
    # an <img> whose src is not set yet also reads complete (width 0): wait for pixels, which a broken image never has
    page.wait_for_function("() => Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)",
                           timeout=timeout * 1000)
    page.wait_for_timeout(500)  # plotly's first layout pass


IMAGES = "[data-testid='stImage'] img"
PLOTLY = ".js-plotly-plot"


def screenshots(run_dir: str | Path, out_dir: str | Path, feature: int | None = None) -> list[Path]:
    """overview.png and feature.png of the app on `run_dir` (feature: the run's first recovered feature)."""
    from interp.infra.layout import RunLayout
    from interp.shapes.concepts import load_recovery

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if feature is None:
        recovery = RunLayout.of(run_dir).recovery
        feature = load_recovery(recovery).concepts[0].feature if recovery.exists() else 0
    shots = [("", (PLOTLY,), out / "app-overview.png"),
             (f"feature?feature={feature}", (IMAGES, PLOTLY), out / "app-feature.png")]
    with serve(run_dir) as url, browser() as page:
        for path, wait, png in shots:
            page.set_viewport_size({"width": 1400, "height": 1000})
            open_page(page, f"{url}/{path}", wait)
            full = page.evaluate("() => document.querySelector(\"[data-testid='stMain']\").scrollHeight")
            page.set_viewport_size({"width": 1400, "height": min(int(full) + 40, 6000)})  # the page scrolls inside
            page.wait_for_timeout(1000)
            page.screenshot(path=str(png))
    return [png for *_, png in shots]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="screenshots of the app's overview and feature page")
    p.add_argument("run", help="run directory")
    p.add_argument("out", help="directory for the PNGs (e.g. docs/images)")
    p.add_argument("--feature", type=int, default=None, help="feature page to capture (default: first recovered)")
    args = p.parse_args(argv)
    reason = chromium_missing()
    if reason:
        raise SystemExit(reason)
    for path in screenshots(args.run, args.out, args.feature):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
