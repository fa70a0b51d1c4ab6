"""Representation similarity between two sets of activations over the same tokens.

(Over 500 lines: five measures, their permutation test and the registry that names them
(`SIMILARITY`); a new measure is one function and one registry line here.)

Five measures, with the definitions of ARCHITECTURE.md ("Metric definitions"):

- **linear CKA** (Kornblith et al. 2019) = ‖C_xyᵀ‖_F² / (‖C_xx‖_F ‖C_yy‖_F) with centred
  covariances. Exact over any number of tokens with `LinearCKAAccumulator`, which streams
  n, the means and the centred products in float64 (see `moments.py`).
- **unbiased CKA**: CKA built on the unbiased HSIC_1 estimator of Song et al. (2012), as
  proposed for CKA by Nguyen et al. (2021); the plain estimator is biased upwards when
  the width is large against n, so two unrelated representations score well above 0.
- **mutual kNN** (Huh et al. 2024, k = 10): mean over samples of |N_A(i) ∩ N_B(i)| / k,
  neighbours by cosine similarity, the sample itself excluded.
- **SVCCA** (Raghu et al. 2017): keep the top singular directions of each side that
  explain 99 % of its variance — as many as that takes; a public helper keeps a single
  one by mistake — then CCA; we report the mean canonical correlation.
- **RSA** (Kriegeskorte et al. 2008): Spearman correlation of the two representational
  dissimilarity matrices (1 − Pearson r between samples), upper triangle.

All but linear CKA need every pair of samples, so they run on a seeded subsample of
tokens (`subsample_rows`). Each measure has a permutation-test p-value
(`permutation_test`): the pairing of samples between A and B is shuffled, which keeps
both representations intact and destroys only their correspondence. Each p comes with
its floor 1/(1 + n_permutations), and with the z-score of the statistic against the
permutation null and that z's normal tail p ("normal approximation of the permutation
null", `pvalues.normal_tail`), which resolves where every permutation falls below the
statistic and the exact p sits at its floor. Holm correction across one model pair's
tests is the align stage's (`stream.AlignmentResult.scores`).

`layer_similarity` builds the layer-by-layer matrices across two models from dicts
hook → chunk iterable, reading every chunk once.

Length (~800 lines): every measure is a pair of functions (a batch form and a
`_prepare_<name>` for the permutation test) sharing the centring and Gram helpers above
them; splitting by measure would scatter those helpers across files.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.stats import rankdata

from stages.alignment.inputs import (
    Array,
    as_numpy_2d,
    as_tensor_2d,
    check_finite,
    check_paired,
    check_width,
    lockstep,
)
from stages.alignment.moments import CentredMoments
from stages.alignment.pvalues import empirical_p, normal_tail, p_floor, sequential_p

# ------------------------------------------------------------------ linear CKA, streaming


class LinearCKAAccumulator:
    """Exact linear CKA over a stream of paired chunks, mergeable across workers.

    Memory is O(d_x² + d_y² + d_x·d_y) float64, independent of the number of tokens.
    Feed row-aligned chunks (`update`), combine partial accumulators (`merge`), read the
    score (`cka`). The result equals the batch computation on the concatenated rows to
    float64 rounding, whatever the chunking.
    """

    def __init__(self, d_x: int, d_y: int) -> None:
        self.d_x, self.d_y = int(d_x), int(d_y)
        self._moments = CentredMoments(
            {"x": self.d_x, "y": self.d_y},
            products=[("x", "x"), ("y", "y"), ("x", "y")],
            labels={"x": "x_chunk", "y": "y_chunk"},
        )

    @property
    def n_samples(self) -> int:
        return self._moments.n

    def update(self, x_chunk: Array, y_chunk: Array) -> None:
        """Absorb a chunk of paired rows: x_chunk [n, d_x], y_chunk [n, d_y]."""
        x = as_tensor_2d(x_chunk, "x_chunk")
        y = as_tensor_2d(y_chunk, "y_chunk")
        check_width(x, self.d_x, "x_chunk")
        check_width(y, self.d_y, "y_chunk")
        check_paired(x, y, "x_chunk", "y_chunk")
        self._moments.update({"x": x, "y": y})

    def merge(self, other: LinearCKAAccumulator) -> LinearCKAAccumulator:
        """Absorb `other` (same d_x, d_y) in place and return self."""
        if (other.d_x, other.d_y) != (self.d_x, self.d_y):
            raise ValueError(
                f"cannot merge a CKA accumulator of widths (d_x, d_y) = {(other.d_x, other.d_y)} "
                f"into one of widths {(self.d_x, self.d_y)}"
            )
        self._moments.merge(other._moments)
        return self

    def cross_covariance(self) -> np.ndarray:
        """C_xy = Σ (x − x̄)ᵀ(y − ȳ) / (n − 1), [d_x, d_y]; feeds the Procrustes fit."""
        self._require(2)
        return (self._moments.comoment[("x", "y")] / (self.n_samples - 1)).numpy()

    def cka(self) -> float:
        """‖C_xyᵀ‖_F² / (‖C_xx‖_F ‖C_yy‖_F); the 1/(n−1) factors cancel."""
        self._require(2)
        m = self._moments.comoment
        return cka_from_products(m[("x", "y")], m[("x", "x")], m[("y", "y")])

    def _require(self, n: int) -> None:
        if self.n_samples < n:
            raise ValueError(f"linear CKA needs at least {n} samples, got {self.n_samples}")


def cka_from_products(c_xy: torch.Tensor, c_xx: torch.Tensor, c_yy: torch.Tensor) -> float:
    norm_xx = float(torch.linalg.matrix_norm(c_xx))
    norm_yy = float(torch.linalg.matrix_norm(c_yy))
    if norm_xx == 0.0 or norm_yy == 0.0:
        which = "x" if norm_xx == 0.0 else "y"
        raise ValueError(f"linear CKA is undefined: representation {which} has zero variance")
    return float(torch.linalg.matrix_norm(c_xy) ** 2) / (norm_xx * norm_yy)


def linear_cka(x: Array, y: Array) -> float:
    """Linear CKA of x [n, d_x] and y [n, d_y] in one batch (raises on zero variance)."""
    return _prepare_linear_cka(x, y)(None)


# ------------------------------------------------------- measures on a subsample of tokens


_SHARED: ContextVar[dict | None] = ContextVar("similarity_shared", default=None)


@contextlib.contextmanager
def shared_per_representation() -> Iterator[None]:
    """Within the block, work that depends on one representation only (its centred
    copy, Gram matrix, norms, kNN lists) is done once per array object and reused by
    every pair that array is in. A layer grid scores each of A's h hooks against each
    of B's, so this does that work 2h times instead of 2h² times (12 GPT-2 hooks,
    2048 samples: ~105 s -> ~9 s here), for memory of one n × n Gram matrix per
    hook (32 MB at 2048 samples). The arrays must not change inside the block."""
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def _per_array(kind: str, x: object, compute: Callable[[], object]):
    """`compute()`, or inside `shared_per_representation` its value from the first
    call for this `kind` and this very array (the entry keeps `x` alive, so its id
    cannot be reused for another array meanwhile)."""
    shared = _SHARED.get()
    if shared is None:
        return compute()
    hit = shared.get((kind, id(x)))
    if hit is None or hit[0] is not x:
        hit = shared[(kind, id(x))] = (x, compute())
    return hit[1]


def _centred(x: Array, name: str) -> np.ndarray:
    def compute() -> np.ndarray:
        xa = as_numpy_2d(x, name)
        check_finite(xa, name)
        return xa - xa.mean(0)

    return _per_array("centred", x, compute)


def _centred_pair(x: Array, y: Array) -> tuple[np.ndarray, np.ndarray]:
    check_paired(x, y, "x", "y")
    if x.shape[0] < 2:
        raise ValueError(f"x has shape {tuple(x.shape)}: expected at least 2 samples")
    return _centred(x, "x"), _centred(y, "y")


def _gram(xc: np.ndarray) -> np.ndarray:
    return _per_array("gram", xc, lambda: xc @ xc.T)


def _self_norm(xc: np.ndarray) -> float:
    """‖XᵀX‖_F of a centred representation (linear CKA's normaliser)."""
    return _per_array("self_norm", xc, lambda: float(np.linalg.norm(xc.T @ xc)))


# A statistic prepared once for a pair of representations: called with a permutation p of
# the rows of y (None for the observed pairing), returns the score of x vs y[p]. Each
# measure precomputes what does not depend on the pairing, so a permutation test costs a
# fraction of recomputing the measure from scratch.
PairedStatistic = Callable[[np.ndarray | None], float]


def pair_name(a: str, b: str) -> str:
    """The name of a compared pair (of hooks, or of SAE names): `a`, or `a~b` when the
    two sides differ."""
    return a if a == b else f"{a}~{b}"


def _permuted(m: np.ndarray, p: np.ndarray) -> np.ndarray:
    """M[p][:, p], the Gram-type matrix of the samples reordered by p (two `take`s are
    about three times faster than np.ix_ fancy indexing)."""
    return m.take(p, axis=0).take(p, axis=1)


def _permuted_vdot(k: np.ndarray, l_: np.ndarray) -> Callable[[np.ndarray], float]:
    """p -> Σ K ∘ L[p][:, p], the n² gather of a permutation draw, on float32 copies:
    the gather moves half the bytes and runs about 4× faster than in float64 (measured
    at n 2048, benchmarks/alignment_pvalues.py). Only null draws use it; the observed
    statistic stays float64. The error is that of a float32 dot over n² terms (relative
    ~1e-5 of Σ|K ∘ L|), far below the spread of any permutation null."""
    k32, l32 = k.astype(np.float32), l_.astype(np.float32)
    return lambda p: float(np.vdot(k32, _permuted(l32, p)))


def _sparse_cross_norm(x: Array, y: Array, n: int, d_x: int, d_y: int):
    """p -> ‖X_cᵀ Y_p‖_F² (the centred cross-product of x vs y[p]) from sparse copies of
    the uncentred x and y, or None where a dense form costs less.

    Centring one side is enough: X_cᵀ Y_c,p = X_cᵀ Y_p = XᵀY_p − n μ_x μ_yᵀ, so with
    a = Xμ_x and b = Yμ_y, ‖X_cᵀ Y_p‖² = ‖XᵀY_p‖² − 2n Σ_i a_i b_p(i) + n² ‖μ_x‖² ‖μ_y‖²,
    in float64 (equal to the dense forms up to rounding). XᵀY_p of two
    sparse codes (SAE latents: ~16 of 1,024 fire per token) costs Σ_i nnz(x_i) nnz(y_p(i))
    products against the n² gather of the Gram form or n·d_x·d_y of the feature form.
    The relative costs are this machine's (benchmarks/alignment_pvalues.py): per unit,
    a product of the sparse form ~2.5× a Gram gather's element per row, a dense
    multiply-add 1/128 of it."""
    xa, ya = as_numpy_2d(x, "x"), as_numpy_2d(y, "y")
    r_x = np.count_nonzero(xa) / n  # mean nonzeros per row
    r_y = np.count_nonzero(ya) / n
    if 2.5 * r_x * r_y >= min(n, d_x * d_y / 128):
        return None
    from scipy import sparse

    xt, ys = sparse.csr_matrix(xa.T), sparse.csr_matrix(ya)
    mu_x, mu_y = xa.mean(0), ya.mean(0)
    a, b = xa @ mu_x, ya @ mu_y
    constant = n * n * float(mu_x @ mu_x) * float(mu_y @ mu_y)

    def cross(p: np.ndarray) -> float:
        m = xt @ ys[p]
        return float(m.data @ m.data) - 2.0 * n * float(a @ b[p]) + constant

    return cross


def _prepare_linear_cka(x: Array, y: Array) -> PairedStatistic:
    xc, yc = _centred_pair(x, y)
    n, d_x, d_y = xc.shape[0], xc.shape[1], yc.shape[1]
    denominator = _self_norm(xc) * _self_norm(yc)
    if denominator == 0.0:
        raise ValueError("linear CKA is undefined: a representation has zero variance")
    sparse_null = _sparse_cross_norm(x, y, n, d_x, d_y)
    if sparse_null is not None:
        # Sparse codes: the observed value as the dense forms compute it, the null draws
        # from the sparse products (the same numbers up to float64 rounding).
        observed = (float(np.linalg.norm(xc.T @ yc) ** 2) if d_x * d_y <= 128 * n
                    else float(np.vdot(_gram(xc), _gram(yc))))  # fmt: skip

        def sparse_statistic(p: np.ndarray | None) -> float:
            return (observed if p is None else sparse_null(p)) / denominator

        return sparse_statistic
    if d_x * d_y <= 128 * n:
        # Feature space: ‖XᵀY_p‖² costs n·d_x·d_y per permutation.

        def statistic(p: np.ndarray | None) -> float:
            yp = yc if p is None else yc[p]
            return float(np.linalg.norm(xc.T @ yp) ** 2 / denominator)

        return statistic
    # Wide representations (e.g. SAE latents): ‖XᵀY_p‖² = Σ K ∘ L_pp with the Gram
    # matrices K = XXᵀ, L = YYᵀ, which costs n² per permutation whatever the width.
    k, l_ = _gram(xc), _gram(yc)
    null_vdot = _permuted_vdot(k, l_)

    def gram_statistic(p: np.ndarray | None) -> float:
        return float((np.vdot(k, l_) if p is None else null_vdot(p)) / denominator)

    return gram_statistic


def _hsic1_terms(k: np.ndarray) -> tuple[np.ndarray, float]:
    """Row sums and total of a diagonal-zeroed Gram matrix (pairing-invariant parts)."""
    rows = k.sum(1)
    return rows, float(rows.sum())


def _hsic1(
    k: np.ndarray,
    l_p: np.ndarray,
    rows_k: np.ndarray,
    sum_k: float,
    rows_l: np.ndarray,
    sum_l: float,
) -> float:
    """HSIC_1 (Song et al. 2012, eq. 5) for diagonal-zeroed Gram matrices K̃, L̃:

    [tr(K̃L̃) + (1ᵀK̃1)(1ᵀL̃1)/((n−1)(n−2)) − 2/(n−2) · 1ᵀK̃L̃1] / (n(n−3)).
    """
    trace = float(np.vdot(k, l_p))  # tr(K̃L̃) for symmetric matrices
    return _hsic1_from_trace(k.shape[0], trace, rows_k, sum_k, rows_l, sum_l)


def _hsic1_from_trace(
    n: int, trace: float, rows_k: np.ndarray, sum_k: float, rows_l: np.ndarray, sum_l: float
) -> float:
    return (
        trace + sum_k * sum_l / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * float(rows_k @ rows_l)
    ) / (n * (n - 3))


def _gram_zero_diag(xc: np.ndarray) -> np.ndarray:
    k = xc @ xc.T
    np.fill_diagonal(k, 0.0)
    return k


def _prepare_unbiased_cka(x: Array, y: Array) -> PairedStatistic:
    xc, yc = _centred_pair(x, y)
    n = xc.shape[0]
    if n < 4:
        raise ValueError(f"unbiased CKA needs at least 4 samples (HSIC_1 divides by n-3), got {n}")
    k, l_ = _gram_zero_diag(xc), _gram_zero_diag(yc)
    rows_k, sum_k = _hsic1_terms(k)
    rows_l, sum_l = _hsic1_terms(l_)
    hsic_kk = _hsic1(k, k, rows_k, sum_k, rows_k, sum_k)
    hsic_ll = _hsic1(l_, l_, rows_l, sum_l, rows_l, sum_l)
    sq_x, sq_y = (xc**2).sum(1), (yc**2).sum(1)
    # tr(K̃L̃_p) with K̃ = XXᵀ − diag‖x_i‖² (same for L̃) equals ‖XᵀY_p‖² − Σ ‖x_i‖²‖y_p(i)‖²:
    # n·d_x·d_y per permutation instead of an n² gather, for narrow representations.
    feature_form = xc.shape[1] * yc.shape[1] <= 128 * n
    if hsic_kk <= 0.0 or hsic_ll <= 0.0:
        raise ValueError(
            f"unbiased CKA is undefined: HSIC_1(K,K) = {hsic_kk:.3g}, HSIC_1(L,L) = "
            f"{hsic_ll:.3g}; expected both > 0 (too few samples or a constant representation)"
        )
    denominator = float(np.sqrt(hsic_kk * hsic_ll))
    null_vdot = None if feature_form else _permuted_vdot(k, l_)  # tr(K̃ L̃_pp)

    def statistic(p: np.ndarray | None) -> float:
        if p is None:
            return float(_hsic1(k, l_, rows_k, sum_k, rows_l, sum_l) / denominator)
        if feature_form:
            trace = float(np.linalg.norm(xc.T @ yc[p]) ** 2 - sq_x @ sq_y[p])
            return float(_hsic1_from_trace(n, trace, rows_k, sum_k, rows_l[p], sum_l) / denominator)
        # Permuting the samples of y permutes rows and columns of L̃ together.
        trace = null_vdot(p)  # type: ignore[misc]
        return float(_hsic1_from_trace(n, trace, rows_k, sum_k, rows_l[p], sum_l) / denominator)

    return statistic


def _knn_indices(xc: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
    """Indices [n, k] of each row's k nearest rows by cosine similarity, itself excluded.

    Ties are broken by torch.topk; computed in row blocks so memory is O(block · n).
    """
    x = torch.from_numpy(xc)
    x = x / x.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    n = x.shape[0]
    out = torch.empty(n, k, dtype=torch.int64)
    for start in range(0, n, block):
        stop = min(start + block, n)
        sim = x[start:stop] @ x.T
        rows = torch.arange(stop - start)
        sim[rows, rows + start] = -torch.inf
        out[start:stop] = torch.topk(sim, k, dim=1).indices
    return out.numpy()


def _prepare_mutual_knn(x: Array, y: Array, k: int = 10) -> PairedStatistic:
    # Cosine neighbours are taken on the raw (uncentred) vectors, as in Huh et al.
    xa, ya = as_numpy_2d(x, "x"), as_numpy_2d(y, "y")
    check_paired(xa, ya, "x", "y")
    check_finite(xa, "x")
    check_finite(ya, "y")
    n = xa.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"mutual kNN: k = {k}, expected 1 <= k < n_samples = {n}")
    nn_x = _per_array(f"knn{k}", x, lambda: _knn_indices(xa, k))
    nn_y = _per_array(f"knn{k}", y, lambda: _knn_indices(ya, k))

    def statistic(p: np.ndarray | None) -> float:
        if p is None:
            nn_yp = nn_y
        else:
            # Sample i of y[p] is sample p[i] of y; its neighbours, renamed into the
            # permuted indexing, are inv[N_y(p[i])].
            inv = np.empty_like(p)
            inv[p] = np.arange(n)
            nn_yp = inv[nn_y[p]]
        shared = (nn_x[:, :, None] == nn_yp[:, None, :]).sum(axis=(1, 2))
        return float(shared.mean() / k)

    return statistic


@dataclass(frozen=True)
class SVCCAResult:
    """SVCCA score and what it was computed from (to check that >1 direction was kept)."""

    mean_correlation: float
    canonical_correlations: np.ndarray
    n_components_x: int
    n_components_y: int


def _svcca_basis(xc: np.ndarray, variance_kept: float, name: str) -> np.ndarray:
    """Orthonormal basis [n, k] of the top-k singular directions of centred xc, with k the
    smallest number whose singular values² reach `variance_kept` of the total.

    CCA is invariant to invertible maps of each side, so the left singular vectors U_k
    stand in for the reduced data U_k S_k.
    """
    u, s, _ = np.linalg.svd(xc, full_matrices=False)
    var = s**2
    total = var.sum()
    if total == 0.0:
        raise ValueError(f"SVCCA is undefined: {name} has zero variance")
    cumulative = np.cumsum(var) / total
    k = int(np.searchsorted(cumulative, variance_kept, side="left")) + 1
    return u[:, : min(k, len(s))]


def _prepare_svcca(x: Array, y: Array, variance_kept: float = 0.99) -> PairedStatistic:
    return _svcca_prepared(x, y, variance_kept)[0]


def _svcca_prepared(
    x: Array, y: Array, variance_kept: float
) -> tuple[PairedStatistic, np.ndarray, np.ndarray]:
    if not 0.0 < variance_kept <= 1.0:
        raise ValueError(f"SVCCA: variance_kept = {variance_kept}, expected 0 < value <= 1")
    xc, yc = _centred_pair(x, y)
    ux = _svcca_basis(xc, variance_kept, "x")
    uy = _svcca_basis(yc, variance_kept, "y")
    n, kx, ky = xc.shape[0], ux.shape[1], uy.shape[1]
    # Centring uses one degree of freedom; two subspaces of R^(n−1) with kx + ky > n − 1
    # must intersect, so some canonical correlations would be 1 by construction.
    if kx + ky > n - 1:
        raise ValueError(
            f"SVCCA: kept {kx} + {ky} directions for n_samples = {n}; expected "
            f"n_samples > {kx + ky}, otherwise canonical correlations are trivially 1"
        )

    def statistic(p: np.ndarray | None) -> float:
        return float(_canonical_correlations(ux, uy if p is None else uy[p]).mean())

    return statistic, ux, uy


def _canonical_correlations(ux: np.ndarray, uy: np.ndarray) -> np.ndarray:
    """CCA of two orthonormal bases: the singular values of U_xᵀU_y (cosines of the
    principal angles between the subspaces)."""
    return np.clip(np.linalg.svd(ux.T @ uy, compute_uv=False), 0.0, 1.0)


def svcca(x: Array, y: Array, variance_kept: float = 0.99) -> SVCCAResult:
    """SVCCA of x [n, d_x] and y [n, d_y]; needs n > (directions kept on both sides)."""
    _, ux, uy = _svcca_prepared(x, y, variance_kept)
    rho = _canonical_correlations(ux, uy)
    return SVCCAResult(float(rho.mean()), rho, ux.shape[1], uy.shape[1])


def _rdm(xa: np.ndarray) -> np.ndarray:
    """Representational dissimilarity matrix: 1 − Pearson r between samples (rows).

    A sample with no variance across features has no defined correlation; we give it
    correlation 0 (dissimilarity 1) to every other sample rather than NaN.
    """
    z = xa - xa.mean(1, keepdims=True)
    norm = np.linalg.norm(z, axis=1, keepdims=True)
    z = np.divide(z, norm, out=np.zeros_like(z), where=norm > 0)
    return 1.0 - z @ z.T


def _rank_matrix(rdm: np.ndarray) -> tuple[np.ndarray, float]:
    """Centred average ranks of the upper-triangle entries, as a symmetric matrix with zero
    diagonal, and the norm of the upper-triangle rank vector (Spearman = Pearson of ranks)."""
    n = rdm.shape[0]
    iu = np.triu_indices(n, 1)
    ranks = rankdata(rdm[iu])
    ranks -= ranks.mean()
    out = np.zeros_like(rdm)
    out[iu] = ranks
    return out + out.T, float(np.linalg.norm(ranks))


def _prepare_rsa(x: Array, y: Array) -> PairedStatistic:
    xa, ya = as_numpy_2d(x, "x"), as_numpy_2d(y, "y")
    check_paired(xa, ya, "x", "y")
    check_finite(xa, "x")
    check_finite(ya, "y")
    if xa.shape[0] < 3:
        raise ValueError(f"RSA needs at least 3 samples, got {xa.shape[0]}")
    rx, norm_x = _rank_matrix(_rdm(xa))
    ry, norm_y = _rank_matrix(_rdm(ya))
    if norm_x == 0.0 or norm_y == 0.0:
        raise ValueError("RSA is undefined: all dissimilarities of one representation are equal")
    # Permuting samples permutes rows and columns of the RDM together, which permutes the
    # multiset of its upper-triangle entries: the ranks move with the entries, so the
    # rank matrix is permuted rather than recomputed. The full symmetric sum counts each
    # upper-triangle pair twice.
    denominator = 2.0 * norm_x * norm_y
    null_vdot = _permuted_vdot(rx, ry)

    def statistic(p: np.ndarray | None) -> float:
        return float((np.vdot(rx, ry) if p is None else null_vdot(p)) / denominator)

    return statistic


@dataclass(frozen=True)
class SimilarityMetric:
    """One representation-similarity measure, as the registry below lists it.

    `prepare(x, y, **options)` does the work once and returns `statistic(p)`: the score
    with y's rows permuted by `p` (None: as paired), which the permutation test calls.
    `kind`: "grid" measures fill the every-hook-of-A × every-hook-of-B matrices; "pair"
    measures run on the compared hook pairs only. `options` names the keyword arguments
    it takes from the alignment config (`k`, `variance_kept`)."""

    name: str
    prepare: Callable[..., PairedStatistic]
    kind: Literal["grid", "pair"]
    title: str
    options: tuple[str, ...] = ()


# A new measure: its `_prepare_<name>` function above, and one line here.
SIMILARITY: dict[str, SimilarityMetric] = {m.name: m for m in (
    SimilarityMetric("linear_cka", _prepare_linear_cka, "grid", "Linear CKA"),
    SimilarityMetric("unbiased_cka", _prepare_unbiased_cka, "pair", "Unbiased CKA"),
    SimilarityMetric("mutual_knn", _prepare_mutual_knn, "grid", "Mutual kNN", ("k",)),
    SimilarityMetric("svcca", _prepare_svcca, "pair", "SVCCA", ("variance_kept",)),
    SimilarityMetric("rsa", _prepare_rsa, "pair", "RSA"),
)}  # fmt: skip
METRICS: tuple[str, ...] = tuple(SIMILARITY)
GRID_METRICS = tuple(n for n, m in SIMILARITY.items() if m.kind == "grid")
PAIR_METRICS = tuple(n for n, m in SIMILARITY.items() if m.kind == "pair")


def _metric_kwargs(metric: str, k: int, variance_kept: float) -> dict[str, float | int]:
    if metric not in SIMILARITY:
        raise ValueError(f"unknown similarity metric {metric!r}; expected one of {METRICS}")
    given = {"k": k, "variance_kept": variance_kept}
    return {o: given[o] for o in SIMILARITY[metric].options}


def unbiased_cka(x: Array, y: Array) -> float:
    """CKA with HSIC_1 (unbiased): ≈ 0 for unrelated representations at any width."""
    return _prepare_unbiased_cka(x, y)(None)


def mutual_knn(x: Array, y: Array, k: int = 10) -> float:
    """Mean over samples of |N_x(i) ∩ N_y(i)| / k, cosine neighbours, self excluded."""
    return _prepare_mutual_knn(x, y, k)(None)


def rsa(x: Array, y: Array) -> float:
    """Spearman correlation of the two RDMs (1 − Pearson r between samples), upper triangle."""
    return _prepare_rsa(x, y)(None)


# -------------------------------------------------------------------- permutation tests


@dataclass(frozen=True)
class PermutationTest:
    """A similarity score with its permutation-test p-value, its floor and a normal tail.

    p = (1 + #{null ≥ statistic}) / (1 + n_permutations) (Phipson & Smyth 2010): never 0,
    so a p-value from 100 permutations cannot claim more than its floor 1/101
    (`p_floor`). Where the null is exhausted (no permutation reaches the statistic), `z`
    and `p_normal` say how far beyond it the statistic lies: z against the permutation
    null's mean and sd, p_normal = 1 − Φ(z), the *normal approximation of the
    permutation null* (`stages.alignment.pvalues.normal_tail`, which says when it is
    anti-conservative). Both are computed on the same subsample as the null; NaN
    without permutations.
    """

    metric: str
    statistic: float
    p_value: float
    null: np.ndarray
    n_samples: int
    z: float = float("nan")
    p_normal: float = float("nan")
    # sequential tests (Besag & Clifford 1991, `pvalues.sequential_p`): stop after this
    # many null draws reach the statistic, or at `max_permutations`; None: a fixed count
    stop_after: int | None = None
    max_permutations: int | None = None

    @property
    def n_permutations(self) -> int:
        """The null draws made (for a sequential test, ≤ its cap)."""
        return int(self.null.shape[0])

    @property
    def p_floor(self) -> float:
        """The smallest p this test could report: 1 / (1 + n_permutations), or
        1 / (1 + max_permutations) for a sequential test."""
        cap = self.max_permutations
        return p_floor(self.n_permutations if cap is None else cap)


def permutation_test(
    x: Array,
    y: Array,
    metric: str,
    *,
    n_permutations: int = 200,
    seed: int = 0,
    k: int = 10,
    variance_kept: float = 0.99,
    stop_after: int | None = None,
) -> PermutationTest:
    """Score x vs y with `metric` (one of METRICS) and test it against shuffled pairings.

    The null permutes which row of y is paired with which row of x (seeded), keeping
    each representation intact, so it asks: is the correspondence token-by-token
    better than chance?

    `stop_after` = h makes the test sequential (Besag & Clifford 1991,
    `pvalues.sequential_p`): permutations are drawn until h of them reach the statistic,
    or until `n_permutations`, which is then the cap. The draws are the same seeded
    sequence either way, so a sequential test's first draws are the fixed test's.
    """
    if n_permutations < 0:
        raise ValueError(f"n_permutations = {n_permutations}, expected an integer >= 0")
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"stop_after = {stop_after}, expected an integer >= 1 or None")
    statistic = SIMILARITY[metric].prepare(x, y, **_metric_kwargs(metric, k, variance_kept))
    n = int(x.shape[0])
    return _run_permutations(metric, statistic, n, n_permutations, seed, stop_after)


