"""Tests of the geometric claims, each against a null (pure numpy / torch).

- `hierarchical_orthogonality`: Park et al. 2024 (arXiv:2406.01506, Thm. 8 / Fig. 4):
  cos(ℓ̄_parent, ℓ̄_child − ℓ̄_parent) ≈ 0. Statistic: the mean |cos| over the
  hierarchy's (parent, child) pairs; smaller is more orthogonal. Two nulls:
  *random nested sets* (per pair a random parent token set of the parent's size and a
  random child subset of the child's size, estimated the same way), which asks whether
  the real hierarchy is more orthogonal than nesting alone makes it (for mean vectors of
  isotropic tokens E[(ḡ_C − ḡ_P) · ḡ_P] = 0 exactly, so this null is the hard one);
  and the paper's *random parent* (each child against a random other concept).
- `simplex`: the categorical claim (ibid., Thm. 6 / Fig. 3): the class vectors of
  mammal / bird / fish span a 2-simplex, and their tokens separate. Statistics: the
  triangle's roundness 4√3·area / (a² + b² + c²) (1 equilateral, 0 degenerate) and the
  leave-one-out accuracy of assigning each token to its class by the projection
  g · ℓ̄_c / ‖ℓ̄_c‖², both against random disjoint token sets of the same sizes.
- `circle_fit`: Engels et al. 2024, "Not All Language Model Features Are Linear"
  (arXiv:2405.14860): weekday / month items lie on a circle in the top-2 principal
  components of their mean representations, in cyclic order. Statistics: the cyclic-order
  resultant R = max over direction |mean_k exp(i(θ_k ∓ 2πk/n))| (1: the angles follow
  the cycle at even spacing; random angles give ≈ 1/√n), against shuffled item labels;
  and the circle residual sd(r)/mean(r) of the radii about the fitted centre, against
  random token sets of the same size.
- `mantel`: correlation of two models' concept cosine matrices against permuting the
  concepts of one of them (Mantel 1967).

Every empirical p is (1 + #null at least as extreme) / (1 + n), with its floor
1 / (1 + n) (Phipson & Smyth 2010; `stages.alignment.pvalues`).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from stages.alignment.pvalues import empirical_p, normal_tail, p_floor
from stages.geometry.vectors import lda_vectors


def cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine along the last axis (0 where a vector is 0)."""
    na, nb = np.linalg.norm(a, axis=-1), np.linalg.norm(b, axis=-1)
    return (a * b).sum(-1) / np.maximum(na * nb, 1e-300)


def null_summary(observed: float, null: np.ndarray, smaller_is_extreme: bool) -> dict:
    """statistic, null mean / sd, z, the empirical one-sided p and its floor."""
    null = np.asarray(null, np.float64)
    sign = -1.0 if smaller_is_extreme else 1.0
    z, _ = normal_tail(sign * observed, sign * null)
    return {
        "statistic": float(observed),
        "null_mean": float(null.mean()),
        "null_sd": float(null.std(ddof=1)) if null.size > 1 else float("nan"),
        "z": float(sign * z) if math.isfinite(z) else float("nan"),
        "p": empirical_p(sign * observed, sign * null),
        "p_floor": p_floor(null.size),
        "n_null": int(null.size),
        "alternative": "less" if smaller_is_extreme else "greater",
    }


def cosine_matrix(vectors: np.ndarray) -> np.ndarray:
    v = np.asarray(vectors, np.float64)
    u = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-300)
    return u @ u.T


# ---------------------------------------------------------------- hierarchical orthogonality


def _random_nested(g: np.ndarray, pool: np.ndarray, n_parent: int, n_child: int, n: int,
                   rng: np.random.Generator) -> np.ndarray:  # fmt: skip
    """cos(ℓ̄_P, ℓ̄_C − ℓ̄_P) for n random parent sets P ⊂ pool and child sets C ⊂ P."""
    picks = np.stack([rng.choice(pool, n_parent, replace=False) for _ in range(n)])
    gp = torch.from_numpy(g[picks])
    lp = lda_vectors(gp).numpy()
    lc = lda_vectors(gp[:, :n_child]).numpy()  # the first n_child of a random draw: random
    return cos(lp, lc - lp)


