"""Clusters of SAE decoder directions and their purity against the planted concepts.

Each latent gets a concept *by its activations* (not by decoder geometry, so that the
test of the geometry does not use geometry to label): on labelled held-out rows, the
share of the latent's total activation that falls on rows of each concept of a flat
partition (`concept_mass`); its concept is the argmax when that share is ≥ 0.5, else it
stays unlabelled. The decoder rows, normalised, are then clustered two ways, with scipy
(no new dependency): k-means (`scipy.cluster.vq.kmeans2`, best of 4 k-means++ starts,
seeded) and
agglomerative clustering on cosine distance (average linkage, cut at k clusters).

Purity = Σ_clusters max_c #(labelled latents of concept c in the cluster) / #labelled
latents. Nulls: the same labels on random Gaussian directions, clustered the same way; and the
observed clusters with the labels permuted among the labelled latents (keeps the observed
cluster sizes, on which chance purity depends).
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.cluster.vq import kmeans2

from stages.geometry.claims import null_summary


def latent_concepts(mass: np.ndarray, min_share: float = 0.5) -> np.ndarray:
    """Per latent, its concept index from its activation mass per concept [d_sae, k] plus
    the mass off every concept (the last column): argmax of the concept shares when that
    share is ≥ min_share, else −1 (unlabelled; also latents that never fire)."""
    total = mass.sum(1)
    share = mass[:, :-1] / np.maximum(total, 1e-300)[:, None]
    best = share.argmax(1)
    ok = (total > 0) & (share[np.arange(len(best)), best] >= min_share)
    return np.where(ok, best, -1)


def purity(clusters: np.ndarray, labels: np.ndarray) -> float:
    """Σ_clusters max_c #(label c in the cluster) / #labelled, over labels ≥ 0."""
    keep = labels >= 0
    if not keep.any():
        return float("nan")
    c, lab = clusters[keep], labels[keep]
    table: dict[tuple[int, int], int] = {}
    for a, b in zip(c.tolist(), lab.tolist(), strict=True):
        table[(a, b)] = table.get((a, b), 0) + 1
    best: dict[int, int] = {}
    for (a, _), n in table.items():
        best[a] = max(best.get(a, 0), n)
    return sum(best.values()) / int(keep.sum())


def _normalise(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w, np.float64)
    return w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)


def kmeans_clusters(w: np.ndarray, k: int, seed: int, n_init: int = 4) -> np.ndarray:
    """k-means of the normalised rows: the best (least inertia) of `n_init` k-means++
    starts, as scikit-learn does (one start lands in a merged-cluster minimum often)."""
    x = _normalise(w)
    rng = np.random.default_rng(seed)
    best, best_inertia = None, np.inf
    for _ in range(n_init):
        with warnings.catch_warnings():  # an empty cluster: that start just scores worse
            warnings.simplefilter("ignore", UserWarning)
            centres, lab = kmeans2(x, k, minit="++", seed=rng)
        inertia = float(((x - centres[lab]) ** 2).sum())
        if inertia < best_inertia:
            best, best_inertia = lab, inertia
    return best


def agglomerative_clusters(w: np.ndarray, k: int) -> np.ndarray:
    z = linkage(_normalise(w), method="average", metric="cosine")
    return fcluster(z, t=k, criterion="maxclust")


def _purity_permuted(clusters: np.ndarray, labels: np.ndarray, n: int, rng) -> np.ndarray:
    """Purity of `clusters` against n random permutations of the labelled latents' labels
    (vectorised contingency tables)."""
    keep = labels >= 0
    c = np.unique(clusters[keep], return_inverse=True)[1]
    lab = np.unique(labels[keep], return_inverse=True)[1]
    nc, nl = c.max() + 1, lab.max() + 1
    out = np.empty(n)
    for i in range(n):
        table = np.zeros((nc, nl), np.int64)
        np.add.at(table, (c, rng.permutation(lab)), 1)
        out[i] = table.max(1).sum() / len(lab)
    return out


def cluster_purity(
    w_dec: np.ndarray, labels: np.ndarray, k: int, n_null: int, seed: int, n_perm: int = 1000
) -> dict:
    """Purity of k-means and agglomerative clusters of the decoder rows w_dec [d_sae, d]
    against the latents' concepts `labels` (−1 unlabelled), each against two nulls: random
    Gaussian directions clustered the same way (`n_null` draws), and the same clusters with
    the labels permuted among the labelled latents (`n_perm`; it keeps the observed cluster
    sizes, which random directions do not, and resolves to 1/(n_perm + 1))."""
    rng = np.random.default_rng(seed)
    k = max(2, min(k, len(w_dec) - 1))
    km, ag = kmeans_clusters(w_dec, k, seed), agglomerative_clusters(w_dec, k)
    null_km, null_ag = [], []
    for i in range(n_null):
        r = rng.standard_normal(w_dec.shape)
        # one k-means start: the labels are independent of random directions, so how well
        # k-means converges does not move the null's purity, only its cost (4x)
        null_km.append(purity(kmeans_clusters(r, k, seed + 1 + i, n_init=1), labels))
        null_ag.append(purity(agglomerative_clusters(r, k), labels))
    out = {
        "k": k,
        "n_latents": len(w_dec),
        "n_labelled": int((labels >= 0).sum()),
        "n_concepts_present": int(len(np.unique(labels[labels >= 0]))),
        "kmeans": null_summary(purity(km, labels), np.asarray(null_km), False),
        "agglomerative": null_summary(purity(ag, labels), np.asarray(null_ag), False),
    }
    if out["n_labelled"] >= 2:
        for name, cl in (("kmeans", km), ("agglomerative", ag)):
            perm = _purity_permuted(cl, labels, n_perm, rng)
            out[f"{name}_vs_permuted_labels"] = null_summary(out[name]["statistic"], perm, False)
    return out
