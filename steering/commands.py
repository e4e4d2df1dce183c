"""`interp steer` (one prompt), `interp sweep`, `interp steer-targets` and `interp attribute`, on a run's SAE."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from interp.infra.cli_config import Command, at_least, check_bounds, choices, positional, short
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
    """`interp steer-targets`: the shapes world's colour and shape flip rates with the run's own SAE at its own
    layer (strengths picked on validation questions), attribution top-5 rates, image-token reach."""

    run: str | None = field(default=None, metadata=positional())
    """run directory of a shapes-world cache, its SAE, features.h5 and recovery.json: writes
    RUN/steering_summary.json and RUN/steering/{select,test}-KIND-POSITIONS/"""
    kinds: tuple[str, ...] = field(default=("color", "shape"), metadata=choices(["color", "shape"]))
    """concept kinds to steer: colour features on colour questions, shape features on shape questions"""
    select_questions: int = field(default=40, metadata=at_least(1))
    """validation questions per kind for choosing strengths"""
    eval_questions: int = field(default=100, metadata=at_least(1))
    """test questions per kind for the flip rates"""
    attribution_questions: int = field(default=60, metadata=at_least(0))
    """test questions per kind for attribution"""
    validate_questions: int = field(default=12, metadata=at_least(0))
    """of those, how many also ablate every active feature to validate the attribution"""
    reach_questions: int = field(default=60, metadata=at_least(0))
    """test questions for the image-token reach (0: not measured)"""
    strengths: tuple[float, ...] = (1.0, 2.0, 4.0)
    """clamp values in multiples of each feature's max"""
    positions: tuple[str, ...] = field(default=("image", "all"), metadata=choices(["image", "object", "text", "all"]))
    """where to clamp: each feature takes the one of these (with its strength) that flips most validation
    answers (image: every image patch; all: every prompt and generated token; object: the patches of the
    object the question names)"""
    ig_steps: int = field(default=4, metadata=at_least(1))
    """also rank by integrated gradients with this many steps (1: attribution patching only)"""
    engine: str = field(default="torch", metadata=choices(list(ENGINES)))
    """generation engine"""
    batch_size: int = field(default=50, metadata=at_least(1))
    """questions per forward pass"""
    seed: int = 0
    """seed of the world's questions"""
    device: str = "auto"
    """auto (cuda when present), cpu, cuda, cuda:N"""
    progress: bool = True
    """progress bars"""

    def __post_init__(self) -> None:
        check_bounds(self)


def run_targets(cfg: TargetsConfig) -> dict:
    from steering.interventions import check_strength
    from steering.targets import shapes_targets

    strengths = tuple(check_strength(s, "--strengths value") for s in cfg.strengths)
    return shapes_targets(cfg.run, kinds=tuple(cfg.kinds), n_select=cfg.select_questions, n_eval=cfg.eval_questions,
                          n_attr=cfg.attribution_questions, n_validate=cfg.validate_questions, strengths=strengths,
                          positions=tuple(cfg.positions), ig_steps=cfg.ig_steps, engine=cfg.engine,
                          batch_size=cfg.batch_size, seed=cfg.seed, reach_questions=cfg.reach_questions,
                          device=cfg.device, progress=cfg.progress)


def _report_targets(r: dict, cfg: TargetsConfig) -> None:
    fmt = lambda v, spec=".3f": format(v, spec) if v is not None else "-"  # noqa: E731
    print(f"{r['model']} {r['layer']} ({r['module_path']}; the SAE's layer {r['sae_layer']}), clamp at "
          f"{' or '.join(r['positions'])} positions")
    for kind in cfg.kinds:
        flip = r["flip"][kind]
        print(f"{kind}: flip rate on test questions whose answer is another {kind} (unsteered accuracy "
              f"{fmt(flip['baseline_accuracy'])})")
        for c, v in flip["per_concept"].items():
            print(f"  {c:16s} feature {v['feature']:4d} (F1 {v['f1']:.2f})  {v['strength_x_max']:g}×max "
                  f"@{v['positions']:6s} flip rate {fmt(v['flip_rate'])} (n={v['n']})  coherence "
                  f"{fmt(v['coherence'])}" + (f"  (feature shared with {', '.join(v['shares_feature_with'])})"
                                               if v["shares_feature_with"] else ""))
        for c in flip["without_a_coherent_strength"]:
            print(f"  {c:16s} no strength kept the answers coherent")
        print(f"  overall {kind} flip rate {fmt(flip['overall'])} (n={flip['n']})")
        for name, v in r["attribution"].get(kind, {}).items():
            if isinstance(v, dict) and "top5_rate" in v:
                print(f"  attribution ({name}): top-5 rate {fmt(v['top5_rate'])}, Spearman with ablation per image "
                      f"{fmt(v['spearman_per_image_mean'])} (pooled {fmt(v['spearman_pooled'])})")
    print(f"image-token reach at this layer: {fmt(r['reach']['answers_changed'])} of answers change when the image "
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
    Command("steer-targets", TargetsConfig, run_targets, "shapes world: colour and shape flip rates at sweep-picked "
            "strengths with the run's SAE at its layer, attribution top-5 rates", report=_report_targets),
    Command("attribute", AttributeConfig, run_attribute, "rank SAE features by attribution patching for an answer "
            "token against a baseline token", report=_report_attribute),
]
