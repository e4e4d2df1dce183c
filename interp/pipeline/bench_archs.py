"""The architectures section of `interp benchmark`: SAEs side by side against exact concept labels.

Every SAE is trained on the same cache with the same budget (width, k, steps, batch size, seed): ours
for every architecture of the registry (`saes.architectures`), and one TopK SAE by each other library's
own trainer (`saes.external`: sae-lens, EleutherAI sparsify). Each is scored on the labelled rows of the
cache, with the rows of a held-out quarter of the samples for everything fitted (`saes.metrics.split_rows`):

- reconstruction: FVU, L0, dead fraction (`saes.evaluate.reconstruction_metrics`), and CE loss recovered
  with the SAE spliced into the model (`saes.evaluate.spliced_metrics`);
- concept recovery: per concept the best feature's F1 (`interp.shapes.concepts.recover_concepts`);
- SAEBench's metrics with exact labels (`saes.metrics`): absorption, sparse probing top-1 / top-5 against
  the model's neurons, MCC with the probe directions;
- explanation accuracy, where the explain pipeline runs (shapes-explainer, `interp.pipeline.stages`).

A width sweep (64 .. 4096 features) of chosen architectures measures feature splitting: features per
concept (live features firing >= 90% precisely on it) and SAEBench's main-feature count grow with the
width, recovery and absorption change with it.

Which labels: `GROUND_TRUTH` maps a world's name to a function of the cache reader that gives the labelled
rows; `shapes` labels the world's 32 patch concepts (colour, shape, size, fill, object part,
background, tone, texture, position cell; the catch-all "object" left out), and another world adds
its own entry. `render_table` renders the README's table from
benchmark.json.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from interp.infra.durable import write_text
from interp.infra.layout import RunLayout

EXTERNAL = ("sae-lens", "sparsify")  # trainers of other libraries (saes.external); the rest are ours


@dataclass
class GroundTruth:
    concepts: tuple[str, ...]
    rows: np.ndarray  # [n] rows of the cache that have labels
    labels: np.ndarray  # [n, concepts] bool
    groups: np.ndarray  # [n] the sample of each row: held-out splits keep a sample's rows together


def shapes_truth(reader) -> GroundTruth:
    """The shapes world's labels, as `interp recovery`'s (`interp.shapes.world.concept_labels`)."""
    from interp.shapes.ground_truth import token_concepts

    gt = token_concepts(reader, with_object=False)
    return GroundTruth(tuple(gt.concepts), gt.rows, gt.labels(), np.asarray(reader.tokens["sample"][gt.rows]))


GROUND_TRUTH: dict[str, Callable] = {"shapes": shapes_truth}


def all_names() -> list[str]:
    """What `--archs` accepts: the registry's architectures, then the external trainers."""
    from saes import architectures

    return architectures.names() + list(EXTERNAL)


@dataclass
class Scored:
    """What one SAE is scored on: the labelled rows' raw activations, labels and split, and the probes."""

    gt: GroundTruth
    raw: np.ndarray  # [n, d] float32
    test: np.ndarray  # [n] bool: held-out rows
    probes: object  # saes.metrics.Probes fitted on the train rows
    neuron_f1: np.ndarray  # [concepts] the best raw neuron's F1 (recovery's baseline)
    probe_f1: np.ndarray  # [concepts] the held-out linear probe's F1 (recovery's ceiling)
    neuron_probing: dict  # sparse probing's baseline: the top-k neurons' probes per concept

    @classmethod
    def of(cls, reader, world: str, seed: int = 0) -> Scored:
        """The labelled rows, and the baselines that depend on them only (computed once, not per SAE)."""
        from interp.shapes.concepts import contiguous_runs, neuron_f1s, probe_f1s
        from saes.metrics import neuron_probing, split_rows, train_probes

        if world not in GROUND_TRUTH:
            raise ValueError(f"no ground truth for world {world!r}; known: {', '.join(GROUND_TRUTH)}")
        gt = GROUND_TRUTH[world](reader)
        raw = torch.cat([reader.read(int(a), int(b)) for a, b in contiguous_runs(gt.rows)]).float().numpy()
        test = split_rows(gt.groups, 0.25, seed=seed)
        return cls(gt, raw, test, train_probes(raw[~test], gt.labels[~test]), neuron_f1s(raw, gt.labels),
                   probe_f1s(raw, gt.labels), neuron_probing(raw, gt.labels, gt.concepts, test))


