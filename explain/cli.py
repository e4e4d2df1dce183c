"""`interp explain`, `interp score` and `interp serve-explainer`.

    interp explain runs/dev                                   # every live feature, shapes-explainer
    interp explain runs/dev --features 142,175 --explainer http://127.0.0.1:8000/v1 --api-model shapes-explainer
    interp score runs/dev                                     # judge: the explainer, by default
    interp serve-explainer --model shapes-explainer --port 8000

Both commands are resumable: every finished (or failed) feature is appended at once to
RUN/explanations.jsonl or RUN/scores.jsonl (explain.store); a re-run skips what is done and
retries what failed. Model replies over HTTP are also cached (RUN/explainer_cache.jsonl), so
nothing is asked twice even inside a feature that failed half-way.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import asdict, fields
from pathlib import Path

from explain.examples import SelectionConfig, explain_examples, heldout_examples, load_marked, negative_examples
from explain.explainers import PROTOCOLS, ExplainerConfig

FEATURES_FILE = "features.h5"


def resolve_run(path: str) -> tuple[Path, Path]:
    """(run directory, features.h5) from a run directory or a features file."""
    p = Path(path)
    if p.is_dir():
        return p, p / FEATURES_FILE
    return p.parent, p


def parse_indices(text: str, what: str) -> list[int]:
    out = []
    for tok in text.replace(",", " ").split():
        try:
            out.append(int(tok))
        except ValueError:
            raise ValueError(f"{what}: {tok!r} is not a feature index (integers, e.g. 1,5,9)") from None
    return out


def select_features(stats, features: str | None = None, top: int | None = None,
                    filter_file: str | None = None) -> tuple[list[int], list[int]]:
    """(live features to do, dead ones that were asked for or skipped). Explicit indices are checked
    against the SAE's width first, so a bad one stops the run before anything is asked."""
    table = stats.summary_table()
    chosen: list[int] | None = None
    if features:
        chosen = parse_indices(features, "--features")
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
    if top is not None:
        if top < 1:
            raise ValueError(f"--top must be at least 1, got {top}")
        live = sorted(live, key=lambda f: -float(table["density"][f]))[:top]
    return live, dead


def _open_sources(args):
    from explain.feature_reader import FeatureSources

    run_dir, features = resolve_run(args.run)
    return run_dir, FeatureSources.open(features, args.cache, args.sae, device=_device(args.device))


def _device(device: str) -> str:
    from interp.model.models import resolve_device

    return str(resolve_device(device))


def explainer_config(args, spec: str, cache: Path) -> ExplainerConfig:
    return ExplainerConfig(spec, args.protocol, args.api_model, args.api_key_env, args.timeout, args.retries,
                           args.backoff, args.concurrency, args.logprobs, cache, _device(args.device),
                           args.dtype, args.with_originals, args.agree, args.threshold)


def _config_record(cfg: ExplainerConfig) -> dict:
    """The explainer's settings worth recording (no cache path; the API key is only ever an env var name)."""
    return {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("cache",)}


# ---------------------------------------------------------------- interp explain


def _warn_vocabulary(explainer, cache_meta: dict) -> None:
    """The shapes organisms can only name shapes-world things: say so before explaining other images."""
    from explain.explainers import WorldExplainer

    data = cache_meta.get("data") or {}
    if isinstance(explainer, WorldExplainer) and isinstance(data, dict) and data.get("kind") != "shapes":
        print(f"warning: {explainer.name} speaks only the shapes world's vocabulary, but this cache holds "
              f"{data.get('kind', 'other')} images; use --explainer with a general VLM for them")


