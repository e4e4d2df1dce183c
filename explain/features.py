"""`interp features`: per-feature statistics and example images of an SAE over an activation cache.

    interp features --cache acts.h5 --sae runs/sae/sae --out runs/features.h5 [--rank-by max|mean]

One streaming pass: the cache is read in chunks, each chunk encoded by the SAE, and per-feature
state updated. Memory is O(d_sae * (k + reservoir + negatives + bins)) plus one dense encoded
chunk of at most `max_chunk_elements` rows * d_sae, whatever the number of rows or images; no
[rows, d_sae] or [images, d_sae] array is ever built. An image's rows may straddle chunks: its
partial per-image aggregates are carried into the next chunk.

Per-feature example lists are running selections of [d_sae, size] arrays, merged per chunk with
`topk` over only the features that have a candidate better than their current worst entry:
top images by max and by mean, a uniform random sample ("reservoir") of activating images
(the smallest values of a fixed hash of (image, feature), so the sample does not depend on the
chunking), and random non-activating images (the same hash over images with zero activation).

An "image" is a row of the cache's samples table; its value is the max (or mean) of the
feature over its image-patch rows. Per-token activations of the top images are not stored
(d_sae * k * tokens floats); `FeatureSources.token_activations` re-encodes one image's rows.

features.h5 (format "lmmscope.features/1"):
  /stats/density, max, mean, mean_active, image_share  [d_sae] float32
  /stats/n_active                                      [d_sae] int64
  /stats/quantiles    [d_sae, L] float32  active-value quantiles at attrs quantile_levels
  /stats/histogram    [d_sae, bins] int32 active values per log-spaced bin
  /stats/hist_edges   [bins + 1] float64  bin edges, 0 ... inf
  /top_max/{image,max,mean}, /top_mean/{image,max,mean}   [d_sae, k]   best first
  /reservoir/{image,max,mean}                             [d_sae, reservoir]
  /negatives/image                                        [d_sae, negatives]
  /samples            the cache's samples table; every `image` above is a row of it (-1: empty slot)
  attrs: format, d_sae, k, rank_by, reservoir, negatives, seed, n_rows, n_images, has_text_rows,
         chunk_rows, quantile_levels, sae_path, sae_cfg, sae_sha256, cache_path, cache_identity,
         cache_fingerprint, versions, argv, created, note
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from explain.feature_reader import (DEFAULT_CHUNK_ELEMENTS, FORMAT, RANKINGS, cache_fingerprint, cache_identity,
                                    chunk_rows_for, sae_fingerprint)

_M32 = 0xFFFFFFFF
_NO_KEY = 1 << 40  # larger than any 32-bit hash: an entry that cannot be selected


@dataclass
class FeaturesConfig:
    k: int = 20  # top images per feature, for each ranking
    rank_by: str = "max"  # the default ranking recorded in the file (both are stored)
    reservoir: int = 40  # uniform sample of activating images per feature, for quantile bands
    negatives: int = 20  # random non-activating images per feature
    bins: int = 256  # log-spaced histogram bins of the active values
    hist_range: tuple[float, float] = (1e-4, 1e4)  # below/above go to the first/last bin
    quantile_levels: tuple[float, ...] = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)
    chunk_rows: int | None = None  # at most this many rows per chunk (always also within max_chunk_elements)
    max_chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    seed: int = 0  # of the random reservoir and negatives
    device: str = "cpu"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.rank_by not in RANKINGS:
            raise ValueError(f"--rank-by must be one of {', '.join(RANKINGS)}, got {self.rank_by!r}")
        for name in ("k", "reservoir", "negatives", "bins"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.hist_range[0] < self.hist_range[1]:
            raise ValueError(f"hist_range must be 0 < low < high, got {self.hist_range}")


@dataclass
class _Selection:
    """Per feature, the `size` best (key, image) pairs so far, sorted best first, with payloads."""

    key: torch.Tensor  # [d, size]
    image: torch.Tensor  # [d, size] int64, -1 = empty
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

    def update(self, key: torch.Tensor, images: torch.Tensor, payload: dict[str, torch.Tensor]) -> None:
        """Merge candidates key [d, m] of `images` [m] (payloads [d, m]); `empty_key` marks non-candidates."""
        worst = self.key[:, -1:]
        better = key > worst if self.largest else key < worst
        cols = better.any(1).nonzero().squeeze(1)  # the features with a candidate: only they are merged
        if not len(cols):
            return
        keys = torch.cat([self.key[cols], key[cols]], 1)
        pick = keys.topk(self.key.shape[1], dim=1, largest=self.largest, sorted=True).indices
        self.key[cols] = new_key = keys.gather(1, pick)
        cand_images = images[None, :].expand(len(cols), -1)
        image = torch.cat([self.image[cols], cand_images], 1).gather(1, pick)
        self.image[cols] = image.masked_fill(new_key == self.empty_key, -1)
        for name, old in self.payload.items():
            old[cols] = torch.cat([old[cols], payload[name][cols]], 1).gather(1, pick)


@dataclass
class _ImageParts:
    """Per-image aggregates of a run of consecutive images (possibly partial at a chunk edge),
    feature-major so that merging a feature's candidates reads one contiguous row."""

    images: torch.Tensor  # [m] rows of the samples table
    max: torch.Tensor  # [d, m] over image-patch rows
    sum: torch.Tensor  # [d, m] over image-patch rows
    count: torch.Tensor  # [m] image-patch rows
    any_max: torch.Tensor  # [d, m] over all rows (image and text): zero means a clean negative

    def split(self, i: int) -> tuple[_ImageParts, _ImageParts]:
        return (_ImageParts(self.images[:i], self.max[:, :i], self.sum[:, :i], self.count[:i], self.any_max[:, :i]),
                _ImageParts(self.images[i:], self.max[:, i:], self.sum[:, i:], self.count[i:], self.any_max[:, i:]))

    def absorb(self, earlier: _ImageParts) -> None:
        """Add the rows of the same first image seen in an earlier chunk."""
        self.max[:, 0] = torch.maximum(self.max[:, 0], earlier.max[:, 0])
        self.sum[:, 0] += earlier.sum[:, 0]
        self.count[0] += earlier.count[0]
        self.any_max[:, 0] = torch.maximum(self.any_max[:, 0], earlier.any_max[:, 0])