def score_sae(sae, scored: Scored, reader, *, lm=None, ce_samples: int = 0) -> tuple[dict, object]:
    """Every number of one SAE (module doc); returns (numbers, its RecoveryReport)."""
    from interp.shapes.concepts import RecoveryReport, recover_concepts
    from saes.evaluate import reconstruction_metrics, spliced_metrics
    from saes.metrics import dictionary_metrics, encode_sparse, features_per_concept

    gt = scored.gt
    rec = reconstruction_metrics(sae, reader)
    acts = encode_sparse(sae, scored.raw)

    def chunks():
        for s in range(0, len(scored.raw), 8192):
            yield scored.raw[s: s + 8192], acts[s: s + 8192].toarray()

    report = RecoveryReport(recover_concepts(chunks, gt.concepts, gt.labels, neuron_f1=scored.neuron_f1,
                                             probe_f1=scored.probe_f1))
    dm = dictionary_metrics(acts, scored.raw, gt.labels, gt.concepts, sae.W_dec.detach().float().numpy(),
                            sae.b_dec.detach().float().numpy(), scored.test, scored.probes, scored.neuron_probing)
    out = {"fvu": round(rec["fvu"], 4), "l0": round(rec["l0"], 2), "dead_fraction": round(rec["dead_fraction"], 4),
           "concept_recovery": report.concept_recovery, "mean_f1": report.mean_f1,
           "f1": {m.concept: round(m.f1, 4) for m in report.concepts},
           "features_per_concept": features_per_concept(acts, gt.labels),
           **{k: v for k, v in dm.items() if k != "per_concept"}, "per_concept": dm["per_concept"]}
    if ce_samples:
        try:
            out["ce_loss_recovered"] = round(spliced_metrics(sae, reader, lm, n_samples=ce_samples)["ce_loss_recovered"], 4)
        except (ValueError, KeyError) as e:  # a cache without a model to splice into
            print(f"CE loss recovered: {e}")
    return out, report


def train_one(name: str, arch_run: RunLayout, reader, *, d_sae: int, k: int, steps: int, batch_size: int,
              seed: int, sae_kw: dict | None = None):
    """Train SAE `name` (an architecture of ours or an external trainer) into `arch_run`; returns the SAE."""
    from saes.sae import SAE, SAEConfig
    from saes.train import TrainConfig, train

    if (arch_run.sae / "cfg.json").exists():  # a finished run is read back, not redone
        return SAE.load(arch_run.sae)
    if name in EXTERNAL:
        from saes.external import train_external

        out = train_external(name, reader, arch_run.root / f"{name}-sae", d_sae=d_sae, k=k, steps=steps,
                             batch_size=batch_size, seed=seed, hookpoint=str(reader.meta.get("layer") or "layers.0"))
        arch_run.link("sae", out["path"])
        return SAE.load(arch_run.sae)
    sae_cfg = SAEConfig(arch=name, d_in=reader.d, d_sae=d_sae, k=k, model_name=reader.meta.get("model"),
                        hook_name=reader.meta.get("module_path"), **(sae_kw or {}))
    return train(sae_cfg, TrainConfig(steps=steps, batch_size=batch_size, seed=seed, progress=False), reader,
                 arch_run).sae


EXPLAIN_DENSEST = 8  # the explanation columns: every concept-matched feature and this many of the densest others


def explain_columns(arch_run: RunLayout, densest: int = EXPLAIN_DENSEST) -> dict:
    """Explanation accuracy (the explanation names the matched concept) and detection on the SAE's features:
    every concept-matched one (recovery F1 >= its f1_min) and the `densest` densest other live ones. Seven
    SAEs' explanations are most of the benchmark's time, and the accuracy column needs the matched ones
    only: the densest others keep `detection_balanced_accuracy_all` from being of matched features alone.
    A stage that fails leaves the columns out (n/a) instead of stopping the benchmark."""
    from explain.commands import select_features
    from explain.feature_reader import FeatureReader
    from interp.pipeline.stages import ensure_features, explain_and_score
    from interp.shapes.concepts import load_recovery

    ensure_features(arch_run)
    matched = sorted(load_recovery(arch_run.recovery).matched()) if arch_run.recovery.exists() else []
    with FeatureReader(arch_run.features) as stats:
        dense, _ = select_features(stats, densest=densest + len(matched))
    chosen = list(dict.fromkeys([int(f) for f in matched] + [f for f in dense if f not in matched][:densest]))
    try:
        scores = explain_and_score(arch_run, features=chosen or None)
    except ValueError as e:
        print(e)
        return {}
    m, a = scores["matched"], scores["all"]
    return {"explanation_accuracy": m.get("concept_accuracy"), "detection_balanced_accuracy": m.get("balanced_accuracy"),
            "detection_balanced_accuracy_all": a.get("balanced_accuracy"), "explained_features": a.get("n"),
            "explained_selection": f"{len(matched)} concept-matched and the {densest} densest others"}