def run_explain(args) -> int:
    from explain.explainers import make_explainer
    from explain.store import FeatureStore
    from interp.infra.runinfo import write_run_info

    t_start = time.time()
    run_dir, sources = _open_sources(args)
    with sources:
        stats = sources.stats
        live, dead = select_features(stats, args.features, args.top, args.filter)
        sel = SelectionConfig(n_top=args.n_top, n_quantile=args.n_quantile)
        out = Path(args.out or run_dir / "explanations.jsonl")
        cfg = explainer_config(args, args.explainer, Path(args.response_cache or run_dir / "explainer_cache.jsonl"))
        explainer = make_explainer(cfg)
        _warn_vocabulary(explainer, sources.reader.meta)
        store = FeatureStore(out, {"store": "explanations", "sae_sha256": stats.meta["sae_sha256"],
                                   "features": str(stats.path)})
        todo = [f for f in live if args.redo or not store.done(f, explainer=explainer.name)]
        write_run_info(run_dir, {"command": "explain", "explainer": explainer.name, "config": _config_record(cfg),
                                 "selection": asdict(sel), "features": len(live), "to_do": len(todo),
                                 "dead_skipped": len(dead), "out": str(out)}, name="explain_run.json")
        if dead:
            print(f"skipping {len(dead)} dead features (never fire)")
        print(f"{len(live) - len(todo)} of {len(live)} features already explained by {explainer.name}; "
              f"{len(todo)} to do -> {out}")
        workers = max(1, args.concurrency) if cfg.is_http else 1
        tally = _explain_loop(sources, explainer, cfg, sel, todo, store, workers, args)
    failed = store.failed()
    failed_here = [f for f in todo if f in failed]
    print(f"explained {tally['ok']} features in {time.time() - t_start:.1f} s (tokens in {tally['tokens_in']}, "
          f"out {tally['tokens_out']}); {len(failed_here)} failed")
    if failed_here:
        first = failed[failed_here[0]]["error"]
        print(f"failed features are recorded in {out} and retried on the next run; first error: {first}")
        return 1
    if tally["aborted"]:
        return 1
    return 0


def _explain_loop(sources, explainer, cfg, sel, todo, store, workers, args) -> dict:
    """Examples are read in this thread (the cache and SAE), explanations asked on `workers` threads."""
    from tqdm import tqdm

    tally = Counter(ok=0, tokens_in=0, tokens_out=0, aborted=0)
    streak = 0
    bar = tqdm(total=len(todo), desc="explain", unit="feature", disable=args.no_progress, mininterval=1)
    pending: dict[Future, tuple[int, list, float]] = {}

    def finish(fut: Future) -> None:
        nonlocal streak
        f, picked, t0 = pending.pop(fut)
        try:
            e = fut.result()
            rec = {"feature": f, "status": "ok", "explanation": e.text, "raw": e.raw, "tokens_in": e.tokens_in,
                   "tokens_out": e.tokens_out, "seconds": round(time.time() - t0, 3),
                   "model_seconds": round(e.seconds, 3), "examples": [p.example.image for p in picked],
                   "sources": [p.source for p in picked]}
            tally.update(ok=1, tokens_in=e.tokens_in, tokens_out=e.tokens_out)
            streak = 0
        except Exception as exc:  # any failure of one feature is recorded, and the run goes on
            rec = {"feature": f, "status": "error", "error": f"{type(exc).__name__}: {exc}",
                   "seconds": round(time.time() - t0, 3)}
            streak += 1
        store.put({**rec, "explainer": explainer.name, "explainer_config": _config_record(cfg)})
        bar.update(1)
        bar.set_postfix(ok=tally["ok"], failed=bar.n - tally["ok"], tok_in=tally["tokens_in"])

    with ThreadPoolExecutor(workers, thread_name_prefix="explain") as pool:
        for f in todo:
            if args.max_failures and streak >= args.max_failures:
                tally["aborted"] = 1
                break
            t0 = time.time()
            try:
                picked = explain_examples(sources.stats, f, sel)
                marked = load_marked(sources, f, picked)
            except Exception as exc:  # e.g. an image that can no longer be loaded: recorded like any failure
                failed: Future = Future()
                failed.set_exception(exc)
                pending[failed] = (f, [], t0)
                finish(failed)
                continue
            pending[pool.submit(explainer.explain, marked)] = (f, picked, t0)
            while len(pending) >= workers * 2:
                for fut in wait(list(pending), return_when=FIRST_COMPLETED).done:
                    finish(fut)
        while pending:
            for fut in wait(list(pending), return_when=FIRST_COMPLETED).done:
                finish(fut)
    bar.close()
    if tally["aborted"]:
        print(f"stopped after {args.max_failures} failures in a row (the explainer looks unusable: see the "
              "errors in the store); the rest were not asked. Fix it and re-run to continue")
    return tally


