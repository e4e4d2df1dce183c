"""`interp steer-crossmodal`: one feature steered on the question's text tokens and on the image patches, side by side.

For a concept (a colour or a shape of the shapes world), the feature is the cross-modal report's shared
feature (RUN/crossmodal.json: the one best on both the concept's patches and its word; on a model
without a truly cross-modal feature it is still the best candidate, and the record says whether
it reached f1_min). The same clamp, at the same strengths (multiples of the feature's max), runs as
two sweeps over held-out questions of the concept's kind ("what color is the X ?", "what shape is
the C object ?") (steering.sweep): positions "image"
(RUN/steering/crossmodal-image/) and positions "text" (RUN/steering/crossmodal-text/). The
summary (RUN/steering_crossmodal.json) puts their target rates, changed rates and coherence next to
each other per strength, and RUN/steering_crossmodal.html (+ .png) draws them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from interp.infra.cli_config import Command, positional
from interp.infra.durable import write_json
from interp.infra.layout import RunLayout

SIDES = ("image", "text")


@dataclass
class CrossModalSteerConfig:
    """`interp steer-crossmodal`: steer a cross-modal feature on text positions and on image positions."""

    run: str | None = field(default=None, metadata=positional())
    """run directory with an SAE on image and text tokens and RUN/crossmodal.json (`interp crossmodal`)"""
    concept: str = "color:red"
    """the colour or shape whose shared feature is steered (as the report names it, or its value: red)"""
    feature: int | None = None
    """steer this feature instead of the concept's shared one"""
    strengths: tuple[float, ...] = (1.0, 2.0, 4.0)
    """clamp values in multiples of the feature's max activation"""
    questions: int = 60
    """held-out colour questions per strength and side"""
    seed: int = 0
    """seed of the held-out questions"""
    progress: bool = True
    """progress bar"""


STEERABLE = ("color", "shape")  # the kinds of concept whose value is the answer of a world task


def steerable_concept(report, concept: str, path) -> tuple:
    """(the report's entry for `concept`, named in full or by its value, the world task that asks for it)."""
    from interp.shapes.world import WorldConfig
    from steering.sweep import answer_word

    world = WorldConfig()

    def kind(name: str) -> str | None:
        if ":" in name:
            return name.split(":", 1)[0]
        return "color" if name in world.colors else "shape" if name in world.shapes else None

    steerable = [c for c in report.concepts if kind(c.concept) in STEERABLE]
    entry = next((c for c in steerable if concept in (c.concept, answer_word(c.concept))), None)
    if entry is None:
        raise ValueError(f"no colour or shape concept {concept!r} in {path}; concepts: "
                         f"{', '.join(c.concept for c in steerable) or 'none'}")
    return entry, kind(entry.concept)


def steer_crossmodal(cfg: CrossModalSteerConfig) -> dict:
    from explain.features import FeaturesConfig, compute_features
    from saes.crossmodal import load_crossmodal
    from steering.steer import load_setup
    from steering.sweep import SweepSpec, run_sweep

    layout = RunLayout.of(cfg.run)
    report = load_crossmodal(layout.crossmodal)
    entry, kind = steerable_concept(report, cfg.concept, layout.crossmodal)
    feature = cfg.feature if cfg.feature is not None else entry.shared_feature
    if not layout.features.exists():
        compute_features(FeaturesConfig(run=str(layout.root), progress=False))
    setup = load_setup(layout)
    sides = {}
    for side in SIDES:
        spec = SweepSpec.from_dict({"features": [{"feature": feature, "concept": entry.concept}],
                                    "strengths": list(cfg.strengths), "mode": "clamp", "unit": "max",
                                    "positions": side, "world": {"task": kind, "n": cfg.questions,
                                                                 "split": "test", "seed": cfg.seed},
                                    "max_new_tokens": 3, "engine": "torch", "perplexity": False})
        sides[side] = {r["strength"]: r for r in run_sweep(spec, layout, f"crossmodal-{side}", setup,
                                                           progress=cfg.progress).rows}
    keys = ("target_rate", "changed", "coherence", "kl")
    rows = [{"strength": s, **{side: {k: sides[side][s][k] for k in keys} for side in SIDES}} for s in cfg.strengths]
    out = {"concept": entry.concept, "feature": feature, "layer": report.extra.get("layer"),
           "cross_modal": entry.shared_f1 >= report.f1_min if feature == entry.shared_feature else None,
           "shared_f1": {"image": entry.shared_image.f1, "text": entry.shared_text.f1}
           if feature == entry.shared_feature else None,
           "questions": cfg.questions, "rows": rows, "config": asdict(cfg)}
    write_json(layout.steering_crossmodal, out, indent=1)
    plot(out, layout.figure("steering_crossmodal", "html"))
    return out


def plot(summary: dict, path: Path) -> None:
    import plotly.graph_objects as go

    from interp.infra.plots import write_figure

    x = [str(r["strength"]) for r in summary["rows"]]
    fig = go.Figure([go.Bar(name=f"on {side} positions", x=x, y=[r[side]["target_rate"] or 0 for r in summary["rows"]])
                     for side in SIDES])
    fig.update_layout(barmode="group", template="plotly_white", yaxis_range=[0, 1.02],
                      title=f"Clamping feature {summary['feature']} ({summary['concept']}): answers turned "
                            f"{summary['concept'].split(':', 1)[-1]}, by where it is clamped",
                      xaxis_title="clamp (x the feature's max)", yaxis_title="target rate")
    write_figure(fig, path)


def _report(out: dict, cfg: CrossModalSteerConfig) -> None:
    print(f"feature {out['feature']} ({out['concept']}, layer {out['layer']}; cross-modal: {out['cross_modal']})")
    print(f"{'clamp':>6s}  {'image: target':>13s} {'changed':>7s} {'coherent':>8s}   {'text: target':>12s} "
          f"{'changed':>7s} {'coherent':>8s}")
    for r in out["rows"]:
        i, t = r["image"], r["text"]
        print(f"{r['strength']:6g}  {i['target_rate'] or 0:13.2f} {i['changed'] or 0:7.2f} {i['coherence'] or 0:8.2f}   "
              f"{t['target_rate'] or 0:12.2f} {t['changed'] or 0:7.2f} {t['coherence'] or 0:8.2f}")
    print(f"wrote {RunLayout.of(cfg.run).steering_crossmodal}")


COMMANDS = [Command("steer-crossmodal", CrossModalSteerConfig, steer_crossmodal,
                    "steer a cross-modal feature on text positions and on image positions, side by side",
                    report=_report)]