def run_architectures(run: RunLayout, reader, scored: Scored, names, *, d_sae: int, k: int, steps: int,
                      batch_size: int, seed: int, explain: bool, ce_samples: int, say=print,
                      done: Callable[[str], None] | None = None) -> dict:
    """`architectures.<name>` of benchmark.json: every SAE trained and scored (module doc); `done(name)` is
    called once an architecture's run is complete (the benchmark hands its run to another process then)."""
    from interp.shapes.concepts import write_recovery
    from saes.sae import sae_fingerprint

    lm = None
    if ce_samples:
        from interp.model.models import load_model

        lm = load_model(reader.meta["model"], revision=reader.meta.get("revision") or None)
    out = {}
    for name in names:
        t0 = time.time()
        arch_run = run.arch_run(name)
        arch_run.link("cache", run.cache)
        sae = train_one(name, arch_run, reader, d_sae=d_sae, k=k, steps=steps, batch_size=batch_size, seed=seed)
        t_train = time.time() - t0
        res, report = score_sae(sae, scored, reader, lm=lm, ce_samples=ce_samples)
        report.extra["sae_sha256"] = sae_fingerprint(arch_run.sae)
        write_recovery(report, arch_run.recovery)
        res.update(trainer=name if name in EXTERNAL else "lmmscope", architecture=sae.cfg.arch,
                   sae=str(arch_run.sae), train_seconds=round(t_train, 1))
        if explain:
            res.update(explain_columns(arch_run))
        res["seconds"] = round(time.time() - t0, 1)
        out[name] = res
        say(f"{name:10s} FVU {res['fvu']:.4f}  L0 {res['l0']:5.1f}  recovery {res['concept_recovery']:.2f}  "
            f"absorption {res['absorption']}  probing top1 {res['sparse_probing_top1']}  MCC {res['mcc']}  "
            f"CE rec {res.get('ce_loss_recovered')}  explanations {res.get('explanation_accuracy')}  "
            f"{res['seconds']:.0f} s")
        if done:
            done(name)
    return out


def run_width_sweep(run: RunLayout, reader, scored: Scored, names, widths, *, k: int, steps: int, batch_size: int,
                    seed: int, say=print) -> dict:
    """`width_sweep.<name>.<width>`: the same recipe at every width (nothing but the numbers is kept)."""
    from saes.sae import SAEConfig
    from saes.train import TrainConfig, train

    out: dict = {}
    for name in names:
        out[name] = {}
        for width in widths:
            t0 = time.time()
            if name in EXTERNAL:
                raise ValueError(f"the width sweep runs our architectures only, not {name!r}")
            sae = train(SAEConfig(arch=name, d_in=reader.d, d_sae=int(width), k=min(k, int(width))),
                        TrainConfig(steps=steps, batch_size=batch_size, seed=seed, progress=False), reader, None).sae
            res, _ = score_sae(sae, scored, reader)
            keep = ("fvu", "l0", "dead_fraction", "concept_recovery", "mean_f1", "features_per_concept",
                    "absorption", "full_absorption", "mean_split_features", "sparse_probing_top1",
                    "sparse_probing_top5", "mcc")
            out[name][str(width)] = {key: res[key] for key in keep} | {"seconds": round(time.time() - t0, 1)}
            r = out[name][str(width)]
            say(f"  sweep {name:10s} {width:5d} features: recovery {r['concept_recovery']:.2f}  absorption "
                f"{r['absorption']}  features/concept {r['features_per_concept']}  FVU {r['fvu']:.4f}  "
                f"dead {r['dead_fraction']:.0%}  {r['seconds']:.0f} s")
    return out


# ---------------------------------------------------------------- the README's table


def _fmt(v, spec: str = ".3f") -> str:
    return "n/a" if v is None else format(v, spec)