# ---------------------------------------------------------------- interp score


def _judge_spec(args, explanations: dict[int, dict]) -> tuple[str, dict]:
    """The judge: --judge, else the explainer the explanations were made with (its recorded settings)."""
    if args.judge:
        return args.judge, {}
    configs = Counter(json.dumps(r.get("explainer_config") or {}, sort_keys=True) for r in explanations.values())
    recorded = json.loads(configs.most_common(1)[0][0]) if configs else {}
    return recorded.get("explainer") or args.explainer, recorded


def run_score(args) -> int:
    from explain.explainers import make_explainer
    from explain.scoring import MaskFolder, ScoreConfig, summarize
    from explain.store import FeatureStore
    from interp.infra.runinfo import write_run_info

    t_start = time.time()
    run_dir, sources = _open_sources(args)
    with sources:
        stats = sources.stats
        exp_path = Path(args.explanations or run_dir / "explanations.jsonl")
        if not exp_path.exists():
            raise FileNotFoundError(f"no explanations at {exp_path}: run `interp explain {args.run}` first")
        header = {"sae_sha256": stats.meta["sae_sha256"], "features": str(stats.path)}
        explanations = FeatureStore(exp_path, {"store": "explanations", **header}).ok()
        live, dead = select_features(stats, args.features, args.top, args.filter)
        missing = [f for f in live if f not in explanations]
        live = [f for f in live if f in explanations]
        spec, recorded = _judge_spec(args, explanations)
        cfg = explainer_config(args, spec, Path(args.response_cache or run_dir / "explainer_cache.jsonl"))
        for key in ("protocol", "api_model", "api_key_env", "agree", "threshold", "with_originals"):
            if key in recorded and getattr(args, key) == _DEFAULTS[key]:  # recorded settings, unless overridden
                setattr(cfg, key, recorded[key])
        judge = make_explainer(cfg)
        sel = SelectionConfig(n_top=args.n_top, n_quantile=args.n_quantile, n_pos_top=args.n_pos_top,
                              n_pos_quantile=args.n_pos_quantile, n_neg=args.n_neg)
        scfg = ScoreConfig(iou_threshold=args.iou_threshold, f1_min=args.f1_min)
        masks = MaskFolder(args.masks) if args.masks else None
        matched = _matches(sources, scfg.f1_min)
        store = FeatureStore(Path(args.out or run_dir / "scores.jsonl"), {"store": "scores", **header})
        todo = [f for f in live if args.redo or not store.done(f, judge=judge.name,
                                                                explanation=explanations[f]["explanation"])]
        write_run_info(run_dir, {"command": "score", "judge": judge.name, "config": _config_record(cfg),
                                 "selection": asdict(sel), "score": asdict(scfg), "features": len(live),
                                 "to_do": len(todo), "not_explained": missing, "matched": matched},
                       name="score_run.json")
        if missing:
            print(f"{len(missing)} selected features have no explanation yet (run `interp explain`): skipped")
        print(f"{len(live) - len(todo)} of {len(live)} features already scored by {judge.name}; {len(todo)} to do")
        samples = {i: int(s) for i, s in enumerate(stats.samples["sample"])}
        _score_loop(sources, judge, cfg, sel, scfg, todo, explanations, matched, samples, masks, store, args)
        scores = {f: r for f, r in store.ok().items() if f in set(live)}
    summary = summarize(scores, {f: m for f, m in matched.items() if f in set(live)})
    summary.update(judge=judge.name, seconds=round(time.time() - t_start, 1), explanations=str(exp_path))
    summary_path = Path(args.summary or run_dir / "score_summary.json")
    summary_path.write_text(json.dumps(summary, indent=1))
    _print_summary(summary, summary_path)
    failed = [f for f in todo if f in store.failed()]
    if failed:
        print(f"{len(failed)} features failed (recorded in {store.path}, retried on the next run); first error: "
              f"{store.failed()[failed[0]]['error']}")
        return 1
    return 0


