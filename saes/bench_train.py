"""`interp bench train`, fair: ours, EleutherAI sparsify and sae-lens, each with its own recommended settings.

All trainers train TopK SAEs of the same size in one process, in lockstep (one step of each in
turn, the order rotating, then one dense encoder matmul as the yardstick), on the same batches
of synthetic activations (sparse combinations of random directions, plus an offset and noise:
centring matters), so background load hits them alike. Each trainer runs as its authors
recommend, not with shared settings:

- ours: `saes.train.Trainer` defaults (centring and unit mean-norm scaling folded on save,
  geometric-median b_dec, Adam at lr 2e-4 / sqrt(d_sae / 2^14), AuxK, linear decay over the
  last 20%); the warm-up is the default 100 steps capped at a tenth of a short run.
- sparsify (eai-sparsify 1.3.3): `SparseCoder` trained as its `Trainer` does (b_dec = the first
  batch's mean, decoder renormalised before and its parallel gradient removed after each
  step, FVU loss, no AuxK by default), with its default optimizer: schedule-free SignSGD
  (momentum 0.95) at lr 5e-3 / sqrt(d_sae / 2^14); evaluated at the schedule-free average, as
  it saves. Its Trainer hooks a Hugging Face model; the step is the same calls on our batches.
- sae-lens (6.54): `TopKTrainingSAE` + `SAETrainer` with `normalize_activations=
  "expected_average_only_in"` (scaled so the mean row norm is sqrt(d_in), estimated from the
  data before training as `fit()` does), its default lr 3e-4, constant schedule, AuxK 1.0.

`lr_grid` multiplies every trainer's recommended lr (the same relative grid for each, since
SignSGD's step size is not on Adam's scale); each trainer's best FVU over the grid is reported.

Reported: rows/s over the summed step times, `ratios.speed_ours_over_sparsify` (and over
sae-lens), held-out FVU at every `eval_every` steps against each trainer's cumulative time
(setup included: data statistics, norm estimates), and the wall time each needs to reach the
same held-out FVU (the worst trainer's best: every trainer reaches it), interpolated between
evaluations. That FVU is the worst final FVU among the trainers that end below every trainer's
starting FVU (ours starts lower: it centres and starts b_dec at the geometric median), so no
trainer reaches it by initialisation alone; a trainer that ends above it reports None.
`sweep` times ours against sparsify alone at other sizes (speed only; `steps 0` runs only it).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field

import torch

from interp.infra.cli_config import Command, choices

TRAINERS = ("ours", "sparsify", "sae-lens")


@dataclass
class BenchTrainFairConfig:
    """`interp bench train`: ours vs EleutherAI sparsify vs sae-lens, each with its recommended settings."""

    d_in: int = 512
    """activation width"""
    d_sae: int = 8192
    """features of each SAE"""
    k: int = 32
    """active features per row"""
    batch_size: int = 4096
    """rows per training step"""
    steps: int = 60
    """training steps per trainer"""
    eval_every: int = 10
    """steps between held-out FVU evaluations (not timed)"""
    eval_rows: int = 8192
    """held-out rows for the FVU"""
    true_features: int = 4096
    """true directions in the synthetic data"""
    active: float = 16
    """true directions active per row"""
    trainers: tuple[str, ...] = field(default=TRAINERS, metadata=choices(list(TRAINERS)))
    """trainers to run"""
    lr_grid: tuple[float, ...] = (1.0,)
    """multipliers of each trainer's recommended learning rate (each trainer's best is reported)"""
    sweep: tuple[str, ...] = ()
    """extra sizes D_IN:D_SAE:K:BATCH timed for speed only, ours against sparsify (e.g. 512:8192:128:4096)"""
    sweep_steps: int = 6
    """timed steps per sweep size (after one warm-up step)"""
    threads: int = 1
    """torch CPU threads"""
    seed: int = 0
    """seed of data and weights"""
    json: bool = False
    """print one JSON object"""

    def __post_init__(self) -> None:
        self.trainers = tuple(self.trainers)
        bad = [t for t in self.trainers if t not in TRAINERS]
        if bad or "ours" not in self.trainers:
            raise ValueError(f"trainers must include ours and come from {', '.join(TRAINERS)}, got {self.trainers}")
        if self.steps < 0 or self.eval_every < 1 or self.batch_size < 1:
            raise ValueError("steps must be >= 0 (0: only the sweep), eval_every and batch_size positive")
        if self.steps == 0 and not self.sweep:
            raise ValueError("steps 0 runs only the sweep: give sweep sizes")
        if not self.lr_grid or any(m <= 0 for m in self.lr_grid):
            raise ValueError(f"lr_grid needs positive multipliers, got {self.lr_grid}")
        for s in self.sweep:
            parse_size(s)


def parse_size(text: str) -> tuple[int, int, int, int]:
    parts = text.split(":")
    if len(parts) != 4 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"cannot read sweep size {text!r}: write D_IN:D_SAE:K:BATCH, e.g. 512:8192:128:4096")
    d_in, d_sae, k, batch = map(int, parts)
    if k > d_sae:
        raise ValueError(f"sweep size {text!r}: k={k} is larger than d_sae={d_sae}")
    return d_in, d_sae, k, batch


@contextlib.contextmanager
def _quiet():
    """sparsify and sae-lens print and warn on import and setup; keep the report readable."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
            contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


