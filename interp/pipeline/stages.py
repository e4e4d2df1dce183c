"""Later stages run in-process exactly as their commands run them, for the pipeline-level
commands (`interp demo`, `interp benchmark`) that chain them on shapes-world runs."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path


def explain_and_score(run_dir: Path) -> dict:
    """`interp explain` (shapes-explainer) then `interp score` on a run holding features.h5;
    returns score_summary.json."""
    from interp.cli import main as interp_main

    common = [str(run_dir), "--no-progress", "--device", "cpu"]
    if interp_main(["explain", *common, "--explainer", "shapes-explainer"]) or interp_main(["score", *common]):
        raise ValueError(f"the explain or score stage failed on {run_dir}; see the messages above")
    return json.loads((Path(run_dir) / "score_summary.json").read_text())


def steering_twin(cache: Path, out: Path, sae_cfg, train_cfg, seed: int = 0, n_attr: int = 100) -> dict:
    """Train an SAE like `sae_cfg` on `cache` into out/sae (skipped when there), write its recovery
    report and features, and run `interp steer targets`; returns steering_summary.json.

    The subject's colour has left the image tokens by layer 2, so steering is measured on a twin
    SAE at a layer where it still lives there (layer 0 in the demo and the benchmark)."""
    from explain.features import FeaturesConfig, compute_features
    from interp.cli import main as interp_main
    from interp.cache.reader import ActivationReader
    from saes.recovery import recover_concepts, summarize
    from saes.sae import SAE
    from saes.train import train

    sae_dir = out / "sae" / "sae"
    with ActivationReader(cache) as reader:
        if not (sae_dir / "cfg.json").exists():
            twin = replace(sae_cfg, d_in=reader.d, model_name=reader.meta["model"], hook_name=reader.meta["module_path"])
            train(twin, train_cfg, reader, out / "sae")
        if not (sae_dir / "recovery.json").exists():
            report = summarize(recover_concepts(SAE.load(sae_dir), reader))
            (sae_dir / "recovery.json").write_text(json.dumps(report, indent=1))
    if not (out / "features.h5").exists():
        compute_features(cache, sae_dir, out / "features.h5", FeaturesConfig(seed=seed, progress=False))
    if interp_main(["steer", "targets", "--sae", str(sae_dir), "--features", str(out / "features.h5"),
                    "--out", str(out / "steering_summary.json"), "--n-select", "60", "--n-eval", "150",
                    "--n-attr", str(n_attr), "--no-progress"]):
        raise ValueError(f"the steering stage failed on {out}; see the messages above")
    return json.loads((out / "steering_summary.json").read_text())
