"""The trainer's memory fixes change no number: the chunked decoder-gradient projection, and Adam stepping
the transposed W_enc as its contiguous transpose (no copy of it at the peak of every step)."""

import torch

from saes.sae import SAE, SAEConfig
from saes.train import contiguous_for_step


def test_chunked_projection_is_bit_identical():
    sae = SAE(SAEConfig(arch="topk", d_in=64, d_sae=70_000, k=4))  # 70k rows: several blocks of 65,536
    g = torch.randn(70_000, 64)
    sae.W_dec.grad = g.clone()
    sae.project_decoder_grad_()
    w = sae.W_dec.detach()
    assert torch.equal(sae.W_dec.grad, g - (g * w).sum(1, keepdim=True) * w)


def test_contiguous_step_equals_a_plain_step():
    torch.manual_seed(0)
    runs = []
    for swap in (False, True):
        torch.manual_seed(0)
        sae = SAE(SAEConfig(arch="topk", d_in=32, d_sae=256, k=4))
        sae.use_training_layout()
        assert not sae.W_enc.is_contiguous() and sae.W_enc.t().is_contiguous()
        opt = torch.optim.Adam(sae.parameters(), lr=1e-2, fused=True)
        for step in range(4):
            torch.manual_seed(step)
            for p in sae.parameters():
                p.grad = torch.randn_like(p)
            if swap:
                with contiguous_for_step(opt):
                    assert sae.W_enc.is_contiguous() and sae.W_enc.grad.is_contiguous()
                    opt.step()
            else:
                opt.step()
        # outside the step every tensor keeps its layout: W_enc [d_in, d_sae] a transposed view, moments alike
        assert sae.W_enc.shape == (32, 256) and not sae.W_enc.is_contiguous()
        state = opt.state[sae.W_enc]
        assert state["exp_avg"].shape == (32, 256) and state["exp_avg_sq"].shape == (32, 256)
        runs.append((sae, opt))
    (a, oa), (b, ob) = runs
    for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(pa, pb), na
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(oa.state[pa][key], ob.state[pb][key]), (na, key)
