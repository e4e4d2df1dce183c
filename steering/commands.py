"""`interp steer` (one prompt), `interp sweep`, `interp steer-targets` and `interp attribute`, on a run's SAE."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from interp.infra.cli_config import Command, choices, positional, short
from interp.infra.layout import RunLayout
from steering.interventions import MODES, POSITIONS, UNITS
from steering.steer import ENGINES


@dataclass
class PromptOptions:
    """The model input a command steers or attributes, and where the model runs."""

    prompt: str | None = field(default=None, metadata={"cli_required": True})
    """the user's text, e.g. 'what color is the circle ?'"""
    image: str | None = None
    """image path or reference (shapes:SPLIT:INDEX:SEED)"""
    model: str | None = None
    """model (none: the SAE's)"""
    layer: str | None = None
    """layer (none: the SAE's; must match it)"""
    device: str = "auto"
    """auto (cuda when present), cpu, cuda, cuda:N"""


@dataclass
class SteerConfig:
    """`interp steer`: one prompt (+ image) with SAE feature interventions, baseline and steered side by side."""

    run: str | None = field(default=None, metadata=positional())
    """run directory: steers with RUN/sae/ (RUN/features.h5 for strengths in units of max)"""
    input: PromptOptions = field(default_factory=PromptOptions)
    interventions: tuple[str, ...] = field(default=(), metadata=short("-i"))
    """FEATURE:MODE[:VALUE[:UNIT[:POSITIONS]]] items, e.g. 142:clamp:2:max:image"""
    features: tuple[int, ...] = ()
    """feature indices to steer with --mode, --value, --unit and --positions"""
    mode: str = field(default="clamp", metadata=choices(list(MODES)))
    """what --features' interventions do"""
    value: float = 1.0
    """clamp value or added amount for --features"""
    unit: str = field(default="absolute", metadata=choices(list(UNITS)))
    """--value in activation units, or in multiples of each feature's max (needs RUN/features.h5)"""
    positions: str = field(default="image", metadata=choices(list(POSITIONS)))
    """where --features' interventions apply"""
    max_new_tokens: int = 8
    """tokens to generate"""
    show_tokens: int = 10
    """next tokens to list by |Δp|"""
    engine: str = field(default="nnsight", metadata=choices(list(ENGINES)))
    """nnsight tracing or a plain forward hook"""
    replace_error: bool = False
    """replace edited rows by the SAE reconstruction instead of keeping the SAE's error term"""
    json: bool = False
    """print the result as JSON"""


def run_steer(cfg: SteerConfig):
    from steering.interventions import Intervention, InterventionError
    from steering.steer import Query, load_setup, steer_one

    interventions = [Intervention.parse(t) for t in cfg.interventions]
    interventions += [Intervention(f, cfg.mode, cfg.value, cfg.unit, cfg.positions) for f in cfg.features]
    if not interventions:
        raise InterventionError("nothing to steer: give --features F (with --mode/--value/...) or -i FEATURE:MODE:...")
    setup = load_setup(cfg.run, cfg.input.model, cfg.input.layer, cfg.input.device, interventions)
    return steer_one(setup, Query.load(cfg.input.prompt, cfg.input.image), interventions,
                     max_new_tokens=cfg.max_new_tokens, top_k=cfg.show_tokens, engine=cfg.engine,
                     keep_error=not cfg.replace_error)


def _report_steer(result, cfg: SteerConfig) -> None:
    print(json.dumps(result.to_json()) if cfg.json else result.table())


@dataclass
class SweepConfig:
    """`interp sweep`: features x strengths x prompts x images from a spec (resumable)."""

    run: str | None = field(default=None, metadata=positional())
    """run directory: sweeps with RUN/sae/, writes RUN/steering/NAME/"""
    spec: str | None = field(default=None, metadata={"cli_required": True})
    """sweep spec, YAML or JSON (see steering/sweep.py)"""
    name: str | None = None
    """the sweep's directory name under RUN/steering/ (none: the spec file's name without its extension)"""
    progress: bool = True
    """progress bar"""


def run_sweep_command(cfg: SweepConfig):
    from steering.sweep import SweepSpec, run_sweep

    return run_sweep(SweepSpec.load(cfg.spec), cfg.run, cfg.name or Path(cfg.spec).stem, progress=cfg.progress)


