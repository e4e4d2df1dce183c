"""Sharded activation caches: many HDF5 shard files read as one cache, so a terabyte cache is never one file.

A sharded cache is an index file where a single-file cache would be (e.g. RUN/activations.h5)
next to a directory of shards. Each shard is a complete cache in its own right (the same
format and attributes, its own token and samples tables, readable alone by ActivationReader).
The index holds:

  /activations  [N, d]  an HDF5 *virtual dataset* mapping, in order, onto every shard's
                        /activations (paths relative to the index, so the run directory can move)
  /tokens       [N]     the shards' token tables, `sample` renumbered to the index's samples table
  /samples      [S]     the shards' samples tables, `row_start` renumbered to the index's rows
  attrs                 the cache's attributes, plus `shards`: JSON [{file, rows, samples}] in order

So `interp.cache.reader.ActivationReader` opens the index like any cache, and every stage reads
a sharded cache without knowing it. Only the activations (all but a few bytes per row) stay in
the shards; the index costs ~40 bytes per row. A missing or truncated shard reads as NaN
(the virtual dataset's fill value), which the trainer's finite check refuses; `check_shards`
names the missing file. Shards are written and renamed into place before the index, and the
index last (fsynced, then renamed), so a crash never leaves an index pointing at half a shard.

`finish_shards` has the signature of the writer's merge step: a writer that calls it instead of
merging keeps its crash-safe part files as the shards (no copy of the activations at all).
`shard_cache` splits an existing single-file cache.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import h5py
import numpy as np

from interp.cache.format import FORMAT, READABLE_FORMATS, SAMPLE_DTYPE, TOKEN_DTYPE
from interp.infra.durable import fsync_path, publish

SHARDS_ATTR = "shards"
SHARD_ATTR = "shard"  # in each shard: its position in the index


class ShardError(ValueError):
    """A sharded cache whose shards are missing, truncated or do not fit together."""


def _fsync(path: Path) -> None:
    fsync_path(path)


def is_sharded(path: str | Path) -> bool:
    """Whether `path` is the index of a sharded cache."""
    try:
        with h5py.File(path, "r") as f:
            return SHARDS_ATTR in f.attrs and "activations" in f and f["activations"].is_virtual
    except (OSError, KeyError):
        return False


def shard_files(index: str | Path) -> list[dict]:
    """[{file (absolute Path), rows, samples}] of a sharded cache's index, in order."""
    index = Path(index)
    with h5py.File(index, "r") as f:
        if SHARDS_ATTR not in f.attrs:
            raise ShardError(f"{index} is not a sharded cache index (no {SHARDS_ATTR!r} attribute)")
        entries = json.loads(f.attrs[SHARDS_ATTR])
    return [{**e, "file": index.parent / e["file"]} for e in entries]


def check_shards(index: str | Path) -> None:
    """Every shard is there, readable, and holds the rows and width the index maps (one clear error)."""
    index = Path(index)
    with h5py.File(index, "r") as f:
        d = int(f["activations"].shape[1])
    for e in shard_files(index):
        path = e["file"]
        if not path.exists():
            raise ShardError(f"{index}: shard {path} is missing (the cache reads NaN there); restore it or rebuild "
                             "the cache")
        try:
            with h5py.File(path, "r") as g:
                shape = tuple(g["activations"].shape)
        except (OSError, KeyError) as err:
            raise ShardError(f"{index}: shard {path} is not a readable cache ({err}); restore it or rebuild "
                             "the cache") from None
        if shape != (e["rows"], d):
            raise ShardError(f"{index}: shard {path} holds {shape[0]} x {shape[1]} activations, the index maps "
                             f"{e['rows']} x {d}; it was replaced after indexing: rebuild the index (write_index)")


def _finish_shard(path: Path, attrs: dict, position: int) -> tuple[int, int, int, list]:
    """Make one part file a self-contained cache (local row_start, the cache's attributes); idempotent.
    Returns (rows, samples, d, skipped)."""
    with h5py.File(path, "r+") as f:
        sm = f["samples"][:]
        sm["row_start"] = np.cumsum(sm["n_rows"]) - sm["n_rows"]  # rows are sample-major within a part
        f["samples"][...] = sm
        rows, d = f["activations"].shape if f["activations"].ndim == 2 else (0, 0)
        skipped = json.loads(f.attrs.get("skipped", "[]"))
        for k, v in attrs.items():
            f.attrs[k] = v
        f.attrs.update({"d": d, "n_rows": rows, "n_samples": len(sm), SHARD_ATTR: position,
                        "skipped": json.dumps(skipped)})
    _fsync(path)
    return int(rows), len(sm), int(d), skipped


