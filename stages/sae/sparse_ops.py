"""Sparse kernels for sparse codes on CPU: TopK's k-sparse codes and the active sets of
the L1 family (ReLU, gated, JumpReLU) once their L0 is low.

A sparse code over a batch [B, d_sae] is held in CSR form: `crow [B + 1]` (row starts),
`col [nnz]` (latent ids, ascending within each row) and `vals [nnz]`. A TopK code
`idx [B, k]` is the case crow = 0, k, 2k, ... (`fixed_rows`). With dense autograd, a
training step costs five [B, d_in] x [d_in, d_sae] GEMMs (encoder forward, decoder
forward, decoder input grad, both weight grads). Here only the encoder forward is dense;
the other four touch just the nnz selected entries:

- decode:            x̂ = embedding_bag(col, W_dec, crow, vals)              (nnz·d)
- grad of vals:      SDDMM (g @ W_decᵀ) sampled at the code's entries        (nnz·d)
- grad of W_dec:     Sᵀ @ g with S = CSR(crow, col, vals)                    (nnz·d)
- grad of W_enc:     (CSR(crow, col, g_vals)ᵀ @ x)ᵀ, already in W_enc's layout (nnz·d)

Both Sᵀ products use the pattern's transpose, built once per code (`transposed`: a
stable sort of `col`) and kept in the code's `memo`. torch's own `S.t() @ g` converts
the transposed CSR back to CSR on every call: at toy-a's shape (4,096 × 1,024, k 16,
2 threads) 3.7 ms a product, against 2.5 ms for the transpose, once, and 0.8 ms a
product. The sums run in the same order, so the gradients are the same bits.

This is exact, not an approximation, wherever every entry outside the code has zero
gradient: TopK's unselected latents; a ReLU latent at pre ≤ 0 (ReLU's derivative and the
L1 term's are zero there); a closed gate; a JumpReLU latent below its threshold's
straight-through window. `active_set` finds such a code; it declines (None) when the code
is too dense to pay, and the architecture then runs its dense autograd.

`benchmarks/sae_vs_saelens.py` measures the effect.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

# Above this share of active entries, the L1 family trains dense. Measured on this
# machine's 2 cores (d_in 256, d_sae 4096, batch 4096): the four sparse products cost
# ~18 ms at 0.8 % density against ~40 ms per dense GEMM, and grow linearly with nnz;
# finding the active set costs ~20 ms at any density.
MAX_SPARSE_DENSITY = 0.05


class Code(NamedTuple):
    """A sparse code's pattern (CSR) and its values (`vals`: no gradient yet). `memo`
    (a dict, one per code) keeps the pattern's transpose for the products that need it;
    None computes it at each use."""

    crow: Tensor  # int64 [B + 1]
    col: Tensor  # int64 [nnz]
    vals: Tensor  # [nnz]
    memo: dict | None = None


def fixed_rows(idx: Tensor) -> tuple[Tensor, Tensor]:
    """(crow, col) of a code with k entries per row, `idx [B, k]` sorted within rows."""
    b, k = idx.shape
    crow = torch.arange(0, b * k + 1, k, dtype=torch.int64, device=idx.device)
    return crow, idx.reshape(-1)


def _csr(crow: Tensor, col: Tensor, values: Tensor, n_cols: int) -> Tensor:
    with warnings.catch_warnings():
        # CSR on CPU is flagged "beta"; the calls used here are stable since torch 2.0.
        # The indices are valid by construction (sorted, distinct, in range).
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(
            crow, col, values.reshape(-1), (crow.shape[0] - 1, n_cols), check_invariants=False
        )


def transposed(
    crow: Tensor, col: Tensor, n_cols: int, memo: dict | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """The pattern's transpose as CSR: (crow_t [n_cols + 1], col_t [nnz], perm [nnz]),
    where entry i of the transpose is entry perm[i] of the pattern. Within each of its
    rows the entries keep ascending original-row order (a stable sort of `col`), the
    order torch's CSC-to-CSR conversion gives, so products with it are bit-identical to
    `S.t() @ dense`. Kept in `memo` when one is given."""
    if memo is not None and "t" in memo:
        return memo["t"]
    perm = torch.argsort(col, stable=True)
    rows = torch.repeat_interleave(torch.arange(crow.shape[0] - 1, device=crow.device), crow.diff())
    crow_t = torch.zeros(n_cols + 1, dtype=torch.int64, device=col.device)
    crow_t[1:] = torch.bincount(col, minlength=n_cols).cumsum(0)
    out = (crow_t, rows.index_select(0, perm), perm)
    if memo is not None:
        memo["t"] = out
    return out


def transposed_product(
    crow: Tensor, col: Tensor, values: Tensor, n_cols: int, dense: Tensor, memo: dict | None
) -> Tensor:
    """Sᵀ @ dense for S = CSR(crow, col, values) of `n_cols` columns: [n_cols, d]."""
    crow_t, col_t, perm = transposed(crow, col, n_cols, memo)
    values_t = values.reshape(-1).index_select(0, perm)
    return _csr(crow_t, col_t, values_t, crow.shape[0] - 1) @ dense


def active_set(pre: Tensor, floor: Tensor | float = 0.0) -> Code | None:
    """The entries of `pre [B, n]` above `floor` (a scalar, or one value per column), as
    a CSR code; None when more than `MAX_SPARSE_DENSITY` of all entries are, or none is."""
    mask = pre > floor
    nnz = int(torch.count_nonzero(mask))
    if not 0 < nnz <= MAX_SPARSE_DENSITY * mask.numel():
        return None
    b, n = pre.shape
    flat = mask.view(-1).nonzero().squeeze(1)  # row-major: sorted within rows
    vals = pre.reshape(-1)[flat]
    rows = flat.div(n, rounding_mode="floor")
    crow = torch.zeros(b + 1, dtype=torch.int64, device=pre.device)
    crow[1:] = torch.bincount(rows, minlength=b).cumsum(0)
    return Code(crow, flat - rows * n, vals, {})


class SparseDecode(torch.autograd.Function):
    """x̂[b] = Σ_{j in row b} vals[j] · W_dec[col[j]] (no bias); `vals` is flat [nnz]."""

    @staticmethod
    def forward(  # type: ignore[override]
        crow: Tensor, col: Tensor, vals: Tensor, W_dec: Tensor, memo: dict | None
    ) -> Tensor:
        return F.embedding_bag(col, W_dec, crow[:-1], per_sample_weights=vals, mode="sum")

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.save_for_backward(*inputs[:4])
        ctx.memo = inputs[4]

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        crow, col, vals, W_dec = ctx.saved_tensors
        g = g.contiguous()
        g_vals = g_w = None
        if ctx.needs_input_grad[2]:
            mask = _csr(crow, col, torch.ones_like(vals), W_dec.shape[0])
            g_vals = torch.sparse.sampled_addmm(mask, g, W_dec.t(), beta=0.0)
            g_vals = g_vals.values().view_as(vals)
        if ctx.needs_input_grad[3]:
            g_w = transposed_product(crow, col, vals, W_dec.shape[0], g, ctx.memo)
        return None, None, g_vals, g_w, None


class SparseEncoderGrad(torch.autograd.Function):
    """Identity on `vals` = (x_c @ W_enc + b_enc) at the code's entries (computed without
    grad by the caller); the backward sends the gradient to x_c, W_enc and b_enc through
    only those entries."""

    @staticmethod
    def forward(  # type: ignore[override]
        x_c: Tensor, W_enc: Tensor, b_enc: Tensor, crow: Tensor, col: Tensor, vals: Tensor,
        memo: dict | None,
    ) -> Tensor:  # fmt: skip
        return vals.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        x_c, W_enc, b_enc, crow, col, _, memo = inputs
        ctx.save_for_backward(x_c, W_enc, crow, col)
        ctx.n_latents = b_enc.shape[0]
        ctx.memo = memo

    @staticmethod
    def backward(ctx: Any, g_vals: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x_c, W_enc, crow, col = ctx.saved_tensors
        n = ctx.n_latents
        g_vals = g_vals.contiguous()
        g_x = g_w = g_b = None
        if ctx.needs_input_grad[0]:
            g_x = _csr(crow, col, g_vals, n) @ W_enc.t()
        if ctx.needs_input_grad[1]:  # [d_in, d_sae], column-major like W_enc
            g_w = transposed_product(crow, col, g_vals, n, x_c, ctx.memo).t()
        if ctx.needs_input_grad[2]:
            g_b = torch.zeros(n, dtype=g_vals.dtype, device=g_vals.device).index_add_(
                0, col, g_vals.reshape(-1)
            )
        return g_x, g_w, g_b, None, None, None, None


def encode_at(x_c: Tensor, W_enc: Tensor, b_enc: Tensor, code: Code) -> Tensor:
    """The code's values with their gradient path to x_c, W_enc and b_enc; recomputed in
    float32 at the code's entries when a lower-precision GEMM picked them."""
    vals = code.vals
    if vals.dtype != x_c.dtype:
        with torch.no_grad():  # the gradient goes through SparseEncoderGrad alone
            vals = selected_pre_acts(x_c, W_enc, b_enc, code.crow, code.col)
    with torch.autocast(x_c.device.type, enabled=False):
        return SparseEncoderGrad.apply(x_c, W_enc, b_enc, code.crow, code.col, vals, code.memo)


