"""BatchTopK: the batch's k * rows largest pre-activations, anywhere in the batch (Bussmann et al. 2024).

At inference it is a JumpReLU whose per-feature threshold is an EMA of the smallest activation
kept in training (a buffer, not a gradient parameter), so it is saved as SAELens "jumprelu" with
`training_architecture: batchtopk` in the metadata, as sae-lens exports its own BatchTopK SAEs;
sae-lens's training format (scalar `topk_threshold`) loads too. AuxK revives dead features.
"""

from __future__ import annotations

import torch

from saes import kernels
from saes.architectures.base import (Architecture, TrainOutput, auxk_setup, check_k, dead_by_window,
                                     fold_decoder_norms, register)
from saes.architectures.topk import ksparse_output


class BatchTopK(Architecture):
    name = "batchtopk"
    sae_lens = "jumprelu"
    uses_k = True

    def check_config(self, cfg) -> None:
        check_k(cfg)

    def init_state(self, sae) -> None:
        cfg = sae.cfg
        sae.register_buffer("threshold", torch.zeros(cfg.d_sae, dtype=sae.b_enc.dtype, device=sae.b_enc.device))

    def state_names(self):
        return ("threshold",)

    def activation(self, sae, pre):
        return pre.relu() * (pre > sae.threshold).to(pre.dtype)

    def training_forward(self, sae, x, dead, *, sparse, aux_k, aux_coefficient, sparsity_scale) -> TrainOutput:
        n_dead, base, dead_arg = auxk_setup(sae.cfg, dead, aux_k)
        recon, aux_recon, acts, idx = _forward(sae, x, dead_arg, min(base, n_dead), sparse)
        out = ksparse_output(sae, x, recon, aux_recon, acts, idx, n_dead, base, aux_coefficient)
        _update_threshold(sae, acts[acts > 0])
        return out

    def dead_features(self, steps_since_fired, window):
        return dead_by_window(steps_since_fired, window)

    def sae_lens_config(self, cfg):
        return {}, {"training_architecture": "batchtopk", "training_architecture_details": {"k": cfg.k}}

    def reads_sae_lens(self, architecture, metadata):
        details = metadata.get("training_architecture_details") or {}
        return architecture == "batchtopk" or (
            architecture == "jumprelu" and metadata.get("training_architecture") == "batchtopk" and "k" in details)

    def from_sae_lens(self, raw, weights, metadata):
        if raw["architecture"] == "jumprelu":  # the inference export
            return {"k": float(metadata["training_architecture_details"]["k"])}
        if raw.get("rescale_acts_by_decoder_norm", True):  # training format: scalar topk_threshold
            fold_decoder_norms(weights)
        thr = weights.pop("topk_threshold").reshape(())
        weights["threshold"] = thr.to(weights["b_enc"].dtype).expand(int(raw["d_sae"])).clone()
        return {"k": float(raw["k"])}


def _forward(sae, x, dead, k_aux, sparse):
    cfg = sae.cfg
    sae_in = x - sae.b_dec if cfg.apply_b_dec_to_input else x
    if not sparse:
        pre = torch.addmm(sae.b_enc, sae_in, sae.W_enc)
        idx, keep = kernels.batchtopk_select(pre.detach(), cfg.k)
        acts_k = pre.gather(1, idx).relu() * keep
        recon = torch.zeros_like(pre).scatter(1, idx, acts_k) @ sae.W_dec + sae.b_dec
        aux_recon = None
        if dead is not None:
            aux_idx = kernels.aux_topk_indices(pre.detach(), dead, k_aux)
            aux_recon = torch.zeros_like(pre).scatter(1, aux_idx, pre.gather(1, aux_idx).relu()) @ sae.W_dec
        return recon, aux_recon, acts_k, idx
    pre = kernels.encoder_preacts(sae_in, sae.W_enc, sae.b_enc, sae.pre_buffer(x))
    idx, keep = kernels.batchtopk_select(pre, cfg.k)
    m = idx.shape[1]
    aux_idx = kernels.aux_topk_indices(pre, dead, k_aux) if dead is not None else None
    all_idx = idx if aux_idx is None else torch.cat([idx, aux_idx], 1)
    vals = kernels.SparseEncoderGather.apply(sae_in, sae.W_enc, sae.b_enc, all_idx, pre)
    del pre
    acts_k = vals[:, :m].relu() * keep
    recon = kernels.SparseDecoder.apply(acts_k, idx, sae.W_dec) + sae.b_dec
    aux_recon = None
    if aux_idx is not None:
        aux_recon = kernels.SparseDecoder.apply(vals[:, m:].relu(), aux_idx, sae.W_dec)
    return recon, aux_recon, acts_k, idx


@torch.no_grad()
def _update_threshold(sae, active_vals: torch.Tensor, lr: float = 0.01) -> None:
    """EMA of the smallest kept activation: the JumpReLU threshold used at inference."""
    if active_vals.numel() == 0:
        return
    m = active_vals.min().to(sae.threshold.dtype)
    if bool(sae.threshold[0] == 0):
        sae.threshold.fill_(m)
    else:
        sae.threshold.mul_(1 - lr).add_(lr * m)


register(BatchTopK())
