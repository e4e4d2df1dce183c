"""`interp`: the one command-line entry point, a subcommand per pipeline stage.

Each stage registers its own subcommands (`register(subparsers)` in its `cli` module) and,
optionally, its benchmarks under `interp bench` (`register_bench(bench_subparsers)`).
Heavy imports happen inside the handlers so `interp --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# transformer-lens's bridge may `pip install torchvision` by itself when a processor fails
# to load, which replaces the CPU torch with a CUDA build: no package index while we run.
os.environ.setdefault("PIP_NO_INDEX", "1")

STAGES = ["interp.shapes.world", "interp.shapes.organisms.cli", "interp.model.layers", "interp.cache.writer", "interp.cache.bench", "saes.cli", "saes.evaluate", "saes.recovery", "explain.features", "explain.cli", "steering.cli", "app.cli", "interp.pipeline.benchmark", "interp.pipeline.demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="interp", description="lmmscope: sparse-autoencoder interpretability for multimodal models.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    bench = sub.add_parser("bench", help="speed benchmarks, as ratios against baselines measured in the same run")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    for name in STAGES:
        module = importlib.import_module(name)
        if hasattr(module, "register"):
            module.register(sub)
        if hasattr(module, "register_bench"):
            module.register_bench(bench_sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, KeyError) as e:  # user errors: one clear line, no traceback
        if os.environ.get("INTERP_DEBUG"):
            raise
        print(f"interp {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