def decode(code: Code, vals: Tensor, W_dec: Tensor) -> Tensor:
    """Σ vals · W_dec rows over each row's entries (no bias), with sparse gradients."""
    with torch.autocast(vals.device.type, enabled=False):
        return SparseDecode.apply(code.crow, code.col, vals, W_dec, code.memo)


def selected_pre_acts(
    x_c: Tensor, W_enc: Tensor, b_enc: Tensor, crow: Tensor, col: Tensor
) -> Tensor:
    """(x_c @ W_enc + b_enc) at the entries (crow, col) in float32, computed there only
    (SDDMM): the exact values of latents a lower-precision GEMM selected. Flat [nnz]."""
    with torch.autocast(x_c.device.type, enabled=False):
        mask = _csr(crow, col, torch.ones(col.shape, dtype=torch.float32, device=col.device),
                    W_enc.shape[1])  # fmt: skip
        vals = torch.sparse.sampled_addmm(mask, x_c.float(), W_enc.float(), beta=0.0)
        return vals.values() + b_enc.float()[col]


def topk_sorted(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k values and indices per row, indices sorted ascending (CSR needs that)."""
    vals, idx = scores.topk(k, dim=-1, sorted=False)
    idx, order = idx.sort(dim=-1)
    return vals.gather(-1, order), idx
