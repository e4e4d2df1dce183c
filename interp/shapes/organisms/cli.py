"""`interp organism train|eval`: the shapes-world model organisms."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from interp.shapes.organisms import ORGANISMS

WHICH = sorted(set(ORGANISMS.values()))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("organism", help="train or evaluate the shapes-world model organisms")
    osub = p.add_subparsers(dest="organism_command", metavar="ACTION", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter

    t = osub.add_parser("train", help="train an organism (resumable: re-run to continue)", formatter_class=fmt)
    t.add_argument("--which", choices=WHICH, default="subject", help="which organism")
    t.add_argument("--out", default=None, help="training directory (default: runs/organism-WHICH)")
    t.add_argument("--steps", type=int, default=None, help="training steps (default: the recorded recipe's)")
    t.add_argument("--seed", type=int, default=0, help="seed of the weights and of the data stream")
    t.add_argument("--threads", type=int, default=None, help="torch CPU threads (use 1 per process when running two)")
    t.add_argument("--install", action="store_true",
                   help="copy the final model into the package's shipped weights")
    t.set_defaults(func=_train)

    e = osub.add_parser("eval", help="held-out accuracy per task", formatter_class=fmt)
    e.add_argument("--which", choices=WHICH, default="subject", help="which organism")
    e.add_argument("--model", default=None, help="a trained model directory instead of the shipped one")
    e.add_argument("-n", type=int, default=200, help="held-out questions per task")
    e.add_argument("--seed", type=int, default=0, help="seed of the held-out split")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=_eval)


def _train(args) -> int:
    import shutil
    from dataclasses import replace

    from interp.shapes.organisms import WEIGHTS
    from interp.shapes.organisms.train import RECIPES, train

    cfg = replace(RECIPES[args.which], seed=args.seed)
    if args.steps:
        cfg = replace(cfg, steps=args.steps)
    out = Path(args.out or f"runs/organism-{args.which}")
    final = train(cfg, out, threads=args.threads)
    print(f"trained model: {final}")
    if args.install:
        name = f"shapes-{args.which}"
        dest = WEIGHTS / name
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(final, dest)
        print(f"installed as {name}: {dest}")
    return 0


def _eval(args) -> int:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from interp.shapes.organisms import organism_path
    from interp.shapes.organisms.build import SPECS
    from interp.shapes.organisms.eval import evaluate

    path = Path(args.model) if args.model else organism_path(f"shapes-{args.which}")
    model = AutoModelForImageTextToText.from_pretrained(path, dtype="float32").eval()
    processor = AutoProcessor.from_pretrained(path)
    acc = evaluate(model, processor, SPECS[args.which].tasks, n=args.n, split="test", seed=args.seed)
    if args.json:
        print(json.dumps(acc))
    else:
        for task, a in acc.items():
            print(f"{task:10s} {a:.3f}")
    return 0
