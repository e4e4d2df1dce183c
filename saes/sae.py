"""Sparse autoencoders (TopK, BatchTopK, Matryoshka BatchTopK, JumpReLU, ReLU+L1) that save and load in SAELens's format.

On disk an SAE is a directory with `cfg.json` and `sae_weights.safetensors`, exactly what
`sae_lens.SAE.load_from_disk(dir)` reads (checked against sae-lens 6.54), with W_enc [d_in, d_sae],
W_dec [d_sae, d_in], b_enc, b_dec and the architecture's own tensors (a threshold). What differs
between architectures (activation, training loss, dead-feature handling, SAELens mapping) lives
in `saes.architectures`, one module each; this class asks `self.arch`. `cfg.json`'s metadata carries
`sae_lens_version` and our own full config under "lmmscope".

Training runs in a normalised space, x' = (x - mean) P / scale: centred, optionally whitened
(`SAEConfig.whiten`: P a ZCA matrix, else the identity), unit mean row norm. `encode`/`decode`
always take and give raw activations, and `save` folds the normalisation into the weights
(W_enc <- P W_enc, W_dec <- W_dec P^-1, b_dec <- scale * b_dec P^-1 + mean, b_enc and threshold
<- scale * them; activations come out scaled by `scale`, so which features a TopK keeps is
unchanged), so the saved SAE works on raw activations with no preprocessing. Without whitening
W_enc and the unit-norm W_dec are unchanged by the fold; with it, W_dec's rows are no longer unit.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field, fields
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from interp.infra.cli_config import at_least, choices, hidden
from saes import architectures
from saes.architectures.base import TrainOutput

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

    arch: str = field(default="topk", metadata=choices(architectures.names))
    """SAE architecture (relu: ReLU with an L1 penalty)"""
    d_in: int = field(default=512, metadata=hidden())
    """width of the activations (the cache's)"""
    d_sae: int = field(default=8192, metadata=at_least(1))
    """features of the SAE"""
    k: float = 32
    """active features per row (topk: an integer), or per row on average (batchtopk)"""
    l1_coefficient: float = 0.1
    """relu: weight of the L1 penalty on activations times decoder norms (normalised inputs)"""
    l0_coefficient: float = 3e-3
    """jumprelu: weight of the straight-through L0 penalty"""
    jumprelu_init_threshold: float = 0.01
    """jumprelu: initial threshold"""
    jumprelu_bandwidth: float = 0.01
    """jumprelu: width of the straight-through estimator's window"""
    matryoshka_widths: tuple[int, ...] = ()
    """matryoshka: the nested prefix widths, increasing, ending at d_sae (none: d_sae/8 d_sae/4 d_sae/2 d_sae)"""
    apply_b_dec_to_input: bool = field(default=True, metadata=hidden())
    """subtract b_dec from the input before encoding (SAELens's convention)"""
    normalize: bool = True
    """train on centred activations scaled to unit mean row norm (folded into the saved SAE)"""
    whiten: float = 0.0
    """also ZCA-whiten the centred activations, with a ridge of this fraction of the covariance's largest
    eigenvalue (0: off; folded into the saved SAE): low-variance directions, where a model may keep a
    concept's own code beside a few dominant ones, then weigh as much in the reconstruction loss"""
    dtype: str = field(default="float32", metadata=hidden())
    """parameter dtype"""
    device: str = field(default="cpu", metadata=hidden())
    """where the parameters live"""
    model_name: str | None = field(default=None, metadata=hidden())
    """the model the activations come from (cfg.json metadata)"""
    hook_name: str | None = field(default=None, metadata=hidden())
    """the module path the activations come from"""
    hook_layer: int | None = field(default=None, metadata=hidden())
    """the layer of that hook"""
    metadata: dict[str, Any] = field(default_factory=dict, metadata=hidden())
    """anything else (data set, cache settings, ...)"""

    def __post_init__(self):
        arch = architectures.get(self.arch)
        self.matryoshka_widths = tuple(int(w) for w in self.matryoshka_widths)
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got d_in={self.d_in}, d_sae={self.d_sae}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.whiten:
            if not (math.isfinite(self.whiten) and self.whiten > 0):
                raise ValueError(f"whiten is the ridge of the whitening, a fraction of the largest eigenvalue > 0 "
                                 f"(for example 0.01), got {self.whiten}; 0 for no whitening")
            if not self.normalize:
                raise ValueError("whiten needs normalize: whitening is part of the input normalisation")
        arch.check_config(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SAEConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class SAE(nn.Module):
    """A sparse autoencoder. `encode`/`decode`/`forward` work on raw activations of width d_in."""

    def __init__(self, cfg: SAEConfig, generator: torch.Generator | None = None, *, init: bool = True):
        """`init=False` leaves W_enc and W_dec uninitialised, for weights about to be loaded (a 131072 x 4096
        SAE's random initialisation costs seconds and, while the loaded copy arrives, twice its 4.3 GB)."""
        super().__init__()
        self.cfg = cfg
        dtype, device = DTYPES[cfg.dtype], torch.device(cfg.device)
        if init:
            w_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=generator, dtype=torch.float32)
            w_dec = (w_dec / w_dec.norm(dim=1, keepdim=True)).to(device=device, dtype=dtype)
            w_enc = w_dec.t().contiguous()
        else:  # untouched pages: no memory until written, and the loaded tensors replace them
            w_dec = torch.empty(cfg.d_sae, cfg.d_in, device=device, dtype=dtype)
            w_enc = torch.empty(cfg.d_in, cfg.d_sae, device=device, dtype=dtype)
        self.W_dec = nn.Parameter(w_dec)
        self.W_enc = nn.Parameter(w_enc)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae, dtype=dtype, device=device))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in, dtype=dtype, device=device))
        self.arch = architectures.get(cfg.arch)
        self.arch.init_state(self)
        # input normalisation x' = (x - norm_mean) norm_whiten / norm_scale; identity once folded. The
        # whitening matrix and its inverse are empty unless set_normalisation gives one ([d_in, d_in] each);
        # the inverse is derived from the matrix there, so a state dict (a checkpoint) holds only the matrix
        self.register_buffer("norm_mean", torch.zeros(cfg.d_in, dtype=dtype, device=device))
        self.register_buffer("norm_scale", torch.ones((), dtype=dtype, device=device))
        self.register_buffer("norm_whiten", torch.empty(0, dtype=dtype, device=device))
        self.register_buffer("norm_unwhiten", torch.empty(0, dtype=dtype, device=device), persistent=False)

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

    def is_normalised(self) -> bool:
        """Whether inputs are still normalised inside (training); folded SAEs take raw rows as they are."""
        return bool(self.norm_scale != 1) or bool(self.norm_mean.any()) or self.norm_whiten.numel() > 0

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations of (already normalised) x, computed as SAELens does."""
        sae_in = x - self.b_dec if self.cfg.apply_b_dec_to_input else x
        return sae_in @ self.W_enc + self.b_enc

    def activation(self, pre: torch.Tensor) -> torch.Tensor:
        return self.arch.activation(self, pre)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Raw activations [..., d_in] -> feature activations [..., d_sae] (raw units)."""
        self.check_width(x)
        x = x.to(self.dtype)
        if not self.is_normalised():
            return self.activation(self.pre_acts(x))
        return self.activation(self.pre_acts(self.normalise(x))) * self.norm_scale

    def raw_pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations of raw rows, in the units of `encode`'s activations (what an intervention edits)."""
        x = x.to(self.dtype)
        if not self.is_normalised():
            return self.pre_acts(x)
        return self.pre_acts(self.normalise(x)) * self.norm_scale

    def activate_raw(self, pre: torch.Tensor) -> torch.Tensor:
        """Activations from pre-activations in `raw_pre_acts`' units: `encode` = activate_raw(raw_pre_acts)."""
        if not self.is_normalised():
            return self.activation(pre)
        return self.activation(pre / self.norm_scale) * self.norm_scale

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., d_sae] -> reconstruction of the raw activations [..., d_in]."""
        if acts.shape[-1] != self.cfg.d_sae:
            raise ValueError(f"this SAE has d_sae={self.cfg.d_sae} features, but got width {acts.shape[-1]}")
        acts = acts.to(self.dtype)
        if not self.is_normalised():
            return acts @ self.W_dec + self.b_dec
        y = acts @ self.W_dec + self.b_dec * self.norm_scale  # scale * (acts / scale @ W_dec + b_dec)
        if self.norm_whiten.numel():
            y = y @ self.norm_unwhiten
        return y + self.norm_mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    # ------------------------------------------------------------------ training (normalised space)
    def use_training_layout(self) -> None:
        """Store W_enc as the transpose of a contiguous [d_sae, d_in] matrix (same values, same shape),
        so the sparse encoder backward reads and writes whole feature rows."""
        with torch.no_grad():
            if not self.W_enc.t().is_contiguous():
                self.W_enc.data = self.W_enc.data.t().contiguous().t()

    def set_normalisation(self, mean: torch.Tensor, scale: float, whiten: torch.Tensor | None = None) -> None:
        """x' = (x - mean) whiten / scale; `whiten`: a symmetric invertible [d_in, d_in] matrix, or None."""
        with torch.no_grad():
            self.norm_mean.copy_(mean.to(self.norm_mean))
            self.norm_scale.fill_(float(scale))
            if whiten is None or not whiten.numel():
                self.norm_whiten = self.norm_whiten.new_empty(0)
                self.norm_unwhiten = self.norm_unwhiten.new_empty(0)
            else:
                if tuple(whiten.shape) != (self.cfg.d_in, self.cfg.d_in):
                    raise ValueError(f"the whitening matrix must be [{self.cfg.d_in}, {self.cfg.d_in}], "
                                     f"got {tuple(whiten.shape)}")
                self.norm_whiten = whiten.to(self.norm_mean).clone()
                self.norm_unwhiten = torch.linalg.inv(whiten.double()).to(self.norm_mean)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        x = x - self.norm_mean
        if self.norm_whiten.numel():
            x = x @ self.norm_whiten
        return x / self.norm_scale

    @torch.no_grad()
    def fold_normalisation(self) -> None:
        """Fold the input normalisation into the weights (in place); encode/decode are unchanged."""
        s, mu = self.norm_scale.clone(), self.norm_mean.clone()
        if self.norm_whiten.numel():  # x' = (x - mu) P / s: the encoder reads x P, the decoder writes through P^-1
            self.W_enc.data = (self.norm_whiten @ self.W_enc).contiguous()
            self.W_dec.data = (self.W_dec @ self.norm_unwhiten).contiguous()
            self.b_dec.copy_(self.b_dec @ self.norm_unwhiten)
        if not self.cfg.apply_b_dec_to_input:  # pre = x' @ W_enc + b_enc must become ((x - mu) @ W_enc)/s + b_enc
            self.b_enc.sub_(mu @ self.W_enc / s)
        self.b_dec.mul_(s).add_(mu)
        self.b_enc.mul_(s)
        for name in self.arch.state_names():  # thresholds live in the pre-activation's units
            getattr(self, name).mul_(s)
        self.set_normalisation(torch.zeros_like(mu), 1.0)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def project_decoder_grad_(self) -> None:
        """Remove the gradient component along each (unit) decoder row: the step then keeps norms ~1."""
        g = self.W_dec.grad
        if g is None:
            return
        rows = max(1, (1 << 22) // g.shape[1])  # in blocks of rows: no [d_sae, d_in] temporary (2.1 GB at 131k)
        for s in range(0, g.shape[0], rows):
            gs, ws = g[s:s + rows], self.W_dec[s:s + rows]
            gs.sub_((gs * ws).sum(1, keepdim=True) * ws)

    def training_forward(self, x: torch.Tensor, dead: torch.Tensor | None = None, *, sparse: bool = True,
                         aux_k: int | None = None, aux_coefficient: float = 1 / 32,
                         sparsity_scale: float = 1.0) -> TrainOutput:
        """Losses on a batch already in the normalised space, as the architecture defines them.
        `dead` ([d_sae] bool, from `arch.dead_features`) drives its dead-feature loss; sparse=True uses
        the k-sparse kernels where the architecture has them; `sparsity_scale` multiplies the L0/L1
        coefficient (its warm-up)."""
        return self.arch.training_forward(self, x, dead, sparse=sparse, aux_k=aux_k,
                                          aux_coefficient=aux_coefficient, sparsity_scale=sparsity_scale)

    def pre_buffer(self, x: torch.Tensor) -> torch.Tensor | None:
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

    # ------------------------------------------------------------------ SAELens on-disk format
    def sae_lens_state(self) -> dict[str, torch.Tensor]:
        """The weights as SAELens stores them (normalisation folded into a copy)."""
        sae = self
        if self.is_normalised():
            import copy

            sae = copy.deepcopy(self)
            sae.fold_normalisation()
        out = {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
        out.update({name: getattr(sae, name) for name in sae.arch.state_names()})
        return {k: v.detach().contiguous().clone() for k, v in out.items()}

    def sae_lens_config(self, extra_metadata: dict[str, Any] | None = None) -> dict[str, Any]:
        cfg = self.cfg
        version = sae_lens_version()
        meta = {"sae_lens_version": version, "sae_lens_training_version": version,
                "model_name": cfg.model_name, "hook_name": cfg.hook_name, "hook_layer": cfg.hook_layer,
                **cfg.metadata, **(extra_metadata or {}),
                "lmmscope": {"arch": cfg.arch, "config": cfg.to_dict(), "normalisation_folded": True}}
        extra, extra_meta = self.arch.sae_lens_config(cfg)
        meta.update(extra_meta)
        out = {"architecture": self.arch.sae_lens, "d_in": cfg.d_in, "d_sae": cfg.d_sae, "dtype": cfg.dtype,
               "device": "cpu", "apply_b_dec_to_input": cfg.apply_b_dec_to_input, "normalize_activations": "none",
               "reshape_activations": "none", "metadata": meta, **extra}
        return out

    def save(self, path: str | Path, extra_metadata: dict[str, Any] | None = None,
             sparsity: torch.Tensor | None = None) -> Path:
        """Write `cfg.json` + `sae_weights.safetensors` (SAELens format) into directory `path`.

        `sparsity`: optional per-feature firing frequency, stored as sae-lens's log10 sparsity file.
        """
        from safetensors.torch import save_file

        from interp.infra.durable import publishing, write_json

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with publishing(path / WEIGHTS_FILENAME) as tmp:  # each file is published whole (fsync, rename)
            save_file(self.sae_lens_state(), tmp)
        write_json(path / CFG_FILENAME, self.sae_lens_config(extra_metadata), indent=1)
        if sparsity is not None:
            with publishing(path / SPARSITY_FILENAME) as tmp:
                save_file({"sparsity": torch.log10(sparsity.detach().float().cpu() + 1e-10)}, tmp)
        return path

    @classmethod
    def load(cls, path: str | Path, device: str = "cpu", dtype: str | None = None) -> SAE:
        """Load an SAE saved by us or by sae-lens (`save_model` or `save_inference_model`)."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / WEIGHTS_FILENAME).exists():  # EleutherAI sparsify's format (e.g. a multimodal-sae hookpoint)
            from saes.sparsify_format import SPARSIFY_WEIGHTS, SparsifyLoadConfig, hookpoint_folders, load_sparsify

            if (path / SPARSIFY_WEIGHTS).exists() or hookpoint_folders(path):
                return load_sparsify(SparsifyLoadConfig(str(path), device=device, dtype=dtype))
        cfg_path, weights_path = path / CFG_FILENAME, path / WEIGHTS_FILENAME
        if not cfg_path.exists():
            raise FileNotFoundError(f"no SAE at {path}: {CFG_FILENAME} is missing")
        raw = read_sae_cfg(cfg_path)
        if not weights_path.exists():
            raise FileNotFoundError(f"no SAE weights at {weights_path}: the SAE at {path} is incomplete; re-run "
                                    "`interp train` or copy the file back")
        try:
            weights = load_file(weights_path)
        except Exception as e:  # safetensors raises its own SafetensorError (not an OSError) for a cut file
            raise ValueError(f"{weights_path} is not a readable safetensors file ({type(e).__name__}: {e}): it may "
                             "be truncated or empty; re-run `interp train` or copy the SAE again") from None
        try:
            cfg, weights = _config_from_sae_lens(raw, weights, str(cfg_path))
        except KeyError as e:
            raise ValueError(f"{cfg_path} has no {e.args[0]!r}: it is not a complete SAE config; re-save the SAE "
                             "or add the key") from None
        check_cfg_against_weights(raw, cfg, weights, cfg_path, weights_path)
        cfg.device = device
        if dtype is not None:
            cfg.dtype = dtype
        cfg.__post_init__()
        sae = cls(cfg, init=False)
        expected = {"W_enc", "b_enc", "W_dec", "b_dec", *sae.arch.state_names()}  # the keys of sae_lens_state()
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


def read_sae_cfg(cfg_path: Path) -> dict[str, Any]:
    """An SAE's cfg.json as a dict, or a ValueError naming the file and what is wrong with it."""
    try:
        raw = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e}): re-save the SAE or fix the file") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{cfg_path} holds a JSON {type(raw).__name__}, not an object of SAE settings "
                         "(d_in, d_sae, architecture, ...): re-save the SAE or fix the file")
    for key in ("d_in", "d_sae"):
        if key not in raw:
            raise ValueError(f"{cfg_path} has no {key!r}: it is not a complete SAE config; re-save the SAE or "
                             "add the key")
    return raw


