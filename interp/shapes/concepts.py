"""Scoring features against the shapes world's ground truth, on activations given as arrays.

Every function here takes numbers, not models: feature activations on labelled tokens (from any
SAE, or raw neurons), and the token labels of `interp.shapes.ground_truth.token_concepts`. The
SAE stage encodes and calls them (`saes.recovery`), the app and the benchmark score one feature
or a dictionary with them, and the recovery report they produce is written and read here only.

Recovery: for every concept (each colour, each shape), the feature that best detects the image
patches that concept covers, scored by F1 at the feature's best activation threshold, with its
precision, recall and AUROC. Features and the model's raw neurons (the baseline an SAE has to
beat) are thresholded the same way. The threshold search runs on the few features with the best
F1 at "fires at all", so a pass over the activations stays one matrix product per chunk.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

RECOVERY_FORMAT = "lmmscope.recovery/1"


# ---------------------------------------------------------------- detection scores


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of `x`, ties sharing their average rank (as in the rank-sum and Spearman)."""
    order = np.argsort(x, kind="stable")
    _, first, counts = np.unique(x[order], return_index=True, return_counts=True)
    ranks = np.empty(len(x))
    ranks[order] = np.repeat(first + (counts - 1) / 2.0 + 1, counts)
    return ranks


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum formula (ties get average ranks)."""
    labels = labels.astype(bool)
    n_pos, n_neg = labels.sum(), (~labels).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return float((average_ranks(scores)[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def f1_of_counts(tp, pred, pos):
    """(F1, precision, recall) from true positives, predicted positives and actual positives."""
    precision = np.where(pred > 0, tp / np.maximum(pred, 1), 0.0)
    recall = tp / max(pos, 1)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    return f1, precision, recall


@dataclass(frozen=True)
class Ranked:
    """One score column sorted once (the cost of best_threshold), to try against many label columns."""

    order: np.ndarray  # rows by descending score (stable)
    ends: np.ndarray  # positions in `order` after which the score changes: the only cuts
    cuts: np.ndarray  # the score at each end

    @classmethod
    def of(cls, scores: np.ndarray) -> Ranked:
        order = np.argsort(-scores, kind="stable")
        ranked = scores[order]
        ends = np.append(np.flatnonzero(np.diff(ranked) != 0), len(ranked) - 1) if len(ranked) else np.zeros(0, int)
        return cls(order, ends, ranked[ends])


def best_threshold(scores: np.ndarray | Ranked, labels: np.ndarray) -> tuple[float, float, float, float]:
    """(F1, precision, recall, threshold) of the best rule `scores >= threshold` (`scores` sorted already
    when given as Ranked).

    The rule that calls every row positive is left out: it detects nothing, yet on a concept most rows
    have it scores F1 2p/(1+p) (0.93 for "background", on 88% of patches), and a feature that never
    fires there would count as its detector. For a feature (zero where silent) every rule left is "where
    it fires, at this strength or more"."""
    r = scores if isinstance(scores, Ranked) else Ranked.of(scores)
    ends, cuts = r.ends[:-1], r.cuts[:-1]  # the last cut takes every row
    if not len(ends):
        return 0.0, 0.0, 0.0, float("inf")
    tp = np.cumsum(labels[r.order], dtype=np.float64)
    f1, precision, recall = f1_of_counts(tp[ends], ends + 1, labels.sum())
    i = int(f1.argmax())
    return float(f1[i]), float(precision[i]), float(recall[i]), float(cuts[i])


def concept_scores(values: np.ndarray, labels: np.ndarray, concepts: tuple[str, ...]) -> list[dict]:
    """Per concept: how well `values` (one feature on the labelled tokens) detects it: F1 at the best
    threshold, and the IoU of the tokens where the feature fires with the concept's. Best first."""
    fires = values > 0
    out = []
    for j, concept in enumerate(concepts):
        y = labels[:, j]
        f1, precision, recall, threshold = best_threshold(values, y)
        inter, union = int((fires & y).sum()), int((fires | y).sum())
        out.append({"concept": concept, "f1": f1, "precision": precision, "recall": recall,
                    "threshold": threshold, "iou": inter / union if union else 0.0, "auroc": auroc(values, y)})
    return sorted(out, key=lambda r: -r["f1"])


