"""Matching features of SAE A to features of SAE B.

From a score matrix S [m_A, m_B] (activation correlations from `correlation.py`, or
decoder cosines):

- `max_matches`: each A latent → its best B latent (many A latents may share one B
  latent; the "mean max correlation" of Bricken et al. 2023 / Wang et al. 2025).
- `hungarian_matches`: one-to-one, maximising the summed score with the Hungarian
  algorithm (scipy's `linear_sum_assignment`); rectangular S gives min(m_A, m_B) pairs.
- `Matches.fraction_with_partner`: fraction of features whose partner scores ≥ a threshold.
- `compare_to_null`: the same matching on the shuffled-token null, as a threshold.
- `top_token_jaccard`: an interpretable second check — do matched latents fire on the
  same tokens (vocabulary ids, not token occurrences)? `mean_jaccard_all_pairs` is its
  chance level (all latent pairs), `shared_vocabulary` renumbers two tokenizers' ids
  into one vocabulary of decoded strings.
- `fit_orthogonal_procrustes` + `decoder_cosine` / `decoder_matches`: match in decoder
  space, after mapping A's activation space onto B's with the orthogonal map fitted on
  paired activations (Schönemann 1966: R = UVᵀ from the SVD of the cross-covariance).
- `feature_splitting`: for two SAEs of different widths on the same hook, each wide
  latent's parent in the narrow SAE by decoder cosine, or by decoder cosine plus
  co-activation (Bricken et al. 2023, "feature splitting"), children per parent and
  child→parent cosine.

Sanity built in: an SAE matched with itself is the identity with correlation 1 on its
live latents (dead latents have correlation 0 to everything, so they have no partner).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
from scipy.optimize import linear_sum_assignment

from stages.alignment.inputs import Array, as_numpy_2d, check_finite, check_paired


def _scores(scores: Array, name: str = "scores") -> np.ndarray:
    s = as_numpy_2d(scores, name)
    check_finite(s, name)
    if s.shape[0] == 0 or s.shape[1] == 0:
        raise ValueError(f"{name} has shape {s.shape}: expected at least one latent per side")
    return s


@dataclass(frozen=True)
class Matches:
    """Pairs (a_index[i], b_index[i]) with their score; n_a, n_b are the SAE widths."""

    a_index: np.ndarray
    b_index: np.ndarray
    score: np.ndarray
    n_a: int
    n_b: int
    method: str

    def fraction_with_partner(self, threshold: float) -> float:
        """Fraction of A's latents whose partner scores ≥ threshold (unmatched count as no)."""
        return float(np.sum(self.score >= threshold) / self.n_a)

    def to_arrow(self) -> pa.Table:
        """The match table (a_latent, b_latent, score) for a parquet output."""
        return pa.table(
            {
                "a_latent": pa.array(self.a_index, pa.int64()),
                "b_latent": pa.array(self.b_index, pa.int64()),
                "score": pa.array(self.score, pa.float64()),
            }
        ).replace_schema_metadata(
            {"method": self.method, "n_a": str(self.n_a), "n_b": str(self.n_b)}
        )


def max_matches(scores: Array) -> Matches:
    """Each A latent (row) → the B latent (column) with the highest score (ties: lowest
    index). Not one-to-one."""
    s = _scores(scores)
    b = np.argmax(s, axis=1)
    a = np.arange(s.shape[0])
    return Matches(a, b, s[a, b], s.shape[0], s.shape[1], "max")


def hungarian_matches(scores: Array) -> Matches:
    """One-to-one matching maximising the total score (Hungarian algorithm, via
    scipy.optimize.linear_sum_assignment, which accepts rectangular matrices and returns
    min(m_A, m_B) pairs sorted by A index)."""
    s = _scores(scores)
    a, b = linear_sum_assignment(s, maximize=True)
    return Matches(
        a.astype(np.int64), b.astype(np.int64), s[a, b], s.shape[0], s.shape[1], "hungarian"
    )


@dataclass(frozen=True)
class NullComparison:
    """Matched scores against those the same matching reaches on the shuffled null."""

    threshold: float
    quantile: float
    fraction_above_null: float
    null_median: float
    observed_median: float


