"""Train an SAE on cached activations: resumable, data-parallel under torchrun, SAELens output.

    from saes.train import TrainConfig, train
    from saes.sae import SAEConfig
    from saes.data import TensorSource
    result = train(SAEConfig(arch="topk", d_in=512, d_sae=8192, k=32), TrainConfig(steps=2000),
                   TensorSource(acts), "runs/dev")
    result.path  # runs/dev/sae: cfg.json + sae_weights.safetensors, loads in sae_lens

In the run directory (interp.infra.layout) training writes train_run.json (how it was made),
train/metrics.jsonl (one record per log step), train/checkpoint/ (weights, Adam state, dead-
feature counters; written atomically every `checkpoint_every` steps) and sae/ (the final SAE,
normalisation folded in). Re-running the same command resumes from the checkpoint and ends with
the same weights as an uninterrupted run: batches are a pure function of (seed, batch index)
and every update is deterministic on CPU. `interp train RUN` is `run_train(TrainRunConfig)`.

What a step does: normalise the batch (centred, unit mean row norm), the architecture's forward
and loss (saes.architectures: for topk and batchtopk the k-sparse kernels, MSE plus AuxK on dead
features; for jumprelu and relu the L0 / L1 penalty), backward, project the decoder gradient off
the decoder rows, Adam, the architecture's projections, renormalise the decoder rows to unit norm.

Under torchrun (WORLD_SIZE > 1) every rank reads its own share of the batches (global batch
g = step * world + rank, each of batch_size / world rows), gradients and feature firing counts
are summed with one all_reduce per step (gloo on CPU, nccl on CUDA), and rank 0 writes.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch

from interp.infra.cli_config import Command, at_least, check_bounds, choices, hidden, positional
from interp.infra.identity import check_identity
from interp.infra.layout import RunLayout
from interp.infra.records import RecordLog
from saes.sae import SAE, SAEConfig, lr_for

NOT_RUN_DEFINING = ("checkpoint_every", "log_every", "progress", "threads")


@dataclass
class TrainConfig:
    """How an SAE is trained (what it is: SAEConfig)."""

    steps: int = field(default=10_000, metadata=at_least(1))
    """training steps"""
    batch_size: int = field(default=4096, metadata=at_least(1))
    """rows per step, over all ranks"""
    lr: float | None = None
    """peak learning rate (none: 2e-4 / sqrt(d_sae / 16384))"""
    warmup_steps: int = 100
    """linear learning-rate warm-up from lr / warmup_steps"""
    decay_fraction: float = 0.2
    """linear learning-rate decay over this last fraction of the steps, to lr_end * lr"""
    lr_end: float = 0.0
    """learning rate at the end of the decay, as a fraction of the peak"""
    adam_betas: tuple[float, float] = (0.9, 0.999)
    """Adam's betas"""
    adam_eps: float = 1e-8
    """Adam's epsilon"""
    seed: int = 0
    """seed of the weights and of the data order"""
    b_dec_init: str = field(default="geometric_median", metadata=choices(["geometric_median", "mean", "zeros"]))
    """decoder bias initialisation, from the normalised sample"""
    stats_rows: int = 65536
    """rows sampled for the normalisation and the decoder bias initialisation"""
    dead_window: int = 1000
    """steps without firing before a feature counts as dead (drives AuxK)"""
    aux_k: int | None = None
    """topk/batchtopk: dead features per row in AuxK (none: d_in / 2)"""
    aux_coefficient: float = 1 / 32
    """topk/batchtopk: weight of the AuxK loss"""
    sparsity_warmup_steps: int = 0
    """jumprelu/relu: linear warm-up steps of the L0 / L1 penalty"""
    sparse: bool = True
    """topk/batchtopk: the k-sparse kernels (off: the dense reference, slow)"""
    grad_clip: float | None = None
    """max global gradient norm (none: no clipping)"""
    checkpoint_every: int = field(default=500, metadata=at_least(1))
    """steps between checkpoints"""
    log_every: int = field(default=10, metadata=at_least(1))
    """steps between metrics records"""
    device: str = "auto"
    """auto (cuda when present), cpu, cuda, cuda:N"""
    autocast: bool | None = field(default=None, metadata=hidden())
    """bf16 autocast (none: on for cuda)"""
    threads: int | None = None
    """torch CPU threads (1 per process when sharing cores)"""
    progress: bool = True
    """progress bar"""

    def __post_init__(self):
        self.adam_betas = tuple(self.adam_betas)
        check_bounds(self)
        if self.b_dec_init not in ("geometric_median", "mean", "zeros"):
            raise ValueError(f"b_dec_init must be geometric_median, mean or zeros, got {self.b_dec_init!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class TrainResult:
    path: Path | None  # the saved SAE (None on ranks other than 0)
    sae: SAE  # the trained SAE, normalisation folded
    steps: int
    last: dict[str, Any] = field(default_factory=dict)  # the last metrics record


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_steps = int(cfg.decay_fraction * cfg.steps)
    start = cfg.steps - decay_steps
    if decay_steps > 0 and step >= start:
        frac = (cfg.steps - step) / decay_steps
        return cfg.lr_end + (1 - cfg.lr_end) * frac
    return 1.0


def geometric_median(x: torch.Tensor, iters: int = 50, eps: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm, started at the mean."""
    x = x.double()
    m = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - m).norm(dim=1).clamp_min(eps)
        new = (w[:, None] * x).sum(0) / w.sum()
        if (new - m).norm() < eps * (1 + m.norm()):
            m = new
            break
        m = new
    return m.float()


def zca_whitening(x: torch.Tensor, ridge: float) -> torch.Tensor:
    """The symmetric P with which centred rows `x` come out with unit variance in every direction whose
    eigenvalue is well above `ridge` times the largest (those below are scaled less, so noise directions
    are not blown up). Computed in float64."""
    x = x.double()
    cov = x.T @ x / max(1, len(x) - 1)
    lam, u = torch.linalg.eigh(cov)
    lam = lam.clamp_min(0)
    if not float(lam[-1]) > 0:
        raise ValueError("cannot whiten: the activations do not vary (their covariance is zero)")
    return ((u * (lam + ridge * lam[-1]).rsqrt()) @ u.T).float()


def check_finite(x: torch.Tensor, where: str) -> None:
    if not bool(torch.isfinite(x).all()):
        bad = (~torch.isfinite(x)).any(dim=1).nonzero().squeeze(1).tolist()
        shown = ", ".join(map(str, bad[:20])) + (f", ... ({len(bad)} rows)" if len(bad) > 20 else "")
        raise ValueError(f"{where}: NaN or Inf in rows {shown} (row numbers within the batch)")


def _transpose_in_place(p: torch.Tensor, state: dict | None) -> None:
    p.data = p.data.t()
    if p.grad is not None:
        p.grad = p.grad.t()
    for key, v in (state or {}).items():
        if torch.is_tensor(v) and v.dim() == 2:
            state[key] = v.t()


class contiguous_for_step:
    """During an optimizer step, show it every transposed-contiguous 2-D parameter (W_enc in the training
    layout) as its contiguous transpose, with its gradient and moments. Fused Adam on the CPU copies
    non-contiguous tensors first: one [d_in, d_sae] matrix at the peak of every step (2.1 GB at 131072 x
    4096). Adam is elementwise, so the step is the same; outside it, everything keeps its layout."""

    def __init__(self, opt: torch.optim.Optimizer):
        self.opt, self.swapped = opt, []

    def __enter__(self):
        for group in self.opt.param_groups:
            for p in group["params"]:
                if p.dim() == 2 and not p.is_contiguous() and p.t().is_contiguous():
                    _transpose_in_place(p, self.opt.state.get(p))
                    self.swapped.append(p)
        return self

    def __exit__(self, *exc):
        for p in self.swapped:  # the moments a first step created are turned back with it
            _transpose_in_place(p, self.opt.state.get(p))
        self.swapped = []


class Trainer:
    def __init__(self, sae_cfg: SAEConfig, cfg: TrainConfig, source, run: str | Path | RunLayout | None):
        self.sae_cfg, self.cfg, self.source = sae_cfg, cfg, source
        self.run = RunLayout.of(run) if run is not None else None
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self._setup_distributed()
        self._check_source()
        self.batch_rows = cfg.batch_size // self.world
        if cfg.device == "auto":
            dev = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        elif cfg.device == "cuda" and self.world > 1:
            dev = f"cuda:{self.local_rank}"
        else:
            dev = cfg.device
        self.device = torch.device(dev)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.use_autocast = self.device.type == "cuda" if cfg.autocast is None else cfg.autocast
        self.lr = cfg.lr if cfg.lr is not None else lr_for(sae_cfg.d_sae)

        gen = torch.Generator().manual_seed(cfg.seed)
        self.sae = SAE(replace(sae_cfg, device=str(self.device)), generator=gen).to(self.device)
        self.sae.use_training_layout()
        params = [p for p in self.sae.parameters()]
        fused = self.device.type in ("cpu", "cuda") and all(p.dtype == torch.float32 for p in params)
        self.opt = torch.optim.Adam(params, lr=self.lr, betas=cfg.adam_betas, eps=cfg.adam_eps, fused=fused or None)
        d_sae = sae_cfg.d_sae
        self.steps_since_fired = torch.zeros(d_sae, dtype=torch.long, device=self.device)
        self.fire_total = torch.zeros(d_sae, dtype=torch.float64, device=self.device)
        self.rows_seen = 0
        self.step = 0
        self.step_times: list[float] = []
        self.run_meta = {"sae": sae_cfg.to_dict() | {"device": None},
                         "train": {k: v for k, v in cfg.to_dict().items() if k not in NOT_RUN_DEFINING},
                         "source": {"d": source.d, "n_rows": source.n_rows}, "world_size": self.world}
        self.run_meta = json.loads(json.dumps(self.run_meta))
        self.ckpt_dir = self.run.checkpoint if self.run is not None else None
        if not self._resume():
            self._init_from_data()
            if self.world > 1:
                self._broadcast_params()

    # ---------------------------------------------------------------- setup
    def _setup_distributed(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self._own_pg = False
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                wants_cuda = self.cfg.device == "auto" or str(self.cfg.device).startswith("cuda")
                backend = "nccl" if torch.cuda.is_available() and wants_cuda else "gloo"
                dist.init_process_group(backend=backend)
                self._own_pg = True
            if self.cfg.batch_size % self.world:
                raise ValueError(f"batch_size {self.cfg.batch_size} is not divisible by the {self.world} ranks")

    def _check_source(self) -> None:
        src, cfg = self.source, self.sae_cfg
        n_rows = int(getattr(src, "n_rows", 0) or 0)
        if n_rows <= 0:
            raise ValueError("the activation source is empty (n_rows=0): nothing to train on")
        if src.d != cfg.d_in:
            raise ValueError(f"the activation source has width d={src.d}, but the SAE expects d_in={cfg.d_in}")
        rows = self.cfg.batch_size // self.world
        if n_rows < rows:
            raise ValueError(f"the activation source has {n_rows} rows, fewer than one batch of {rows}")

    def _resume(self) -> bool:
        from interp.infra.checkpoint import find_checkpoint, load_checkpoint

        found = find_checkpoint(self.ckpt_dir) if self.ckpt_dir is not None else None
        if not found:
            return False
        state, meta = load_checkpoint(found)
        check_identity(meta.get("run"), self.run_meta, f"checkpoint {found}",
                       "use another run directory or delete the checkpoint to start over")
        load_checkpoint(found, self.opt)
        self._match_optimizer_layout()
        self.steps_since_fired.copy_(state.pop("trainer.steps_since_fired"))
        self.fire_total.copy_(state.pop("trainer.fire_total"))
        state.setdefault("norm_whiten", torch.empty(0))  # checkpoints from before whitening existed: none
        # sizes the whitening buffers and derives the inverse, which the checkpoint does not hold
        self.sae.set_normalisation(state["norm_mean"], float(state["norm_scale"]), state["norm_whiten"])
        self.sae.load_state_dict({k: v.to(self.device) for k, v in state.items()})
        self.step = int(meta["step"])
        self.rows_seen = int(meta["rows_seen"])
        if self.rank == 0 and self.run is not None:  # drop the records after the checkpoint: they are redone
            step = self.step
            RecordLog(self.run.metrics).keep(lambda r: r.get("step", 0) <= step)
        return True

    def _match_optimizer_layout(self) -> None:
        """Adam's moments come back contiguous; give them their parameter's strides again."""
        for p in self.sae.parameters():
            st = self.opt.state.get(p, {})
            for k, v in list(st.items()):
                if torch.is_tensor(v) and v.shape == p.shape and v.stride() != p.stride():
                    w = torch.empty_strided(p.size(), p.stride(), dtype=v.dtype, device=p.device)
                    w.copy_(v)
                    st[k] = w

    @torch.no_grad()
    def _init_from_data(self) -> None:
        cfg = self.cfg
        rows, got = [], 0
        sample_bs = min(self.batch_rows, cfg.stats_rows)
        for b, batch in enumerate(self.source.batches(sample_bs, seed=cfg.seed, start_batch=0)):
            self._check_batch(batch, f"statistics sample batch {b}")
            rows.append(batch.to(torch.float32))
            got += batch.shape[0]
            if got >= cfg.stats_rows:
                break
        if not rows:
            raise ValueError("the activation source yielded no batches (is it empty?)")
        sample = torch.cat(rows)[: cfg.stats_rows].to(self.device)
        mean, scale, whiten = torch.zeros(self.sae_cfg.d_in, device=self.device), 1.0, None
        if self.sae_cfg.normalize:
            stats = None
            if callable(getattr(self.source, "stats", None)):
                try:
                    stats = self.source.stats()
                except NotImplementedError:
                    stats = None
            if stats and stats.get("mean") is not None:
                mean = torch.as_tensor(stats["mean"]).to(self.device, torch.float32).reshape(-1)
                if mean.numel() != self.sae_cfg.d_in:
                    raise ValueError(f"source.stats()['mean'] has {mean.numel()} entries, expected d_in="
                                     f"{self.sae_cfg.d_in}")
            else:
                mean = sample.mean(0)
            centred = sample - mean
            if self.sae_cfg.whiten:
                whiten = zca_whitening(centred, self.sae_cfg.whiten).to(self.device)
                centred = centred @ whiten
            scale = float(centred.norm(dim=1).mean())
            if not math.isfinite(scale) or scale <= 0:
                raise ValueError(f"cannot normalise: the mean norm of the centred activations is {scale}")
        self.sae.set_normalisation(mean, scale, whiten)
        x = self.sae.normalise(sample)
        if cfg.b_dec_init == "geometric_median":
            self.sae.b_dec.copy_(geometric_median(x))
        elif cfg.b_dec_init == "mean":
            self.sae.b_dec.copy_(x.mean(0))

    def _broadcast_params(self) -> None:
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        tensors = [p.data for p in self.sae.parameters()] + [b for b in self.sae.buffers()]
        flat = _flatten_dense_tensors(tensors)
        dist.broadcast(flat, 0)
        for t, new in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
            t.copy_(new)

    def _check_batch(self, batch: torch.Tensor, where: str) -> None:
        if batch.ndim != 2 or batch.shape[1] != self.sae_cfg.d_in:
            raise ValueError(f"{where}: expected rows of width d_in={self.sae_cfg.d_in}, "
                             f"got a batch of shape {tuple(batch.shape)}")
        check_finite(batch, where)

    # ---------------------------------------------------------------- data
    def _stream(self, start_step: int):
        return rank_batches(self.source, self.batch_rows, seed=self.cfg.seed, start_step=start_step,
                            rank=self.rank, world=self.world)

    # ---------------------------------------------------------------- training
    def fit(self, stop_at: int | None = None) -> TrainResult:
        """Train to cfg.steps (or stop after step `stop_at`, checkpointed, as if killed there)."""
        from tqdm import tqdm

        cfg, sae = self.cfg, self.sae
        end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
        writer = self.rank == 0 and self.run is not None
        if writer:
            from interp.infra.runinfo import write_run_info

            self.run.mkdir()
            write_run_info(self.run.run_info("train"), {"command": "train", "run": self.run_meta,
                                                        "resumed_at": self.step, "lr": self.lr,
                                                        "device": str(self.device), "autocast": self.use_autocast})
        log = RecordLog(self.run.metrics, durable=False) if writer else None  # the checkpoint is the durable state
        bar = tqdm(total=cfg.steps, initial=self.step, desc=f"train {self.sae_cfg.arch} SAE", mininterval=1,
                   disable=not (cfg.progress and self.rank == 0), dynamic_ncols=True)
        t_start, t_log, steps_since_log = time.perf_counter(), time.perf_counter(), 0
        last: dict[str, Any] = {}
        stream = self._stream(self.step) if self.step < end else iter(())
        sae.train()
        for g, batch in stream:
            if self.step >= end:
                break
            t0 = time.perf_counter()
            out, x = self.run_step(g, batch)
            steps_since_log += 1
            self.step_times.append(time.perf_counter() - t0)
            bar.update(1)
            if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                last = self._metrics(x, out, time.perf_counter() - t_start, (time.perf_counter() - t_log)
                                     / steps_since_log)
                t_log, steps_since_log = time.perf_counter(), 0
                bar.set_postfix(loss=f"{last['loss']:.4g}", fvu=f"{last['fvu']:.4f}", l0=f"{last['l0']:.1f}",
                                dead=f"{last['dead_frac']:.1%}", refresh=False)
                if log is not None:
                    log.append(last)
            if writer and (self.step % cfg.checkpoint_every == 0 or self.step == end):
                self.save_checkpoint()
        bar.close()
        final = self.final_sae()
        path = None
        if writer and self.step >= cfg.steps:
            freq = (self.fire_total / max(1, self.rows_seen)).float()
            extra = {"l0": last.get("l0"), "num_dead_features": int((self.steps_since_fired >= cfg.dead_window).sum()),
                     "training_steps": self.step, "training_rows": self.rows_seen}
            path = final.save(self.run.sae, extra_metadata=extra, sparsity=freq)
            if self.run.metrics.exists():
                write_training_figure(self.run, cfg.dead_window)  # train/curves.html and .png
        if self.world > 1:
            import torch.distributed as dist

            self._check_ranks_agree()
            dist.barrier()
            if self._own_pg:
                # collect cyclic garbage first: gloo tensors freed during interpreter shutdown can abort
                # the process ("terminate called without an active exception"), seen here 2 runs in 10
                import gc

                gc.collect()
                dist.destroy_process_group()
                gc.collect()
        return TrainResult(path=path, sae=final, steps=self.step, last=last)

    def run_step(self, g: int, batch: torch.Tensor):
        """One optimisation step on raw batch `batch` (global batch index g). Returns (output, normalised x)."""
        cfg, sae = self.cfg, self.sae
        step = self.step
        self._check_batch(batch, f"batch {g} (step {step})")
        x = sae.normalise(batch.to(self.device, torch.float32, non_blocking=True))
        for group in self.opt.param_groups:
            group["lr"] = self.lr * lr_multiplier(step, cfg)
        dead = sae.arch.dead_features(self.steps_since_fired, cfg.dead_window)
        sparsity_scale = min(1.0, (step + 1) / cfg.sparsity_warmup_steps) if cfg.sparsity_warmup_steps else 1.0
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.use_autocast):
            out = sae.training_forward(x, dead, sparse=cfg.sparse, aux_k=cfg.aux_k,
                                       aux_coefficient=cfg.aux_coefficient, sparsity_scale=sparsity_scale)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        fire_counts = out.fire_counts
        if self.world > 1:
            fire_counts = self._all_reduce_grads(fire_counts)
        sae.project_decoder_grad_()
        if cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        with contiguous_for_step(self.opt):
            self.opt.step()
        sae.normalize_decoder_()
        sae.arch.after_step(sae)
        self.steps_since_fired += 1
        self.steps_since_fired[fire_counts > 0] = 0
        self.fire_total += fire_counts
        self.rows_seen += cfg.batch_size
        self.step += 1
        return out, x

    def _all_reduce_grads(self, fire_counts: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        grads = [p.grad for p in self.sae.parameters() if p.grad is not None]
        flat = _flatten_dense_tensors(grads + [fire_counts.to(grads[0].dtype)])
        dist.all_reduce(flat)
        parts = _unflatten_dense_tensors(flat, grads + [fire_counts.to(grads[0].dtype)])
        for gr, new in zip(grads, parts[:-1]):
            gr.copy_(new).div_(self.world)
        return parts[-1].round().to(fire_counts.dtype)

    @torch.no_grad()
    def _check_ranks_agree(self) -> None:
        """Every rank must end with the same weights (same init, same averaged gradients)."""
        import torch.distributed as dist

        sums = torch.stack([p.detach().double().sum() for p in self.sae.parameters()])
        lo, hi = sums.clone(), sums.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        if not torch.equal(lo, hi):
            raise RuntimeError(f"data-parallel ranks ended with different weights (parameter sums {lo.tolist()} "
                               f"vs {hi.tolist()})")

    @torch.no_grad()
    def _metrics(self, x, out, elapsed: float, step_s: float) -> dict[str, Any]:
        err = (out.recon.float() - x).pow(2).sum()
        var = (x - x.mean(0)).pow(2).sum()
        vec = torch.stack([out.loss.detach().float(), out.mse.float(), out.aux.float(), out.sparsity.float(),
                           err, var, out.l0.float()])
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(vec)
            vec /= self.world
        v = vec.tolist()
        dead = (self.steps_since_fired >= self.cfg.dead_window).float().mean().item()
        return {"step": self.step, "rows": self.rows_seen, "loss": v[0], "mse": v[1], "aux": v[2],
                "sparsity": v[3], "fvu": v[4] / max(v[5], 1e-30), "l0": v[6], "dead_frac": dead,
                "lr": self.opt.param_groups[0]["lr"], "elapsed_s": round(elapsed, 3), "step_s": round(step_s, 4)}

    def save_checkpoint(self) -> None:
        from interp.infra.checkpoint import save_checkpoint

        state = {k: v.detach().cpu() for k, v in self.sae.state_dict().items()}
        state["trainer.steps_since_fired"] = self.steps_since_fired.cpu()
        state["trainer.fire_total"] = self.fire_total.cpu()
        save_checkpoint(self.ckpt_dir, state, self.opt,
                        {"step": self.step, "rows_seen": self.rows_seen, "run": self.run_meta})

    def final_sae(self) -> SAE:
        """A copy of the trained SAE on the CPU with its normalisation folded in (what gets saved)."""
        import copy

        sae = copy.deepcopy(self.sae).to("cpu")
        sae.cfg = copy.deepcopy(self.sae.cfg)
        sae.cfg.device = "cpu"
        with torch.no_grad():
            sae.W_enc.data = sae.W_enc.data.contiguous()
        sae.fold_normalisation()
        return sae.eval()


def rank_batches(source, batch_rows: int, *, seed: int, start_step: int = 0, rank: int = 0, world: int = 1):
    """Yields (global batch index, batch) for one rank: global batch g = step * world + rank.

    Batch g is batch g of the source's stream `source.batches(batch_rows, seed=seed)`. A source
    that takes `rank`/`world_size` yields only this rank's batches; otherwise the other ranks'
    batches are read and skipped. A stream that ends (a one-epoch source) continues with epoch
    e = g // (n_rows // batch_rows) read from seed `seed + 1_000_003 * e`.
    """
    per_epoch = source.n_rows // batch_rows
    if per_epoch <= 0:
        raise ValueError(f"the activation source has {source.n_rows} rows, fewer than one batch of {batch_rows}")
    params = inspect.signature(source.batches).parameters
    rank_kw = world > 1 and "rank" in params and "world_size" in params

    def open_stream(g: int, finite_epoch: int | None):
        if finite_epoch is None:  # the endless stream
            kw = {"rank": rank, "world_size": world} if rank_kw else {}
            return iter(source.batches(batch_rows, seed=seed, start_batch=g, **kw)), (world if rank_kw else 1)
        within = g - finite_epoch * per_epoch
        return iter(source.batches(batch_rows, seed=seed + 1_000_003 * finite_epoch, start_batch=within)), 1

    def take(it, pos: int, g: int, step_by: int):
        try:
            while pos < g:
                next(it)
                pos += step_by
            return next(it)
        except StopIteration:
            return None

    finite_epoch = None  # set once the stream turns out to end (a one-epoch source)
    it, step_by, pos = None, 1, 0
    step = start_step
    while True:
        g = step * world + rank
        if it is None or (finite_epoch is not None and g // per_epoch != finite_epoch):
            if finite_epoch is not None:
                finite_epoch = g // per_epoch
            it, step_by = open_stream(g, finite_epoch)
            pos = g
        batch = take(it, pos, g, step_by)
        if batch is None:
            if finite_epoch is not None or g < per_epoch:
                raise _ended(source, g, per_epoch, batch_rows)
            finite_epoch = g // per_epoch
            it, step_by = open_stream(g, finite_epoch)
            batch = take(it, g, g, step_by)
            if batch is None:
                raise _ended(source, g, per_epoch, batch_rows)
        pos = g + step_by
        yield g, batch
        step += 1


def train_steps_per_second(sae_cfg: SAEConfig, cfg: TrainConfig, source, steps: int = 5, warmup: int = 1) -> float:
    """Steady-state optimisation steps per second of the trainer on `source` (nothing written).

    The batches are read first, so only the training step is timed (used by `interp bench cache`
    to compare the reader's rate with the trainer's).
    """
    trainer = Trainer(sae_cfg, replace(cfg, progress=False), source, None)
    stream = trainer._stream(0)
    batches = [next(stream) for _ in range(warmup + steps)]
    for g, batch in batches[:warmup]:
        trainer.run_step(g, batch)
    t0 = time.perf_counter()
    for g, batch in batches[warmup:]:
        trainer.run_step(g, batch)
    return steps / (time.perf_counter() - t0)


def _ended(source, g: int, per_epoch: int, batch_rows: int) -> ValueError:
    return ValueError(f"the activation source's batches() ended early, at global batch {g} (n_rows={source.n_rows} "
                      f"promises {per_epoch} batches of {batch_rows} per epoch)")


def train(sae_cfg: SAEConfig, cfg: TrainConfig, source, run: str | Path | RunLayout | None,
          stop_at: int | None = None) -> TrainResult:
    """Train (or resume) an SAE into run directory `run` (None: write nothing); see the module docstring."""
    return Trainer(sae_cfg, cfg, source, run).fit(stop_at=stop_at)


# ---------------------------------------------------------------- `interp train`


@dataclass
class TrainRunConfig:
    """`interp train`: train an SAE on a run directory's activations (resumable; data-parallel under torchrun)."""

    run: str | None = field(default=None, metadata=positional())
    """run directory: reads RUN/activations.h5 (or a [rows, d] tensor in RUN/activations.safetensors), writes
    RUN/sae/ and RUN/train/"""
    sae: SAEConfig = field(default_factory=SAEConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def open_source(run: str | Path | RunLayout):
    """The run's activations as a BatchSource: the cache (ActivationReader), else an in-memory tensor
    from RUN/activations.safetensors (key `activations`, or its only tensor)."""
    layout = RunLayout.of(run)
    if layout.cache.exists():
        from interp.cache.reader import ActivationReader

        return ActivationReader(layout.cache)
    if layout.cache_tensor.exists():
        from safetensors.torch import load_file

        from saes.data import TensorSource

        tensors = load_file(layout.cache_tensor)
        if "activations" in tensors:
            return TensorSource(tensors["activations"])
        if len(tensors) != 1:
            raise ValueError(f"{layout.cache_tensor}: expected a tensor named 'activations' or a single tensor, "
                             f"got {sorted(tensors)}")
        return TensorSource(next(iter(tensors.values())))
    raise FileNotFoundError(f"no activation cache at {layout.cache}: make one with `interp cache {layout.root}`, "
                            "or link one there")


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


def run_train(cfg: TrainRunConfig) -> TrainResult:
    """Train the SAE `cfg.sae` (its width, model and hook taken from the run's cache) into the run."""
    layout = RunLayout.of(cfg.run)
    source = open_source(layout)
    found = cache_metadata(source)
    hook_layer = cfg.sae.hook_layer if cfg.sae.hook_layer is not None else found.pop("hook_layer", None)
    sae_cfg = replace(cfg.sae, d_in=source.d, model_name=cfg.sae.model_name or found.pop("model_name", None),
                      hook_name=cfg.sae.hook_name or found.pop("hook_name", None), hook_layer=hook_layer,
                      metadata={**found, **cfg.sae.metadata})
    try:
        return train(sae_cfg, cfg.train, source, layout)
    finally:
        close = getattr(source, "close", None)
        if close:
            close()


def write_training_figure(run: str | Path | RunLayout, dead_window: int | None = None) -> Path:
    """RUN/train/curves.html (plotly.js inside) and curves.png from RUN/train/metrics.jsonl."""
    from interp.infra.plots import write_figure
    from interp.infra.records import read_records
    from saes.figures import training_curves

    layout = RunLayout.of(run)
    return write_figure(training_curves(read_records(layout.metrics), dead_window), layout.training_figure("html"))[0]


def _report(result: TrainResult, cfg: TrainRunConfig) -> None:
    if result.path is not None:
        last, nan = result.last, float("nan")
        print(f"saved SAE: {result.path} (FVU {last.get('fvu', nan):.4f}, L0 {last.get('l0', nan):.1f}, "
              f"{last.get('dead_frac', nan):.1%} silent for the last {cfg.train.dead_window} steps); loads with "
              f"sae_lens.SAE.load_from_disk; curves: {RunLayout.of(cfg.run).training_figure('png')}")


COMMANDS = [Command("train", TrainRunConfig, run_train, "train a sparse autoencoder on a run's activations (resumable)",
                    "Re-running the same command resumes from RUN/train/checkpoint. Under "
                    "`torchrun --nproc_per_node N -m interp.cli train RUN ...` it trains data-parallel.", _report)]