class _Ours:
    name = "ours"

    def __init__(self, d_in, d_sae, k, batch_size, steps, source, seed, lr_mult):
        from saes.sae import SAEConfig, lr_for
        from saes.train import TrainConfig, Trainer

        self.lr = lr_for(d_sae) * lr_mult
        cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=self.lr, warmup_steps=min(100, max(1, steps // 10)),
                          seed=seed, progress=False, device="cpu", checkpoint_every=10**9, log_every=10**9)
        self.trainer = Trainer(SAEConfig(arch="topk", d_in=d_in, d_sae=d_sae, k=k), cfg, source, None)
        self.g = 0

    def step(self, batch):
        self.trainer.run_step(self.g, batch)
        self.g += 1

    @torch.no_grad()
    def reconstruct(self, x):
        return self.trainer.sae(x)  # raw activations in and out (the normalisation is applied inside)


class _Sparsify:
    name = "sparsify"

    def __init__(self, d_in, d_sae, k, batch_size, steps, source, seed, lr_mult):
        with _quiet():
            from schedulefree import ScheduleFreeWrapper
            from sparsify import SparseCoder, SparseCoderConfig
            from sparsify.sign_sgd import SignSGD

        torch.manual_seed(seed)  # as sparsify's Trainer seeds each SparseCoder
        self.coder = SparseCoder(d_in, SparseCoderConfig(num_latents=d_sae, k=k), "cpu", dtype=torch.float32)
        self.lr = 5e-3 / (d_sae / 2**14) ** 0.5 * lr_mult  # sparsify's default for its default optimizer, signum
        self.opt = ScheduleFreeWrapper(SignSGD([{"params": self.coder.parameters(), "lr": self.lr}]), momentum=0.95)
        self.opt.train()
        self.first = True

    def step(self, batch):
        coder = self.coder
        if self.first:  # sparsify: "ensure the preactivations are centered at initialization"
            coder.b_dec.data = batch.mean(0).to(coder.dtype)
            self.first = False
        coder.set_decoder_norm_to_unit_norm()
        out = coder(batch, dead_mask=None)  # auxk_alpha defaults to 0: no dead mask
        out.fvu.backward()  # + auxk_alpha * auxk (0) + multi_topk_fvu / 8 (multi_topk off)
        coder.remove_gradient_parallel_to_decoder_directions()
        self.opt.step()
        self.opt.zero_grad()

    @torch.no_grad()
    def reconstruct(self, x):
        self.opt.eval()  # schedule-free: evaluate (and save, as sparsify does) at the averaged weights
        try:
            return self.coder(x).sae_out
        finally:
            self.opt.train()


class _SaeLens:
    name = "sae-lens"

    def __init__(self, d_in, d_sae, k, batch_size, steps, source, seed, lr_mult):
        with _quiet():
            from sae_lens.config import LoggingConfig, SAETrainerConfig
            from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
            from sae_lens.training.sae_trainer import SAETrainer

            torch.manual_seed(seed)
            self.sae = TopKTrainingSAE(TopKTrainingSAEConfig(
                d_in=d_in, d_sae=d_sae, k=k, dtype="float32", device="cpu",
                normalize_activations="expected_average_only_in"))
            self.lr = 3e-4 * lr_mult  # SAETrainerConfig's default
            tcfg = SAETrainerConfig(total_training_samples=steps * batch_size, train_batch_size_samples=batch_size,
                                    lr=self.lr, lr_end=self.lr, device="cpu", autocast=False,
                                    feature_sampling_window=10**9, logger=LoggingConfig(log_to_wandb=False))
            stream = source.batches(batch_size, seed=seed + 7)  # its norm estimate reads batches of its own
            self.trainer = SAETrainer(cfg=tcfg, sae=self.sae, data_provider=stream)
            self.trainer.activation_scaler.estimate_scaling_factor(d_in=d_in, data_provider=stream,
                                                                   n_batches_for_norm_estimate=4)
        self.scale = float(self.trainer.activation_scaler.scaling_factor)

    def step(self, batch):
        with _quiet():
            self.trainer.step(batch)
        self.trainer.n_training_steps += 1

    @torch.no_grad()
    def reconstruct(self, x):
        self.sae.eval()
        try:
            return self.sae(x * self.scale) / self.scale  # what fold_activation_norm_scaling_factor gives
        finally:
            self.sae.train()


ADAPTERS = {"ours": _Ours, "sparsify": _Sparsify, "sae-lens": _SaeLens}


def _fvu(recon, x) -> float:
    with torch.no_grad():
        out = torch.cat([recon(x[s:s + 4096]) for s in range(0, x.shape[0], 4096)])
    return float(((out - x) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())


def common_target(best: dict) -> float:
    """The held-out FVU every comparison is timed to: the worst final FVU among the trainers that end
    below every trainer's starting FVU (so no trainer 'reaches' it by its initialisation alone). A
    trainer that ends above it never reaches it (reported as None)."""
    start = min(r["curve"][0][2] for r in best.values())
    below = [r["fvu"] for r in best.values() if r["fvu"] < start]
    return max(below) if below else min(r["fvu"] for r in best.values())


def _time_to(curve: list[tuple[int, float, float]], target: float) -> float | None:
    """Seconds (cumulative, setup included) at which a (step, seconds, fvu) curve first reaches `target`,
    interpolated linearly between evaluations; None if it never does."""
    prev = None
    for step, t, f in curve:
        if f <= target:
            if prev is None or prev[2] <= f:
                return round(t, 3)
            _, t0, f0 = prev
            return round(t0 + (t - t0) * (f0 - target) / (f0 - f), 3)
        prev = (step, t, f)
    return None


def _lockstep(runs: dict, source, batch_size: int, steps: int, seed: int, d_in: int, d_sae: int,
              held_out=None, eval_every: int = 0, setup: dict | None = None):
    """Step every run on the same batches in rotating order; (step times, matmul times, FVU curves)."""
    names = list(runs)
    times = {n: [] for n in names}
    curves = {n: [] for n in names}
    mm_x, mm_w = torch.randn(batch_size, d_in), torch.randn(d_in, d_sae)
    mm_x @ mm_w
    matmul = []
    if held_out is not None:
        for n in names:
            curves[n].append((0, setup[n], _fvu(runs[n].reconstruct, held_out)))
    for i, batch in enumerate(source.batches(batch_size, seed=seed)):
        if i == steps:
            break
        for n in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            runs[n].step(batch)
            times[n].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        mm_x @ mm_w
        matmul.append(time.perf_counter() - t0)
        if held_out is not None and ((i + 1) % eval_every == 0 or i + 1 == steps):
            for n in names:
                curves[n].append((i + 1, setup[n] + sum(times[n]), _fvu(runs[n].reconstruct, held_out)))
    return times, matmul, curves


def _import_all(trainers) -> None:
    with _quiet():
        import saes.train  # noqa: F401
        if "sparsify" in trainers:
            import schedulefree  # noqa: F401
            import sparsify  # noqa: F401
        if "sae-lens" in trainers:
            import sae_lens.saes.topk_sae  # noqa: F401
            import sae_lens.training.sae_trainer  # noqa: F401


def _build(name, d_in, d_sae, k, batch_size, steps, source, seed, lr_mult):
    t0 = time.perf_counter()
    with _quiet():
        run = ADAPTERS[name](d_in, d_sae, k, batch_size, steps, source, seed, lr_mult)
    return run, time.perf_counter() - t0


def _sweep_size(text: str, cfg: BenchTrainFairConfig) -> dict:
    from saes.data import TensorSource, synthetic_activations

    d_in, d_sae, k, batch = parse_size(text)
    _import_all(("ours", "sparsify"))
    n = (cfg.sweep_steps + 1) * batch
    source = TensorSource(synthetic_activations(n, d_in, n_features=max(d_sae // 2, 64), active=cfg.active,
                                                seed=cfg.seed))
    runs = {name: _build(name, d_in, d_sae, k, batch, cfg.sweep_steps + 1, source, cfg.seed, 1.0)[0]
            for name in ("ours", "sparsify")}
    times, matmul, _ = _lockstep(runs, source, batch, cfg.sweep_steps + 1, cfg.seed, d_in, d_sae)
    med = {name: statistics.median(t[1:]) for name, t in times.items()}  # step 0 is the warm-up
    mm = statistics.median(matmul[1:])
    out = {"size": text, "ours_step_ms": round(med["ours"] * 1e3, 1), "sparsify_step_ms": round(med["sparsify"] * 1e3, 1),
           "matmul_ms": round(mm * 1e3, 1), "speed_ours_over_sparsify": round(med["sparsify"] / med["ours"], 3),
           "ours_step_over_matmul": round(med["ours"] / mm, 3), "sparsify_step_over_matmul": round(med["sparsify"] / mm, 3)}
    del runs
    return out


def _compare(cfg: BenchTrainFairConfig, say) -> dict:
    """The lockstep comparison at the main size, over the lr grid; the report's main part."""
    from saes.data import TensorSource, synthetic_activations

    n_train = cfg.steps * cfg.batch_size
    data = synthetic_activations(n_train + cfg.eval_rows, cfg.d_in, n_features=cfg.true_features, active=cfg.active,
                                 seed=cfg.seed)
    source, held_out = TensorSource(data[:n_train]), data[n_train:]
    grid_results = []
    for mult in cfg.lr_grid:
        runs, setup = {}, {}
        for name in cfg.trainers:
            runs[name], setup[name] = _build(name, cfg.d_in, cfg.d_sae, cfg.k, cfg.batch_size, cfg.steps, source,
                                             cfg.seed, mult)
        say(f"lr x{mult:g}: training {', '.join(runs)} in lockstep, {cfg.steps} steps of {cfg.batch_size} rows, "
            f"d_in {cfg.d_in}, d_sae {cfg.d_sae}, k {cfg.k}")
        times, matmul, curves = _lockstep(runs, source, cfg.batch_size, cfg.steps, cfg.seed, cfg.d_in, cfg.d_sae,
                                          held_out, cfg.eval_every, setup)
        per = {}
        for name, run in runs.items():
            t = times[name]
            per[name] = {"lr": run.lr, "lr_multiplier": mult, "setup_s": round(setup[name], 3),
                         "acts_per_s": round(len(t) * cfg.batch_size / sum(t), 1), "train_s": round(sum(t), 3),
                         "step_ms_median": round(statistics.median(t) * 1e3, 2),
                         "fvu": round(curves[name][-1][2], 5), "best_fvu": round(min(c[2] for c in curves[name]), 5),
                         "curve": [(st, round(tt, 3), round(f, 5)) for st, tt, f in curves[name]]}
            say(f"  {name}: lr {run.lr:.2e}, {per[name]['acts_per_s']:,.0f} rows/s, held-out FVU {per[name]['fvu']:.4f}")
        grid_results.append({"lr_multiplier": mult, "results": per,
                             "matmul_ms_median": round(statistics.median(matmul) * 1e3, 2),
                             "paired_ours_over_matmul": round(statistics.median(
                                 [a / b for a, b in zip(times["ours"], matmul)]), 3)})
        del runs
    best = {name: min((g["results"][name] for g in grid_results), key=lambda r: r["fvu"]) for name in cfg.trainers}
    target = common_target(best)
    time_to = {name: _time_to(r["curve"], target) for name, r in best.items()}
    time_to_each = {other: {name: _time_to(r["curve"], best[other]["fvu"]) for name, r in best.items()}
                    for other in best}
    speeds = {name: statistics.median(g["results"][name]["acts_per_s"] for g in grid_results) for name in cfg.trainers}
    ratios = {}
    for other in cfg.trainers:
        if other != "ours":
            key = other.replace("-", "_")
            ratios[f"speed_ours_over_{key}"] = round(speeds["ours"] / speeds[other], 3)
            if time_to["ours"] and time_to[other]:
                ratios[f"time_to_fvu_{key}_over_ours"] = round(time_to[other] / time_to["ours"], 3)
    ratios["ours_step_over_matmul"] = grid_results[0]["paired_ours_over_matmul"]
    say(f"same held-out FVU {target:.4f}: " + ", ".join(f"{n} {t if t is not None else 'never'} s"
                                                     for n, t in time_to.items()))
    if not math.isfinite(target):
        raise RuntimeError("a trainer diverged (FVU is not finite)")
    return {"grid": grid_results, "best": {n: {k: v for k, v in r.items() if k != "curve"} for n, r in best.items()},
            "target_fvu": round(target, 5), "seconds_to_target_fvu": time_to, "seconds_to_final_fvu_of": time_to_each,
            "ratios": ratios}


def bench_train_fair(cfg: BenchTrainFairConfig) -> dict:
    """The fair training benchmark; returns the report (see the module docstring)."""
    torch.set_num_threads(cfg.threads)
    say = (lambda *a: None) if cfg.json else print
    _import_all(cfg.trainers)  # setup times below are the trainers' own, not first imports
    report = {"config": asdict(cfg)}
    report.update(_compare(cfg, say) if cfg.steps else {"ratios": {}})
    sweep = []
    for s in cfg.sweep:
        sweep.append(_sweep_size(s, cfg))
        r = sweep[-1]
        say(f"  sweep {s}: ours {r['ours_step_ms']:.0f} ms, sparsify {r['sparsify_step_ms']:.0f} ms per step "
            f"-> ours {r['speed_ours_over_sparsify']:.2f}x")
    if sweep and "speed_ours_over_sparsify" not in report["ratios"]:
        report["ratios"]["speed_ours_over_sparsify"] = min(r["speed_ours_over_sparsify"] for r in sweep)
    report.update(sweep=sweep, settings=SETTINGS, torch_threads=torch.get_num_threads(), torch=torch.__version__)
    for key, v in report["ratios"].items():
        say(f"  {key}: {v}")
    return report


SETTINGS = {"ours": "Trainer defaults: normalise (centre, unit mean norm), geometric-median b_dec, Adam lr "
                    "2e-4/sqrt(d_sae/2^14), AuxK 1/32, warm-up min(100, steps/10), linear decay over the last 20%",
            "sparsify": "SparseCoder + schedule-free SignSGD (momentum 0.95), lr 5e-3/sqrt(d_sae/2^14), b_dec = first "
                        "batch mean, unit decoder, FVU loss, no AuxK (its defaults)",
            "sae-lens": "TopKTrainingSAE normalize_activations=expected_average_only_in, Adam lr 3e-4 constant, AuxK "
                        "coefficient 1.0 (its defaults)"}


COMMANDS = [Command("bench train", BenchTrainFairConfig, bench_train_fair,
                    "TopK SAE training: ours vs EleutherAI sparsify vs sae-lens, each with its recommended settings; "
                    "speed and time to the same held-out FVU",
                    report=lambda r, cfg: print(json.dumps(r)) if cfg.json else None)]