def write_index(shards: list[Path], index: Path, attrs: dict) -> Path:
    """Write the index of `shards` (complete caches, in order) at `index`: a virtual activations dataset
    over them and the renumbered token and samples tables (temp file, fsync, rename)."""
    index = Path(index)
    sizes = []
    for path in shards:
        with h5py.File(path, "r") as f:
            a = f["activations"]
            sizes.append((int(a.shape[0]) if a.ndim == 2 else 0, int(a.shape[1]) if a.ndim == 2 else 0,
                          a.dtype, int(f["samples"].shape[0])))
    widths = {d for n, d, _, _ in sizes if n}
    if len(widths) > 1:
        raise ShardError(f"shards of different widths {sorted(widths)} cannot form one cache")
    d = widths.pop() if widths else 0
    dtypes = {str(dt) for n, _, dt, _ in sizes if n}
    dtype = np.dtype(dtypes.pop() if len(dtypes) == 1 else json.loads(attrs.get("dtype", '"float16"')))
    n_rows, n_samples = sum(s[0] for s in sizes), sum(s[3] for s in sizes)
    layout = h5py.VirtualLayout(shape=(n_rows, d), dtype=dtype)
    entries, r = [], 0
    for path, (n, _, _, ns) in zip(shards, sizes):
        rel = os.path.relpath(path, index.parent)
        if n:
            layout[r: r + n] = h5py.VirtualSource(rel, "activations", shape=(n, d))
        entries.append({"file": rel, "rows": n, "samples": ns})
        r += n
    tmp = index.with_name(index.name + ".tmp")
    with h5py.File(tmp, "w", libver="latest") as g:
        g.create_virtual_dataset("activations", layout, fillvalue=np.nan)
        toks = g.create_dataset("tokens", (n_rows,), dtype=TOKEN_DTYPE)
        samp = g.create_dataset("samples", (n_samples,), dtype=SAMPLE_DTYPE)
        r = s = 0
        skipped = []
        for path in shards:
            with h5py.File(path, "r") as f:
                t, sm = f["tokens"][:], f["samples"][:]
                skipped += json.loads(f.attrs.get("skipped", "[]"))
            t["sample"] += s
            toks[r: r + len(t)] = t
            sm["row_start"] = r + np.cumsum(sm["n_rows"]) - sm["n_rows"]
            samp[s: s + len(sm)] = sm
            r += len(t)
            s += len(sm)
        for k, v in attrs.items():
            g.attrs[k] = v
        g.attrs.update({"format": FORMAT, "d": d, "n_rows": n_rows, "n_samples": n_samples,
                        "skipped": json.dumps(skipped), SHARDS_ATTR: json.dumps(entries)})
    publish(tmp, index)
    return index


def finish_shards(parts_dir: Path, n_parts: int, out: Path, attrs: dict) -> Path:
    """The writer's last step for a sharded cache (instead of merging): every part file of `parts_dir`
    becomes a shard in place, and the index is written at `out`. Nothing is copied; re-running after a
    crash redoes the same, idempotent steps."""
    parts = [Path(parts_dir) / f"part-{p:06d}.h5" for p in range(n_parts)]
    missing = [p for p in parts if not p.exists()]
    if missing:
        raise ShardError(f"{parts_dir}: parts {[p.name for p in missing[:5]]} are missing; re-run the cache to "
                         "write them")
    skipped = []
    for i, path in enumerate(parts):
        skipped += _finish_shard(path, attrs, i)[3]
    write_index(parts, Path(out), attrs)
    if skipped:
        print(f"skipped {len(skipped)} unreadable image(s), e.g. {skipped[0]['image_ref']}: {skipped[0]['error']}")
    return Path(out)


def shard_cache(cache: str | Path, out: str | Path, samples_per_shard: int) -> Path:
    """Split a cache (a single file, or a sharded cache's index: re-sharding) into shards of `samples_per_shard`
    samples (in `<out>.shards/`) and index them at `out`. The original is left as it is."""
    from interp.cache.reader import CacheError

    cache, out = Path(cache), Path(out)
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be at least 1, got {samples_per_shard}")
    if out.resolve() == cache.resolve():
        raise ValueError(f"write the sharded cache to another path than {cache}")
    shard_dir = out.with_name(out.name + ".shards")
    shard_dir.mkdir(parents=True, exist_ok=True)
    try:
        f = h5py.File(cache, "r")
    except OSError as e:
        raise CacheError(f"{cache} is not a readable HDF5 file ({e})") from None
    with f:
        if f.attrs.get("format") not in READABLE_FORMATS:
            raise CacheError(f"{cache} is not an lmmscope activation cache (format {f.attrs.get('format')!r})")
        attrs = {k: v for k, v in f.attrs.items() if k not in (SHARDS_ATTR, "d", "n_rows", "n_samples", "skipped")}
        skipped = f.attrs.get("skipped", "[]")  # kept with the first shard, so the index reports them too
        samples, tokens, acts = f["samples"][:], f["tokens"], f["activations"]
        paths = []
        for i, s0 in enumerate(range(0, len(samples), samples_per_shard)):
            sm = samples[s0: s0 + samples_per_shard].copy()
            r0, r1 = int(sm["row_start"][0]), int(sm["row_start"][-1] + sm["n_rows"][-1])
            t = tokens[r0:r1]
            t["sample"] -= s0
            sm["row_start"] -= r0
            path = shard_dir / f"shard-{i:06d}.h5"
            tmp = path.with_name(path.name + ".tmp")
            with h5py.File(tmp, "w") as g:
                # contiguous, as the writer's parts are: chunks of 4,096 rows would allocate a whole last chunk
                # (5,760 rows of LLaVA-NeXT took 8,192 rows of space, +42 %)
                g.create_dataset("activations", data=acts[r0:r1])
                g.create_dataset("tokens", data=t)
                g.create_dataset("samples", data=sm)
                for k, v in attrs.items():
                    g.attrs[k] = v
                g.attrs.update({"d": acts.shape[1], "n_rows": r1 - r0, "n_samples": len(sm), SHARD_ATTR: i,
                                "skipped": skipped if i == 0 else "[]"})
            publish(tmp, path)
            paths.append(path)
    return write_index(paths, out, attrs)