def hierarchical_orthogonality(
    g: np.ndarray,
    sets: dict[str, np.ndarray],
    vectors: dict[str, np.ndarray],
    pairs: list[tuple[str, str]],
    pool: np.ndarray,
    n_null: int,
    seed: int,
) -> dict:
    """The orthogonality test in one space (module docstring). `g` [V, d] whitened token
    vectors; `sets` / `vectors` per concept; `pairs` (parent, child) with both estimated;
    `pool` the token ids the random sets are drawn from."""
    rng = np.random.default_rng(seed)
    per_pair = {f"{p}>{c}": float(cos(vectors[p], vectors[c] - vectors[p])) for p, c in pairs}
    obs = float(np.mean(np.abs(list(per_pair.values()))))
    nested = np.zeros((n_null, len(pairs)))
    for j, (p, c) in enumerate(pairs):
        npar, nch = len(sets[p]), len(sets[c])
        if npar > len(pool) or nch >= npar:
            nested[:, j] = np.nan
            continue
        nested[:, j] = _random_nested(g, pool, npar, nch, n_null, rng)
    names = list(vectors)
    rand_parent = np.zeros((n_null, len(pairs)))
    for j, (p, c) in enumerate(pairs):
        others = [n for n in names if n not in (p, c)]
        draws = rng.integers(0, len(others), n_null)
        lr = np.stack([vectors[others[k]] for k in draws])
        rand_parent[:, j] = cos(lr, vectors[c][None] - lr)
    return {
        "pairs": per_pair,
        "mean_abs_cos": obs,
        "mean_cos": float(np.mean(list(per_pair.values()))),
        "null_nested_sets": null_summary(obs, np.nanmean(np.abs(nested), axis=1), True),
        "null_random_parent": null_summary(obs, np.abs(rand_parent).mean(axis=1), True),
        "null_random_parent_mean_cos": float(rand_parent.mean()),
    }


# ---------------------------------------------------------------- simplex


def roundness(tips: np.ndarray) -> float:
    """4√3·area / (a² + b² + c²) of the triangle with vertices tips [3, d]: 1 for an
    equilateral triangle, 0 for a degenerate one."""
    a, b, c = tips
    u, v = b - a, c - a
    area = 0.5 * math.sqrt(max(float(u @ u) * float(v @ v) - float(u @ v) ** 2, 0.0))
    s = float(u @ u + v @ v + (c - b) @ (c - b))
    return 4 * math.sqrt(3) * area / s if s > 0 else 0.0


