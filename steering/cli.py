"""`interp steer` (one prompt; `sweep`; `targets`) and `interp attribute`."""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("steer", formatter_class=fmt,
                       help="steer a model with SAE features: one prompt side by side, or `steer sweep` / "
                            "`steer targets`",
                       description="Steer one prompt (+ image) with SAE feature interventions and show the baseline "
                                   "and steered answers side by side, with the next-token probabilities that moved "
                                   "most. `interp steer sweep --spec S.yaml --out DIR` runs a grid; "
                                   "`interp steer targets` measures steering and attribution on the shapes world.")
    _model_args(p)
    p.add_argument("--features", default=None, help="the SAE's features.h5 (needed for strengths in units of max)")
    p.add_argument("-i", "--intervention", action="append", default=[],
                   help="FEATURE:MODE[:VALUE[:UNIT[:POSITIONS]]], e.g. 142:clamp:2:max:image (repeatable)")
    p.add_argument("--feature", type=int, action="append", default=[],
                   help="feature to steer with --mode/--value/--unit/--positions (repeatable)")
    p.add_argument("--mode", default="clamp", choices=["clamp", "add", "ablate"], help="what --feature's do")
    p.add_argument("--value", type=float, default=1.0, help="clamp value or added amount for --feature")
    p.add_argument("--unit", default="absolute", choices=["absolute", "max"],
                   help="--value in activation units, or in multiples of each feature's max (needs --features)")
    p.add_argument("--positions", default="image", choices=["image", "text", "generated", "all"],
                   help="where --feature's interventions apply")
    p.add_argument("--max-new-tokens", type=int, default=8, help="tokens to generate")
    p.add_argument("--top-k", type=int, default=10, help="next tokens to list by |Δp|")
    p.add_argument("--engine", default="nnsight", choices=["nnsight", "torch"], help="nnsight tracing or a plain hook")
    p.add_argument("--replace-error", action="store_true",
                   help="replace edited rows by the SAE reconstruction instead of keeping the SAE's error term")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_steer)
    steer_sub = p.add_subparsers(dest="steer_command", metavar="SUBCOMMAND")

    s = steer_sub.add_parser("sweep", formatter_class=fmt,
                             help="features × strengths × prompts × images from a spec",
                             description="Resumable: re-run the same command after a kill to finish.")
    s.add_argument("--spec", required=True, help="sweep spec, YAML or JSON (see steering/sweep.py)")
    s.add_argument("--out", required=True, help="directory for generations.jsonl, summary.csv/json and plots")
    s.add_argument("--no-progress", action="store_true", help="no progress bar")
    s.set_defaults(func=_sweep)

    t = steer_sub.add_parser("targets", formatter_class=fmt,
                             help="shapes world: colour flip rate at sweep-picked strengths, attribution top-5 rate")
    t.add_argument("--sae", required=True, help="SAE directory (SAELens format) of a shapes-world cache")
    t.add_argument("--features", required=True, help="the SAE's features.h5")
    t.add_argument("--out", required=True, help="summary JSON to write (e.g. runs/dev/steering_summary.json)")
    t.add_argument("--work", default=None, help="directory for the sweeps (default: OUT's directory/steering)")
    t.add_argument("--n-select", type=int, default=100, help="validation questions for choosing strengths")
    t.add_argument("--n-eval", type=int, default=200, help="test questions for the flip rate")
    t.add_argument("--n-attr", type=int, default=200, help="test questions for attribution")
    t.add_argument("--strengths", default="0.25,0.5,0.75,1,1.5,2,3,5", help="clamp values in multiples of max")
    t.add_argument("--positions", default="image", choices=["image", "text", "all"], help="where to clamp")
    t.add_argument("--ig-steps", type=int, default=4, help="also rank by integrated gradients with this many steps")
    t.add_argument("--engine", default="nnsight", choices=["nnsight", "torch"], help="generation engine")
    t.add_argument("--no-progress", action="store_true", help="no progress bars")
    t.set_defaults(func=_targets)

    a = sub.add_parser("attribute", formatter_class=fmt,
                       help="rank SAE features by attribution patching for an answer token against a baseline token",
                       description="One forward and one backward pass: gradient of logit(answer) - logit(baseline) "
                                   "with respect to the SAE latents at the layer, times their activation.")
    _model_args(a)
    a.add_argument("--answer", default=None, help="answer token (text or id; default: the model's top next token)")
    a.add_argument("--baseline", default=None, help="baseline token (text or id; default: the runner-up)")
    a.add_argument("--positions", default="image", choices=["image", "text", "all"], help="positions to attribute")
    a.add_argument("--steps", type=int, default=1, help="1: attribution patching; k > 1: integrated gradients")
    a.add_argument("--top", type=int, default=10, help="features to list")
    a.add_argument("--per-position", type=int, default=3, help="features to list per position (0: none)")
    a.add_argument("--validate", action="store_true",
                   help="also ablate every active feature and report the Spearman correlation with the attribution")
    a.add_argument("--json", action="store_true", help="print the result as JSON")
    a.set_defaults(func=_attribute)