# ---------------------------------------------------------------- recovery


@dataclass
class ConceptMatch:
    concept: str
    feature: int
    threshold: float  # the feature detects the concept where its activation is >= this
    f1: float
    precision: float
    recall: float
    auroc: float
    positives: int  # patches the concept covers
    neuron_f1: float  # best raw neuron, for comparison
    probe_f1: float = float("nan")  # held-out linear probe: about the most one direction reaches (`probe_f1s`)


Chunks = Callable[[], Iterable[tuple[np.ndarray, np.ndarray]]]
"""A fresh pass over (raw activations [n, d], feature activations [n, d_sae]) of the labelled rows,
in the order of the labels; called twice."""


def recover_concepts(chunks: Chunks, concepts: tuple[str, ...], labels: np.ndarray,
                     candidates: int = 8, neuron_f1: np.ndarray | None = None,
                     probe_f1: np.ndarray | None = None) -> list[ConceptMatch]:
    """The best feature per concept; `labels` [rows, concepts] bool in the order `chunks` yields rows.
    `neuron_f1` and `probe_f1`: the best raw neuron's and the linear probe's F1 per concept (`neuron_f1s`,
    `probe_f1s`) when the caller scores several SAEs on the same rows; computed here otherwise."""
    tp = fired = None
    raw = []
    s = 0
    y = labels.astype(np.float64)
    for x, acts in chunks():
        on = (acts > 0).astype(np.float64)
        tp = y[s: s + len(x)].T @ on if tp is None else tp + y[s: s + len(x)].T @ on
        fired = on.sum(0) if fired is None else fired + on.sum(0)
        raw.append(x)
        s += len(x)
    raw_x = np.concatenate(raw)
    f1_fired = np.stack([f1_of_counts(tp[j], fired, labels[:, j].sum())[0] for j in range(len(concepts))])
    pool = np.unique(np.argsort(-f1_fired, axis=1)[:, :candidates])
    columns = np.concatenate([acts[:, pool] for _, acts in chunks()])
    ranked = [Ranked.of(columns[:, i]) for i in range(len(pool))]
    neuron_f1 = neuron_f1s(raw_x, labels) if neuron_f1 is None else np.asarray(neuron_f1)
    probe_f1 = probe_f1s(raw_x, labels) if probe_f1 is None else np.asarray(probe_f1)
    out = []
    for j, concept in enumerate(concepts):
        tried = [(best_threshold(ranked[i], labels[:, j]), i) for i in range(len(pool))]
        (f1, precision, recall, thr), i = max(tried, key=lambda t: t[0][0])
        out.append(ConceptMatch(concept, int(pool[i]), thr, f1, precision, recall, auroc(columns[:, i], labels[:, j]),
                                int(labels[:, j].sum()), float(neuron_f1[j]), float(probe_f1[j])))
    return out


