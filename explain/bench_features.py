"""`interp bench features`: the features pass against one dense encoder matmul over the same rows.

The features pass (explain.features.accumulate: read the cache in chunks, encode each chunk with
the SAE, update every per-feature statistic and example list) can never beat the encoder
matmul it contains, [rows, d_in] @ [d_in, d_sae]; the ratio says how much the rest costs.
Target: `ratios.features_over_matmul` <= 1.5.

Each size gets a synthetic cache (float16 rows of random activations, `tokens_per_image` image-
patch rows per sample, as the cache writer lays them out) and a random TopK SAE saved to disk.
Then, in `rounds` rounds, the pass over all rows and the bare matmul over the same rows in the
same chunks run back to back, so background load hits both alike; the ratio is the median of
the per-round ratios. The whole `compute_features` call (SAE load, pass, writing features.h5,
which costs O(d_sae) whatever the rows) is timed once and reported against the matmul too.

Sizes: d_sae 8192 (d_in 512, k 32) over `rows` rows, and the reference work's 131,072 (d_in 4096,
k 256) over `wide_rows`: there one chunk of 256 rows is a 275-GFLOP matmul, so fewer rows.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from interp.infra.cli_config import Command
from interp.infra.durable import publish


@dataclass
class BenchFeaturesConfig:
    """`interp bench features`: the features pass over N rows against one dense encoder matmul over them."""

    rows: int = 32768
    """cache rows at d_sae 8192"""
    d_in: int = 512
    """activation width at d_sae 8192"""
    d_sae: int = 8192
    """features of the first SAE"""
    k: int = 32
    """active features per row of the first SAE"""
    wide_rows: int = 1024
    """cache rows at the wide size (0: skip it)"""
    wide_d_in: int = 4096
    """activation width at the wide size (the reference work's LLaVA-NeXT-8B layer)"""
    wide_d_sae: int = 131072
    """features of the wide SAE"""
    wide_k: int = 256
    """active features per row of the wide SAE"""
    tokens_per_image: int = 64
    """image-patch rows per sample (shapes world: 64; LLaVA-1.5: 576; LLaVA-NeXT: up to 2880)"""
    rounds: int = 2
    """pass + matmul rounds per size (the ratio is their median)"""
    threads: int = 1
    """torch CPU threads"""
    seed: int = 0
    """seed of data and weights"""
    workdir: str | None = None
    """where the synthetic caches and SAEs go (default: a temporary directory, removed afterwards)"""
    json: bool = False
    """print one JSON object"""


def write_synthetic_cache(path: Path, rows: int, d_in: int, tokens_per_image: int, seed: int = 0) -> Path:
    """An activation cache of random float16 rows, every row an image patch, `tokens_per_image` rows per
    sample, laid out as interp.cache.writer lays out a real one (sample-major rows, tiling samples table)."""
    import h5py

    from interp.cache import format as fmt

    n_samples = -(-rows // tokens_per_image)
    rng = np.random.default_rng(seed)
    tokens = np.zeros(rows, fmt.TOKEN_DTYPE)
    tokens["sample"] = np.arange(rows) // tokens_per_image
    tokens["position"] = np.arange(rows) % tokens_per_image
    tokens["role"] = fmt.role_code("image_patch")
    side = max(1, int(np.ceil(np.sqrt(tokens_per_image))))
    tokens["row"], tokens["col"] = tokens["position"] // side, tokens["position"] % side
    for name in ("x0", "y0", "x1", "y1"):
        tokens[name] = -1
    samples = fmt.empty_samples(n_samples)
    n_rows = np.full(n_samples, tokens_per_image)
    n_rows[-1] = rows - tokens_per_image * (n_samples - 1)
    samples["n_rows"] = samples["n_tokens"] = n_rows
    samples["row_start"] = np.cumsum(n_rows) - n_rows
    index_field = fmt.SAMPLE_DTYPE.names[0]  # the sample's number in its source
    samples[index_field] = np.arange(n_samples)
    samples["image_ref"] = [f"synthetic:{i}" for i in range(n_samples)]
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        acts = f.create_dataset("activations", (rows, d_in), dtype="float16", chunks=(min(rows, 4096), d_in))
        for s in range(0, rows, 65536):
            n = min(65536, rows - s)
            acts[s: s + n] = rng.standard_normal((n, d_in), dtype=np.float32).astype(np.float16)
        f.create_dataset("tokens", data=tokens)
        f.create_dataset("samples", data=samples)
        identity = {"model": "synthetic", "revision": "", "layer": "layers.0", "site": "resid",
                    "module_path": "synthetic.layers.0", "dtype": "float16", "roles": ["image_patch"],
                    "data": f"synthetic:{rows}x{d_in}:{seed}", "prompt_template": "{image}", "seed": seed}
        for k in fmt.IDENTITY_ATTRS:
            f.attrs[k] = json.dumps(identity.get(k, ""), sort_keys=True)
        f.attrs.update({"format": fmt.FORMAT, "d": d_in, "n_rows": rows, "n_samples": n_samples,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    publish(tmp, path)
    return path


def random_topk_sae(d_in: int, d_sae: int, k: int, seed: int = 0):
    """A TopK SAE with random weights (unit decoder rows, W_enc their transpose, small random b_enc)."""
    from saes.sae import SAE, SAEConfig

    g = torch.Generator().manual_seed(seed)
    sae = SAE(SAEConfig(arch="topk", d_in=d_in, d_sae=d_sae, k=k, normalize=False, model_name="synthetic",
                        hook_name="layers.0", hook_layer=0), generator=g)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.01, generator=g)
    return sae


def _time_size(root: Path, rows: int, d_in: int, d_sae: int, k: int, cfg: BenchFeaturesConfig) -> dict:
    from explain.feature_reader import chunk_rows_for
    from explain.features import FeaturesConfig, _Accumulator, accumulate, compute_features
    from interp.cache.reader import ActivationReader
    from interp.infra.layout import RunLayout
    from saes.sae import SAE

    layout = RunLayout.of(root / f"run-{d_sae}x{d_in}").mkdir()
    write_synthetic_cache(layout.cache, rows, d_in, cfg.tokens_per_image, cfg.seed)
    random_topk_sae(d_in, d_sae, k, cfg.seed).save(layout.sae)
    sae = SAE.load(layout.sae).eval()  # as compute_features holds it
    fcfg = FeaturesConfig(run=str(layout.root), device="cpu", progress=False)
    chunk = chunk_rows_for(d_sae, fcfg.max_chunk_elements, fcfg.chunk_rows)
    device = torch.device("cpu")
    passes, matmuls = [], []
    with ActivationReader(layout.cache) as reader:
        roles = torch.from_numpy(np.ascontiguousarray(reader.tokens["role"]))
        ends = np.cumsum(reader.samples_table["n_rows"])
        x_all = [x for _, x in reader.iter_sequential(chunk)]  # the matmul's rows, in the pass's chunks
        with torch.no_grad():
            x_all[0] @ sae.W_enc  # warm-up
            for _ in range(cfg.rounds):
                acc = _Accumulator(d_sae, fcfg, ends, device)
                t0 = time.perf_counter()
                accumulate(reader, sae, acc, chunk, roles, device)
                acc.close()
                passes.append(time.perf_counter() - t0)
                del acc
                t0 = time.perf_counter()
                for x in x_all:
                    x @ sae.W_enc
                matmuls.append(time.perf_counter() - t0)
    del x_all, sae
    t0 = time.perf_counter()
    compute_features(fcfg)
    whole = time.perf_counter() - t0
    ratios = [p / m for p, m in zip(passes, matmuls)]
    mm = statistics.median(matmuls)
    return {"rows": rows, "d_in": d_in, "d_sae": d_sae, "k": k, "chunk_rows": chunk,
            "tokens_per_image": cfg.tokens_per_image, "pass_s": [round(t, 3) for t in passes],
            "matmul_s": [round(t, 3) for t in matmuls],
            "features_over_matmul": round(statistics.median(ratios), 3),
            "compute_features_s": round(whole, 3), "compute_features_over_matmul": round(whole / mm, 3),
            "rows_per_s": round(rows / statistics.median(passes), 1)}


def bench_features(cfg: BenchFeaturesConfig) -> dict:
    """Time the features pass against the encoder matmul at both sizes; returns the report."""
    import shutil

    torch.set_num_threads(cfg.threads)
    sizes = [("d_sae_%d" % cfg.d_sae, cfg.rows, cfg.d_in, cfg.d_sae, cfg.k)]
    if cfg.wide_rows > 0:
        sizes.append(("d_sae_%d" % cfg.wide_d_sae, cfg.wide_rows, cfg.wide_d_in, cfg.wide_d_sae, cfg.wide_k))
    root = Path(cfg.workdir) if cfg.workdir else Path(tempfile.mkdtemp(prefix="bench-features-"))
    root.mkdir(parents=True, exist_ok=True)
    results = {}
    try:
        for name, rows, d_in, d_sae, k in sizes:
            if rows < cfg.tokens_per_image:
                raise ValueError(f"{rows} rows hold no whole image of {cfg.tokens_per_image} tokens: "
                                 "give more rows or fewer tokens per image")
            results[name] = _time_size(root, rows, d_in, d_sae, k, cfg)
            if not cfg.json:
                r = results[name]
                print(f"  d_sae {d_sae} (d_in {d_in}, k {k}), {rows} rows: pass {statistics.median(r['pass_s']):.2f} s, "
                      f"matmul {statistics.median(r['matmul_s']):.2f} s -> {r['features_over_matmul']:.3f}x "
                      f"(whole compute_features {r['compute_features_over_matmul']:.2f}x)")
    finally:
        if not cfg.workdir:
            shutil.rmtree(root, ignore_errors=True)
    worst = max(r["features_over_matmul"] for r in results.values())
    ratios = {"features_over_matmul": worst,
              **{f"features_over_matmul_{n}": r["features_over_matmul"] for n, r in results.items()}}
    return {"config": asdict(cfg), "results": results, "ratios": ratios, "target": {"features_over_matmul": 1.5},
            "meets_target": worst <= 1.5, "torch_threads": torch.get_num_threads(), "torch": torch.__version__}


COMMANDS = [Command("bench features", BenchFeaturesConfig, bench_features,
                    "the features pass against one dense encoder matmul over the same rows (d_sae 8192 and 131,072)",
                    report=lambda r, cfg: print(json.dumps(r)) if cfg.json else None)]
