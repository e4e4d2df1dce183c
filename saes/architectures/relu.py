"""ReLU with an L1 penalty on the activations times the decoder norms (the original SAE; Anthropic's
April 2024 update). Saved as SAELens "standard"; no dead-feature loss."""

from __future__ import annotations

import torch

from saes.architectures.base import Architecture, TrainOutput, register
from saes.architectures.jumprelu import dense_output


class ReLU(Architecture):
    name = "relu"
    sae_lens = "standard"

    def activation(self, sae, pre):
        return pre.relu()

    def training_forward(self, sae, x, dead, *, sparse, aux_k, aux_coefficient, sparsity_scale) -> TrainOutput:
        cfg = sae.cfg
        pre = torch.addmm(sae.b_enc, x - sae.b_dec if cfg.apply_b_dec_to_input else x, sae.W_enc)
        acts = pre.relu()
        sparsity = cfg.l1_coefficient * sparsity_scale * (acts * sae.W_dec.norm(dim=1)).sum(-1).mean()
        return dense_output(sae, x, acts, sparsity)


register(ReLU())