def check_cfg_against_weights(raw: dict[str, Any], cfg: SAEConfig, weights: dict[str, torch.Tensor],
                              cfg_path: Path, weights_path: Path) -> None:
    """Refuse an SAE whose cfg.json disagrees with itself or with its weights: the top-level d_in, d_sae
    and architecture (what SAELens reads) must be those of our own config record and of the tensors."""
    meta = raw.get("metadata") if isinstance(raw.get("metadata"), dict) else {}
    recorded = isinstance(meta.get("lmmscope"), dict)  # our own record of the config (it wins when loading)
    w_enc, w_dec = weights.get("W_enc"), weights.get("W_dec")
    dims, tensor = None, None
    if w_enc is not None and w_enc.ndim == 2:
        dims, tensor = (int(w_enc.shape[0]), int(w_enc.shape[1])), f"W_enc {tuple(w_enc.shape)}"
    elif w_dec is not None and w_dec.ndim == 2:
        dims, tensor = (int(w_dec.shape[1]), int(w_dec.shape[0])), f"W_dec {tuple(w_dec.shape)}"
    problems = []
    for i, key in enumerate(("d_in", "d_sae")):
        try:
            top = int(raw[key])
        except (TypeError, ValueError):
            raise ValueError(f"{cfg_path}: {key} must be an integer, got {raw[key]!r}") from None
        if dims is not None and top != dims[i]:
            problems.append(f"{key}={top}, but the weights have {key}={dims[i]} ({tensor})")
        elif recorded and top != getattr(cfg, key):
            problems.append(f"{key}={top} at its top level, but {getattr(cfg, key)} in its lmmscope record")
    arch = architectures.get(cfg.arch)
    if recorded and "architecture" in raw and str(raw["architecture"]) != arch.sae_lens:
        problems.append(f"architecture={raw['architecture']!r}, but the weights are a {cfg.arch} SAE "
                        f"(saved as {arch.sae_lens!r})")
    if problems:
        raise ValueError(f"{cfg_path} does not describe {weights_path}: it says {'; '.join(problems)}. The two "
                         "files are from different SAEs or one was edited: copy the SAE directory again")


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
    arch = architectures.for_sae_lens(arch_raw, meta)
    if arch is None:
        raise ValueError(f"{where}: SAELens architecture {arch_raw!r} is not supported (supported: "
                         f"{', '.join(sorted({a.sae_lens for a in map(architectures.get, architectures.names())}))})")
    cfg = SAEConfig(arch=arch.name, **common, **arch.from_sae_lens(raw, weights, meta))
    return cfg, weights


def sae_fingerprint(sae_dir: str | Path) -> str:
    """sha256 of the SAE's weights file (ours or sparsify's): identifies the SAE whatever directory it was
    copied to. Remembered per file (path, size, mtime) within a process: 4.3 GB at 131k x 4096 take seconds."""
    path = Path(sae_dir) / WEIGHTS_FILENAME
    if not path.exists():
        from saes.sparsify_format import SPARSIFY_WEIGHTS

        if not (Path(sae_dir) / SPARSIFY_WEIGHTS).exists():
            raise FileNotFoundError(f"no SAE at {sae_dir}: {WEIGHTS_FILENAME} is missing")
        path = Path(sae_dir) / SPARSIFY_WEIGHTS
    st = path.stat()
    return _file_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def lr_for(d_sae: int) -> float:
    """A learning-rate default that shrinks with the dictionary: 2e-4 / sqrt(d_sae / 2^14), as in sparsify."""
    return 2e-4 / math.sqrt(d_sae / 2**14)
