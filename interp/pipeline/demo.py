"""`interp demo`: the main job on the embedded default (the shapes world and its organisms).

Every stage on the shapes organisms, each through the same function its own command uses:
the organisms' held-out accuracy, cache, SAE training, evaluation, feature statistics,
ground-truth recovery, explanations by shapes-explainer and their scores, steering and
attribution. Re-running resumes: finished stages are read back, not redone.
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
    p.add_argument("--samples", type=int, default=3000, help="shapes-world images to cache")
    p.add_argument("--layer", default="2", help="subject layer whose residual stream is cached")
    p.add_argument("--d-sae", type=int, default=256, help="SAE latents")
    p.add_argument("--k", type=int, default=4, help="TopK active latents per token")
    p.add_argument("--steps", type=int, default=3000, help="SAE training steps")
    p.add_argument("-n", type=int, default=100, help="held-out questions per task for the organisms' accuracy")
    p.add_argument("--seed", type=int, default=0, help="seed of the world samples and of the SAE")
    p.set_defaults(func=run)


def _stage(name: str):
    print(f"\n== {name}", flush=True)
    return time.time()


def run(args) -> int:
    from interp.cache.writer import CacheConfig, build_cache
    from interp.shapes.organisms import ORGANISMS, load_organism
    from interp.shapes.organisms.build import SPECS
    from interp.shapes.organisms.eval import evaluate
    from interp.cache.reader import ActivationReader
    from interp.infra.runinfo import write_run_info
    from interp.pipeline.stages import explain_and_score, steering_twin
    from interp.shapes.world import WorldConfig, contact_sheet
    from saes.evaluate import evaluate_sae
    from saes.recovery import recover_concepts, summarize
    from saes.sae import SAE, SAEConfig
    from saes.train import TrainConfig, train

    t0 = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_run_info(out, {"command": "demo", "config": vars(args) | {"func": None}, "world": WorldConfig().to_json()})
    contact_sheet(WorldConfig(), 6, "test", args.seed).save(out / "world.png")
    summary: dict = {"stages": {}}

    t = _stage("organisms: held-out accuracy")
    for name, which in ORGANISMS.items():
        model, processor = load_organism(name)
        acc = evaluate(model, processor, SPECS[which].tasks, n=args.n, split="test", seed=args.seed)
        summary[name] = acc
        print(f"{name:17s} " + "  ".join(f"{k} {v:.2f}" for k, v in acc.items()))
    summary["stages"]["organisms"] = round(time.time() - t, 1)

    t = _stage(f"cache: shapes-subject layer {args.layer}, {args.samples} images")
    cache = build_cache(CacheConfig(model="shapes-subject", layer=args.layer, n=args.samples, seed=args.seed,
                                    batch_size=32), out / "activations.h5")
    summary["stages"]["cache"] = round(time.time() - t, 1)

    t = _stage(f"train: TopK SAE, {args.d_sae} latents, k={args.k}")
    sae_dir = out / "sae" / "sae"
    if not (sae_dir / "cfg.json").exists():
        with ActivationReader(cache) as reader:
            train(SAEConfig(arch="topk", d_in=reader.d, d_sae=args.d_sae, k=args.k, model_name="shapes-subject",
                            hook_name=reader.meta["module_path"]),
                  TrainConfig(steps=args.steps, batch_size=1024, seed=args.seed), reader, out / "sae")
    summary["stages"]["train"] = round(time.time() - t, 1)

    t = _stage("eval: reconstruction, spliced CE, VQA with the SAE")
    ev = evaluate_sae(sae_dir, cache, out / "eval", n_samples=64, vqa_n=args.n)
    summary.update(fvu=round(ev["fvu"], 4), l0=round(ev["l0"], 2), dead_fraction=round(ev["dead_fraction"], 4),
                   ce_loss_recovered=round(ev["spliced"]["ce_loss_recovered"], 4))
    summary["vqa_with_sae"] = ev.get("vqa", {}).get("spliced")
    summary["stages"]["eval"] = round(time.time() - t, 1)

    t = _stage("features: per-feature statistics and top images")
    from explain.features import FeaturesConfig, compute_features

    features = out / "features.h5"
    if not features.exists():
        compute_features(cache, sae_dir, features, FeaturesConfig(seed=args.seed))
    summary["stages"]["features"] = round(time.time() - t, 1)

    t = _stage("recovery: a latent for each colour and shape?")
    with ActivationReader(cache) as reader:
        rec = summarize(recover_concepts(SAE.load(sae_dir), reader))
    (sae_dir / "recovery.json").write_text(json.dumps(rec, indent=1))  # where `interp recovery` puts it
    for m in rec["concepts"]:
        print(f"  {m['concept']:9s} latent {m['latent']:4d}  F1 {m['f1']:.3f}  (best raw neuron {m['neuron_f1']:.3f})")
    summary["concept_recovery"] = rec["concept_recovery"]
    summary["stages"]["recovery"] = round(time.time() - t, 1)

    t = _stage("explain and score: shapes-explainer describes each live feature, then judges held-out images")
    scores = explain_and_score(out)
    matched = scores["matched"]
    summary["explanation_accuracy"] = matched.get("concept_accuracy")
    summary["detection_balanced_accuracy"] = matched.get("balanced_accuracy")
    summary["explained_features"] = scores["all"]["n"]
    summary["stages"]["explain"] = round(time.time() - t, 1)

    # By layer 2 the subject has copied each object's colour from the image tokens into the
    # question's positions, so image-token steering there changes no answer (a measured fact of
    # this model's circuit). Steering and attribution run on a layer-0 SAE, where colour still
    # lives in the image tokens.
    t = _stage("steering and attribution: a layer-0 SAE clamps colour features")
    steer_dir = out / "steering-layer0"
    steer_cache = build_cache(CacheConfig(model="shapes-subject", layer="0", n=args.samples, seed=args.seed,
                                          batch_size=32), steer_dir / "activations.h5")
    steering = steering_twin(steer_cache, steer_dir, SAEConfig(arch="topk", d_in=SAE.load(sae_dir).cfg.d_in, d_sae=args.d_sae, k=args.k),
                             TrainConfig(steps=args.steps, batch_size=1024, seed=args.seed, progress=False), args.seed)
    summary["steering_success"] = round(steering["flip"]["overall"], 4)
    attribution = steering["attribution"]
    ig = next((v for k, v in attribution.items() if k.startswith("integrated_gradients")), None)
    summary["attribution_top5"] = round((ig or attribution["patching"])["top5_rate"], 4)
    summary["attribution_top5_patching"] = round(attribution["patching"]["top5_rate"], 4)
    summary["steering_layer"] = steering["layer"]
    summary["stages"]["steering"] = round(time.time() - t, 1)

    summary["seconds"] = round(time.time() - t0, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("\n== summary")
    for key in ("fvu", "l0", "dead_fraction", "ce_loss_recovered", "concept_recovery", "explanation_accuracy",
                "detection_balanced_accuracy", "steering_success", "attribution_top5", "attribution_top5_patching",
                "seconds"):
        print(f"  {key:28s} {summary[key]}")
    print(f"\nwrote {out / 'summary.json'}")
    print(f"open the feature browser on this run with:  interp app {out}")
    return 0
