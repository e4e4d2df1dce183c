"""`interp features`: per-feature statistics and example samples of an SAE over an activation cache.

    interp features RUN [--rank-by max|mean]      # RUN/activations.h5 through RUN/sae/ into RUN/features.h5

One streaming pass: the cache is read in chunks, each chunk encoded by the SAE, and per-feature
state updated. Memory is O(d_sae * (top_samples + reservoir + negatives + bins)) plus one dense encoded
chunk of at most `max_chunk_elements` rows * d_sae, whatever the number of rows or samples; no
[rows, d_sae] or [samples, d_sae] array is ever built. A sample's rows may straddle chunks: its
partial per-sample aggregates are carried into the next chunk.

Per-feature example lists are running selections of [d_sae, size] arrays, merged per chunk with
`topk` over only the features that have a candidate better than their current worst entry:
top samples by max and by mean, a uniform random sample ("reservoir") of activating samples
(the smallest values of a fixed hash of (sample, feature), so the sample does not depend on the
chunking), and random non-activating samples (the same hash over samples with zero activation).

A "sample" is a row of the cache's samples table; its image value is the max (or mean) of the
feature over its image-patch rows, its text value the same over its text rows (prompt, template
and answer tokens), so every feature has top samples of each modality. Per-token activations of the
top samples are not stored (d_sae * top_samples * tokens floats); `FeatureSources.token_activations`
re-encodes one sample's rows.

Modality: each feature is "image" (less than `modality_share` of its activation mass on text
rows, or its max there under `modality_peak` of its max), "text" (the same the other way round),
"both", or "dead"; densities and maxima are also kept per modality, over the rows of that modality.

features.h5 (format "lmmscope.features/3"; docs/formats.md is the spec):
  /stats/density, max, mean, mean_active, image_share  [d_sae] float32
  /stats/density_image, density_text, max_image, max_text  [d_sae] float32
  /stats/n_active, n_active_image, n_active_text       [d_sae] int64
  /stats/modality     [d_sae] uint8   a code into MODALITIES
  /stats/quantiles    [d_sae, L] float32  active-value quantiles at attrs quantile_levels
  /stats/histogram    [d_sae, bins] int32 active values per log-spaced bin
  /stats/hist_edges   [bins + 1] float64  bin edges, 0 ... inf
  /top_max/{sample,max,mean}, /top_mean/{sample,max,mean}   [d_sae, top_samples]   best first (image patches)
  /top_text/{sample,max,mean}                              [d_sae, top_samples]   best first (text rows, by max)
  /reservoir/{sample,max,mean}, /reservoir_text/...        [d_sae, reservoir]
  /negatives/sample, /negatives_text/sample                [d_sae, negatives]
  /samples            the cache's samples table; every `sample` above is a row of it (-1: empty slot)
  attrs: format, d_sae, top_samples, rank_by, reservoir, negatives, seed, n_rows, n_samples, has_text_rows,
         n_image_rows, n_text_rows, modality_share, modality_peak, chunk_rows, quantile_levels, sae_path, sae_cfg, sae_sha256,
         cache_path, cache_identity, cache_fingerprint, versions, argv, created, note
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch

from explain.feature_reader import (DEFAULT_CHUNK_ELEMENTS, FORMAT, MODALITIES, RANKINGS, cache_fingerprint,
                                    cache_identity, chunk_rows_for, sae_fingerprint)
from interp.cache.format import is_image, is_image_patch, is_text
from interp.infra.cli_config import Command, choices, hidden, positional
from interp.infra.durable import publish
from interp.infra.layout import RunLayout
from interp.model.models import resolve_device

_M32 = 0xFFFFFFFF
_NO_KEY = 1 << 40  # larger than any 32-bit hash: an entry that cannot be selected


@dataclass
class FeaturesConfig:
    """`interp features`: per-feature statistics and example samples of the run's SAE over its cache."""

    run: str | None = field(default=None, metadata=positional())
    """run directory: reads RUN/activations.h5 and RUN/sae/, writes RUN/features.h5"""
    top_samples: int = 20
    """top samples kept per feature, for each ranking"""
    rank_by: str = field(default="max", metadata=choices(list(RANKINGS)))
    """the ranking readers use unless told otherwise: max or mean of the feature over a sample's patch tokens
    (both are stored)"""
    reservoir: int = 40
    """random activating samples kept per feature, for quantile-band examples"""
    negatives: int = 20
    """random non-activating samples kept per feature"""
    bins: int = 256
    """log-spaced histogram bins of the active values, for quantiles"""
    hist_range: tuple[float, float] = field(default=(1e-4, 1e4), metadata=hidden())
    """histogram range; below and above go to the first and last bin"""
    quantile_levels: tuple[float, ...] = field(default=(0.1, 0.25, 0.5, 0.75, 0.9, 0.99), metadata=hidden())
    """quantiles of the active values to store"""
    modality_share: float = 0.01
    """a feature is image-only (text-only) when less than this share of its activation is on text (image) rows ..."""
    modality_peak: float = 0.5
    """... or when its max on text (image) rows is below this fraction of its max"""
    chunk_rows: int | None = None
    """at most this many rows per encoded chunk (always also within max_chunk_elements / d_sae)"""
    max_chunk_elements: int = field(default=DEFAULT_CHUNK_ELEMENTS, metadata=hidden())
    """rows * d_sae of one dense encoded chunk"""
    seed: int = 0
    """seed of the random reservoir and negatives"""
    device: str = "auto"
    """auto (cuda when present), cpu, cuda, cuda:N"""
    progress: bool = True
    """progress bar"""

    def __post_init__(self) -> None:
        if self.rank_by not in RANKINGS:
            raise ValueError(f"--rank-by must be one of {', '.join(RANKINGS)}, got {self.rank_by!r}")
        for name in ("top_samples", "reservoir", "negatives", "bins"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.hist_range[0] < self.hist_range[1]:
            raise ValueError(f"hist_range must be 0 < low < high, got {self.hist_range}")
        if not 0 <= self.modality_share < 0.5:
            raise ValueError(f"--modality-share must be in [0, 0.5), got {self.modality_share}")
        if not 0 <= self.modality_peak <= 1:
            raise ValueError(f"--modality-peak must be in [0, 1], got {self.modality_peak}")


@dataclass
class _Selection:
    """Per feature, the `size` best (key, sample) pairs so far, sorted best first, with payloads."""

    key: torch.Tensor  # [d, size]
    sample: torch.Tensor  # [d, size] int64, -1 = empty
    payload: dict[str, torch.Tensor]  # name -> [d, size]
    largest: bool
    empty_key: float | int

    @classmethod
    def new(cls, d: int, size: int, largest: bool, payload: tuple[str, ...], device: torch.device) -> _Selection:
        empty = float("-inf") if largest else _NO_KEY
        dtype = torch.float32 if largest else torch.int64
        return cls(torch.full((d, size), empty, dtype=dtype, device=device),
                   torch.full((d, size), -1, dtype=torch.int64, device=device),
                   {n: torch.zeros(d, size, device=device) for n in payload}, largest, empty)

    def update(self, key: torch.Tensor, samples: torch.Tensor, payload: dict[str, torch.Tensor]) -> None:
        """Merge candidates key [d, m] of `samples` [m] (payloads [d, m]); `empty_key` marks non-candidates."""
        worst = self.key[:, -1:]
        better = key > worst if self.largest else key < worst
        cols = better.any(1).nonzero().squeeze(1)  # the features with a candidate: only they are merged
        if not len(cols):
            return
        keys = torch.cat([self.key[cols], key[cols]], 1)
        pick = keys.topk(self.key.shape[1], dim=1, largest=self.largest, sorted=True).indices
        self.key[cols] = new_key = keys.gather(1, pick)
        cand_samples = samples[None, :].expand(len(cols), -1)
        sample = torch.cat([self.sample[cols], cand_samples], 1).gather(1, pick)
        self.sample[cols] = sample.masked_fill(new_key == self.empty_key, -1)
        for name, old in self.payload.items():
            old[cols] = torch.cat([old[cols], payload[name][cols]], 1).gather(1, pick)


@dataclass
class _SampleParts:
    """Per-sample aggregates of a run of consecutive samples (possibly partial at a chunk edge),
    feature-major so that merging a feature's candidates reads one contiguous row."""

    samples: torch.Tensor  # [m] rows of the samples table
    max: torch.Tensor  # [d, m] over image-patch rows
    sum: torch.Tensor  # [d, m] over image-patch rows
    count: torch.Tensor  # [m] image-patch rows
    any_max: torch.Tensor  # [d, m] over all rows (image and text): zero means a clean negative
    text_max: torch.Tensor  # [d, m] over text rows
    text_sum: torch.Tensor  # [d, m] over text rows
    text_count: torch.Tensor  # [m] text rows

    def _cut(self, part: slice) -> _SampleParts:
        return _SampleParts(self.samples[part], self.max[:, part], self.sum[:, part], self.count[part],
                            self.any_max[:, part], self.text_max[:, part], self.text_sum[:, part],
                            self.text_count[part])

    def split(self, i: int) -> tuple[_SampleParts, _SampleParts]:
        return self._cut(slice(None, i)), self._cut(slice(i, None))

    def absorb(self, earlier: _SampleParts) -> None:
        """Add the rows of the same first sample seen in an earlier chunk."""
        for name in ("max", "any_max", "text_max"):
            mine = getattr(self, name)
            mine[:, 0] = torch.maximum(mine[:, 0], getattr(earlier, name)[:, 0])
        self.sum[:, 0] += earlier.sum[:, 0]
        self.text_sum[:, 0] += earlier.text_sum[:, 0]
        self.count[0] += earlier.count[0]
        self.text_count[0] += earlier.text_count[0]


def random_keys(samples: torch.Tensor, d: int, seed: int) -> torch.Tensor:
    """A fixed pseudo-random 32-bit key per (feature, sample) [d, m]: the smallest keys of a set are a
    uniform random sample of it, independent of the order and chunking the samples come in."""
    feats = torch.arange(d, device=samples.device)
    x = ((feats[:, None] * 0x85EBCA77) & _M32) + ((samples[None, :] * 0x9E3779B1) & _M32) + seed * 0x3C6EF372
    x &= _M32
    for mult in (0x7FEB352D, 0x2C1B3C6D):  # multipliers < 2^31: products stay within int64
        x ^= x >> 16
        x = (x * mult) & _M32
    return x ^ (x >> 16)


def hist_quantiles(hist: torch.Tensor, edges: torch.Tensor, vmax: torch.Tensor,
                   levels: tuple[float, ...]) -> torch.Tensor:
    """Quantiles [n, L] of the values counted in `hist` [n, bins], linear within a bin and capped at
    `vmax` [n]; within a bin's relative width of the true quantile. 0 where nothing was counted."""
    counts = hist.double()
    cum = counts.cumsum(1)
    target = cum[:, -1:] * torch.tensor(levels, dtype=torch.float64, device=hist.device)[None]
    b = torch.searchsorted(cum, target).clamp_max(hist.shape[1] - 1)  # first bin reaching the target count
    below = torch.where(b > 0, cum.gather(1, (b - 1).clamp_min(0)), torch.zeros_like(target))
    frac = ((target - below) / counts.gather(1, b).clamp_min(1)).clamp(0, 1)
    top = vmax.double()[:, None]
    lo, hi = edges[b].minimum(top), edges[b + 1].minimum(top)
    return torch.where(cum[:, -1:] > 0, lo + frac * (hi - lo), 0.0).float()


class _Accumulator:
    """Everything the pass keeps per feature; `add` takes one encoded chunk."""

    def __init__(self, d: int, cfg: FeaturesConfig, row_ends: np.ndarray, device: torch.device):
        """row_ends: [samples] the end row of each sample (rows are sample-major)."""
        self.d, self.cfg, self.row_ends, self.device = d, cfg, row_ends, device
        inner = np.logspace(*np.log10(cfg.hist_range), cfg.bins - 1)
        self.edges = torch.tensor(np.concatenate([[0.0], inner, [np.inf]]), device=device)
        self.inner_edges = self.edges[1:-1].float()
        self.n_active = torch.zeros(d, dtype=torch.int64, device=device)
        self.total = torch.zeros(d, dtype=torch.float64, device=device)
        self.image_total = torch.zeros(d, dtype=torch.float64, device=device)
        self.text_total = torch.zeros(d, dtype=torch.float64, device=device)
        self.n_active_image = torch.zeros(d, dtype=torch.int64, device=device)
        self.n_active_text = torch.zeros(d, dtype=torch.int64, device=device)
        self.max = torch.zeros(d, device=device)
        self.max_image = torch.zeros(d, device=device)
        self.max_text = torch.zeros(d, device=device)
        self.hist = torch.zeros(d, cfg.bins, dtype=torch.int32, device=device)
        self.top = {by: _Selection.new(d, cfg.top_samples, True, RANKINGS, device) for by in RANKINGS}
        self.reservoir = _Selection.new(d, cfg.reservoir, False, RANKINGS, device)
        self.negatives = _Selection.new(d, cfg.negatives, False, (), device)
        self.top_text = _Selection.new(d, cfg.top_samples, True, RANKINGS, device)
        self.reservoir_text = _Selection.new(d, cfg.reservoir, False, RANKINGS, device)
        self.negatives_text = _Selection.new(d, cfg.negatives, False, (), device)
        self.pending: _SampleParts | None = None  # a sample whose rows go on in the next chunk
        from explain.feature_columns import RowStatsRecorder

        self.row_stats = RowStatsRecorder(int(row_ends[-1]) if len(row_ends) else 0)  # for one-feature re-encodes

    def add(self, start: int, acts: torch.Tensor, roles: torch.Tensor) -> None:
        """acts [c, d] of rows [start, start + c); roles [c] their token role codes. Past finding the
        active entries, everything costs O(active entries) or O(samples in the chunk * d)."""
        rows, feats = (acts > 0).nonzero().T
        self.add_entries(start, len(acts), rows, feats, acts[rows, feats], roles)

    def add_entries(self, start: int, n: int, rows: torch.Tensor, feats: torch.Tensor, vals: torch.Tensor,
                    roles: torch.Tensor) -> None:
        """The active entries (chunk row, feature, value > 0) of rows [start, start + n), in the order of
        `(acts > 0).nonzero()`; roles [n] the rows' token role codes."""
        vals = vals.float()
        self.row_stats.add(start, n, rows, vals)
        self.n_active += torch.bincount(feats, minlength=self.d)
        self.total.index_add_(0, feats, vals.double())
        on_image, on_text = is_image(roles[rows]), is_text(roles[rows])
        for mask, total, count, mx in ((on_image, self.image_total, self.n_active_image, self.max_image),
                                       (on_text, self.text_total, self.n_active_text, self.max_text)):
            total.index_add_(0, feats[mask], vals[mask].double())
            count += torch.bincount(feats[mask], minlength=self.d)
            mx.scatter_reduce_(0, feats[mask], vals[mask], "amax")
        self.max.scatter_reduce_(0, feats, vals, "amax")
        bins = torch.bucketize(vals, self.inner_edges, right=True)
        self.hist.view(-1).index_add_(0, feats * self.cfg.bins + bins,
                                      torch.ones(len(bins), dtype=torch.int32, device=self.device))

        stop = start + n
        sample_of_row = np.searchsorted(self.row_ends, np.arange(start, stop), side="right")
        parts = self._sample_parts(rows, feats, vals, is_image_patch(roles), is_text(roles),
                                  torch.from_numpy(sample_of_row).to(self.device))
        if self.pending is not None and self.pending.samples[0] == parts.samples[0]:
            parts.absorb(self.pending)
        self.pending = None
        if self.row_ends[sample_of_row[-1]] > stop:  # the last sample goes on in the next chunk
            parts, self.pending = parts.split(len(parts.samples) - 1)
        self._finish(parts)

    def _sample_parts(self, rows: torch.Tensor, feats: torch.Tensor, vals: torch.Tensor, patch: torch.Tensor,
                     text: torch.Tensor, sample_of_row: torch.Tensor) -> _SampleParts:
        """Per-sample aggregates of the chunk's active entries (rows, feats, vals); patch [c] and text [c] mark
        the chunk's image-patch and text rows."""
        local = sample_of_row - sample_of_row[0]
        m, d = int(local[-1]) + 1, self.d
        cell = feats * m + local[rows]  # flat index into [d, m]
        on_patch, on_text = patch[rows], text[rows]
        mx, total, any_max, text_mx, text_total = torch.zeros(5, d * m, device=self.device)
        mx.scatter_reduce_(0, cell[on_patch], vals[on_patch], "amax")
        total.index_add_(0, cell[on_patch], vals[on_patch])
        any_max.scatter_reduce_(0, cell, vals, "amax")
        text_mx.scatter_reduce_(0, cell[on_text], vals[on_text], "amax")
        text_total.index_add_(0, cell[on_text], vals[on_text])
        return _SampleParts(sample_of_row[0] + torch.arange(m, device=self.device), mx.view(d, m), total.view(d, m),
                           torch.bincount(local[patch], minlength=m), any_max.view(d, m), text_mx.view(d, m),
                           text_total.view(d, m), torch.bincount(local[text], minlength=m))

    def _finish(self, parts: _SampleParts) -> None:
        """Offer complete samples to the selections."""
        if not len(parts.samples):
            return
        mean = parts.sum / parts.count.clamp_min(1)
        active = parts.max > 0
        values = {"max": parts.max, "mean": mean}
        for by, sel in self.top.items():
            sel.update(values[by].masked_fill(~active, float("-inf")), parts.samples, values)
        keys = random_keys(parts.samples, self.d, self.cfg.seed)
        self.reservoir.update(keys.masked_fill(~active, _NO_KEY), parts.samples, values)
        negative = (parts.any_max == 0) & (parts.count > 0)
        self.negatives.update(keys.masked_fill(~negative, _NO_KEY), parts.samples, {})
        if not bool((parts.text_count > 0).any()):
            return
        text_values = {"max": parts.text_max, "mean": parts.text_sum / parts.text_count.clamp_min(1)}
        text_active = parts.text_max > 0
        self.top_text.update(parts.text_max.masked_fill(~text_active, float("-inf")), parts.samples, text_values)
        text_keys = random_keys(parts.samples, self.d, self.cfg.seed + 1)  # another stream than the image lists
        self.reservoir_text.update(text_keys.masked_fill(~text_active, _NO_KEY), parts.samples, text_values)
        text_negative = (parts.text_max == 0) & (parts.text_count > 0)
        self.negatives_text.update(text_keys.masked_fill(~text_negative, _NO_KEY), parts.samples, {})

    def close(self) -> None:
        if self.pending is not None:
            self._finish(self.pending)
            self.pending = None


@torch.no_grad()
def compute_features(cfg: FeaturesConfig) -> Path:
    """Stream the run's cache through its SAE and write RUN/features.h5 (via a temp file and rename)."""
    from tqdm import tqdm

    from interp.cache.reader import ActivationReader
    from interp.infra.runinfo import versions
    from saes.sae import SAE

    layout = RunLayout.of(cfg.run)
    out = layout.features
    device = resolve_device(cfg.device)
    sha = sae_fingerprint(layout.sae)
    sae = SAE.load(layout.sae, device=str(device))
    d = sae.cfg.d_sae
    with ActivationReader(layout.cache) as reader:
        sae.check_width(torch.zeros(1, reader.d))
        roles = torch.from_numpy(np.ascontiguousarray(reader.tokens["role"]))
        if not is_image_patch(roles).any():
            raise ValueError(f"{layout.cache} holds no image-patch rows: feature statistics rank samples by their "
                             "patch tokens; cache with --roles image_patch[,text]")
        samples = reader.samples_table  # copied into features.h5, which indexes it
        ends = reader.row_ends()
        chunk = chunk_rows_for(d, cfg.max_chunk_elements, cfg.chunk_rows)
        acc = _Accumulator(d, cfg, ends, device)
        bar = tqdm(total=reader.n_rows, desc=f"features of {d}", unit="row", mininterval=1,
                   disable=not cfg.progress)
        accumulate(reader, sae, acc, chunk, roles, device, bar)
        bar.close()
        acc.close()
        has_text = bool((~is_image(roles)).any())
        n_image_rows, n_text_rows = int(is_image(roles).sum()), int(is_text(roles).sum())
        identity = cache_identity(reader.meta)
        attrs = {"format": FORMAT, "d_sae": d, "top_samples": cfg.top_samples, "rank_by": cfg.rank_by,
                 "reservoir": cfg.reservoir, "negatives": cfg.negatives, "seed": cfg.seed, "n_rows": reader.n_rows,
                 "n_samples": len(samples), "has_text_rows": has_text, "n_image_rows": n_image_rows,
                 "n_text_rows": n_text_rows, "modality_share": cfg.modality_share,
                 "modality_peak": cfg.modality_peak, "chunk_rows": chunk,
                 "quantile_levels": json.dumps(cfg.quantile_levels),
                 "sae_path": str(layout.sae), "sae_cfg": json.dumps(sae.cfg.to_dict(), default=str),
                 "sae_sha256": sha, "cache_path": str(layout.cache),
                 "cache_identity": json.dumps(identity, default=str), "cache_fingerprint": cache_fingerprint(identity),
                 "versions": json.dumps(versions()), "argv": json.dumps(sys.argv),
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "note": "" if has_text else "the cache holds no text rows: image_share is 1.0 by construction"}
        _write(out, acc, samples, reader.n_rows, has_text, attrs, (n_image_rows, n_text_rows))
    return out


def accumulate(reader, sae, acc: _Accumulator, chunk: int, roles: torch.Tensor, device: torch.device,
               bar=None) -> None:
    """The pass itself: every row of `reader`, in chunks of `chunk` rows, encoded and added to `acc`."""
    buf = None
    if sae.arch.entries_scratch and device.type == "cpu":  # one [chunk, d_sae] scratch block for every chunk
        buf = torch.empty(min(chunk, max(reader.n_rows, 1)), sae.cfg.d_sae, dtype=sae.dtype)
    with torch.no_grad():
        for start, x in reader.iter_sequential(chunk):
            x = x.to(device=device, dtype=sae.dtype)
            chunk_roles = roles[start: start + len(x)].to(device)
            entries = sae.arch.active_entries(sae, x, buf)
            if entries is None:
                acc.add(start, sae.encode(x).float(), chunk_roles)
            else:
                acc.add_entries(start, len(x), *entries, chunk_roles)
            if bar is not None:
                bar.update(len(x))


def modality_codes(image_total: torch.Tensor, text_total: torch.Tensor, max_image: torch.Tensor,
                   max_text: torch.Tensor, share: float, peak: float) -> torch.Tensor:
    """[d] codes into MODALITIES: dead (never fires), image (less than `share` of its activation mass on text
    rows, or its max there below `peak` of its max: a TopK feature fires a little on anything), text (the
    same the other way round), both."""
    total = image_total + text_total
    on_text = text_total / total.clamp_min(1e-30)
    top = torch.maximum(max_image, max_text)
    code = torch.full(total.shape, MODALITIES.index("both"), dtype=torch.uint8, device=total.device)
    code[(on_text > 1 - share) | (max_image < peak * top)] = MODALITIES.index("text")
    code[(on_text < share) | (max_text < peak * top)] = MODALITIES.index("image")
    code[total <= 0] = MODALITIES.index("dead")
    return code


def _write(out: Path, acc: _Accumulator, samples: np.ndarray, n_rows: int, has_text: bool, attrs: dict,
           modality_rows: tuple[int, int] = (0, 0)) -> None:
    n = acc.n_active.double()
    dead = acc.n_active == 0
    share = (acc.image_total / acc.total) if has_text else torch.ones_like(acc.total)
    n_image_rows, n_text_rows = modality_rows
    stats = {"density": n / max(n_rows, 1), "n_active": acc.n_active, "max": acc.max,
             "mean": acc.total / max(n_rows, 1),
             "mean_active": torch.where(dead, 0.0, acc.total / n.clamp_min(1)),
             "image_share": share.masked_fill(dead, float("nan")),
             "density_image": acc.n_active_image.double() / max(n_image_rows, 1),
             "density_text": acc.n_active_text.double() / max(n_text_rows, 1),
             "n_active_image": acc.n_active_image, "n_active_text": acc.n_active_text,
             "max_image": acc.max_image, "max_text": acc.max_text,
             "modality": modality_codes(acc.image_total, acc.text_total, acc.max_image, acc.max_text,
                                        acc.cfg.modality_share, acc.cfg.modality_peak)}
    block = max(1, (1 << 22) // acc.cfg.bins)  # quantiles in feature blocks: the cumsums stay small
    quantiles = torch.cat([hist_quantiles(acc.hist[i: i + block], acc.edges, acc.max[i: i + block],
                                          acc.cfg.quantile_levels) for i in range(0, acc.d, block)])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with h5py.File(tmp, "w") as f:
            for name, v in stats.items():
                dtype = {"n_active": np.int64, "n_active_image": np.int64, "n_active_text": np.int64,
                         "modality": np.uint8}.get(name, np.float32)
                f.create_dataset(f"stats/{name}", data=v.cpu().numpy().astype(dtype))
            _put(f, "stats/quantiles", quantiles.cpu().numpy())
            _put(f, "stats/histogram", acc.hist.cpu().numpy())
            f.create_dataset("stats/hist_edges", data=acc.edges.cpu().numpy())
            groups = {f"top_{by}": sel for by, sel in acc.top.items()}
            groups.update(reservoir=acc.reservoir, negatives=acc.negatives, top_text=acc.top_text,
                          reservoir_text=acc.reservoir_text, negatives_text=acc.negatives_text)
            for group, sel in groups.items():
                _put(f, f"{group}/sample", sel.sample.cpu().numpy().astype(np.int32))
                for name, v in sel.payload.items():
                    _put(f, f"{group}/{name}", v.cpu().numpy().astype(np.float32))
            f.create_dataset("samples", data=samples)
            rows = acc.row_stats.stats()  # explain.feature_columns: one feature's activations from its column
            f.create_dataset("rows/n_active", data=rows.n_active, chunks=(min(max(n_rows, 1), 1 << 16),))
            f.create_dataset("rows/min_active", data=rows.min_active, chunks=(min(max(n_rows, 1), 1 << 16),))
            f.attrs.update(attrs)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    publish(tmp, out)


def _put(f: h5py.File, name: str, arr: np.ndarray) -> None:
    """A [d_sae, ...] dataset chunked by feature blocks (one feature reads one small chunk), compressed."""
    f.create_dataset(name, data=arr, chunks=(min(len(arr), 256), *arr.shape[1:]), compression="gzip",
                     compression_opts=1)


def _report(out: Path, cfg: FeaturesConfig) -> None:
    from explain.feature_reader import FeatureReader

    with FeatureReader(out) as fs:
        density = fs.summary_table()["density"]
    print(f"{out}: {fs.d_sae} features over {fs.meta['n_rows']} rows of {fs.meta['n_samples']} samples; "
          f"dead {(density == 0).mean():.1%}, median density of the live ones "
          f"{np.median(density[density > 0]) if (density > 0).any() else 0:.2e}")


COMMANDS = [Command("features", FeaturesConfig, compute_features,
                    "per-feature statistics and example samples of the run's SAE over its cache", report=_report)]
