"""`interp demo`: the main job on the embedded default (the shapes world and its organisms).

For now: sample the world, load both organisms through the Auto classes, and measure their
held-out accuracy. Later stages extend it into the whole pipeline.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the pipeline on the shapes world and its organisms",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="run directory to write")
    p.add_argument("-n", type=int, default=100, help="held-out questions per task")
    p.add_argument("--seed", type=int, default=0, help="seed of the world samples")
    p.set_defaults(func=run)


def run(args) -> int:
    from interp.organisms import ORGANISMS, load_organism
    from interp.organisms.build import SPECS
    from interp.organisms.eval import evaluate
    from interp.run import write_run_info
    from interp.world import WorldConfig, caption, sample_scene

    t0 = time.time()
    out = Path(args.out)
    (out / "world").mkdir(parents=True, exist_ok=True)
    world = WorldConfig()
    write_run_info(out, {"command": "demo", "world": world.to_json(), "seed": args.seed})
    for i in range(8):
        scene = sample_scene(world, i, "test", args.seed)
        scene.render().resize((192, 192), 0).save(out / "world" / f"scene{i}.png")
        (out / "world" / f"scene{i}.json").write_text(json.dumps(scene.to_json()))
        print(f"scene {i}: {caption(scene)}")
    summary = {}
    for name, which in ORGANISMS.items():
        model, processor = load_organism(name)
        acc = evaluate(model, processor, SPECS[which].tasks, n=args.n, split="test", seed=args.seed)
        summary[name] = acc
        print(f"\n{name} held-out accuracy ({args.n} questions per task):")
        for task, a in acc.items():
            print(f"  {task:10s} {a:6.1%}")
    summary["seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\nwrote {out / 'summary.json'} in {summary['seconds']} s")
    return 0