def _model_args(p) -> None:
    p.add_argument("--sae", default=None, help="SAE directory (SAELens format)")
    p.add_argument("--model", default=None, help="model (default: the SAE's model)")
    p.add_argument("--layer", default=None, help="layer (default: the SAE's; must match it)")
    p.add_argument("--image", default=None, help="image path or reference (shapes:SPLIT:INDEX:SEED)")
    p.add_argument("--prompt", default=None, help="the user's text, e.g. 'what color is the circle ?'")
    p.add_argument("--device", default="cpu", help="device for the model and SAE")


def _need(args, *names: str) -> None:
    missing = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n) in (None, "")]
    if missing:
        raise ValueError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} required")


def _steer(args) -> int:
    from steering.interventions import Intervention, InterventionError
    from steering.steer import Query, load_setup, steer_one

    _need(args, "sae", "prompt")
    interventions = [Intervention.parse(t) for t in args.intervention]
    interventions += [Intervention(f, args.mode, args.value, args.unit, args.positions) for f in args.feature]
    if not interventions:
        raise InterventionError("nothing to steer: give --feature F (with --mode/--value/...) or -i FEATURE:MODE:...")
    setup = load_setup(args.sae, args.model, args.features, args.layer, args.device, interventions)
    result = steer_one(setup, Query.load(args.prompt, args.image), interventions, max_new_tokens=args.max_new_tokens,
                       top_k=args.top_k, engine=args.engine, keep_error=not args.replace_error)
    print(json.dumps(result.to_json()) if args.json else result.table())
    return 0


def _sweep(args) -> int:
    from steering.sweep import SweepSpec, run_sweep

    r = run_sweep(SweepSpec.load(args.spec), args.out, progress=not args.no_progress)
    print(f"{'feature':>8s} {'concept':>8s} {'strength':>9s} {'target':>7s} {'KL':>7s} {'changed':>8s} "
          f"{'coherent':>9s} {'ppl':>9s}")
    fmt = lambda v, spec: format(v, spec) if v is not None else "-"  # noqa: E731
    for row in r.rows:
        print(f"{row['feature']:8d} {row['concept'] or '-':>8s} {row['strength']:9g} {fmt(row['target_rate'], '7.3f')} "
              f"{fmt(row['kl'], '7.3f')} {fmt(row['changed'], '8.3f')} {fmt(row['coherence'], '9.3f')} "
              f"{fmt(row['perplexity'], '9.2f')}")
    for b in r.best:
        if b["strength"] is None:
            print(f"feature {b['feature']}: no best strength ({b['reason']})")
        else:
            print(f"feature {b['feature']} ({b['concept']}): best strength {b['strength']:g} -> target rate "
                  f"{b['target_rate']:.3f} at coherence {fmt(b['coherence'], '.3f')}")
    print(f"{r.n_generated} new generations; wrote {r.out}/generations.jsonl, summary.csv, summary.json, sweep.html")
    return 0