TABLE_COLUMNS = (  # (header, key, format)
    ("trainer", "trainer", "s"), ("FVU", "fvu", ".4f"), ("L0", "l0", ".1f"), ("dead", "dead_fraction", ".0%"),
    ("concepts at F1 >= 0.9", "concept_recovery", ".0%"), ("mean F1", "mean_f1", ".3f"),
    ("absorption", "absorption", ".3f"), ("full absorption", "full_absorption", ".3f"),
    ("sparse probing top-1", "sparse_probing_top1", ".3f"), ("top-5", "sparse_probing_top5", ".3f"),
    ("MCC", "mcc", ".3f"), ("CE loss recovered", "ce_loss_recovered", ".3f"),
    ("explanation names the concept", "explanation_accuracy", ".0%"))


def render_table(report: dict) -> str:
    """The markdown table of `architectures` in a benchmark.json (the README's benchmark table), with the
    neurons' sparse-probing baseline below it."""
    archs = report["architectures"]
    lines = ["| SAE | " + " | ".join(h for h, _, _ in TABLE_COLUMNS) + " |",
             "|---|" + "---|" * len(TABLE_COLUMNS)]
    for name, r in archs.items():
        cells = [r.get(key) if spec == "s" else _fmt(r.get(key), spec) for _, key, spec in TABLE_COLUMNS]
        lines.append(f"| {name} | " + " | ".join(str(c) for c in cells) + " |")
    base = report.get("neurons") or {}
    if base:
        lines += ["", f"The model's own neurons: sparse probing top-1 {_fmt(base.get('sparse_probing_top1'))}, "
                      f"top-5 {_fmt(base.get('sparse_probing_top5'))}; best single neuron's mean F1 "
                      f"{_fmt(base.get('mean_f1'))}."]
    return "\n".join(lines)


def render_sweep(report: dict) -> str:
    sweep = report.get("width_sweep") or {}
    if not sweep:
        return ""
    lines = ["| SAE | features | FVU | dead | concepts at F1 >= 0.9 | features per concept | main features "
             "per concept | absorption |", "|---|---|---|---|---|---|---|---|"]
    for name, by_width in sweep.items():
        for width, r in by_width.items():
            lines.append(f"| {name} | {width} | {_fmt(r.get('fvu'), '.4f')} | {_fmt(r.get('dead_fraction'), '.0%')} "
                         f"| {_fmt(r.get('concept_recovery'), '.0%')} | {_fmt(r.get('features_per_concept'), '.1f')} "
                         f"| {_fmt(r.get('mean_split_features'), '.2f')} | {_fmt(r.get('absorption'))} |")
    return "\n".join(lines)


def render_methods(report: dict) -> str:
    """The methods sections' tables (`explanation_methods`, `steering_methods` of a benchmark.json): the
    reference work's methods against ours."""
    lines = []
    em = report.get("explanation_methods")
    if em:
        which = f"the {em['features']} densest" if em.get("max_features") else f"all {em['features']}"
        lines += [f"Explanation methods, on {which} live image features of the {em['sae']} SAE (`explain.methods`; "
                  "contrastive is what `interp explain` runs):", "",
                  "| method | explanation accuracy (all explained features) | names the matched concept | detection balanced "
                  "accuracy (all) | IoU | explained |", "|---|---|---|---|---|---|"]
        for m in ("reference", "ours", "contrastive"):
            r = em[m]
            lines.append(f"| {m} | {_fmt(r.get('explanation_accuracy_all'))} | {_fmt(r.get('explanation_accuracy'), '.0%')} "
                         f"| {_fmt(r.get('detection_balanced_accuracy_all'))} | {_fmt(r.get('iou'))} "
                         f"| {_fmt(r.get('explained_fraction'), '.0%')} |")
    sm = report.get("steering_methods")
    if sm:
        lines += ([""] if lines else []) + [
            f"Steering methods, on the {sm['sae']} SAE's colour and shape features (`steering.methods`; test questions, "
            "strengths picked on validation ones):", "",
            "| concepts | method | flip rate | collateral (accuracy drop on the image's other attributes) | next-token "
            "KL on those questions | coherence |", "|---|---|---|---|---|---|"]
        chosen = sm["ours"].get("variant") or {}
        for kind in [*(sm["ours"].get("per_kind") or {}), None]:  # each kind, then pooled
            for m in ("reference", "ours"):
                r = sm[m] if kind is None else (sm[m].get("per_kind") or {}).get(kind) or {}
                name = m if m == "reference" else "ours (" + (chosen.get(kind, "") if kind else ", ".join(
                    f"{k}: {v}" for k, v in chosen.items())) + ")"
                lines.append(f"| {kind or 'all'} | {name} | {_fmt(r.get('flip_rate'), '.0%')} | "
                             f"{_fmt(r.get('collateral'))} | {_fmt(r.get('collateral_kl'))} | "
                             f"{_fmt(r.get('coherence'), '.0%')} |")
    return "\n".join(lines)


