"""Scoring explanations: detection by a judge, IoU with ground-truth masks, concept accuracy.

- Detection, world protocol (patch-level features): the judge describes held-out regions on its
  own, the explanation unseen: for each held-out activating sample (top samples and quantile-band
  samples the explainer did not see, explain.examples) the region where the feature fires, and as
  many regions of the same size where it is silent (from images where it never fires and from the
  silent patches of the activating images: random and hard negatives, as delphi's detection
  scorer draws them). A region counts as shown when its description's attributes satisfy the
  explanation's (explain.aggregate.satisfies: "a red object" is shown by "edge of small striped red
  circle at top left"; context by the image's caption). A feature that fires in every image (a
  grid cell) is scored like any other, which whole-image yes/no could not do. The same regions
  are also described by the oracle (the world's ground truth, `describe_region`), so
  `detection_oracle` measures the explanation alone and the gap to `detection` the explainer's
  perception.
- Detection, generic protocol: the judge gets the explanation and, one at a time, held-out
  activating and non-activating samples, unmarked, and says whether each shows it.
- Both: balanced accuracy and F1 at P(yes) >= 0.5, AUROC over P(yes) where the judge gives one
  (else over its yes/no), unreadable answers left out, and the recall per source (top, q0..q3)
  to show which part of the feature's range the explanation covers.
- IoU: the feature's activation mask (pixels of the tokens above a threshold) against the
  ground-truth mask of its concept, pooled over the held-out activating images (sum of
  intersections over sum of unions): pixel masks from the shapes world's scenes, or PNG masks
  a user supplies per sample; for a single world concept also at token resolution (a token is in
  the concept where it covers > 5% of the token's box, interp.shapes.ground_truth), which a
  patch-level feature can reach 1.0 on.
- Concept accuracy: for a feature that ground-truth recovery (RUN/recovery.json) matches to a
  concept with F1 >= f1_min, whether the explanation names exactly that concept
  (explain.aggregate.names_exactly: "a green triangle" names neither green nor triangle).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from explain import aggregate as agg
from explain.examples import MarkedExample, Region
from explain.render import activation_map
from interp.shapes.concepts import auroc
from interp.shapes.world import WorldConfig

EXPLAINED_BA = 0.85  # a feature counts as explained when its explanation's detection reaches this


@dataclass
class Detection:
    n_pos: int
    n_neg: int
    n_unreadable: int  # judge answers that were neither yes nor no (left out)
    balanced_accuracy: float
    f1: float
    auroc: float
    recall: float
    specificity: float
    recall_by_source: dict[str, float] = field(default_factory=dict)


def detection_metrics(scores: list[bool | float | None], labels: list[bool], sources: list[str]) -> Detection:
    """Metrics of a judge's verdicts (P(yes) or yes/no per image) against activating (True) / not."""
    keep = [i for i, s in enumerate(scores) if s is not None]
    s = np.array([float(scores[i]) for i in keep], dtype=float)
    y = np.array([bool(labels[i]) for i in keep], dtype=bool)
    src = [sources[i] for i in keep]
    pred = s >= 0.5
    pos, neg = y.sum(), (~y).sum()
    recall = float((pred & y).sum() / pos) if pos else float("nan")
    spec = float((~pred & ~y).sum() / neg) if neg else float("nan")
    prec = float((pred & y).sum() / pred.sum()) if pred.sum() else 0.0
    f1 = 2 * prec * recall / (prec + recall) if pos and prec + recall > 0 else 0.0
    by_source = {}
    for name in dict.fromkeys(src):
        m = np.array([x == name for x in src]) & y
        if m.any():
            by_source[name] = round(float(pred[m].mean()), 4)
    return Detection(int(pos), int(neg), len(scores) - len(keep), round((recall + spec) / 2, 4), round(f1, 4),
                     round(auroc(s, y), 4) if pos and neg else float("nan"), round(recall, 4), round(spec, 4),
                     by_source)


# ---------------------------------------------------------------- IoU


@dataclass
class IoU:
    concept: str  # what the masks are of
    pixels: float  # pooled over images: sum of intersections / sum of unions
    pixels_mean: float  # mean of the per-image IoUs
    tokens: float | None  # pooled at token resolution (shapes world, one concept), else None
    n_samples: int