def _run_permutations(
    metric: str,
    statistic: PairedStatistic,
    n: int,
    n_permutations: int,
    seed: int,
    stop_after: int | None = None,
) -> PermutationTest:
    observed = float(statistic(None))  # a plain float in every metric's scores
    rng = np.random.default_rng(seed)
    if stop_after is None:
        null = np.array([statistic(rng.permutation(n)) for _ in range(n_permutations)])
        # A tolerance so that a permutation scoring the same up to rounding counts as ≥.
        p = empirical_p(observed, null, rtol=1e-12)
    else:
        reach = observed - 1e-12 * max(1.0, abs(observed))  # empirical_p's tolerance
        draws: list[float] = []
        exceed = 0
        while len(draws) < n_permutations and exceed < stop_after:
            draws.append(statistic(rng.permutation(n)))
            exceed += draws[-1] >= reach
        null = np.array(draws)
        p = sequential_p(exceed, len(draws), stop_after)
    z, p_norm = normal_tail(observed, null)
    return PermutationTest(metric, observed, p, null, n, z, p_norm, stop_after,
                           None if stop_after is None else n_permutations)  # fmt: skip


def similarity_scores(
    x: Array,
    y: Array,
    metrics: Sequence[str] = METRICS,
    *,
    n_permutations: int = 200,
    seed: int = 0,
    k: int = 10,
    variance_kept: float = 0.99,
) -> dict[str, PermutationTest]:
    """Every requested measure of x vs y with its p-value (the same seed for each)."""
    with shared_per_representation():
        return {
            m: permutation_test(
                x, y, m, n_permutations=n_permutations, seed=seed, k=k, variance_kept=variance_kept
            )
            for m in metrics
        }


