"""`interp bench train`: TopK SAE training speed and quality, ours against sae-lens and a dense reference.

All three train in one process, in lockstep (one step of each in turn, the order rotating, then
one dense encoder matmul), on the same synthetic batches (sparse combinations of random
directions plus noise), with the same learning-rate schedule, so background load hits them alike:

- ours: `saes.train.Trainer` with the k-sparse kernels;
- dense: the same trainer with the plain-autograd dense TopK (`TrainConfig(sparse=False)`), so
  the ratio isolates the kernels;
- sae-lens: `TopKTrainingSAE` + `SAETrainer` fed a plain iterator of the same batches.

Reported: activations/s (rows / summed step time), FVU on held-out rows (raw activations, each
final SAE), their ratios, and our time per batch against one dense encoder matmul
[batch, d_in] @ [d_in, d_sae]. Background load moves absolute numbers; compare the ratios.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

from interp.infra.cli_config import Command, choices


@dataclass
class BenchTrainConfig:
    """`interp bench train`: TopK training throughput and FVU, ours against sae-lens and the dense reference."""

    d_in: int = 512
    """activation width"""
    d_sae: int = 8192
    """features of each SAE"""
    k: int = 32
    """active features per row"""
    batch_size: int = 4096
    """rows per training step"""
    steps: int = 30
    """training steps per trainer"""
    lr: float = 1e-3
    """peak learning rate (all trainers)"""
    warmup_steps: int = 3
    """linear warm-up steps (all trainers)"""
    decay_fraction: float = 0.2
    """linear decay to 0 over this last fraction of the steps"""
    true_features: int = 4096
    """true directions in the synthetic data"""
    active: float = 16
    """true directions active per row"""
    eval_rows: int = 8192
    """held-out rows for the FVU"""
    threads: int = 1
    """torch CPU threads"""
    seed: int = 0
    """seed of data and weights"""
    skip: tuple[str, ...] = field(default=(), metadata=choices(["sae-lens", "dense"]))
    """trainers to leave out"""
    json: bool = False
    """print one JSON object"""


def _fvu(forward, x) -> float:
    import torch

    with torch.no_grad():
        out = torch.cat([forward(x[s:s + 4096]) for s in range(0, x.shape[0], 4096)])
    return float(((out - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def _ours(args: BenchTrainConfig, source, sparse: bool):
    """(step function, final-SAE function) for our trainer."""
    from saes.sae import SAEConfig
    from saes.train import TrainConfig, Trainer

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup_steps,
                      decay_fraction=args.decay_fraction, seed=args.seed, sparse=sparse, progress=False,
                      device="cpu")
    trainer = Trainer(SAEConfig(arch="topk", d_in=args.d_in, d_sae=args.d_sae, k=args.k), cfg, source, None)
    return (lambda g, batch: trainer.run_step(g, batch)), trainer.final_sae


def _sae_lens(args: BenchTrainConfig, source):
    """(step function, final-SAE function) for sae-lens's TopKTrainingSAE + SAETrainer.

    The step does what SAETrainer.fit() does per batch: `trainer.step(batch)`, then counts the step."""
    import warnings

    import torch

    with warnings.catch_warnings():  # sae-lens imports transformer_lens.utils, deprecated there
        warnings.simplefilter("ignore", DeprecationWarning)
        from sae_lens.config import LoggingConfig, SAETrainerConfig
        from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
        from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(args.seed)
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=args.d_in, d_sae=args.d_sae, k=args.k, dtype="float32",
                                                device="cpu"))
    tcfg = SAETrainerConfig(total_training_samples=args.steps * args.batch_size,
                            train_batch_size_samples=args.batch_size, lr=args.lr, lr_end=args.lr,
                            lr_scheduler_name="constant", lr_warm_up_steps=args.warmup_steps,
                            lr_decay_steps=int(args.decay_fraction * args.steps), device="cpu", autocast=False,
                            dead_feature_window=1000, feature_sampling_window=10**9,
                            logger=LoggingConfig(log_to_wandb=False))
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=iter(()))

    def step(g, batch):
        trainer.step(batch)
        trainer.n_training_steps += 1

    return step, lambda: sae.eval()


def bench_train(args: BenchTrainConfig) -> dict:
    import contextlib
    import io

    import torch

    from saes.data import TensorSource, synthetic_activations

    torch.set_num_threads(args.threads)
    n_train = args.steps * args.batch_size
    data = synthetic_activations(n_train + args.eval_rows, args.d_in, n_features=args.true_features, active=args.active,
                                 seed=args.seed)
    train_rows, held_out = data[:n_train], data[n_train:]
    source = TensorSource(train_rows)
    say = (lambda *a: print(*a, file=sys.stderr)) if args.json else print
    quiet = contextlib.redirect_stderr(io.StringIO()) if args.json else contextlib.nullcontext()
    with quiet:
        runs = {"ours": _ours(args, source, True)}
        if "dense" not in args.skip:
            runs["dense"] = _ours(args, source, False)
        if "sae-lens" not in args.skip:
            runs["sae_lens"] = _sae_lens(args, source)
    names = list(runs)
    times: dict[str, list[float]] = {n: [] for n in names}
    mm_x, mm_w = torch.randn(args.batch_size, args.d_in), torch.randn(args.d_in, args.d_sae)
    mm_x @ mm_w
    matmul: list[float] = []
    say(f"training {', '.join(names)} in lockstep: {args.steps} steps of {args.batch_size} rows, "
        f"d_in {args.d_in}, d_sae {args.d_sae}, k {args.k}")
    with quiet:
        for i, batch in enumerate(source.batches(args.batch_size, seed=args.seed)):
            if i == args.steps:
                break
            for name in names[i % len(names):] + names[:i % len(names)]:  # rotate the order: no position bias
                t0 = time.perf_counter()
                runs[name][0](i, batch)
                times[name].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            mm_x @ mm_w
            matmul.append(time.perf_counter() - t0)
            if args.json is False and (i + 1) % max(1, args.steps // 5) == 0:
                say(f"  step {i + 1}/{args.steps}")
    results = {}
    for name in names:
        t = times[name]
        results[name] = {"acts_per_s": round(len(t) * args.batch_size / sum(t), 1), "train_s": round(sum(t), 3),
                         "step_ms_median": round(statistics.median(t) * 1e3, 2),
                         "fvu": round(_fvu(runs[name][1](), held_out), 5)}
        r = results[name]
        say(f"  {name}: {r['acts_per_s']:,.0f} activations/s, FVU {r['fvu']:.4f}, "
            f"median step {r['step_ms_median']:.0f} ms")
    mm = statistics.median(matmul) * 1e3
    ours = results["ours"]
    paired = [a / b for a, b in zip(times["ours"], matmul)]
    ratios = {"ours_step_over_matmul": round(ours["step_ms_median"] / mm, 3),
              "ours_step_over_matmul_paired_median": round(statistics.median(paired), 3)}
    for other in ("sae_lens", "dense"):
        if other in results:
            ratios[f"speed_ours_over_{other}"] = round(ours["acts_per_s"] / results[other]["acts_per_s"], 3)
            ratios[f"fvu_ours_minus_{other}"] = round(ours["fvu"] - results[other]["fvu"], 5)
    report = {"config": asdict(args), "results": results,
              "matmul_ms_median": round(mm, 2), "ratios": ratios, "torch_threads": torch.get_num_threads(),
              "torch": torch.__version__}
    if not args.json:
        say(f"one dense encoder matmul [{args.batch_size}x{args.d_in}]@[{args.d_in}x{args.d_sae}]: {mm:.0f} ms (median)")
        for k, v in ratios.items():
            say(f"  {k}: {v}")
    return report


COMMANDS = [Command("bench train", BenchTrainConfig, bench_train,
                    "TopK SAE training throughput and FVU: ours vs sae-lens vs dense",
                    report=lambda r, cfg: print(json.dumps(r)) if cfg.json else None)]
