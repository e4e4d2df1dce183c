"""The one reader of activation caches, used by every later stage.

Training needs shuffled batches, but random single-row reads from HDF5 run at a few MB/s.
So the reader shuffles at two levels: contiguous blocks in a random order fill a RAM buffer,
and rows are shuffled inside the buffer. Batch b is a pure function of (seed, b), so a
trainer resumed at batch b sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np
import torch

from interp.cache.format import FORMAT, IDENTITY_ATTRS, READABLE_FORMATS, RoleError, role_codes, text


class CacheError(ValueError):
    pass


@dataclass(frozen=True, eq=False)
class CachedSample:
    """One sample of a cache: where its rows are, what its tokens are, and what it showed the model."""

    index: int
    """row of the samples table"""
    source_index: int
    """the sample's number in its data source"""
    image_ref: str
    """`interp.cache.data.load_image(image_ref)` gives the image back ("" for a text-only sample)"""
    image_hash: str
    prompt: str
    """the user's text of the prompt"""
    width: int
    """of the original image (0 without one)"""
    height: int
    n_tokens: int
    """non-padding tokens of the model input"""
    start: int
    """its rows are [start, stop) of the reader (role-filtered readers count only their rows)"""
    stop: int
    tokens: np.ndarray = field(repr=False)
    """its token-table rows (format.TOKEN_DTYPE: position, role, image patch, pixel box)"""

    @property
    def n_rows(self) -> int:
        return self.stop - self.start

    @property
    def has_image(self) -> bool:
        return self.width > 0

    @property
    def positions(self) -> np.ndarray:
        """The token positions of its rows in the model input."""
        return self.tokens["position"]


