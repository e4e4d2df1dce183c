"""Plotly figures of the app (built from plain arrays and dicts, so they are tested without Streamlit)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

CURVES = (("loss", "loss"), ("fvu", "FVU"), ("l0", "L0"), ("dead_frac", "dead fraction"))


def training_curves(metrics: pd.DataFrame) -> go.Figure:
    """Loss, FVU, L0 and dead fraction against the training step (those metrics.jsonl has)."""
    curves = [(c, t) for c, t in CURVES if c in metrics]
    x = metrics["step"] if "step" in metrics else metrics.index
    fig = make_subplots(rows=1, cols=max(1, len(curves)), subplot_titles=[t for _, t in curves])
    for i, (col, _) in enumerate(curves, start=1):
        fig.add_trace(go.Scatter(x=x, y=metrics[col], mode="lines", name=col, showlegend=False), row=1, col=i)
        fig.update_xaxes(title_text="step", row=1, col=i)
        if col == "loss":
            fig.update_yaxes(type="log", row=1, col=i)
        else:
            fig.update_yaxes(rangemode="tozero", row=1, col=i)
    fig.update_layout(height=300, margin=dict(t=40, b=40, l=40, r=20))
    return fig


def density_histogram(density: np.ndarray) -> go.Figure:
    """Histogram of log10 firing rates of the live features, with the dead count in the title."""
    density = np.asarray(density, np.float64)
    live = density[density > 0]
    fig = go.Figure(go.Histogram(x=np.log10(live), nbinsx=40, marker_color="#4c78a8"))
    dead = int((density == 0).sum())
    fig.update_layout(title=f"Feature density: {len(live)} live, {dead} dead ({dead / max(len(density), 1):.1%})",
                      xaxis_title="log10 firing rate", yaxis_title="features", height=300,
                      margin=dict(t=40, b=40, l=40, r=20))
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


def recovery_bars(concepts: list[dict]) -> go.Figure:
    """F1 of the best SAE feature per concept against the best raw neuron."""
    names = [c["concept"] for c in concepts]
    fig = go.Figure([
        go.Bar(name="best SAE feature", x=names, y=[c.get("f1") for c in concepts], marker_color="#4c78a8",
               text=[f"#{c.get('feature')}" for c in concepts], textposition="outside"),
        go.Bar(name="best raw neuron", x=names, y=[c.get("neuron_f1") for c in concepts], marker_color="#bab0ac"),
    ])
    fig.update_layout(barmode="group", yaxis=dict(title="F1", range=[0, 1.1]), height=320,
                      margin=dict(t=30, b=40, l=40, r=20), legend=dict(orientation="h", y=1.12))
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
    """Horizontal bars of the most promoted and suppressed tokens (TokenEffect lists)."""
    items = sorted(promoted + suppressed, key=lambda e: e.logit)
    fig = go.Figure(go.Bar(x=[e.logit for e in items], y=[repr(e.token) for e in items], orientation="h",
                           marker_color=["#e45756" if e.logit < 0 else "#4c78a8" for e in items]))
    fig.update_layout(height=max(240, 18 * len(items)), xaxis_title="logit change per unit of the direction",
                      margin=dict(t=10, b=40, l=10, r=10))
    return fig
