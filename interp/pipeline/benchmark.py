"""`interp benchmark`: SAE architectures side by side on the shapes world's ground truth.

Every architecture is trained on the same cache with the same budget; for each, the report
gives reconstruction (FVU, L0, dead fraction), ground-truth feature recovery (best F1 per
concept), how well the dictionary aligns with linear-probe directions for the concepts (per
concept, the max cosine between the probe direction and any decoder row), how often
shapes-explainer's explanation names the matched concept (and detection balanced accuracy),
and, on a second cache at a layer where colour still lives in the image tokens, how often
clamping a colour feature flips the answer. A markdown report and plotly figures go to the
output directory, with the raw numbers in JSON.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

from interp.infra.cli_config import Command, at_least, choices, positional
from interp.infra.durable import write_json, write_text
from interp.infra.layout import RunLayout
from saes import architectures


@dataclass
class BenchmarkConfig:
    """`interp benchmark`: SAE architectures side by side against the shapes world's ground truth."""

    run: str = field(default="runs/benchmark", metadata=positional(required=False))
    """run directory: report.md, benchmark.json, figures, and one run per architecture (RUN/ARCH/)"""
    archs: tuple[str, ...] = field(default_factory=lambda: tuple(architectures.names()),
                                   metadata=choices(architectures.names))
    """architectures to train"""
    d_sae: int = field(default=256, metadata=at_least(1))
    """features of every SAE"""
    k: int = field(default=4, metadata=at_least(1))
    """active features per row (topk, batchtopk)"""
    steps: int = field(default=3000, metadata=at_least(1))
    """training steps per SAE"""
    batch_size: int = field(default=1024, metadata=at_least(1))
    """rows per training step"""
    samples: int = field(default=3000, metadata=at_least(1))
    """shapes-world samples to cache (when the run has no cache yet)"""
    seed: int = 0
    """seed of the SAEs and of the cached samples"""
    cache: str | None = None
    """an existing shapes-world cache to link into RUN/activations.h5 instead of caching"""
    steer_cache: str | None = None
    """an existing layer-0 cache for the steering column, linked into RUN/steering-layer0/ (none: cache one;
    colour has left the subject's image tokens by layer 2)"""
    explain: bool = True
    """the explanation and steering columns"""
    crossmodal: bool = True
    """the cross-modal section: an SAE on image and text tokens at every layer (interp.pipeline.crossmodal)"""


def _explain_and_steer(arch_run: RunLayout, steer_run: RunLayout | None, sae_cfg, train_cfg) -> dict:
    """Explanation accuracy on the architecture's SAE, and the steering flip rate of a twin SAE on the
    layer-0 cache; a stage that fails leaves its columns out of the report (n/a) instead of stopping."""
    from explain.features import FeaturesConfig, compute_features
    from interp.pipeline.stages import explain_and_score, steering_twin

    out: dict = {}
    compute_features(FeaturesConfig(run=str(arch_run.root), progress=False))
    try:
        matched = explain_and_score(arch_run)["matched"]
        out.update(explanation_accuracy=matched.get("concept_accuracy"),
                   detection_balanced_accuracy=matched.get("balanced_accuracy"))
    except ValueError as e:
        print(e)
    if steer_run is not None:
        twin = arch_run.steering_run(0)
        twin.link("cache", steer_run.cache)
        try:
            out["steering_success"] = steering_twin(twin, sae_cfg, train_cfg, n_attr=50)["flip"]["overall"]
        except ValueError as e:
            print(e)
    return out