def random_keys(images: torch.Tensor, d: int, seed: int) -> torch.Tensor:
    """A fixed pseudo-random 32-bit key per (feature, image) [d, m]: the smallest keys of a set are a
    uniform random sample of it, independent of the order and chunking the images come in."""
    feats = torch.arange(d, device=images.device)
    x = ((feats[:, None] * 0x85EBCA77) & _M32) + ((images[None, :] * 0x9E3779B1) & _M32) + seed * 0x3C6EF372
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
        """row_ends: [images] the end row of each image (rows are sample-major)."""
        self.d, self.cfg, self.row_ends, self.device = d, cfg, row_ends, device
        inner = np.logspace(*np.log10(cfg.hist_range), cfg.bins - 1)
        self.edges = torch.tensor(np.concatenate([[0.0], inner, [np.inf]]), device=device)
        self.inner_edges = self.edges[1:-1].float()
        self.n_active = torch.zeros(d, dtype=torch.int64, device=device)
        self.total = torch.zeros(d, dtype=torch.float64, device=device)
        self.image_total = torch.zeros(d, dtype=torch.float64, device=device)
        self.max = torch.zeros(d, device=device)
        self.hist = torch.zeros(d, cfg.bins, dtype=torch.int32, device=device)
        self.top = {by: _Selection.new(d, cfg.k, True, RANKINGS, device) for by in RANKINGS}
        self.reservoir = _Selection.new(d, cfg.reservoir, False, RANKINGS, device)
        self.negatives = _Selection.new(d, cfg.negatives, False, (), device)
        self.pending: _ImageParts | None = None  # an image whose rows go on in the next chunk

    def add(self, start: int, acts: torch.Tensor, roles: torch.Tensor) -> None:
        """acts [c, d] of rows [start, start + c); roles [c] their token role codes. Past finding the
        active entries, everything costs O(active entries) or O(images in the chunk * d)."""
        rows, feats = (acts > 0).nonzero().T
        self.add_entries(start, len(acts), rows, feats, acts[rows, feats], roles)

    def add_entries(self, start: int, n: int, rows: torch.Tensor, feats: torch.Tensor, vals: torch.Tensor,
                    roles: torch.Tensor) -> None:
        """The active entries (chunk row, feature, value > 0) of rows [start, start + n), in the order of
        `(acts > 0).nonzero()`; roles [n] the rows' token role codes."""
        from interp.model.token_map import ROLE

        vals = vals.float()
        self.n_active += torch.bincount(feats, minlength=self.d)
        self.total.index_add_(0, feats, vals.double())
        on_image = roles[rows] <= ROLE["image_special"]  # image_patch or image_special
        self.image_total.index_add_(0, feats[on_image], vals[on_image].double())
        self.max.scatter_reduce_(0, feats, vals, "amax")
        bins = torch.bucketize(vals, self.inner_edges, right=True)
        self.hist.view(-1).index_add_(0, feats * self.cfg.bins + bins,
                                      torch.ones(len(bins), dtype=torch.int32, device=self.device))

        stop = start + n
        image_of_row = np.searchsorted(self.row_ends, np.arange(start, stop), side="right")
        parts = self._image_parts(rows, feats, vals, roles == ROLE["image_patch"],
                                  torch.from_numpy(image_of_row).to(self.device))
        if self.pending is not None and self.pending.images[0] == parts.images[0]:
            parts.absorb(self.pending)
        self.pending = None
        if self.row_ends[image_of_row[-1]] > stop:  # the last image goes on in the next chunk
            parts, self.pending = parts.split(len(parts.images) - 1)
        self._finish(parts)

    def _image_parts(self, rows: torch.Tensor, feats: torch.Tensor, vals: torch.Tensor, patch: torch.Tensor,
                     image_of_row: torch.Tensor) -> _ImageParts:
        """Per-image aggregates of the chunk's active entries (rows, feats, vals); patch [c] marks patch rows."""
        local = image_of_row - image_of_row[0]
        m, d = int(local[-1]) + 1, self.d
        cell = feats * m + local[rows]  # flat index into [d, m]
        on_patch = patch[rows]
        mx, total, any_max = torch.zeros(3, d * m, device=self.device)
        mx.scatter_reduce_(0, cell[on_patch], vals[on_patch], "amax")
        total.index_add_(0, cell[on_patch], vals[on_patch])
        any_max.scatter_reduce_(0, cell, vals, "amax")
        return _ImageParts(image_of_row[0] + torch.arange(m, device=self.device), mx.view(d, m), total.view(d, m),
                           torch.bincount(local[patch], minlength=m), any_max.view(d, m))

    def _finish(self, parts: _ImageParts) -> None:
        """Offer complete images to the selections."""
        if not len(parts.images):
            return
        mean = parts.sum / parts.count.clamp_min(1)
        active = parts.max > 0
        values = {"max": parts.max, "mean": mean}
        for by, sel in self.top.items():
            sel.update(values[by].masked_fill(~active, float("-inf")), parts.images, values)
        keys = random_keys(parts.images, self.d, self.cfg.seed)
        self.reservoir.update(keys.masked_fill(~active, _NO_KEY), parts.images, values)
        negative = (parts.any_max == 0) & (parts.count > 0)
        self.negatives.update(keys.masked_fill(~negative, _NO_KEY), parts.images, {})

    def close(self) -> None:
        if self.pending is not None:
            self._finish(self.pending)
            self.pending = None


