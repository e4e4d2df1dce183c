"""SAEs trained by other libraries' own trainers, for `interp benchmark`'s architecture comparison.

- `sae-lens`: sae-lens 6.x's `TopKTrainingSAE` + `SAETrainer`, its recommended settings (activations
  scaled to mean norm sqrt(d_in), Adam at 3e-4, AuxK), saved with its own `save_inference_model` after
  folding the scaling factor in (what sae-lens does at the end of training).
- `sparsify`: EleutherAI sparsify's `SparseCoder` with its default optimiser (schedule-free SignSGD), saved
  with its own `save_to_disk` at the schedule-free average (what its trainer saves).

Both are driven exactly as `interp bench train` drives them (`saes.bench_train.ADAPTERS`), on the same
batches as our trainer (`saes.train.rank_batches`: batch g of the source's stream for seed `seed`), for
the same steps, batch size, width and k; the result is a directory `saes.sae.SAE.load` reads (SAELens
format, or sparsify's in a folder named after its hookpoint, as sparsify names them), so every later stage
uses it as the run's SAE (link it to RUN/sae).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

TRAINERS = ("sae-lens", "sparsify")


class MissingTrainerError(RuntimeError):
    """The library of an external trainer is not installed."""


def train_external(name: str, source, out: str | Path, *, d_sae: int, k: int, steps: int, batch_size: int,
                   seed: int = 0, hookpoint: str = "layers.0") -> dict:
    """Train a TopK SAE with library `name`'s own trainer on `source` and save it under `out` (sparsify:
    in `out/hookpoint`, e.g. layers.2); returns {path (the SAE directory), seconds, fvu_last_batch}."""
    from saes.bench_train import ADAPTERS, _quiet
    from saes.train import rank_batches

    if name not in TRAINERS:
        raise ValueError(f"unknown external trainer {name!r}; choose one of {', '.join(TRAINERS)}")
    try:
        with _quiet():
            run = ADAPTERS[name](source.d, d_sae, int(k), batch_size, steps, source, seed, 1.0)
    except ImportError as e:
        raise MissingTrainerError(f"the {name} trainer needs its library ({e.name or e}): pip install "
                                  f"{'eai-sparsify' if name == 'sparsify' else 'sae-lens'}") from e
    t0 = time.perf_counter()
    last = None
    for step, (_, batch) in zip(range(steps), rank_batches(source, batch_size, seed=seed)):
        last = batch.to(torch.float32)
        run.step(last)
    seconds = time.perf_counter() - t0
    out = Path(out) if name == "sae-lens" else Path(out) / hookpoint
    with _quiet():
        _save(name, run, out)
    fvu = None
    if last is not None:
        with torch.no_grad():
            fvu = float(((run.reconstruct(last) - last) ** 2).sum() / ((last - last.mean(0)) ** 2).sum())
    return {"path": str(out), "seconds": round(seconds, 1), "fvu_last_batch": fvu}


def _save(name: str, run, out: Path) -> None:
    if name == "sae-lens":
        import copy

        sae = copy.deepcopy(run.sae)
        sae.fold_activation_norm_scaling_factor(run.scale)
        sae.save_inference_model(out)
    else:
        run.opt.eval()  # schedule-free: save the averaged weights, as sparsify's trainer does
        try:
            run.coder.save_to_disk(out)
        finally:
            run.opt.train()
