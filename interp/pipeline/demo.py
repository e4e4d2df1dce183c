"""`interp demo`: the main job on the embedded default (the shapes world and its organisms).

Every stage on the shapes organisms, each through the same function its own command runs: the
organisms' held-out accuracy, cache, SAE training, evaluation, feature statistics, ground-truth
recovery, explanations by shapes-explainer and their scores, steering and attribution. Everything
goes to one run directory (interp.infra.layout); re-running resumes: finished stages are read
back, not redone.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace

from interp.infra.cli_config import Command, at_least, choices, positional
from interp.infra.durable import write_json
from interp.infra.layout import RunLayout
from saes import architectures

SUMMARY_KEYS = ("fvu", "l0", "dead_fraction", "ce_loss_recovered", "concepts", "concept_recovery",
                "concept_recovery_seeds", "concept_recovery_ceiling", "live_features", "explained_live_fraction",
                "unscorable_features", "explained_scorable_fraction", "detection_balanced_accuracy_all",
                "explanation_accuracy", "detection_balanced_accuracy", "sae_layer",
                "steering_layer", "image_token_reach", "steering_success", "steering_success_shape",
                "attribution_top5", "attribution_top5_patching", "text_explanation_accuracy",
                "text_detection_balanced_accuracy", "cross_modal_fraction", "seconds")


@dataclass
class DemoConfig:
    """`interp demo`: the whole pipeline on the shapes world and its organisms."""

    run: str = field(default="runs/demo", metadata=positional(required=False))
    """run directory to write"""
    samples: int = field(default=2000, metadata=at_least(1))
    """shapes-world samples to cache (64 image tokens each)"""
    layer: str = "4"
    """subject layer whose residual stream is cached: its middle one (of 8), where the answers still
    read the image tokens (summary: image_token_reach); steering runs at this layer too"""
    arch: str = field(default="batchtopk", metadata=choices(architectures.names))
    """SAE architecture (batchtopk: its concept recovery holds across training seeds; topk's does not)"""
    d_sae: int = field(default=64, metadata=at_least(1))
    """features of the SAE (64 for the world's 33 concepts: a wider SAE splits them into features the world
    has no words for; 256 at k 8 recovers no more concepts and 0.16 of its live features can be explained
    even by the ground truth, 64 at k 4 0.40; docs/organisms.md)"""
    k: int = field(default=4, metadata=at_least(1))
    """active features per row (batchtopk: on average over a batch)"""
    whiten: float = 0.01
    """SAE input whitening, its ridge as a fraction of the largest eigenvalue (0: off): the subject keeps
    each colour's own direction in low-variance dimensions under a dominant 2-D colour plane, and
    whitening lets the SAE find them (docs/organisms.md)"""
    steps: int = field(default=1000, metadata=at_least(1))
    """SAE training steps (batches of 1024 rows)"""
    questions: int = 100
    """held-out questions per task for the organisms' accuracy and the VQA with the SAE"""
    seed: int = 0
    """seed of the world samples and of the SAE"""
    recovery_seeds: int = field(default=5, metadata=at_least(1))
    """SAE training seeds (seed, seed + 1, ...) whose concept recovery summary.json reports as
    concept_recovery_seeds (1: the run's own SAE only)"""
    crossmodal: bool = True
    """run the cross-modal stage (image patches and question-answer text in one SAE, of the cross-modal
    sweep's own recipe, not this one's width; a minute)"""
    notebooks: bool = False
    """then run the analysis notebooks on the run and keep executed copies with their outputs in
    RUN/notebooks/ (as `interp notebooks RUN`; minutes more)"""


def demo_sae_config(cfg: DemoConfig = DemoConfig()):
    """The demo's SAE recipe (`saes.sae.SAEConfig`, d_in still to fill in from the cache), which tests of
    the recipe train too."""
    from saes.sae import SAEConfig

    return SAEConfig(arch=cfg.arch, d_sae=cfg.d_sae, k=cfg.k, whiten=cfg.whiten)


def _stage(name: str):
    print(f"\n== {name}", flush=True)
    return time.time()


def run_demo(cfg: DemoConfig) -> dict:
    from explain.features import FeaturesConfig, compute_features
    from interp.cache.reader import ActivationReader
    from interp.cache.writer import CacheConfig, build_cache
    from interp.infra.runinfo import write_run_info
    from interp.pipeline.stages import explain_and_score, steer_and_attribute
    from interp.shapes.organisms import ORGANISMS, load_organism
    from interp.shapes.organisms.build import SPECS
    from interp.shapes.organisms.eval import evaluate, image_token_reach
    from interp.shapes.world import WorldConfig, concept_names, contact_sheet
    from saes.evaluate import EvalConfig, evaluate_sae
    from saes.recovery import RecoveryConfig, recovery_across_seeds, run_recovery
    from saes.train import TrainConfig, train

    t0 = time.time()
    run = RunLayout.of(cfg.run).mkdir()
    write_run_info(run.run_info("demo"), {"command": "demo", "config": asdict(cfg), "world": WorldConfig().to_json()})
    contact_sheet(WorldConfig(), 6, "test", cfg.seed).save(run.world_sheet)
    summary: dict = {"stages": {}, "concepts": len(concept_names(WorldConfig())), "sae_layer": int(cfg.layer)}

    t = _stage("organisms: held-out accuracy")
    for name, which in ORGANISMS.items():
        model, processor = load_organism(name)
        acc = evaluate(model, processor, SPECS[which].eval_tasks, n=cfg.questions, split="test", seed=cfg.seed)
        summary[name] = acc
        print(f"{name:17s} " + "  ".join(f"{k} {v:.2f}" for k, v in acc.items()))
        if name == "shapes-subject":
            summary["image_token_reach"] = image_token_reach(model, processor, int(cfg.layer), n=cfg.questions * 2,
                                                             seed=cfg.seed)
            print(f"image_token_reach at layer {cfg.layer}: {summary['image_token_reach']:.2f} of answers change "
                  "when the image tokens there come from another image")
    summary["stages"]["organisms"] = round(time.time() - t, 1)

    t = _stage(f"cache: shapes-subject layer {cfg.layer}, {cfg.samples} samples")
    build_cache(CacheConfig(run=str(run.root), model="shapes-subject", layer=cfg.layer, samples=cfg.samples,
                            seed=cfg.seed, batch_size=32))
    summary["stages"]["cache"] = round(time.time() - t, 1)

    t = _stage(f"train: {cfg.arch} SAE, {cfg.d_sae} features, k={cfg.k}, whiten={cfg.whiten}")
    sae_cfg = demo_sae_config(cfg)
    if not (run.sae / "cfg.json").exists():
        with ActivationReader(run.cache) as reader:
            train(replace(sae_cfg, d_in=reader.d, model_name="shapes-subject", hook_name=reader.meta["module_path"]),
                  TrainConfig(steps=cfg.steps, batch_size=1024, seed=cfg.seed), reader, run)
    summary["stages"]["train"] = round(time.time() - t, 1)

    t = _stage("eval: reconstruction, spliced CE, VQA with the SAE")
    ev = evaluate_sae(EvalConfig(run=str(run.root), samples=64, questions=cfg.questions))
    summary.update(fvu=round(ev["fvu"], 4), l0=round(ev["l0"], 2), dead_fraction=round(ev["dead_fraction"], 4),
                   ce_loss_recovered=round(ev["spliced"]["ce_loss_recovered"], 4))
    summary["vqa_with_sae"] = ev.get("vqa", {}).get("spliced")
    summary["stages"]["eval"] = round(time.time() - t, 1)

    t = _stage("features: per-feature statistics and top samples")
    if not run.features.exists():
        compute_features(FeaturesConfig(run=str(run.root), seed=cfg.seed))
    summary["stages"]["features"] = round(time.time() - t, 1)

    t = _stage("recovery: a feature for each concept of the world?")
    rec = run_recovery(RecoveryConfig(run=str(run.root)))
    for m in rec.concepts:
        print(f"  {m.concept:18s} feature {m.feature:4d}  F1 {m.f1:.3f}  (best raw neuron {m.neuron_f1:.3f}, "
              f"linear probe {m.probe_f1:.3f})")
    summary["concept_recovery"] = rec.concept_recovery
    summary["concept_recovery_ceiling"] = rec.linear_ceiling  # what a linear probe finds: the model's share
    summary["stages"]["recovery"] = round(time.time() - t, 1)

    t = _stage(f"recovery across {cfg.recovery_seeds} SAE training seeds: the recipe's, not a lucky seed's")
    seeds = list(range(cfg.seed, cfg.seed + max(1, cfg.recovery_seeds)))
    with ActivationReader(run.cache) as reader:
        by_seed = recovery_across_seeds(reader, replace(sae_cfg, d_in=reader.d),
                                        TrainConfig(steps=cfg.steps, batch_size=1024), seeds, known={cfg.seed: rec})
    summary["concept_recovery_seeds"] = [by_seed[s].concept_recovery for s in seeds]
    print("  " + ", ".join(f"seed {s}: {by_seed[s].concept_recovery:.2f}" for s in seeds))
    summary["stages"]["recovery_seeds"] = round(time.time() - t, 1)

    t = _stage("explain and score: shapes-explainer describes each live feature's regions, then held-out ones")
    scores = explain_and_score(run)
    for key in ("live_features", "explained_live_fraction", "unscorable_features", "explained_scorable_fraction",
                "detection_balanced_accuracy_all", "explanation_accuracy", "detection_balanced_accuracy"):
        summary[key] = scores.get(key)
    summary["stages"]["explain"] = round(time.time() - t, 1)

    if cfg.crossmodal:
        from interp.pipeline.crossmodal import CrossModalSweepConfig, crossmodal_stage

        own = CrossModalSweepConfig()  # its own width: the question-answer text's words need more features
        t = _stage(f"cross-modal: image patches and question-answer text together at layer {cfg.layer} "
                   f"({own.arch} SAE, {own.d_sae} features, k={own.k})")
        summary.update(crossmodal_stage(run, int(cfg.layer), min(cfg.samples, 800), own.d_sae, own.k, cfg.steps,
                                        cfg.seed))
        summary["stages"]["crossmodal"] = round(time.time() - t, 1)

    t = _stage(f"steering and attribution: clamping the SAE's own colour and shape features at layer {cfg.layer}")
    steering = steer_and_attribute(run, seed=cfg.seed)
    for key in ("steering_layer", "steering_success", "steering_success_shape", "attribution_top5",
                "attribution_top5_patching"):
        summary[key] = steering.get(key)
    summary["stages"]["steering"] = round(time.time() - t, 1)

    summary["seconds"] = round(time.time() - t0, 1)
    write_json(run.summary, summary, indent=1)
    if cfg.notebooks:
        from interp.pipeline.notebooks import NotebooksConfig, execute_notebooks

        _stage("notebooks: executed copies with their outputs in RUN/notebooks/")
        executed = execute_notebooks(NotebooksConfig(run=str(run.root)))
        summary["notebooks"] = {r.name: {"path": str(r.path), "seconds": r.seconds, "error": r.error} for r in executed}
        write_json(run.summary, summary, indent=1)
    return summary


def _report(summary: dict, cfg: DemoConfig) -> None:
    run = RunLayout.of(cfg.run)
    print("\n== summary")
    for key in SUMMARY_KEYS:
        print(f"  {key:32s} {summary.get(key)}")
    print(f"\nwrote {run.summary}")
    print(f"open the feature browser on this run with:  interp app {run.root}")


COMMANDS = [Command("demo", DemoConfig, run_demo, "run the pipeline on the shapes world and its organisms",
                    report=_report)]
