"""Running a pipeline stage from the app: explain and score one feature with the explain stage's own
functions (`explain.commands.run_explain` / `run_score`), in this process, on the run directory."""

from __future__ import annotations

import contextlib
import io

from app.run_dir import RunDir


def explain_available() -> bool:
    try:
        import explain.commands  # noqa: F401
    except ImportError:
        return False
    return True


def shell_commands(run: RunDir, feature: int) -> str:
    """The same as commands a person can type."""
    return "\n".join(f"interp {stage} {run.given} --features {feature}" for stage in ("explain", "score"))


def explain_and_score(run: RunDir, feature: int) -> tuple[int, str]:
    """(exit status as the commands would give it, everything they printed). Scores only after a successful
    explanation."""
    from explain.commands import ExplainConfig, FeatureSelection, ScoreConfig, run_explain, run_score
    from explain.explainers import ExplainerOptions

    selection, options = FeatureSelection(features=(feature,)), ExplainerOptions(device="cpu")
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            explained = run_explain(ExplainConfig(run=str(run.root), selection=selection, options=options,
                                                  progress=False))
            code = 1 if explained.failed or explained.aborted else 0
            if code == 0:
                scored = run_score(ScoreConfig(run=str(run.root), selection=selection, options=options, progress=False))
                code = 1 if scored["failed"] else 0
        except (ValueError, FileNotFoundError, KeyError) as e:  # what the CLI reports as user errors
            print(f"error: {e}")
            code = 2
    return code, out.getvalue()
