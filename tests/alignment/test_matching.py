"""Matchers: permutations recovered, self-match is the identity, Procrustes, splitting."""

from __future__ import annotations

import itertools

import numpy as np
import pyarrow as pa
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.linalg import orthogonal_procrustes

from stages.alignment import (
    CorrelationAccumulator,
    LinearCKAAccumulator,
    Matches,
    compare_to_null,
    decoder_cosine,
    decoder_matches,
    feature_splitting,
    fit_orthogonal_procrustes,
    ground_truth_agreement,
    hungarian_matches,
    max_matches,
    mean_jaccard_all_pairs,
    orthogonal_procrustes_map,
    shared_vocabulary,
    top_token_jaccard,
)

FAST = settings(max_examples=25, deadline=None)


def _orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _latents(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    return np.maximum(rng.standard_normal((n, m)) * rng.uniform(0.5, 2.0, m) - 0.84, 0.0)


def _correlation(a: np.ndarray, b: np.ndarray, dtype=torch.float32) -> np.ndarray:
    acc = CorrelationAccumulator(a.shape[1], b.shape[1], matmul_dtype=dtype)
    for lo in range(0, len(a), 256):
        acc.update(a[lo : lo + 256].astype(np.float32), b[lo : lo + 256].astype(np.float32))
    return acc.correlation()


@FAST
@given(seed=st.integers(0, 2**31 - 1), m=st.integers(2, 40), noise=st.floats(0.0, 0.5))
def test_hungarian_recovers_a_random_permutation(seed, m, noise):
    rng = np.random.default_rng(seed)
    a = _latents(rng, 2000, m)
    perm = rng.permutation(m)  # B's latent j is A's latent perm[j]
    # Gaussian noise at `noise` x each latent's own spread: r = 1/sqrt(1 + noise^2) >= 0.89.
    b = a[:, perm] + noise * a[:, perm].std(0) * rng.standard_normal((2000, m))
    corr = _correlation(a, b)
    matches = hungarian_matches(corr)
    inverse = np.argsort(perm)
    np.testing.assert_array_equal(matches.a_index, np.arange(m))
    np.testing.assert_array_equal(matches.b_index, inverse)
    assert matches.score.min() > 0.85
    if noise == 0.0:  # float32 products: within ~1e-6 of 1
        np.testing.assert_allclose(matches.score, 1.0, atol=1e-5)


def test_sae_matched_with_itself_is_the_identity_with_correlation_one():
    rng = np.random.default_rng(0)
    a = _latents(rng, 3000, 64)
    a[:, 10] = 0.0  # dead: correlation 0 to everything, so no partner
    corr = _correlation(a, a)
    live = np.flatnonzero(a.std(0) > 0)
    for matches in (hungarian_matches(corr), max_matches(corr)):
        np.testing.assert_array_equal(matches.b_index[live], live)
        np.testing.assert_allclose(matches.score[live], 1.0, atol=1e-6)
        assert matches.score[10] == 0.0
        assert matches.fraction_with_partner(0.99) == pytest.approx(63 / 64)
    exact = _correlation(a, a, torch.float64)
    np.testing.assert_allclose(np.diag(exact)[live], 1.0, atol=1e-12)


@pytest.mark.parametrize("shape", [(3, 5), (5, 3), (4, 4)])
def test_hungarian_is_optimal_on_rectangular_scores(shape):
    rng = np.random.default_rng(sum(shape))
    s = rng.uniform(-1, 1, shape)
    matches = hungarian_matches(s)
    k = min(shape)
    assert len(matches.a_index) == k
    assert len(set(matches.a_index.tolist())) == k and len(set(matches.b_index.tolist())) == k
    if shape[0] <= shape[1]:
        best = max(
            sum(s[i, c] for i, c in enumerate(cols))
            for cols in itertools.permutations(range(shape[1]), shape[0])
        )
    else:
        best = max(
            sum(s[r, j] for j, r in enumerate(rows))
            for rows in itertools.permutations(range(shape[0]), shape[1])
        )
    assert matches.score.sum() == pytest.approx(best, abs=1e-12)


def test_max_matches_and_fraction_with_partner():
    s = np.array([[0.1, 0.9, 0.3], [0.5, 0.2, 0.4], [0.7, 0.95, -0.2], [0.0, 0.0, 0.0]])
    matches = max_matches(s)
    assert matches.b_index.tolist() == [1, 0, 1, 0]
    np.testing.assert_allclose(matches.score, [0.9, 0.5, 0.95, 0.0])
    assert matches.fraction_with_partner(0.8) == 0.5
    one_to_one = hungarian_matches(s)
    assert one_to_one.fraction_with_partner(0.8) == 0.25  # only one of A's 4 keeps a 0.9+
    table = matches.to_arrow()
    assert table.column_names == ["a_latent", "b_latent", "score"]
    assert table.schema.metadata[b"method"] == b"max"
    assert isinstance(table, pa.Table) and table.num_rows == 4
    with pytest.raises(ValueError, match="NaN"):
        max_matches(np.array([[np.nan, 1.0]]))


def test_compare_to_null_counts_matches_above_the_null_quantile():
    observed = Matches(np.arange(4), np.arange(4), np.array([0.9, 0.5, 0.2, 0.05]), 4, 4, "max")
    null = Matches(np.arange(100), np.arange(100), np.linspace(0.0, 0.3, 100), 100, 100, "max")
    result = compare_to_null(observed, null, quantile=0.99)
    assert result.threshold == pytest.approx(np.quantile(np.linspace(0, 0.3, 100), 0.99))
    assert result.fraction_above_null == 0.5
    assert result.null_median == pytest.approx(0.15)


def test_top_token_jaccard():
    top_a = np.array([[1, 2, 3, 4], [5, 6, -1, -1], [-1, -1, -1, -1]])
    top_b = np.array([[3, 4, 9, 10], [6, 5, 7, -1], [-1, -1, -1, -1]])
    matches = Matches(np.array([0, 1, 2, 0]), np.array([0, 1, 2, 1]), np.zeros(4), 3, 3, "max")
    np.testing.assert_allclose(top_token_jaccard(top_a, top_b, matches), [2 / 6, 2 / 3, 0.0, 0.0])
    with pytest.raises(ValueError, match="repeats a token index"):
        top_token_jaccard(np.array([[1, 1], [2, 3], [4, 5]]), top_b, matches)
    with pytest.raises(ValueError, match=r"top_b has shape \(2, 4\): expected \[3, k\]"):
        top_token_jaccard(top_a, top_b[:2], matches)


def test_mean_jaccard_all_pairs_is_the_mean_over_every_pair():
    rng = np.random.default_rng(0)
    top_a = np.full((7, 5), -1)
    top_b = np.full((9, 4), -1)
    for t, n_tok in ((top_a, 12), (top_b, 12)):
        for i in range(1, t.shape[0]):  # row 0 empty (a dead latent)
            size = rng.integers(1, t.shape[1] + 1)
            t[i, :size] = rng.choice(n_tok, size, replace=False)
    every = Matches(np.repeat(np.arange(7), 9), np.tile(np.arange(9), 7), np.zeros(63), 7, 9,
                    "all")  # fmt: skip
    direct = top_token_jaccard(top_a, top_b, every).mean()
    assert mean_jaccard_all_pairs(top_a, top_b) == pytest.approx(direct, abs=1e-15)
    # identical one-id sets on both sides: the identity scores 1, all pairs 1/m
    ident = np.arange(6)[:, None]
    assert mean_jaccard_all_pairs(ident, ident) == pytest.approx(1 / 6)


def test_shared_vocabulary_compares_two_tokenizers_through_their_strings():
    strings_a = ["the", " cat", "sat", "!", " the"]
    strings_b = ["cat", "x", "the", "sat"]
    top_a = np.array([[0, 1, 2], [3, -1, -1], [0, 4, -1]])  # row 2: "the" twice
    top_b = np.array([[2, 0, -1], [1, -1, -1]])
    sa, sb = shared_vocabulary(top_a, top_b, strings_a, strings_b)
    m = Matches(np.array([0, 1, 2]), np.array([0, 1, 0]), np.zeros(3), 3, 2, "max")
    # {the, cat, sat} vs {the, cat}: 2/3; {!} vs {x}: 0; {the} vs {the, cat}: 1/2
    np.testing.assert_allclose(top_token_jaccard(sa, sb, m), [2 / 3, 0.0, 1 / 2])
    assert (sa[2] >= 0).sum() == 1
    with pytest.raises(ValueError, match="token id 4 but its vocabulary has 4 strings"):
        shared_vocabulary(top_b + 2, top_b, strings_b, strings_b)


# --------------------------------------------------------------------- decoder space


@FAST
@given(seed=st.integers(0, 2**31 - 1), d=st.integers(2, 24))
def test_procrustes_recovers_a_known_rotation(seed, d):
    rng = np.random.default_rng(seed)
    rotation = _orthogonal(rng, d)
    x_a = rng.standard_normal((200, d)) * rng.uniform(0.5, 3, d) + rng.uniform(-5, 5, d)
    x_b = x_a @ rotation + 7.0  # an offset, which centring removes
    np.testing.assert_allclose(fit_orthogonal_procrustes(x_a, x_b), rotation, atol=1e-8)
    xc_a, xc_b = x_a - x_a.mean(0), x_b - x_b.mean(0)
    np.testing.assert_allclose(
        fit_orthogonal_procrustes(x_a, x_b), orthogonal_procrustes(xc_a, xc_b)[0], atol=1e-8
    )
    acc = LinearCKAAccumulator(d, d)  # the same fit from streamed chunks
    for lo in range(0, 200, 37):
        acc.update(x_a[lo : lo + 37], x_b[lo : lo + 37])
    np.testing.assert_allclose(
        orthogonal_procrustes_map(acc.cross_covariance()), rotation, atol=1e-8
    )


def test_procrustes_between_different_widths_is_an_isometry():
    rng = np.random.default_rng(1)
    embed = _orthogonal(rng, 12)[:8]  # [8, 12], orthonormal rows: R^8 into R^12
    x_a = rng.standard_normal((300, 8))
    r = fit_orthogonal_procrustes(x_a, x_a @ embed + 0.01 * rng.standard_normal((300, 12)))
    assert r.shape == (8, 12)
    np.testing.assert_allclose(r @ r.T, np.eye(8), atol=1e-12)
    np.testing.assert_allclose(r, embed, atol=0.01)


def test_decoder_matching_after_procrustes_recovers_permuted_rotated_features():
    rng = np.random.default_rng(2)
    d, m, n = 16, 48, 4000
    w_dec_a = rng.standard_normal((m, d))
    w_dec_a /= np.linalg.norm(w_dec_a, axis=1, keepdims=True)
    rotation = _orthogonal(rng, d)
    perm = rng.permutation(m)
    w_dec_b = (w_dec_a @ rotation)[perm]  # B's latent j = A's latent perm[j], rotated
    codes = _latents(rng, n, m)
    x_a = codes @ w_dec_a
    x_b = codes @ w_dec_a @ rotation + 0.01 * rng.standard_normal((n, d))
    r = fit_orthogonal_procrustes(x_a, x_b)
    matches = decoder_matches(w_dec_a, w_dec_b, r, one_to_one=True)
    np.testing.assert_array_equal(matches.b_index, np.argsort(perm))
    assert matches.score.min() > 0.99
    unmapped = max_matches(decoder_cosine(w_dec_a, w_dec_b))  # without the map: mostly wrong
    assert np.mean(unmapped.b_index == np.argsort(perm)) < 0.5
    with pytest.raises(
        ValueError,
        match=r"rotation has shape \(16, 16\), w_dec_a \(48, 16\), "
        r"w_dec_b \(48, 8\)",
    ):
        decoder_cosine(w_dec_a, w_dec_b[:, :8], r)


def test_feature_splitting_finds_parents_and_counts_children():
    rng = np.random.default_rng(3)
    d, m_narrow = 64, 10
    narrow = rng.standard_normal((m_narrow, d))
    narrow /= np.linalg.norm(narrow, axis=1, keepdims=True)
    n_children = np.array([1, 2, 3, 1, 2, 4, 1, 0, 2, 3])  # parent 7 has no child
    parents = np.repeat(np.arange(m_narrow), n_children)
    wide = narrow[parents] + 0.3 * rng.standard_normal((len(parents), d)) / np.sqrt(d)
    orphan = rng.standard_normal((1, d))
    result = feature_splitting(narrow, np.vstack([wide, orphan]), min_cosine=0.5)
    np.testing.assert_array_equal(result.parent[:-1], parents)
    assert result.parent_cosine[:-1].min() > 0.9
    assert result.parent_cosine[-1] < 0.5
    np.testing.assert_array_equal(result.children_per_parent, n_children)
    summary = result.summary()
    assert summary["fraction_orphans"] == pytest.approx(1 / 20)
    assert summary["fraction_parents_split"] == pytest.approx(6 / 10)
    assert summary["fraction_parents_childless"] == pytest.approx(1 / 10)
    assert summary["mean_children_per_parent"] == pytest.approx(19 / 9)
    with pytest.raises(ValueError, match=r"\(10, 64\) and w_dec_wide \(3, 32\)"):
        feature_splitting(narrow, np.zeros((3, 32)))


def test_ground_truth_agreement():
    matches = Matches(np.arange(4), np.array([2, 0, 3, 1]), np.ones(4), 4, 4, "hungarian")
    agreement = ground_truth_agreement(
        {"rain": 0, "dog": 1, "sea": 3}, {"rain": 2, "dog": 3, "cat": 1}, matches
    )
    assert agreement == {"dog": False, "rain": True}
    with pytest.raises(ValueError, match="no concept has a best latent in both"):
        ground_truth_agreement({"a": 0}, {"b": 1}, matches)
