"""`interp explain` and `interp score`: explanations of a run's features and their scores.

    interp explain RUN                                   # every live feature, shapes-explainer
    interp explain RUN --features 142,175 --explainer http://127.0.0.1:8000/v1 --api-model shapes-explainer
    interp score RUN                                     # judge: the explainer, by default

Both are resumable: every finished (or failed) feature is appended at once to RUN/explanations.jsonl
or RUN/scores.jsonl (explain.store); a re-run skips what is done and retries what failed. Model
replies over HTTP are also kept (RUN/explainer_cache.jsonl), so nothing is asked twice even inside a
feature that failed half-way. `run_explain(ExplainConfig)` and `run_score(ScoreConfig)` are the
commands; the pipeline and the app call them directly.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from explain.examples import (SelectionConfig, explain_examples, explain_negatives, heldout_examples, load_marked,
                              negative_examples)
from explain.explainers import ExplainerOptions, is_http, weights_fingerprint
from interp.infra.cli_config import Command, at_least, check_bounds, positional
from interp.infra.durable import write_json
from interp.infra.layout import RunLayout


@dataclass
class FeatureSelection:
    """Which features a command works on."""

    features: tuple[int, ...] | None = None
    """feature indices, e.g. 1,5,9 (none: every live feature)"""
    densest: int | None = None
    """only the N densest of the selected live features"""
    filter: str | None = None
    """file with one feature index per line (# comments allowed)"""


def parse_indices(text: str, what: str) -> list[int]:
    out = []
    for tok in text.replace(",", " ").split():
        try:
            out.append(int(tok))
        except ValueError:
            raise ValueError(f"{what}: {tok!r} is not a feature index (integers, e.g. 1,5,9)") from None
    return out


def select_features(stats, features=None, densest: int | None = None,
                    filter_file: str | None = None) -> tuple[list[int], list[int]]:
    """(live features to do, dead ones that were asked for or skipped). Explicit indices (a sequence, or
    text like "1,5,9") are checked against the SAE's width first, so a bad one stops the run before
    anything is asked."""
    table = stats.summary_table()
    chosen: list[int] | None = None
    if features:
        chosen = parse_indices(features, "--features") if isinstance(features, str) else [int(f) for f in features]
    if filter_file:
        path = Path(filter_file)
        if not path.exists():
            raise FileNotFoundError(f"--filter file {path} does not exist (one feature index per line)")
        lines = [ln.split("#")[0] for ln in path.read_text().splitlines()]
        chosen = (chosen or []) + parse_indices(" ".join(lines), f"--filter {path}")
    if chosen is not None:
        bad = [f for f in chosen if not 0 <= f < stats.d_sae]
        if bad:
            raise ValueError(f"feature index out of range: {bad[:10]}; this SAE has {stats.d_sae} features "
                             f"(valid indices 0..{stats.d_sae - 1})")
        chosen = list(dict.fromkeys(chosen))
    else:
        chosen = list(range(stats.d_sae))
    dead = [f for f in chosen if table["n_active"][f] == 0]
    live = [f for f in chosen if table["n_active"][f] > 0]
    if densest is not None:
        if densest < 1:
            raise ValueError(f"--densest must be at least 1, got {densest}")
        live = sorted(live, key=lambda f: -float(table["density"][f]))[:densest]
    return live, dead


def _open_sources(layout: RunLayout, device: str):
    from explain.feature_reader import FeatureSources
    from interp.model.models import resolve_device

    return FeatureSources.open(layout, device=str(resolve_device(device)))


def _config_record(spec: str, opts: ExplainerOptions) -> dict:
    """The explainer's settings worth recording (the API key is only ever an environment variable's name)."""
    return {"explainer": spec, **asdict(opts)}


def made_by(role: str, name: str, spec: str, sel: SelectionConfig) -> dict:
    """What a stage's record was made with: the explainer (`role` "explainer") or judge ("judge") by name,
    its weights (`weights_fingerprint` of `spec`) and the example counts. A record made otherwise is not
    done (`FeatureStore.done`): an upgraded shapes-explainer keeps its name, and other counts pick other
    examples."""
    return {role: name, f"{role}_weights": weights_fingerprint(spec), "selection": asdict(sel)}


# ---------------------------------------------------------------- interp explain


def _warn_vocabulary(explainer, cache_meta: dict) -> None:
    """The shapes organisms can only name shapes-world things: say so before explaining other images."""
    from explain.explainers import WorldExplainer

    data = cache_meta.get("data") or {}
    if isinstance(explainer, WorldExplainer) and isinstance(data, dict) and data.get("kind") != "shapes":
        print(f"warning: {explainer.name} speaks only the shapes world's vocabulary, but this cache holds "
              f"{data.get('kind', 'other')} images; use --explainer with a general VLM for them")


@dataclass
class ExplainConfig:
    """`interp explain`: explain the run's features from their marked example samples (resumable)."""

    run: str | None = field(default=None, metadata=positional())
    """run directory: reads RUN/features.h5, RUN/activations.h5, RUN/sae/; writes RUN/explanations.jsonl"""
    selection: FeatureSelection = field(default_factory=FeatureSelection)
    explainer: str = "shapes-explainer"
    """organism name, model directory or hub id, or an OpenAI-compatible URL (http://HOST:PORT/v1)"""
    options: ExplainerOptions = field(default_factory=ExplainerOptions)
    explain_top: int = SelectionConfig.explain_top
    """top samples shown to the explainer"""
    explain_quantile: int = SelectionConfig.explain_quantile
    """quantile-band samples shown to the explainer"""
    explain_negatives: int = SelectionConfig.explain_negatives
    """world protocol: images where the feature never fires, for silent regions and the context's base rate"""
    bands: int = SelectionConfig.bands
    """quantile bands the examples are spread over"""
    batch_features: int = field(default=16, metadata=at_least(1))
    """world protocol: features whose questions go to the explainer together (batched generate calls)"""
    redo: bool = False
    """redo features that are already done"""
    max_failures: int = 5
    """stop after this many failed features in a row (0: never); they are retried next run"""
    progress: bool = True
    """progress bar"""

    def __post_init__(self) -> None:
        check_bounds(self)

    def selection_config(self) -> SelectionConfig:
        return SelectionConfig(explain_top=self.explain_top, explain_quantile=self.explain_quantile,
                               explain_negatives=self.explain_negatives, bands=self.bands)


@dataclass
class ExplainResult:
    explained: int
    failed: list[int]
    aborted: bool
    out: Path


def run_explain(cfg: ExplainConfig) -> ExplainResult:
    from explain.explainers import make_explainer
    from explain.store import FeatureStore
    from interp.infra.runinfo import write_run_info

    t_start = time.time()
    layout = RunLayout.of(cfg.run)
    sel = cfg.selection_config()
    with _open_sources(layout, cfg.options.device) as sources:
        stats = sources.features
        live, dead = select_features(stats, cfg.selection.features, cfg.selection.densest, cfg.selection.filter)
        explainer = make_explainer(cfg.explainer, cfg.options, layout.explainer_cache)
        _warn_vocabulary(explainer, sources.reader.meta)
        store = FeatureStore(layout.explanations, {"store": "explanations", "sae_sha256": stats.meta["sae_sha256"],
                                                   "features": str(stats.path)})
        made = made_by("explainer", explainer.name, cfg.explainer, sel)
        todo = [f for f in live if cfg.redo or not store.done(f, **made)]
        write_run_info(layout.run_info("explain"), {"command": "explain", "explainer": explainer.name,
                                                    "config": asdict(cfg), "features": len(live), "to_do": len(todo),
                                                    "dead_skipped": len(dead)})
        if dead:
            print(f"skipping {len(dead)} dead features (never fire)")
        print(f"{len(live) - len(todo)} of {len(live)} features already explained by {explainer.name}; "
              f"{len(todo)} to do -> {layout.explanations}")
        workers = max(1, cfg.options.concurrency) if is_http(cfg.explainer) else 1
        tally = _explain_loop(sources, explainer, _config_record(cfg.explainer, cfg.options), sel, todo, store,
                              workers, cfg, made)
    failed = store.failed()
    failed_here = [f for f in todo if f in failed]
    print(f"explained {tally['ok']} features in {time.time() - t_start:.1f} s (tokens in {tally['tokens_in']}, "
          f"out {tally['tokens_out']}); {len(failed_here)} failed")
    if failed_here:
        print(f"failed features are recorded in {layout.explanations} and retried on the next run; first error: "
              f"{failed[failed_here[0]]['error']}")
    return ExplainResult(tally["ok"], failed_here, bool(tally["aborted"]), layout.explanations)


def _report_explain(r: ExplainResult, cfg: ExplainConfig) -> int:
    return 1 if r.failed or r.aborted else 0


def _explain_loop(sources, explainer, record: dict, sel, todo, store, workers, cfg: ExplainConfig,
                  made: dict) -> dict:
    """Examples are read in this thread (the cache and SAE); a world explainer gets `batch_features`
    features at a time (their questions batched), any other one feature at a time on `workers` threads."""
    from tqdm import tqdm

    from explain.explainers import WorldExplainer

    tally = Counter(ok=0, tokens_in=0, tokens_out=0, aborted=0)
    streak = 0
    bar = tqdm(total=len(todo), desc="explain", unit="feature", disable=not cfg.progress, mininterval=1)
    world = isinstance(explainer, WorldExplainer)

    def finish(f: int, picked: list, t0: float, result) -> None:
        nonlocal streak
        if isinstance(result, Exception):  # any failure of one feature is recorded, and the run goes on
            rec = {"feature": f, "status": "error", "error": f"{type(result).__name__}: {result}",
                   "seconds": round(time.time() - t0, 3)}
            streak += 1
        else:
            e = result
            rec = {"feature": f, "status": "ok", "explanation": e.text, "raw": e.raw, "tokens_in": e.tokens_in,
                   "tokens_out": e.tokens_out, "seconds": round(time.time() - t0, 3),
                   "model_seconds": round(e.seconds, 3), "examples": [p.example.sample for p in picked],
                   "sources": [p.source for p in picked]}
            tally.update(ok=1, tokens_in=e.tokens_in, tokens_out=e.tokens_out)
            streak = 0
        store.put({**rec, **made, "explainer_config": record})
        bar.update(1)
        bar.set_postfix(ok=tally["ok"], failed=bar.n - tally["ok"], tok_in=tally["tokens_in"])

    def load(f: int):
        """(picked, marked examples, marked negatives), or the exception (e.g. an image that can no longer be
        loaded: recorded like any failure)."""
        try:
            picked = explain_examples(sources.features, f, sel)
            negs = explain_negatives(sources.features, f, sel) if world else []
            return picked + negs, load_marked(sources, f, picked, pre=world), load_marked(sources, f, negs, pre=world)
        except Exception as exc:  # noqa: BLE001
            return exc

    def stop() -> bool:
        if cfg.max_failures and streak >= cfg.max_failures:
            tally["aborted"] = 1
            return True
        return False

    if world:
        # a local model answers a chunk of features in batched generate calls; a server gets its requests
        # concurrently anyway, so there each feature is recorded as soon as it is done
        step = 1 if is_http(record.get("explainer", "")) else cfg.batch_features
        for s in range(0, len(todo), step):
            if stop():
                break
            t0 = time.time()
            chunk = todo[s: s + step]
            loaded = {f: load(f) for f in chunk}
            ready = [f for f in chunk if not isinstance(loaded[f], Exception)]
            results = dict(zip(ready, explainer.explain_many([loaded[f][1:] for f in ready]))) if ready else {}
            for f in chunk:
                got = loaded[f]
                finish(f, [] if isinstance(got, Exception) else got[0], t0, results.get(f, got))
    else:
        pending: dict[Future, tuple[int, list, float]] = {}

        def drain(fut: Future) -> None:
            f, picked, t0 = pending.pop(fut)
            try:
                finish(f, picked, t0, fut.result())
            except Exception as exc:  # noqa: BLE001
                finish(f, picked, t0, exc)

        with ThreadPoolExecutor(workers, thread_name_prefix="explain") as pool:
            for f in todo:
                if stop():
                    break
                t0 = time.time()
                got = load(f)
                if isinstance(got, Exception):
                    finish(f, [], t0, got)
                    continue
                pending[pool.submit(explainer.explain, got[1])] = (f, got[0], t0)
                while len(pending) >= workers * 2:
                    for fut in wait(list(pending), return_when=FIRST_COMPLETED).done:
                        drain(fut)
            while pending:
                for fut in wait(list(pending), return_when=FIRST_COMPLETED).done:
                    drain(fut)
    bar.close()
    if tally["aborted"]:
        print(f"stopped after {cfg.max_failures} failures in a row (the explainer looks unusable: see the "
              "errors in the store); the rest were not asked. Fix it and re-run to continue")
    return tally


# ---------------------------------------------------------------- interp score


@dataclass
class ScoreConfig:
    """`interp score`: score the run's explanations: detection, IoU with ground truth, concept accuracy."""

    run: str | None = field(default=None, metadata=positional())
    """run directory: reads RUN/explanations.jsonl (and RUN/recovery.json); writes RUN/scores.jsonl and
    RUN/score_summary.json"""
    selection: FeatureSelection = field(default_factory=FeatureSelection)
    judge: str | None = None
    """judge model or URL (none: the explainer the explanations were made with, with its recorded settings)"""
    options: ExplainerOptions = field(default_factory=ExplainerOptions)
    score_top: int = SelectionConfig.score_top
    """held-out top samples for detection"""
    score_quantile: int = SelectionConfig.score_quantile
    """held-out quantile-band samples for detection"""
    score_negatives: int = SelectionConfig.score_negatives
    """non-activating samples for detection"""
    bands: int = SelectionConfig.bands
    """quantile bands the examples are spread over (as when explaining)"""
    masks: str | None = None
    """folder of ground-truth PNG masks named {source_index}.png (none: the shapes world's own)"""
    iou_threshold: float = 0.0
    """feature mask for IoU: tokens above this fraction of the feature's max"""
    f1_min: float = 0.9
    """recovery F1 at which a feature matches a concept"""
    oracle: bool = True
    """world protocol: also describe the scored regions with the world's ground truth (detection_oracle: the
    explanation's accuracy without the judge's perception errors)"""
    batch_features: int = field(default=16, metadata=at_least(1))
    """world protocol: features whose regions go to the judge together (batched generate calls)"""
    redo: bool = False
    """redo features that are already done"""
    max_failures: int = 5
    """stop after this many failed features in a row (0: never); they are retried next run"""
    progress: bool = True
    """progress bar"""

    def __post_init__(self) -> None:
        check_bounds(self)

    def selection_config(self) -> SelectionConfig:
        return SelectionConfig(score_top=self.score_top, score_quantile=self.score_quantile,
                               score_negatives=self.score_negatives, bands=self.bands)


_RECORDED = ("protocol", "api_model", "api_key_env", "agree", "cutoff", "threshold", "with_originals")


def _judge(cfg: ScoreConfig, explanations: dict[int, dict]) -> tuple[str, ExplainerOptions]:
    """The judge: cfg.judge, else the explainer the explanations were made with; the recorded settings of
    that explainer apply unless the command changed them from their defaults."""
    configs = Counter(json.dumps(r.get("explainer_config") or {}, sort_keys=True) for r in explanations.values())
    recorded = json.loads(configs.most_common(1)[0][0]) if configs and not cfg.judge else {}
    spec = cfg.judge or recorded.get("explainer") or "shapes-explainer"
    defaults = ExplainerOptions()
    opts = ExplainerOptions(**{f.name: (recorded[f.name] if f.name in _RECORDED and f.name in recorded
                                        and getattr(cfg.options, f.name) == getattr(defaults, f.name)
                                        else getattr(cfg.options, f.name)) for f in fields(ExplainerOptions)})
    return spec, opts


def run_score(cfg: ScoreConfig) -> dict:
    from explain.explainers import make_explainer
    from explain.scoring import MaskFolder, ScoringConfig, summarize
    from explain.store import FeatureStore
    from interp.infra.runinfo import write_run_info

    t_start = time.time()
    layout = RunLayout.of(cfg.run)
    with _open_sources(layout, cfg.options.device) as sources:
        stats = sources.features
        if not layout.explanations.exists():
            raise FileNotFoundError(f"no explanations at {layout.explanations}: run `interp explain {layout.root}` "
                                    "first")
        header = {"sae_sha256": stats.meta["sae_sha256"], "features": str(stats.path)}
        explanations = FeatureStore(layout.explanations, {"store": "explanations", **header}).ok()
        live, dead = select_features(stats, cfg.selection.features, cfg.selection.densest, cfg.selection.filter)
        missing = [f for f in live if f not in explanations]
        live = [f for f in live if f in explanations]
        spec, opts = _judge(cfg, explanations)
        judge = make_explainer(spec, opts, layout.explainer_cache)
        sel = cfg.selection_config()
        scfg = ScoringConfig(iou_threshold=cfg.iou_threshold, f1_min=cfg.f1_min, oracle=cfg.oracle)
        masks = MaskFolder(cfg.masks) if cfg.masks else None
        matched = _matches(sources, layout, scfg.f1_min)
        store = FeatureStore(layout.scores, {"store": "scores", **header})
        made = made_by("judge", judge.name, spec, sel)
        todo = [f for f in live if cfg.redo or not store.done(f, **made, explanation=explanations[f]["explanation"])]
        write_run_info(layout.run_info("score"), {"command": "score", "judge": judge.name, "config": asdict(cfg),
                                                  "features": len(live), "to_do": len(todo),
                                                  "not_explained": missing, "matched": matched})
        if missing:
            print(f"{len(missing)} selected features have no explanation yet (run `interp explain`): skipped")
        print(f"{len(live) - len(todo)} of {len(live)} features already scored by {judge.name}; {len(todo)} to do")
        _score_loop(sources, judge, sel, scfg, todo, explanations, matched, masks, store, cfg, made)
        scores = {f: r for f, r in store.ok().items() if f in set(live)}
    summary = summarize(scores, {f: m for f, m in matched.items() if f in set(live)}, live=len(live) + len(missing))
    summary.update(judge=judge.name, seconds=round(time.time() - t_start, 1), explanations=str(layout.explanations))
    write_json(layout.score_summary, summary, indent=1)
    _print_summary(summary, layout.score_summary)
    failed = [f for f in todo if f in store.failed()]
    if failed:
        print(f"{len(failed)} features failed (recorded in {store.path}, retried on the next run); first error: "
              f"{store.failed()[failed[0]]['error']}")
    summary["failed"] = failed
    return summary


def _matches(sources, layout: RunLayout, f1_min: float) -> dict[int, list[tuple[str, float]]]:
    """Ground-truth concepts per feature (shapes-world caches only; {} elsewhere)."""
    from saes.recovery import recovery_of

    try:
        return recovery_of(layout, sources.sae, sources.reader, f1_min).matched(f1_min)
    except ValueError as e:
        if "no ground truth" in str(e):
            return {}
        raise


def _score_loop(sources, judge, sel, scfg, todo, explanations, matched, masks, store, cfg: ScoreConfig,
                made: dict) -> None:
    """Held-out samples are read here; a world judge gets `batch_features` features at a time."""
    from tqdm import tqdm

    from explain.scoring import score_feature, score_world_features

    bar = tqdm(total=len(todo), desc="score", unit="feature", disable=not cfg.progress, mininterval=1)
    streak = 0
    world = hasattr(judge, "describe")
    step = cfg.batch_features if world else 1

    def load(f: int):
        exp = explanations[f]
        try:
            used = set(exp.get("examples", []))
            pos = load_marked(sources, f, heldout_examples(sources.features, f, used, sel), pre=world)
            neg = load_marked(sources, f, negative_examples(sources.features, f, sel, exclude=used), pre=world)
            return exp["explanation"], pos, neg, [c for c, _ in matched.get(f, [])], f
        except Exception as exc:  # noqa: BLE001  (recorded per feature; the run goes on)
            return exc

    for s in range(0, len(todo), step):
        if cfg.max_failures and streak >= cfg.max_failures:
            print(f"stopped after {cfg.max_failures} failures in a row: fix the judge and re-run to continue")
            break
        t0 = time.time()
        chunk = todo[s: s + step]
        loaded = {f: load(f) for f in chunk}
        ready = [f for f in chunk if not isinstance(loaded[f], Exception)]
        results: dict = {}
        if world and ready:
            results = dict(zip(ready, score_world_features(judge, [loaded[f] for f in ready], scfg, masks)))
        for f in ready if not world else []:
            try:
                results[f] = score_feature(judge, *loaded[f][:4], scfg, masks)
            except Exception as exc:  # noqa: BLE001
                results[f] = exc
        for f in chunk:
            got = results.get(f, loaded[f])
            if isinstance(got, Exception):
                rec = {"feature": f, "status": "error", "explanation": explanations[f]["explanation"],
                       "error": f"{type(got).__name__}: {got}", "seconds": round(time.time() - t0, 3)}
                streak += 1
            else:
                rec = {"feature": f, "status": "ok", **got}
                streak = 0
            store.put({**rec, **made})
            bar.update(1)
            if rec["status"] == "ok":
                bar.set_postfix(bal_acc=rec["detection"]["balanced_accuracy"], tok_in=rec["tokens_in"])
    bar.close()


def _print_summary(summary: dict, path: Path) -> None:
    a, m = summary["all"], summary["matched"]
    print(f"scored {a['n']} features: balanced accuracy {a['balanced_accuracy']} (oracle judge "
          f"{a['balanced_accuracy_oracle']}), F1 {a['f1']}, AUROC {a['auroc']}, IoU {a['iou_pixels']} "
          f"(tokens {a['iou_tokens']})")
    print(f"{summary['explained_live_fraction']} of {summary['live_features']} live features have an explanation "
          f"with detection balanced accuracy >= 0.85 ({summary['unscorable_features']} fire on too few samples to "
          f"score; without them {summary['explained_scorable_fraction']})")
    if m["n"]:
        print(f"{m['n']} features match a ground-truth concept: explanation names it {m['concept_accuracy']}, "
              f"balanced accuracy {m['balanced_accuracy']} (min {m['balanced_accuracy_min']})")
        for f, r in m["features"].items():
            ba = "n/a" if r["balanced_accuracy"] is None else f"{r['balanced_accuracy']:.3f}"
            print(f"  {int(f):5d} {'/'.join(r['concepts']):18s} -> {r['explanation']!r:36s} "
                  f"named {str(r['names_concept']):5s} bal.acc {ba}  IoU tokens {r['iou_tokens']}")
    print(f"wrote {path}")


COMMANDS = [
    Command("explain", ExplainConfig, run_explain, "explain the run's features from their marked example samples "
            "(resumable)", report=_report_explain),
    Command("score", ScoreConfig, run_score, "score the run's explanations: detection, IoU with ground truth, "
            "concept accuracy", report=lambda s, cfg: 1 if s["failed"] else 0),
]
