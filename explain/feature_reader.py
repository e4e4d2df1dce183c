"""The one reader of `features.h5` (written by `interp features`; docs/formats.md is the spec).

Later stages (explanations, scoring, steering, the app) get every per-feature statistic and
example list from `FeatureReader` (named like the cache's `ActivationReader`), and per-token
activations of an example sample from `FeatureSources`, which re-encodes that sample's cached
rows on demand: storing them for every top sample would cost d_sae * top_samples * tokens
floats (gigabytes for 100k features), while re-encoding one sample's rows takes milliseconds.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from saes.sae import sae_fingerprint  # noqa: F401  (the SAE's identity, used with this file)

FORMAT = "lmmscope.features/3"
RANKINGS = ("max", "mean")  # how a sample's token activations are summarised into one value
MODALITIES = ("dead", "image", "text", "both")  # stats/modality codes: where a feature's activation is
EXAMPLE_MODALITIES = ("image", "text")  # which rows of a sample its example values come from
_GROUPS = {("image", "top"): "top_{by}", ("text", "top"): "top_text", ("image", "reservoir"): "reservoir",
           ("text", "reservoir"): "reservoir_text", ("image", "negatives"): "negatives",
           ("text", "negatives"): "negatives_text"}
DEFAULT_CHUNK_ELEMENTS = 2**25  # rows * d_sae of one dense encoded chunk (128 MiB of float32)
JSON_ATTRS = ("sae_cfg", "cache_identity", "versions", "quantile_levels", "argv")


class FeatureFileError(ValueError):
    """A features file that is missing, malformed, or does not belong to the given SAE or cache."""


def cache_identity(meta: dict[str, Any]) -> dict[str, Any]:
    """The attributes that identify an activation cache (its settings, data, size and creation time)."""
    from interp.cache.format import IDENTITY_ATTRS

    keys = (*IDENTITY_ATTRS, "data_fingerprint", "n_rows", "n_samples", "created")
    return {k: meta.get(k) for k in keys}


def cache_fingerprint(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]


def chunk_rows_for(d_sae: int, max_elements: int = DEFAULT_CHUNK_ELEMENTS, cap: int | None = None) -> int:
    """Rows per encoded chunk so that a dense [rows, d_sae] block stays within `max_elements`."""
    rows = max(1, max_elements // d_sae)
    return min(rows, cap) if cap else rows


def _text(v: Any) -> Any:
    return v.decode() if isinstance(v, bytes) else v


@dataclass(frozen=True)
class Example:
    """One sample of a feature's example lists."""

    sample: int  # its row of the cache's samples table
    source_index: int  # its number in the data source
    image_ref: str  # interp.cache.data.load_image(image_ref) gives the original image back
    value: float  # the ranking value (the sample's max or mean token activation)
    max: float
    mean: float


@dataclass(frozen=True)
class FeatureSummary:
    feature: int
    density: float  # fraction of all cached rows on which the feature is > 0
    n_active: int
    max: float
    mean: float  # over all rows
    mean_active: float  # over active rows (0 for a dead feature)
    image_share: float  # share of the total activation on image tokens (1.0 without text rows; NaN if dead)
    quantiles: dict[float, float]  # of the active values, from a log-spaced histogram
    modality: str = "image"  # one of MODALITIES
    density_image: float = 0.0  # fraction of the image rows on which it fires
    density_text: float = 0.0  # fraction of the text rows on which it fires
    max_image: float = 0.0
    max_text: float = 0.0


@dataclass(frozen=True)
class QuantileBand:
    """Activating samples whose value lies between two quantiles of the feature's per-sample values."""

    q_lo: float
    q_hi: float
    examples: list[Example]