def feature_mask(ex: MarkedExample, threshold: float = 0.0) -> np.ndarray:
    """[H, W] bool: pixels of the tokens where the feature is above `threshold` * its max (the pixel
    boxes of the token table, as the heatmaps draw them)."""
    w, h = ex.original.size
    return activation_map(ex.tokens, ex.acts, (w, h), (w, h), "nearest") > threshold * ex.vmax


class MaskFolder:
    """User ground truth: DIR/{source_index}.png per sample (non-zero = inside), `source_index` being the
    sample's number in its data source (the cache's samples table records it)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"mask folder {root} does not exist: give a folder of PNG masks named "
                                    "{source_index}.png (the samples' numbers in their data source)")

    def get(self, source_index: int, size: tuple[int, int]) -> np.ndarray | None:
        path = self.root / f"{source_index}.png"
        if not path.exists():
            return None
        with Image.open(path) as im:
            mask = np.asarray(im.convert("L")) > 0
        if (mask.shape[1], mask.shape[0]) != size:
            raise ValueError(f"mask {path} is {mask.shape[1]}x{mask.shape[0]} but its image is {size[0]}x{size[1]}: "
                             "masks must have their image's size")
        return mask


def truth_concept(explanation: str, world: WorldConfig = WorldConfig()) -> str | None:
    """The world concept an explanation names exactly (its ground truth for IoU), else None."""
    from interp.shapes.world import concept_names

    e = agg.parse(explanation, world)
    return next((c for c in concept_names(world) if agg.names_exactly(e, c)), None)


def pixel_truth(image_ref: str, attrs: dict[str, str], world: WorldConfig = WorldConfig()) -> np.ndarray | None:
    """[H, W] bool: the pixels of a shapes-world image that hold `attrs` (object attributes: those objects'
    silhouettes; background, tone, texture: what no object covers; a cell: its square); None for another
    image or for attributes with no pixel extent (an object part is a property of patches)."""
    from explain.examples import shapes_scene
    from interp.shapes.world import POSITIONS

    scene = shapes_scene(image_ref) if attrs and "part" not in attrs else None
    if scene is None:
        return None
    s = world.image_size
    out = np.ones((s, s), bool)
    if "background" in attrs or "tone" in attrs or "texture" in attrs:
        if attrs.get("tone", scene.tone) != scene.tone or attrs.get("texture", scene.texture) != scene.texture:
            out[:] = False
        for o in scene.objects:
            out &= o.silhouette <= 0.5
    elif any(k in attrs for k in (*agg.OBJECT_KINDS, "object")):
        obj = np.zeros((s, s), bool)
        for o in scene.objects:
            if all(getattr(o, k) == v for k, v in attrs.items() if k in agg.OBJECT_KINDS):
                obj |= o.silhouette > 0.5
        out &= obj
    if "cell" in attrs:
        (r, c), = [rc for rc, name in POSITIONS.items() if name == attrs["cell"]]
        cell = np.zeros((s, s), bool)
        cell[r * world.cell:(r + 1) * world.cell, c * world.cell:(c + 1) * world.cell] = True
        out &= cell
    return out


def iou_score(examples: list[MarkedExample], concept: str | None, threshold: float = 0.0,
              masks: MaskFolder | None = None, world: WorldConfig = WorldConfig()) -> IoU | None:
    """IoU of the feature's masks with the ground truth over `examples` (None: no ground truth for them).
    `concept`: a world concept (`color:red`), or an explanation (what it names: the concept it names
    exactly, else its attributes, at pixel resolution only)."""
    from explain.examples import shapes_scene
    from explain.render import token_boxes
    from interp.shapes.ground_truth import box_coverage
    from interp.shapes.world import concept_names

    single = concept if concept in concept_names(world) else truth_concept(concept or "", world)
    attrs = agg.concept_attributes(single) if single else agg.parse(concept or "", world).region
    if masks is None and not attrs:
        return None
    tokens_too = single is not None and masks is None
    inter = union = t_inter = t_union = 0
    per_image = []
    for ex in examples:
        pred = feature_mask(ex, threshold)
        if tokens_too:
            on = ex.acts > threshold * ex.vmax
            scene = shapes_scene(ex.image_ref)  # a token is in the concept where it covers > 5% of its box
            lab = (box_coverage(scene, token_boxes(ex.tokens), (single,))[:, 0] > 0.05 if scene is not None
                   else np.zeros(len(on), bool))
            t_inter, t_union = t_inter + int((on & lab).sum()), t_union + int((on | lab).sum())
        truth = masks.get(ex.source_index, ex.original.size) if masks else pixel_truth(ex.image_ref, attrs, world)
        if truth is None:
            continue
        i, u = int((pred & truth).sum()), int((pred | truth).sum())
        inter, union = inter + i, union + u
        per_image.append(i / u if u else 1.0)
    if not per_image and not (tokens_too and examples):
        return None
    name = "user masks" if masks else (single or agg.phrase(attrs))
    pixels = round(inter / union if union else 1.0, 4) if per_image else None
    return IoU(name, pixels, round(float(np.mean(per_image)), 4) if per_image else None,
               round(t_inter / t_union if t_union else 1.0, 4) if tokens_too else None,
               len(per_image) if per_image else len(examples))


# ---------------------------------------------------------------- the whole score of one feature


@dataclass
class ScoringConfig:
    iou_threshold: float = 0.0  # tokens above this fraction of the feature's max form its mask
    f1_min: float = 0.9  # recovery F1 at which a feature counts as matching a concept
    oracle: bool = True  # also describe the scored regions with the world's ground truth (detection_oracle)


def _concept_record(record: dict, explanation: str, positives: list[MarkedExample], concepts: list[str],
                    cfg: ScoringConfig, masks: MaskFolder | None) -> dict:
    truth = concepts[0] if concepts else explanation  # the matched concept, else what the explanation names
    iou = iou_score(positives, truth, cfg.iou_threshold, masks)
    record["iou"] = asdict(iou) if iou else None
    record["concepts"] = concepts
    e = agg.parse(explanation)
    record["names_concept"] = any(agg.names_exactly(e, c) for c in concepts) if concepts else None
    return record


def score_feature(judge, explanation: str, positives: list[MarkedExample], negatives: list[MarkedExample],
                  concepts: list[str], cfg: ScoringConfig = ScoringConfig(), masks: MaskFolder | None = None,
                  seed: int = 0) -> dict:
    """Detection, IoU and concept accuracy of one feature's explanation, as one JSON-able record
    (a world judge scores regions, any other judge whole images)."""
    if hasattr(judge, "describe"):
        (out,) = score_world_features(judge, [(explanation, positives, negatives, concepts, seed)], cfg, masks)
        if isinstance(out, Exception):
            raise out
        return out
    t0 = time.time()
    before = (judge.usage.tokens_in, judge.usage.tokens_out)
    images = [ex.original for ex in positives + negatives]
    verdicts = judge.judge(explanation, images)
    det = detection_metrics(verdicts, [True] * len(positives) + [False] * len(negatives),
                            [ex.source for ex in positives + negatives])
    record: dict = {"explanation": explanation, "detection": _no_nan(asdict(det)),
                    "verdicts": [None if v is None else round(float(v), 4) for v in verdicts],
                    "samples": [ex.sample for ex in positives + negatives]}
    _concept_record(record, explanation, positives, concepts, cfg, masks)
    record["tokens_in"] = judge.usage.tokens_in - before[0]
    record["tokens_out"] = judge.usage.tokens_out - before[1]
    record["seconds"] = round(time.time() - t0, 3)
    return record


@dataclass(eq=False)
class _Case:
    """One feature's held-out regions while they are judged (score_world_features)."""

    explanation: str
    parsed: agg.Explanation
    positives: list[MarkedExample]
    concepts: list[str]
    regions: list[Region] = field(default_factory=list)
    labels: list[bool] = field(default_factory=list)
    error: Exception | None = None


