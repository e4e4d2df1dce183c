"""Sparse autoencoders (TopK, BatchTopK, JumpReLU, ReLU+L1) that save and load in SAELens's format.

On disk an SAE is a directory with `cfg.json` and `sae_weights.safetensors`, exactly what
`sae_lens.SAE.load_from_disk(dir)` reads (checked against sae-lens 6.54):

    ours        saved as SAELens architecture   weights
    topk        "topk" (k, rescale_acts_by_decoder_norm=false)   W_enc b_enc W_dec b_dec
    batchtopk   "jumprelu" (its inference form, as sae-lens exports it)   + threshold
    jumprelu    "jumprelu"                                               + threshold
    relu        "standard"                                               W_enc b_enc W_dec b_dec

with W_enc [d_in, d_sae] and W_dec [d_sae, d_in]. `cfg.json`'s metadata carries
`sae_lens_version` and our own full config under "lmmscope".

Training runs in a normalised space, x' = (x - mean) / scale (centred, unit mean row norm).
`encode`/`decode` always take and give raw activations, and `save` folds the normalisation
into the weights (b_dec <- scale*b_dec + mean, b_enc and threshold <- scale*them; W_enc and the
unit-norm W_dec unchanged; activations come out in raw units), so the saved SAE works on raw
activations with no preprocessing.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from saes import kernels

ARCHS = ("topk", "batchtopk", "jumprelu", "relu")
SAE_LENS_ARCH = {"topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu", "relu": "standard"}
CFG_FILENAME = "cfg.json"
WEIGHTS_FILENAME = "sae_weights.safetensors"
SPARSITY_FILENAME = "sparsity.safetensors"
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def sae_lens_version() -> str:
    """The installed sae-lens version (what `cfg.json` declares it was written for)."""
    try:
        return importlib_metadata.version("sae-lens")
    except importlib_metadata.PackageNotFoundError:
        return "6.54.12"  # the format we write is the one of this version


@dataclass
class SAEConfig:
    """What an SAE is: architecture, sizes, sparsity hyperparameters, and where its inputs come from."""

    arch: str = "topk"  # topk | batchtopk | jumprelu | relu
    d_in: int = 512
    d_sae: int = 8192
    k: float = 32  # active latents per row (topk; an integer) or per row on average (batchtopk)
    l1_coefficient: float = 0.1  # relu: weight of the L1 penalty on activations (times decoder norms)
    l0_coefficient: float = 3e-3  # jumprelu: weight of the (straight-through) L0 penalty
    jumprelu_init_threshold: float = 0.01
    jumprelu_bandwidth: float = 0.01  # width of the straight-through estimator's window
    apply_b_dec_to_input: bool = True
    normalize: bool = True  # train on centred activations scaled to unit mean row norm (folded on save)
    dtype: str = "float32"
    device: str = "cpu"
    model_name: str | None = None
    hook_name: str | None = None
    hook_layer: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)  # anything else (data set, cache path, ...)

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"unknown SAE architecture {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got d_in={self.d_in}, d_sae={self.d_sae}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.arch in ("topk", "batchtopk"):
            if not 0 < self.k <= self.d_sae:
                raise ValueError(f"k must be in (0, d_sae={self.d_sae}], got {self.k}")
            if self.arch == "topk":
                if self.k != int(self.k):
                    raise ValueError(f"topk needs an integer k, got {self.k}")
                self.k = int(self.k)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class _JumpReLU(torch.autograd.Function):
    """pre * (pre > threshold); the threshold learns through a rectangle-kernel straight-through estimator."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth: float):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold)

    @staticmethod
    def backward(ctx, g):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        window = ((pre - threshold).abs() < eps / 2).to(g.dtype)
        grad_threshold = -(threshold / eps * window * g).sum(0)
        return (pre > threshold) * g, grad_threshold, None


