"""The k-sparse TopK path computes the same function and gradients as a dense autograd reference."""

import pytest
import torch

from saes import kernels
from saes.sae import SAE, SAEConfig


def _params(d_in, d_sae, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    w_dec = torch.randn(d_sae, d_in, generator=g, dtype=dtype)
    return [torch.nn.Parameter(w_dec.clone().t()),  # W_enc [d_in, d_sae], stored as in training (transposed)
            torch.nn.Parameter(0.1 * torch.randn(d_sae, generator=g, dtype=dtype)),
            torch.nn.Parameter(w_dec.clone()),
            torch.nn.Parameter(0.1 * torch.randn(d_in, generator=g, dtype=dtype))]


def _loss_and_grads(fn, x, dead, k, k_aux, dtype, apply_b_dec=True):
    params = _params(x.shape[1], 256, dtype)
    recon, aux_recon, acts, idx, aux_idx = fn(x, *params, k, dead, k_aux, apply_b_dec)
    loss = (recon - x).pow(2).sum(-1).mean()
    if aux_recon is not None:
        loss = loss + 0.3 * (aux_recon - (x - recon).detach()).pow(2).sum(-1).mean()
    loss.backward()
    return recon.detach(), acts.detach(), idx, [p.grad for p in params]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("with_aux", [False, True])
@pytest.mark.parametrize("apply_b_dec", [True, False])
def test_sparse_topk_gradients_equal_dense_reference(dtype, tol, with_aux, apply_b_dec):
    torch.manual_seed(0)
    x = torch.randn(96, 24, dtype=dtype)
    dead = torch.zeros(256, dtype=torch.bool)
    dead[::3] = True  # some dead features also win the main topk: duplicates must add up
    k_aux = 12 if with_aux else 0
    dense = _loss_and_grads(kernels.dense_topk_forward, x, dead if with_aux else None, 8, k_aux, dtype, apply_b_dec)
    sparse = _loss_and_grads(kernels.sparse_topk_forward, x, dead if with_aux else None, 8, k_aux, dtype, apply_b_dec)
    assert torch.equal(dense[2], sparse[2])  # same features selected
    assert torch.allclose(dense[0], sparse[0], atol=tol, rtol=tol)
    assert torch.allclose(dense[1], sparse[1], atol=tol, rtol=tol)
    for name, gd, gs in zip(["W_enc", "b_enc", "W_dec", "b_dec"], dense[3], sparse[3]):
        assert gd.shape == gs.shape
        assert torch.allclose(gd, gs, atol=tol, rtol=tol), f"{name}: max diff {(gd - gs).abs().max()}"


def test_sparse_grad_of_w_enc_touches_only_selected_latents():
    torch.manual_seed(0)
    x = torch.randn(4, 16)
    params = _params(16, 256, torch.float32)
    recon, _, _, idx, _ = kernels.sparse_topk_forward(x, *params, 3)
    recon.pow(2).sum().backward()
    touched = params[0].grad.abs().sum(0) > 0
    assert set(touched.nonzero().squeeze(1).tolist()) <= set(idx.unique().tolist())


def test_aux_selection_picks_only_dead_latents():
    pre = torch.randn(10, 64)
    for every in (2, 16):  # many dead (masked topk) and few dead (column gather)
        dead = torch.zeros(64, dtype=torch.bool)
        dead[::every] = True
        idx = kernels.aux_topk_indices(pre, dead, 3)
        assert bool(dead[idx].all())
        expect = pre.masked_fill(~dead, float("-inf")).topk(3, dim=1).values.sort(1).values
        assert torch.equal(pre.gather(1, idx).sort(1).values, expect)


def test_batchtopk_selection_is_the_global_topk():
    torch.manual_seed(0)
    pre = torch.randn(64, 512)
    pre[0] += 3.0  # one row owns far more than 4k of the batch's winners: forces the widening loop
    idx, keep = kernels.batchtopk_select(pre, 4)
    chosen = torch.zeros_like(pre, dtype=torch.bool)
    chosen.scatter_(1, idx, keep)
    flat = pre.relu().flatten()
    ref = torch.zeros_like(flat, dtype=torch.bool)
    ref[flat.topk(4 * 64).indices] = True
    assert torch.equal(chosen.flatten(), ref & (flat > 0))


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
def test_training_forward_sparse_equals_dense(arch):
    torch.manual_seed(0)
    x = torch.randn(128, 32)
    dead = torch.zeros(256, dtype=torch.bool)
    dead[200:] = True
    grads = []
    for sparse in (True, False):
        sae = SAE(SAEConfig(arch=arch, d_in=32, d_sae=256, k=6), generator=torch.Generator().manual_seed(0))
        sae.use_training_layout()
        out = sae.training_forward(x, dead, sparse=sparse, aux_k=16)
        out.loss.backward()
        grads.append((out.loss.detach(), out.fire_counts, [p.grad.clone() for p in sae.parameters()]))
    (ls, fs, gs), (ld, fd, gd) = grads
    assert torch.allclose(ls, ld, rtol=1e-5) and torch.equal(fs, fd)
    for a, b in zip(gs, gd):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-4)
