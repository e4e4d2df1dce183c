"""Figures a person opens: a plotly HTML page that works offline, with a PNG beside it.

    from interp.infra.plots import write_figure
    write_figure(fig, out / "density.html")        # density.html (plotly.js inside) + density.png

The HTML embeds plotly.js (about 4.7 MB a file), so it renders without a network. The PNG is drawn
by matplotlib from the figure's own data and layout, not by kaleido: kaleido 1.x needs a Chrome or
Chromium on the machine (Debian's needs root to install), starts a browser for each figure (3.5 to
4.7 s each here), and its page loads MathJax from a CDN unless told not to. matplotlib is a wheel
from the package index, draws offline in a fraction of a second and is deterministic. The price: the
PNG covers the trace types the project draws (scatter, bar, histogram, heatmap) in subplot grids,
with titles, legends, axis titles, ranges, log axes and paper annotations; any other trace type is
refused with a message naming it, so a new figure cannot silently lose its PNG.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

import numpy as np

from interp.infra.durable import write_bytes

PX = 1 / 100  # matplotlib inches per pixel at the DPI below
DPI = 100
DEFAULT_SIZE = (900, 500)  # pixels, when neither the call nor the layout gives one
COLORWAY = ("#636efa", "#EF553B", "#00cc96", "#ab63fa", "#FFA15A", "#19d3f3", "#FF6692", "#B6E880", "#FF97FF",
            "#FECB52")  # plotly's default, used when the template has none
SYMBOLS = {"circle": "o", "square": "s", "diamond": "D", "cross": "P", "x": "X", "triangle-up": "^",
           "triangle-down": "v", "triangle-left": "<", "triangle-right": ">", "pentagon": "p", "hexagon": "h",
           "star": "*", "hexagram": "*", "line-ns": "|", "line-ew": "_"}
DASHES = {"solid": "-", "dot": ":", "dash": "--", "longdash": "--", "dashdot": "-.", "longdashdot": "-."}
COLORSCALES = {"viridis": "viridis", "plasma": "plasma", "inferno": "inferno", "magma": "magma", "cividis": "cividis",
               "blues": "Blues", "reds": "Reds", "greens": "Greens", "greys": "Greys", "rdbu": "RdBu",
               "rdylbu": "RdYlBu", "ylorrd": "YlOrRd", "hot": "hot", "jet": "jet", "picnic": "seismic"}
SUPPORTED = ("scatter", "scattergl", "bar", "histogram", "heatmap")


def write_figure(fig, path: str | Path, *, width: int | None = None, height: int | None = None,
                 png: bool = True) -> tuple[Path, Path | None]:
    """Write `path` as HTML with plotly.js embedded and (with `png`) the same name .png beside it,
    `width` x `height` pixels (default: the layout's size, else 900 x 500). Each file is written
    to a temporary name, fsynced and renamed, so a reader sees the old file or the new one.
    Returns (html path, png path or None)."""
    path = Path(path)
    html = path if path.suffix == ".html" else path.with_name(path.name + ".html")
    html.parent.mkdir(parents=True, exist_ok=True)
    page = fig.to_html(include_plotlyjs=True, full_html=True, config={"displaylogo": False})
    write_bytes(html, page.encode())
    if not png:
        return html, None
    image = html.with_suffix(".png")
    write_bytes(image, render_png(fig, width, height))
    return html, image


def render_png(fig, width: int | None = None, height: int | None = None) -> bytes:
    """The figure as PNG bytes, drawn by matplotlib (Agg, no global pyplot state: thread-safe)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    d = fig.to_dict()
    layout, traces = d.get("layout", {}), d.get("data", [])
    for t in traces:
        if t.get("type", "scatter") not in SUPPORTED:
            raise ValueError(f"cannot draw a {t.get('type')!r} trace as PNG (interp.infra.plots draws "
                             f"{', '.join(SUPPORTED)}): add it to render_png or pass png=False")
    tpl = (layout.get("template") or {}).get("layout", {})
    w = int(width or layout.get("width") or DEFAULT_SIZE[0])
    h = int(height or layout.get("height") or DEFAULT_SIZE[1])
    colorway = layout.get("colorway") or tpl.get("colorway") or COLORWAY
    font = _color((tpl.get("font") or {}).get("color")) or "#2a3f5f"
    legend_names = _legend_entries(traces, layout)
    margin = {"l": 80, "r": 80, "t": 100, "b": 80, **(layout.get("margin") or {})}
    if legend_names:  # plotly widens the right margin for its legend; do the same
        margin["r"] = max(margin["r"], 60 + 7 * max(len(n) for n in legend_names))
    left, right = margin["l"] / w, 1 - margin["r"] / w
    bottom, top = margin["b"] / h, 1 - margin["t"] / h

    mfig = Figure(figsize=(w * PX, h * PX), dpi=DPI, facecolor=_color(layout.get("paper_bgcolor")) or "white")
    FigureCanvasAgg(mfig)
    axes = _axes(mfig, layout, traces, (left, right, bottom, top), tpl)
    handles: dict[str, object] = {}
    bar_traces = [t for t in traces if t.get("type") == "bar"]
    for i, t in enumerate(traces):
        ax = axes[(t.get("xaxis") or "x", t.get("yaxis") or "y")]
        color = _trace_color(t, colorway[i % len(colorway)])
        kind = t.get("type", "scatter")
        if kind in ("scatter", "scattergl"):
            artist = _scatter(ax, t, color)
        elif kind == "bar":
            artist = _bar(ax, t, color, bar_traces, layout.get("barmode") or "group")
        elif kind == "histogram":
            artist = _histogram(ax, t, color)
        else:
            artist = _heatmap(mfig, ax, t)
        name = t.get("name")
        if artist is not None and name is not None and _shows_in_legend(t, traces) and name not in handles:
            handles[name] = artist
    for (xa, ya), ax in axes.items():
        _style_axis(ax, layout.get(_layout_key(xa)) or {}, "x", font)
        _style_axis(ax, layout.get(_layout_key(ya)) or {}, "y", font)
    if handles and layout.get("showlegend", True) is not False:
        mfig.legend(list(handles.values()), list(handles), loc="upper left", bbox_to_anchor=(right + 0.01, top),
                    frameon=False, fontsize=9, labelcolor=font)
    title = _text(layout.get("title"))
    if title:
        mfig.text(left, 1 - 0.5 * margin["t"] / h, title, fontsize=14, color=font, va="center", ha="left")
    for a in layout.get("annotations") or []:
        _annotation(mfig, axes, a, (left, right, bottom, top), font)
    import io

    buf = io.BytesIO()
    mfig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


# ---------------------------------------------------------------- pieces


def _arr(v) -> np.ndarray | None:
    """A trace's data column as an array: plotly's to_dict gives lists or base64 typed arrays."""
    if v is None:
        return None
    if isinstance(v, dict) and "bdata" in v:
        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
        return a.reshape([int(s) for s in str(v["shape"]).split(",")]) if v.get("shape") else a
    a = np.asarray(v, dtype=object)
    try:
        return a.astype(float)
    except (TypeError, ValueError):
        return a  # categories


def _color(c):
    """A plotly colour as matplotlib takes it: '#hex' and names pass, 'rgb(r, g, b)'/'rgba(...)' become tuples."""
    if not isinstance(c, str):
        return None
    m = re.fullmatch(r"\s*rgba?\(([^)]*)\)\s*", c)
    if m:
        v = [float(p) for p in m.group(1).split(",")]
        return tuple([x / 255 for x in v[:3]] + v[3:4])
    return c


def _colormap(scale, reverse: bool):
    """A matplotlib colormap from a plotly colorscale: a name, or [[position, colour], ...] as to_dict gives."""
    from matplotlib.colors import LinearSegmentedColormap

    if isinstance(scale, str):
        name = COLORSCALES.get(scale.lower(), "plasma")
        return name + "_r" if reverse else name
    if isinstance(scale, (list, tuple)) and scale:
        stops = [(float(p), _color(c)) for p, c in scale]
        if reverse:
            stops = [(1 - p, c) for p, c in reversed(stops)]
        return LinearSegmentedColormap.from_list("plotly", stops)
    return "plasma_r" if reverse else "plasma"


def _text(title) -> str:
    raw = title.get("text") if isinstance(title, dict) else title
    if not raw:
        return ""
    raw = re.sub(r"<br\s*/?>", "\n", str(raw), flags=re.I)
    return re.sub(r"<[^>]+>", "", raw)  # plotly's inline HTML tags (<b>, <i>, <sup>) have no PNG meaning


def _layout_key(ref: str) -> str:
    """'x2' -> 'xaxis2', 'y' -> 'yaxis'."""
    return f"{ref[0]}axis{ref[1:]}"


def _trace_color(t: dict, default: str):
    for part in ("line", "marker"):
        c = _color((t.get(part) or {}).get("color"))
        if c is not None:
            return c
    return default


def _legend_entries(traces: list[dict], layout: dict) -> list[str]:
    if layout.get("showlegend") is False:
        return []
    names = [str(t["name"]) for t in traces if t.get("name") is not None and _shows_in_legend(t, traces)]
    return list(dict.fromkeys(names))


def _shows_in_legend(t: dict, traces: list[dict]) -> bool:
    if t.get("showlegend") is not None:
        return bool(t["showlegend"])
    # plotly shows a lone trace's legend only when asked; several traces get one each
    return t.get("type") != "heatmap" and len(traces) > 1


def _axes(mfig, layout: dict, traces: list[dict], area: tuple, tpl: dict) -> dict:
    """One matplotlib Axes per (xaxis, yaxis) pair the traces use, placed at the plotly domains."""
    left, right, bottom, top = area
    pairs = list(dict.fromkeys((t.get("xaxis") or "x", t.get("yaxis") or "y") for t in traces)) or [("x", "y")]
    bg = _color(layout.get("plot_bgcolor")) or _color(tpl.get("plot_bgcolor")) or "white"
    out = {}
    for xa, ya in pairs:
        xd = (layout.get(_layout_key(xa)) or {}).get("domain") or [0, 1]
        yd = (layout.get(_layout_key(ya)) or {}).get("domain") or [0, 1]
        rect = [left + xd[0] * (right - left), bottom + yd[0] * (top - bottom),
                (xd[1] - xd[0]) * (right - left), (yd[1] - yd[0]) * (top - bottom)]
        ax = mfig.add_axes(rect, facecolor=bg)
        ax.grid(True, color=_color(((tpl.get("xaxis") or {}).get("gridcolor"))) or "#EBF0F8", linewidth=1)
        ax.set_axisbelow(True)
        for spine in ax.spines.values():
            spine.set_visible(False)
        ax.tick_params(length=0, labelsize=9)
        out[(xa, ya)] = ax
    return out


def _style_axis(ax, spec: dict, which: str, font: str) -> None:
    set_label, set_scale, set_lim = ((ax.set_xlabel, ax.set_xscale, ax.set_xlim) if which == "x"
                                     else (ax.set_ylabel, ax.set_yscale, ax.set_ylim))
    axis = ax.xaxis if which == "x" else ax.yaxis
    log = spec.get("type") == "log"
    if log:
        set_scale("log")
    label = _text(spec.get("title"))
    if label:
        set_label(label, color=font, fontsize=10)
    rng = spec.get("range")
    if rng and None not in rng[:2]:
        set_lim(*[10 ** r for r in rng[:2]] if log else rng[:2])
    if spec.get("autorange") == "reversed":
        (ax.invert_xaxis if which == "x" else ax.invert_yaxis)()
    if spec.get("showticklabels") is False:
        ax.tick_params(axis=which, **{"labelbottom" if which == "x" else "labelleft": False})
    if spec.get("tickangle") is not None:
        axis.set_tick_params(labelrotation=-float(spec["tickangle"]))
    axis.label.set_color(font)
    for label in axis.get_ticklabels():
        label.set_color(font)


def _scatter(ax, t: dict, color: str):
    y = _arr(t.get("y"))
    x = _arr(t.get("x"))
    if y is None:
        return None
    if x is None:
        x = np.arange(len(y))
    y = np.array([np.nan if v is None else v for v in y], dtype=float) if y.dtype == object else y
    mode = t.get("mode") or ("lines+markers" if len(y) < 20 else "lines")
    line, marker = t.get("line") or {}, t.get("marker") or {}
    size = marker.get("size")
    kw = {"color": color, "linestyle": DASHES.get(line.get("dash") or "solid", "-") if "lines" in mode else "none",
          "linewidth": float(line.get("width") or 2) * 0.72, "marker": SYMBOLS.get(
              str(marker.get("symbol") or "circle").replace("-open", ""), "o") if "markers" in mode else "none",
          "markersize": (float(size) if isinstance(size, (int, float)) else 6) * 0.72}
    (artist,) = ax.plot(x, y, **kw)
    if t.get("fill") in ("tozeroy", "tonexty"):
        ax.fill_between(x, y, 0, color=color, alpha=0.3, linewidth=0)
    return artist


def _categories(traces: list[dict], key: str) -> list:
    seen: dict = {}
    for t in traces:
        v = _arr(t.get(key))
        if v is not None and v.dtype == object:
            seen.update(dict.fromkeys(v.tolist()))
    return list(seen)


def _bar(ax, t: dict, color: str, bars: list[dict], mode: str):
    horizontal = t.get("orientation") == "h"
    cat_key, val_key = ("y", "x") if horizontal else ("x", "y")
    vals, cats = _arr(t.get(val_key)), _arr(t.get(cat_key))
    if vals is None:
        return None
    cats = np.arange(len(vals)) if cats is None else cats
    same_axes = [b for b in bars if (b.get("xaxis"), b.get("yaxis")) == (t.get("xaxis"), t.get("yaxis"))]
    if cats.dtype == object:
        order = _categories(same_axes, cat_key)
        pos = np.array([order.index(c) for c in cats.tolist()], dtype=float)
        (ax.set_yticks if horizontal else ax.set_xticks)(range(len(order)), [str(c) for c in order])
    else:
        pos = cats.astype(float)
    width, offset, base = 0.8, 0.0, None
    if mode == "group" and len(same_axes) > 1:
        width = 0.8 / len(same_axes)
        offset = (same_axes.index(t) - (len(same_axes) - 1) / 2) * width
    elif mode in ("stack", "relative"):
        below = same_axes[:same_axes.index(t)]
        base = np.zeros(len(vals))
        for b in below:
            bv = _arr(b.get(val_key))
            if bv is not None and len(bv) == len(vals):
                base = base + bv
    fn = ax.barh if horizontal else ax.bar
    kw = {"left" if horizontal else "bottom": base} if base is not None else {}
    alpha = 0.6 if mode == "overlay" else 1.0
    return fn(pos + offset, vals, width, color=color, alpha=alpha, **kw)


def _histogram(ax, t: dict, color: str):
    x = _arr(t.get("x"))
    if x is None or x.dtype == object:
        raise ValueError("render_png draws histograms of numbers along x only")
    x = x[np.isfinite(x)]
    bins = int(t.get("nbinsx") or 0) or "auto"
    density = t.get("histnorm") in ("probability density",)
    weights = np.full(len(x), 1 / max(1, len(x))) if t.get("histnorm") == "probability" else None
    _, _, patches = ax.hist(x, bins=bins, color=color, density=density, weights=weights, edgecolor="white",
                            linewidth=0.5)
    return patches[0] if len(patches) else None


def _heatmap(mfig, ax, t: dict):
    z = _arr(t.get("z"))
    if z is None:
        return None
    z = np.array(z.tolist() if z.dtype == object else z, dtype=float)
    cmap = _colormap(t.get("colorscale"), bool(t.get("reversescale")))
    vmin, vmax = t.get("zmin"), t.get("zmax")
    if t.get("zmid") is not None and vmin is None and vmax is None:
        r = np.nanmax(np.abs(z - t["zmid"]))
        vmin, vmax = t["zmid"] - r, t["zmid"] + r
    mesh = ax.imshow(z, aspect="auto", origin="lower", cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    for key, setter in (("x", ax.set_xticks), ("y", ax.set_yticks)):
        labels = _arr(t.get(key))
        if labels is not None and len(labels) <= 40:
            setter(range(len(labels)), [str(v) for v in labels.tolist()])
    ax.grid(False)
    if t.get("showscale", True) is not False:
        mfig.colorbar(mesh, ax=ax, fraction=0.05, pad=0.02)
    return None


def _annotation(mfig, axes: dict, a: dict, area: tuple, font: str) -> None:
    text = _text(a.get("text"))
    if not text:
        return
    left, right, bottom, top = area
    ha = {"left": "left", "right": "right"}.get(a.get("xanchor"), "center")
    va = {"top": "top", "bottom": "bottom"}.get(a.get("yanchor"), "center")
    size = float((a.get("font") or {}).get("size") or 12) * 0.72
    xref, yref = a.get("xref") or "x", a.get("yref") or "y"
    if xref.startswith("paper") and yref.startswith("paper"):
        mfig.text(left + float(a.get("x", 0.5)) * (right - left), bottom + float(a.get("y", 0.5)) * (top - bottom),
                  text, ha=ha, va=va, fontsize=size, color=font)
        return
    ax = axes.get((xref.split(" ")[0], yref.split(" ")[0]))
    if ax is not None:
        ax.annotate(text, (a.get("x"), a.get("y")), ha=ha, va=va, fontsize=size, color=font)