def _report_sweep(r, cfg: SweepConfig) -> None:
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


@dataclass
class TargetsConfig:
    """`interp steer-targets`: the shapes world's colour flip rate at sweep-picked strengths, and attribution."""

    run: str | None = field(default=None, metadata=positional())
    """run directory of a shapes-world cache: writes RUN/steering_summary.json and RUN/steering/{select,test}/"""
    select_questions: int = 100
    """validation questions for choosing strengths"""
    eval_questions: int = 200
    """test questions for the flip rate"""
    attribution_questions: int = 200
    """test questions for attribution"""
    strengths: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0)
    """clamp values in multiples of each feature's max"""
    positions: str = field(default="image", metadata=choices(["image", "text", "all"]))
    """where to clamp"""
    ig_steps: int = 4
    """also rank by integrated gradients with this many steps (1: attribution patching only)"""
    engine: str = field(default="nnsight", metadata=choices(list(ENGINES)))
    """generation engine"""
    device: str = "auto"
    """auto (cuda when present), cpu, cuda, cuda:N"""
    progress: bool = True
    """progress bars"""


def run_targets(cfg: TargetsConfig) -> dict:
    from steering.interventions import check_strength
    from steering.targets import shapes_targets

    strengths = tuple(check_strength(s, "--strengths value") for s in cfg.strengths)
    return shapes_targets(cfg.run, n_select=cfg.select_questions, n_eval=cfg.eval_questions,
                          n_attr=cfg.attribution_questions, strengths=strengths, positions=cfg.positions,
                          ig_steps=cfg.ig_steps, engine=cfg.engine, device=cfg.device, progress=cfg.progress)


def _report_targets(r: dict, cfg: TargetsConfig) -> None:
    print(f"{r['model']} {r['layer']} ({r['module_path']}), clamp at {r['positions']} tokens")
    for c, v in r["flip"]["per_colour"].items():
        print(f"  {c:7s} feature {v['feature']:4d}  {v['strength_x_max']:g}×max  flip rate "
              f"{v['flip_rate']:.3f} (n={v['n']})  coherence {v['coherence']:.3f}")
    overall = r["flip"]["overall"]
    print(f"  overall flip rate {overall:.3f}" if overall is not None else "  no flip rate")
    for name, v in r["attribution"].items():
        if isinstance(v, dict) and "top5_rate" in v:
            print(f"  attribution ({name}): top-5 rate {v['top5_rate']:.3f}, Spearman with ablation per image "
                  f"{v['spearman_per_image_mean']:.3f} (pooled {v['spearman_pooled']:.3f})")
    print(f"  image-token reach at this layer: {r['reach']['answers_changed']:.3f} of answers change when the image "
          f"tokens are swapped; wrote {RunLayout.of(cfg.run).steering_summary}")


@dataclass
class AttributeConfig:
    """`interp attribute`: rank the run's SAE features by attribution patching for an answer token against a
    baseline token (one forward and one backward pass: the gradient of logit(answer) - logit(baseline) with
    respect to the SAE features at the layer, times their activation)."""

    run: str | None = field(default=None, metadata=positional())
    """run directory: attributes to the features of RUN/sae/ (labelled by RUN/recovery.json when present)"""
    input: PromptOptions = field(default_factory=PromptOptions)
    answer: str | None = None
    """answer token (text or id; none: the model's top next token)"""
    baseline: str | None = None
    """baseline token (text or id; none: the runner-up)"""
    positions: str = field(default="image", metadata=choices(["image", "text", "all"]))
    """positions to attribute"""
    ig_steps: int = 1
    """1: attribution patching; k > 1: integrated gradients with k steps"""
    show: int = 10
    """features to list"""
    show_per_position: int = 3
    """features to list per position (0: none)"""
    validate: bool = False
    """also ablate every active feature and report the Spearman correlation with the attribution"""
    json: bool = False
    """print the result as JSON"""


