"""The analysis notebooks in notebooks/ run top to bottom (nbclient) on a small run of `interp demo`.

Each notebook ends with assertions about the run (the best-recovered concept's feature has that concept in its
top images and under its most active patch, the steering sweep changes answers more and moves the answer
distribution further as the clamp grows, FVU falls with k over the width × k grid), so a notebook that runs but
shows the wrong thing fails here too. The kernel is this interpreter's (a kernelspec written for sys.executable and
put first on JUPYTER_PATH), and it runs in notebooks/ as Jupyter would.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = ("tour", "steering", "recovery_vs_width")
KERNEL = "lmmscope-notebook-test"


def _read(name: str):
    nbformat = pytest.importorskip("nbformat")
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_clean(name):
    """Valid nbformat, no stored outputs, reads its run from LMMSCOPE_RUN, and checks something at the end."""
    import nbformat

    nb = _read(name)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    for i, cell in enumerate(code):
        assert not cell.outputs and cell.execution_count is None, f"{name}.ipynb code cell {i} has stored outputs"
    assert "LMMSCOPE_RUN" in code[0].source
    assert "assert " in code[-1].source and "all checks passed" in code[-1].source


@pytest.fixture(scope="session")
def jupyter_path(tmp_path_factory) -> Path:
    """A directory with a kernelspec that starts this interpreter (so the notebooks see this environment)."""
    pytest.importorskip("ipykernel")
    from ipykernel.kernelspec import install

    prefix = tmp_path_factory.mktemp("jupyter")
    install(kernel_name=KERNEL, display_name="lmmscope (tests)", prefix=str(prefix))
    spec = prefix / "share" / "jupyter" / "kernels" / KERNEL / "kernel.json"
    assert sys.executable in spec.read_text()
    return prefix / "share" / "jupyter"


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the first one also makes the small demo run: minutes more on a shared machine
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs(name, small_demo_run, jupyter_path, tmp_path, monkeypatch):
    nbclient = pytest.importorskip("nbclient")
    from nbformat.v4 import new_code_cell

    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))  # searched before the user's and the system's kernels
    monkeypatch.setenv("LMMSCOPE_RUN", str(small_demo_run))
    monkeypatch.setenv("LMMSCOPE_OUT", str(tmp_path / "out"))  # what the notebooks write (sweep, SAE grid)
    monkeypatch.delenv("LMMSCOPE_SWEEP", raising=False)
    nb = _read(name)
    probe = new_code_cell("import sys\nprint(sys.executable)")
    nb.cells.insert(0, probe)
    # a cell may train several SAEs: about a minute on a quiet 2-core machine, several on a shared one
    client = nbclient.NotebookClient(nb, kernel_name=KERNEL, timeout=900,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()  # a failing cell (its assertions included) raises CellExecutionError with the traceback
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    printed = "".join(o.get("text", "") for o in last.outputs if o.output_type == "stream")
    assert "all checks passed" in printed, printed
    assert probe.outputs[0]["text"].strip() == sys.executable  # the kernel ran this environment's python
