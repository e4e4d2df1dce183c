"""`interp explain-text` and `interp score-text`: explanations of the run's features from their text contexts.

    interp explain-text RUN                      # features active on text; shapes-explainer -> the tokens protocol
    interp explain-text RUN --explainer http://127.0.0.1:8000/v1 --api-model NAME     # any OpenAI-compatible LMM
    interp score-text RUN                        # detection and fuzzing on held-out contexts

The run's cache must hold text rows (`interp cache --data shapes:train:qa --prompt-template '{image} {text}'
--roles image_patch,text,answer`). Records go to RUN/text_explanations.jsonl and RUN/text_scores.jsonl (feature
stores, resumable like `interp explain`), the summary to RUN/text_score_summary.json. The features a text
explanation should name a word for are the best text features of RUN/crossmodal.json (`interp crossmodal`,
made here when missing on a shapes-world cache).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace

from explain.commands import FeatureSelection, made_by, select_features
from explain.examples import SelectionConfig, explain_examples, heldout_examples, negative_examples
from explain.explainers import ExplainerOptions, speaks_world
from interp.infra.cli_config import Command, choices, positional
from interp.infra.layout import RunLayout

PROTOCOL_CHOICES = ("auto", "tokens", "generic")


def text_protocol(explainer: str, protocol: str, api_model: str | None = None) -> str:
    """auto: the tokens protocol for a shapes organism (it cannot read free text), generic otherwise."""
    if protocol not in PROTOCOL_CHOICES:
        raise ValueError(f"--text-protocol must be one of {', '.join(PROTOCOL_CHOICES)}, got {protocol!r}")
    if protocol != "auto":
        return protocol
    return "tokens" if speaks_world(api_model or explainer) else "generic"


def _text_features(stats, selection: FeatureSelection) -> list[int]:
    """The selected live features that fire on text rows (an explicit --features list is kept as given)."""
    live, _ = select_features(stats, selection.features, None, selection.filter)
    table = stats.summary_table()
    if not selection.features and not selection.filter:
        modality = stats.modalities()  # once: [d_sae]
        live = [f for f in live if table["n_active_text"][f] > 0 and modality[f] != "image"]
    if selection.densest:
        live = sorted(live, key=lambda f: -float(table["density_text"][f]))[: selection.densest]
    return live


@dataclass
class TextExplainConfig:
    """`interp explain-text`: explain the run's text features from marked token contexts (resumable)."""

    run: str | None = field(default=None, metadata=positional())
    """run directory: reads RUN/features.h5, RUN/activations.h5 (with text rows), RUN/sae/; writes
    RUN/text_explanations.jsonl"""
    selection: FeatureSelection = field(default_factory=FeatureSelection)
    explainer: str = "shapes-explainer"
    """an OpenAI-compatible URL (http://HOST:PORT/v1) or a local model; a shapes organism gets the tokens protocol"""
    text_protocol: str = field(default="auto", metadata=choices(list(PROTOCOL_CHOICES)))
    """tokens: the marked words most examples share (no model); generic: ask the explainer; auto: tokens for a
    shapes organism, else generic"""
    options: ExplainerOptions = field(default_factory=ExplainerOptions)
    explain_top: int = SelectionConfig.explain_top
    """top contexts shown to the explainer"""
    explain_quantile: int = SelectionConfig.explain_quantile
    """quantile-band contexts shown to the explainer"""
    explain_negatives: int = 5
    """random non-activating contexts shown as counterexamples"""
    bands: int = SelectionConfig.bands
    """quantile bands the contexts are spread over"""
    max_tokens: int = 64
    """tokens of a context around its strongest token"""
    redo: bool = False
    """redo features that are already done"""
    progress: bool = True
    """progress bar"""


