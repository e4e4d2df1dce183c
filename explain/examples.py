"""Which images an explainer sees and which are held out for scoring, and their per-token activations.

A feature's top images alone describe its strongest mode only (the shapes world's "circle"
latent peaks on yellow circles, so its top images all say "yellow circle"), so an explainer
sees a few top images plus examples spread over the quantile bands of the uniform random
sample of activating images (`FeatureStats.quantile_samples`). Bands are split by alternating
position, so the held-out activating images the scorer uses cover the same bands, and the
explainer's images are recorded with each explanation, so the scorer never tests on them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from explain.feature_reader import Example, FeatureSources, FeatureStats


@dataclass(frozen=True)
class Picked:
    example: Example
    source: str  # "top", "q0".."q{bands-1}" (quantile band, lowest first) or "negative"


@dataclass
class MarkedExample:
    """One image with the feature's activation on each of its image-patch tokens."""

    image: int  # row of the cache's samples table
    image_ref: str
    source: str
    original: Image.Image
    tokens: np.ndarray  # token table rows (pixel boxes in `original`)
    acts: np.ndarray  # the feature's activation per token
    vmax: float  # the feature's max over the cache: one colour scale for all examples

    @property
    def value(self) -> float:
        return float(self.acts.max()) if len(self.acts) else 0.0


@dataclass(frozen=True)
class SelectionConfig:
    n_top: int = 3  # top images shown to the explainer (few: they all show the feature's peak mode)
    n_quantile: int = 12  # quantile-band samples shown to the explainer (the rest of its range)
    n_bands: int = 4
    n_pos_top: int = 5  # held-out top images for detection
    n_pos_quantile: int = 15  # held-out quantile-band samples for detection
    n_neg: int = 20  # non-activating images for detection

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.n_top + self.n_quantile == 0:
            raise ValueError("an explainer needs examples: set n_top or n_quantile above 0")
        if self.n_bands < 1:
            raise ValueError(f"n_bands must be >= 1, got {self.n_bands}")


def _spread(items: list, n: int) -> list:
    """`n` items evenly spaced over the list (all of them if it is shorter)."""
    if len(items) <= n:
        return list(items)
    return [items[i] for i in np.unique(np.linspace(0, len(items) - 1, n).round().astype(int))]


def _banded(stats: FeatureStats, feature: int, n_bands: int) -> list[list[Picked]]:
    bands = stats.quantile_samples(feature, n_bands=n_bands, per_band=stats.meta.get("reservoir", 10**6))
    return [[Picked(e, f"q{j}") for e in band.examples] for j, band in enumerate(bands)]


def explain_examples(stats: FeatureStats, feature: int, cfg: SelectionConfig) -> list[Picked]:
    """The images an explainer sees: the best `n_top`, then even-position quantile samples of each band."""
    picked = [Picked(e, "top") for e in stats.top_images(feature)[: cfg.n_top]]
    seen = {p.example.image for p in picked}
    per_band = [[p for p in band[::2] if p.example.image not in seen] for band in _banded(stats, feature, cfg.n_bands)]
    return picked + _round_robin(per_band, cfg.n_quantile)


def heldout_examples(stats: FeatureStats, feature: int, used: set[int], cfg: SelectionConfig) -> list[Picked]:
    """Activating images the explainer did not see: remaining top images, then quantile samples of
    every band (odd positions first, so they are the ones `explain_examples` never picks)."""
    top = [Picked(e, "top") for e in stats.top_images(feature) if e.image not in used]
    out = _spread(top, cfg.n_pos_top)
    seen = used | {p.example.image for p in out}
    per_band = [[p for p in band[1::2] + band[::2] if p.example.image not in seen]
                for band in _banded(stats, feature, cfg.n_bands)]
    return out + _round_robin(per_band, cfg.n_pos_quantile)


def negative_examples(stats: FeatureStats, feature: int, cfg: SelectionConfig) -> list[Picked]:
    return [Picked(e, "negative") for e in stats.negatives(feature)[: cfg.n_neg]]


def _round_robin(lists: list[list[Picked]], n: int) -> list[Picked]:
    """Up to `n` items taken one from each list in turn (so every band is represented), without repeats."""
    out, seen, i = [], set(), 0
    while len(out) < n and any(i < len(lst) for lst in lists):
        for lst in lists:
            if i < len(lst) and len(out) < n and lst[i].example.image not in seen:
                seen.add(lst[i].example.image)
                out.append(lst[i])
        i += 1
    return out


def load_marked(sources: FeatureSources, feature: int, picked: list[Picked]) -> list[MarkedExample]:
    """The images behind `picked` with the feature's per-token activations (re-encoded from the cache)."""
    from interp.cache.data import load_image

    vmax = sources.stats.stats(feature).max
    out = []
    for p in picked:
        tokens, acts = sources.token_activations(feature, p.example.image)
        out.append(MarkedExample(p.example.image, p.example.image_ref, p.source, load_image(p.example.image_ref),
                                 tokens, acts, vmax))
    return out
