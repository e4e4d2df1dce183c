"""Which samples an explainer sees and which are held out for scoring, their per-token activations,
and (the world protocol) the highlighted regions cut from them.

A feature's top samples alone describe its strongest mode only (the shapes world's "circle"
feature peaks on yellow circles, so its top samples all say "yellow circle"), so an explainer
sees a few top samples plus examples spread over the quantile bands of the uniform random
sample of activating samples (`FeatureReader.quantile_samples`). Bands are split by alternating
position, so the held-out activating samples the scorer uses cover the same bands, and the
explainer's samples are recorded with each explanation, so the scorer never tests on them.

Regions (the world protocol): a shapes-world explainer was trained to describe a highlighted set
of patches within one position cell, so each example becomes one region: the feature's activation
on the world's patch grid (the max over the token boxes covering each patch, whatever the
subject's own patch geometry), cut at `cutoff` of the example's own max, split by position cell,
the cell piece with the most activation kept, and within it its strongest patch (the world
protocol's default: the grammar then names the part too, "edge of ..."). Silent regions are
patch sets of the same size where the feature does not fire (at most `silent` of its max: 0),
within one cell, drawn alternately from images where the feature never fires and from the silent
patches of the activating images themselves, every other one at a near miss (where the
feature's pre-activation came closest to firing): delphi's random and hard negatives.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from explain.feature_reader import Example, FeatureReader, FeatureSources


@dataclass(frozen=True)
class Picked:
    example: Example
    source: str  # "top", "q0".."q{bands-1}" (quantile band, lowest first) or "negative"


@dataclass
class MarkedExample:
    """One sample's image with the feature's activation on each of its image-patch tokens."""

    sample: int  # row of the cache's samples table
    source_index: int  # its number in the data source (user masks are named by it)
    image_ref: str
    source: str
    original: Image.Image
    tokens: np.ndarray  # token table rows (pixel boxes in `original`)
    acts: np.ndarray  # the feature's activation per token
    vmax: float  # the feature's max over the cache: one colour scale for all examples
    pre: np.ndarray | None = None  # its pre-activation per token (how near it came to firing), when read

    @property
    def value(self) -> float:
        return float(self.acts.max()) if len(self.acts) else 0.0


@dataclass(eq=False)
class Region:
    """A highlighted set of patches of one sample's image: what a world explainer describes."""

    sample: int
    image_ref: str
    source: str  # as MarkedExample.source; negatives: "negative" (a silent image) or "silent" (an activating one)
    image: Image.Image  # the original
    mask: np.ndarray  # [patches, patches] bool, on the world's patch grid
    weight: float  # the feature's activation there relative to its max (0 for negatives)

    @property
    def size(self) -> int:
        return int(self.mask.sum())

    @property
    def key(self) -> tuple[str, bytes]:
        """What the region's description depends on: the image and the highlighted patches."""
        return self.image_ref, np.packbits(self.mask).tobytes()


def patch_activations(ex: MarkedExample, world, values: np.ndarray | None = None) -> np.ndarray:
    """[patches, patches]: the feature's activation (or `values`, one per token) on the world's patch grid,
    the max over the token boxes covering each patch. The world protocol reads shapes-world images only."""
    from explain.render import activation_map

    s, p = world.image_size, world.patch
    if ex.original.size != (s, s):
        raise ValueError(f"the world protocol describes regions of {s}x{s} shapes-world images, but sample "
                         f"{ex.sample} ({ex.image_ref}) is {ex.original.size[0]}x{ex.original.size[1]}: "
                         "use --protocol generic for other images")
    v = np.asarray(ex.acts if values is None else values, np.float32)
    low = float(v.min()) if len(v) else 0.0  # the raster's empty pixels are 0: shift negative values above it
    full = activation_map(ex.tokens, v - low + 1.0, (s, s), (s, s), "nearest")
    n = s // p
    return np.where(full > 0, full + low - 1.0, 0.0).reshape(n, p, n, p).max(axis=(1, 3))


