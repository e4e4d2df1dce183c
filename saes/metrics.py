"""SAEBench-style metrics of a dictionary, scored against exact concept labels instead of heuristic ones.

Every function takes arrays, not models or worlds: feature activations on labelled rows (a scipy CSR
matrix or a dense array, [rows, d_sae]), the raw activations of those rows ([rows, d]), boolean concept
labels ([rows, concepts]) and the decoder. Any world whose rows have labels (the shapes world v1's 9
colours and shapes, v2's 33 concepts) is scored the same way; `encode_sparse` gives the activations of
any `saes.sae.SAE`. Rows are split into a train part (probes, feature selection) and a held-out part
(every reported number) by `split_rows`, by sample, so patches of one image never sit on both sides.

- **Sparse probing** (SAEBench `sparse_probing`): per concept, the k features with the largest
  (standardised) difference of mean activation between positive and negative rows, a logistic probe on them, its
  held-out F1; the same with the k raw neurons of largest standardised mean difference (sign-free: a
  neuron can code a concept negatively), the baseline an SAE should beat. k = 1 and 5.
- **Feature absorption** (SAEBench `absorption`, Chanin et al. 2024): a concept's *main features* are
  the top-k sparse-probing features for it, k grown while each extra feature raises the probe's F1 by
  at least `f1_jump` (0.03, SAEBench's feature-splitting rule), leaving out *conjunction features*:
  ones that fire (>= 90% precision) only where the concept meets another concept that covers at most
  half of it ("red circle" for red). Exact labels tell those apart; SAEBench's heuristic labels cannot,
  and its rule would count a big "red circle" feature as red's split instead of as the absorber it
  is (a feature for a part of red that the red feature no longer covers). On held-out rows that carry the
  concept and that a logistic probe for it on the raw activations recognises (SAEBench's "probe true
  positives"), the concept's share of the activation is its probe projection, (x - b_dec) . p (we
  project x - b_dec, the part the features reconstruct; SAEBench projects x), and a feature f's share
  is a_f * cos(W_dec[f], p). `absorption` is, on the rows where no main feature fires, the share of
  the projection taken by at most 3 other features whose decoders align with p (cos >= 0.1), when
  together they take at least 40% of it (0 on the rows where a main feature fires); the mean over rows,
  then over concepts. `absorption_saebench` is SAEBench's own fraction on every row, main features
  firing or not: absorbed / (absorbed + main). It also counts a general feature that fires *with* the
  main one and carries part of the concept's direction (a Matryoshka parent under its child), which is
  sharing, not absorption; the first number does not. A row is fully absorbed (`full_absorption`) when
  no main feature fires and one other aligned feature (cos >= 0.025) carries >= 40% of the projection.
- **MCC** (mean correlation coefficient of dictionary learning): the cosine between each concept's
  probe direction and the decoder rows, matched one to one by the Hungarian algorithm (no feature
  serves two concepts); `mcc` is the mean matched cosine, `mean_max_cosine` the unmatched mean max.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

F1_JUMP = 0.03  # SAEBench: a k-sparse probe whose F1 rises by this much with one more feature is a split
MAX_SPLIT = 5  # at most this many main features per concept
ABSORBER_COS = 0.1  # SAEBench: an absorbing feature's decoder has at least this cosine with the probe
FULL_ABSORBER_COS = 0.025  # SAEBench: the top projecting feature's cosine for full absorption
PROJECTION_SHARE = 0.4  # SAEBench: absorbers must carry at least this share of the probe projection
MAX_ABSORBERS = 3  # SAEBench: at most this many features share an absorbed job


# ---------------------------------------------------------------- activations and splits


def _csr(acts):
    from scipy import sparse

    return acts.tocsr() if sparse.issparse(acts) else sparse.csr_matrix(np.asarray(acts, np.float32))


@torch.no_grad()
def encode_sparse(sae, x: torch.Tensor | np.ndarray, chunk_rows: int = 8192):
    """A scipy CSR matrix [rows, d_sae] of `sae.encode(x)` (raw activations in), built chunk by chunk."""
    from scipy import sparse

    x = torch.as_tensor(x)
    parts = []
    for s in range(0, len(x), chunk_rows):
        a = sae.encode(x[s: s + chunk_rows].to(sae.device, sae.dtype)).float().cpu()
        rows, cols = a.nonzero(as_tuple=True)
        parts.append(sparse.csr_matrix((a[rows, cols].numpy(), (rows.numpy(), cols.numpy())), shape=tuple(a.shape)))
    return sparse.vstack(parts).tocsr() if parts else sparse.csr_matrix((0, sae.cfg.d_sae), dtype=np.float32)


def split_rows(groups: np.ndarray, test_fraction: float = 0.25, seed: int = 0) -> np.ndarray:
    """[rows] bool, True for held-out rows: whole groups (samples) are held out, a seeded `test_fraction` of them."""
    groups = np.asarray(groups)
    ids = np.unique(groups)
    rng = np.random.default_rng(seed)
    held = rng.permutation(ids)[: max(1, int(round(test_fraction * len(ids))))]
    return np.isin(groups, held)


def f1_score(pred: np.ndarray, y: np.ndarray) -> float:
    tp = float((pred & y).sum())
    denom = float(pred.sum() + y.sum())
    return 2 * tp / denom if denom else 0.0


# ---------------------------------------------------------------- logistic probes


@dataclass
class Probes:
    """Linear probes in the raw activation space: logit_c(x) = x . weight[c] + bias[c]."""

    weight: np.ndarray  # [concepts, d]
    bias: np.ndarray  # [concepts]

    def logits(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x, np.float32) @ self.weight.T + self.bias

    @property
    def directions(self) -> np.ndarray:
        """[concepts, d] unit directions."""
        return self.weight / np.maximum(np.linalg.norm(self.weight, axis=1, keepdims=True), 1e-12)


def _fit_logistic(x: np.ndarray, y: np.ndarray, balanced: bool, steps: int, l2: float) -> tuple[np.ndarray, np.ndarray]:
    """Logistic regression for every column of y at once (standardised inputs, L-BFGS); weights and biases
    in the input's own units. `balanced` weighs positives and negatives equally (as SAEBench's k-sparse
    probes, sklearn's class_weight='balanced')."""
    xt = torch.as_tensor(np.asarray(x, np.float32))
    yt = torch.as_tensor(np.asarray(y, np.float32)).reshape(len(xt), -1)
    mu, sd = xt.mean(0), xt.std(0) + 1e-6
    xs = (xt - mu) / sd
    n_pos = yt.sum(0).clamp_min(1)
    pos_weight = ((len(yt) - n_pos) / n_pos) if balanced else None
    w = torch.zeros(xt.shape[1], yt.shape[1], requires_grad=True)
    b = torch.zeros(yt.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(xs @ w + b, yt, pos_weight=pos_weight)
        loss = loss + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        w_raw = w / sd[:, None]
        b_raw = b - (mu[:, None] * w_raw).sum(0)
    return w_raw.T.numpy(), b_raw.numpy()


def train_probes(raw: np.ndarray, labels: np.ndarray, steps: int = 200, l2: float = 1e-4) -> Probes:
    """Logistic probes for every concept on raw activations (the ground-truth directions of MCC and
    absorption; unweighted, so a positive logit means the probe recognises the concept)."""
    w, b = _fit_logistic(raw, labels, balanced=False, steps=steps, l2=l2)
    return Probes(w, b)


def _probe_f1(x_tr, y_tr, x_te, y_te) -> float:
    w, b = _fit_logistic(x_tr, y_tr, balanced=True, steps=100, l2=1e-4)
    return f1_score((np.asarray(x_te, np.float32) @ w[0] + b[0]) > 0, y_te)


# ---------------------------------------------------------------- sparse probing


def _mean_diff(acts, y: np.ndarray) -> np.ndarray:
    """Mean activation on positive rows minus on negative rows, per feature, in units of the feature's standard
    deviation over all rows (sparse-friendly)."""
    yf = y.astype(np.float32)
    pos = np.asarray(acts.T @ yf).ravel() / max(yf.sum(), 1)
    neg = np.asarray(acts.T @ (1 - yf)).ravel() / max((1 - yf).sum(), 1)
    n = max(acts.shape[0], 1)
    mean = np.asarray(acts.sum(0)).ravel() / n
    sq = np.asarray(acts.multiply(acts).sum(0)).ravel() / n if hasattr(acts, "multiply") else (acts ** 2).mean(0)
    return (pos - neg) / (np.sqrt(np.maximum(sq - mean ** 2, 0)) + 1e-6)


def top_features(acts, y: np.ndarray, k: int) -> np.ndarray:
    """The k features with the largest standardised difference of mean activation between positives and
    negatives. SAEBench ranks by the raw difference; standardising keeps a dense, large "any object" feature
    (or an external SAE's unnormalised scale) from outranking the concept's own feature."""
    return np.argsort(-_mean_diff(acts, y), kind="stable")[:k]


def top_neurons(raw: np.ndarray, y: np.ndarray, k: int) -> np.ndarray:
    """The k raw neurons with the largest |standardised mean difference| (neurons may code a concept negatively)."""
    diff = np.abs(raw[y].mean(0) - raw[~y].mean(0)) / (raw.std(0) + 1e-6) if y.any() and (~y).any() \
        else np.zeros(raw.shape[1])
    return np.argsort(-diff, kind="stable")[:k]


def neuron_probing(raw: np.ndarray, labels: np.ndarray, concepts, test: np.ndarray,
                   ks: tuple[int, ...] = (1, 5)) -> dict[str, dict]:
    """Sparse probing's baseline: per concept, the held-out F1 of probes on its top-k raw neurons
    (`neurons_top{k}`). It depends on the rows only, so a caller scoring many SAEs on the same rows computes
    it once and hands it to `sparse_probing`."""
    train = ~test
    r_tr, r_te = raw[train], raw[test]
    per: dict[str, dict] = {}
    for j, c in enumerate(concepts):
        y = labels[:, j].astype(bool)
        y_tr, y_te = y[train], y[test]
        if y_tr.sum() == 0 or y_te.sum() == 0:
            continue
        per[c] = {}
        for k in ks:
            neurons = top_neurons(r_tr, y_tr, k)
            per[c][f"neurons_top{k}"] = round(_probe_f1(r_tr[:, neurons], y_tr, r_te[:, neurons], y_te), 4)
    return per


def sparse_probing(acts, raw: np.ndarray, labels: np.ndarray, concepts, test: np.ndarray,
                   ks: tuple[int, ...] = (1, 5), neurons: dict[str, dict] | None = None) -> dict:
    """Held-out F1 of logistic probes on each concept's top-k features and top-k neurons, per k; see the
    module. `neurons`: `neuron_probing` of the same rows, when already computed."""
    acts = _csr(acts)
    train = ~test
    neurons = neurons if neurons is not None else neuron_probing(raw, labels, concepts, test, ks)
    a_tr, a_te = acts[np.flatnonzero(train)], acts[np.flatnonzero(test)]
    per: dict[str, dict] = {}
    for j, c in enumerate(concepts):
        y = labels[:, j].astype(bool)
        y_tr, y_te = y[train], y[test]
        row = {}
        if y_tr.sum() == 0 or y_te.sum() == 0:
            per[c] = {"positives": int(y.sum())}
            continue
        for k in ks:
            feats = top_features(a_tr, y_tr, k)
            row[f"top{k}"] = round(_probe_f1(a_tr[:, feats].toarray(), y_tr, a_te[:, feats].toarray(), y_te), 4)
            row[f"top{k}_features"] = [int(f) for f in feats]
            row[f"neurons_top{k}"] = neurons[c][f"neurons_top{k}"]
        per[c] = row | {"positives": int(y.sum())}
    out = {"concepts": per}
    for k in ks:
        vals = [r[f"top{k}"] for r in per.values() if f"top{k}" in r]
        nvals = [r[f"neurons_top{k}"] for r in per.values() if f"neurons_top{k}" in r]
        out[f"sparse_probing_top{k}"] = round(float(np.mean(vals)), 4) if vals else None
        out[f"sparse_probing_neurons_top{k}"] = round(float(np.mean(nvals)), 4) if nvals else None
    return out


# ---------------------------------------------------------------- absorption


CONJUNCTION_PRECISION = 0.9  # a feature firing this precisely on (concept and another concept) is a conjunction
CONJUNCTION_SHARE = 0.5  # ... when that other concept covers at most this share of the concept's rows


def conjunction_features(acts, labels: np.ndarray, j: int, features: np.ndarray) -> np.ndarray:
    """[len(features)] bool: which of `features` detect a conjunction of concept j with another concept c'
    (>= 90% of their firing rows carry both) where c' covers at most half of j's rows; i.e. a feature for
    a more specific concept ("red circle"), not for concept j ("red") nor for its implied ones ("object")."""
    y = labels[:, j].astype(bool)
    if not len(features) or not y.any():
        return np.zeros(len(features), bool)
    fires = (acts[:, features] > 0).astype(np.float32).tocsc() if hasattr(acts, "tocsc") else \
        (np.asarray(acts)[:, features] > 0).astype(np.float32)
    n_fire = np.asarray(fires.sum(0)).ravel()
    both = labels.astype(np.float32) * y[:, None]  # [rows, concepts]: concept j and c'
    precision = np.asarray(fires.T @ both) / np.maximum(n_fire, 1)[:, None]  # [features, concepts]
    share = labels[y].mean(0)  # of j's rows, the share each other concept covers
    narrower = (share <= CONJUNCTION_SHARE) & (np.arange(labels.shape[1]) != j)
    return ((precision >= CONJUNCTION_PRECISION) & narrower[None, :]).any(1) & (n_fire > 0)


def split_features(acts, labels_tr: np.ndarray, j: int, acts_te, y_te: np.ndarray, max_k: int = MAX_SPLIT,
                   f1_jump: float = F1_JUMP) -> tuple[list[int], list[float]]:
    """Concept j's main features: the top-k sparse-probing features that are not conjunction features
    (`conjunction_features`), k grown from 1 while each step raises the held-out F1 of a k-sparse probe by
    >= f1_jump (SAEBench's feature-splitting rule); with the F1 per k tried."""
    y_tr = labels_tr[:, j].astype(bool)
    ranked = top_features(acts, y_tr, 8 * max_k)
    order = ranked[~conjunction_features(acts, labels_tr, j, ranked)][:max_k]
    best, main, f1s = -1.0, [], []
    for k in range(1, len(order) + 1):
        feats = order[:k]
        f1 = _probe_f1(acts[:, feats].toarray(), y_tr, acts_te[:, feats].toarray(), y_te)
        f1s.append(round(f1, 4))
        if f1 < best + f1_jump:
            break
        best, main = f1, [int(f) for f in feats]
    return main, f1s


def _top_sum(m: np.ndarray, n: int) -> np.ndarray:
    """Per row, the sum of the n largest entries (n or fewer columns)."""
    if m.shape[1] == 0:
        return np.zeros(len(m))
    n = min(n, m.shape[1])
    return -np.sort(-m, axis=1)[:, :n].sum(1)


def absorption(acts, raw: np.ndarray, labels: np.ndarray, concepts, decoder: np.ndarray, b_dec: np.ndarray,
               test: np.ndarray, probes: Probes | None = None, main: dict[str, list[int]] | None = None) -> dict:
    """Feature absorption per concept and on average, as SAEBench measures it, with exact labels (module doc).

    `probes`: logistic probes on the raw activations (trained on the train rows when not given);
    `main`: the main features per concept (found by `split_features` when not given)."""
    acts = _csr(acts)
    train = ~test
    probes = probes if probes is not None else train_probes(raw[train], labels[train])
    dirs = probes.directions
    dec = np.asarray(decoder, np.float32)
    dec = dec / np.maximum(np.linalg.norm(dec, axis=1, keepdims=True), 1e-12)
    cos = dirs @ dec.T  # [concepts, d_sae]
    a_tr, a_te = acts[np.flatnonzero(train)], acts[np.flatnonzero(test)]
    raw_te = raw[test]
    proj_all = (raw_te - np.asarray(b_dec, np.float32)) @ dirs.T  # [test rows, concepts]
    recognised = probes.logits(raw_te) > 0
    per: dict[str, dict] = {}
    for j, c in enumerate(concepts):
        y = labels[:, j].astype(bool)
        y_tr, y_te = y[train], y[test]
        if y_tr.sum() == 0 or y_te.sum() == 0:
            per[c] = {"positives": 0}
            continue
        if main is not None and c in main:
            feats, f1s = list(main[c]), []
        else:
            feats, f1s = split_features(a_tr, labels[train], j, a_te, y_te)
        rows = np.flatnonzero(y_te & recognised[:, j])
        if not len(rows):
            per[c] = {"positives": 0, "main_features": feats, "split_f1": f1s}
            continue
        a = a_te[rows]
        act_proj = proj_all[rows, j]
        contrib = a.multiply(cos[j][None, :]).tocsr()  # a_f * cos_f, sparse
        main_proj = np.asarray(contrib[:, feats].sum(1)).ravel() if feats else np.zeros(len(rows))
        others = np.ones(cos.shape[1], bool)
        others[feats] = False
        cand = np.flatnonzero(others & (cos[j] >= ABSORBER_COS))
        cand_proj = np.maximum(contrib[:, cand].toarray(), 0) if len(cand) else np.zeros((len(rows), 0))
        absorbed = _top_sum(cand_proj, MAX_ABSORBERS)
        frac = np.zeros(len(rows))  # SAEBench's absorption fraction
        with np.errstate(divide="ignore", invalid="ignore"):
            share = np.where(act_proj > 0, absorbed / act_proj, 0.0)
        live = (main_proj < act_proj) & (share >= PROJECTION_SHARE)
        frac[live & (main_proj <= 0)] = 1.0
        part = live & (main_proj > 0)
        taken = np.minimum(absorbed[part], act_proj[part] - main_proj[part])
        frac[part] = np.clip(taken / (taken + main_proj[part]), 0.0, 1.0)
        main_fires = (a[:, feats] > 0).toarray().any(1) if feats else np.zeros(len(rows), bool)
        # where the main features fail to fire: the share of the job the aligned others took
        absorbed_share = np.where(~main_fires & (share >= PROJECTION_SHARE), np.minimum(share, 1.0), 0.0)
        # full absorption: no main feature fires; the top projecting feature is aligned and carries >= 40%
        dense_contrib = contrib.toarray() if contrib.shape[1] <= 8192 else None
        if dense_contrib is not None:
            top = dense_contrib.argmax(1)
            top_proj = dense_contrib[np.arange(len(rows)), top]
        else:  # very wide dictionaries: the top projecting feature row by row
            top = np.zeros(len(rows), int)
            top_proj = np.zeros(len(rows))
            for i in range(len(rows)):
                s, e = contrib.indptr[i], contrib.indptr[i + 1]
                if e > s:
                    m = s + int(np.argmax(contrib.data[s:e]))
                    top[i], top_proj[i] = contrib.indices[m], contrib.data[m]
        with np.errstate(divide="ignore", invalid="ignore"):
            full = (~main_fires) & (act_proj > 0) & (cos[j][top] >= FULL_ABSORBER_COS) & \
                   (top_proj / np.where(act_proj > 0, act_proj, 1) >= PROJECTION_SHARE)
        per[c] = {"absorption": round(float(absorbed_share.mean()), 4),
                  "absorption_saebench": round(float(frac.mean()), 4), "full_absorption": round(float(full.mean()), 4),
                  "main_missing": round(float((~main_fires).mean()), 4),
                  "positives": int(len(rows)), "main_features": feats, "split_f1": f1s,
                  "main_cosine": [round(float(cos[j][f]), 4) for f in feats]}
    scored = [r for r in per.values() if "absorption" in r]
    def mean(key):
        return round(float(np.mean([r[key] for r in scored])), 4) if scored else None

    return {"absorption": mean("absorption"), "absorption_saebench": mean("absorption_saebench"),
            "full_absorption": mean("full_absorption"), "main_missing": mean("main_missing"),
            "mean_split_features": round(float(np.mean([len(r["main_features"]) for r in scored])), 3)
            if scored else None,
            "concepts": per}


# ---------------------------------------------------------------- feature splitting


def features_per_concept(acts, labels: np.ndarray, precision: float = CONJUNCTION_PRECISION) -> float:
    """Mean over concepts of the live features that fire on it with >= `precision` (a concept split into
    many features, "red" into "red circle", "red square", ..., or "red in the top-left cell", counts them
    all): what grows as a dictionary widens and splits its concepts."""
    acts = _csr(acts)
    fires = (acts > 0).astype(np.float32)
    n_fire = np.asarray(fires.sum(0)).ravel()
    prec = np.asarray(fires.T @ labels.astype(np.float32)) / np.maximum(n_fire, 1)[:, None]  # [d_sae, concepts]
    return round(float(((prec >= precision) & (n_fire > 0)[:, None]).sum(0).mean()), 3)


# ---------------------------------------------------------------- dictionary alignment


def mcc(decoder: np.ndarray, directions: np.ndarray, concepts=None) -> dict:
    """Mean matched cosine between concept directions [concepts, d] and decoder rows [d_sae, d], matched one
    to one by the Hungarian algorithm (scipy's linear_sum_assignment); and the unmatched mean max cosine."""
    from scipy.optimize import linear_sum_assignment

    dec = np.asarray(decoder, np.float64)
    dec = dec / np.maximum(np.linalg.norm(dec, axis=1, keepdims=True), 1e-12)
    d = np.asarray(directions, np.float64)
    d = d / np.maximum(np.linalg.norm(d, axis=1, keepdims=True), 1e-12)
    cos = d @ dec.T
    rows, cols = linear_sum_assignment(-cos)
    names = list(concepts) if concepts is not None else [str(i) for i in range(len(d))]
    matched = {names[r]: {"feature": int(c), "cosine": round(float(cos[r, c]), 4)} for r, c in zip(rows, cols)}
    return {"mcc": round(float(cos[rows, cols].mean()), 4), "mean_max_cosine": round(float(cos.max(1).mean()), 4),
            "matched": matched}


def dictionary_metrics(acts, raw: np.ndarray, labels: np.ndarray, concepts, decoder: np.ndarray,
                       b_dec: np.ndarray, test: np.ndarray, probes: Probes | None = None,
                       neurons: dict[str, dict] | None = None) -> dict:
    """Sparse probing, absorption and MCC of one dictionary on labelled rows (the benchmark's per-SAE numbers;
    `probes` and `neurons`, the parts that depend on the rows only, when the caller has them)."""
    probes = probes if probes is not None else train_probes(raw[~test], labels[~test])
    acts = _csr(acts)
    sp = sparse_probing(acts, raw, labels, concepts, test, neurons=neurons)
    ab = absorption(acts, raw, labels, concepts, decoder, b_dec, test, probes)
    m = mcc(decoder, probes.directions, concepts)
    return {"absorption": ab["absorption"], "absorption_saebench": ab["absorption_saebench"],
            "full_absorption": ab["full_absorption"], "main_missing": ab["main_missing"],
            "mean_split_features": ab["mean_split_features"],
            "sparse_probing_top1": sp["sparse_probing_top1"], "sparse_probing_top5": sp["sparse_probing_top5"],
            "sparse_probing_neurons_top1": sp["sparse_probing_neurons_top1"],
            "sparse_probing_neurons_top5": sp["sparse_probing_neurons_top5"],
            "mcc": m["mcc"], "mean_max_cosine": m["mean_max_cosine"],
            "per_concept": {c: {"absorption": ab["concepts"][c].get("absorption"),
                                "absorption_saebench": ab["concepts"][c].get("absorption_saebench"),
                                "full_absorption": ab["concepts"][c].get("full_absorption"),
                                "main_features": ab["concepts"][c].get("main_features"),
                                "sparse_probing_top1": sp["concepts"][c].get("top1"),
                                "sparse_probing_top5": sp["concepts"][c].get("top5"),
                                "mcc_feature": m["matched"].get(c, {}).get("feature"),
                                "mcc_cosine": m["matched"].get(c, {}).get("cosine")} for c in concepts}}
