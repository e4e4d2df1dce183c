"""Later stages run in-process, through the same functions their commands call, for the pipeline
commands (`interp demo`, `interp benchmark`) that chain them on shapes-world runs."""

from __future__ import annotations

from pathlib import Path

from interp.infra.layout import RunLayout


def ensure_features(run: str | Path | RunLayout, seed: int = 0) -> RunLayout:
    """`interp features` on a run that lacks RUN/features.h5 (quietly); the run's layout."""
    from explain.features import FeaturesConfig, compute_features

    layout = RunLayout.of(run)
    if not layout.features.exists():
        compute_features(FeaturesConfig(run=str(layout.root), seed=seed, progress=False))
    return layout


def explain_and_score(run: str | Path | RunLayout, explainer: str = "shapes-explainer", judge: str | None = None,
                      progress: bool = False, features: list[int] | None = None) -> dict:
    """`interp explain` then `interp score` on a run holding features.h5 (every live feature; `explainer`:
    shapes-explainer, or "oracle" for the world's ground truth in its grammar; `judge`: the explainer
    unless given). Returns the score summary (RUN/score_summary.json), whose headline keys are
    `live_features`, `explained_live_fraction` (live features whose explanation's detection balanced
    accuracy is >= 0.85; unexplained ones count against it), `detection_balanced_accuracy_all` (the mean
    over all scored features), `explanation_accuracy` (concept-matched features whose explanation names
    the matched concept exactly) and `detection_balanced_accuracy` (the mean over the matched ones), next to
    `all` and `matched` (with the oracle judge's balanced accuracy, `balanced_accuracy_oracle`).

    With the commands' own example counts (`explain.examples.SelectionConfig`), so the demo's numbers
    are what `interp explain` and `interp score` give on its run: until 2026-12-08 it explained from 12
    examples and scored on 16 + 16 regions to save time, which explained 0.28 of one run's live features
    where the commands explained 0.42. `features`: only these (default: every live one)."""
    from explain.commands import ExplainConfig, FeatureSelection, ScoreConfig, run_explain, run_score

    layout = RunLayout.of(run)
    selection = FeatureSelection(features=tuple(features) if features else None)
    explained = run_explain(ExplainConfig(run=str(layout.root), explainer=explainer, selection=selection,
                                          progress=progress))
    if explained.failed or explained.aborted:
        raise ValueError(f"the explain stage failed on {layout.root}; see the messages above")
    summary = run_score(ScoreConfig(run=str(layout.root), judge=judge, selection=selection, progress=progress))
    if summary["failed"]:
        raise ValueError(f"the score stage failed on {layout.root}; see the messages above")
    return summary


def steer_and_attribute(run: str | Path | RunLayout, seed: int = 0, *, n_select: int = 30, n_eval: int = 80,
                        n_attr: int = 40, progress: bool = False) -> dict:
    """`interp steer-targets` on a run's own SAE, at its own layer (no twin SAE): colour and shape features
    clamped on the image patches or on every token (steering.targets.DEFAULT_POSITIONS), positions and
    strength picked per feature on validation questions, flip rates on test questions, attribution and
    image-token reach (~100 s on 2 cores at these sizes). Writes the recovery report and feature statistics
    first when the run lacks them; returns the demo summary's steering keys (`steering.targets.headline`;
    the whole measurement is RUN/steering_summary.json)."""
    from saes.recovery import RecoveryConfig, run_recovery
    from steering.targets import headline, shapes_targets

    layout = RunLayout.of(run)
    if not (layout.sae / "cfg.json").exists():
        raise FileNotFoundError(f"no SAE at {layout.sae}: train one first (`interp train {layout.root}`)")
    if not layout.recovery.exists():
        run_recovery(RecoveryConfig(run=str(layout.root)))
    ensure_features(layout, seed)
    return headline(shapes_targets(layout, n_select=n_select, n_eval=n_eval, n_attr=n_attr, seed=seed,
                                   progress=progress))