def probe_f1s(x: np.ndarray, labels: np.ndarray, max_fit_rows: int = 65536) -> np.ndarray:
    """[concepts] held-out F1 of a least-squares linear probe per concept, at its best threshold.

    An SAE feature is a thresholded direction of the activations, so the best direction roughly bounds
    what any feature reaches (least squares is not the best linear classifier, so a feature can edge past
    it): a concept far below `f1_min` here is not linearly in the model's activations, and no SAE recipe
    will recover it; one high here and low for every feature is the SAE's to find. Two-fold
    cross-fitting over the two contiguous halves of the rows (whole samples, in cache order): every row
    is scored by a probe fitted on the other half (at most `max_fit_rows` of it, evenly spaced, so the
    cost stays bounded on wide caches)."""
    n = len(x)
    if n < 4:
        return np.zeros(labels.shape[1])
    xa = np.concatenate([np.asarray(x, np.float64), np.ones((n, 1))], axis=1)
    y = labels.astype(np.float64) * 2 - 1
    half = n // 2
    scores = np.empty(labels.shape)
    for fit, test in ((np.arange(half), np.arange(half, n)), (np.arange(half, n), np.arange(half))):
        fit = fit[np.unique(np.linspace(0, len(fit) - 1, min(len(fit), max_fit_rows)).astype(int))]
        w = np.linalg.lstsq(xa[fit], y[fit], rcond=None)[0]
        scores[test] = xa[test] @ w
    return np.array([best_threshold(scores[:, j], labels[:, j])[0] if labels[:, j].any() else 0.0
                     for j in range(labels.shape[1])])


def neuron_f1s(x: np.ndarray, labels: np.ndarray, n: int = 16) -> np.ndarray:
    """[concepts] the best single raw neuron's F1 per concept (either sign, at its best threshold): the
    baseline a feature is compared with. It depends on the rows only, so a caller scoring many SAEs on the
    same rows computes it once. The search tries the `n` dimensions whose means differ most between
    positives and negatives."""
    sd = x.std(0) + 1e-6
    columns: dict[tuple[int, int], Ranked] = {}  # (dimension, sign), sorted once for every concept
    out = np.zeros(labels.shape[1])
    for j in range(labels.shape[1]):
        y = labels[:, j]
        if y.all() or not y.any():
            dims = np.arange(min(n, x.shape[1]))
        else:
            dims = np.argsort(-(np.abs(x[y].mean(0) - x[~y].mean(0)) / sd))[:n]
        for d in dims:
            for sign in (1, -1):
                if (int(d), sign) not in columns:
                    columns[(int(d), sign)] = Ranked.of(sign * x[:, d])
                out[j] = max(out[j], best_threshold(columns[(int(d), sign)], y)[0])
    return out


def contiguous_runs(rows: np.ndarray):
    """Contiguous [start, stop) runs of sorted row indices, so reads stay sequential."""
    if not len(rows):
        return
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for run in np.split(rows, breaks):
        yield run[0], run[-1] + 1


# ---------------------------------------------------------------- the recovery report (RUN/recovery.json)