def run_benchmark(cfg: BenchmarkConfig) -> dict:
    from interp.cache.reader import ActivationReader
    from interp.cache.writer import CacheConfig, build_cache
    from interp.infra.runinfo import write_run_info
    from interp.shapes.concepts import contiguous_runs, max_cosines, probe_directions, write_recovery
    from interp.shapes.ground_truth import token_concepts
    from saes.evaluate import reconstruction_metrics
    from saes.recovery import recover
    from saes.sae import SAEConfig, sae_fingerprint
    from saes.train import TrainConfig, train

    for arch in cfg.archs:  # before any cache is built
        architectures.get(arch)
    run = RunLayout.of(cfg.run).mkdir()

    def subject_cache(layout: RunLayout, layer: str, existing: str | None) -> None:
        if existing:
            layout.link("cache", existing)
        else:
            build_cache(CacheConfig(run=str(layout.root), model="shapes-subject", layer=layer, samples=cfg.samples,
                                    seed=cfg.seed, batch_size=32))

    subject_cache(run, "2", cfg.cache)
    steer_run = None
    if cfg.explain:
        steer_run = run.steering_run(0)
        subject_cache(steer_run, "0", cfg.steer_cache)
    write_run_info(run.run_info("benchmark"), {"command": "benchmark", "config": asdict(cfg)})
    reader = ActivationReader(run.cache)
    gt = token_concepts(reader, with_object=False)
    raw = torch.cat([reader.read(int(a), int(b)) for a, b in contiguous_runs(gt.rows)]).numpy()
    directions = probe_directions(raw, gt.labels(), seed=cfg.seed)
    results = {}
    recovery = None
    for arch in cfg.archs:
        t = time.time()
        arch_run = run.arch_run(arch)
        arch_run.link("cache", run.cache)
        sae_cfg = SAEConfig(arch=arch, d_in=reader.d, d_sae=cfg.d_sae, k=cfg.k, model_name=reader.meta["model"],
                            hook_name=reader.meta["module_path"])
        train_cfg = TrainConfig(steps=cfg.steps, batch_size=cfg.batch_size, seed=cfg.seed, progress=False)
        res = train(sae_cfg, train_cfg, reader, arch_run)
        rec = reconstruction_metrics(res.sae, reader)
        recovery = recover(res.sae, reader)
        recovery.extra["sae_sha256"] = sae_fingerprint(arch_run.sae)
        write_recovery(recovery, arch_run.recovery)
        cos = max_cosines(res.sae.W_dec.detach().float().numpy(), directions)
        results[arch] = {
            "fvu": round(rec["fvu"], 4), "l0": round(rec["l0"], 2), "dead_fraction": round(rec["dead_fraction"], 4),
            "concept_recovery": recovery.concept_recovery, "mean_f1": recovery.mean_f1,
            "f1": {m.concept: round(m.f1, 4) for m in recovery.concepts},
            "probe_cosine": {c: round(float(v), 4) for c, v in zip(gt.concepts, cos)},
            "mean_probe_cosine": round(float(cos.mean()), 4), "seconds": round(time.time() - t, 1),
            "sae": str(arch_run.sae),
        }
        if cfg.explain:
            results[arch].update(_explain_and_steer(arch_run, steer_run, sae_cfg, train_cfg))
            results[arch]["seconds"] = round(time.time() - t, 1)
        print(f"{arch:10s} FVU {results[arch]['fvu']:.4f}  L0 {results[arch]['l0']:5.1f}  recovery "
              f"{results[arch]['concept_recovery']:.2f}  mean F1 {results[arch]['mean_f1']:.3f}  "
              f"probe cos {results[arch]['mean_probe_cosine']:.3f}  explanations "
              f"{results[arch].get('explanation_accuracy')}  steering {results[arch].get('steering_success')}", flush=True)
    report = {"cache": str(run.cache), "steer_cache": str(steer_run.cache) if steer_run else None,
              "concepts": list(gt.concepts), "archs": results, "mean_neuron_f1": recovery.mean_neuron_f1}
    write_json(run.benchmark, report, indent=1)
    _write_report(report, run)
    if cfg.crossmodal:  # its own section, appended to report.md and benchmark.json
        from interp.pipeline.crossmodal import add_crossmodal_section

        add_crossmodal_section(run, report, min(cfg.samples, 1500), cfg.d_sae, cfg.k, cfg.steps, cfg.seed)
    reader.close()
    return report


def _write_report(report: dict, run: RunLayout) -> None:
    import plotly.graph_objects as go

    archs, concepts = list(report["archs"]), report["concepts"]
    lines = ["# SAE architectures on the shapes world", "", f"Cache: `{report['cache']}`", "",
             f"Steering measured on: `{report['steer_cache']}`", "",
             "| arch | FVU | L0 | dead | concepts at F1 >= 0.9 | mean F1 | mean probe cosine | explanation names the concept "
             "| detection bal. acc. | steering flip rate |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def fmt(v, spec=".3f"):
        return "n/a" if v is None else format(v, spec)

    for a in archs:
        r = report["archs"][a]
        lines.append(f"| {a} | {r['fvu']:.4f} | {r['l0']:.1f} | {r['dead_fraction']:.1%} | {r['concept_recovery']:.0%} "
                     f"| {r['mean_f1']:.3f} | {r['mean_probe_cosine']:.3f} | {fmt(r.get('explanation_accuracy'), '.0%')} "
                     f"| {fmt(r.get('detection_balanced_accuracy'))} | {fmt(r.get('steering_success'), '.1%')} |")
    lines += ["", f"Best single raw neuron, mean F1 over concepts: {report['mean_neuron_f1']:.3f}", "",
              "## Best F1 per concept", "", "| concept | " + " | ".join(archs) + " |", "|---|" + "---|" * len(archs)]
    for c in concepts:
        lines.append(f"| {c} | " + " | ".join(f"{report['archs'][a]['f1'][c]:.3f}" for a in archs) + " |")
    lines += ["", "Figures: `recovery.html` (F1 per concept), `probe_cosine.html`."]
    write_text(run.report, "\n".join(lines) + "\n")
    for key, title, name in (("f1", "Best feature F1 per concept", "recovery"),
                             ("probe_cosine", "Max cosine of a decoder row with the concept's probe", "probe_cosine")):
        fig = go.Figure([go.Bar(name=a, x=concepts, y=[report["archs"][a][key][c] for c in concepts]) for a in archs])
        fig.update_layout(barmode="group", title=title, template="plotly_white", yaxis_range=[0, 1.02])
        fig.write_html(run.figure(name, "html"), include_plotlyjs="cdn")
        fig.write_json(run.figure(name, "json"))


COMMANDS = [Command("benchmark", BenchmarkConfig, run_benchmark,
                    "SAE architectures side by side against the shapes world's ground truth",
                    report=lambda r, cfg: print(f"wrote {RunLayout.of(cfg.run).report}"))]