def _targets(args) -> int:
    from steering.sweep import _strengths
    from steering.targets import shapes_targets

    strengths = tuple(_strengths([s for s in args.strengths.split(",") if s.strip()], "--strengths"))
    r = shapes_targets(args.sae, args.features, args.out, work=args.work, n_select=args.n_select,
                       n_eval=args.n_eval, n_attr=args.n_attr, strengths=strengths, positions=args.positions,
                       ig_steps=args.ig_steps, engine=args.engine, progress=not args.no_progress)
    print(f"{r['model']} {r['layer']} ({r['module_path']}), clamp at {r['positions']} tokens")
    for c, v in r["flip"]["per_colour"].items():
        print(f"  {c:7s} latent {v['feature']:4d}  {v['strength_x_max']:g}×max  flip rate "
              f"{v['flip_rate']:.3f} (n={v['n']})  coherence {v['coherence']:.3f}")
    overall = r["flip"]["overall"]
    print(f"  overall flip rate {overall:.3f}" if overall is not None else "  no flip rate")
    for name, v in r["attribution"].items():
        if isinstance(v, dict) and "top5_rate" in v:
            print(f"  attribution ({name}): top-5 rate {v['top5_rate']:.3f}, Spearman with ablation per image "
                  f"{v['spearman_per_image_mean']:.3f} (pooled {v['spearman_pooled']:.3f})")
    print(f"  image-token reach at this layer: {r['reach']['answers_changed']:.3f} of answers change when the image "
          f"tokens are swapped; wrote {args.out}")
    return 0


def _attribute(args) -> int:
    from steering.attribution import ablation_effects, attribute, spearman, token_id
    from steering.steer import Query, load_setup, prepare

    _need(args, "sae", "prompt")
    setup = load_setup(args.sae, args.model, None, args.layer, args.device)
    tok = setup.lm.tokenizer
    batch = prepare(setup.lm, [Query.load(args.prompt, args.image)])
    answer = token_id(tok, args.answer) if args.answer is not None else None
    baseline = token_id(tok, args.baseline) if args.baseline is not None else None
    (a,) = attribute(setup, batch, [answer], [baseline], args.positions, steps=args.steps)
    labels = _labels(args.sae)
    total = a.total()
    top = a.ranking(args.top)
    result = {"prompt": args.prompt, "image": batch.queries[0].image_ref, "answer": tok.convert_ids_to_tokens(a.answer),
              "baseline": tok.convert_ids_to_tokens(a.baseline), "metric": a.metric, "steps": args.steps,
              "positions": args.positions,
              "features": [{"feature": f, "concept": labels.get(f), "attribution": float(total[f]),
                            "activation": float(a.act[a.feature == f].sum()),
                            "positions": int((a.feature == f).sum())} for f in top],
              "per_position": [{"position": p, "token": t, "features": [{"feature": f, "attribution": v}
                                                                         for f, v in fs]}
                               for p, t, fs in a.per_position(args.per_position)] if args.per_position else []}
    if args.validate:
        pred, true = ablation_effects(setup, batch, 0, a)
        result["validation"] = {"spearman": spearman(pred, true), "n_features": len(pred),
                                "ablation_effects": {int(f): float(t) for f, t in zip(a.active_features(), true)}}
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"logit({result['answer']}) - logit({result['baseline']}) = {a.metric:.4f}   "
          f"({'attribution patching' if args.steps == 1 else f'integrated gradients, {args.steps} steps'}, "
          f"{args.positions} positions)")
    print(f"{'rank':>4s} {'feature':>8s} {'concept':>9s} {'attribution':>12s} {'activation':>11s} {'positions':>9s}"
          + (f" {'ablation Δ':>11s}" if args.validate else ""))
    for r, row in enumerate(result["features"], 1):
        line = (f"{r:4d} {row['feature']:8d} {row['concept'] or '':>9s} {row['attribution']:+12.4f} "
                f"{row['activation']:11.3f} {row['positions']:9d}")
        if args.validate:
            line += f" {result['validation']['ablation_effects'][row['feature']]:+11.4f}"
        print(line)
    if result["per_position"]:
        print("per position (by |attribution|):")
        for p in result["per_position"]:
            feats = ", ".join(f"{f['feature']}{'/' + labels[f['feature']] if f['feature'] in labels else ''} "
                              f"{f['attribution']:+.3f}" for f in p["features"])
            print(f"  {p['position']:4d} {p['token']:>10s}  {feats}")
    if args.validate:
        v = result["validation"]
        print(f"Spearman(attribution, -Δ from ablating each of {v['n_features']} active features) = "
              f"{v['spearman']:.3f}")
    return 0


def _labels(sae_dir: str) -> dict[int, str]:
    """Concept labels from the SAE's recovery.json, if `interp recovery` wrote one (no recovery run here)."""
    from pathlib import Path

    from steering.concepts import concept_matches, labels

    return labels(concept_matches(sae_dir)) if (Path(sae_dir) / "recovery.json").exists() else {}