def _cells(world) -> np.ndarray:
    """[patches, patches]: the position cell (row-major index) each patch's centre lies in."""
    n = world.patches
    centre = ((np.arange(n) + 0.5) * world.patch // world.cell).astype(int)
    return centre[:, None] * world.grid + centre[None, :]


def feature_region(ex: MarkedExample, world, cutoff: float = 0.5, patches: int | None = None) -> Region | None:
    """The region of `ex` where the feature fires: patches at or above `cutoff` of the example's max,
    within the position cell that holds the most activation, its `patches` strongest only (None: all).
    None when nothing fires."""
    acts = patch_activations(ex, world)
    peak = float(acts.max())
    if peak <= 0:
        return None
    on = acts >= cutoff * peak
    cells = _cells(world)
    mass = [float(acts[on & (cells == c)].sum()) for c in range(world.grid ** 2)]
    best = int(np.argmax(mass))
    mask = on & (cells == best)
    if patches is not None and mask.sum() > patches:
        order = np.argsort(-np.where(mask, acts, -np.inf), axis=None, kind="stable")[:patches]
        mask = np.zeros_like(mask)
        mask.flat[order] = True
    return Region(ex.sample, ex.image_ref, ex.source, ex.original, mask,
                  float(acts[mask].max()) / (ex.vmax or peak))


def silent_region(ex: MarkedExample, size: int, world, rng: np.random.Generator, silent: float = 0.0,
                  source: str | None = None, near: bool = False) -> Region | None:
    """`size` patches of `ex` where the feature is at most `silent` of its max, within one position cell,
    grown around a silent patch (nearest first, ties at random); fewer where the cell has fewer. The
    patch is random, or with `near` one of the three silent patches whose pre-activation came nearest
    to firing (a hard negative; random when the example has no pre-activations). None when no patch of
    the image is silent."""
    acts = patch_activations(ex, world)
    quiet = acts <= silent * ex.vmax
    if not quiet.any():
        return None
    cells = _cells(world)
    spots = np.argwhere(quiet)
    if near and ex.pre is not None:
        pre = patch_activations(ex, world, ex.pre)[quiet]
        spots = spots[np.argsort(-pre, kind="stable")[:3]]
    r0, c0 = spots[rng.integers(len(spots))]
    pool = np.argwhere(quiet & (cells == cells[r0, c0]))
    dist = np.maximum(abs(pool[:, 0] - r0), abs(pool[:, 1] - c0)) + rng.random(len(pool)) * 0.5
    pick = pool[np.argsort(dist, kind="stable")[: max(1, size)]]
    mask = np.zeros_like(quiet)
    mask[pick[:, 0], pick[:, 1]] = True
    return Region(ex.sample, ex.image_ref, source or ex.source, ex.original, mask, 0.0)


@dataclass(frozen=True)
class SelectionConfig:
    explain_top: int = 3  # top samples shown to the explainer (few: they all show the feature's peak mode)
    explain_quantile: int = 12  # quantile-band samples shown to the explainer (the rest of its range)
    explain_negatives: int = 8  # silent images the world explainer contrasts them with (not scored on)
    bands: int = 4
    score_top: int = 5  # held-out top samples for detection
    score_quantile: int = 15  # held-out quantile-band samples for detection
    score_negatives: int = 20  # non-activating samples for detection

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 0:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {value}")
        if self.explain_top + self.explain_quantile == 0:
            raise ValueError("an explainer needs examples: set --explain-top or --explain-quantile above 0")
        if self.bands < 1:
            raise ValueError(f"bands must be >= 1, got {self.bands}")


def _spread(items: list, n: int) -> list:
    """`n` items evenly spaced over the list (all of them if it is shorter)."""
    if len(items) <= n:
        return list(items)
    return [items[i] for i in np.unique(np.linspace(0, len(items) - 1, n).round().astype(int))]


def _banded(stats: FeatureReader, feature: int, n_bands: int, modality: str = "image") -> list[list[Picked]]:
    bands = stats.quantile_samples(feature, n_bands=n_bands, per_band=stats.meta.get("reservoir", 10**6),
                                   modality=modality)
    return [[Picked(e, f"q{j}") for e in band.examples] for j, band in enumerate(bands)]


def explain_examples(stats: FeatureReader, feature: int, cfg: SelectionConfig, modality: str = "image") -> list[Picked]:
    """The samples an explainer sees: the best `explain_top`, then even-position quantile samples of each band
    (ranked by the image patches, or with modality "text" by the text tokens)."""
    picked = [Picked(e, "top") for e in stats.top(feature, modality=modality)[: cfg.explain_top]]
    seen = {p.example.sample for p in picked}
    per_band = [[p for p in band[::2] if p.example.sample not in seen]
                for band in _banded(stats, feature, cfg.bands, modality)]
    return picked + _round_robin(per_band, cfg.explain_quantile)


def heldout_examples(stats: FeatureReader, feature: int, used: set[int], cfg: SelectionConfig,
                     modality: str = "image") -> list[Picked]:
    """Activating samples the explainer did not see: remaining top samples, then quantile samples of
    every band (odd positions first, so they are the ones `explain_examples` never picks)."""
    top = [Picked(e, "top") for e in stats.top(feature, modality=modality) if e.sample not in used]
    out = _spread(top, cfg.score_top)
    seen = used | {p.example.sample for p in out}
    per_band = [[p for p in band[1::2] + band[::2] if p.example.sample not in seen]
                for band in _banded(stats, feature, cfg.bands, modality)]
    return out + _round_robin(per_band, cfg.score_quantile)


def negative_examples(stats: FeatureReader, feature: int, cfg: SelectionConfig, modality: str = "image",
                      exclude: set[int] = frozenset()) -> list[Picked]:
    """Random non-activating samples (modality "text": zero on their text rows), without those in `exclude`."""
    negs = [e for e in stats.negatives(feature, modality=modality) if e.sample not in exclude]
    return [Picked(e, "negative") for e in negs[: cfg.score_negatives]]


def explain_negatives(stats: FeatureReader, feature: int, cfg: SelectionConfig) -> list[Picked]:
    """The non-activating samples a world explainer contrasts a feature's examples with: the last
    `explain_negatives` of its negatives (the scorer takes its own from the front, and skips these)."""
    negs = stats.negatives(feature)
    return [Picked(e, "negative") for e in negs[len(negs) - min(cfg.explain_negatives, len(negs)):]]


def _round_robin(lists: list[list[Picked]], n: int) -> list[Picked]:
    """Up to `n` items taken one from each list in turn (so every band is represented), without repeats."""
    out, seen, i = [], set(), 0
    while len(out) < n and any(i < len(lst) for lst in lists):
        for lst in lists:
            if i < len(lst) and len(out) < n and lst[i].example.sample not in seen:
                seen.add(lst[i].example.sample)
                out.append(lst[i])
        i += 1
    return out


@lru_cache(maxsize=512)
def shapes_scene(image_ref: str):
    """The scene behind a `shapes:SPLIT:INDEX:SEED` reference (drawing one takes milliseconds, and a run's
    explain and score stages read the same images many times), or None for another reference."""
    from interp.shapes.ground_truth import parse_shapes_ref, scene_of

    return scene_of(image_ref) if parse_shapes_ref(image_ref) is not None else None


@lru_cache(maxsize=4096)
def _drawn_image(image_ref: str) -> Image.Image:
    """A shapes-world image, drawn once: a run's explain and score stages show each of its images many
    times (drawing one takes milliseconds, keeping one 12 KB), and the scene cache above holds fewer."""
    from interp.cache.data import load_image as load

    return load(image_ref)


def load_image(image_ref: str, roots) -> Image.Image:
    """A sample's image: a shapes-world scene from the cache of drawn images (a copy: callers may draw on
    it), anything else through interp.cache.data.load_image under the cache's data roots."""
    from interp.cache.data import load_image as load
    from interp.shapes.ground_truth import parse_shapes_ref

    return _drawn_image(image_ref).copy() if parse_shapes_ref(image_ref) is not None else load(image_ref, roots)


def load_marked(sources: FeatureSources, feature: int, picked: list[Picked], pre: bool = False) -> list[MarkedExample]:
    """The images of the samples behind `picked` with the feature's per-token activations (re-encoded), and
    with `pre` its pre-activations too (how near it came to firing where it is silent: the world protocol's
    hard negatives)."""
    from interp.cache.data import data_roots

    vmax = sources.features.stats(feature).max
    roots = data_roots(sources.reader.meta.get("data"))  # only images of the cache's own data (a remote
    out = []  # explainer would be sent whatever a crafted reference points at)
    for p in picked:
        tokens, acts, *pre_acts = sources.token_activations(feature, p.example.sample, with_pre=pre)
        out.append(MarkedExample(p.example.sample, p.example.source_index, p.example.image_ref, p.source,
                                 load_image(p.example.image_ref, roots), tokens, acts, vmax,
                                 pre_acts[0] if pre else None))
    return out
