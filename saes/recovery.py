"""Ground-truth feature recovery: does the SAE have a latent for each concept of the world?

For every concept (each colour, each shape), the latent that best detects the image patches
that concept covers, scored by F1 at the latent's best activation threshold (reported), with
its precision, recall and AUROC. Latents and the model's raw neurons (the baseline an SAE has
to beat) are thresholded the same way. The threshold search runs on the few latents with the
best F1 at "fires at all", so the pass over the cache stays one matrix product per chunk.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class ConceptMatch:
    concept: str
    latent: int
    threshold: float  # the latent detects the concept where its activation is >= this
    f1: float
    precision: float
    recall: float
    auroc: float
    positives: int  # patches the concept covers
    neuron_f1: float  # best raw neuron, for comparison


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


def _f1(tp, pred, pos):
    precision = np.where(pred > 0, tp / np.maximum(pred, 1), 0.0)
    recall = tp / max(pos, 1)
    f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    return f1, precision, recall


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float, float, float]:
    """(F1, precision, recall, threshold) of the best rule `scores >= threshold`."""
    order = np.argsort(-scores, kind="stable")
    y = labels[order].astype(float)
    tp = np.cumsum(y)
    pred = np.arange(1, len(y) + 1)
    ends = np.append(np.flatnonzero(np.diff(scores[order]) != 0), len(y) - 1)  # cut only between distinct scores
    if not len(ends):
        return 0.0, 0.0, 0.0, float("inf")
    f1, precision, recall = _f1(tp[ends], pred[ends], labels.sum())
    i = int(f1.argmax())
    return float(f1[i]), float(precision[i]), float(recall[i]), float(scores[order][ends[i]])


def best_threshold_f1(scores: np.ndarray, labels: np.ndarray) -> float:
    return best_threshold(scores, labels)[0]


def recover_concepts(sae, reader, chunk_rows: int = 32768, threshold: float = 0.05,
                     candidates: int = 8) -> list[ConceptMatch]:
    """Best latent per concept of the shapes world, over the image tokens of `reader`'s cache."""
    from interp.shapes.ground_truth import token_concepts

    gt = token_concepts(reader, with_object=False)
    labels = gt.labels(threshold)  # [rows, concepts]
    y = torch.from_numpy(labels.astype(np.float64))
    tp = torch.zeros(len(gt.concepts), sae.cfg.d_sae, dtype=torch.float64)
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    raw = []
    for s, x, acts in _encoded_chunks(sae, reader, gt.rows, chunk_rows):
        on = (acts > 0).double()
        tp += y[s: s + len(x)].T @ on
        fired += on.sum(0)
        raw.append(x.numpy())
    raw_x = np.concatenate(raw)
    f1_fired = np.stack([_f1(tp[j].numpy(), fired.numpy(), labels[:, j].sum())[0] for j in range(len(gt.concepts))])
    pool = np.unique(np.argsort(-f1_fired, axis=1)[:, :candidates])
    columns = np.concatenate([acts[:, pool].numpy() for _, _, acts in _encoded_chunks(sae, reader, gt.rows, chunk_rows)])
    out = []
    for j, concept in enumerate(gt.concepts):
        tried = [(best_threshold(columns[:, i], labels[:, j]), i) for i in range(len(pool))]
        (f1, precision, recall, thr), i = max(tried, key=lambda t: t[0][0])
        neuron = max(best_threshold_f1(sign * raw_x[:, d], labels[:, j])
                     for d in _top_neurons(raw_x, labels[:, j]) for sign in (1, -1))
        out.append(ConceptMatch(concept, int(pool[i]), thr, f1, precision, recall, auroc(columns[:, i], labels[:, j]),
                                int(labels[:, j].sum()), neuron))
    return out


def _encoded_chunks(sae, reader, rows: np.ndarray, chunk_rows: int):
    """(offset, raw rows, SAE activations) for `rows` of the cache, in chunks read sequentially."""
    with torch.no_grad():
        for s in range(0, len(rows), chunk_rows):
            x = torch.cat([reader.read(int(a), int(b)) for a, b in contiguous_runs(rows[s: s + chunk_rows])])
            yield s, x, sae.encode(x.to(sae.device, sae.dtype)).float().cpu()


def _top_neurons(x: np.ndarray, labels: np.ndarray, n: int = 16) -> np.ndarray:
    """The raw dimensions whose means differ most between positives and negatives (the F1 search's candidates)."""
    if labels.all() or not labels.any():
        return np.arange(min(n, x.shape[1]))
    diff = np.abs(x[labels].mean(0) - x[~labels].mean(0)) / (x.std(0) + 1e-6)
    return np.argsort(-diff)[:n]


def contiguous_runs(rows: np.ndarray):
    """Contiguous [start, stop) runs of sorted row indices, so reads stay sequential."""
    if not len(rows):
        return
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    for run in np.split(rows, breaks):
        yield run[0], run[-1] + 1


def summarize(matches: list[ConceptMatch], f1_min: float = 0.9) -> dict:
    recovered = [m.concept for m in matches if m.f1 >= f1_min]
    return {"concept_recovery": round(len(recovered) / max(len(matches), 1), 4), "f1_min": f1_min,
            "recovered": recovered, "mean_f1": round(float(np.mean([m.f1 for m in matches])), 4),
            "mean_neuron_f1": round(float(np.mean([m.neuron_f1 for m in matches])), 4),
            "concepts": [asdict(m) for m in matches]}


def register(sub) -> None:
    p = sub.add_parser("recovery", help="ground-truth feature recovery of an SAE on the shapes world",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--sae", required=True, help="SAE directory (SAELens format)")
    p.add_argument("--cache", required=True, help="activation cache of shapes-world images")
    p.add_argument("--f1-min", type=float, default=0.9, help="F1 at which a concept counts as recovered")
    p.add_argument("--out", default=None, help="write the report as JSON here (default: SAE_DIR/recovery.json)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    from interp.cache.reader import ActivationReader
    from saes.sae import SAE

    sae = SAE.load(args.sae)
    with ActivationReader(args.cache) as reader:
        sae.check_width(torch.zeros(1, reader.d))
        report = summarize(recover_concepts(sae, reader), args.f1_min)
    out = Path(args.out or Path(args.sae) / "recovery.json")
    out.write_text(json.dumps(report, indent=1))
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{'concept':10s} {'latent':>7s} {'thresh':>7s} {'F1':>6s} {'prec':>6s} {'recall':>6s} {'AUROC':>6s} "
          f"{'neuron F1':>9s}")
    for m in report["concepts"]:
        print(f"{m['concept']:10s} {m['latent']:7d} {m['threshold']:7.3f} {m['f1']:6.3f} {m['precision']:6.3f} "
              f"{m['recall']:6.3f} {m['auroc']:6.3f} {m['neuron_f1']:9.3f}")
    print(f"recovered {len(report['recovered'])}/{len(report['concepts'])} concepts at F1 >= {args.f1_min} "
          f"(mean F1 {report['mean_f1']}, best raw neurons {report['mean_neuron_f1']}); wrote {out}")
    return 0