def _loo_accuracy(g: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Leave-one-out accuracy of assigning each token to the group whose vector (estimated
    without it) it projects onto best: argmax_c g·ℓ̄_c / ‖ℓ̄_c‖² (≈ 1 for a member).

    `groups`: a list over classes of token-id arrays [R, n_c] (R draws at once) → [R]
    accuracies. Classes of fewer than 3 tokens are not scored (leaving one out would leave
    one token, no covariance)."""
    r = groups[0].shape[0]
    full = [lda_vectors(torch.from_numpy(g[ids])).numpy() for ids in groups]  # [R, d] each
    hits, total = np.zeros(r), 0
    for k, ids in enumerate(groups):
        n = ids.shape[1]
        if n < 3:
            continue
        # every draw's set without its i-th token: [R, n, n-1] ids -> [R*n, n-1, d]
        keep = np.array([np.delete(np.arange(n), i) for i in range(n)])
        loo = lda_vectors(torch.from_numpy(g[ids[:, keep].reshape(r * n, n - 1)]))
        loo = loo.numpy().reshape(r, n, -1)
        tok = g[ids]  # [R, n, d]
        scores = []
        for c in range(len(groups)):
            v = loo if c == k else full[c][:, None, :]
            scores.append((tok * v).sum(-1) / np.maximum((v * v).sum(-1), 1e-300))
        hits += (np.argmax(np.stack(scores), axis=0) == k).sum(1)
        total += n
    return hits / total if total else np.full(r, np.nan)


def plane_basis(tips: np.ndarray) -> np.ndarray:
    """Orthonormal basis [2, d] of the plane through the three tips (their affine hull)."""
    q, _ = np.linalg.qr(np.stack([tips[1] - tips[0], tips[2] - tips[0]]).T)
    return q.T


def simplex(g: np.ndarray, sets: list[np.ndarray], vectors: list[np.ndarray], pool: np.ndarray,
            n_null: int, seed: int) -> dict:  # fmt: skip
    """Roundness and leave-one-out separation of three classes, against random disjoint
    token sets of the same sizes drawn from `pool` (module docstring)."""
    rng = np.random.default_rng(seed)
    obs_round = roundness(np.stack(vectors))
    obs_acc = float(_loo_accuracy(g, [np.asarray(s)[None] for s in sets])[0])
    sizes = [len(s) for s in sets]
    null_round, null_acc = np.zeros(0), np.zeros(0)
    if sum(sizes) <= len(pool):
        perm = np.stack([rng.permutation(pool)[: sum(sizes)] for _ in range(n_null)])
        groups = np.split(perm, np.cumsum(sizes)[:-1], axis=1)
        vecs = np.stack([lda_vectors(torch.from_numpy(g[ids])).numpy() for ids in groups], 1)
        null_round = np.array([roundness(v) for v in vecs])
        null_acc = _loo_accuracy(g, groups)
    return {
        "roundness": null_summary(obs_round, null_round, False),
        "loo_accuracy": null_summary(obs_acc, null_acc, False),
        "chance_accuracy": 1.0 / len(sets),
        "sizes": sizes,
    }


# ---------------------------------------------------------------- circles


def pca2(x: np.ndarray) -> tuple[np.ndarray, float]:
    """The rows of x [n, d] in their top-2 principal components [n, 2], and the fraction
    of their variance those two hold."""
    c = x - x.mean(axis=0)
    u, s, _ = np.linalg.svd(c, full_matrices=False)
    var = s**2
    return u[:, :2] * s[:2], float(var[:2].sum() / max(var.sum(), 1e-300))


def cyclic_resultant(theta: np.ndarray) -> float:
    """max over direction s = ±1 of |mean_k exp(i(θ_k − s·2πk/n))|: 1 when the angles
    follow the items' cyclic order at even spacing (any rotation, either direction)."""
    n = len(theta)
    ref = 2 * np.pi * np.arange(n) / n
    return float(max(abs(np.exp(1j * (theta - s * ref)).mean()) for s in (1, -1)))


def circle_residual(p: np.ndarray) -> float:
    """sd / mean of the distances of 2-D points p [n, 2] to their least-squares circle
    centre (Kasa fit: x² + y² = 2ax + 2by + c); 0 on a circle."""
    a = np.column_stack([2 * p[:, 0], 2 * p[:, 1], np.ones(len(p))])
    sol, *_ = np.linalg.lstsq(a, (p**2).sum(1), rcond=None)
    r = np.linalg.norm(p - sol[:2], axis=1)
    return float(r.std() / max(r.mean(), 1e-300))


def circle_fit(items: np.ndarray, token_pool_vectors: np.ndarray, n_null: int, seed: int) -> dict:
    """Items' mean vectors [n, d] in cyclic order: PCA to 2-D, then the cyclic-order
    resultant R (null: shuffled item labels) and the circle residual (null: the mean
    vectors of n random tokens from `token_pool_vectors`), module docstring."""
    rng = np.random.default_rng(seed)
    p, frac = pca2(items)
    theta = np.arctan2(p[:, 1], p[:, 0])
    obs_r, obs_res = cyclic_resultant(theta), circle_residual(p)
    null_r = np.array([cyclic_resultant(theta[rng.permutation(len(theta))]) for _ in range(n_null)])
    n = len(items)
    null_res = []
    if len(token_pool_vectors) > n:
        for _ in range(n_null):
            q, _ = pca2(token_pool_vectors[rng.choice(len(token_pool_vectors), n, replace=False)])
            null_res.append(circle_residual(q))
    return {
        "n_items": n,
        "pc2_variance_fraction": frac,
        "cyclic_order_R": null_summary(obs_r, null_r, False),
        "circle_residual": null_summary(obs_res, np.asarray(null_res), True),
        "angles": theta.tolist(),
        "pc2": p.tolist(),
    }


# ---------------------------------------------------------------- cross-model


def mantel(a: np.ndarray, b: np.ndarray, n_null: int, seed: int) -> dict:
    """Pearson r of the upper triangles of two symmetric matrices over the same concepts,
    against the same after permuting the concepts of `b` (rows and columns together)."""
    n = a.shape[0]
    iu = np.triu_indices(n, 1)

    def r(x: np.ndarray, y: np.ndarray) -> float:
        return float(np.corrcoef(x[iu], y[iu])[0, 1])

    rng = np.random.default_rng(seed)
    obs = r(a, b)
    null = []
    for _ in range(n_null):
        pi = rng.permutation(n)
        null.append(r(a, b[np.ix_(pi, pi)]))
    return null_summary(obs, np.asarray(null), False)