def compare_to_null(observed: Matches, null: Matches, quantile: float = 0.99) -> NullComparison:
    """Fraction of A's latents whose matched score beats the `quantile` of the null's
    matched scores (the chance level for features of these sparsities)."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile = {quantile}, expected 0 < quantile < 1")
    threshold = float(np.quantile(null.score, quantile))
    return NullComparison(
        threshold,
        quantile,
        observed.fraction_with_partner(np.nextafter(threshold, np.inf)),
        float(np.median(null.score)),
        float(np.median(observed.score)),
    )


def _check_sets(name: str, t: np.ndarray, m: int) -> None:
    if t.ndim != 2 or t.shape[0] != m:
        raise ValueError(f"{name} has shape {t.shape}: expected [{m}, k] (one row per latent)")
    srt = np.sort(t, axis=1)
    if np.any((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)):
        raise ValueError(f"{name}: a row repeats a token index; expected sets of tokens")


def top_token_jaccard(top_a: np.ndarray, top_b: np.ndarray, matches: Matches) -> np.ndarray:
    """|T_a ∩ T_b| / |T_a ∪ T_b| of the top-activating token sets of each matched pair.

    top_a [m_A, k], top_b [m_B, k'] hold one set of non-negative integers per latent, -1
    for empty slots; two empty sets give 0. The align stage passes vocabulary ids (each
    latent's top-k distinct token ids by max activation, `correlation.TopTokens`; for
    two tokenizers, ids into a shared vocabulary of decoded strings,
    `shared_vocabulary`); row numbers of a stream (`correlation.TopActivations`) work
    too, but over rows two dense latents firing on the same tokens rarely share rows.
    """
    ta, tb = np.asarray(top_a), np.asarray(top_b)
    _check_sets("top_a", ta, matches.n_a)
    _check_sets("top_b", tb, matches.n_b)
    sa, sb = ta[matches.a_index], tb[matches.b_index]  # [P, k], [P, k']
    valid_a, valid_b = sa >= 0, sb >= 0
    both = (sa[:, :, None] == sb[:, None, :]) & valid_a[:, :, None] & valid_b[:, None, :]
    inter = both.sum(axis=(1, 2))
    union = valid_a.sum(1) + valid_b.sum(1) - inter
    return np.divide(inter, union, out=np.zeros(len(inter)), where=union > 0)


def mean_jaccard_all_pairs(top_a: np.ndarray, top_b: np.ndarray) -> float:
    """Mean of `top_token_jaccard` over ALL m_A × m_B latent pairs (empty sets give 0),
    exactly: the expected mean Jaccard of a uniformly random matching, the chance level
    to read a matched pairs' mean against. Sparse: only pairs sharing a token are
    visited (intersections = Iₐ I_bᵀ of the latent × token incidence matrices)."""
    from scipy.sparse import csr_matrix

    ta, tb = np.asarray(top_a), np.asarray(top_b)
    _check_sets("top_a", ta, ta.shape[0] if ta.ndim == 2 else -1)
    _check_sets("top_b", tb, tb.shape[0] if tb.ndim == 2 else -1)
    n_tok = 1 + max(int(ta.max(initial=-1)), int(tb.max(initial=-1)), 0)

    def incidence(t: np.ndarray) -> csr_matrix:
        r, c = np.nonzero(t >= 0)
        return csr_matrix((np.ones(len(r)), (r, t[r, c])), shape=(t.shape[0], n_tok))

    ia, ib = incidence(ta), incidence(tb)
    inter = (ia @ ib.T).tocoo()
    size_a, size_b = (ta >= 0).sum(1), (tb >= 0).sum(1)
    union = size_a[inter.row] + size_b[inter.col] - inter.data
    return float(np.sum(inter.data / union) / (ta.shape[0] * tb.shape[0]))


def shared_vocabulary(
    top_a: np.ndarray, top_b: np.ndarray, strings_a: Sequence[str], strings_b: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Two tokenizers' top-token id sets renumbered into one vocabulary: the decoded
    strings, surrounding whitespace stripped (" the" of one tokenizer is "the" of the
    other). Ids decoding to a string already in the row become -1 (sets stay sets).
    `strings_x[i]` is the decoded string of token id i of that model."""
    index: dict[str, int] = {}
    out = []
    for name, t, strings in (("top_a", top_a, strings_a), ("top_b", top_b, strings_b)):
        t = np.asarray(t)
        if t.size and int(t.max()) >= len(strings):
            raise ValueError(
                f"{name} holds token id {int(t.max())} but its vocabulary has "
                f"{len(strings)} strings: expected the strings of this model's tokenizer"
            )
        mapped = np.full(t.shape, -1, dtype=np.int64)
        for (i, j), tok in np.ndenumerate(t):
            if tok >= 0:
                mapped[i, j] = index.setdefault(strings[int(tok)].strip(), len(index))
        srt = np.sort(mapped, axis=1)
        srt[:, 1:][srt[:, 1:] == srt[:, :-1]] = -1  # a string twice in a row: once
        out.append(srt)
    return out[0], out[1]


# ------------------------------------------------------------------------ decoder space


def orthogonal_procrustes_map(cross_covariance: Array) -> np.ndarray:
    """R = UVᵀ from the SVD C = UΣVᵀ of C = XᵀY [d_A, d_B]: the map with orthonormal
    rows or columns maximising tr(Rᵀ XᵀY), i.e. minimising ‖XR − Y‖_F (Schönemann 1966).

    For d_A ≠ d_B the thin SVD gives a semi-orthogonal R (an isometry from the smaller
    space into the larger). Use `LinearCKAAccumulator.cross_covariance()` to fit it from
    streamed chunks.
    """
    c = as_numpy_2d(cross_covariance, "cross_covariance")
    check_finite(c, "cross_covariance")
    u, _, vt = np.linalg.svd(c, full_matrices=False)
    return u @ vt


def fit_orthogonal_procrustes(x_a: Array, x_b: Array, *, center: bool = True) -> np.ndarray:
    """The orthogonal map R [d_A, d_B] with x_a R ≈ x_b, from paired activations.

    Centred by default: residual streams carry large mean directions that would
    otherwise dominate the fit and say nothing about the features.
    """
    a, b = as_numpy_2d(x_a, "x_a"), as_numpy_2d(x_b, "x_b")
    check_paired(a, b, "x_a", "x_b")
    if center:
        a, b = a - a.mean(0), b - b.mean(0)
    return orthogonal_procrustes_map(a.T @ b)


def _unit_rows(w: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(w, axis=1, keepdims=True)
    return np.divide(w, norm, out=np.zeros_like(w), where=norm > 0)


def decoder_cosine(w_dec_a: Array, w_dec_b: Array, rotation: Array | None = None) -> np.ndarray:
    """Cosine [m_A, m_B] between A's decoder rows (mapped by `rotation` [d_A, d_B] into B's
    space when given) and B's decoder rows. A zero decoder row has cosine 0 to all."""
    wa, wb = as_numpy_2d(w_dec_a, "w_dec_a"), as_numpy_2d(w_dec_b, "w_dec_b")
    if rotation is not None:
        r = as_numpy_2d(rotation, "rotation")
        if r.shape != (wa.shape[1], wb.shape[1]):
            raise ValueError(
                f"rotation has shape {r.shape}, w_dec_a {wa.shape}, w_dec_b {wb.shape}: "
                f"expected rotation [{wa.shape[1]}, {wb.shape[1]}] (d_A, d_B)"
            )
        wa = wa @ r
    elif wa.shape[1] != wb.shape[1]:
        raise ValueError(
            f"w_dec_a has shape {wa.shape} and w_dec_b {wb.shape}: different widths need a "
            f"rotation (fit_orthogonal_procrustes) to compare decoder directions"
        )
    return _unit_rows(wa) @ _unit_rows(wb).T


def decoder_matches(
    w_dec_a: Array, w_dec_b: Array, rotation: Array | None = None, *, one_to_one: bool = False
) -> Matches:
    """Match A's decoder rows to B's by cosine after the Procrustes map (max or Hungarian)."""
    cos = decoder_cosine(w_dec_a, w_dec_b, rotation)
    return hungarian_matches(cos) if one_to_one else max_matches(cos)


@dataclass(frozen=True)
class FeatureSplitting:
    """Each wide latent's parent in the narrow SAE, and how many children each parent has.

    `children_per_parent` counts only children whose cosine reaches `min_cosine`; the
    others are orphans (no narrow latent resembles them).
    """

    parent: np.ndarray  # [m_wide] index into the narrow SAE
    parent_cosine: np.ndarray  # [m_wide]
    children_per_parent: np.ndarray  # [m_narrow]
    min_cosine: float
    parent_score: np.ndarray | None = None  # [m_wide] the score the parent maximised

    def summary(self) -> dict[str, float]:
        adopted = self.parent_cosine >= self.min_cosine
        has_children = self.children_per_parent > 0
        return {
            "mean_child_parent_cosine": float(self.parent_cosine.mean()),
            "median_child_parent_cosine": float(np.median(self.parent_cosine)),
            "fraction_orphans": float(1.0 - adopted.mean()),
            "mean_children_per_parent": float(self.children_per_parent[has_children].mean())
            if has_children.any()
            else 0.0,
            "fraction_parents_split": float(np.mean(self.children_per_parent >= 2)),
            "fraction_parents_childless": float(np.mean(~has_children)),
        }


def feature_splitting(
    w_dec_narrow: Array,
    w_dec_wide: Array,
    *,
    min_cosine: float = 0.0,
    coactivation: Array | None = None,
) -> FeatureSplitting:
    """Parent of every latent of the wider SAE = the narrow SAE's latent with the highest
    decoder cosine (both SAEs on the same hook, so no map is needed).

    With `coactivation` [m_wide, m_narrow] (the Pearson correlation of the two SAEs'
    activations over the same rows, `stages/sae/families.py`), the parent maximises
    ½ (cosine + correlation) instead: Bricken et al. 2023 relate features across widths by
    both their decoder directions and their co-activation. `parent_cosine` stays the
    decoder cosine to the chosen parent, so `min_cosine` keeps its meaning."""
    wn, ww = as_numpy_2d(w_dec_narrow, "w_dec_narrow"), as_numpy_2d(w_dec_wide, "w_dec_wide")
    if wn.shape[1] != ww.shape[1]:
        raise ValueError(
            f"w_dec_narrow has shape {wn.shape} and w_dec_wide {ww.shape}: "
            f"expected the same d_in (two SAEs on the same hook)"
        )
    if wn.shape[0] > ww.shape[0]:
        raise ValueError(
            f"w_dec_narrow has {wn.shape[0]} latents and w_dec_wide "
            f"{ww.shape[0]}: expected the narrow SAE to be the smaller"
        )
    cos = decoder_cosine(ww, wn)  # [m_wide, m_narrow]
    score = cos
    if coactivation is not None:
        rho = _scores(coactivation, "coactivation")
        if rho.shape != cos.shape:
            raise ValueError(
                f"coactivation has shape {rho.shape}: expected [m_wide, m_narrow] = {cos.shape}"
            )
        score = 0.5 * (cos + rho)
    parent = np.argmax(score, axis=1)
    rows = np.arange(len(parent))
    parent_cos = cos[rows, parent]
    counted = parent_cos >= min_cosine
    children = np.bincount(parent[counted], minlength=wn.shape[0])
    return FeatureSplitting(parent, parent_cos, children, float(min_cosine), score[rows, parent])


def ground_truth_agreement(
    best_latent_a: Mapping[str, int], best_latent_b: Mapping[str, int], matches: Matches
) -> dict[str, bool]:
    """For each planted concept known in both SAEs: is A's best latent matched to B's?

    The fraction of True values is the ground-truth score of the matching.
    """
    partner = dict(zip(matches.a_index.tolist(), matches.b_index.tolist(), strict=True))
    shared = sorted(set(best_latent_a) & set(best_latent_b))
    if not shared:
        raise ValueError(
            f"no concept has a best latent in both SAEs: A knows "
            f"{sorted(best_latent_a)}, B knows {sorted(best_latent_b)}"
        )
    return {c: partner.get(int(best_latent_a[c])) == int(best_latent_b[c]) for c in shared}
