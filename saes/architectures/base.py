"""What an SAE architecture is: the interface every module of `saes.architectures` implements."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

# The methods take the SAE (saes.sae.SAE) and its config (saes.sae.SAEConfig); those modules import this one,
# so the annotations below name them without importing them.
REGISTRY: dict[str, Architecture] = {}


class UnknownArchitectureError(ValueError):
    pass


def register(arch: Architecture) -> Architecture:
    REGISTRY[arch.name] = arch
    return arch


@dataclass
class TrainOutput:
    loss: torch.Tensor  # what backward runs on
    mse: torch.Tensor  # mean over rows of the summed squared error (normalised space)
    aux: torch.Tensor  # the dead-feature auxiliary loss (AuxK), else 0
    sparsity: torch.Tensor  # L0 / L1 penalty, else 0
    recon: torch.Tensor  # detached reconstruction of the (normalised) input
    l0: torch.Tensor  # mean active features per row
    fire_counts: torch.Tensor  # [d_sae] rows in which each feature was active


class Architecture:
    """One SAE architecture. Subclasses set `name` and `sae_lens` and override what differs."""

    name: str = ""
    sae_lens: str = ""  # the SAELens architecture it is saved as
    uses_k: bool = False  # sparsity is set by k (active features per row)
    entries_scratch: bool = False  # active_entries wants a reusable [rows, d_sae] scratch buffer

    # ---------------------------------------------------------------- configuration and state
    def check_config(self, cfg: SAEConfig) -> None:
        """Raise ValueError for settings this architecture cannot train with (may normalise them)."""

    def init_state(self, sae: SAE) -> None:
        """Add the architecture's own parameters or buffers (e.g. a threshold) to a new SAE."""

    def state_names(self) -> tuple[str, ...]:
        """Extra tensors it saves beside W_enc, b_enc, W_dec, b_dec."""
        return ()

    # ---------------------------------------------------------------- inference
    def activation(self, sae: SAE, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def active_entries(self, sae: SAE, x: torch.Tensor, buf: torch.Tensor | None = None):
        """(rows, features, values) of the active entries of `sae.encode(x)` without the dense [rows, d_sae]
        tensor, in the order of `(acts > 0).nonzero()`; None where the architecture has no such shortcut."""
        return None

    # ---------------------------------------------------------------- training
    def training_forward(self, sae: SAE, x: torch.Tensor, dead: torch.Tensor | None, *, sparse: bool,
                         aux_k: int | None, aux_coefficient: float, sparsity_scale: float) -> TrainOutput:
        raise NotImplementedError

    def dead_features(self, steps_since_fired: torch.Tensor, window: int) -> torch.Tensor | None:
        """The features its dead-feature loss revives ([d_sae] bool), or None when it has none."""
        return None

    def after_step(self, sae: SAE) -> None:
        """Projections after each optimiser step (beyond the unit-norm decoder every SAE keeps)."""

    # ---------------------------------------------------------------- SAELens format
    def sae_lens_config(self, cfg: SAEConfig) -> tuple[dict[str, Any], dict[str, Any]]:
        """(extra top-level cfg.json keys, extra metadata keys) of its SAELens export."""
        return {}, {}

    def reads_sae_lens(self, architecture: str, metadata: dict) -> bool:
        """Whether a SAELens cfg.json with this `architecture` (and metadata) loads as this architecture."""
        return architecture == self.sae_lens

    def from_sae_lens(self, raw: dict, weights: dict[str, torch.Tensor], metadata: dict) -> dict[str, Any]:
        """Our config fields (arch-specific ones) from a SAELens cfg.json; may adjust `weights` in place."""
        return {}


# ---------------------------------------------------------------- shared by the k-sparse architectures


def auxk_loss(x: torch.Tensor, recon: torch.Tensor, aux_recon: torch.Tensor | None, n_dead: int, base: int,
              aux_coefficient: float) -> torch.Tensor:
    """AuxK: the dead features' reconstruction of the residual, weighted by how many are dead."""
    if aux_recon is None:
        return x.new_zeros(())
    residual = (x - recon).detach()
    return aux_coefficient * min(n_dead / base, 1.0) * (aux_recon - residual).pow(2).sum(-1).mean()


def auxk_setup(cfg: SAEConfig, dead: torch.Tensor | None, aux_k: int | None) -> tuple[int, int, torch.Tensor | None]:
    """(dead count, AuxK's base k, the dead mask to use or None) for a batch."""
    n_dead = int(dead.sum()) if dead is not None else 0
    base = aux_k or cfg.d_in // 2
    k_aux = min(base, n_dead)
    return n_dead, base, (dead if k_aux > 0 else None)


def fold_decoder_norms(w: dict[str, torch.Tensor]) -> None:
    """Fold decoder row norms into the encoder (SAELens's rescale_acts_by_decoder_norm export)."""
    n = w["W_dec"].norm(dim=-1)
    w["b_enc"] = w["b_enc"] * n
    w["W_enc"] = w["W_enc"] * n[None, :]
    w["W_dec"] = w["W_dec"] / n[:, None]


def check_k(cfg: SAEConfig) -> None:
    if not 0 < cfg.k <= cfg.d_sae:
        raise ValueError(f"k must be in (0, d_sae={cfg.d_sae}], got {cfg.k}")


def dead_by_window(steps_since_fired: torch.Tensor, window: int) -> torch.Tensor | None:
    dead = steps_since_fired >= window
    return dead if bool(dead.any()) else None