@dataclass
class RecoveryReport:
    """What `interp recovery` writes: the best feature per concept, and how many concepts reach f1_min."""

    concepts: list[ConceptMatch]
    f1_min: float = 0.9
    format: str = RECOVERY_FORMAT
    extra: dict = field(default_factory=dict)  # how it was made (SAE fingerprint, cache)

    @property
    def recovered(self) -> list[str]:
        return [m.concept for m in self.concepts if m.f1 >= self.f1_min]

    @property
    def concept_recovery(self) -> float:
        return round(len(self.recovered) / max(len(self.concepts), 1), 4)

    @property
    def mean_f1(self) -> float:
        return round(float(np.mean([m.f1 for m in self.concepts])), 4)

    @property
    def mean_neuron_f1(self) -> float:
        return round(float(np.mean([m.neuron_f1 for m in self.concepts])), 4)

    @property
    def linear_ceiling(self) -> float | None:
        """The fraction of concepts a linear probe finds at f1_min: what any SAE could recover at most
        (None for a report written before probes were part of it)."""
        f1 = [m.probe_f1 for m in self.concepts]
        if not f1 or any(np.isnan(f1)):
            return None
        return round(sum(v >= self.f1_min for v in f1) / len(f1), 4)

    def to_json(self) -> dict:
        return {"format": self.format, "concept_recovery": self.concept_recovery, "f1_min": self.f1_min,
                "recovered": self.recovered, "mean_f1": self.mean_f1, "mean_neuron_f1": self.mean_neuron_f1,
                "linear_ceiling": self.linear_ceiling, "concepts": [asdict(m) for m in self.concepts], **self.extra}

    def match(self, concept: str) -> ConceptMatch:
        for m in self.concepts:
            if m.concept == concept:
                return m
        raise KeyError(f"no feature matches concept {concept!r}; concepts: {', '.join(m.concept for m in self.concepts)}")

    def concept_of(self, feature: int) -> str | None:
        """The concept whose best feature is `feature` (the best F1 if several), else None."""
        mine = [m for m in self.concepts if m.feature == feature]
        return max(mine, key=lambda m: m.f1).concept if mine else None

    def by_feature(self) -> dict[int, list[ConceptMatch]]:
        out: dict[int, list[ConceptMatch]] = {}
        for m in self.concepts:
            out.setdefault(m.feature, []).append(m)
        return out

    def matched(self, f1_min: float | None = None) -> dict[int, list[tuple[str, float]]]:
        """feature -> [(concept, F1)] for every concept matched to it with F1 >= f1_min."""
        f1_min = self.f1_min if f1_min is None else f1_min
        out: dict[int, list[tuple[str, float]]] = {}
        for m in self.concepts:
            if m.f1 >= f1_min:
                out.setdefault(int(m.feature), []).append((m.concept, round(float(m.f1), 4)))
        return out

    def labels(self) -> dict[int, str]:
        """feature -> its concept (the best F1 where several concepts share a feature), for tables."""
        return {m.feature: m.concept for m in sorted(self.concepts, key=lambda m: m.f1)}


def write_recovery(report: RecoveryReport, path: str | Path) -> Path:
    from interp.infra.durable import write_json

    return write_json(path, report.to_json(), indent=1)


def load_recovery(path: str | Path) -> RecoveryReport:
    """The one reader of recovery reports (RUN/recovery.json)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no recovery report at {path}: make it with `interp recovery {path.parent}`")
    raw = json.loads(path.read_text())
    if raw.get("format") != RECOVERY_FORMAT:
        raise ValueError(f"{path} is not an lmmscope recovery report (format {raw.get('format')!r}, "
                         f"expected {RECOVERY_FORMAT!r}): re-run `interp recovery {path.parent}`")
    names = {f for f in ConceptMatch.__dataclass_fields__}
    known = {"format", "concept_recovery", "f1_min", "recovered", "mean_f1", "mean_neuron_f1", "linear_ceiling",
             "concepts"}
    return RecoveryReport([ConceptMatch(**{k: v for k, v in c.items() if k in names}) for c in raw["concepts"]],
                          float(raw["f1_min"]), extra={k: v for k, v in raw.items() if k not in known})


# ---------------------------------------------------------------- linear probes and dictionary alignment


def probe_directions(raw: np.ndarray, labels: np.ndarray, steps: int = 300, seed: int = 0) -> np.ndarray:
    """[concepts, d] unit directions of logistic-regression probes for the concepts on raw activations."""
    import torch

    raw = torch.as_tensor(raw)
    std = raw.std(0) + 1e-6
    x = (raw - raw.mean(0)) / std
    y = torch.from_numpy(labels.astype(np.float32))
    torch.manual_seed(seed)
    w = torch.zeros(x.shape[1], y.shape[1], requires_grad=True)
    b = torch.zeros(y.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=0.05)
    for _ in range(steps):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    d = (w.detach() / std[:, None]).T  # the probe reads (x - mean) / std: its raw-space direction is w / std
    return (d / d.norm(dim=1, keepdim=True)).numpy()


def max_cosines(decoder: np.ndarray, directions: np.ndarray) -> np.ndarray:
    """Per direction, the max cosine with any decoder row [d_sae, d] (the dictionary's best match)."""
    import torch

    w = torch.as_tensor(decoder).float()
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (torch.from_numpy(directions).float() @ w.T).max(dim=1).values.numpy()
