"""Sparse kernels for k-sparse codes (TopK, AuxK) on CPU.

A k-sparse code is stored as `idx [B, k]` (latent ids, sorted within each row) and
`vals [B, k]`. With dense autograd, a TopK step costs five [B, d_in] x [d_in, d_sae]
GEMMs (encoder forward, decoder forward, decoder input grad, both weight grads). Here only
the encoder forward is dense; the other four touch just the B·k selected entries:

- decode:            x̂ = embedding_bag(idx, W_dec, vals)                 (B·k·d)
- grad of vals:      SDDMM (g @ W_decᵀ) sampled at (b, idx)               (B·k·d)
- grad of W_dec:     Sᵀ @ g with S = CSR(idx, vals)                       (B·k·d)
- grad of W_enc:     (CSR(idx, g_vals)ᵀ @ x)ᵀ, already in W_enc's layout (B·k·d)

`benchmarks/sae_vs_saelens.py` measures the effect.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor


def _csr(idx: Tensor, values: Tensor, n_cols: int) -> Tensor:
    b, k = idx.shape
    crow = torch.arange(0, b * k + 1, k, dtype=torch.int64, device=idx.device)
    with warnings.catch_warnings():
        # CSR on CPU is flagged "beta"; the calls used here are stable since torch 2.0.
        # The indices are valid by construction (sorted, distinct, in range).
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            crow, idx.reshape(-1), values.reshape(-1), (b, n_cols), check_invariants=False
        )


class SparseDecode(torch.autograd.Function):
    """x̂[b] = Σ_j vals[b, j] · W_dec[idx[b, j]] (no bias)."""

    @staticmethod
    def forward(idx: Tensor, vals: Tensor, W_dec: Tensor) -> Tensor:  # type: ignore[override]
        return F.embedding_bag(idx, W_dec, per_sample_weights=vals, mode="sum")

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor, Tensor], output: Tensor) -> None:
        idx, vals, W_dec = inputs
        ctx.save_for_backward(idx, vals, W_dec)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[None, Tensor | None, Tensor | None]:  # type: ignore[override]
        idx, vals, W_dec = ctx.saved_tensors
        g = g.contiguous()
        g_vals = g_w = None
        if ctx.needs_input_grad[1]:
            mask = _csr(idx, torch.ones_like(vals), W_dec.shape[0])
            g_vals = torch.sparse.sampled_addmm(mask, g, W_dec.t(), beta=0.0)
            g_vals = g_vals.values().view_as(vals)
        if ctx.needs_input_grad[2]:
            g_w = _csr(idx, vals, W_dec.shape[0]).t() @ g
        return None, g_vals, g_w


class SparseEncoderGrad(torch.autograd.Function):
    """Identity on `vals` = (x_c @ W_enc + b_enc)[b, idx] (computed without grad by the
    caller); the backward sends the gradient to x_c, W_enc and b_enc through only the
    selected entries."""

    @staticmethod
    def forward(  # type: ignore[override]
        x_c: Tensor, W_enc: Tensor, b_enc: Tensor, idx: Tensor, vals: Tensor
    ) -> Tensor:
        return vals.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        x_c, W_enc, b_enc, idx, _ = inputs
        ctx.save_for_backward(x_c, W_enc, idx)
        ctx.n_latents = b_enc.shape[0]

    @staticmethod
    def backward(ctx: Any, g_vals: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x_c, W_enc, idx = ctx.saved_tensors
        n = ctx.n_latents
        s = _csr(idx, g_vals.contiguous(), n)
        g_x = g_w = g_b = None
        if ctx.needs_input_grad[0]:
            g_x = s @ W_enc.t()
        if ctx.needs_input_grad[1]:
            g_w = (s.t() @ x_c).t()  # [d_in, d_sae], column-major like W_enc
        if ctx.needs_input_grad[2]:
            g_b = torch.zeros(n, dtype=g_vals.dtype, device=g_vals.device).index_add_(
                0, idx.reshape(-1), g_vals.reshape(-1)
            )
        return g_x, g_w, g_b, None, None


def selected_pre_acts(x_c: Tensor, W_enc: Tensor, b_enc: Tensor, idx: Tensor) -> Tensor:
    """(x_c @ W_enc + b_enc)[b, idx[b, j]] in float32, computed at the B·k selected entries
    only (SDDMM): the exact values of latents a lower-precision GEMM selected."""
    with torch.autocast(x_c.device.type, enabled=False):
        mask = _csr(
            idx, torch.ones(idx.shape, dtype=torch.float32, device=idx.device), W_enc.shape[1]
        )
        vals = torch.sparse.sampled_addmm(mask, x_c.float(), W_enc.float(), beta=0.0)
        return vals.values().view(idx.shape) + b_enc.float()[idx]


def topk_sorted(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k values and indices per row, indices sorted ascending (CSR needs that)."""
    vals, idx = scores.topk(k, dim=-1, sorted=False)
    idx, order = idx.sort(dim=-1)
    return vals.gather(-1, order), idx
