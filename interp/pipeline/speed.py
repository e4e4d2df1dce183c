"""`interp bench cache`: what caching costs, and whether the cache reader keeps up with the SAE trainer.

It spans two stages (the cache's writer and reader, the saes stage's trainer), so it lives in the
pipeline: `interp.cache.bench` measures the cache alone.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field

from interp.infra.cli_config import Command, choices


@dataclass
class BenchCacheConfig:
    """`interp bench cache`: caching overhead against a bare forward; reader against trainer throughput."""

    model: str = "shapes-subject"
    """model to cache"""
    layer: str = "4"
    """layer to cache"""
    samples: int = 2048
    """samples per timed run"""
    batch_size: int = 32
    """samples per forward pass"""
    engine: str = field(default="both", metadata=choices(["both", "nnsight", "torch"]))
    """hooking engine(s) to time"""
    reader_samples: int = 20000
    """samples of the cache built for the reader benchmark"""
    json: bool = False
    """print one JSON object"""


def reader_against_trainer(cache, batch_size: int = 4096, d_sae_mult: int = 8, k: int = 32) -> dict:
    """The reader's rows/s against the TopK trainer's rows/s on the same cache."""
    from interp.cache.bench import reader_rate
    from interp.cache.reader import ActivationReader
    from saes.sae import SAEConfig
    from saes.train import TrainConfig, train_steps_per_second

    read_rate = reader_rate(cache, batch_size)
    with ActivationReader(cache) as reader:
        sae_cfg = SAEConfig(arch="topk", d_in=reader.d, d_sae=reader.d * d_sae_mult, k=k)
        train_rate = train_steps_per_second(sae_cfg, TrainConfig(batch_size=batch_size), reader, steps=5) * batch_size
        rows, d = reader.n_rows, reader.d
    return {"rows": rows, "d": d, "batch_size": batch_size, "reader_rows_per_s": round(read_rate),
            "trainer_rows_per_s": round(train_rate), "reader_over_trainer": round(read_rate / train_rate, 2),
            "target_reader_over_trainer": 5.0}


def bench_cache_command(cfg: BenchCacheConfig) -> dict:
    from interp.cache.bench import bench_cache
    from interp.cache.writer import CacheConfig, build_cache

    engines = ("nnsight", "torch") if cfg.engine == "both" else (cfg.engine,)
    out = {"cache": {e: bench_cache(cfg.model, cfg.layer, cfg.samples, cfg.batch_size, e) for e in engines}}
    with tempfile.TemporaryDirectory() as d:
        path = build_cache(CacheConfig(run=d, model=cfg.model, layer=cfg.layer, samples=cfg.reader_samples,
                                       batch_size=cfg.batch_size))
        out["reader"] = reader_against_trainer(path)
    return out


def _report(out: dict, cfg: BenchCacheConfig) -> None:
    if cfg.json:
        print(json.dumps(out))
        return
    r = out["reader"]
    for e, c in out["cache"].items():
        print(f"caching ({e}) / bare forward: {c['cache_over_bare']:.3f}x  ({c['cache_s']} s vs "
              f"{c['bare_forward_s']} s, target <= {c['target_cache_over_bare']})")
    print(f"reader / trainer: {r['reader_over_trainer']:.1f}x  ({r['reader_rows_per_s']} vs "
          f"{r['trainer_rows_per_s']} rows/s, target >= {r['target_reader_over_trainer']})")


COMMANDS = [Command("bench cache", BenchCacheConfig, bench_cache_command,
                    "caching overhead vs a bare forward; reader vs trainer throughput", report=_report)]