def held_out_regions(judge, positives: list[MarkedExample], negatives: list[MarkedExample],
                     rng: np.random.Generator) -> tuple[list[Region], list[bool]]:
    """The regions a world judge describes for one feature: where it fires in each held-out activating
    sample, then as many silent regions of the same sizes (explain.explainers.silent_regions)."""
    from explain.explainers import silent_regions

    pos = judge.regions(positives)
    neg = silent_regions(pos, positives, negatives, judge.world, rng, judge.silent)
    return pos + neg, [True] * len(pos) + [False] * len(neg)


def region_verdicts(descriptions: list[str], regions: list[Region], explanation: agg.Explanation,
                    captions: dict[str, str] | None, world: WorldConfig) -> list[float | None]:
    """1.0 where a region's description satisfies the explanation, 0.0 where not, None where unreadable."""
    out = []
    for d, r in zip(descriptions, regions):
        v = agg.satisfies(d, explanation, (captions or {}).get(r.image_ref), world)
        out.append(None if v is None else float(v))
    return out


def _describe_all(describer, cases: list[_Case]) -> tuple[list[list[str]], list[dict[str, str] | None]]:
    """Every case's region descriptions in one call, and captions (one call) for those with context."""
    todo = [c for c in cases if c.error is None and (c.parsed.region or c.parsed.context)]
    answers = iter(describer.describe([r for c in todo for r in c.regions]) if todo else [])
    descriptions = [[next(answers) for _ in c.regions] if c in todo else [] for c in cases]
    ctx = [c for c in todo if c.parsed.context]
    images = {r.image_ref: r.image for c in ctx for r in c.regions}
    caps = dict(zip(images, describer.caption(list(images.items())))) if images else {}
    return descriptions, [caps if c in ctx else None for c in cases]