def _matches(sources, f1_min: float) -> dict[int, list[tuple[str, float]]]:
    """Ground-truth concept per latent (shapes-world caches only; {} elsewhere)."""
    from explain.scoring import concept_matches
    from saes.recovery import recover_concepts

    try:
        return concept_matches(recover_concepts(sources.sae, sources.reader), f1_min)
    except ValueError as e:
        if "no ground truth" in str(e):
            return {}
        raise


def _score_loop(sources, judge, cfg, sel, scfg, todo, explanations, matched, samples, masks, store, args) -> None:
    from tqdm import tqdm

    from explain.scoring import score_feature

    bar = tqdm(todo, desc="score", unit="feature", disable=args.no_progress, mininterval=1)
    streak = 0
    for f in bar:
        if args.max_failures and streak >= args.max_failures:
            print(f"stopped after {args.max_failures} failures in a row: fix the judge and re-run to continue")
            break
        t0 = time.time()
        exp = explanations[f]
        try:
            pos = load_marked(sources, f, heldout_examples(sources.stats, f, set(exp.get("examples", [])), sel))
            neg = load_marked(sources, f, negative_examples(sources.stats, f, sel))
            rec = score_feature(judge, exp["explanation"], pos, neg, samples, [c for c, _ in matched.get(f, [])],
                                scfg, masks)
            rec = {"feature": f, "status": "ok", **rec}
            streak = 0
        except Exception as exc:  # recorded per feature; the run goes on
            rec = {"feature": f, "status": "error", "explanation": exp["explanation"],
                   "error": f"{type(exc).__name__}: {exc}", "seconds": round(time.time() - t0, 3)}
            streak += 1
        store.put({**rec, "judge": judge.name})
        if rec["status"] == "ok":
            bar.set_postfix(bal_acc=rec["detection"]["balanced_accuracy"], tok_in=rec["tokens_in"])


def _print_summary(summary: dict, path: Path) -> None:
    a, m = summary["all"], summary["matched"]
    print(f"scored {a['n']} features: balanced accuracy {a['balanced_accuracy']}, F1 {a['f1']}, AUROC {a['auroc']}, "
          f"IoU {a['iou_pixels']} (tokens {a['iou_tokens']})")
    if m["n"]:
        print(f"{m['n']} features match a ground-truth concept: explanation names it {m['concept_accuracy']}, "
              f"balanced accuracy {m['balanced_accuracy']} (min {m['balanced_accuracy_min']})")
        for f, r in m["features"].items():
            print(f"  {int(f):5d} {'/'.join(r['concepts']):9s} -> {r['explanation']!r:24s} "
                  f"named {str(r['names_concept']):5s} bal.acc {r['balanced_accuracy']:.3f}  IoU tokens {r['iou_tokens']}")
    print(f"wrote {path}")


# ---------------------------------------------------------------- arguments