# --------------------------------------------------------------------- seeded subsample


class RowSample:
    """A seeded uniform sample of n_samples rows from a stream of unknown length.

    Each row gets a uniform key, the sample is the rows with the n_samples smallest keys
    (a vectorised reservoir sample). A chunk's keys come from a generator seeded by
    (seed, chunk number), so they depend only on the seed and the chunking: every stream
    sampled with the same seed and chunking keeps the same tokens — which is what keeps
    A and B paired — and samplers over consecutive ranges of chunks `merge` into exactly
    the sample of one sampler over all of them.
    """

    def __init__(self, keys: Sequence[str], n_samples: int, seed: int) -> None:
        if n_samples < 1:
            raise ValueError(f"n_samples = {n_samples}, expected an integer >= 1")
        self.n_samples, self.seed = n_samples, seed
        self._keys = np.empty(0)
        self._index = np.empty(0, dtype=np.int64)
        self._rows: dict[str, np.ndarray] = {k: np.empty((0, 0)) for k in keys}
        self._seen = 0
        self._chunks = 0

    def update(self, chunks: Mapping[str, torch.Tensor], chunk_id: int | None = None,
               row0: int | None = None) -> None:  # fmt: skip
        """Absorb the next chunk: `chunk_id` and `row0` (its number and first row in the
        whole stream) default to counting from this sampler's first chunk."""
        n_c = next(iter(chunks.values())).shape[0]
        cid = self._chunks if chunk_id is None else chunk_id
        first = self._seen if row0 is None else row0
        keys = np.random.default_rng([self.seed, cid]).random(n_c)

        def take(sel: np.ndarray) -> dict[str, np.ndarray]:  # only the kept rows, as float64
            t = torch.from_numpy(sel)
            return {name: c[t.to(c.device)].to(torch.float64).cpu().numpy()
                    for name, c in chunks.items()}  # fmt: skip

        self._absorb(keys, first + np.arange(n_c), take)
        self._seen = first + n_c
        self._chunks = cid + 1

    def merge(self, other: RowSample) -> None:
        """Absorb a sampler over other chunks of the same stream (same seed)."""
        self._absorb(other._keys, other._index,
                     lambda sel: {n: r[sel] for n, r in other._rows.items() if r.size})  # fmt: skip

    def _absorb(self, keys: np.ndarray, index: np.ndarray, take) -> None:
        all_keys = np.concatenate([self._keys, keys])
        if all_keys.size > self.n_samples:
            threshold = np.partition(all_keys, self.n_samples - 1)[self.n_samples - 1]
        else:
            threshold = np.inf
        keep_old = self._keys <= threshold
        keep_new = np.flatnonzero(keys <= threshold)
        self._keys = np.concatenate([self._keys[keep_old], keys[keep_new]])
        self._index = np.concatenate([self._index[keep_old], index[keep_new]])
        if not keep_new.size:
            for name, old in self._rows.items():
                self._rows[name] = old[keep_old] if old.size else old
            return
        for name, kept in take(keep_new).items():
            old = self._rows[name]
            self._rows[name] = kept if old.size == 0 else np.concatenate([old[keep_old], kept])

    def positions(self) -> np.ndarray:
        """The sampled rows' positions in the whole stream, in stream order (the order of
        `result`)."""
        return np.sort(self._index, kind="stable")

    def result(self) -> dict[str, np.ndarray]:
        """Sampled rows per stream, in stream order."""
        order = np.argsort(self._index, kind="stable")
        return {name: rows[order] for name, rows in self._rows.items()}


