"""Running a pipeline stage from the app: explain and score one feature with the explain stage's own
commands (explain.cli), in this process, on the run directory's own cache and SAE."""

from __future__ import annotations

import argparse
import contextlib
import io

from app.run_dir import RunDir


def explain_available() -> bool:
    try:
        import explain.cli as cli
    except ImportError:
        return False
    return hasattr(cli, "register") and hasattr(cli, "run_explain") and hasattr(cli, "run_score")


def explain_commands(run: RunDir, feature: int) -> list[list[str]]:
    """The `interp explain` and `interp score` argument lists for one feature of this run."""
    common = ["--features", str(feature), "--no-progress", "--device", "cpu"]
    if run.cache:
        common += ["--cache", str(run.cache)]
    if run.sae:
        common += ["--sae", str(run.sae)]
    return [["explain", str(run.root), *common], ["score", str(run.root), *common]]


def shell_commands(run: RunDir, feature: int) -> str:
    return "\n".join(f"interp {a[0]} {run.given} --features {feature}" for a in explain_commands(run, feature))


def explain_and_score(run: RunDir, feature: int) -> tuple[int, str]:
    """(exit status, everything the commands printed). Stops at the first command that fails."""
    from explain.cli import register

    parser = argparse.ArgumentParser(prog="interp")
    register(parser.add_subparsers(dest="command", required=True))
    out = io.StringIO()
    code = 0
    for argv in explain_commands(run, feature):
        args = parser.parse_args(argv)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                code = int(args.func(args) or 0)
            except (ValueError, FileNotFoundError, KeyError) as e:  # the CLI's user errors
                print(f"interp {argv[0]}: error: {e}")
                code = 2
        if code:
            break
    return code, out.getvalue()