@torch.no_grad()
def encode_entries(sae, x: torch.Tensor, buf: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The active entries (row, feature, value) of `sae.encode(x)`, bit-identical and in the order of
    `(acts > 0).nonzero()`, without building the dense [rows, d_sae] activations, for a TopK SAE whose
    normalisation is folded (every saved SAE). None for other SAEs: the caller encodes densely.

    What it saves over encode + nonzero: a fresh [rows, d_sae] tensor for the bias sum (added in
    place into `buf`, reused between chunks), the dense zero-and-scatter, and the scan for nonzeros;
    what is left is the encoder matmul and the top-k."""
    cfg = sae.cfg
    if cfg.arch != "topk" or sae._normalised() or x.dtype != sae.dtype:
        return None
    sae_in = x - sae.b_dec if cfg.apply_b_dec_to_input else x
    pre = torch.matmul(sae_in, sae.W_enc, out=buf[: len(x)] if buf is not None else None)
    pre += sae.b_enc  # the same two roundings as SAE.pre_acts: (x - b_dec) @ W_enc, then + b_enc
    vals, idx = pre.topk(cfg.k, dim=-1, sorted=False)
    idx, order = idx.sort(dim=1)
    vals = vals.gather(1, order)
    keep = vals > 0
    rows = torch.arange(len(x), device=x.device)[:, None].expand_as(idx)[keep]
    return rows, idx[keep], vals[keep]


def compute_features(cache: str | Path, sae_dir: str | Path, out: str | Path,
                     cfg: FeaturesConfig | None = None) -> Path:
    """Stream the cache through the SAE and write features.h5 at `out` (via a temp file and rename)."""
    from tqdm import tqdm

    from interp.cache.reader import ActivationReader
    from interp.infra.runinfo import versions
    from interp.model.token_map import ROLE
    from saes.sae import SAE

    cfg = cfg or FeaturesConfig()
    out = Path(out)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if cfg.device == "auto" else cfg.device)
    sha = sae_fingerprint(sae_dir)
    sae = SAE.load(sae_dir, device=str(device))
    d = sae.cfg.d_sae
    with ActivationReader(cache) as reader:
        sae.check_width(torch.zeros(1, reader.d))
        roles = torch.from_numpy(np.ascontiguousarray(reader.tokens["role"]))
        if not (roles == ROLE["image_patch"]).any():
            raise ValueError(f"{cache} holds no image-patch rows: feature statistics rank images by their patch "
                             "tokens; cache with --roles image_patch[,text]")
        samples = reader.samples
        ends = np.cumsum(samples["n_rows"])
        if ends[-1] != reader.n_rows or (samples["row_start"] != ends - samples["n_rows"]).any():
            raise ValueError(f"{cache}: the samples table does not tile the rows in order; rebuild the cache")
        chunk = chunk_rows_for(d, cfg.max_chunk_elements, cfg.chunk_rows)
        acc = _Accumulator(d, cfg, ends, device)
        bar = tqdm(total=reader.n_rows, desc=f"features of {d} latents", unit="row", mininterval=1,
                   disable=not cfg.progress)
        accumulate(reader, sae, acc, chunk, roles, device, bar)
        bar.close()
        acc.close()
        has_text = bool((roles > ROLE["image_special"]).any())
        identity = cache_identity(reader.meta)
        attrs = {"format": FORMAT, "d_sae": d, "k": cfg.k, "rank_by": cfg.rank_by, "reservoir": cfg.reservoir,
                 "negatives": cfg.negatives, "seed": cfg.seed, "n_rows": reader.n_rows, "n_images": len(samples),
                 "has_text_rows": has_text, "chunk_rows": chunk, "quantile_levels": json.dumps(cfg.quantile_levels),
                 "sae_path": str(Path(sae_dir).resolve()), "sae_cfg": json.dumps(sae.cfg.to_dict(), default=str),
                 "sae_sha256": sha, "cache_path": str(Path(cache).resolve()),
                 "cache_identity": json.dumps(identity, default=str), "cache_fingerprint": cache_fingerprint(identity),
                 "versions": json.dumps(versions()), "argv": json.dumps(sys.argv),
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                 "note": "" if has_text else "the cache holds no text rows: image_share is 1.0 by construction"}
        _write(out, acc, samples, reader.n_rows, has_text, attrs)
    return out


def accumulate(reader, sae, acc: _Accumulator, chunk: int, roles: torch.Tensor, device: torch.device,
               bar=None) -> None:
    """The pass itself: every row of `reader`, in chunks of `chunk` rows, encoded and added to `acc`."""
    buf = None
    if sae.cfg.arch == "topk" and device.type == "cpu":  # one [chunk, d_sae] scratch block for every chunk
        buf = torch.empty(min(chunk, max(reader.n_rows, 1)), sae.cfg.d_sae, dtype=sae.dtype)
    with torch.no_grad():
        for start, x in reader.iter_sequential(chunk):
            x = x.to(device=device, dtype=sae.dtype)
            chunk_roles = roles[start: start + len(x)].to(device)
            entries = encode_entries(sae, x, buf)
            if entries is None:
                acc.add(start, sae.encode(x).float(), chunk_roles)
            else:
                acc.add_entries(start, len(x), *entries, chunk_roles)
            if bar is not None:
                bar.update(len(x))


def _write(out: Path, acc: _Accumulator, samples: np.ndarray, n_rows: int, has_text: bool, attrs: dict) -> None:
    n = acc.n_active.double()
    dead = acc.n_active == 0
    share = (acc.image_total / acc.total) if has_text else torch.ones_like(acc.total)
    stats = {"density": n / max(n_rows, 1), "n_active": acc.n_active, "max": acc.max,
             "mean": acc.total / max(n_rows, 1),
             "mean_active": torch.where(dead, 0.0, acc.total / n.clamp_min(1)),
             "image_share": share.masked_fill(dead, float("nan"))}
    block = max(1, (1 << 22) // acc.cfg.bins)  # quantiles in feature blocks: the cumsums stay small
    quantiles = torch.cat([hist_quantiles(acc.hist[i: i + block], acc.edges, acc.max[i: i + block],
                                          acc.cfg.quantile_levels) for i in range(0, acc.d, block)])
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        with h5py.File(tmp, "w") as f:
            for name, v in stats.items():
                dtype = np.int64 if name == "n_active" else np.float32
                f.create_dataset(f"stats/{name}", data=v.cpu().numpy().astype(dtype))
            _put(f, "stats/quantiles", quantiles.cpu().numpy())
            _put(f, "stats/histogram", acc.hist.cpu().numpy())
            f.create_dataset("stats/hist_edges", data=acc.edges.cpu().numpy())
            groups = {f"top_{by}": sel for by, sel in acc.top.items()}
            groups.update(reservoir=acc.reservoir, negatives=acc.negatives)
            for group, sel in groups.items():
                _put(f, f"{group}/image", sel.image.cpu().numpy().astype(np.int32))
                for name, v in sel.payload.items():
                    _put(f, f"{group}/{name}", v.cpu().numpy().astype(np.float32))
            f.create_dataset("samples", data=samples)
            f.attrs.update(attrs)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out)


def _put(f: h5py.File, name: str, arr: np.ndarray) -> None:
    """A [d_sae, ...] dataset chunked by feature blocks (one feature reads one small chunk), compressed."""
    f.create_dataset(name, data=arr, chunks=(min(len(arr), 256), *arr.shape[1:]), compression="gzip",
                     compression_opts=1)


def register(sub: argparse._SubParsersAction) -> None:
    d = FeaturesConfig()
    p = sub.add_parser("features", help="per-feature statistics and example images of an SAE over a cache",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       description="One streaming pass over the cache; memory stays bounded for any number "
                                   "of rows and features. Writes features.h5 (read with explain.feature_reader).")
    p.add_argument("--cache", required=True, help="activation cache written by `interp cache`")
    p.add_argument("--sae", required=True, help="SAE directory (SAELens format)")
    p.add_argument("--out", default=None, help="output file (default: SAE_DIR/features.h5)")
    p.add_argument("--k", type=int, default=d.k, help="top images per feature")
    p.add_argument("--rank-by", choices=RANKINGS, default=d.rank_by,
                   help="default ranking of an image: max or mean of the feature over its patch tokens (both stored)")
    p.add_argument("--reservoir", type=int, default=d.reservoir,
                   help="random activating images kept per feature, for quantile-band examples")
    p.add_argument("--negatives", type=int, default=d.negatives, help="random non-activating images per feature")
    p.add_argument("--bins", type=int, default=d.bins, help="log-spaced histogram bins (1e-4 .. 1e4) for quantiles")
    p.add_argument("--chunk-rows", type=int, default=None,
                   help=f"at most this many rows per chunk (never more than {d.max_chunk_elements} / d_sae)")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:N")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the random reservoir and negatives")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from explain.feature_reader import FeatureStats

    cfg = FeaturesConfig(k=args.k, rank_by=args.rank_by, reservoir=args.reservoir, negatives=args.negatives,
                         bins=args.bins, chunk_rows=args.chunk_rows, seed=args.seed, device=args.device,
                         progress=not args.no_progress)
    out = compute_features(args.cache, args.sae, args.out or Path(args.sae) / "features.h5", cfg)
    with FeatureStats(out) as fs:
        density = fs.summary_table()["density"]
    print(f"{out}: {fs.d_sae} features over {fs.meta['n_rows']} rows of {fs.meta['n_images']} images; "
          f"dead {(density == 0).mean():.1%}, median density of the live ones "
          f"{np.median(density[density > 0]) if (density > 0).any() else 0:.2e}")
    return 0
