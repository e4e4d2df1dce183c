"""Later stages run in-process, through the same functions their commands call, for the pipeline
commands (`interp demo`, `interp benchmark`) that chain them on shapes-world runs."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from interp.infra.layout import RunLayout


def explain_and_score(run: str | Path | RunLayout) -> dict:
    """`interp explain` (shapes-explainer) then `interp score` on a run holding features.h5;
    returns the score summary (RUN/score_summary.json)."""
    from explain.commands import ExplainConfig, ScoreConfig, run_explain, run_score

    layout = RunLayout.of(run)
    explained = run_explain(ExplainConfig(run=str(layout.root), progress=False))
    if explained.failed or explained.aborted:
        raise ValueError(f"the explain stage failed on {layout.root}; see the messages above")
    summary = run_score(ScoreConfig(run=str(layout.root), progress=False))
    if summary["failed"]:
        raise ValueError(f"the score stage failed on {layout.root}; see the messages above")
    return summary


def steering_twin(run: str | Path | RunLayout, sae_cfg, train_cfg, seed: int = 0, n_attr: int = 100) -> dict:
    """On a run holding a cache: train an SAE like `sae_cfg` (skipped when there), write its recovery
    report and features, and run `interp steer-targets`; returns the steering summary.

    The subject's colour has left the image tokens by layer 2, so steering is measured on a twin
    SAE at a layer where it still lives there (layer 0 in the demo and the benchmark)."""
    from explain.features import FeaturesConfig, compute_features
    from interp.cache.reader import ActivationReader
    from saes.recovery import RecoveryConfig, run_recovery
    from saes.train import train
    from steering.targets import shapes_targets

    layout = RunLayout.of(run)
    if not (layout.sae / "cfg.json").exists():
        with ActivationReader(layout.cache) as reader:
            twin = replace(sae_cfg, d_in=reader.d, model_name=reader.meta["model"], hook_name=reader.meta["module_path"])
            train(twin, train_cfg, reader, layout)
    if not layout.recovery.exists():
        run_recovery(RecoveryConfig(run=str(layout.root)))
    if not layout.features.exists():
        compute_features(FeaturesConfig(run=str(layout.root), seed=seed, progress=False))
    return shapes_targets(layout, n_select=60, n_eval=150, n_attr=n_attr, progress=False)
