"""Where training activations come from: the `BatchSource` contract, an in-memory source, synthetic data.

`batches()` is an endless stream (epoch after epoch, each shuffled by (seed, epoch)) whose batch
b depends only on (seed, b), so a resumed run reads exactly the batches an uninterrupted one
would; `interp.cache.reader.ActivationReader` and `TensorSource` work this way. The trainer's global
batch g is the stream's batch g. Sources may also take `rank` and `world_size` (yield only
batches b >= start_batch with b % world_size == rank): each data-parallel rank then reads only
its own share. A source whose stream ends after one epoch still works (see
`saes.train.rank_batches`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class BatchSource(Protocol):
    d: int  # activation width
    n_rows: int

    def batches(self, batch_size: int, *, seed: int = 0, start_batch: int = 0) -> Iterator[torch.Tensor]:
        """float32 [batch_size, d]; batch b is the same whether started at 0 or at b."""
        ...

    def stats(self) -> dict:
        """{"mean": Tensor[d], "norm": float (mean L2 norm of rows)}."""
        ...


class TensorSource:
    """A BatchSource over a [rows, d] tensor in memory: endless, a fresh seeded permutation per epoch."""

    def __init__(self, data: torch.Tensor):
        if data.ndim != 2:
            raise ValueError(f"TensorSource needs a [rows, d] tensor, got shape {tuple(data.shape)}")
        self.data = data
        self.n_rows, self.d = data.shape

    def batches(self, batch_size: int, *, seed: int = 0, start_batch: int = 0, rank: int = 0,
                world_size: int = 1) -> Iterator[torch.Tensor]:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        per_epoch = self.n_rows // batch_size
        if per_epoch == 0:
            raise ValueError(f"TensorSource has {self.n_rows} rows, fewer than one batch of {batch_size}")
        b = start_batch + (rank - start_batch) % world_size  # first batch >= start_batch that is this rank's
        epoch, perm = -1, None
        while True:
            e, within = divmod(b, per_epoch)
            if e != epoch:
                epoch = e
                perm = torch.randperm(self.n_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + e))
            yield self.data[perm[within * batch_size:(within + 1) * batch_size]].to(torch.float32)
            b += world_size

    def stats(self) -> dict:
        if self.n_rows == 0:
            raise ValueError("TensorSource is empty: no statistics")
        total = torch.zeros(self.d, dtype=torch.float64)
        norm = 0.0
        for s in range(0, self.n_rows, 65536):
            chunk = self.data[s:s + 65536].to(torch.float64)
            total += chunk.sum(0)
            norm += chunk.norm(dim=1).sum().item()
        return {"mean": (total / self.n_rows).float(), "norm": norm / self.n_rows}


def synthetic_activations(n_rows: int, d: int = 512, *, n_features: int = 4096, active: float = 12.0,
                          noise: float = 0.05, offset: float = 1.0, seed: int = 0,
                          chunk: int = 65536) -> torch.Tensor:
    """Structured fake activations: sparse combinations of fixed random unit directions plus noise.

    Each row sums `active` features (drawn with Zipf-like frequencies from `n_features`, with
    log-normal magnitudes), adds a constant offset vector of norm `offset` (so centring matters)
    and isotropic Gaussian noise of total norm ~`noise`. A dictionary of the right size can
    explain all but the noise, so FVU well below 1 is reachable. Deterministic in `seed`.
    """
    g = torch.Generator().manual_seed(seed)
    directions = torch.randn(n_features, d, generator=g)
    directions /= directions.norm(dim=1, keepdim=True)
    mean_dir = torch.randn(d, generator=g)
    mean_vec = offset * mean_dir / mean_dir.norm()
    freq = 1.0 / (torch.arange(n_features, dtype=torch.float64) + 20.0) ** 0.7
    freq = (freq / freq.sum()).float()
    n_active = max(1, int(round(active)))
    out = torch.empty(n_rows, d)
    for s in range(0, n_rows, chunk):
        n = min(chunk, n_rows - s)
        idx = torch.multinomial(freq, n * n_active, replacement=True, generator=g).view(n, n_active)
        mags = torch.exp(0.5 * torch.randn(n, n_active, generator=g))
        rows = torch.nn.functional.embedding_bag(idx, directions, per_sample_weights=mags, mode="sum")
        rows += mean_vec + (noise / math.sqrt(d)) * torch.randn(n, d, generator=g)
        out[s:s + n] = rows
    return out