class FeatureReader:
    """Read access to one features.h5; the file stays open until `close()`."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise FeatureFileError(f"no features file at {self.path}: make one with `interp features RUN`")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as e:
            raise FeatureFileError(f"{self.path} is not a readable HDF5 file ({e}): re-run `interp features`") from None
        if self._f.attrs.get("format") != FORMAT:
            fmt = self._f.attrs.get("format")
            self._f.close()
            raise FeatureFileError(f"{self.path} is not an lmmscope features file "
                                   f"(format {fmt!r}, expected {FORMAT!r})")
        self.meta = {k: json.loads(v) if k in JSON_ATTRS else _text(v) for k, v in self._f.attrs.items()}
        self.d_sae, self.top_samples = int(self.meta["d_sae"]), int(self.meta["top_samples"])
        self.rank_by = self.meta["rank_by"]
        self.samples_table = self._f["samples"][:]
        self.image_refs = [_text(v) for v in self.samples_table["image_ref"]]  # decoded once

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> FeatureReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- identity checks

    def check_matches(self, sae_dir: str | Path) -> None:
        """Raise unless this file was computed from the SAE in `sae_dir` (same weights)."""
        theirs = sae_fingerprint(sae_dir)
        if theirs != self.meta["sae_sha256"]:
            raise FeatureFileError(
                f"features file from another SAE: {self.path} was computed from the SAE at {self.meta['sae_path']} "
                f"(weights sha256 {self.meta['sae_sha256'][:12]}), not from {sae_dir} (weights sha256 {theirs[:12]}); "
                f"re-run `interp features` on the run of {sae_dir}")

    def check_cache(self, meta: dict[str, Any]) -> None:
        """Raise unless `meta` (an ActivationReader's .meta) is the cache this file was computed from."""
        theirs = cache_fingerprint(cache_identity(meta))
        if theirs != self.meta["cache_fingerprint"]:
            raise FeatureFileError(f"features file from another activation cache: {self.path} was computed from "
                                   f"{self.meta['cache_path']} (fingerprint {self.meta['cache_fingerprint']}), "
                                   f"this cache has fingerprint {theirs}")

    # ---------------------------------------------------------------- per feature

    def check_feature(self, feature: int) -> int:
        """The feature as an int, or a ValueError naming the valid range."""
        f = int(feature)
        if f != feature or not 0 <= f < self.d_sae:
            raise ValueError(f"feature {feature} is out of range: this SAE has {self.d_sae} features "
                             f"(valid indices 0..{self.d_sae - 1})")
        return f

    def stats(self, feature: int) -> FeatureSummary:
        f = self.check_feature(feature)
        s = self._f["stats"]
        levels = self.meta["quantile_levels"]
        return FeatureSummary(f, float(s["density"][f]), int(s["n_active"][f]), float(s["max"][f]),
                              float(s["mean"][f]), float(s["mean_active"][f]), float(s["image_share"][f]),
                              dict(zip(levels, (float(q) for q in s["quantiles"][f]))),
                              MODALITIES[int(s["modality"][f])], float(s["density_image"][f]),
                              float(s["density_text"][f]), float(s["max_image"][f]), float(s["max_text"][f]))

    def modalities(self) -> np.ndarray:
        """[d_sae] every feature's modality name (MODALITIES), for filtering."""
        return np.asarray(MODALITIES, dtype=object)[self._f["stats/modality"][:]]

    def summary_table(self) -> dict[str, np.ndarray]:
        """Every per-feature scalar statistic as a [d_sae] array (to sort and filter features)."""
        return {name: ds[:] for name, ds in self._f["stats"].items() if ds.ndim == 1 and name != "hist_edges"}

    def row_stats(self, start: int, stop: int):
        """explain.feature_columns.RowStats of cache rows [start, stop), None for files written before them."""
        from explain.feature_columns import RowStats

        if "rows" not in self._f:
            return None
        return RowStats(self._f["rows/n_active"][start:stop], self._f["rows/min_active"][start:stop])

    def histogram(self, feature: int) -> tuple[np.ndarray, np.ndarray]:
        """(edges [bins + 1], counts [bins]) of the feature's active values; edges run from 0 to inf."""
        f = self.check_feature(feature)
        return self._f["stats/hist_edges"][:], self._f["stats/histogram"][f]

    def _examples(self, group: str, feature: int, by: str) -> list[Example]:
        g = self._f[group]
        samples = g["sample"][feature]
        values = {name: g[name][feature] if name in g else np.zeros(len(samples), np.float32) for name in RANKINGS}
        sources = self.samples_table["source_index"]
        return [Example(int(samples[i]), int(sources[samples[i]]), self.image_refs[samples[i]], float(values[by][i]),
                        float(values["max"][i]), float(values["mean"][i])) for i in np.flatnonzero(samples >= 0)]

    def _ranking(self, by: str | None) -> str:
        by = by or self.rank_by
        if by not in RANKINGS:
            raise ValueError(f"rank samples by one of {RANKINGS}, not {by!r}")
        return by

    @staticmethod
    def _group(modality: str, kind: str, by: str = "max") -> str:
        if modality not in EXAMPLE_MODALITIES:
            raise ValueError(f"examples are of one of {EXAMPLE_MODALITIES}, not {modality!r}")
        return _GROUPS[modality, kind].format(by=by)

    def top(self, feature: int, by: str | None = None, modality: str = "image") -> list[Example]:
        """The (up to top_samples) samples with the highest max (or mean) activation, best first: over
        their image patches, or (modality "text") ranked by the max over their text tokens."""
        by = self._ranking(by)
        return self._examples(self._group(modality, "top", by), self.check_feature(feature), by)

    def quantile_samples(self, feature: int, n_bands: int = 4, per_band: int = 5,
                         by: str | None = None, modality: str = "image") -> list[QuantileBand]:
        """Activating samples spread over `n_bands` equal-count quantile bands of the per-sample value,
        lowest band first, `per_band` evenly spaced examples each (from a uniform random sample of
        the activating samples, so the bands estimate quantiles over all of them); of the image
        patches or (modality "text") of the text tokens."""
        by = self._ranking(by)
        pool = sorted(self._examples(self._group(modality, "reservoir"), self.check_feature(feature), by),
                      key=lambda e: e.value)
        bands = []
        for j, band in enumerate(np.array_split(np.arange(len(pool)), n_bands)):
            picks = np.unique(np.linspace(0, len(band) - 1, min(per_band, len(band))).round().astype(int))
            bands.append(QuantileBand(j / n_bands, (j + 1) / n_bands, [pool[band[p]] for p in picks]))
        return bands

    def negatives(self, feature: int, modality: str = "image") -> list[Example]:
        """Random samples on whose rows (image and text) the feature is exactly zero; with modality "text",
        random samples with text rows on which (on those rows) it is exactly zero."""
        return self._examples(self._group(modality, "negatives"), self.check_feature(feature), self.rank_by)


@dataclass
class FeatureSources:
    """A run's features file with the cache and SAE it was computed from (checked: same SAE weights,
    same cache identity), to get per-token activations of any example by re-encoding its rows."""

    features: FeatureReader
    reader: Any  # interp.cache.reader.ActivationReader
    sae: Any  # saes.sae.SAE
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS

    @classmethod
    def open(cls, run, device: str = "cpu") -> FeatureSources:
        """RUN/features.h5, RUN/activations.h5 and RUN/sae/ of a run directory (or its RunLayout)."""
        from interp.cache.reader import ActivationReader
        from interp.infra.layout import RunLayout
        from saes.sae import SAE

        layout = RunLayout.of(run)
        with ExitStack() as opened:  # closes what was opened if a check fails
            stats = opened.enter_context(FeatureReader(layout.features))
            stats.check_matches(layout.sae)
            reader = opened.enter_context(ActivationReader(layout.cache))
            stats.check_cache(reader.meta)
            model = SAE.load(layout.sae, device=device)
            opened.pop_all()
        return cls(stats, reader, model)

    def close(self) -> None:
        self.features.close()
        self.reader.close()

    def __enter__(self) -> FeatureSources:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @torch.no_grad()
    def token_activations(self, feature: int, sample: int, modality: str = "image", with_pre: bool = False) -> tuple:
        """(token table rows, activations) of `feature` on the image-patch tokens (modality "text": the text
        tokens, in position order) of `sample` (a row of the samples table): from the feature's encoder
        column and the file's row statistics where the architecture allows (explain.feature_columns), else
        re-encoded in chunks of bounded size. `with_pre`: its encoder pre-activations on those tokens as a
        third element (how near it came to firing where it is silent), from the same read of the rows."""
        from explain.feature_columns import feature_column, needs_row_stats, pre_activation_column
        from interp.cache.format import is_image_patch, is_text

        f = self.features.check_feature(feature)
        s = self.reader.sample(sample)
        if modality not in EXAMPLE_MODALITIES:
            raise ValueError(f"token activations are of one of {EXAMPLE_MODALITIES}, not {modality!r}")
        keep = (is_image_patch if modality == "image" else is_text)(s.tokens["role"])
        x = self.reader.read(s.start, s.stop).to(self.sae.device)
        # one column of the encoder (ms) instead of every feature (a minute for 131k features on one image)
        stats = self.features.row_stats(s.start, s.stop) if needs_row_stats(self.sae) else None
        column = feature_column(self.sae, x, f, stats)
        if column is not None:
            values = column.float().cpu().numpy()
        else:
            step = chunk_rows_for(self.features.d_sae, self.max_chunk_elements)
            acts = [self.sae.encode(x[a: a + step])[:, f].float().cpu() for a in range(0, len(x), step)]
            values = torch.cat(acts).numpy() if acts else np.zeros(0, np.float32)
        if not with_pre:
            return s.tokens[keep], values[keep]
        pre = pre_activation_column(self.sae, self.sae.normalise(x.to(self.sae.dtype)), f).float().cpu().numpy()
        return s.tokens[keep], values[keep], pre[keep]