class _Step(torch.autograd.Function):
    """1[pre > threshold] for the L0 penalty; gradient only to the threshold (as in DeepMind's JumpReLU)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth: float):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        window = ((pre - threshold).abs() < eps / 2).to(g.dtype)
        return None, -(window * g / eps).sum(0), None


@dataclass
class TrainOutput:
    loss: torch.Tensor  # what backward runs on
    mse: torch.Tensor  # mean over rows of the summed squared error (normalised space)
    aux: torch.Tensor  # AuxK loss (topk/batchtopk), else 0
    sparsity: torch.Tensor  # L0 / L1 penalty (jumprelu/relu), else 0
    recon: torch.Tensor  # detached reconstruction of the (normalised) input
    l0: torch.Tensor  # mean active latents per row
    fire_counts: torch.Tensor  # [d_sae] rows in which each latent was active


class SAE(nn.Module):
    """A sparse autoencoder. `encode`/`decode`/`forward` work on raw activations of width d_in."""

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.cfg = cfg
        dtype, device = DTYPES[cfg.dtype], torch.device(cfg.device)
        w_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=generator, dtype=torch.float32)
        w_dec = (w_dec / w_dec.norm(dim=1, keepdim=True)).to(device=device, dtype=dtype)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_dec.t().contiguous())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype, device=device))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype, device=device))
        if cfg.arch == "jumprelu":
            self.threshold = nn.Parameter(torch.full((cfg.d_sae,), cfg.jumprelu_init_threshold, dtype=dtype,
                                                     device=device))
        elif cfg.arch == "batchtopk":  # learned from the batches, not by gradient; the inference threshold
            self.register_buffer("threshold", torch.zeros(cfg.d_sae, dtype=dtype, device=device))
        # input normalisation x' = (x - norm_mean) / norm_scale; identity once folded
        self.register_buffer("norm_mean", torch.zeros(cfg.d_in, dtype=dtype, device=device))
        self.register_buffer("norm_scale", torch.ones((), dtype=dtype, device=device))

    # ------------------------------------------------------------------ inference (raw activations)
    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    def check_width(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"this SAE takes inputs of width d_in={self.cfg.d_in}, "
                             f"but got width {x.shape[-1]} (input shape {tuple(x.shape)})")

    def _normalised(self) -> bool:
        return bool(self.norm_scale != 1) or bool(self.norm_mean.any())

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations of (already normalised) x, computed as SAELens does."""
        sae_in = x - self.b_dec if self.cfg.apply_b_dec_to_input else x
        return sae_in @ self.W_enc + self.b_enc

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        arch = self.cfg.arch
        if arch == "topk":
            vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
        if arch in ("jumprelu", "batchtopk"):  # batchtopk's inference form is a JumpReLU
            return pre.relu() * (pre > self.threshold).to(pre.dtype)
        return pre.relu()

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Raw activations [..., d_in] -> latent activations [..., d_sae] (raw units)."""
        self.check_width(x)
        x = x.to(self.dtype)
        if not self._normalised():
            return self.activation(self.pre_acts(x))
        return self.activation(self.pre_acts((x - self.norm_mean) / self.norm_scale)) * self.norm_scale

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """Latent activations [..., d_sae] -> reconstruction of the raw activations [..., d_in]."""
        if acts.shape[-1] != self.cfg.d_sae:
            raise ValueError(f"this SAE has d_sae={self.cfg.d_sae} latents, but got width {acts.shape[-1]}")
        acts = acts.to(self.dtype)
        if not self._normalised():
            return acts @ self.W_dec + self.b_dec
        return acts @ self.W_dec + (self.b_dec * self.norm_scale + self.norm_mean)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # ------------------------------------------------------------------ training (normalised space)
    def use_training_layout(self) -> None:
        """Store W_enc as the transpose of a contiguous [d_sae, d_in] matrix (same values, same shape),
        so the sparse encoder backward reads and writes whole latent rows."""
        with torch.no_grad():
            if not self.W_enc.t().is_contiguous():
                self.W_enc.data = self.W_enc.data.t().contiguous().t()

    def set_normalisation(self, mean: torch.Tensor, scale: float) -> None:
        with torch.no_grad():
            self.norm_mean.copy_(mean.to(self.norm_mean))
            self.norm_scale.fill_(float(scale))

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.norm_mean) / self.norm_scale

    @torch.no_grad()
    def fold_normalisation(self) -> None:
        """Fold the input normalisation into the weights (in place); encode/decode are unchanged."""
        s, mu = self.norm_scale.clone(), self.norm_mean.clone()
        if not self.cfg.apply_b_dec_to_input:  # pre = x' @ W_enc + b_enc must become ((x - mu) @ W_enc)/s + b_enc
            self.b_enc.sub_(mu @ self.W_enc / s)
        self.b_dec.mul_(s).add_(mu)
        self.b_enc.mul_(s)
        if hasattr(self, "threshold"):
            self.threshold.mul_(s)
        self.norm_mean.zero_()
        self.norm_scale.fill_(1.0)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """Remove the gradient component along each (unit) decoder row: the step then keeps norms ~1."""
        g = self.W_dec.grad
        if g is not None:
            g.sub_((g * self.W_dec).sum(1, keepdim=True) * self.W_dec)

    def training_forward(self, x: torch.Tensor, dead: torch.Tensor | None = None, *, sparse: bool = True,
                         aux_k: int | None = None, aux_coefficient: float = 1 / 32,
                         sparsity_scale: float = 1.0) -> TrainOutput:
        """Losses on a batch already in the normalised space. `dead` ([d_sae] bool) drives AuxK.

        sparse=True uses the k-sparse kernels for topk/batchtopk; False the dense reference.
        `sparsity_scale` multiplies the L0/L1 coefficient (its warm-up).
        """
        cfg, batch = self.cfg, x.shape[0]
        zero = x.new_zeros(())
        aux = sparsity = zero
        if cfg.arch in ("topk", "batchtopk"):
            n_dead = int(dead.sum()) if dead is not None else 0
            base = aux_k or cfg.d_in // 2
            k_aux = min(base, n_dead)
            aux_scale = min(n_dead / base, 1.0)
            dead_arg = dead if k_aux > 0 else None
            if cfg.arch == "topk" and sparse:
                recon, aux_recon, acts, idx, _ = kernels.sparse_topk_forward(
                    x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, cfg.k, dead_arg, k_aux,
                    cfg.apply_b_dec_to_input, pre_out=self._pre_buffer(x))
            elif cfg.arch == "topk":
                recon, aux_recon, acts, idx, _ = kernels.dense_topk_forward(
                    x, self.W_enc, self.b_enc, self.W_dec, self.b_dec, cfg.k, dead_arg, k_aux,
                    cfg.apply_b_dec_to_input)
            else:
                recon, aux_recon, acts, idx = self._batchtopk_forward(x, dead_arg, k_aux, sparse)
            active = acts > 0
            fire_counts = torch.bincount(idx[active], minlength=cfg.d_sae)
            l0 = active.sum() / batch
            mse = (recon - x).pow(2).sum(-1).mean()
            loss = mse
            if aux_recon is not None:
                residual = (x - recon).detach()
                aux = aux_coefficient * aux_scale * (aux_recon - residual).pow(2).sum(-1).mean()
                loss = loss + aux
            if cfg.arch == "batchtopk":
                self._update_batchtopk_threshold(acts[active])
        else:
            pre = torch.addmm(self.b_enc, x - self.b_dec if cfg.apply_b_dec_to_input else x, self.W_enc)
            if cfg.arch == "jumprelu":
                acts = _JumpReLU.apply(pre, self.threshold, cfg.jumprelu_bandwidth)
                sparsity = cfg.l0_coefficient * sparsity_scale * _Step.apply(
                    pre, self.threshold, cfg.jumprelu_bandwidth).sum(-1).mean()
            else:
                acts = pre.relu()
                sparsity = cfg.l1_coefficient * sparsity_scale * (acts * self.W_dec.norm(dim=1)).sum(-1).mean()
            recon = acts @ self.W_dec + self.b_dec
            active = acts.detach() > 0
            fire_counts = active.sum(0)
            l0 = active.sum() / batch
            mse = (recon.float() - x).pow(2).sum(-1).mean()
            loss = mse + sparsity
        return TrainOutput(loss=loss, mse=mse.detach(), aux=aux.detach(), sparsity=sparsity.detach(),
                           recon=recon.detach(), l0=l0, fire_counts=fire_counts)

    def _batchtopk_forward(self, x, dead, k_aux, sparse):
        cfg = self.cfg
        sae_in = x - self.b_dec if cfg.apply_b_dec_to_input else x
        if not sparse:
            pre = torch.addmm(self.b_enc, sae_in, self.W_enc)
            idx, keep = kernels.batchtopk_select(pre.detach(), cfg.k)
            acts_k = pre.gather(1, idx).relu() * keep
            recon = torch.zeros_like(pre).scatter(1, idx, acts_k) @ self.W_dec + self.b_dec
            aux_recon = None
            if dead is not None:
                aux_idx = kernels.aux_topk_indices(pre.detach(), dead, k_aux)
                aux_recon = torch.zeros_like(pre).scatter(1, aux_idx, pre.gather(1, aux_idx).relu()) @ self.W_dec
            return recon, aux_recon, acts_k, idx
        pre = kernels.encoder_preacts(sae_in, self.W_enc, self.b_enc, self._pre_buffer(x))
        idx, keep = kernels.batchtopk_select(pre, cfg.k)
        m = idx.shape[1]
        aux_idx = kernels.aux_topk_indices(pre, dead, k_aux) if dead is not None else None
        all_idx = idx if aux_idx is None else torch.cat([idx, aux_idx], 1)
        vals = kernels.SparseEncoderGather.apply(sae_in, self.W_enc, self.b_enc, all_idx, pre)
        del pre
        acts_k = vals[:, :m].relu() * keep
        recon = kernels.SparseDecoder.apply(acts_k, idx, self.W_dec) + self.b_dec
        aux_recon = None
        if aux_idx is not None:
            aux_recon = kernels.SparseDecoder.apply(vals[:, m:].relu(), aux_idx, self.W_dec)
        return recon, aux_recon, acts_k, idx

    def _pre_buffer(self, x: torch.Tensor) -> torch.Tensor | None:
        """A [batch, d_sae] scratch buffer kept between CPU training steps (None elsewhere)."""
        if x.device.type != "cpu":
            return None
        buf = getattr(self, "_pre_buf", None)
        if buf is None or buf.shape != (x.shape[0], self.cfg.d_sae) or buf.dtype != x.dtype:
            buf = self._pre_buf = torch.empty(x.shape[0], self.cfg.d_sae, dtype=x.dtype)
        return buf

    def __getstate__(self):  # deepcopy / pickle: leave the scratch buffer behind
        state = self.__dict__.copy()
        state.pop("_pre_buf", None)
        return state

    @torch.no_grad()
    def _update_batchtopk_threshold(self, active_vals: torch.Tensor, lr: float = 0.01) -> None:
        """EMA of the smallest kept activation: the JumpReLU threshold used at inference."""
        if active_vals.numel() == 0:
            return
        m = active_vals.min().to(self.threshold.dtype)
        if bool(self.threshold[0] == 0):
            self.threshold.fill_(m)
        else:
            self.threshold.mul_(1 - lr).add_(lr * m)

    # ------------------------------------------------------------------ SAELens on-disk format
    def sae_lens_state(self) -> dict[str, torch.Tensor]:
        """The weights as SAELens stores them (normalisation folded into a copy)."""
        sae = self
        if self._normalised():
            import copy

            sae = copy.deepcopy(self)
            sae.fold_normalisation()
        out = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
        if hasattr(sae, "threshold"):
            out["threshold"] = sae.threshold
        return {k: v.detach().contiguous().clone() for k, v in out.items()}

    def sae_lens_config(self, extra_metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        cfg = self.cfg
        version = sae_lens_version()
        meta = {"sae_lens_version": version, "sae_lens_training_version": version,
                "model_name": cfg.model_name, "hook_name": cfg.hook_name, "hook_layer": cfg.hook_layer,
                **cfg.metadata, **(extra_metadata or {}),
                "lmmscope": {"arch": cfg.arch, "config": cfg.to_dict(), "normalisation_folded": True}}
        if cfg.arch == "batchtopk":
            meta["training_architecture"] = "batchtopk"
            meta["training_architecture_details"] = {"k": cfg.k}
        out = {"architecture": SAE_LENS_ARCH[cfg.arch], "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": cfg.dtype,
               "device": "cpu", "apply_b_dec_to_input": cfg.apply_b_dec_to_input, "normalize_activations": "none",
               "reshape_activations": "none", "metadata": meta}
        if cfg.arch == "topk":
            out.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
        return out

    def save(self, path: str | Path, extra_metadata: dict[str, Any] | None = None,
             sparsity: torch.Tensor | None = None) -> Path:
        """Write `cfg.json` + `sae_weights.safetensors` (SAELens format) into directory `path`.

        `sparsity`: optional per-latent firing frequency, stored as sae-lens's log10 sparsity file.
        """
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file(self.sae_lens_state(), path / WEIGHTS_FILENAME)
        (path / CFG_FILENAME).write_text(json.dumps(self.sae_lens_config(extra_metadata), indent=1))
        if sparsity is not None:
            save_file({"sparsity": torch.log10(sparsity.detach().float().cpu() + 1e-10)}, path / SPARSITY_FILENAME)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: str | None = None) -> SAE:
        """Load an SAE saved by us or by sae-lens (`save_model` or `save_inference_model`)."""
        from safetensors.torch import load_file

        path = Path(path)
        cfg_path = path / CFG_FILENAME
        if not cfg_path.exists():
            raise FileNotFoundError(f"no SAE at {path}: {CFG_FILENAME} is missing")
        raw = json.loads(cfg_path.read_text())
        weights = load_file(path / WEIGHTS_FILENAME)
        cfg, weights = _config_from_sae_lens(raw, weights, str(path))
        cfg.device = device
        if dtype is not None:
            cfg.dtype = dtype
        cfg.__post_init__()
        sae = cls(cfg)
        expected = set(sae.sae_lens_state())
        missing, unexpected = expected - set(weights), set(weights) - expected
        if missing or unexpected:
            raise ValueError(f"{path / WEIGHTS_FILENAME}: weights do not match a {cfg.arch} SAE "
                             f"(missing {sorted(missing)}, unexpected {sorted(unexpected)})")
        for name, t in weights.items():
            target = getattr(sae, name)
            if tuple(t.shape) != tuple(target.shape):
                raise ValueError(f"{path / WEIGHTS_FILENAME}: {name} has shape {tuple(t.shape)}, "
                                 f"expected {tuple(target.shape)} for d_in={cfg.d_in}, d_sae={cfg.d_sae}")
            target.data = t.to(device=cfg.device, dtype=DTYPES[cfg.dtype]).contiguous()
        return sae


def _config_from_sae_lens(raw: dict[str, Any], weights: dict[str, torch.Tensor],
                          where: str) -> tuple[SAEConfig, dict[str, torch.Tensor]]:
    """Our config (and weights, adjusted) from a SAELens cfg.json of any 6.x SAE we can represent."""
    meta = dict(raw.get("metadata") or {})
    version = raw.get("sae_lens_version") or meta.get("sae_lens_version")
    if not version or int(str(version).split(".")[0]) < 6:
        try:
            from sae_lens.loading.pretrained_sae_loaders import handle_config_defaulting

            raw = handle_config_defaulting(raw)
            meta = dict(raw.get("metadata") or {}) or {k: raw.get(k) for k in ("model_name", "hook_name")}
        except ImportError:
            pass
    ours = meta.get("lmmscope") if isinstance(meta.get("lmmscope"), dict) else None
    if ours and "config" in ours:
        cfg = SAEConfig.from_dict(ours["config"])
        return cfg, weights

    arch_raw = raw.get("architecture", "standard")
    if raw.get("normalize_activations", "none") not in ("none", None, False):
        raise ValueError(f"{where}: normalize_activations={raw['normalize_activations']!r} is not supported; "
                         "fold the normalisation into the weights first (sae-lens does this when it finishes training)")
    if raw.get("reshape_activations", "none") not in ("none", None):
        raise ValueError(f"{where}: reshape_activations={raw['reshape_activations']!r} is not supported")
    weights = dict(weights)
    if "scaling_factor" in weights:
        if not torch.allclose(weights["scaling_factor"], torch.ones_like(weights["scaling_factor"])):
            raise ValueError(f"{where}: a finetuning scaling_factor is not supported")
        del weights["scaling_factor"]
    if "log_threshold" in weights:
        weights["threshold"] = weights.pop("log_threshold").exp()
    common = dict(d_in=int(raw["d_in"]), d_sae=int(raw["d_sae"]), dtype=str(raw.get("dtype", "float32")).replace(
        "torch.", ""), apply_b_dec_to_input=bool(raw.get("apply_b_dec_to_input", True)), normalize=False,
                  model_name=meta.get("model_name"), hook_name=meta.get("hook_name"),
                  hook_layer=meta.get("hook_layer"))
    if arch_raw == "topk":
        if raw.get("rescale_acts_by_decoder_norm"):  # fold the decoder norms, as sae-lens does on export
            _fold_decoder_norms(weights)
        cfg = SAEConfig(arch="topk", k=int(raw["k"]), **common)
    elif arch_raw in ("batchtopk", "matryoshka_batchtopk"):  # training format: scalar topk_threshold
        if raw.get("rescale_acts_by_decoder_norm", True):
            _fold_decoder_norms(weights)
        thr = weights.pop("topk_threshold").reshape(())
        weights["threshold"] = thr.to(weights["b_enc"].dtype).expand(int(raw["d_sae"])).clone()
        cfg = SAEConfig(arch="batchtopk", k=float(raw["k"]), **common)
    elif arch_raw == "jumprelu":
        details = meta.get("training_architecture_details") or {}
        if meta.get("training_architecture") == "batchtopk" and "k" in details:
            cfg = SAEConfig(arch="batchtopk", k=float(details["k"]), **common)
        else:
            cfg = SAEConfig(arch="jumprelu", **common)
    elif arch_raw == "standard":
        cfg = SAEConfig(arch="relu", **common)
    else:
        raise ValueError(f"{where}: SAELens architecture {arch_raw!r} is not supported "
                         f"(supported: topk, batchtopk, jumprelu, standard)")
    return cfg, weights


def _fold_decoder_norms(w: dict[str, torch.Tensor]) -> None:
    n = w["W_dec"].norm(dim=-1)
    w["b_enc"] = w["b_enc"] * n
    w["W_enc"] = w["W_enc"] * n[None, :]
    w["W_dec"] = w["W_dec"] / n[:, None]


def lr_for(d_sae: int) -> float:
    """A learning-rate default that shrinks with the dictionary: 2e-4 / sqrt(d_sae / 2^14), as in sparsify."""
    return 2e-4 / math.sqrt(d_sae / 2**14)
