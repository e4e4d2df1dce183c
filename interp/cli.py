"""`interp`: the one command-line entry point, generated from the stages' config dataclasses.

Every command is a stage function of one config dataclass (`interp.infra.cli_config.Command`),
listed in its module's `COMMANDS`; this module collects them, builds the parser from the
dataclasses, and turns a user error into one line and exit code 2. It is, with
`interp.pipeline`, the only place that imports every stage. Modules in `REGISTERS` add their
commands with argparse themselves (`register(subparsers)`), for commands not yet moved onto
config dataclasses. Stage modules are imported when the parser is built; their heavy imports
happen inside the stage functions, so `interp --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from interp.infra.cli_config import Command, add_commands, run_command

# transformer-lens's bridge may `pip install torchvision` by itself when a processor fails
# to load, which replaces the CPU torch with a CUDA build: no package index while we run.
os.environ.setdefault("PIP_NO_INDEX", "1")

STAGES = ["interp.shapes.world", "interp.shapes.organisms.cli", "interp.model.layers", "interp.cache.writer",
          "interp.pipeline.speed", "saes.train", "saes.bench_train", "saes.evaluate", "saes.recovery", "saes.crossmodal", "explain.features",
          "explain.bench_features", "explain.commands", "explain.text_commands", "steering.commands", "steering.crossmodal", "steering.bench", "app.commands",
          "interp.pipeline.benchmark", "interp.pipeline.crossmodal", "interp.pipeline.demo",
          "interp.pipeline.bench_scale", "interp.pipeline.notebooks"]
REGISTERS = ["explain.server"]  # `interp serve-explainer` registers itself (argparse) until it moves onto a config
GROUPS = {"bench": "speed benchmarks, as ratios against baselines measured in the same run"}
USER_ERRORS = (ValueError, FileNotFoundError, KeyError)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the command, exit code 2 (argparse prints the whole usage)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def commands() -> tuple[list[Command], dict[str, str]]:
    out: list[Command] = []
    groups = dict(GROUPS)
    for name in STAGES:
        module = importlib.import_module(name)
        out += getattr(module, "COMMANDS", [])
        groups.update(getattr(module, "GROUPS", {}))
    return out, groups


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="interp", description="lmmscope: sparse-autoencoder interpretability for multimodal models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    cmds, groups = commands()
    add_commands(sub, cmds, groups)
    for name in REGISTERS:
        importlib.import_module(name).register(sub)
    return parser


def _end_progress_bars() -> None:
    """Close the progress bars an error interrupted, so the error starts a line of its own instead of
    being glued onto the bar's last state."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", ()) or ()):
        try:
            bar.close()
        except Exception:  # a bar whose stream is gone: nothing to end
            pass


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if hasattr(args, "_command"):
            return run_command(args._command, args)
        return int(args.func(args) or 0)
    except USER_ERRORS as e:  # user errors: one clear line, no traceback
        if os.environ.get("INTERP_DEBUG"):
            raise
        _end_progress_bars()
        print(f"interp {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
