"""Concept vectors under the causal inner product (Park et al. 2024).

Park, Choe, Jiang & Veitch (2024), "The Geometry of Categorical and Hierarchical Concepts
in Large Language Models" (arXiv:2406.01506; code: github.com/KihoPark/
LLM_Categorical_Hierarchical_Representations, `hierarchical/`). Their two steps:

1. The *causal inner product*: whiten the unembedding vectors γ(y) (the columns of W_U)
   by their covariance over the vocabulary,

       g(y) = Cov(γ)^(-1/2) (γ(y) − E[γ]),

   so that the Euclidean inner product of g-space is the causal one (`whitener`).

2. The *LDA-style estimator* of the vector of a concept w with token set Y(w): with
   ḡ_w the mean of g(y) over Y(w) and Σ_w their (Ledoit–Wolf shrunk) covariance,

       w̃ = Σ_w⁺ ḡ_w / ‖Σ_w⁺ ḡ_w‖,   ℓ̄_w = (ḡ_wᵀ w̃) w̃          (`lda_vectors`)

   i.e. the direction along which the category's tokens vary least relative to their
   mean, scaled so that the mean projects onto it exactly (ḡ_w · ℓ̄_w = ‖ℓ̄_w‖²).

Residual-stream hooks have no unembedding, so the analogous estimate per hook uses the
activation store (`token_means`): each vocabulary item's vector is the mean residual of
its occurrences (rows of that token id in the stored training rows), and the whitening
covariance is that of these per-token means over the tokens seen often enough. Per-token
means rather than single rows, so that (a) the unit of a sample is one vocabulary item,
as in the unembedding, and the same random-token-set nulls apply to both; (b) frequent
tokens do not dominate a concept's estimate (`the` would outweigh `eagle` by 100:1);
(c) the estimate is cheap (one pass of sums). The price: context variation within a
token is averaged away, so these are vectors of lexical concepts only.

A concept's token set is read from the store's labels (`concept_token_sets`): the token
ids whose occurrences carry the concept's label at least `min_precision` of the time.
"""

from __future__ import annotations

import numpy as np
import torch


def whitener(vectors: np.ndarray, rel_tol: float = 1e-6) -> tuple[np.ndarray, np.ndarray]:
    """(mean [d], W [d, d]) with W = Cov^(-1/2) of the rows of `vectors` [n, d] (covariance
    with 1/n, as Park et al.); eigenvalues below rel_tol·max are dropped (a pseudo-inverse
    square root), so that a rank-deficient set (fewer tokens than dimensions) still works.
    g = (x − mean) @ W has identity covariance on the kept subspace."""
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"whitener: vectors of shape {x.shape}, expected [n >= 2, d]")
    mean = x.mean(axis=0)
    c = x - mean
    cov = c.T @ c / x.shape[0]
    evals, evecs = np.linalg.eigh(cov)
    keep = evals > rel_tol * max(float(evals.max()), 1e-300)
    inv_sqrt = np.zeros_like(evals)
    inv_sqrt[keep] = 1.0 / np.sqrt(evals[keep])
    return mean, (evecs * inv_sqrt) @ evecs.T


def ledoit_wolf(x: torch.Tensor) -> torch.Tensor:
    """Ledoit–Wolf (2004) shrunk covariance of each batch of samples, x [B, n, d] →
    [B, d, d]: (1 − s) S + s μ I with S the (1/n) sample covariance, μ = tr(S)/d and the
    shrinkage s of their closed form (the formula scikit-learn's `ledoit_wolf` uses,
    which Park et al. call)."""
    b, n, d = x.shape
    xc = x - x.mean(dim=1, keepdim=True)
    s = xc.transpose(1, 2) @ xc / n
    mu = torch.diagonal(s, dim1=1, dim2=2).sum(-1) / d
    x2 = xc * xc
    beta_ = (x2.transpose(1, 2) @ x2).sum((1, 2))
    delta_ = (s * s).sum((1, 2))  # = ‖XᵀX‖²/n²
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2 * mu * torch.diagonal(s, dim1=1, dim2=2).sum(-1) + d * mu * mu) / d
    beta = torch.minimum(beta, delta)
    shrink = torch.where(delta > 0, beta / delta.clamp_min(1e-300), torch.zeros_like(delta))
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    return (1 - shrink)[:, None, None] * s + (shrink * mu)[:, None, None] * eye


