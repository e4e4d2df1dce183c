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

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

ARCH_DEFAULTS = {"topk": {}, "batchtopk": {}, "jumprelu": {}, "relu": {}}


def probe_directions(reader, rows: np.ndarray, labels: np.ndarray, steps: int = 300, seed: int = 0) -> np.ndarray:
    """[concepts, d] unit directions of logistic-regression probes on the raw activations."""
    from saes.recovery import contiguous_runs

    raw = torch.cat([reader.read(int(a), int(b)) for a, b in contiguous_runs(rows)])
    std = raw.std(0) + 1e-6
    x = (raw - raw.mean(0)) / std
    y = torch.from_numpy(labels.astype(np.float32))
    torch.manual_seed(seed)
    w = torch.zeros(x.shape[1], y.shape[1], requires_grad=True)
    b = torch.zeros(y.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    d = (w.detach() / std[:, None]).T  # the probe reads (x - mean) / std: its raw-space direction is w / std
    return (d / d.norm(dim=1, keepdim=True)).numpy()


def max_cosines(sae, directions: np.ndarray) -> np.ndarray:
    """Per direction, the max cosine with any decoder row (the dictionary's best match)."""
    w_dec = sae.W_dec.detach().float()
    w_dec = w_dec / w_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (torch.from_numpy(directions).float() @ w_dec.T).max(dim=1).values.numpy()


def _explain_and_steer(arch_dir: Path, cache: Path, steer_cache: Path | None, sae_cfg, train_cfg) -> dict:
    """Explanation accuracy on `cache`'s SAE, and the steering flip rate of a twin SAE on `steer_cache`;
    a stage that fails leaves its columns out of the report (n/a) instead of stopping the benchmark."""
    from explain.features import FeaturesConfig, compute_features
    from interp.pipeline.stages import explain_and_score, steering_twin

    out: dict = {}
    compute_features(cache, arch_dir / "sae", arch_dir / "features.h5", FeaturesConfig(progress=False))
    try:
        matched = explain_and_score(arch_dir)["matched"]
        out.update(explanation_accuracy=matched.get("concept_accuracy"),
                   detection_balanced_accuracy=matched.get("balanced_accuracy"))
    except ValueError as e:
        print(e)
    if steer_cache is not None:
        try:
            out["steering_success"] = steering_twin(steer_cache, arch_dir / "steering", sae_cfg, train_cfg,
                                                    n_attr=50)["flip"]["overall"]
        except ValueError as e:
            print(e)
    return out


def run_benchmark(cache: str | Path, out: str | Path, archs: tuple[str, ...] = tuple(ARCH_DEFAULTS),
                  d_sae: int = 256, k: int = 4, steps: int = 3000, batch_size: int = 1024, seed: int = 0,
                  steer_cache: str | Path | None = None, explain: bool = True) -> dict:
    from interp.shapes.ground_truth import token_concepts
    from interp.cache.reader import ActivationReader
    from interp.infra.runinfo import write_run_info
    from saes.evaluate import reconstruction_metrics
    from saes.recovery import recover_concepts, summarize
    from saes.sae import SAEConfig
    from saes.train import TrainConfig, train

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_run_info(out, {"command": "benchmark", "cache": str(cache), "archs": list(archs), "d_sae": d_sae, "k": k,
                         "steps": steps, "batch_size": batch_size, "seed": seed})
    reader = ActivationReader(cache)
    gt = token_concepts(reader, with_object=False)
    directions = probe_directions(reader, gt.rows, gt.labels(), seed=seed)
    results = {}
    for arch in archs:
        t = time.time()
        sae_dir = out / arch / "sae"
        sae_cfg = SAEConfig(arch=arch, d_in=reader.d, d_sae=d_sae, k=k, model_name=reader.meta["model"],
                            hook_name=reader.meta["module_path"], **ARCH_DEFAULTS[arch])
        train_cfg = TrainConfig(steps=steps, batch_size=batch_size, seed=seed, progress=False)
        res = train(sae_cfg, train_cfg, reader, out / arch)
        rec = reconstruction_metrics(res.sae, reader)
        recovery = summarize(recover_concepts(res.sae, reader))
        cos = max_cosines(res.sae, directions)
        results[arch] = {
            "fvu": round(rec["fvu"], 4), "l0": round(rec["l0"], 2), "dead_fraction": round(rec["dead_fraction"], 4),
            "concept_recovery": recovery["concept_recovery"], "mean_f1": recovery["mean_f1"],
            "f1": {m["concept"]: round(m["f1"], 4) for m in recovery["concepts"]},
            "probe_cosine": {c: round(float(v), 4) for c, v in zip(gt.concepts, cos)},
            "mean_probe_cosine": round(float(cos.mean()), 4), "seconds": round(time.time() - t, 1),
            "sae": str(sae_dir),
        }
        if explain:
            results[arch].update(_explain_and_steer(out / arch, Path(cache), steer_cache and Path(steer_cache),
                                                    sae_cfg, train_cfg))
            results[arch]["seconds"] = round(time.time() - t, 1)
        print(f"{arch:10s} FVU {results[arch]['fvu']:.4f}  L0 {results[arch]['l0']:5.1f}  recovery "
              f"{results[arch]['concept_recovery']:.2f}  mean F1 {results[arch]['mean_f1']:.3f}  "
              f"probe cos {results[arch]['mean_probe_cosine']:.3f}  explanations "
              f"{results[arch].get('explanation_accuracy')}  steering {results[arch].get('steering_success')}", flush=True)
    neuron_f1 = summarize(recover_concepts(res.sae, reader))["mean_neuron_f1"]
    report = {"cache": str(cache), "steer_cache": str(steer_cache) if steer_cache else None,
              "concepts": list(gt.concepts), "archs": results, "mean_neuron_f1": neuron_f1}
    (out / "benchmark.json").write_text(json.dumps(report, indent=1))
    _write_report(report, out)
    return report


def _write_report(report: dict, out: Path) -> None:
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
    (out / "report.md").write_text("\n".join(lines) + "\n")
    for key, title, name in (("f1", "Best latent F1 per concept", "recovery"),
                             ("probe_cosine", "Max cosine of a decoder row with the concept's probe", "probe_cosine")):
        fig = go.Figure([go.Bar(name=a, x=concepts, y=[report["archs"][a][key][c] for c in concepts]) for a in archs])
        fig.update_layout(barmode="group", title=title, template="plotly_white", yaxis_range=[0, 1.02])
        fig.write_html(out / f"{name}.html", include_plotlyjs="cdn")
        fig.write_json(out / f"{name}.json")


def register(sub) -> None:
    p = sub.add_parser("benchmark", help="SAE architectures side by side against the shapes world's ground truth",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--cache", default=None, help="activation cache of shapes-world images (default: make one in --out)")
    p.add_argument("--out", default="runs/benchmark", help="output directory (report.md, benchmark.json, figures)")
    p.add_argument("--archs", default=",".join(ARCH_DEFAULTS), help="architectures, comma separated")
    p.add_argument("--d-sae", type=int, default=256, help="latents of every SAE")
    p.add_argument("--k", type=int, default=4, help="k of topk and batchtopk")
    p.add_argument("--steps", type=int, default=3000, help="training steps per SAE")
    p.add_argument("--samples", type=int, default=3000, help="images to cache when no --cache is given")
    p.add_argument("--seed", type=int, default=0, help="seed of the SAEs and of the cached images")
    p.add_argument("--steer-cache", default=None,
                   help="cache for the steering column (default: make a layer-0 one in --out; colour has left "
                        "the subject's image tokens by layer 2)")
    p.add_argument("--no-explain", action="store_true", help="skip the explanation and steering columns")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    from interp.cache.writer import CacheConfig, build_cache

    archs = tuple(a.strip() for a in args.archs.split(",") if a.strip())
    unknown = set(archs) - set(ARCH_DEFAULTS)
    if unknown:
        raise ValueError(f"unknown architectures {sorted(unknown)}; known: {', '.join(ARCH_DEFAULTS)}")

    def subject_cache(layer: str, name: str) -> Path:
        return build_cache(CacheConfig(model="shapes-subject", layer=layer, n=args.samples, seed=args.seed, batch_size=32),
                           Path(args.out) / name)

    cache = args.cache or subject_cache("2", "activations.h5")
    steer_cache = None if args.no_explain else (args.steer_cache or subject_cache("0", "activations-layer0.h5"))
    run_benchmark(cache, args.out, archs, args.d_sae, args.k, args.steps, seed=args.seed, steer_cache=steer_cache,
                  explain=not args.no_explain)
    print(f"wrote {Path(args.out) / 'report.md'}")
    return 0