class ActivationReader:
    def __init__(self, path: str | Path, roles: tuple[str, ...] | None = None, block_rows: int = 2048,
                 buffer_blocks: int = 64):
        """`roles` keeps only rows of those token roles (None: every cached row)."""
        self.path = Path(path)
        if not self.path.exists():
            raise CacheError(f"no activation cache at {self.path}: make one with `interp cache RUN` "
                             "(it writes RUN/activations.h5)")
        try:
            self._f = h5py.File(self.path, "r")
        except OSError as e:
            raise CacheError(f"{self.path} is not a readable HDF5 file ({e}); it may be truncated: "
                             f"re-run `interp cache` with the same arguments to rebuild it") from None
        if self._f.attrs.get("format") not in READABLE_FORMATS or "activations" not in self._f:
            raise CacheError(f"{self.path} is not an lmmscope activation cache (format {self._f.attrs.get('format')!r}, "
                             f"expected {FORMAT!r})")
        self._acts = self._f["activations"]
        self.d = int(self._acts.shape[1])
        self.block_rows, self.buffer_blocks = block_rows, buffer_blocks
        self.roles = roles
        if roles is None:
            self._rows = None
            self.n_rows = int(self._acts.shape[0])
        else:
            try:
                codes = role_codes(roles)
            except RoleError as e:
                raise CacheError(str(e)) from None
            self._rows = np.flatnonzero(np.isin(self._f["tokens"]["role"], codes))
            self.n_rows = len(self._rows)

    # ---------------------------------------------------------------- metadata

    @cached_property
    def meta(self) -> dict:
        out = {}
        for k, v in self._f.attrs.items():
            v = v.decode() if isinstance(v, bytes) else v
            if isinstance(v, str) and (k in IDENTITY_ATTRS or v[:1] in ('{', '[', '"')):  # JSON from the writer
                try:
                    v = json.loads(v)
                except json.JSONDecodeError:
                    pass
            out[k] = v.item() if isinstance(v, np.generic) else v
        return out

    @cached_property
    def tokens(self) -> np.ndarray:
        """The token table of the selected rows (structured array, see interp.cache.format.TOKEN_DTYPE)."""
        t = self._f["tokens"][:]
        return t if self._rows is None else t[self._rows]

    @cached_property
    def samples_table(self) -> np.ndarray:
        """The raw samples table (format.SAMPLE_DTYPE), for bulk use; `sample(i)` for one sample."""
        return self._f["samples"][:]

    @property
    def n_samples(self) -> int:
        return len(self.samples_table)

    @cached_property
    def image_refs(self) -> list[str]:
        """Every sample's image reference, decoded once."""
        return [text(v) for v in self.samples_table["image_ref"]]

    @cached_property
    def prompts(self) -> list[str]:
        return [text(v) for v in self.samples_table["prompt"]]

    @cached_property
    def _bounds(self) -> tuple[np.ndarray, np.ndarray]:
        """Every sample's [start, stop) in this reader's row numbering."""
        s = self.samples_table
        start, stop = s["row_start"].astype(np.int64), (s["row_start"] + s["n_rows"]).astype(np.int64)
        if self._rows is not None:
            start, stop = np.searchsorted(self._rows, start), np.searchsorted(self._rows, stop)
        return start, stop

    def sample(self, index: int) -> CachedSample:
        """One sample: its rows, tokens, image reference and prompt."""
        if not 0 <= int(index) < self.n_samples:
            raise CacheError(f"sample {index} is out of range: the cache has {self.n_samples} samples "
                             f"(valid indices 0..{self.n_samples - 1})")
        i = int(index)
        s = self.samples_table[i]
        start, stop = (int(b[i]) for b in self._bounds)
        return CachedSample(i, int(s["source_index"]), self.image_refs[i], text(s["image_hash"]), self.prompts[i],
                            int(s["width"]), int(s["height"]), int(s["n_tokens"]), start, stop,
                            self.tokens[start:stop])

    def iter_samples(self) -> Iterator[CachedSample]:
        for i in range(self.n_samples):
            yield self.sample(i)

    def sample_activations(self, index: int | CachedSample) -> torch.Tensor:
        """The float32 rows of one sample."""
        s = index if isinstance(index, CachedSample) else self.sample(index)
        return self.read(s.start, s.stop)

    @property
    def has_images(self) -> bool:
        """Whether any sample has an image (a text model's cache has none)."""
        return bool(self.n_samples) and int(self.samples_table["width"].max()) > 0

    def row_ends(self) -> np.ndarray:
        """Every sample's end row in the reader's numbering, checked to tile the rows in order (what a
        streaming pass over samples relies on)."""
        start, stop = self._bounds
        if len(stop) and (stop[-1] != self.n_rows or (start[1:] != stop[:-1]).any() or start[0] != 0):
            raise CacheError(f"{self.path}: the samples table does not tile the rows in order; rebuild the cache")
        return stop

    def sample_of_rows(self, rows: np.ndarray) -> np.ndarray:
        """The samples-table row of each of the reader's `rows`."""
        return np.searchsorted(self._bounds[1], rows, side="right")

    def __len__(self) -> int:
        return self.n_rows

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---------------------------------------------------------------- reading

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Selected rows [start, stop) as float32, read as one contiguous slice."""
        if self._rows is None:
            arr = self._acts[start:stop]
        else:
            idx = self._rows[start:stop]
            if len(idx) == 0:
                return torch.empty(0, self.d)
            arr = self._acts[idx[0]: idx[-1] + 1][idx - idx[0]]
        # float16 -> float32 in torch (vectorised, exact) rather than numpy's astype: 3x faster on the CPU
        return torch.from_numpy(np.ascontiguousarray(arr)).to(torch.float32)

    def iter_sequential(self, chunk_rows: int = 65536) -> Iterator[tuple[int, torch.Tensor]]:
        """(first selected-row index, rows) in file order."""
        for s in range(0, self.n_rows, chunk_rows):
            yield s, self.read(s, min(s + chunk_rows, self.n_rows))

    def _check(self, batch_size: int) -> None:
        if self.n_rows == 0:
            raise CacheError(f"{self.path} holds no activations" + (f" of roles {self.roles}" if self.roles else ""))
        if batch_size > self.n_rows:
            raise CacheError(f"batch size {batch_size} is larger than the cache ({self.n_rows} rows)")

    def _epoch_plan(self, seed: int, epoch: int, batch_size: int) -> list[tuple[np.ndarray, int]]:
        """Per buffer of this epoch: (the block numbers it reads, how many batches it yields)."""
        n_blocks = -(-self.n_rows // self.block_rows)
        order = np.random.default_rng([seed, epoch]).permutation(n_blocks)
        plan = []
        for j in range(0, n_blocks, self.buffer_blocks):
            blocks = np.sort(order[j: j + self.buffer_blocks])
            rows = sum(min(self.block_rows, self.n_rows - b * self.block_rows) for b in blocks)
            plan.append((blocks, rows // batch_size))
        return plan

    def batches(self, batch_size: int, *, seed: int = 0, start_batch: int = 0, rank: int = 0,
                world_size: int = 1) -> Iterator[torch.Tensor]:
        """Endless shuffled float32 batches [batch_size, d]. Batch b depends only on (seed, b);
        under DDP rank r takes batches r, r + world_size, ... of that same sequence."""
        self._check(batch_size)
        b, epoch = 0, 0
        while True:
            for j, (blocks, n_batches) in enumerate(self._epoch_plan(seed, epoch, batch_size)):
                mine = [i for i in range(n_batches) if b + i >= start_batch and (b + i) % world_size == rank]
                if mine:
                    buf = torch.cat([self.read(k * self.block_rows, min((k + 1) * self.block_rows, self.n_rows))
                                     for k in blocks])
                    perm = torch.from_numpy(np.random.default_rng([seed, epoch, j]).permutation(len(buf)))
                    for i in mine:
                        yield buf[perm[i * batch_size: (i + 1) * batch_size]]
                b += n_batches
            epoch += 1

    # ---------------------------------------------------------------- statistics

    def stats(self, max_rows: int = 262144) -> dict:
        """Mean row, mean L2 norm and per-dimension std, from up to `max_rows` evenly spread rows."""
        n = min(self.n_rows, max_rows)
        self._check(1)
        total, sq, norm, count = torch.zeros(self.d, dtype=torch.float64), torch.zeros(self.d, dtype=torch.float64), 0.0, 0
        step = max(1, self.n_rows // n)
        chunk = max(self.block_rows, 8192)
        for s in range(0, self.n_rows, chunk * step):
            x = self.read(s, min(s + chunk, self.n_rows)).double()
            total += x.sum(0)
            sq += (x * x).sum(0)
            norm += x.norm(dim=1).sum().item()
            count += len(x)
        mean = total / count
        return {"mean": mean.float(), "norm": norm / count, "std": (sq / count - mean ** 2).clamp_min(0).sqrt().float(),
                "rows": count}

    def check_finite(self, chunk_rows: int = 65536) -> None:
        """Raise naming the rows that hold NaN or Inf (all of them counted, the first ten named)."""
        bad: list[int] = []
        for s, x in self.iter_sequential(chunk_rows):
            bad += ((~torch.isfinite(x)).any(1).nonzero().flatten() + s).tolist()
        if bad:
            raise CacheError(f"{self.path}: {len(bad)} row(s) hold NaN or Inf, first rows {bad[:10]}; "
                             f"the model overflowed at this layer: re-cache with --model-dtype float32 --dtype float32")