def run_explain_text(cfg: TextExplainConfig) -> dict:
    from explain.commands import _open_sources
    from explain.store import FeatureStore
    from explain.text import load_contexts, make_text_explainer
    from interp.infra.runinfo import write_run_info
    from saes.crossmodal import tokenizer_of

    layout = RunLayout.of(cfg.run)
    protocol = text_protocol(cfg.explainer, cfg.text_protocol, cfg.options.api_model)
    sel = SelectionConfig(explain_top=cfg.explain_top, explain_quantile=cfg.explain_quantile, bands=cfg.bands,
                          score_negatives=cfg.explain_negatives)
    done = failed = 0
    with _open_sources(layout, cfg.options.device) as sources:
        stats = sources.features
        if not stats.meta.get("n_text_rows"):
            raise ValueError(f"{layout.cache} holds no text rows: cache with --data shapes:train:qa --prompt-template "
                             "'{image} {text}' --roles image_patch,text,answer to explain text features")
        tokenizer = tokenizer_of(sources.reader)
        explainer = make_text_explainer(cfg.explainer, protocol, cfg.options, layout.explainer_cache)
        store = FeatureStore(layout.text_explanations, {"store": "text_explanations",
                                                        "sae_sha256": stats.meta["sae_sha256"], "features": str(stats.path)})
        live = _text_features(stats, cfg.selection)
        made = made_by("explainer", explainer.name, cfg.explainer, sel)
        todo = [f for f in live if cfg.redo or not store.done(f, **made)]
        write_run_info(layout.run_info("explain-text"), {"command": "explain-text", "explainer": explainer.name,
                                                         "config": asdict(cfg), "features": len(live), "to_do": len(todo)})
        print(f"{len(live) - len(todo)} of {len(live)} text features already explained by {explainer.name}; "
              f"{len(todo)} to do -> {layout.text_explanations}")
        for f in todo:
            t0 = time.time()
            try:
                picked = explain_examples(stats, f, sel, modality="text")
                negs = negative_examples(stats, f, sel, modality="text")
                e = explainer.explain(load_contexts(sources, f, picked, tokenizer, cfg.max_tokens),
                                      load_contexts(sources, f, negs, tokenizer, cfg.max_tokens))
                rec = {"feature": f, "status": "ok", "explanation": e.text, "raw": e.raw, "tokens_in": e.tokens_in,
                       "tokens_out": e.tokens_out, "examples": [p.example.sample for p in picked],
                       "sources": [p.source for p in picked], "negatives": [p.example.sample for p in negs]}
                done += 1
            except Exception as exc:  # one feature's failure is recorded; the run goes on
                rec = {"feature": f, "status": "error", "error": f"{type(exc).__name__}: {exc}"}
                failed += 1
            store.put({**rec, "seconds": round(time.time() - t0, 3), **made, "protocol": protocol,
                       "explainer_config": {"explainer": cfg.explainer, **asdict(cfg.options)}})
    print(f"explained {done} text features ({failed} failed) -> {layout.text_explanations}")
    return {"explained": done, "failed": failed, "out": str(layout.text_explanations)}


@dataclass
class TextScoreConfig:
    """`interp score-text`: detection and fuzzing of the run's text explanations on held-out contexts."""

    run: str | None = field(default=None, metadata=positional())
    """run directory: reads RUN/text_explanations.jsonl (and RUN/crossmodal.json); writes RUN/text_scores.jsonl and
    RUN/text_score_summary.json"""
    selection: FeatureSelection = field(default_factory=FeatureSelection)
    judge: str | None = None
    """judge model or URL (none: the explainer the explanations were made with, in its protocol)"""
    text_protocol: str = field(default="auto", metadata=choices(list(PROTOCOL_CHOICES)))
    """the judge's protocol (auto: the one the explanations were made with)"""
    options: ExplainerOptions = field(default_factory=ExplainerOptions)
    score_top: int = SelectionConfig.score_top
    """held-out top contexts"""
    score_quantile: int = SelectionConfig.score_quantile
    """held-out quantile-band contexts"""
    score_negatives: int = 15
    """held-out non-activating contexts (not the explainer's counterexamples)"""
    bands: int = SelectionConfig.bands
    """quantile bands the contexts are spread over"""
    max_tokens: int = 64
    """tokens of a context around its strongest token"""
    f1_min: float = 0.9
    """text F1 at which a feature matches a concept's word (RUN/crossmodal.json)"""
    seed: int = 0
    """seed of the fuzzing marks"""
    redo: bool = False
    """redo features that are already done"""
    progress: bool = True
    """progress bar"""


def word_matches(layout: RunLayout, sources, f1_min: float) -> dict[int, list[tuple[str, float]]]:
    """feature -> [(word, text F1)] from RUN/crossmodal.json when it belongs to the run's SAE, else computed now
    (and written); {} for a cache without shapes-world ground truth."""
    from saes.crossmodal import crossmodal, load_crossmodal, tokenizer_of, write_crossmodal
    from saes.sae import sae_fingerprint

    sha = sae_fingerprint(layout.sae)
    if layout.crossmodal.exists():
        report = load_crossmodal(layout.crossmodal)
        if report.extra.get("sae_sha256") == sha:
            return report.text_matched(f1_min)
    try:
        report = crossmodal(sources.sae, sources.reader, tokenizer_of(sources.reader), f1_min)
    except ValueError as e:
        if "no ground truth" in str(e):
            return {}
        raise
    report.extra.update(sae_sha256=sha, layer=sources.reader.meta.get("layer"))
    write_crossmodal(report, layout.crossmodal)
    return report.text_matched(f1_min)


