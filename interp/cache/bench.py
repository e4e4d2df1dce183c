"""What caching costs, as ratios against baselines measured in the same run (`interp bench cache`).

1. Caching overhead: the whole `interp cache` path (data, processor, hooked forward, token
   table, part files, merge) against the same data and processor with a bare forward of the
   same model and no hooks. Target: <= 1.10.
2. Reader rate: shuffled batches per second from a cache, which `interp.pipeline.speed` holds
   against the rate at which the SAE trainer consumes them. Target: >= 5x.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch


def best_time(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_cache(model: str = "shapes-subject", layer: str = "4", samples: int = 2048, batch_size: int = 32,
                engine: str = "nnsight", repeat: int = 2) -> dict:
    from interp.cache.data import open_source
    from interp.cache.writer import CacheConfig, CacheWriter, build_cache
    from interp.model.inputs import model_inputs, prompts

    cfg = CacheConfig(model=model, layer=layer, samples=samples, batch_size=batch_size, part_samples=256,
                      engine=engine)
    writer = CacheWriter(cfg)
    source = open_source(cfg.data, samples, cfg.seed)
    model_ = writer.lm.model

    @torch.no_grad()
    def bare() -> None:
        for s in range(0, samples, batch_size):
            batch = [source[i] for i in range(s, min(s + batch_size, samples))]
            model_(**model_inputs(writer.lm, batch, prompts(writer.lm, batch, cfg.prompt_template)[0]))

    def cached() -> None:
        with tempfile.TemporaryDirectory() as d:
            cfg.run = d
            build_cache(cfg, writer)

    bare()  # warm-up: first-call allocations and lazy imports
    t_bare, t_cache = best_time(bare, repeat), best_time(cached, repeat)
    return {"model": model, "layer": layer, "samples": samples, "engine": engine,
            "bare_forward_s": round(t_bare, 3), "cache_s": round(t_cache, 3),
            "cache_over_bare": round(t_cache / t_bare, 3), "target_cache_over_bare": 1.10}


def reader_rate(cache_path: str | Path, batch_size: int = 4096, batches: int = 30) -> float:
    """Rows per second of shuffled batches from the cache (after the first batch)."""
    from interp.cache.reader import ActivationReader

    with ActivationReader(cache_path) as reader:
        it = reader.batches(batch_size, seed=0)
        next(it)
        t = time.perf_counter()
        for _ in range(batches):
            next(it)
        return batches * batch_size / (time.perf_counter() - t)
