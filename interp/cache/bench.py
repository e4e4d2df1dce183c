"""`interp bench cache`: what caching costs, as ratios against baselines measured in the same run.

1. Caching overhead: the whole `interp cache` path (data, processor, hooked forward, token
   table, part files, merge) against the same data and processor with a bare forward of the
   same model and no hooks. Target: <= 1.10.
2. Reader headroom: shuffled batches per second from the cache against the rate at which the
   SAE trainer consumes them. Target: >= 5x.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch


def _time(fn, repeat: int = 1) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def bench_cache(model: str = "shapes-subject", layer: str = "2", samples: int = 2048, batch_size: int = 32,
                engine: str = "nnsight", repeat: int = 2) -> dict:
    from interp.cache.writer import CacheConfig, CacheWriter, build_cache
    from interp.cache.data import open_source
    from interp.model.inputs import model_inputs, prompts

    cfg = CacheConfig(model=model, layer=layer, n=samples, batch_size=batch_size, part_samples=256, engine=engine)
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
            build_cache(cfg, Path(d) / "c.h5", writer)

    bare()  # warm-up: first-call allocations and lazy imports
    t_bare, t_cache = _time(bare, repeat), _time(cached, repeat)
    return {"model": model, "layer": layer, "samples": samples, "engine": engine,
            "bare_forward_s": round(t_bare, 3), "cache_s": round(t_cache, 3),
            "cache_over_bare": round(t_cache / t_bare, 3), "target_cache_over_bare": 1.10}


def bench_reader(cache_path: str | Path, batch_size: int = 4096, batches: int = 30, d_sae_mult: int = 8,
                 k: int = 32) -> dict:
    """Reader rows/s against the trainer's rows/s on the same cache."""
    from interp.cache.reader import ActivationReader
    from saes.sae import SAEConfig
    from saes.train import TrainConfig, train_steps_per_second

    reader = ActivationReader(cache_path)
    it = reader.batches(batch_size, seed=0)
    next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    read_rate = batches * batch_size / (time.perf_counter() - t)
    sae_cfg = SAEConfig(arch="topk", d_in=reader.d, d_sae=reader.d * d_sae_mult, k=k)
    train_rate = train_steps_per_second(sae_cfg, TrainConfig(batch_size=batch_size), reader, steps=5) * batch_size
    return {"rows": reader.n_rows, "d": reader.d, "batch_size": batch_size,
            "reader_rows_per_s": round(read_rate), "trainer_rows_per_s": round(train_rate),
            "reader_over_trainer": round(read_rate / train_rate, 2), "target_reader_over_trainer": 5.0}


def register_bench(bench_sub) -> None:
    p = bench_sub.add_parser("cache", help="caching overhead vs a bare forward; reader vs trainer throughput",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="shapes-subject", help="model to cache")
    p.add_argument("--layer", default="2", help="layer to cache")
    p.add_argument("--samples", type=int, default=2048, help="samples per timed run")
    p.add_argument("--batch-size", type=int, default=32, help="samples per forward pass")
    p.add_argument("--engine", default="both", choices=["both", "nnsight", "torch"], help="hooking engine(s) to time")
    p.add_argument("--reader-samples", type=int, default=20000,
                   help="samples of the cache built for the reader benchmark")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cli)


def _cli(args) -> int:
    from interp.cache.writer import CacheConfig, build_cache

    engines = ("nnsight", "torch") if args.engine == "both" else (args.engine,)
    out = {"cache": {e: bench_cache(args.model, args.layer, args.samples, args.batch_size, e) for e in engines}}
    with tempfile.TemporaryDirectory() as d:
        path = build_cache(CacheConfig(model=args.model, layer=args.layer, n=args.reader_samples,
                                       batch_size=args.batch_size), Path(d) / "reader.h5")
        out["reader"] = bench_reader(path)
    if args.json:
        print(json.dumps(out))
    else:
        r = out["reader"]
        for e, c in out["cache"].items():
            print(f"caching ({e}) / bare forward: {c['cache_over_bare']:.3f}x  ({c['cache_s']} s vs "
                  f"{c['bare_forward_s']} s, target <= {c['target_cache_over_bare']})")
        print(f"reader / trainer: {r['reader_over_trainer']:.1f}x  ({r['reader_rows_per_s']} vs "
              f"{r['trainer_rows_per_s']} rows/s, target >= {r['target_reader_over_trainer']})")
    return 0
