"""Feature heatmaps over the original image, drawn from the token table's pixel boxes.

Every image-patch token knows the box it covers in the original image, so one renderer works
for every model's patch geometry (grids, tiles at several scales, overlapping or fractional
boxes): a pixel takes the max activation over the boxes that contain its centre. The colour
scale is shared across a feature's examples (`vmax`, by default the feature's max over the whole
cache) so that brighter means more active from one example to the next.

Views (PIL images, for the app and for explainer prompts): the original, the image with the outline
of where the feature fires (every pixel keeps its colour: the app's default, since a colour overlay
turns a red object orange and a blue one grey, in a world whose features are colours), the coloured
heatmap, the heatmap blended over the image, the image dimmed outside the active tokens (as the
explainer's marked views, interp.shapes.world.dim_outside_patches), and a crop around the active tokens.
Images smaller than `display_size` are upscaled with nearest-neighbour so patches stay crisp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from explain.feature_reader import FeatureSources

MODES = ("nearest", "bilinear")
VIEWS = ("original", "contour", "heatmap", "overlay", "masked", "crop")
CONTOUR_LEVELS = (0.2, 0.6)  # outlines at these fractions of vmax: where it fires, and where it fires strongly
# inferno, sampled at 0, 1/4, 1/2, 3/4, 1: dark for weak, bright for strong, readable in greyscale
_ANCHORS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], dtype=float)


@dataclass
class FeatureView:
    original: Image.Image
    contour: Image.Image  # the original, untouched inside, with white-on-black outlines at CONTOUR_LEVELS
    heatmap: Image.Image
    overlay: Image.Image
    masked: Image.Image
    crop: Image.Image
    crop_box: tuple[int, int, int, int] | None  # (x0, y0, x1, y1) in original pixels; None: nothing active
    vmax: float
    scale: float  # display pixels per original pixel


def token_boxes(tokens: np.ndarray) -> np.ndarray:
    """[n, 4] (x0, y0, x1, y1) pixel boxes of token table rows (rows without a box have x1 <= x0)."""
    return np.stack([tokens[c].astype(np.float64) for c in ("x0", "y0", "x1", "y1")], axis=1)


def raster_max(boxes: np.ndarray, values: np.ndarray, height: int, width: int) -> np.ndarray:
    """[height, width]: each pixel the max value of the boxes containing its centre, 0 where none does."""
    out = np.zeros((height, width), np.float32)
    edges = np.ceil(boxes - 0.5).astype(np.int64)  # pixel i is inside [a, b) iff ceil(a - .5) <= i < ceil(b - .5)
    edges[:, [0, 2]] = edges[:, [0, 2]].clip(0, width)
    edges[:, [1, 3]] = edges[:, [1, 3]].clip(0, height)
    for (x0, y0, x1, y1), v in zip(edges, values):
        np.maximum(out[y0:y1, x0:x1], v, out=out[y0:y1, x0:x1])
    return out


def activation_map(tokens: np.ndarray, acts: np.ndarray, size: tuple[int, int], out_size: tuple[int, int],
                   mode: str = "nearest") -> np.ndarray:
    """[H, W] activations over an image of `size` (w, h) drawn at `out_size` (W, H).

    nearest: each token's box filled with its value (max where boxes overlap). bilinear: the
    same at the typical token size, then interpolated between token centres, for any geometry.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    boxes, values = token_boxes(tokens), np.asarray(acts, np.float32)
    has_box = boxes[:, 2] > boxes[:, 0]
    boxes, values = boxes[has_box], values[has_box]
    (w, h), (out_w, out_h) = size, out_size
    if mode == "nearest" or not len(boxes):
        return raster_max(boxes * ([out_w / w, out_h / h] * 2), values, out_h, out_w)
    cols = max(1, round(w / np.median(boxes[:, 2] - boxes[:, 0])))
    rows = max(1, round(h / np.median(boxes[:, 3] - boxes[:, 1])))
    coarse = raster_max(boxes * ([cols / w, rows / h] * 2), values, rows, cols)
    return np.asarray(Image.fromarray(coarse).resize((out_w, out_h), Image.Resampling.BILINEAR))


def colorize(norm: np.ndarray) -> np.ndarray:
    """[H, W] values in [0, 1] -> [H, W, 3] uint8 colours of the shared scale."""
    at = np.linspace(0, 1, len(_ANCHORS))
    rgb = [np.interp(np.clip(norm, 0, 1), at, _ANCHORS[:, c]) for c in range(3)]
    return np.rint(np.stack(rgb, axis=-1)).astype(np.uint8)


def active_box(tokens: np.ndarray, acts: np.ndarray, cutoff: float, size: tuple[int, int],
               margin: float) -> tuple[int, int, int, int] | None:
    """Bounding box (original pixels) of the tokens above `cutoff`, widened by `margin` times the
    image's longer side and clipped to the image; None when no token is above it."""
    boxes = token_boxes(tokens)
    on = (np.asarray(acts) > cutoff) & (boxes[:, 2] > boxes[:, 0])
    if not on.any():
        return None
    w, h = size
    m = margin * max(w, h)
    x0, y0 = boxes[on, 0].min() - m, boxes[on, 1].min() - m
    x1, y1 = boxes[on, 2].max() + m, boxes[on, 3].max() + m
    return max(0, math.floor(x0)), max(0, math.floor(y0)), min(w, math.ceil(x1)), min(h, math.ceil(y1))


