"""`interp train`: train a sparse autoencoder on cached activations (and `interp bench train`).

    interp train --cache acts.h5 --arch topk --d-sae 8192 --k 32 --out runs/sae-topk

Re-running the same command resumes from the checkpoint in --out. Under torchrun
(`torchrun --nproc_per_node N -m interp.cli train ...`) it trains data-parallel.
`--cache` is read with `interp.cache.reader.ActivationReader`; a `.safetensors` file with one
[rows, d] tensor (key `activations`, or its only tensor) is read into memory instead.
"""

from __future__ import annotations

import argparse

from saes.bench import register_bench  # noqa: F401  (interp's CLI collects it from this module)


def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = sub.add_parser("train", help="train a sparse autoencoder on cached activations (resumable)",
                       formatter_class=fmt)
    p.add_argument("--cache", required=True,
                   help="activation cache: an .h5 file written by the cache stage, or a .safetensors [rows, d] tensor")
    p.add_argument("--arch", choices=["topk", "batchtopk", "jumprelu", "relu"], default="topk",
                   help="SAE architecture (relu = ReLU + L1)")
    p.add_argument("--d-sae", type=int, default=None, help="latents (default: 16 x the activation width)")
    p.add_argument("--k", type=float, default=32,
                   help="active latents per row (topk), or per row on average (batchtopk)")
    p.add_argument("--out", default="runs/sae", help="output directory: checkpoint/, metrics.jsonl, run.json, sae/")
    p.add_argument("--steps", type=int, default=10_000, help="training steps")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per step (over all ranks)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 2e-4 / sqrt(d_sae / 16384))")
    p.add_argument("--warmup-steps", type=int, default=100, help="linear learning-rate warm-up steps")
    p.add_argument("--decay-fraction", type=float, default=0.2,
                   help="linear learning-rate decay to 0 over this last fraction of the steps")
    p.add_argument("--l1-coefficient", type=float, default=0.1, help="relu: L1 penalty weight (normalised inputs)")
    p.add_argument("--l0-coefficient", type=float, default=3e-3, help="jumprelu: L0 penalty weight")
    p.add_argument("--jumprelu-threshold", type=float, default=0.01, help="jumprelu: initial threshold")
    p.add_argument("--jumprelu-bandwidth", type=float, default=0.01, help="jumprelu: straight-through window width")
    p.add_argument("--sparsity-warmup-steps", type=int, default=0, help="jumprelu/relu: penalty warm-up steps")
    p.add_argument("--aux-coefficient", type=float, default=1 / 32, help="topk/batchtopk: AuxK loss weight")
    p.add_argument("--dead-window", type=int, default=1000, help="steps without firing before a latent is dead")
    p.add_argument("--no-normalize", action="store_true",
                   help="train on raw activations (default: centred, unit mean norm; folded into the saved SAE)")
    p.add_argument("--b-dec-init", choices=["geometric_median", "mean", "zeros"], default="geometric_median",
                   help="decoder bias initialisation")
    p.add_argument("--dense", action="store_true", help="topk/batchtopk: the dense reference path (slow)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data order")
    p.add_argument("--checkpoint-every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--log-every", type=int, default=10, help="steps between metrics records")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 per process when sharing cores)")
    p.add_argument("--model-name", default=None, help="model the activations come from (saved in cfg.json metadata)")
    p.add_argument("--hook-name", default=None, help="hook the activations come from (saved in cfg.json metadata)")
    p.add_argument("--hook-layer", type=int, default=None, help="layer of that hook (saved in cfg.json metadata)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run_train)


def open_source(path: str):
    """The BatchSource for --cache: an in-memory .safetensors tensor, else interp.cache.reader.ActivationReader."""
    from pathlib import Path

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"activation cache not found: {path}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        from saes.data import TensorSource

        tensors = load_file(p)
        if "activations" in tensors:
            return TensorSource(tensors["activations"])
        if len(tensors) != 1:
            raise ValueError(f"{path}: expected a tensor named 'activations' or a single tensor, got {sorted(tensors)}")
        return TensorSource(next(iter(tensors.values())))
    from interp.cache.reader import ActivationReader  # the cache stage's reader (a BatchSource)

    return ActivationReader(path)


def cache_metadata(source) -> dict:
    """Model / hook / layer of a cache, from the reader's HDF5 attributes (`meta`), when it has them."""
    import re

    meta = getattr(source, "meta", None) or {}
    out = {}
    if meta.get("model"):
        out["model_name"] = str(meta["model"])
    if meta.get("module_path") or meta.get("layer"):
        out["hook_name"] = str(meta.get("module_path") or meta.get("layer"))
    m = re.search(r"(\d+)$", str(meta.get("layer", "")))
    if m:
        out["hook_layer"] = int(m.group(1))
    for k in ("layer", "site", "roles", "dtype"):
        if meta.get(k) is not None:
            out[f"cache_{k}"] = meta[k] if isinstance(meta[k], (str, int, float, list)) else str(meta[k])
    return out


def run_train(args) -> int:
    from saes.sae import SAEConfig
    from saes.train import TrainConfig, train

    source = open_source(args.cache)
    found = cache_metadata(source)
    sae_cfg = SAEConfig(arch=args.arch, d_in=source.d, d_sae=args.d_sae or 16 * source.d, k=args.k,
                        l1_coefficient=args.l1_coefficient, l0_coefficient=args.l0_coefficient,
                        jumprelu_init_threshold=args.jumprelu_threshold, jumprelu_bandwidth=args.jumprelu_bandwidth,
                        normalize=not args.no_normalize,
                        model_name=args.model_name or found.pop("model_name", None),
                        hook_name=args.hook_name or found.pop("hook_name", None),
                        hook_layer=args.hook_layer if args.hook_layer is not None else found.pop("hook_layer", None),
                        metadata={"activation_cache": str(args.cache), **found})
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                      decay_fraction=args.decay_fraction, seed=args.seed, b_dec_init=args.b_dec_init,
                      dead_window=args.dead_window, aux_coefficient=args.aux_coefficient,
                      sparsity_warmup_steps=args.sparsity_warmup_steps, sparse=not args.dense,
                      checkpoint_every=args.checkpoint_every, log_every=args.log_every, device=args.device,
                      threads=args.threads, progress=not args.no_progress)
    result = train(sae_cfg, cfg, source, args.out)
    if result.path is not None:
        last = result.last
        nan = float("nan")
        print(f"saved SAE: {result.path} (FVU {last.get('fvu', nan):.4f}, L0 {last.get('l0', nan):.1f}, "
              f"dead {last.get('dead_frac', nan):.1%}); loads with sae_lens.SAE.load_from_disk")
    return 0
