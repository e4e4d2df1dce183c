"""Which samples an explainer sees and which are held out for scoring, and their per-token activations.

A feature's top samples alone describe its strongest mode only (the shapes world's "circle"
feature peaks on yellow circles, so its top samples all say "yellow circle"), so an explainer
sees a few top samples plus examples spread over the quantile bands of the uniform random
sample of activating samples (`FeatureReader.quantile_samples`). Bands are split by alternating
position, so the held-out activating samples the scorer uses cover the same bands, and the
explainer's samples are recorded with each explanation, so the scorer never tests on them.
"""

from __future__ import annotations

from dataclasses import dataclass

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

    @property
    def value(self) -> float:
        return float(self.acts.max()) if len(self.acts) else 0.0


@dataclass(frozen=True)
class SelectionConfig:
    explain_top: int = 3  # top samples shown to the explainer (few: they all show the feature's peak mode)
    explain_quantile: int = 12  # quantile-band samples shown to the explainer (the rest of its range)
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


def load_marked(sources: FeatureSources, feature: int, picked: list[Picked]) -> list[MarkedExample]:
    """The images of the samples behind `picked` with the feature's per-token activations (re-encoded)."""
    from interp.cache.data import data_roots, load_image

    vmax = sources.features.stats(feature).max
    roots = data_roots(sources.reader.meta.get("data"))  # only images of the cache's own data (a remote
    out = []  # explainer would be sent whatever a crafted reference points at)
    for p in picked:
        tokens, acts = sources.token_activations(feature, p.example.sample)
        out.append(MarkedExample(p.example.sample, p.example.source_index, p.example.image_ref, p.source,
                                 load_image(p.example.image_ref, roots), tokens, acts, vmax))
    return out