def outline(img: np.ndarray, value_map: np.ndarray, levels: tuple[float, ...] = CONTOUR_LEVELS,
            width: int = 2) -> np.ndarray:
    """`img` [H, W, 3] with the outline of each region `value_map` >= level drawn on it: a white line
    `width - 1` pixels wide just inside the region's edge and a black one `width` pixels wide just outside
    it, readable on every colour. Pixels that are neither keep their colour exactly; the strongest level is drawn last."""
    from PIL import ImageFilter

    out = img.copy()
    for level in levels:
        region = Image.fromarray(((value_map >= level) * 255).astype(np.uint8))
        inside = np.asarray(region) > 0
        if not inside.any():
            continue
        inner = inside & ~(np.asarray(region.filter(ImageFilter.MinFilter(2 * width - 1))) > 0)
        outer = ~inside & (np.asarray(region.filter(ImageFilter.MaxFilter(2 * width + 1))) > 0)
        out[outer] = 0
        out[inner] = 255
    return out


def _upscaled(image: Image.Image, display_size: int) -> Image.Image:
    """Nearest-neighbour upscale so the longer side reaches `display_size` (never downscales)."""
    s = display_size / max(image.size)
    return image.resize((round(image.width * s), round(image.height * s)), Image.Resampling.NEAREST) if s > 1 else image


def render_feature(image: Image.Image, tokens: np.ndarray, acts: np.ndarray, *, vmax: float | None = None,
                   mode: str = "nearest", threshold: float = 0.0, dim: float = 0.25, margin: float = 0.05,
                   alpha: float = 0.6, display_size: int = 192) -> FeatureView:
    """All views of one feature on one image.

    tokens: the image's token table rows (boxes in `image`'s pixels); acts: the feature's
    activation on each. vmax: top of the colour scale (pass the feature's max to share it across
    examples; default this image's max). Active region: tokens above `threshold` * vmax.
    The overlay blends the colour in proportion to the activation (`alpha` at vmax); the contour view
    outlines the tokens at CONTOUR_LEVELS of vmax and changes no other pixel.
    """
    image = image.convert("RGB")
    acts = np.asarray(acts, np.float32)
    if len(acts) != len(tokens):
        raise ValueError(f"got {len(acts)} activations for {len(tokens)} tokens")
    if vmax is None:
        vmax = float(acts.max()) if len(acts) else 0.0
    scale = max(1.0, display_size / max(image.size))
    original = _upscaled(image, display_size)
    img = np.asarray(original)
    out_size = original.size
    norm = activation_map(tokens, acts, image.size, out_size, mode) / (vmax if vmax > 0 else 1.0)
    color = colorize(norm)
    a = alpha * np.clip(norm, 0, 1)[..., None]
    overlay = np.rint(img * (1 - a) + color * a).astype(np.uint8)
    cutoff = threshold * vmax
    exact = activation_map(tokens, acts, image.size, out_size, "nearest")
    contour = outline(img, exact / vmax if vmax > 0 else np.zeros_like(exact), width=max(2, round(max(out_size) / 80)))
    inside = exact > cutoff
    masked = np.where(inside[..., None], img, np.clip(np.rint(img.astype(float) * dim), 0, 255).astype(np.uint8))
    box = active_box(tokens, acts, cutoff, image.size, margin)
    crop = _upscaled(image.crop(box), display_size) if box else original
    return FeatureView(original, Image.fromarray(contour), Image.fromarray(color), Image.fromarray(overlay),
                       Image.fromarray(masked), crop, box, float(vmax), scale)


def render_example(sources: FeatureSources, feature: int, sample: int, **kwargs) -> FeatureView:
    """`render_feature` for the image of one sample of the cache (a row of its samples table), with
    the colour scale at the feature's max over the cache unless `vmax` is given."""
    from interp.cache.data import data_roots, load_image

    tokens, acts = sources.token_activations(feature, sample)
    kwargs.setdefault("vmax", sources.features.stats(feature).max)
    image = load_image(sources.reader.image_refs[sample], data_roots(sources.reader.meta.get("data")))
    return render_feature(image, tokens, acts, **kwargs)


def write_feature_pngs(sources: FeatureSources, feature: int, out_dir: str | Path, *, by: str | None = None,
                       views: tuple[str, ...] = ("overlay", "masked", "crop", "original"), **kwargs) -> list[Path]:
    """PNGs of `views` for each top sample of `feature` (one shared colour scale), named
    `feature{F}_top{RANK}_sample{SAMPLE}_{VIEW}.png`; returns their paths."""
    unknown = set(views) - set(VIEWS)
    if unknown:
        raise ValueError(f"unknown views {sorted(unknown)}; choose from {VIEWS}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for rank, example in enumerate(sources.features.top(feature, by)):
        view = render_example(sources, feature, example.sample, **kwargs)
        for name in views:
            path = out / f"feature{feature}_top{rank:02d}_sample{example.sample}_{name}.png"
            getattr(view, name).save(path)
            paths.append(path)
    return paths
