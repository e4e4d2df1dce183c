"""TopK: the k largest pre-activations of each row, ReLU'd (Gao et al. 2024); AuxK revives dead features.

Training uses the k-sparse kernels of `saes.kernels` (a backward that touches only the active
features) or, with `sparse=False`, the dense reference. Saved as SAELens "topk" with
rescale_acts_by_decoder_norm=false (our decoder rows have unit norm already).
"""

from __future__ import annotations

import torch

from saes import kernels
from saes.architectures.base import (Architecture, TrainOutput, auxk_loss, auxk_setup, check_k, dead_by_window,
                                     fold_decoder_norms, register)


class TopK(Architecture):
    name = "topk"
    sae_lens = "topk"
    uses_k = True
    entries_scratch = True

    def check_config(self, cfg) -> None:
        check_k(cfg)
        if cfg.k != int(cfg.k):
            raise ValueError(f"topk needs an integer k, got {cfg.k}")
        cfg.k = int(cfg.k)

    def activation(self, sae, pre: torch.Tensor) -> torch.Tensor:
        vals, idx = pre.topk(sae.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter_(-1, idx, vals.relu())

    @torch.no_grad()
    def active_entries(self, sae, x: torch.Tensor, buf: torch.Tensor | None = None):
        """Bit-identical to encode + nonzero for a folded SAE (every saved one). What it saves: a fresh
        [rows, d_sae] tensor for the bias sum (added in place into `buf`, reused between chunks), the
        dense zero-and-scatter, and the scan for nonzeros; left are the encoder matmul and the top-k."""
        cfg = sae.cfg
        if sae.is_normalised() or x.dtype != sae.dtype:
            return None
        sae_in = x - sae.b_dec if cfg.apply_b_dec_to_input else x
        pre = torch.matmul(sae_in, sae.W_enc, out=buf[: len(x)] if buf is not None else None)
        pre += sae.b_enc  # the same two roundings as SAE.pre_acts: (x - b_dec) @ W_enc, then + b_enc
        vals, idx = pre.topk(cfg.k, dim=-1, sorted=False)
        idx, order = idx.sort(dim=1)
        vals = vals.gather(1, order)
        keep = vals > 0
        rows = torch.arange(len(x), device=x.device)[:, None].expand_as(idx)[keep]
        return rows, idx[keep], vals[keep]

    def training_forward(self, sae, x, dead, *, sparse, aux_k, aux_coefficient, sparsity_scale) -> TrainOutput:
        cfg = sae.cfg
        n_dead, base, dead_arg = auxk_setup(cfg, dead, aux_k)
        k_aux = min(base, n_dead)
        if sparse:
            recon, aux_recon, acts, idx, _ = kernels.sparse_topk_forward(
                x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, cfg.k, dead_arg, k_aux, cfg.apply_b_dec_to_input,
                pre_out=sae.pre_buffer(x))
        else:
            recon, aux_recon, acts, idx, _ = kernels.dense_topk_forward(
                x, sae.W_enc, sae.b_enc, sae.W_dec, sae.b_dec, cfg.k, dead_arg, k_aux, cfg.apply_b_dec_to_input)
        return ksparse_output(sae, x, recon, aux_recon, acts, idx, n_dead, base, aux_coefficient)

    def dead_features(self, steps_since_fired, window):
        return dead_by_window(steps_since_fired, window)

    def sae_lens_config(self, cfg):
        return {"k": cfg.k, "rescale_acts_by_decoder_norm": False}, {}

    def from_sae_lens(self, raw, weights, metadata):
        if raw.get("rescale_acts_by_decoder_norm"):  # fold the decoder norms, as sae-lens does on export
            fold_decoder_norms(weights)
        return {"k": int(raw["k"])}


def ksparse_output(sae, x, recon, aux_recon, acts, idx, n_dead: int, base: int, aux_coefficient: float) -> TrainOutput:
    """The losses of a k-sparse forward (TopK, BatchTopK): MSE plus AuxK on the dead features."""
    active = acts > 0
    fire_counts = torch.bincount(idx[active], minlength=sae.cfg.d_sae)
    l0 = active.sum() / x.shape[0]
    mse = (recon - x).pow(2).sum(-1).mean()
    loss = mse
    aux = auxk_loss(x, recon, aux_recon, n_dead, base, aux_coefficient)
    if aux_recon is not None:
        loss = loss + aux
    return TrainOutput(loss=loss, mse=mse.detach(), aux=aux.detach(), sparsity=x.new_zeros(()), recon=recon.detach(),
                       l0=l0, fire_counts=fire_counts)


register(TopK())