def _shrinkage(xc: torch.Tensor, gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Ledoit–Wolf shrinkage s and target scale μ of centred batches xc [B, n, d], from
    n × n quantities only (gram = xc xcᵀ): the same numbers as `ledoit_wolf`."""
    b, n, d = xc.shape
    tr = torch.diagonal(gram, dim1=1, dim2=2).sum(-1) / n  # tr(S)
    mu = tr / d
    beta_ = (torch.diagonal(gram, dim1=1, dim2=2) ** 2).sum(-1)  # Σ_k ‖x_k‖⁴
    delta_ = (gram * gram).sum((1, 2)) / (n * n)  # ‖S‖²_F
    beta = (beta_ / n - delta_) / (d * n)
    delta = (delta_ - 2 * mu * tr + d * mu * mu) / d
    beta = torch.minimum(beta, delta)
    shrink = torch.where(delta > 0, beta / delta.clamp_min(1e-300), torch.zeros_like(delta))
    return shrink, mu


def lda_vectors(g: torch.Tensor, rel_tol: float = 1e-10) -> torch.Tensor:
    """Park et al.'s LDA-style concept vector of each batch of token vectors g [B, n, d]
    (already whitened) → ℓ̄ [B, d] (module docstring), with Σ the Ledoit–Wolf covariance
    and Σ⁺ its pseudo-inverse, as their `estimate_single_dir_from_embeddings`.

    Computed in the n-dimensional span of the centred tokens (n ≪ d here): with
    Σ = a I + b XᵀX (a = sμ, b = (1 − s)/n) and XXᵀ = U Λ Uᵀ, V = XᵀU Λ^(-1/2),
    Σ⁺ḡ = V diag(1 / (a + bλ)) Vᵀḡ + (ḡ − VVᵀḡ) / a (the second term only when a > 0).
    Equal to pinv(`ledoit_wolf`(g)) @ ḡ (tests/geometry), ~100× faster than a d × d pinv.
    n ≥ 2; a set of identical vectors gets its mean, the estimator's limit."""
    if g.ndim != 3 or g.shape[1] < 2:
        raise ValueError(f"lda_vectors: token vectors of shape {tuple(g.shape)}, expected "
                         "[batch, n >= 2, d]")  # fmt: skip
    gd = g.to(torch.float64)
    n = gd.shape[1]
    mean = gd.mean(dim=1)
    xc = gd - mean[:, None, :]
    gram = xc @ xc.transpose(1, 2)
    shrink, mu = _shrinkage(xc, gram)
    a, b = shrink * mu, (1 - shrink) / n
    lam, u = torch.linalg.eigh(gram)
    keep = lam > rel_tol * lam.amax(dim=1, keepdim=True).clamp_min(1e-300)
    inv_sqrt = torch.where(keep, lam.clamp_min(1e-300).rsqrt(), torch.zeros_like(lam))
    v = (xc.transpose(1, 2) @ u) * inv_sqrt[:, None, :]  # [B, d, n], orthonormal columns
    vg = (v.transpose(1, 2) @ mean[:, :, None])[:, :, 0]  # [B, n]
    denom = a[:, None] + b[:, None] * lam
    coef = torch.where(keep & (denom > 0), vg / denom.clamp_min(1e-300), torch.zeros_like(vg))
    w = (v @ coef[:, :, None])[:, :, 0]
    rest = mean - (v @ vg[:, :, None])[:, :, 0]
    w = w + torch.where(
        (a > 0)[:, None], rest / a.clamp_min(1e-300)[:, None], torch.zeros_like(rest)
    )
    norm = w.norm(dim=1, keepdim=True)
    unit_mean = mean / mean.norm(dim=1, keepdim=True).clamp_min(1e-300)
    w_hat = torch.where(norm > 0, w / norm.clamp_min(1e-300), unit_mean)
    return (mean * w_hat).sum(1, keepdim=True) * w_hat


def lda_vector(g: np.ndarray) -> np.ndarray:
    """One concept's vector from its token vectors g [n, d] (numpy in, numpy out)."""
    return lda_vectors(torch.from_numpy(np.asarray(g, np.float64))[None])[0].numpy()


def token_means(
    x: np.ndarray, token_ids: np.ndarray, vocab_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(sums [V, d] float64, counts [V]) of the rows x [n, d] per token id: the per-token
    mean residual is sums / counts where counts > 0. Sums, so chunks add up."""
    ids = torch.from_numpy(np.asarray(token_ids, np.int64))
    sums = torch.zeros(vocab_size, x.shape[1], dtype=torch.float64)
    sums.index_add_(0, ids, torch.from_numpy(np.asarray(x, np.float32)).to(torch.float64))
    counts = np.bincount(np.asarray(token_ids, np.int64), minlength=vocab_size)
    return sums.numpy(), counts


def concept_token_sets(
    token_ids: np.ndarray,
    labels: np.ndarray,
    concept_names: list[str],
    min_count: int,
    min_precision: float,
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per concept, the token ids (sorted) whose occurrences carry its label at least
    `min_precision` of the time, among tokens occurring at least `min_count` times; and
    the ids of every token occurring that often (the pool the nulls draw from)."""
    ids = np.asarray(token_ids, np.int64)
    v = int(ids.max()) + 1 if ids.size else 0
    counts = np.bincount(ids, minlength=v)
    frequent = np.flatnonzero(counts >= min_count)
    out: dict[str, np.ndarray] = {}
    for j, name in enumerate(concept_names):
        pos = np.bincount(ids, weights=labels[:, j].astype(np.float64), minlength=v)
        with np.errstate(invalid="ignore", divide="ignore"):
            prec = pos / counts
        out[name] = frequent[prec[frequent] >= min_precision]
    return out, frequent