def run_score_text(cfg: TextScoreConfig) -> dict:
    from explain.commands import _open_sources
    from explain.store import FeatureStore
    from explain.text import load_contexts, make_text_explainer, score_text_feature, summarize_text
    from interp.infra.runinfo import write_run_info
    from saes.crossmodal import tokenizer_of

    t_start = time.time()
    layout = RunLayout.of(cfg.run)
    if not layout.text_explanations.exists():
        raise FileNotFoundError(f"no text explanations at {layout.text_explanations}: run `interp explain-text "
                                f"{layout.root}` first")
    sel = SelectionConfig(score_top=cfg.score_top, score_quantile=cfg.score_quantile,
                          score_negatives=cfg.score_negatives, bands=cfg.bands)
    with _open_sources(layout, cfg.options.device) as sources:
        stats = sources.features
        header = {"sae_sha256": stats.meta["sae_sha256"], "features": str(stats.path)}
        explanations = FeatureStore(layout.text_explanations, {"store": "text_explanations", **header}).ok()
        wanted = set(_text_features(stats, cfg.selection)) if (cfg.selection.features or cfg.selection.filter
                                                                or cfg.selection.densest) else set(explanations)
        live = sorted(f for f in wanted if f in explanations)
        recorded = next(iter(explanations.values()), {})
        made_with = recorded.get("explainer_config") or {}
        spec = cfg.judge or made_with.get("explainer") or "shapes-explainer"
        protocol = (cfg.text_protocol if cfg.text_protocol != "auto"
                    else (recorded.get("protocol") if not cfg.judge else None) or text_protocol(spec, "auto"))
        opts = cfg.options
        if not cfg.judge and opts.api_model is None and made_with.get("api_model"):
            opts = replace(opts, api_model=made_with["api_model"])
        judge = make_text_explainer(spec, protocol, opts, layout.explainer_cache)
        tokenizer = tokenizer_of(sources.reader)
        matched = word_matches(layout, sources, cfg.f1_min)
        store = FeatureStore(layout.text_scores, {"store": "text_scores", **header})
        made = made_by("judge", judge.name, spec, sel)
        todo = [f for f in live if cfg.redo or not store.done(f, **made, explanation=explanations[f]["explanation"])]
        write_run_info(layout.run_info("score-text"), {"command": "score-text", "judge": judge.name,
                                                       "config": asdict(cfg), "features": len(live), "to_do": len(todo),
                                                       "matched": matched})
        for f in todo:
            exp, t0 = explanations[f], time.time()
            try:
                used = set(exp.get("examples", []))
                pos = heldout_examples(stats, f, used, sel, modality="text")
                neg = negative_examples(stats, f, sel, modality="text", exclude=set(exp.get("negatives", [])))
                rec = score_text_feature(judge, exp["explanation"], load_contexts(sources, f, pos, tokenizer, cfg.max_tokens),
                                         load_contexts(sources, f, neg, tokenizer, cfg.max_tokens),
                                         [w for w, _ in matched.get(f, [])], seed=cfg.seed)
                rec = {"feature": f, "status": "ok", **rec}
            except Exception as exc:  # recorded per feature; the run goes on
                rec = {"feature": f, "status": "error", "explanation": exp["explanation"],
                       "error": f"{type(exc).__name__}: {exc}", "seconds": round(time.time() - t0, 3)}
            store.put({**rec, **made})
        scores = {f: r for f, r in store.ok().items() if f in set(live)}
    summary = summarize_text(scores, {f: m for f, m in matched.items()})
    summary.update(judge=judge.name, protocol=protocol, seconds=round(time.time() - t_start, 1),
                   explanations=str(layout.text_explanations))
    layout.text_score_summary.write_text(json.dumps(summary, indent=1))
    m = summary["matched"]
    print(f"scored {summary['all']['n']} text features: detection {summary['all']['detection_balanced_accuracy']}, "
          f"fuzzing {summary['all']['fuzzing_balanced_accuracy']}; {m['n']} match a word: explanation names it "
          f"{m['text_explanation_accuracy']}, detection {m['detection_balanced_accuracy']}")
    print(f"wrote {layout.text_score_summary}")
    summary["failed"] = [f for f in todo if f in store.failed()]
    return summary


COMMANDS = [
    Command("explain-text", TextExplainConfig, run_explain_text,
            "explain the run's text features from marked token contexts (delphi's style; resumable)",
            report=lambda r, cfg: 1 if r["failed"] else 0),
    Command("score-text", TextScoreConfig, run_score_text,
            "score the run's text explanations: detection and fuzzing on held-out contexts",
            report=lambda s, cfg: 1 if s["failed"] else 0),
]