def run_attribute(cfg: AttributeConfig) -> dict:
    from steering.attribution import ablation_effects, attribute, spearman, token_id
    from steering.steer import Query, load_setup, prepare

    layout = RunLayout.of(cfg.run)
    setup = load_setup(layout, cfg.input.model, cfg.input.layer, cfg.input.device)
    tok = setup.lm.tokenizer
    batch = prepare(setup.lm, [Query.load(cfg.input.prompt, cfg.input.image)])
    answer = token_id(tok, cfg.answer) if cfg.answer is not None else None
    baseline = token_id(tok, cfg.baseline) if cfg.baseline is not None else None
    (a,) = attribute(setup, batch, [answer], [baseline], cfg.positions, steps=cfg.ig_steps)
    labels = _labels(layout)
    total = a.total()
    top = a.ranking(cfg.show)
    result = {"prompt": cfg.input.prompt, "image": batch.queries[0].image_ref,
              "answer": tok.convert_ids_to_tokens(a.answer), "baseline": tok.convert_ids_to_tokens(a.baseline),
              "metric": a.metric, "ig_steps": cfg.ig_steps, "positions": cfg.positions,
              "features": [{"feature": f, "concept": labels.get(f), "attribution": float(total[f]),
                            "activation": float(a.act[a.feature == f].sum()),
                            "positions": int((a.feature == f).sum())} for f in top],
              "per_position": [{"position": p, "token": t, "features": [{"feature": f, "attribution": v}
                                                                         for f, v in fs]}
                               for p, t, fs in a.per_position(cfg.show_per_position)] if cfg.show_per_position else []}
    if cfg.validate:
        pred, true = ablation_effects(setup, batch, 0, a)
        result["validation"] = {"spearman": spearman(pred, true), "n_features": len(pred),
                                "ablation_effects": {int(f): float(t) for f, t in zip(a.active_features(), true)}}
    return result


def _report_attribute(result: dict, cfg: AttributeConfig) -> None:
    if cfg.json:
        print(json.dumps(result))
        return
    labels = {row["feature"]: row["concept"] for row in result["features"] if row["concept"]}
    print(f"logit({result['answer']}) - logit({result['baseline']}) = {result['metric']:.4f}   "
          f"({'attribution patching' if cfg.ig_steps == 1 else f'integrated gradients, {cfg.ig_steps} steps'}, "
          f"{cfg.positions} positions)")
    print(f"{'rank':>4s} {'feature':>8s} {'concept':>9s} {'attribution':>12s} {'activation':>11s} {'positions':>9s}"
          + (f" {'ablation Δ':>11s}" if cfg.validate else ""))
    for r, row in enumerate(result["features"], 1):
        line = (f"{r:4d} {row['feature']:8d} {row['concept'] or '':>9s} {row['attribution']:+12.4f} "
                f"{row['activation']:11.3f} {row['positions']:9d}")
        if cfg.validate:
            line += f" {result['validation']['ablation_effects'][row['feature']]:+11.4f}"
        print(line)
    if result["per_position"]:
        print("per position (by |attribution|):")
        for p in result["per_position"]:
            feats = ", ".join(f"{f['feature']}{'/' + labels[f['feature']] if f['feature'] in labels else ''} "
                              f"{f['attribution']:+.3f}" for f in p["features"])
            print(f"  {p['position']:4d} {p['token']:>10s}  {feats}")
    if cfg.validate:
        v = result["validation"]
        print(f"Spearman(attribution, -Δ from ablating each of {v['n_features']} active features) = "
              f"{v['spearman']:.3f}")


def _labels(layout: RunLayout) -> dict[int, str]:
    """Concept labels from the run's recovery report, if `interp recovery` wrote one (no recovery run here)."""
    from interp.shapes.concepts import load_recovery

    return load_recovery(layout.recovery).labels() if layout.recovery.exists() else {}


COMMANDS = [
    Command("steer", SteerConfig, run_steer, "steer one prompt with SAE feature interventions, baseline and steered "
            "side by side", "Steer one prompt (+ image) with interventions on the run's SAE features and show the "
            "baseline and steered answers side by side, with the next-token probabilities that moved most.",
            _report_steer),
    Command("sweep", SweepConfig, run_sweep_command, "steering sweep: features x strengths x prompts x images from a "
            "spec (resumable)", report=_report_sweep),
    Command("steer-targets", TargetsConfig, run_targets, "shapes world: colour flip rate at sweep-picked strengths, "
            "attribution top-5 rate", report=_report_targets),
    Command("attribute", AttributeConfig, run_attribute, "rank SAE features by attribution patching for an answer "
            "token against a baseline token", report=_report_attribute),
]