README_BEGIN, README_END = "<!-- benchmark-table: generated by interp benchmark --readme -->", "<!-- /benchmark-table -->"


SEED_MARGINS = (  # (what, key, the issue's target)
    ("explanation accuracy: contrastive minus reference", "explanation_contrastive_minus_reference", ">= 0.1"),
    ("explanation accuracy: ours without contrast minus reference", "explanation_ours_minus_reference", "(none)"),
    ("steering flip rate: ours minus reference", "steering_flip_ours_minus_reference", ">= 0"),
    ("steering collateral: ours / reference (worst = highest)", "steering_collateral_ours_over_reference", "<= 0.5"),
    ("absorption: TopK minus Matryoshka", "absorption_topk_minus_matryoshka", "> 0"),
)


def render_seeds(report: dict) -> str:
    """The `seeds` section of a benchmark.json (`--seeds N`): each comparison's margin, mean and worst seed."""
    s = report.get("seeds")
    if not s or len(s.get("seeds", ())) < 2:
        return ""
    met = s.get("target_met_at_every_seed", {})
    lines = [f"The three comparisons over {len(s['seeds'])} SAE training seeds ({', '.join(map(str, s['seeds']))}; "
             f"methods on the {s['sae']} SAE; same cache, examples and questions):", "",
             "| margin | mean | worst seed | target | met at every seed |", "|---|---|---|---|---|"]
    for what, key, target in SEED_MARGINS:
        m = s.get(key) or {}
        ok = met.get(key)
        lines.append(f"| {what} | {_fmt(m.get('mean'))} | {_fmt(m.get('worst'))} | {target} | "
                     f"{'n/a' if ok is None else ('yes' if ok else 'no')} |")
    return "\n".join(lines)


def paste_into(path, report: dict) -> bool:
    """Replace the block between the README's benchmark-table markers with the rendered tables; False when the
    file has no markers."""
    from pathlib import Path

    path = Path(path)
    text = path.read_text()
    if README_BEGIN not in text or README_END not in text:
        return False
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    body = render_table(report)
    sweep = render_sweep(report)
    if sweep:
        body += "\n\nWidth sweep (feature splitting):\n\n" + sweep
    methods = render_methods(report)
    if methods:
        body += "\n\n" + methods
    seeds = render_seeds(report)
    if seeds:
        body += "\n\n" + seeds
    write_text(path, head + README_BEGIN + "\n" + body + "\n" + README_END + tail)
    return True


def figures(report: dict, run: RunLayout) -> list[str]:
    """Plotly figures (HTML with PNG beside): recovery F1 and absorption per concept, and the width sweep."""
    import plotly.graph_objects as go

    from interp.infra.plots import write_figure

    archs, concepts = report["architectures"], report["concepts"]
    names = []
    for key, title, name, get in (
            ("f1", "Best feature F1 per concept", "recovery", lambda r, c: r["f1"].get(c)),
            ("absorption", "Absorption per concept (share of the concept's job taken by other aligned features)",
             "absorption", lambda r, c: (r["per_concept"].get(c) or {}).get("absorption"))):
        fig = go.Figure([go.Bar(name=a, x=list(concepts), y=[get(r, c) for c in concepts]) for a, r in archs.items()])
        fig.update_layout(barmode="group", title=title, template="plotly_white", yaxis_range=[0, 1.02])
        write_figure(fig, run.figure(name, "html"))
        names.append(name)
    sweep = report.get("width_sweep") or {}
    if sweep:
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=3, subplot_titles=("concepts at F1 >= 0.9", "features per concept",
                                                            "absorption"))
        for name, by_width in sweep.items():
            widths = [int(w) for w in by_width]
            for col, key in enumerate(("concept_recovery", "features_per_concept", "absorption"), start=1):
                fig.add_trace(go.Scatter(x=widths, y=[by_width[str(w)].get(key) for w in widths], name=name,
                                         mode="lines+markers", showlegend=col == 1), row=1, col=col)
        fig.update_xaxes(type="log", title_text="features")
        fig.update_layout(title="Width sweep", template="plotly_white")
        write_figure(fig, run.figure("width_sweep", "html"))
        names.append("width_sweep")
    return names
