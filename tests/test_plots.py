"""interp.infra.plots: HTML that renders offline (plotly.js inside) and a PNG drawn from the same figure."""

import io
import re
from pathlib import Path

import numpy as np
import plotly
import plotly.graph_objects as go
import pytest
from PIL import Image
from plotly.subplots import make_subplots

from interp.infra.plots import render_png, write_figure


def sweep_like() -> go.Figure:
    """The steering sweep's shape: stacked subplots sharing x, lines with star markers, a legend."""
    fig = make_subplots(rows=3, cols=1, shared_xaxes=True, subplot_titles=["target rate", "KL", "changed"])
    for j, color in enumerate(["#ff0000", "#0000ff"]):
        for i in range(3):
            fig.add_trace(go.Scatter(x=[0, 1, 2, 4], y=np.linspace(0, 1, 4) ** (j + 1), mode="lines+markers",
                                     name=f"feature {j}", legendgroup=str(j), showlegend=i == 0,
                                     line=dict(color=color, width=6)), row=i + 1, col=1)
            fig.add_trace(go.Scatter(x=[2], y=[0.5], mode="markers", showlegend=False,
                                     marker=dict(symbol="star", size=13, color=color)), row=i + 1, col=1)
    fig.update_xaxes(title_text="strength (★ = chosen)", row=3, col=1)
    fig.update_layout(height=700, template="plotly_white", title="Steering sweep")
    return fig


def pixels(png: bytes) -> np.ndarray:
    im = Image.open(io.BytesIO(png))
    im.verify()  # a complete, valid PNG
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def count(rgb: np.ndarray, color: tuple, tol: int = 30) -> int:
    return int((np.abs(rgb - np.array(color)).max(-1) <= tol).sum())


def test_html_embeds_plotlyjs_and_fetches_nothing(tmp_path):
    html, png = write_figure(sweep_like(), tmp_path / "sweep.html")
    page = html.read_text()
    bundled = (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_text()
    assert bundled[-2000:] in page and len(page) > len(bundled)  # the whole library, inline
    assert not re.search(r"<script[^>]*\bsrc\s*=\s*[\"']?(https?:)?//", page, re.I)
    assert not re.search(r"<link[^>]*\bhref\s*=\s*[\"']?(https?:)?//", page, re.I)
    assert "feature 0" in page  # the figure itself
    assert png == tmp_path / "sweep.png" and png.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.html", "sweep.png"]  # no temporary left
    assert html.stat().st_mode & 0o777 == 0o644


def test_png_is_a_valid_image_of_the_expected_size_with_the_data_drawn(tmp_path):
    _, png = write_figure(sweep_like(), tmp_path / "sweep")  # suffix added
    rgb = pixels(png.read_bytes())
    assert rgb.shape == (700, 900, 3)  # the layout's height, the default width
    assert count(rgb, (255, 0, 0)) > 2000 and count(rgb, (0, 0, 255)) > 2000  # both features' lines
    assert pixels(render_png(sweep_like(), width=640, height=480)).shape == (480, 640, 3)
    small = go.Figure(go.Scatter(x=[1, 2], y=[1, 2]), layout=dict(width=300, height=200))
    assert pixels(render_png(small)).shape == (200, 300, 3)
    # the same figure twice: the same bytes (no timestamps in the PNG)
    assert render_png(small) == render_png(small)


@pytest.mark.parametrize("name, fig, color", [
    ("histogram", go.Figure(go.Histogram(x=np.random.default_rng(0).normal(size=500), nbinsx=30,
                                         marker=dict(color="rgb(0, 200, 0)"))), (0, 200, 0)),
    ("grouped bars", go.Figure([go.Bar(name=a, x=["red", "blue", "cross"], y=[0.9, 0.5, 0.2],
                                       marker=dict(color=c)) for a, c in (("topk", "#ff0000"), ("relu", "#0000ff"))],
                               layout=dict(barmode="group", yaxis_range=[0, 1.02])), (255, 0, 0)),
    ("stacked horizontal bars", go.Figure([go.Bar(x=[1, 2], y=["a", "b"], orientation="h", marker=dict(color=c))
                                           for c in ("#ff0000", "#0000ff")], layout=dict(barmode="stack")),
     (0, 0, 255)),
    ("heatmap", go.Figure(go.Heatmap(z=np.arange(12).reshape(3, 4), x=list("abcd"), colorscale="Viridis")),
     (253, 231, 37)),  # viridis' top colour: the colorscale came through
    ("log axis", go.Figure(go.Scatter(x=[1, 10, 100], y=[1, 100, 10000], line=dict(color="#ff0000", width=5)),
                           layout=dict(xaxis_type="log", yaxis_type="log", yaxis_range=[0, 4])), (255, 0, 0)),
])
def test_every_supported_trace_type_draws(name, fig, color):
    rgb = pixels(render_png(fig, width=500, height=400))
    assert rgb.shape == (400, 500, 3)
    assert count(rgb, color) > 300, name


def test_the_stages_write_their_figures_offline_with_a_png(shapes_run):
    """interp train, eval and recovery (the shared run was made by them) each leave an offline page and a PNG."""
    from interp.infra.layout import RunLayout

    run = RunLayout(shapes_run)
    for html in (run.training_figure("html"), run.density_figure("html"), run.recovery_figure("html")):
        page = html.read_text()
        assert "src=\"https://cdn.plot.ly" not in page and len(page) > 3_000_000, html  # plotly.js is inside
        rgb = pixels(html.with_suffix(".png").read_bytes())
        assert rgb.shape[0] >= 300 and count(rgb, (76, 120, 168)) > 200, html  # the data, in the figures' blue
    assert "dead (silent for the last 1,000 steps)" in run.training_figure("html").read_text()
    assert "never fire on 7,680 rows" in run.density_figure("html").read_text()  # 120 samples x 64 image patches


def test_an_unsupported_trace_type_is_refused_by_name_and_the_html_stays(tmp_path):
    with pytest.raises(ValueError, match="cannot draw a 'pie' trace as PNG.*png=False"):
        write_figure(go.Figure(go.Pie(values=[1, 2])), tmp_path / "pie.html")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pie.html"]
    html, png = write_figure(go.Figure(go.Pie(values=[1, 2])), tmp_path / "pie.html", png=False)
    assert png is None and html.exists()