def subsample_rows(
    streams: Mapping[str, Iterable[Array]], n_samples: int, *, seed: int = 0
) -> dict[str, np.ndarray]:
    """The same seeded n_samples rows from each of several row-aligned chunk streams
    (float64, stream order), reading each chunk once."""
    sampler = RowSample(list(streams), n_samples, seed)
    for chunks in lockstep(streams):
        sampler.update(chunks)
    return sampler.result()


# ------------------------------------------------------------------ layer-by-layer grid


@dataclass(frozen=True)
class LayerSimilarity:
    """One measure between every hook of model A (rows) and every hook of model B."""

    metric: str
    hooks_a: list[str]
    hooks_b: list[str]
    values: np.ndarray
    p_values: np.ndarray | None
    n_samples: int
    # per cell, as PermutationTest: z against the permutation null, its normal tail p
    z: np.ndarray | None = None
    p_normal: np.ndarray | None = None
    n_permutations: int = 0

    @property
    def p_floor(self) -> float | None:
        """1 / (1 + n_permutations) when there are p-values."""
        return None if self.p_values is None else p_floor(self.n_permutations)

    def to_records(self) -> list[dict[str, object]]:
        """Long format (hook_a, hook_b, metric, value, p_value, its floor, z, p_normal),
        e.g. for a parquet table."""

        def cell(a: np.ndarray | None, i: int, j: int) -> float | None:
            return None if a is None else float(a[i, j])

        return [
            {
                "hook_a": ha,
                "hook_b": hb,
                "metric": self.metric,
                "value": float(self.values[i, j]),
                "p_value": cell(self.p_values, i, j),
                "p_floor": self.p_floor,
                "z": cell(self.z, i, j),
                "p_normal": cell(self.p_normal, i, j),
                "n_samples": self.n_samples,
            }
            for i, ha in enumerate(self.hooks_a)
            for j, hb in enumerate(self.hooks_b)
        ]