def score_world_features(judge, items: list[tuple], cfg: ScoringConfig = ScoringConfig(),
                         masks: MaskFolder | None = None) -> list:
    """Region detection of several features at once (one batched call for all their regions, one for
    captions), each item (explanation, positives, negatives, concepts, seed); per item a score record
    (as score_feature) or the exception that stopped it. The oracle describes the same regions too
    (`detection_oracle`, shapes-world images only)."""
    from explain.explainers import OracleDescriber

    t0 = time.time()
    before = (judge.usage.tokens_in, judge.usage.tokens_out)
    cases = []
    for explanation, positives, negatives, concepts, seed in items:
        case = _Case(explanation, agg.parse(explanation, judge.world), positives, list(concepts))
        try:
            rng = np.random.default_rng([int(seed), len(positives), *[int(e.sample) for e in positives[:16]]])
            # a feature whose activating samples were all shown to the explainer has nothing held out: it is
            # recorded with no positives (balanced accuracy null: not explained), not retried as a failure
            case.regions, case.labels = held_out_regions(judge, positives, negatives, rng)
        except Exception as e:  # noqa: BLE001  (recorded for that feature)
            case.error = e
        cases.append(case)
    try:
        descriptions, captions = _describe_all(judge.describer, cases)
    except Exception as e:  # noqa: BLE001  (a judge that failed for good: every feature of the batch)
        return [c.error or e for c in cases]
    oracle = None
    if cfg.oracle and not isinstance(judge.describer, OracleDescriber):
        from interp.shapes.ground_truth import parse_shapes_ref

        shapes = [c for c in cases if c.error is None and all(parse_shapes_ref(r.image_ref) for r in c.regions)]
        if shapes:
            oracle = dict(zip(map(id, shapes), zip(*_describe_all(OracleDescriber(judge.world), shapes))))
    seconds = time.time() - t0
    t_in, t_out = judge.usage.tokens_in - before[0], judge.usage.tokens_out - before[1]
    out = []
    for case, desc, caps in zip(cases, descriptions, captions):
        if case.error is not None:
            out.append(case.error)
            continue
        sources = [r.source for r in case.regions]
        if case.parsed.region or case.parsed.context:
            verdicts = region_verdicts(desc, case.regions, case.parsed, caps, judge.world)
        else:  # cannot tell: shown by nothing (chance detection), nothing to ask
            verdicts, desc = [0.0] * len(case.regions), [""] * len(case.regions)
        det = detection_metrics(verdicts, case.labels, sources)
        record: dict = {"explanation": case.explanation, "detection": _no_nan(asdict(det)),
                        "verdicts": verdicts, "samples": [r.sample for r in case.regions], "descriptions": desc}
        if oracle is not None and id(case) in oracle:
            o_desc, o_caps = oracle[id(case)]
            o_verdicts = (region_verdicts(o_desc, case.regions, case.parsed, o_caps, judge.world)
                          if o_desc else [0.0] * len(case.regions))
            record["detection_oracle"] = _no_nan(asdict(detection_metrics(o_verdicts, case.labels, sources)))
        elif isinstance(judge.describer, OracleDescriber):
            record["detection_oracle"] = record["detection"]
        _concept_record(record, case.explanation, case.positives, case.concepts, cfg, masks)
        share = 1 / len(items)
        record["tokens_in"] = round(t_in * share)
        record["tokens_out"] = round(t_out * share)
        record["seconds"] = round(seconds * share, 3)
        out.append(record)
    return out


