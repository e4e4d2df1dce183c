"""One feature's activations on a few rows without encoding every feature: what makes a feature page or an
explanation of a 131k-feature SAE take milliseconds instead of minutes.

Re-encoding one image's 2,880 LLaVA-NeXT rows through a 131,072 x 4,096 SAE is a 1.5-TMAC matmul
(about a minute on one CPU core); a feature page shows several images. But the activation of
feature f needs only its own pre-activation column, (x - b_dec) @ W_enc[:, f] + b_enc[f] (12 MMAC
for those rows), plus, for a TopK SAE, whether f made the row's top k. The features pass already
sees every row's active entries, so it records two numbers per row (`RowStats`): how many
features are active there and the smallest active value. Then, per architecture:

- topk: active iff pre_f > 0 and (the row has fewer than k positive pre-activations, so every
  positive one is active, or pre_f >= the row's smallest active value);
- jumprelu, and batchtopk's and matryoshka's inference form: pre_f * (pre_f > threshold_f) (elementwise);
- relu: relu(pre_f).

Exactness: the column is a matrix-vector product, so its values can differ from the batched
encode in the last bits; for TopK, a feature whose pre-activation is within that rounding bound
(`pre_activation_column`'s slack) of the row's k-th value is counted active, so only a feature
tied with the row's k-th value to within rounding can differ from a full re-encode.
`check_column` measures the agreement on real rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

@dataclass
class RowStats:
    """Per cache row: active features and the smallest active value (0 where none is active)."""

    n_active: np.ndarray  # [rows] int32
    min_active: np.ndarray  # [rows] float32


class RowStatsRecorder:
    """Collects RowStats from the features pass's active entries, chunk by chunk (8 bytes a row)."""

    def __init__(self, n_rows: int):
        self.n_active = np.zeros(n_rows, np.int32)
        self.min_active = np.zeros(n_rows, np.float32)

    def add(self, start: int, n: int, rows: torch.Tensor, vals: torch.Tensor) -> None:
        """rows [nnz] chunk-local row of each active entry, vals [nnz] its value (> 0)."""
        count = torch.bincount(rows, minlength=n)
        low = torch.full((n,), float("inf"), dtype=torch.float32, device=rows.device)
        low.scatter_reduce_(0, rows, vals.detach().float(), "amin")
        low = torch.where(count > 0, low, torch.zeros_like(low))
        self.n_active[start: start + n] = count.cpu().numpy()
        self.min_active[start: start + n] = low.cpu().numpy()

    def stats(self) -> RowStats:
        return RowStats(self.n_active, self.min_active)


def needs_row_stats(sae) -> bool:
    """Whether `feature_column` needs the rows' RowStats for this SAE (TopK: whether f made the row's top k)."""
    return sae.cfg.arch == "topk"


def supports(sae) -> bool:
    """Whether `feature_column` can compute this SAE's features from their columns."""
    return not sae.is_normalised() and sae.cfg.arch in _ACTIVATIONS


@torch.no_grad()
def pre_activation_column(sae, x: torch.Tensor, feature: int, with_slack: bool = False):
    """(x - b_dec) @ W_enc[:, f] + b_enc[f] for rows x; with `with_slack`, also a bound on how far the batched
    encoder's rounding can differ from it: 8 sigma of float rounding over d_in terms, sqrt(d_in) * eps *
    (sum |terms| + |b_enc[f]|), the sum bounded by |x - b_dec| |W_enc[:, f]| (Cauchy-Schwarz; about 1.6x
    the sum for spread-out vectors), since the terms can cancel (pre-activations near 0 from large ones)."""
    x = x.to(sae.dtype)
    sae_in = x - sae.b_dec if sae.cfg.apply_b_dec_to_input else x
    w, b = sae.W_enc[:, feature].contiguous(), sae.b_enc[feature]  # a saved SAE's column is strided by d_sae
    pre = sae_in @ w + b
    if not with_slack:
        return pre
    eps = torch.finfo(pre.dtype).eps
    terms = torch.linalg.vector_norm(sae_in, dim=1) * torch.linalg.vector_norm(w)
    return pre, (terms + b.abs()) * (8 * sae.cfg.d_in ** 0.5 * eps)


def _topk(sae, pre, slack, feature, stats):
    n_active = torch.as_tensor(stats.n_active).to(pre.device)
    low = torch.as_tensor(stats.min_active).to(device=pre.device, dtype=pre.dtype)
    made_it = (n_active < sae.cfg.k) | (pre >= low - slack)
    return torch.where((pre > 0) & made_it, pre, torch.zeros_like(pre))


def _threshold(sae, pre, slack, feature, stats):
    return pre.relu() * (pre > sae.threshold[feature]).to(pre.dtype)


def _relu(sae, pre, slack, feature, stats):
    return pre.relu()


# keyed by the registry's architecture names (saes.architectures); belongs there as a per-architecture method
_ACTIVATIONS = {"topk": _topk, "jumprelu": _threshold, "batchtopk": _threshold, "matryoshka": _threshold,
                "relu": _relu}


@torch.no_grad()
def feature_column(sae, x: torch.Tensor, feature: int, stats: RowStats | None) -> torch.Tensor | None:
    """Activations [rows] of `feature` on raw activations x [rows, d_in]; `stats` are the rows' RowStats
    (needed for TopK). None where this SAE or these inputs need a full encode instead."""
    if not supports(sae):
        return None
    if needs_row_stats(sae) and stats is None:
        return None
    pre, slack = pre_activation_column(sae, x, feature, with_slack=True)
    return _ACTIVATIONS[sae.cfg.arch](sae, pre, slack, feature, stats)


@torch.no_grad()
def check_column(sae, x: torch.Tensor, features, stats: RowStats) -> dict:
    """Agreement of feature_column with a full encode on rows x: rows whose activation set differs, and the
    largest value difference (for tests and the scale benchmark's report)."""
    full = sae.encode(x.to(sae.dtype)).float()
    worst, differ = 0.0, 0
    for f in features:
        col = feature_column(sae, x, int(f), stats).float()
        differ += int(((col > 0) != (full[:, f] > 0)).sum())
        both = (col > 0) & (full[:, f] > 0)
        if both.any():
            worst = max(worst, float((col[both] - full[both, f]).abs().max()))
    return {"rows": len(x), "features": len(features), "membership_differs": differ, "max_abs_diff": worst}
