"""`interp crossmodal-sweep`: where in the subject do image and text share features? One SAE per layer.

For every layer of the subject (or those given): a nested run RUN/crossmodal-layerL/ caches
question-answer scenes with every token role (image patches, the question, the answer), trains an
SAE like the demo's on them, and writes its cross-modal report (saes.crossmodal): per concept, the
best feature on its patches, on its word, and whether one feature reaches F1 >= f1_min on both.
The sweep is a finding, not a target: RUN/crossmodal_sweep.json holds the numbers per layer, and
RUN/crossmodal_sweep.html (+ .png) plots the cross-modal fraction and each concept's F1s by layer.
`interp benchmark` runs it as its cross-modal section (`crossmodal_section`).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from interp.infra.cli_config import Command, at_least, choices, positional
from interp.infra.layout import RunLayout
from saes import architectures

QA_ROLES = ("image_patch", "text", "template", "answer")


@dataclass
class CrossModalSweepConfig:
    """`interp crossmodal-sweep`: an SAE on image and text tokens at every layer of the subject, and its
    cross-modal concepts."""

    run: str = field(default="runs/crossmodal", metadata=positional(required=False))
    """run directory: RUN/crossmodal-layerL/ per layer, RUN/crossmodal_sweep.json and its figure"""
    model: str = "shapes-subject"
    """the subject (a shapes-world model)"""
    layers: tuple[int, ...] | None = None
    """layers to sweep (none: every layer of the model)"""
    samples: int = 1500
    """question-answer samples (scenes) cached per layer"""
    arch: str = field(default="topk", metadata=choices(architectures.names))
    """SAE architecture (topk: on 1500 scenes, 256 features, k 4, it found 4 and 5 word-matched text features at
    layers 0 and 2; batchtopk 2 and 1 at layers 0 and 4)"""
    d_sae: int = 256
    """features of every SAE"""
    k: int = 4
    """active features per row"""
    steps: int = 2000
    """training steps per SAE"""
    f1_min: float = 0.9
    """F1 on both modalities at which a concept is cross-modal"""
    seed: int = 0
    """seed of the scenes and of the SAEs"""
    seeds: int = field(default=1, metadata=at_least(1))
    """SAE training seeds per layer (seed, seed + 1, ...; the further ones in RUN/crossmodal-layerL/seed-S/ on
    the layer's cache): the text explanations' numbers are reported per seed, with their mean and minimum"""
    text: bool = True
    """explain and score every layer's text features (the tokens protocol) and pool the word-matched ones"""


def seed_layer_run(run: RunLayout, layer: int, cfg: CrossModalSweepConfig, sae_seed: int) -> RunLayout:
    """Where the SAE of `sae_seed` at `layer` lives: the layer's nested run for the sweep's own seed, else its
    RUN/crossmodal-layerL/seed-S/, which reads the layer's cache through a relative link."""
    sub = run.crossmodal_run(layer)
    if sae_seed == cfg.seed:
        return sub
    nested = sub.seed_run(sae_seed).mkdir()
    nested.link("cache", sub.cache)
    return nested


def crossmodal_layer_run(run: RunLayout, layer: int, cfg: CrossModalSweepConfig, sae_seed: int | None = None,
                         text: bool = False) -> dict:
    """Cache, SAE and cross-modal report of one layer in its nested run (each step skipped when done); with
    `text`, also its text explanations and their scores (`text`: the summary's matched block)."""
    from interp.cache.reader import ActivationReader
    from interp.cache.writer import CacheConfig, build_cache
    from interp.model.inputs import QA_TEMPLATE
    from saes.crossmodal import CrossModalConfig, load_crossmodal, run_crossmodal
    from saes.sae import SAEConfig, sae_fingerprint
    from saes.train import TrainConfig, train

    t0 = time.time()
    sae_seed = cfg.seed if sae_seed is None else sae_seed
    build_cache(CacheConfig(run=str(run.crossmodal_run(layer).root), model=cfg.model, layer=str(layer),
                            data="shapes:train:qa", prompt_template=QA_TEMPLATE, samples=cfg.samples, roles=QA_ROLES,
                            seed=cfg.seed, batch_size=32))
    sub = seed_layer_run(run, layer, cfg, sae_seed)
    if not (sub.sae / "cfg.json").exists():
        with ActivationReader(sub.cache) as reader:
            train(SAEConfig(arch=cfg.arch, d_in=reader.d, d_sae=cfg.d_sae, k=cfg.k, model_name=cfg.model,
                            hook_name=reader.meta["module_path"]),
                  TrainConfig(steps=cfg.steps, batch_size=min(1024, reader.n_rows), seed=sae_seed, progress=False),
                  reader, sub)
    report = None
    if sub.crossmodal.exists():
        report = load_crossmodal(sub.crossmodal)
        if report.extra.get("sae_sha256") != sae_fingerprint(sub.sae) or report.f1_min != cfg.f1_min:
            report = None
    report = report or run_crossmodal(CrossModalConfig(run=str(sub.root), f1_min=cfg.f1_min))
    row = {"layer": layer, "seed": sae_seed, "run": str(sub.root), "cross_modal_fraction": report.cross_modal_fraction,
           "cross_modal": report.cross_modal,
           "concepts": {c.concept: {"image_f1": c.image.f1, "text_f1": c.text.f1, "shared_f1": c.shared_f1,
                                    "shared_feature": c.shared_feature} for c in report.concepts}}
    if text:
        row["text"] = explain_text_features(sub, sae_seed)
    row["seconds"] = round(time.time() - t0, 1)
    return row


def explain_text_features(sub: RunLayout, seed: int) -> dict:
    """Features, text explanations (the tokens protocol) and their held-out scores of a nested run (each step
    resumes); returns the text score summary's numbers: all scored features and the word-matched ones."""
    from explain.text_commands import TextExplainConfig, TextScoreConfig, run_explain_text, run_score_text
    from interp.pipeline.stages import ensure_features

    ensure_features(sub, seed)
    run_explain_text(TextExplainConfig(run=str(sub.root), progress=False))
    scores = run_score_text(TextScoreConfig(run=str(sub.root), progress=False, seed=seed))
    matched = scores["matched"]
    return {"features": scores["all"]["n"],
            "detection_balanced_accuracy_all": scores["all"]["detection_balanced_accuracy"],
            "matched": matched["n"], "text_explanation_accuracy": matched["text_explanation_accuracy"],
            "detection_balanced_accuracy": matched["detection_balanced_accuracy"],
            "matched_features": {f: {k: v[k] for k in ("words", "explanation", "names_word",
                                                       "detection_balanced_accuracy")}
                                 for f, v in matched["features"].items()}}


def pool_text(rows: list[dict]) -> dict | None:
    """The word-matched text features of every layer (and seed) together: how many, the share whose explanation
    names the word, their mean detection; and per seed the same, with the mean and minimum over seeds."""
    def pooled(rs: list[dict]) -> dict:
        feats = [f for r in rs for f in r["text"]["matched_features"].values()]
        det = [f["detection_balanced_accuracy"] for f in feats if f["detection_balanced_accuracy"] is not None]
        named = [f["names_word"] for f in feats]
        return {"matched": len(feats), "text_explanation_accuracy": round(float(np.mean(named)), 4) if named else None,
                "detection_balanced_accuracy": round(float(np.mean(det)), 4) if det else None,
                "words": sorted({w for f in feats for w in f["words"]})}

    rows = [r for r in rows if "text" in r]
    if not rows:
        return None
    per_seed = {s: pooled([r for r in rows if r["seed"] == s]) for s in sorted({r["seed"] for r in rows})}
    out = {**pooled(rows), "per_seed": {str(s): v for s, v in per_seed.items()}}
    for key in ("text_explanation_accuracy", "detection_balanced_accuracy"):
        vals = [v[key] for v in per_seed.values() if v[key] is not None]
        out[f"{key}_seeds"] = ({"mean": round(float(np.mean(vals)), 4), "min": round(float(np.min(vals)), 4)}
                               if vals else None)
    return out


def run_crossmodal_sweep(cfg: CrossModalSweepConfig) -> dict:
    from interp.infra.durable import write_json
    from interp.infra.runinfo import write_run_info
    from interp.model.layers import decoder_layers
    from interp.model.models import load_model

    run = RunLayout.of(cfg.run).mkdir()
    layers = list(cfg.layers) if cfg.layers else list(range(len(decoder_layers(load_model(cfg.model, device="cpu")))))
    write_run_info(run.run_info("crossmodal-sweep"), {"command": "crossmodal-sweep", "config": asdict(cfg),
                                                      "layers": layers})
    rows, further = [], []
    for layer in layers:
        for sae_seed in range(cfg.seed, cfg.seed + cfg.seeds):
            r = crossmodal_layer_run(run, layer, cfg, sae_seed, text=cfg.text)
            (rows if sae_seed == cfg.seed else further).append(r)
            line = f"layer {layer} seed {sae_seed}: cross-modal {r['cross_modal_fraction']:.2f} " \
                   f"({', '.join(r['cross_modal']) or 'none'})"
            if "text" in r:
                t = r["text"]
                line += (f"; {t['matched']} word-matched text features, names the word "
                         f"{t['text_explanation_accuracy']}, detection {t['detection_balanced_accuracy']}")
            if sae_seed == cfg.seed:
                line += "; weaker F1 per concept " + " ".join(f"{c} {v['shared_f1']:.2f}"
                                                              for c, v in r["concepts"].items())
            print(line, flush=True)
    out = {"model": cfg.model, "f1_min": cfg.f1_min, "config": asdict(cfg), "layers": rows, "further_seeds": further,
           "text": pool_text(rows + further)}
    write_json(run.crossmodal_sweep, out, indent=1)
    plot_sweep(out, run)
    return out


def plot_sweep(sweep: dict, run: RunLayout) -> None:
    """The cross-modal fraction by layer, and per concept its best image F1, best text F1 and best shared
    (weaker-of-the-two) F1 by layer, as one figure (HTML with plotly.js inside, and a PNG)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from interp.infra.plots import write_figure

    layers = [r["layer"] for r in sweep["layers"]]
    concepts = list(sweep["layers"][0]["concepts"]) if sweep["layers"] else []
    fig = make_subplots(rows=1, cols=4, subplot_titles=("cross-modal fraction", "best F1 on image patches",
                                                        "best F1 on the word", "one feature on both (weaker F1)"),
                        column_widths=[0.19, 0.27, 0.27, 0.27], horizontal_spacing=0.03)
    fig.add_trace(go.Scatter(x=layers, y=[r["cross_modal_fraction"] for r in sweep["layers"]], mode="lines+markers",
                             name="cross-modal fraction", showlegend=False), row=1, col=1)
    for key, col in (("image_f1", 2), ("text_f1", 3), ("shared_f1", 4)):
        z = [[r["concepts"][c][key] for r in sweep["layers"]] for c in concepts]
        fig.add_trace(go.Heatmap(z=z, x=[f"L{x}" for x in layers], y=concepts, zmin=0, zmax=1, colorscale="Viridis",
                                 showscale=col == 4, colorbar={"thickness": 12, "tickvals": [0, 0.5, 1]}),
                      row=1, col=col)
    for col in range(1, 5):
        fig.update_xaxes(title_text="layer", row=1, col=col)
    fig.update_yaxes(range=[0, 1.02], row=1, col=1)
    for col in (3, 4):  # the concepts' names once, beside the first heatmap
        fig.update_yaxes(showticklabels=False, row=1, col=col)
    fig.update_xaxes(dtick=1, tickformat="d")
    fig.update_layout(title=f"Cross-modal features of {sweep['model']} by layer (F1 >= {sweep['f1_min']} on both)",
                      template="plotly_white", width=1500, height=560, margin={"l": 60, "r": 70})
    write_figure(fig, run.figure("crossmodal_sweep", "html"))


def crossmodal_stage(run: RunLayout, layer: int, samples: int, d_sae: int, k: int, steps: int, seed: int) -> dict:
    """The demo's cross-modal stage at its layer: the nested all-roles run, its features, text explanations
    (the tokens protocol) and their scores; returns the summary keys (summary.json) it measures."""
    cfg = CrossModalSweepConfig(run=str(run.root), samples=samples, d_sae=d_sae, k=k, steps=steps, seed=seed)
    row = crossmodal_layer_run(run, layer, cfg, text=True)
    return {"text_explanation_accuracy": row["text"]["text_explanation_accuracy"],
            "text_detection_balanced_accuracy": row["text"]["detection_balanced_accuracy"],
            "text_features_explained": row["text"]["features"], "cross_modal_fraction": row["cross_modal_fraction"]}


def crossmodal_section(run: RunLayout, samples: int, d_sae: int, k: int, steps: int, seed: int,
                       layers: tuple[int, ...] | None = None, seeds: int = 1) -> tuple[dict, list[str]]:
    """`interp benchmark`'s cross-modal section: the layer sweep of the subject in RUN/ (every layer unless
    `layers`; `seeds` SAE training seeds per layer), and its markdown."""
    sweep = run_crossmodal_sweep(CrossModalSweepConfig(run=str(run.root), layers=layers, samples=samples,
                                                       d_sae=d_sae, k=k, steps=steps, seed=seed, seeds=seeds))
    rows = sweep["layers"]
    concepts = list(rows[0]["concepts"]) if rows else []
    lines = ["## Cross-modal features by layer", "",
             f"One TopK SAE ({d_sae} features, k = {k}) per layer of {sweep['model']} on image patches and "
             "question-answer text together; a concept is cross-modal when one feature detects its patches and its "
             f"word at F1 >= {sweep['f1_min']} each. Cells: the weaker of the two F1s of the best shared feature.", "",
             "| layer | cross-modal fraction | " + " | ".join(concepts) + " |", "|---|---|" + "---|" * len(concepts)]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['cross_modal_fraction']:.2f} | "
                     + " | ".join(f"{r['concepts'][c]['shared_f1']:.2f}" for c in concepts) + " |")
    lines += ["", "Figure: `crossmodal_sweep.html` (and `.png`)."]
    pooled = sweep.get("text")
    if pooled:
        def num(v):
            return "-" if v is None else f"{v:.3f}"

        lines += ["", "### Text explanations of word-matched features", "",
                  "Every layer's text features explained by the tokens protocol and scored on held-out contexts; a "
                  "feature is word-matched when it detects a world word's tokens at F1 >= 0.9.", "",
                  "| layer | seed | word-matched | names the word | detection |", "|---|---|---|---|---|"]
        for r in rows + sweep["further_seeds"]:
            t = r["text"]
            lines.append(f"| {r['layer']} | {r['seed']} | {t['matched']} | {num(t['text_explanation_accuracy'])} | "
                         f"{num(t['detection_balanced_accuracy'])} |")
        lines += ["", f"All layers and seeds: {pooled['matched']} word-matched features "
                      f"({', '.join(pooled['words'])}); the explanation names the word for "
                      f"{num(pooled['text_explanation_accuracy'])}, detection "
                      f"{num(pooled['detection_balanced_accuracy'])}."]
        if len(pooled["per_seed"]) > 1:
            a, d = pooled["text_explanation_accuracy_seeds"], pooled["detection_balanced_accuracy_seeds"]
            lines.append(f"Over {len(pooled['per_seed'])} SAE seeds: names the word mean {num(a and a['mean'])}, "
                         f"min {num(a and a['min'])}; detection mean {num(d and d['mean'])}, "
                         f"min {num(d and d['min'])}.")
    return sweep, lines


def add_crossmodal_section(run: RunLayout, report: dict, samples: int, d_sae: int, k: int, steps: int,
                           seed: int, layers: tuple[int, ...] | None = None, seeds: int = 1) -> dict:
    """Run the cross-modal section into a finished benchmark: `report["crossmodal"]` (rewritten to
    RUN/benchmark.json) and its markdown appended to RUN/report.md. Returns the sweep."""
    from interp.infra.durable import write_json, write_text

    sweep, lines = crossmodal_section(run, samples, d_sae, k, steps, seed, layers, seeds)
    report["crossmodal"] = sweep
    write_json(run.benchmark, report, indent=1)
    write_text(run.report, run.report.read_text().rstrip("\n") + "\n\n" + "\n".join(lines) + "\n")
    return sweep


COMMANDS = [Command("crossmodal-sweep", CrossModalSweepConfig, run_crossmodal_sweep,
                    "an SAE on image and text tokens at every layer of the subject, and its cross-modal concepts",
                    report=lambda r, cfg: print(f"wrote {RunLayout.of(cfg.run).crossmodal_sweep}"))]
