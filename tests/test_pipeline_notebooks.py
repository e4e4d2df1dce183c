"""interp notebooks: executed copies of the analysis notebooks, with their outputs, in the run directory."""

from __future__ import annotations

import json
import shutil

import pytest

from interp.infra.layout import RunLayout


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_an_executed_copy_with_outputs_lands_in_the_run(small_demo_run, tmp_path, cli):
    pytest.importorskip("nbclient")
    import nbformat

    from interp.pipeline.notebooks import NOTEBOOKS

    run = tmp_path / "run"
    shutil.copytree(small_demo_run, run, symlinks=True)
    stored = (NOTEBOOKS / "tour.ipynb").read_bytes()
    r = cli("notebooks", run, "--names", "tour")
    nb = nbformat.read(RunLayout(run).notebook("tour"), as_version=4)
    meta = nb.metadata["lmmscope"]
    assert meta["run"] == str(run.resolve()) and r.code == (1 if meta["error"] else 0), (meta, r.err[-2000:])
    code = [c for c in nb.cells if c.cell_type == "code"]
    ran = [c for c in code if c.execution_count]
    assert len(ran) >= 3 and all(c.outputs for c in ran[1:3])  # the cache's and the SAE's cells, with outputs
    kinds = {k for c in code for o in c.outputs for k in o.get("data", {})}
    assert {"image/png", "text/html"} <= kinds  # figures (the heatmap sheets) and tables came through
    if meta["error"] is None:  # the notebook's own checks of the run passed: its last cell says so
        printed = "".join(o.get("text", "") for o in code[-1].outputs if o.output_type == "stream")
        assert "all checks passed" in printed
    else:  # a failed check is reported by its line, and the copy holds the error where it happened
        assert meta["error"] in r.out and any(o.output_type == "error" for c in code for o in c.outputs)
    assert (NOTEBOOKS / "tour.ipynb").read_bytes() == stored  # the source notebook stays clean
    assert json.loads((RunLayout(run).notebook("tour")).read_text())["nbformat"] == 4
