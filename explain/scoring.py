"""Scoring explanations: detection by a judge, IoU with ground-truth masks, concept accuracy.

- Detection: the judge (the explainer by default) gets the explanation and, one at a time,
  held-out activating samples (top samples and quantile-band samples the explainer did not see,
  explain.examples) and non-activating ones (FeatureStats negatives), unmarked, and says whether
  each shows it. Balanced accuracy and F1 at P(yes) >= 0.5, AUROC over P(yes) where the judge
  gives one (else over its yes/no), and the recall per source (top, q0..q3) to show which part
  of the feature's range the explanation covers.
- IoU: the feature's activation mask (pixels of the tokens above a threshold) against the
  ground-truth mask of its concept, pooled over the held-out activating images (sum of
  intersections over sum of unions): pixel masks from the shapes world's objects, or PNG masks
  a user supplies per sample; for a single shapes-world concept also at token resolution
  (a token is in the concept where it covers > 5% of the token's box, interp.shapes.ground_truth),
  which a patch-level feature can reach 1.0 on.
- Concept accuracy: for a feature that ground-truth recovery (interp.shapes.concepts, RUN/recovery.json)
  matches to a concept with F1 >= f1_min, whether the explanation names that concept.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from explain.examples import MarkedExample
from explain.prompts import names_concept, world_terms
from explain.render import activation_map
from interp.shapes.world import WorldConfig
from interp.shapes.concepts import auroc


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
    s = np.array([float(scores[i]) for i in keep])
    y = np.array([bool(labels[i]) for i in keep])
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


def iou_score(examples: list[MarkedExample], concept: str | None, threshold: float = 0.0,
              masks: MaskFolder | None = None, world: WorldConfig = WorldConfig()) -> IoU | None:
    """IoU of the feature's masks with the ground truth over `examples` (None: no ground truth for them).
    `concept`: a world concept or explanation (its colour and shape words)."""
    from interp.shapes.ground_truth import object_mask, token_labels

    terms = world_terms(concept or "", world)
    if masks is None and not terms.words:
        return None
    single = len(terms.words) == 1
    inter = union = t_inter = t_union = 0
    per_image = []
    for ex in examples:
        pred = feature_mask(ex, threshold)
        truth = (masks.get(ex.source_index, ex.original.size) if masks
                 else object_mask(ex.image_ref, terms.colors, terms.shapes, world))
        if truth is None:
            continue
        i, u = int((pred & truth).sum()), int((pred | truth).sum())
        inter, union = inter + i, union + u
        per_image.append(i / u if u else 1.0)
        if single and masks is None:
            on = ex.acts > threshold * ex.vmax
            lab = token_labels(ex.image_ref, ex.tokens, terms.words[0], world)
            t_inter, t_union = t_inter + int((on & lab).sum()), t_union + int((on | lab).sum())
    if not per_image:
        return None
    name = "user masks" if masks else " ".join(terms.words)
    return IoU(name, round(inter / union if union else 1.0, 4), round(float(np.mean(per_image)), 4),
               round(t_inter / t_union if t_union else 1.0, 4) if single and masks is None else None, len(per_image))


# ---------------------------------------------------------------- the whole score of one feature


@dataclass
class ScoringConfig:
    iou_threshold: float = 0.0  # tokens above this fraction of the feature's max form its mask
    f1_min: float = 0.9  # recovery F1 at which a feature counts as matching a concept


def score_feature(judge, explanation: str, positives: list[MarkedExample], negatives: list[MarkedExample],
                  concepts: list[str], cfg: ScoringConfig = ScoringConfig(), masks: MaskFolder | None = None) -> dict:
    """Detection, IoU and concept accuracy of one feature's explanation, as one JSON-able record."""
    t0 = time.time()
    before = (judge.usage.tokens_in, judge.usage.tokens_out)
    images = [ex.original for ex in positives + negatives]
    verdicts = judge.judge(explanation, images)
    det = detection_metrics(verdicts, [True] * len(positives) + [False] * len(negatives),
                            [ex.source for ex in positives + negatives])
    record: dict = {"explanation": explanation, "detection": _no_nan(asdict(det)),
                    "verdicts": [None if v is None else round(float(v), 4) for v in verdicts],
                    "samples": [ex.sample for ex in positives + negatives]}
    truth = concepts[0] if concepts else explanation  # the matched concept, else what the explanation names
    iou = iou_score(positives, truth, cfg.iou_threshold, masks)
    record["iou"] = asdict(iou) if iou else None
    record["concepts"] = concepts
    record["names_concept"] = any(names_concept(explanation, c) for c in concepts) if concepts else None
    record["tokens_in"] = judge.usage.tokens_in - before[0]
    record["tokens_out"] = judge.usage.tokens_out - before[1]
    record["seconds"] = round(time.time() - t0, 3)
    return record


def _no_nan(d: dict) -> dict:
    """NaN (undefined, e.g. AUROC without negatives) as null, so the stores stay standard JSON."""
    return {k: None if isinstance(v, float) and np.isnan(v) else v for k, v in d.items()}


def summarize(records: dict[int, dict], matched: dict[int, list[tuple[str, float]]],
              targets: tuple[float, float] = (0.8, 0.85)) -> dict:
    """Means over all scored features, and the targets over the features that match a concept."""
    def mean(values):
        vals = [v for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))]
        return round(float(np.mean(vals)), 4) if vals else None

    def block(recs: list[dict]) -> dict:
        det = [r["detection"] for r in recs]
        return {"n": len(recs),
                "balanced_accuracy": mean(d["balanced_accuracy"] for d in det),
                "f1": mean(d["f1"] for d in det), "auroc": mean(d["auroc"] for d in det),
                "iou_pixels": mean((r["iou"] or {}).get("pixels") for r in recs),
                "iou_tokens": mean((r["iou"] or {}).get("tokens") for r in recs),
                "tokens_in": int(sum(r.get("tokens_in", 0) for r in recs)),
                "tokens_out": int(sum(r.get("tokens_out", 0) for r in recs))}

    scored = {f: r for f, r in records.items()}
    on_concept = {f: r for f, r in scored.items() if f in matched}
    named = [bool(r["names_concept"]) for r in on_concept.values()]
    bal = [r["detection"]["balanced_accuracy"] for r in on_concept.values()]
    out = {"all": block(list(scored.values())), "matched": block(list(on_concept.values()))}
    out["matched"].update(
        concept_accuracy=round(float(np.mean(named)), 4) if named else None,
        balanced_accuracy_min=round(float(np.min(bal)), 4) if bal else None,
        features={str(f): {"concepts": [c for c, _ in matched[f]], "explanation": r["explanation"],
                           "names_concept": r["names_concept"],
                           "balanced_accuracy": r["detection"]["balanced_accuracy"],
                           "auroc": r["detection"]["auroc"], "recall_by_source": r["detection"]["recall_by_source"],
                           "iou_pixels": (r["iou"] or {}).get("pixels"), "iou_tokens": (r["iou"] or {}).get("tokens")}
                  for f, r in sorted(on_concept.items())},
        not_scored=sorted(set(matched) - set(on_concept)))
    acc_t, bal_t = targets
    out["targets"] = {"concept_accuracy>=": acc_t, "balanced_accuracy>=": bal_t,
                      "concept_accuracy_met": bool(named) and float(np.mean(named)) >= acc_t,
                      "balanced_accuracy_met": bool(bal) and float(np.mean(bal)) >= bal_t}
    return out
