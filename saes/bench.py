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

import argparse
import json
import statistics
import sys
import time


def register_bench(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser("train", help="TopK SAE training throughput and FVU: ours vs sae-lens vs dense",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--d-in", type=int, default=512, help="activation width")
    p.add_argument("--d-sae", type=int, default=8192, help="latents")
    p.add_argument("--k", type=int, default=32, help="active latents per row")
    p.add_argument("--batch", type=int, default=4096, help="rows per training step")
    p.add_argument("--steps", type=int, default=30, help="training steps per trainer")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (all trainers)")
    p.add_argument("--warmup", type=int, default=3, help="linear warm-up steps (all trainers)")
    p.add_argument("--decay-fraction", type=float, default=0.2, help="linear decay to 0 over this last fraction")
    p.add_argument("--features", type=int, default=4096, help="true directions in the synthetic data")
    p.add_argument("--active", type=float, default=16, help="true directions active per row")
    p.add_argument("--eval-rows", type=int, default=8192, help="held-out rows for the FVU")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0, help="seed of data and weights")
    p.add_argument("--skip", nargs="*", default=[], choices=["sae-lens", "dense"], help="trainers to leave out")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run_bench)


def _fvu(forward, x) -> float:
    import torch

    with torch.no_grad():
        out = torch.cat([forward(x[s:s + 4096]) for s in range(0, x.shape[0], 4096)])
    return float(((out - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def _ours(args, source, sparse: bool):
    """(step function, final-SAE function) for our trainer."""
    from saes.sae import SAEConfig
    from saes.train import TrainConfig, Trainer

    cfg = TrainConfig(steps=args.steps, batch_size=args.batch, lr=args.lr, warmup_steps=args.warmup,
                      decay_fraction=args.decay_fraction, seed=args.seed, sparse=sparse, progress=False,
                      device="cpu")
    trainer = Trainer(SAEConfig(arch="topk", d_in=args.d_in, d_sae=args.d_sae, k=args.k), cfg, source, None)
    return (lambda g, batch: trainer.run_step(g, batch)), trainer.final_sae


def _sae_lens(args, source):
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
    tcfg = SAETrainerConfig(total_training_samples=args.steps * args.batch, train_batch_size_samples=args.batch,
                            lr=args.lr, lr_end=args.lr, lr_scheduler_name="constant", lr_warm_up_steps=args.warmup,
                            lr_decay_steps=int(args.decay_fraction * args.steps), device="cpu", autocast=False,
                            dead_feature_window=1000, feature_sampling_window=10**9,
                            logger=LoggingConfig(log_to_wandb=False))
    trainer = SAETrainer(cfg=tcfg, sae=sae, data_provider=iter(()))

    def step(g, batch):
        trainer.step(batch)
        trainer.n_training_steps += 1

    return step, lambda: sae.eval()


def run_bench(args) -> int:
    import contextlib
    import io

    import torch

    from saes.data import TensorSource, synthetic_activations

    torch.set_num_threads(args.threads)
    n_train = args.steps * args.batch
    data = synthetic_activations(n_train + args.eval_rows, args.d_in, n_features=args.features, active=args.active,
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
    mm_x, mm_w = torch.randn(args.batch, args.d_in), torch.randn(args.d_in, args.d_sae)
    mm_x @ mm_w
    matmul: list[float] = []
    say(f"training {', '.join(names)} in lockstep: {args.steps} steps of {args.batch} rows, "
        f"d_in {args.d_in}, d_sae {args.d_sae}, k {args.k}")
    with quiet:
        for i, batch in enumerate(source.batches(args.batch, seed=args.seed)):
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
        results[name] = {"acts_per_s": round(len(t) * args.batch / sum(t), 1), "train_s": round(sum(t), 3),
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
    report = {"config": {k: v for k, v in vars(args).items() if not callable(v)}, "results": results,
              "matmul_ms_median": round(mm, 2), "ratios": ratios, "torch_threads": torch.get_num_threads(),
              "torch": torch.__version__}
    if args.json:
        print(json.dumps(report))
    else:
        say(f"one dense encoder matmul [{args.batch}x{args.d_in}]@[{args.d_in}x{args.d_sae}]: {mm:.0f} ms (median)")
        for k, v in ratios.items():
            say(f"  {k}: {v}")
    return 0