def layer_similarity(
    chunks_a: Mapping[str, Iterable[Array]],
    chunks_b: Mapping[str, Iterable[Array]],
    *,
    metrics: Sequence[str] = METRICS,
    n_samples: int = 2048,
    n_permutations: int = 0,
    seed: int = 0,
    k: int = 10,
    variance_kept: float = 0.99,
) -> dict[str, LayerSimilarity]:
    """Layer-by-layer similarity matrices between two models over shared tokens.

    `chunks_a` / `chunks_b` map hook names to iterables of row-aligned chunks
    [n_chunk, d_hook] (all hooks of both models must yield the same tokens in the same
    order and chunking — align tokens first). Every stream is read once, in lockstep.

    Linear CKA is exact over all tokens (one streaming accumulator per hook and per hook
    pair: memory O(Σ d_a² + Σ d_b² + Σ d_a d_b) float64). The other measures — and every
    permutation p-value, including linear CKA's — use the same seeded subsample of
    `n_samples` tokens. `n_permutations = 0` skips the p-values (they cost n_permutations
    evaluations per cell).
    """
    for m in metrics:
        _metric_kwargs(m, k, variance_kept)  # reject unknown names before reading data
    if not chunks_a or not chunks_b:
        raise ValueError(
            "layer_similarity: expected at least one hook per model, got "
            f"{list(chunks_a)} and {list(chunks_b)}"
        )
    keys_a = {h: f"a:{h}" for h in chunks_a}
    keys_b = {h: f"b:{h}" for h in chunks_b}
    streams = {keys_a[h]: s for h, s in chunks_a.items()} | {
        keys_b[h]: s for h, s in chunks_b.items()
    }
    need_sample = n_permutations > 0 or any(m != "linear_cka" for m in metrics)
    sampler = RowSample(list(streams), n_samples, seed) if need_sample else None
    moments: CentredMoments | None = None
    for chunks in lockstep(streams):
        for name, chunk in chunks.items():
            check_finite(chunk, f"chunk of {name}")
        if "linear_cka" in metrics:
            if moments is None:
                dims = {name: c.shape[1] for name, c in chunks.items()}
                products = (
                    [(a, a) for a in keys_a.values()]
                    + [(b, b) for b in keys_b.values()]
                    + [(a, b) for a in keys_a.values() for b in keys_b.values()]
                )
                moments = CentredMoments(dims, products, block_rows=2048)
            for name, c in chunks.items():
                check_width(c, moments.dims[name], f"chunk of {name}")
            moments.update(chunks)
        if sampler is not None:
            sampler.update(chunks)

    sample = sampler.result() if sampler is not None else {}
    with shared_per_representation():
        return _grid(metrics, chunks_a, chunks_b, keys_a, keys_b, moments, sample,
                     n_permutations, seed, k, variance_kept)  # fmt: skip


