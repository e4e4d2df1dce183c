"""Plotly figures of the app (built from plain arrays and dicts, so they are tested without Streamlit).
The training curves, the density histogram and the recovery bars are the SAE stage's own figures
(saes.figures), the ones `interp train`, `interp eval` and `interp recovery` write as HTML and PNG."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from saes import figures
from saes.figures import density_histogram  # noqa: F401  (the pages draw it from here)


def recovery_bars(concepts: list[dict]) -> go.Figure:
    """F1 of the best SAE feature per concept against the best raw neuron, at the page's width."""
    return figures.recovery_bars(concepts).update_layout(width=None, title=None)


def training_curves(metrics: pd.DataFrame, dead_window: int | None = None) -> go.Figure:
    """Loss, FVU, L0 and dead fraction (training's: silent for the last `dead_window` steps) per step."""
    fig = figures.training_curves(metrics.to_dict("records"), dead_window)
    fig.update_layout(width=None)  # the page's width
    return fig


def density_from_eval(histogram: dict) -> go.Figure:
    """The density histogram eval.json stores (log10 edges and counts), when features.h5 is absent."""
    edges, counts = np.asarray(histogram.get("log10_density_edges", [])), np.asarray(histogram.get("counts", []))
    fig = go.Figure(go.Bar(x=(edges[:-1] + edges[1:]) / 2, y=counts, marker_color="#4c78a8"))
    fig.update_layout(title="Feature density (eval.json)", xaxis_title="log10 firing rate", yaxis_title="features",
                      height=300, margin=dict(t=40, b=40, l=40, r=20))
    return fig


def score_histogram(values: np.ndarray, name: str = "balanced accuracy") -> go.Figure:
    fig = go.Figure(go.Histogram(x=values, xbins=dict(start=0, end=1.0001, size=0.05), marker_color="#f58518"))
    fig.update_layout(title=f"Explanation scores ({len(values)} features, mean {np.mean(values):.3f})",
                      xaxis_title=name, yaxis_title="features", height=300, margin=dict(t=40, b=40, l=40, r=20))
    return fig


def activation_histogram(edges: np.ndarray, counts: np.ndarray) -> go.Figure:
    """The feature's histogram of active values (log-spaced bins; the open end bins are dropped)."""
    edges, counts = np.asarray(edges, np.float64), np.asarray(counts)
    inner = np.isfinite(edges[1:]) & (edges[:-1] > 0)
    lo, hi, c = edges[:-1][inner], edges[1:][inner], counts[inner]
    nz = np.flatnonzero(c)
    if len(nz):
        lo, hi, c = lo[nz[0]: nz[-1] + 1], hi[nz[0]: nz[-1] + 1], c[nz[0]: nz[-1] + 1]
    fig = go.Figure(go.Bar(x=np.sqrt(lo * hi), y=c, width=hi - lo, marker_color="#54a24b"))
    fig.update_layout(xaxis=dict(type="log", title="activation"), yaxis_title="tokens", height=260,
                      margin=dict(t=20, b=40, l=40, r=20), bargap=0)
    return fig


def token_effect_bars(promoted: list, suppressed: list) -> go.Figure:
    """Horizontal bars of the most promoted and suppressed tokens (TokenEffect lists), every bar labelled
    with its token: the bars sit at integer positions with one tick each (plotly's automatic ticks
    thinned the labels to every other token), and the height leaves each label its own line."""
    items = sorted(promoted + suppressed, key=lambda e: e.logit)
    labels = [token_label(e.token) for e in items]
    fig = go.Figure(go.Bar(x=[e.logit for e in items], y=list(range(len(items))), orientation="h",
                           marker_color=["#e45756" if e.logit < 0 else "#4c78a8" for e in items],
                           hovertext=labels, hoverinfo="x+text"))
    fig.update_layout(height=max(240, 24 * len(items) + 70), xaxis_title="logit change per unit of the direction",
                      yaxis=dict(tickmode="array", tickvals=list(range(len(items))), ticktext=labels,
                                 automargin=True, tickfont=dict(size=12, family="monospace")),
                      margin=dict(t=10, b=40, l=10, r=10))
    return fig


def token_label(token: str, width: int = 16) -> str:
    """A token as a readable tick label: quoted (spaces show), control characters escaped, long ones cut."""
    text = repr(str(token))
    return text if len(text) <= width else text[: width - 2] + "…" + text[-1]
