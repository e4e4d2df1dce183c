"""Matryoshka BatchTopK: nested prefixes of the dictionary each reconstruct the input (Bussmann et al. 2025,
"Learning Multi-Level Features with Matryoshka SAEs"; Nabeshima 2024, "Matryoshka Sparse Autoencoders").

Features are kept in order: a prefix of widths w_1 < w_2 < ... < w_L = d_sae (by default d_sae/8, /4,
/2, 1) reconstructs x from the BatchTopK activations of its own features only, and the training loss
is the sum of the prefixes' squared errors (as sae-lens sums its levels' losses), plus AuxK on the
dead features. A general concept ("red") then has to live in an early, small prefix that cannot
afford one feature per conjunction ("red circle", "red square"), so the later features learn what the
early ones leave over instead of absorbing them: the method's answer to feature absorption.

The selection is BatchTopK over the whole dictionary (the k * rows largest pre-activations of the
batch), so at inference it is a JumpReLU whose per-feature threshold is an EMA of the smallest kept
activation, exactly as `batchtopk`; it is saved as SAELens "jumprelu" with `training_architecture:
matryoshka_batchtopk` and the widths in `training_architecture_details`, as sae-lens exports its own
Matryoshka SAEs, and sae-lens's training format (`matryoshka_batchtopk`, scalar `topk_threshold`) loads.
"""

from __future__ import annotations

import torch

from saes import kernels
from saes.architectures.base import Architecture, auxk_setup, check_k, dead_by_window, fold_decoder_norms, register
from saes.architectures.batchtopk import _forward, _update_threshold
from saes.architectures.topk import ksparse_output

TRAINING_ARCHITECTURE = "matryoshka_batchtopk"  # sae-lens's name, in cfg.json metadata


def default_widths(d_sae: int) -> tuple[int, ...]:
    """d_sae/8, d_sae/4, d_sae/2, d_sae (duplicates and zero widths of a tiny dictionary dropped)."""
    return tuple(sorted({w for w in (d_sae // 8, d_sae // 4, d_sae // 2, d_sae) if w > 0}))


def widths_of(cfg) -> tuple[int, ...]:
    """The prefix widths of an SAE config: `matryoshka_widths`, or the default for its d_sae when empty."""
    return tuple(int(w) for w in cfg.matryoshka_widths) or default_widths(cfg.d_sae)


def check_widths(widths: tuple[int, ...], d_sae: int) -> None:
    if not widths or any(w <= 0 for w in widths) or any(a >= b for a, b in zip(widths, widths[1:])) \
            or widths[-1] != d_sae:
        raise ValueError(f"matryoshka widths must be positive, strictly increasing and end at d_sae={d_sae}, "
                         f"got {list(widths)} (e.g. {' '.join(map(str, default_widths(d_sae)))})")


class Matryoshka(Architecture):
    name = "matryoshka"
    sae_lens = "jumprelu"
    uses_k = True

    def check_config(self, cfg) -> None:
        check_k(cfg)
        check_widths(widths_of(cfg), cfg.d_sae)

    def init_state(self, sae) -> None:
        cfg = sae.cfg
        sae.register_buffer("threshold", torch.zeros(cfg.d_sae, dtype=sae.b_enc.dtype, device=sae.b_enc.device))

    def state_names(self):
        return ("threshold",)

    def activation(self, sae, pre):
        return pre.relu() * (pre > sae.threshold).to(pre.dtype)

    def training_forward(self, sae, x, dead, *, sparse, aux_k, aux_coefficient, sparsity_scale):
        n_dead, base, dead_arg = auxk_setup(sae.cfg, dead, aux_k)
        recon, aux_recon, acts, idx = _forward(sae, x, dead_arg, min(base, n_dead), sparse)
        out = ksparse_output(sae, x, recon, aux_recon, acts, idx, n_dead, base, aux_coefficient)
        inner = x.new_zeros(())
        for width in widths_of(sae.cfg)[:-1]:  # the outer level is the full reconstruction, already in the loss
            part = acts * (idx < width).to(acts.dtype)
            if sparse:
                recon_w = kernels.SparseDecoder.apply(part, idx, sae.W_dec) + sae.b_dec
            else:
                recon_w = torch.zeros(x.shape[0], sae.cfg.d_sae, dtype=acts.dtype, device=x.device).scatter(
                    1, idx, part) @ sae.W_dec + sae.b_dec
            inner = inner + (recon_w - x).pow(2).sum(-1).mean()
        out.loss = out.loss + inner
        _update_threshold(sae, acts[acts > 0])
        return out

    def dead_features(self, steps_since_fired, window):
        return dead_by_window(steps_since_fired, window)

    def sae_lens_config(self, cfg):
        return {}, {"training_architecture": TRAINING_ARCHITECTURE,
                    "training_architecture_details": {"k": cfg.k, "matryoshka_widths": list(widths_of(cfg))}}

    def reads_sae_lens(self, architecture, metadata):
        return architecture == TRAINING_ARCHITECTURE or (
            architecture == "jumprelu" and metadata.get("training_architecture") == TRAINING_ARCHITECTURE)

    def from_sae_lens(self, raw, weights, metadata):
        if raw["architecture"] == "jumprelu":  # the inference export
            details = metadata.get("training_architecture_details") or {}
            d_sae = int(raw["d_sae"])
            return {"k": float(details["k"]),
                    "matryoshka_widths": tuple(int(w) for w in details.get("matryoshka_widths") or (d_sae,))}
        if raw.get("rescale_acts_by_decoder_norm", True):  # training format: scalar topk_threshold
            fold_decoder_norms(weights)
        thr = weights.pop("topk_threshold").reshape(())
        weights["threshold"] = thr.to(weights["b_enc"].dtype).expand(int(raw["d_sae"])).clone()
        widths = [int(w) for w in raw.get("matryoshka_widths") or ()]
        if not widths or widths[-1] != int(raw["d_sae"]):  # sae-lens appends the outer level itself
            widths.append(int(raw["d_sae"]))
        return {"k": float(raw["k"]), "matryoshka_widths": tuple(widths)}


register(Matryoshka())
