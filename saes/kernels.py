"""Sparse TopK kernels: an encoder gather and a decoder whose backward touch only the active latents.

A TopK SAE computes the dense pre-activations once (one [batch, d_in] x [d_in, d_sae] matmul,
unavoidable), selects k latents per row, and from then on everything scales with k instead of
d_sae:

- `SparseEncoderGather`: returns pre[b, idx[b, j]] (already computed, passed in) and in backward
  scatters the [batch, k] gradient straight into W_enc / b_enc / the input with sparse products.
  No dense [batch, d_sae] gradient is ever formed.
- `SparseDecoder`: out[b] = sum_j acts[b, j] * W_dec[idx[b, j]] (an embedding bag), backward gives
  the [batch, k] activation gradient (per-row dot products) and a W_dec gradient that only the
  selected rows receive.

The same idea as EleutherAI sparsify's fused encoder, written for CPU as well as CUDA with
public torch ops only (embedding_bag, sparse COO mm, index_add). Profiled per step on CPU at
4096 x 512 -> 8192, k 32, fp32, 1 thread (2 busy cores): the encoder matmul 270-440 ms (load),
topk 50-75 ms, the two sparse weight-gradient products ~35 ms, the embedding bags ~35 ms, Adam
~12 ms; a whole step is ~1.3x one encoder matmul (`interp bench train`), where the dense
reference takes ~6x and sae-lens ~7x.

`dense_topk_forward` is the plain-autograd reference with the same selection, used by the
tests (gradients must match) and by `interp bench train`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def _scatter_rows_grad(idx: torch.Tensor, weights: torch.Tensor, rows: torch.Tensor, n_latents: int) -> torch.Tensor:
    """G[l] = sum over (b, j) with idx[b, j] == l of weights[b, j] * rows[b]: a [n_latents, d] tensor.

    That is A^T @ rows with A the [batch, n_latents] sparse matrix holding `weights` at `idx`,
    done as a sparse COO matmul, so its cost is batch * k * d rather than batch * n_latents * d.
    Duplicate (row, latent) pairs are summed.
    """
    batch, k = idx.shape
    row_ids = torch.arange(batch, device=idx.device).repeat_interleave(k)
    a_t = torch.sparse_coo_tensor(torch.stack([idx.reshape(-1), row_ids]), weights.reshape(-1).to(rows.dtype),
                                  (n_latents, batch), check_invariants=False)
    if rows.device.type != "cpu":
        return torch.sparse.mm(a_t, rows)
    # on the CPU, sparse.mm builds its result in a temporary the size of the output and copies it: one extra
    # [d_sae, d_in] matrix at the peak of every step (2.1 GB at 131072 x 4096); into `out` there is none,
    # and it is the same arithmetic (bit-identical) and faster
    out = torch.empty(n_latents, rows.shape[1], dtype=rows.dtype, device=rows.device)
    return torch.mm(a_t, rows, out=out)


def _rowwise_dot(idx: torch.Tensor, table: torch.Tensor, grad: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """out[b, j] = grad[b] . table[idx[b, j]] without materialising table[idx] ([batch, k, d]).

    It is the per-sample-weight gradient of an embedding bag, which torch computes in place.
    """
    with torch.enable_grad():
        w = like.detach().to(table.dtype).requires_grad_(True)
        out = F.embedding_bag(idx, table.detach(), per_sample_weights=w, mode="sum")
        (g,) = torch.autograd.grad(out, w, grad.to(out.dtype))
    return g


class SparseEncoderGather(torch.autograd.Function):
    """vals = pre.gather(1, idx) where pre = x @ W_enc + b_enc was computed (without grad) by the caller.

    Backward only touches the selected latents: grad_x via an embedding bag over W_enc's rows
    (W_enc is [d_in, d_sae]; its transpose is contiguous when the SAE uses the training layout),
    grad_W_enc via a sparse product, grad_b_enc via index_add.
    """

    @staticmethod
    def forward(ctx, x, W_enc, b_enc, idx, pre):
        ctx.save_for_backward(x, W_enc, idx)
        ctx.d_sae = W_enc.shape[1]
        return pre.gather(1, idx).to(x.dtype)  # bf16 under autocast -> the input's dtype

    @staticmethod
    def backward(ctx, grad_vals):
        x, W_enc, idx = ctx.saved_tensors
        grad_x = grad_W = grad_b = None
        with _no_autocast(x.device):
            g = grad_vals.to(W_enc.dtype).contiguous()
            if ctx.needs_input_grad[0]:
                table = W_enc.t()
                table = table if table.is_contiguous() else table.contiguous()
                grad_x = F.embedding_bag(idx, table, per_sample_weights=g.to(table.dtype), mode="sum").to(x.dtype)
            if ctx.needs_input_grad[1]:
                grad_W = _scatter_rows_grad(idx, g, x.to(W_enc.dtype), ctx.d_sae).t()
            if ctx.needs_input_grad[2]:
                grad_b = torch.zeros(ctx.d_sae, dtype=W_enc.dtype, device=g.device)
                grad_b.index_add_(0, idx.reshape(-1), g.reshape(-1).to(W_enc.dtype))
        return grad_x, grad_W, grad_b, None, None


class SparseDecoder(torch.autograd.Function):
    """out[b] = sum_j acts[b, j] * W_dec[idx[b, j]] (no bias); W_dec is [d_sae, d_in]."""

    @staticmethod
    def forward(ctx, acts, idx, W_dec):
        ctx.save_for_backward(acts, idx, W_dec)
        with _no_autocast(acts.device):
            return F.embedding_bag(idx, W_dec, per_sample_weights=acts.to(W_dec.dtype), mode="sum")

    @staticmethod
    def backward(ctx, grad_out):
        acts, idx, W_dec = ctx.saved_tensors
        grad_acts = grad_W = None
        with _no_autocast(acts.device):
            g = grad_out.contiguous()
            if ctx.needs_input_grad[0]:
                grad_acts = _rowwise_dot(idx, W_dec, g, acts).to(acts.dtype)
            if ctx.needs_input_grad[2]:
                grad_W = _scatter_rows_grad(idx, acts, g.to(W_dec.dtype), W_dec.shape[0])
        return grad_acts, None, grad_W


def topk_indices(pre: torch.Tensor, k: int) -> torch.Tensor:
    """The selection shared by the sparse and the dense path (same op, so the same latents)."""
    return pre.topk(k, dim=1, sorted=False).indices


def aux_topk_indices(pre: torch.Tensor, dead: torch.Tensor, k_aux: int) -> torch.Tensor:
    """Per row, the k_aux dead latents with the highest pre-activations (AuxK)."""
    dead_idx = dead.nonzero().squeeze(1)
    if dead_idx.numel() * 4 <= pre.shape[1]:  # few dead: select among their columns only
        sub = pre.index_select(1, dead_idx)
        return dead_idx[sub.topk(k_aux, dim=1, sorted=False).indices]
    masked = pre.masked_fill(~dead[None, :], float("-inf"))
    return masked.topk(k_aux, dim=1, sorted=False).indices


def batchtopk_select(pre: torch.Tensor, k: float) -> tuple[torch.Tensor, torch.Tensor]:
    """BatchTopK: the round(k * batch) largest positive pre-activations over the whole batch.

    Exact, without a topk over batch * d_sae elements: take each row's top-m candidates, pick
    the global top among those, and double m while some row had all its m candidates picked
    (that row might own more). Returns (idx [batch, m], keep [batch, m] bool).
    """
    batch, d_sae = pre.shape
    n_keep = max(1, int(round(k * batch)))
    m = min(d_sae, max(1, int(4 * k)))
    while True:
        vals, idx = pre.topk(m, dim=1, sorted=False)
        flat = vals.reshape(-1)
        n = min(n_keep, flat.numel())
        keep = torch.zeros_like(flat, dtype=torch.bool)
        keep[flat.topk(n, sorted=False).indices] = True
        keep = keep.view(batch, m) & (vals > 0)
        if m >= d_sae or not bool(keep.all(dim=1).any()):
            return idx, keep
        m = min(d_sae, 2 * m)


def dense_topk_forward(x, W_enc, b_enc, W_dec, b_dec, k: int, dead: torch.Tensor | None = None,
                       k_aux: int = 0, apply_b_dec_to_input: bool = True):
    """Reference TopK SAE forward with plain autograd on dense [batch, d_sae] tensors.

    Returns (recon, aux_recon or None, acts [batch, k] (the ReLU'd values at idx), idx, aux_idx or None);
    recon includes b_dec, aux_recon does not.
    """
    sae_in = x - b_dec if apply_b_dec_to_input else x
    pre = torch.addmm(b_enc, sae_in, W_enc)
    idx = topk_indices(pre.detach(), k)
    acts_k = pre.gather(1, idx).relu()
    acts = torch.zeros_like(pre).scatter(1, idx, acts_k)
    recon = acts @ W_dec + b_dec
    aux_recon = aux_idx = None
    if dead is not None and k_aux > 0:
        aux_idx = aux_topk_indices(pre.detach(), dead, k_aux)
        aux_acts = torch.zeros_like(pre).scatter(1, aux_idx, pre.gather(1, aux_idx).relu())
        aux_recon = aux_acts @ W_dec
    return recon, aux_recon, acts_k, idx, aux_idx


def encoder_preacts(sae_in, W_enc, b_enc, out: torch.Tensor | None = None) -> torch.Tensor:
    """sae_in @ W_enc + b_enc without autograd, into `out` when given (a reused buffer: on CPU a fresh
    [batch, d_sae] allocation costs page faults, ~25 ms per step at 4096 x 8192)."""
    with torch.no_grad():
        if out is not None and out.shape == (sae_in.shape[0], W_enc.shape[1]) and out.dtype == sae_in.dtype \
                and not torch.is_autocast_enabled(sae_in.device.type):
            return torch.addmm(b_enc, sae_in, W_enc, out=out)
        return torch.addmm(b_enc, sae_in, W_enc)


def sparse_topk_forward(x, W_enc, b_enc, W_dec, b_dec, k: int, dead: torch.Tensor | None = None,
                        k_aux: int = 0, apply_b_dec_to_input: bool = True, pre_out: torch.Tensor | None = None):
    """The same function as `dense_topk_forward`, with the sparse kernels (same outputs).

    `pre_out`: an optional [batch, d_sae] buffer for the pre-activations (overwritten, not kept).
    """
    sae_in = x - b_dec if apply_b_dec_to_input else x
    pre = encoder_preacts(sae_in, W_enc, b_enc, pre_out)
    idx = topk_indices(pre, k)
    aux_idx = None
    if dead is not None and k_aux > 0:
        aux_idx = aux_topk_indices(pre, dead, k_aux)
        all_idx = torch.cat([idx, aux_idx], dim=1)
    else:
        all_idx = idx
    vals = SparseEncoderGather.apply(sae_in, W_enc, b_enc, all_idx, pre)
    del pre
    acts = vals[:, :k].relu()
    recon = SparseDecoder.apply(acts, idx, W_dec) + b_dec
    aux_recon = None
    if aux_idx is not None:
        aux_recon = SparseDecoder.apply(vals[:, k:].relu(), aux_idx, W_dec)
    return recon, aux_recon, acts, idx, aux_idx
