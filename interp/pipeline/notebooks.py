"""`interp notebooks RUN`: executed copies of the analysis notebooks, with their outputs, in the run.

The notebooks in notebooks/ are stored without outputs and read their run from $LMMSCOPE_RUN. This
runs each one top to bottom on RUN (nbclient, in a kernel of this interpreter) and writes the executed
copy, every figure and table included, to RUN/notebooks/NAME.ipynb (RunLayout.notebook), so a run
directory can be handed on with its analysis already done. A notebook ends with assertions about the
run; one that fails is reported by its cell's error and the others still run. `interp demo
--notebooks` does the same after the demo's stages.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from interp.infra.cli_config import Command, at_least, choices, positional
from interp.infra.layout import RunLayout

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"  # in the source tree (not packaged)
NAMES = ("tour", "steering", "recovery_vs_width")
KERNEL = "lmmscope-notebooks"


@dataclass
class NotebooksConfig:
    """`interp notebooks`: run the analysis notebooks on a run directory and keep the executed copies."""

    run: str | None = field(default=None, metadata=positional())
    """run directory (made by `interp demo`): the notebooks read it, the copies go to RUN/notebooks/"""
    names: tuple[str, ...] = field(default=NAMES, metadata=choices(list(NAMES)))
    """notebooks to run"""
    timeout: int = field(default=1800, metadata=at_least(1))
    """seconds a cell may take (recovery_vs_width trains 4 SAEs in one cell)"""


@dataclass
class NotebookResult:
    name: str
    path: Path | None  # the executed copy (also written when a cell failed: its outputs up to the error)
    seconds: float
    error: str | None = None  # the failing cell's error, one line


@contextlib.contextmanager
def _this_interpreter() -> Iterator[str]:
    """A kernelspec that starts this interpreter, first on JUPYTER_PATH for the duration (so the notebooks
    see this environment whatever other kernels the machine has)."""
    from ipykernel.kernelspec import install

    saved = os.environ.get("JUPYTER_PATH")
    with tempfile.TemporaryDirectory(prefix="lmmscope-kernel-") as prefix:
        install(kernel_name=KERNEL, display_name="lmmscope", prefix=prefix)
        os.environ["JUPYTER_PATH"] = os.pathsep.join([str(Path(prefix) / "share" / "jupyter"), *filter(None, [saved])])
        try:
            yield KERNEL
        finally:
            if saved is None:
                os.environ.pop("JUPYTER_PATH", None)
            else:
                os.environ["JUPYTER_PATH"] = saved


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def execute_notebooks(cfg: NotebooksConfig) -> list[NotebookResult]:
    """Run each notebook of `cfg.names` on `cfg.run` and write RUN/notebooks/NAME.ipynb with its outputs."""
    try:
        import nbclient
        import nbformat
    except ImportError as e:
        raise ValueError(f"running the notebooks needs nbclient, nbformat and ipykernel ({e}): "
                         "pip install -e '.[test]' or nbclient ipykernel nbformat pandas") from None
    layout = RunLayout.of(cfg.run)
    if not layout.cache.exists():
        raise FileNotFoundError(f"no activation cache at {layout.cache}: the notebooks read a run made by "
                                f"`interp demo {layout.root}`")
    missing = [n for n in cfg.names if not (NOTEBOOKS / f"{n}.ipynb").exists()]
    if missing:
        raise FileNotFoundError(f"no notebook {', '.join(missing)} in {NOTEBOOKS}: the notebooks live in the source "
                                "tree; run from a checkout of lmmscope")
    from interp.infra.durable import publishing

    results = []
    run = str(layout.root.resolve())
    with _this_interpreter() as kernel, _env(LMMSCOPE_RUN=run, LMMSCOPE_OUT=str(layout.root.resolve() / "notebooks")):
        os.environ.pop("LMMSCOPE_SWEEP", None)  # each notebook runs its own analysis on this run
        for name in cfg.names:
            nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
            client = nbclient.NotebookClient(nb, kernel_name=kernel, timeout=cfg.timeout,
                                             resources={"metadata": {"path": str(NOTEBOOKS)}})
            t0, error = time.time(), None
            try:
                client.execute()
            except nbclient.exceptions.CellExecutionError as e:
                lines = [ln for ln in re.sub(r"\x1b\[[0-9;]*m", "", str(e)).splitlines() if ln.strip()]
                error = lines[-1] if lines else type(e).__name__
            nb.metadata.setdefault("lmmscope", {}).update(run=run, executed=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                                          error=error)
            out = layout.notebook(name)
            with publishing(out) as tmp:
                nbformat.write(nb, str(tmp))
            results.append(NotebookResult(name, out, round(time.time() - t0, 1), error))
            print(f"{name}.ipynb: {'failed: ' + error if error else 'ran'} in {results[-1].seconds:.0f} s -> {out}",
                  flush=True)
    return results


def _report(results: list[NotebookResult], cfg: NotebooksConfig) -> int:
    failed = [r for r in results if r.error]
    if failed:
        print(f"{len(failed)} of {len(results)} notebooks failed: {', '.join(r.name for r in failed)} (their executed "
              "copies hold the outputs up to the failing cell)", file=sys.stderr)
    return 1 if failed else 0


COMMANDS = [Command("notebooks", NotebooksConfig, execute_notebooks,
                    "run the analysis notebooks on a run and keep the executed copies in RUN/notebooks/",
                    report=_report)]