_DEFAULTS = {"protocol": "auto", "api_model": None, "api_key_env": None, "agree": 0.6, "threshold": 0.0,
             "with_originals": False}


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="run directory holding features.h5 (outputs go there), or a features.h5 path")
    p.add_argument("--features", default=None, help="comma-separated feature indices, e.g. 1,5,9")
    p.add_argument("--top", type=int, default=None, help="only the N densest of the selected live features")
    p.add_argument("--filter", default=None, help="file with one feature index per line (# comments allowed)")
    p.add_argument("--sae", default=None, help="SAE directory (default: the one recorded in features.h5; checked)")
    p.add_argument("--cache", default=None, help="activation cache (default: the one recorded in features.h5)")
    p.add_argument("--n-top", type=int, default=SelectionConfig.n_top, help="top images shown to the explainer")
    p.add_argument("--n-quantile", type=int, default=SelectionConfig.n_quantile,
                   help="quantile-band samples shown to the explainer")
    p.add_argument("--redo", action="store_true", help="redo features that are already done")
    p.add_argument("--max-failures", type=int, default=5,
                   help="stop after this many failed features in a row (0: never); they are retried next run")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocol", choices=PROTOCOLS, default=_DEFAULTS["protocol"],
                   help="world: region questions in the shapes vocabulary; generic: one prompt with all examples")
    p.add_argument("--api-model", default=None, help="HTTP: served model name (default: first of GET /v1/models)")
    p.add_argument("--api-key-env", default=None, help="HTTP: environment variable holding the API key")
    p.add_argument("--timeout", type=float, default=60.0, help="HTTP: seconds per request")
    p.add_argument("--retries", type=int, default=3, help="HTTP: retries per request (exponential backoff)")
    p.add_argument("--backoff", type=float, default=1.0, help="HTTP: seconds before the first retry (doubles)")
    p.add_argument("--concurrency", type=int, default=4, help="HTTP: requests in flight")
    p.add_argument("--logprobs", action="store_true",
                   help="HTTP: ask for first-token logprobs (judge confidence; vLLM, SGLang, OpenAI)")
    p.add_argument("--response-cache", default=None, help="HTTP response cache (default RUN/explainer_cache.jsonl)")
    p.add_argument("--device", default="auto", help="local models and the SAE: auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", default="float32", help="local models: float32, bfloat16, float16")
    p.add_argument("--with-originals", action="store_true", help="generic: show each original next to its marked view")
    p.add_argument("--agree", type=float, default=_DEFAULTS["agree"],
                   help="world: share of the (activation-weighted) examples a word must be named in")
    p.add_argument("--threshold", type=float, default=_DEFAULTS["threshold"],
                   help="tokens above this fraction of the feature's max are marked active")


def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    e = sub.add_parser("explain", help="explain SAE features from their marked example images (resumable)",
                       formatter_class=fmt)
    _common(e)
    e.add_argument("--explainer", default="shapes-explainer",
                   help="organism name, model directory or hub id, or an OpenAI-compatible URL (http://HOST:PORT/v1)")
    _model_args(e)
    e.add_argument("--out", default=None, help="explanations store (default RUN/explanations.jsonl)")
    e.set_defaults(func=run_explain)

    s = sub.add_parser("score", help="score explanations: detection, IoU with ground truth, concept accuracy",
                       formatter_class=fmt)
    _common(s)
    s.add_argument("--judge", default=None, help="judge model or URL (default: the explainer of the explanations)")
    s.set_defaults(explainer="shapes-explainer")
    _model_args(s)
    s.add_argument("--explanations", default=None, help="explanations store (default RUN/explanations.jsonl)")
    s.add_argument("--n-pos-top", type=int, default=SelectionConfig.n_pos_top, help="held-out top images")
    s.add_argument("--n-pos-quantile", type=int, default=SelectionConfig.n_pos_quantile,
                   help="held-out quantile-band samples")
    s.add_argument("--n-neg", type=int, default=SelectionConfig.n_neg, help="non-activating images")
    s.add_argument("--masks", default=None, help="folder of ground-truth PNG masks named {sample}.png")
    s.add_argument("--iou-threshold", type=float, default=0.0, help="feature mask: tokens above this fraction of max")
    s.add_argument("--f1-min", type=float, default=0.9, help="recovery F1 at which a latent matches a concept")
    s.add_argument("--out", default=None, help="scores store (default RUN/scores.jsonl)")
    s.add_argument("--summary", default=None, help="summary JSON (default RUN/score_summary.json)")
    s.set_defaults(func=run_score)

    from explain.server import register as register_server

    register_server(sub)