def _no_nan(d: dict) -> dict:
    """NaN (undefined, e.g. AUROC without negatives) as null, so the stores stay standard JSON."""
    return {k: None if isinstance(v, float) and np.isnan(v) else v for k, v in d.items()}


def summarize(records: dict[int, dict], matched: dict[int, list[tuple[str, float]]],
              targets: tuple[float, float] = (0.9, EXPLAINED_BA), live: int | None = None) -> dict:
    """Means over all scored features, and the targets over the features that match a concept.

    `live`: how many live features there are (default: the scored ones); a live feature without a
    score counts as unexplained in `explained_live_fraction`. So does a feature that fires on too few
    samples to hold any out (an SAE's near-dead features: delphi skips them); `unscorable_features` counts
    those, and `explained_scorable_fraction` leaves them out, so the two causes can be told apart."""
    def mean(values):
        vals = [v for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))]
        return round(float(np.mean(vals)), 4) if vals else None

    def block(recs: list[dict]) -> dict:
        det = [r["detection"] for r in recs]
        ba = [d["balanced_accuracy"] for d in det]
        return {"n": len(recs),
                "balanced_accuracy": mean(ba),
                "balanced_accuracy_oracle": mean((r.get("detection_oracle") or {}).get("balanced_accuracy")
                                                 for r in recs),
                "explained_fraction": round(sum(b is not None and b >= EXPLAINED_BA for b in ba) / len(recs), 4)
                if recs else None,
                "f1": mean(d["f1"] for d in det), "auroc": mean(d["auroc"] for d in det),
                "iou_pixels": mean((r["iou"] or {}).get("pixels") for r in recs),
                "iou_tokens": mean((r["iou"] or {}).get("tokens") for r in recs),
                "tokens_in": int(sum(r.get("tokens_in", 0) for r in recs)),
                "tokens_out": int(sum(r.get("tokens_out", 0) for r in recs))}

    scored = dict(records)
    on_concept = {f: r for f, r in scored.items() if f in matched}
    named = [bool(r["names_concept"]) for r in on_concept.values()]
    bal = [r["detection"]["balanced_accuracy"] for r in on_concept.values()]
    bal = [b for b in bal if b is not None]
    out = {"all": block(list(scored.values())), "matched": block(list(on_concept.values()))}
    out["matched"].update(
        concept_accuracy=round(float(np.mean(named)), 4) if named else None,
        balanced_accuracy_min=round(float(np.min(bal)), 4) if bal else None,
        features={str(f): {"concepts": [c for c, _ in matched[f]], "explanation": r["explanation"],
                           "names_concept": r["names_concept"],
                           "balanced_accuracy": r["detection"]["balanced_accuracy"],
                           "balanced_accuracy_oracle": (r.get("detection_oracle") or {}).get("balanced_accuracy"),
                           "auroc": r["detection"]["auroc"], "recall_by_source": r["detection"]["recall_by_source"],
                           "iou_pixels": (r["iou"] or {}).get("pixels"), "iou_tokens": (r["iou"] or {}).get("tokens")}
                  for f, r in sorted(on_concept.items())},
        not_scored=sorted(set(matched) - set(on_concept)))
    n_live = len(scored) if live is None else live
    explained = sum(r["detection"]["balanced_accuracy"] is not None
                    and r["detection"]["balanced_accuracy"] >= EXPLAINED_BA for r in scored.values())
    unscorable = sum(not r["detection"]["n_pos"] for r in scored.values())
    n_scorable = n_live - unscorable
    out.update(live_features=n_live,
               explained_live_fraction=round(explained / n_live, 4) if n_live else None,
               unscorable_features=unscorable,
               explained_scorable_fraction=round(explained / n_scorable, 4) if n_scorable > 0 else None,
               detection_balanced_accuracy_all=out["all"]["balanced_accuracy"],
               explanation_accuracy=out["matched"]["concept_accuracy"],
               detection_balanced_accuracy=out["matched"]["balanced_accuracy"])
    acc_t, bal_t = targets
    out["targets"] = {"concept_accuracy>=": acc_t, "balanced_accuracy>=": bal_t,
                      "concept_accuracy_met": bool(named) and float(np.mean(named)) >= acc_t,
                      "balanced_accuracy_met": bool(bal) and float(np.mean(bal)) >= bal_t,
                      "explained_live_fraction>=": 0.8,
                      "explained_live_fraction_met": bool(n_live) and explained / n_live >= 0.8}
    return out
