"""The SAE stage's figures, built from plain records and arrays: training curves (RUN/train/metrics.jsonl),
feature density (eval) and ground-truth recovery (RUN/recovery.json). The stages write them with
interp.infra.plots.write_figure (HTML with plotly.js inside, and a PNG); the app draws the same figures.

Two "dead" fractions exist and they measure different things, so each figure says which it shows:
training's (metrics.jsonl `dead_frac`) is the share of features that did not fire in the last
`dead_window` training steps (the window AuxK acts on); evaluation's (eval.json `dead_fraction`, and the
feature list's "dead") is the share that never fire on any row of the evaluation cache.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

CURVES = (("loss", "loss"), ("fvu", "FVU"), ("l0", "L0"), ("dead_frac", "dead fraction"))
BLUE, GREY = "#4c78a8", "#bab0ac"


def training_dead_label(dead_window: int | None = None) -> str:
    """What training's dead fraction counts."""
    window = f"the last {dead_window:,} steps" if dead_window else "the dead window"
    return f"dead (silent for {window})"


def eval_dead_label(rows: int | None = None) -> str:
    """What evaluation's dead fraction counts."""
    where = f"{rows:,} evaluation rows" if rows else "the evaluation rows"
    return f"dead in evaluation (never fires on {where})"


def training_curves(records: Iterable[Mapping], dead_window: int | None = None):
    """Loss (log), FVU, L0 and dead fraction against the training step, for the metrics records have."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    records = list(records)
    names = {k for r in records for k in r}
    curves = [(c, training_dead_label(dead_window) if c == "dead_frac" else t) for c, t in CURVES if c in names]
    x = [r.get("step", i) for i, r in enumerate(records)]
    fig = make_subplots(rows=1, cols=max(1, len(curves)), subplot_titles=[t for _, t in curves],
                        horizontal_spacing=0.07)
    for i, (col, _) in enumerate(curves, start=1):
        y = [r.get(col) for r in records]
        fig.add_trace(go.Scatter(x=x, y=y, mode="lines", name=col, showlegend=False, line=dict(color=BLUE)),
                      row=1, col=i)
        fig.update_xaxes(title_text="step", row=1, col=i)
        if col == "loss":
            fig.update_yaxes(type="log", row=1, col=i)
        else:
            fig.update_yaxes(rangemode="tozero", row=1, col=i)
    fig.update_layout(height=300, width=max(600, 320 * len(curves)), margin=dict(t=40, b=40, l=90, r=40),
                      template="plotly_white")
    fig.update_annotations(font_size=11)  # the subplot titles
    return fig


def density_histogram(density: Sequence[float] | np.ndarray, rows: int | None = None):
    """Histogram of log10 firing rates of the live features; the title gives the dead share and says what
    dead means here (never fires on the rows the density was measured on)."""
    import plotly.graph_objects as go

    density = np.asarray(density, np.float64)
    live = density[density > 0]
    dead = int((density == 0).sum())
    fig = go.Figure(go.Histogram(x=np.log10(live), nbinsx=40, marker_color=BLUE))
    where = f" on {rows:,} rows" if rows else ""
    fig.update_layout(title=f"Feature density: {len(live)} live, {dead} never fire{where} "
                            f"({dead / max(len(density), 1):.1%})",
                      xaxis_title="log10 firing rate", yaxis_title="features", height=300,
                      margin=dict(t=40, b=40, l=50, r=20), template="plotly_white")
    return fig


def recovery_bars(concepts: Sequence[Mapping]):
    """F1 of the best SAE feature per concept against the best raw neuron and a held-out linear probe, the
    most one direction reaches (recovery.json's concepts; reports without probes show two bars)."""
    import plotly.graph_objects as go

    names = [c["concept"] for c in concepts]
    fig = go.Figure([
        go.Bar(name="best SAE feature", x=names, y=[c.get("f1") for c in concepts], marker_color=BLUE,
               text=[f"#{c.get('feature')}" for c in concepts], textposition="outside"),
        go.Bar(name="best raw neuron", x=names, y=[c.get("neuron_f1") for c in concepts], marker_color=GREY),
    ])
    if all(c.get("probe_f1") is not None and not math.isnan(c["probe_f1"]) for c in concepts):  # NaN: no probe
        fig.add_trace(go.Scatter(name="linear probe (held-out)", x=names, y=[c["probe_f1"] for c in concepts],
                                 mode="markers", marker=dict(symbol="line-ew-open", size=22, color="black",
                                                             line=dict(width=2))))
    fig.update_layout(barmode="group", yaxis=dict(title="F1", range=[0, 1.1]), xaxis=dict(tickangle=-45),
                      height=480, width=max(600, 70 * len(names) + 250), margin=dict(t=40, b=130, l=50, r=20),
                      legend=dict(orientation="h", y=1.12), template="plotly_white",
                      title="Ground-truth recovery: best feature per concept")
    return fig