def _grid(metrics, chunks_a, chunks_b, keys_a, keys_b, moments, sample, n_permutations, seed,
          k, variance_kept) -> dict[str, LayerSimilarity]:  # fmt: skip
    out: dict[str, LayerSimilarity] = {}
    hooks_a, hooks_b = list(chunks_a), list(chunks_b)
    for metric in metrics:
        values = np.zeros((len(hooks_a), len(hooks_b)))
        p_values = np.ones_like(values) if n_permutations > 0 else None
        z, p_norm = np.full_like(values, np.nan), np.full_like(values, np.nan)
        for i, ha in enumerate(hooks_a):
            for j, hb in enumerate(hooks_b):
                if metric == "linear_cka":
                    if moments is None or moments.n < 2:
                        raise ValueError("layer_similarity: the streams yielded fewer than 2 rows")
                    c = moments.comoment
                    values[i, j] = cka_from_products(
                        c[(keys_a[ha], keys_b[hb])],
                        c[(keys_a[ha], keys_a[ha])],
                        c[(keys_b[hb], keys_b[hb])],
                    )
                if metric != "linear_cka" or n_permutations > 0:
                    xs, ys = sample[keys_a[ha]], sample[keys_b[hb]]
                    statistic = SIMILARITY[metric].prepare(
                        xs, ys, **_metric_kwargs(metric, k, variance_kept)
                    )
                    test = _run_permutations(metric, statistic, xs.shape[0], n_permutations, seed)
                    if metric != "linear_cka":
                        values[i, j] = test.statistic
                    if p_values is not None:
                        p_values[i, j] = test.p_value
                        z[i, j], p_norm[i, j] = test.z, test.p_normal
        n_used = (
            moments.n
            if metric == "linear_cka" and moments is not None
            else (next(iter(sample.values())).shape[0])
        )
        out[metric] = LayerSimilarity(
            metric, hooks_a, hooks_b, values, p_values, int(n_used),
            z if p_values is not None else None, p_norm if p_values is not None else None,
            n_permutations,
        )  # fmt: skip
    return out


def metric_title(metric: str, config: dict | None = None) -> str:
    """How figures and the report name a measure ("Mutual kNN (k = 10)" given the
    alignment config); an unknown name is shown as it is."""
    m = SIMILARITY.get(metric)
    if m is None:
        return metric
    if "k" in m.options and config and config.get("knn_k"):
        return f"{m.title} (k = {config['knn_k']})"
    return m.title
