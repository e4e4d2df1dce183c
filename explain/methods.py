"""Explanation methods side by side: the same live image features explained three ways, scored alike.

    explanation_methods(RUN)   # RUN holds activations.h5, sae/, features.h5 (interp cache, train, features)

- **reference**: the LMMs-Lab Multimodal-SAE method (github.com/EvolvingLMMs-Lab/multimodal-sae,
  `prepare_image_examples`, `upsample_mask`, `ImageExplainer`): the feature's top 5 samples by its
  MEAN activation over the image-patch tokens (features.h5 `top_mean`), each shown with the tokens
  where it is > 1e-5 as they are and everything else dimmed: the mask of the silent tokens at 224
  upsampled bilinearly to the image and composited over black (224/255 of the way to black, soft
  edges), as their code draws it. Their explainer (a 72B VLM) reads all 5 images in one prompt and
  names what they share; a shapes organism reads one image per question, so each of the 5 views is
  asked what the highlighted region shows (the question it was trained on) and the explanation is
  the most common of the 5 answers (ties: the best-ranked sample's). That is the single-call
  equivalent: one look at the top examples, their peak mode named as it was seen, with no quantile
  bands, no aggregation of attributes, no silent regions and no context.
- **contrastive**: `interp explain` exactly as it runs (`make_explainer`'s WorldExplainer, examples of
  explain.examples: top and quantile-band samples, the strongest patch of each as its region, the
  regions' descriptions aggregated by explain.aggregate, context from captions). That protocol
  already contrasts: it describes as many silent regions of the same size (from non-activating
  images, `explain_negatives`, and silent patches of the activating ones, `silent_regions`) and keeps
  only the attributes that tell the feature's regions from them. So it is named "contrastive" here,
  and
- **ours** is the same protocol without the contrast (`WorldExplainer(contrast=False)`): the same
  examples, regions and descriptions, no silent regions described, and the attributes most regions
  share kept (explain.aggregate without `silent`). Everything else is unchanged, context included
  (the non-activating images' captions stay its base rate): contrastive minus ours is the silent
  regions alone.

Scoring is `interp score`'s (explain.scoring.score_world_features, judged by the same explainer, the
oracle's `detection_oracle` beside it), on the same held-out regions for the three methods: activating
samples and non-activating ones that none of them was shown, so a difference between the methods is
their explanations' only. Per method, explain.scoring.summarize gives every number of a
score_summary.json; `explanation_accuracy_all` adds, over ALL the live features explained, the share
explained correctly by summarize's own two rules: a feature that recovery matches to a concept
(F1 >= 0.9) counts where its explanation names that concept exactly (`names_concept`, summarize's
`concept_accuracy`); a feature that matches none has no concept to name and counts where its
explanation is right about what it does fire on (detection balanced accuracy >= EXPLAINED_BA, which
summarize calls explained). A feature a method failed on counts against it.

Everything is written under RUN/explanation-methods/METHOD/ (`RunLayout.explanation_method`): the
method's explanations.jsonl, scores.jsonl and score_summary.json, in the formats of a run's own
(docs/formats.md); the reference's `raw` holds its 5 regions and no silent ones.

Measured with shapes-explainer on a 256-feature BatchTopK SAE (k = 4, 3000 steps) at layer 4 of
shapes-subject over 1500 scenes (66 live features, 4 of them concept-matched; 149 s on one thread):
explanation_accuracy_all ours 0.045, reference 0.0, contrastive 0.227. The reference's explanation is
one region seen whole ("large solid purple square at bottom right"), which no held-out region of
another shape, size or place satisfies (detection 0.50); ours keeps every attribute most regions share
("a small purple object", "edge of a large solid object"), contrastive only those that silent regions
do not also show ("a purple object"). Showing the reference its regions as the organism was trained
to see them (hard patch edges, 25% light) changes nothing (0.0, detection 0.50).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict

import numpy as np
from PIL import Image

from explain import aggregate as agg
from explain.examples import (MarkedExample, Picked, Region, SelectionConfig, explain_examples, explain_negatives,
                              heldout_examples, load_marked, negative_examples, patch_activations)
from explain.explainers import Explanation, ExplainerOptions, ModelDescriber, WorldExplainer
from explain.scoring import EXPLAINED_BA
from interp.infra.layout import RunLayout

METHODS = ("ours", "reference", "contrastive")
REFERENCE_TOP = 5  # samples the reference explains from
REFERENCE_THRESHOLD = 1e-5  # tokens above this are shown (the reference's mask)
REFERENCE_DIM = 224  # the reference's mask value: silent pixels go 224/255 of the way to black
BATCH_FEATURES = 16  # features whose questions go to the explainer together (as interp explain's default)


# ---------------------------------------------------------------- the reference method


def reference_examples(stats, feature: int) -> list[Picked]:
    """The reference's samples: the feature's top REFERENCE_TOP by its mean over the image patches."""
    return [Picked(e, "top") for e in stats.top(feature, by="mean")[:REFERENCE_TOP]]


def reference_region(ex: MarkedExample, world) -> Region | None:
    """Every patch where the feature is above REFERENCE_THRESHOLD (any number of cells), None where none is."""
    acts = patch_activations(ex, world)
    mask = acts > REFERENCE_THRESHOLD
    if not mask.any():
        return None
    return Region(ex.sample, ex.image_ref, ex.source, ex.original, mask, float(acts.max()) / (ex.vmax or acts.max()))


def reference_view(image: Image.Image, mask: np.ndarray) -> Image.Image:
    """The reference's marked image: the silent patches' mask at REFERENCE_DIM, upsampled bilinearly to the
    image, composited over black (Multimodal-SAE's `upsample_mask` and `Image.composite`)."""
    image = image.convert("RGB")
    silent = Image.fromarray((~np.asarray(mask, bool)).astype(np.uint8) * REFERENCE_DIM, mode="L")
    return Image.composite(Image.new("RGB", image.size), image, silent.resize(image.size, Image.Resampling.BILINEAR))


class ReferenceDescriber(ModelDescriber):
    """A shapes explainer model asked the region question on the reference's marked images."""

    def view(self, region: Region) -> Image.Image:
        return reference_view(region.image, region.mask)


def reference_explanation(descriptions: list[str], world) -> str:
    """The most common readable description (ties: the first, the best-ranked sample's); cannot tell if none."""
    readable = [d for d in descriptions if agg.attributes(d, world)]
    return Counter(readable).most_common(1)[0][0] if readable else agg.CANNOT_TELL


def explain_reference(describer, items: list[list[MarkedExample]], world) -> list:
    """Per feature (its reference examples), an Explanation or the exception that stopped it; every region
    of the batch described in one call."""
    t0 = time.time()
    before = (describer.usage.tokens_in, describer.usage.tokens_out)
    regions = [[r for r in (reference_region(ex, world) for ex in exs) if r is not None] for exs in items]
    todo = [r for rs in regions for r in rs]
    try:
        answers = iter(describer.describe(todo) if todo else [])
    except Exception as e:  # noqa: BLE001  (a backend that failed for good: every feature of the batch)
        return [e] * len(items)
    t_in, t_out = describer.usage.tokens_in - before[0], describer.usage.tokens_out - before[1]
    seconds = time.time() - t0
    out = []
    for rs in regions:
        if not rs:
            out.append(ValueError("no example has a token above the reference's threshold: nothing to explain"))
            continue
        desc = [next(answers) for _ in rs]
        raw = {"regions": [{"sample": r.sample, "source": r.source, "weight": round(r.weight, 4), "patches": r.size,
                            "description": d} for r, d in zip(rs, desc)], "silent": []}
        share = 1 / len(items)
        out.append(Explanation(reference_explanation(desc, world), json.dumps(raw), round(t_in * share),
                               round(t_out * share), seconds * share))
    return out


# ---------------------------------------------------------------- the three methods, scored alike


def _named(record: dict | None, matched: bool) -> bool:
    """Whether one feature's explanation is right by summarize's rules (module docstring)."""
    if record is None:
        return False
    if matched:
        return bool(record["names_concept"])
    ba = record["detection"]["balanced_accuracy"]
    return ba is not None and ba >= EXPLAINED_BA


def explanation_accuracy_all(scores: dict[int, dict], matched: dict, live: list[int]) -> float | None:
    """The share of the `live` features whose explanation is right: a concept-matched one (`matched`, as
    summarize takes it) where it names the concept, any other where its detection is explained; a live
    feature without a score record counts as wrong (None: no live features)."""
    return round(sum(_named(scores.get(f), f in matched) for f in live) / len(live), 4) if live else None


def _headline(summary: dict, scores: dict[int, dict], matched: dict, live: list[int]) -> dict:
    return {"explanation_accuracy_all": explanation_accuracy_all(scores, matched, live),
            "explanation_accuracy": summary["explanation_accuracy"],
            "detection_balanced_accuracy_all": summary["detection_balanced_accuracy_all"],
            "detection_balanced_accuracy_oracle_all": summary["all"]["balanced_accuracy_oracle"],
            "iou": summary["all"]["iou_pixels"], "iou_tokens": summary["all"]["iou_tokens"],
            "explained_fraction": summary["explained_live_fraction"], "n_matched": summary["matched"]["n"]}


def explanation_methods(run, explainer: str = "shapes-explainer", features: list[int] | None = None,
                        max_features: int | None = None, seed: int = 0, progress: bool = False) -> dict:
    """The run's live image features (`features`, else every live one; `max_features`: only the densest
    that many) explained by the three methods of the module docstring with `explainer` (a shapes organism,
    or "oracle"), and scored alike. Returns {"ours", "reference", "contrastive": {explanation_accuracy_all,
    explanation_accuracy, detection_balanced_accuracy_all, detection_balanced_accuracy_oracle_all, iou,
    iou_tokens, explained_fraction, n_matched, n_explained, failed, explanations, explainer, judge, seconds},
    "features", "n_features", "seconds"}; writes RUN/explanation-methods/METHOD/ only."""
    from tqdm import tqdm

    from explain.commands import _matches, select_features
    from explain.explainers import make_explainer
    from explain.feature_reader import FeatureSources
    from explain.scoring import ScoringConfig, score_world_features, summarize
    from explain.store import FeatureStore
    from interp.infra.durable import write_json
    from interp.model.models import resolve_device

    if max_features is not None and max_features < 1:
        raise ValueError(f"max_features must be at least 1 (or None: every live feature), got {max_features}")
    t_start = time.time()
    layout = RunLayout.of(run)
    opts, sel, scfg = ExplainerOptions(), SelectionConfig(), ScoringConfig()
    with FeatureSources.open(layout, device=str(resolve_device(opts.device))) as sources:
        stats = sources.features
        live, _ = select_features(stats, features)
        modality = stats.modalities()
        live = [f for f in live if modality[f] != "text"]  # image features: the world protocol reads patches
        if not live:
            raise ValueError(f"no live image feature to explain among the selected ones of {layout.features}: give "
                             "features that fire on image patches, or re-train the SAE")
        if max_features is not None:
            live, _ = select_features(stats, live, max_features)
        base = make_explainer(explainer, opts, RunLayout(layout.explanation_methods).explainer_cache)
        if not isinstance(base, WorldExplainer):
            raise ValueError(f"explanation methods compare world-protocol explanations of shapes-world features: "
                             f"{explainer!r} is not a shapes explainer; give a shapes organism (shapes-explainer) "
                             "or oracle")
        world = base.world
        contrastive = WorldExplainer(base.describer, agree=opts.agree, cutoff=opts.cutoff, world=world, seed=seed)
        ours = WorldExplainer(base.describer, agree=opts.agree, cutoff=opts.cutoff, world=world, seed=seed,
                              contrast=False)
        ref_describer = (ReferenceDescriber(base.describer.backend, world) if isinstance(base.describer, ModelDescriber)
                         else base.describer)  # the oracle reads the patches, not the view
        judge = contrastive  # interp score's default: the explainer the explanations were made with
        matched = {f: m for f, m in _matches(sources, layout, scfg.f1_min).items() if f in set(live)}
        header = {"sae_sha256": stats.meta["sae_sha256"], "features": str(stats.path)}
        config = {"explainer": explainer, **asdict(opts)}
        names = {"ours": ours.name, "contrastive": contrastive.name, "reference": f"reference:{ref_describer.name}"}
        stores = {m: (FeatureStore(layout.explanation_method(m).explanations, {"store": "explanations", **header}),
                      FeatureStore(layout.explanation_method(m).scores, {"store": "scores", **header}))
                  for m in METHODS}
        explained: dict[str, dict[int, dict]] = {m: {} for m in METHODS}
        scored: dict[str, dict[int, dict]] = {m: {} for m in METHODS}
        seconds = dict.fromkeys(METHODS, 0.0)
        bar = tqdm(total=len(live), desc="explanation methods", unit="feature", disable=not progress, mininterval=1)
        for s in range(0, len(live), BATCH_FEATURES):
            chunk = live[s: s + BATCH_FEATURES]
            loaded, shown = {}, {}
            for f in chunk:
                try:  # as interp explain loads them: the examples, then the contrast images, pre-activations too
                    picked, negs, ref = (explain_examples(stats, f, sel), explain_negatives(stats, f, sel),
                                         reference_examples(stats, f))
                    loaded[f] = (load_marked(sources, f, picked, pre=True), load_marked(sources, f, negs, pre=True),
                                 load_marked(sources, f, ref))
                    shown[f] = {"ours": picked + negs, "contrastive": picked + negs, "reference": ref}
                except Exception as exc:  # noqa: BLE001  (recorded for that feature, in every method)
                    loaded[f] = exc
            ready = [f for f in chunk if not isinstance(loaded[f], Exception)]
            results = {}
            for m in METHODS:
                t0 = time.time()
                if not ready:
                    got = []
                elif m == "reference":
                    got = explain_reference(ref_describer, [loaded[f][2] for f in ready], world)
                else:
                    got = (ours if m == "ours" else contrastive).explain_many([loaded[f][:2] for f in ready])
                seconds[m] += time.time() - t0
                results[m] = dict(zip(ready, got))
            items, owners = [], []
            for f in chunk:
                for m in METHODS:
                    e = results[m].get(f, loaded[f])
                    if isinstance(e, Exception):
                        rec = {"feature": f, "status": "error", "error": f"{type(e).__name__}: {e}", "seconds": 0.0}
                    else:
                        rec = {"feature": f, "status": "ok", "explanation": e.text, "raw": e.raw,
                               "tokens_in": e.tokens_in, "tokens_out": e.tokens_out, "seconds": round(e.seconds, 3),
                               "model_seconds": round(e.seconds, 3),
                               "examples": [p.example.sample for p in shown[f][m]],
                               "sources": [p.source for p in shown[f][m]]}
                        explained[m][f] = rec
                    stores[m][0].put({**rec, "explainer": names[m], "explainer_config": config})
                if f not in ready or not any(f in explained[m] for m in METHODS):
                    continue
                # held out of every method: the same regions score all three
                used = {p.example.sample for m in METHODS for p in shown[f][m]}
                pos = load_marked(sources, f, heldout_examples(stats, f, used, sel), pre=True)
                neg = load_marked(sources, f, negative_examples(stats, f, sel, exclude=used), pre=True)
                concepts = [c for c, _ in matched.get(f, [])]
                for m in METHODS:
                    if f in explained[m]:
                        items.append((explained[m][f]["explanation"], pos, neg, concepts, f + seed * stats.d_sae))
                        owners.append((m, f))
            t0 = time.time()
            outs = score_world_features(judge, items, scfg) if items else []
            for (m, f), got in zip(owners, outs):
                if isinstance(got, Exception):
                    rec = {"feature": f, "status": "error", "explanation": explained[m][f]["explanation"],
                           "error": f"{type(got).__name__}: {got}", "seconds": round(time.time() - t0, 3)}
                else:
                    rec = {"feature": f, "status": "ok", **got}
                    scored[m][f] = rec
                stores[m][1].put({**rec, "judge": judge.name})
            bar.update(len(chunk))
        bar.close()
    out: dict = {}
    for m in METHODS:
        summary = summarize(scored[m], matched, live=len(live))
        summary.update(judge=judge.name, seconds=round(seconds[m], 1),
                       explanations=str(layout.explanation_method(m).explanations))
        write_json(layout.explanation_method(m).score_summary, summary, indent=1)
        out[m] = {**_headline(summary, scored[m], matched, live), "n_explained": len(explained[m]),
                  "failed": [f for f in live if f not in scored[m]],
                  "explanations": {str(f): explained[m][f]["explanation"] for f in live if f in explained[m]},
                  "explainer": names[m], "judge": judge.name, "seconds": round(seconds[m], 1)}
    out.update(features=live, n_features=len(live), seconds=round(time.time() - t_start, 1))
    return out


__all__ = ["METHODS", "ReferenceDescriber", "explain_reference", "explanation_accuracy_all", "explanation_methods",
           "reference_examples", "reference_explanation", "reference_region", "reference_view"]
