"""JumpReLU: pre * (pre > threshold) with a learned per-feature threshold and a straight-through L0
penalty (Rajamanoharan et al. 2024). Saved as SAELens "jumprelu"; no dead-feature loss."""

from __future__ import annotations

import torch

from saes.architectures.base import Architecture, TrainOutput, register


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


class JumpReLU(Architecture):
    name = "jumprelu"
    sae_lens = "jumprelu"

    def init_state(self, sae) -> None:
        cfg = sae.cfg
        sae.threshold = torch.nn.Parameter(torch.full((cfg.d_sae,), cfg.jumprelu_init_threshold,
                                                      dtype=sae.b_enc.dtype, device=sae.b_enc.device))

    def state_names(self):
        return ("threshold",)

    def activation(self, sae, pre):
        return pre.relu() * (pre > sae.threshold).to(pre.dtype)

    def training_forward(self, sae, x, dead, *, sparse, aux_k, aux_coefficient, sparsity_scale) -> TrainOutput:
        cfg = sae.cfg
        pre = torch.addmm(sae.b_enc, x - sae.b_dec if cfg.apply_b_dec_to_input else x, sae.W_enc)
        acts = _JumpReLU.apply(pre, sae.threshold, cfg.jumprelu_bandwidth)
        sparsity = cfg.l0_coefficient * sparsity_scale * _Step.apply(pre, sae.threshold,
                                                                    cfg.jumprelu_bandwidth).sum(-1).mean()
        return dense_output(sae, x, acts, sparsity)

    def after_step(self, sae) -> None:
        with torch.no_grad():
            sae.threshold.clamp_(min=0.0)


def dense_output(sae, x, acts, sparsity) -> TrainOutput:
    """The losses of a dense forward with a sparsity penalty (JumpReLU, ReLU): MSE plus the penalty."""
    recon = acts @ sae.W_dec + sae.b_dec
    active = acts.detach() > 0
    mse = (recon.float() - x).pow(2).sum(-1).mean()
    return TrainOutput(loss=mse + sparsity, mse=mse.detach(), aux=x.new_zeros(()), sparsity=sparsity.detach(),
                       recon=recon.detach(), l0=active.sum() / x.shape[0], fire_counts=active.sum(0))


register(JumpReLU())
