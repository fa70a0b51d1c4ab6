"""Representation similarity: closed-form properties and agreement with direct definitions."""

from __future__ import annotations

import contextlib
import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import spearmanr

from stages.alignment import (
    METRICS,
    LinearCKAAccumulator,
    layer_similarity,
    linear_cka,
    mutual_knn,
    permutation_test,
    rsa,
    subsample_rows,
    svcca,
    unbiased_cka,
)
from stages.alignment.similarity import SIMILARITY, _gram_zero_diag, _hsic1, _hsic1_terms

FAST = settings(max_examples=25, deadline=None)


def _orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _cka_gram_definition(x: np.ndarray, y: np.ndarray) -> float:
    """CKA as HSIC ratios of centred Gram matrices (Kornblith et al. eq. 3), independent
    of the feature-space formula used by the code."""
    n = x.shape[0]
    h = np.eye(n) - 1.0 / n
    k, l_ = h @ x @ x.T @ h, h @ y @ y.T @ h
    return float(np.sum(k * l_) / np.sqrt(np.sum(k * k) * np.sum(l_ * l_)))


# ------------------------------------------------------------------------- linear CKA


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(8, 80),
    d_x=st.integers(1, 12),
    d_y=st.integers(1, 12),
    scale=st.floats(1e-3, 1e3),
)
def test_linear_cka_invariant_to_orthogonal_maps_and_isotropic_scale(seed, n, d_x, d_y, scale):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d_x))
    y = x[:, :1] @ rng.standard_normal((1, d_y)) + rng.standard_normal((n, d_y))
    base = linear_cka(x, y)
    transformed = linear_cka(scale * x @ _orthogonal(rng, d_x), y @ _orthogonal(rng, d_y) / scale)
    assert transformed == pytest.approx(base, abs=1e-10)
    assert base == pytest.approx(_cka_gram_definition(x, y), abs=1e-10)


@FAST
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(3, 60), d=st.integers(1, 10))
def test_linear_cka_of_identical_inputs_is_one(seed, n, d):
    x = np.random.default_rng(seed).standard_normal((n, d)) * 5 + 3
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    acc = LinearCKAAccumulator(d, d)
    acc.update(x, x)
    assert acc.cka() == pytest.approx(1.0, abs=1e-12)


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    cuts=st.lists(st.integers(0, 200), max_size=6),
    offset=st.sampled_from([0.0, 1e3]),
)
def test_streaming_cka_equals_batch(seed, cuts, offset):
    """Any chunking — empty chunks, single rows, a large common offset — gives the batch value."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((200, 7)) + offset
    y = np.tanh(x @ rng.standard_normal((7, 5))) + rng.standard_normal((200, 5)) * 0.3
    acc = LinearCKAAccumulator(7, 5)
    bounds = [0, *sorted(cuts), 200]
    for lo, hi in itertools.pairwise(bounds):
        acc.update(x[lo:hi], torch.from_numpy(y[lo:hi]))
    assert acc.n_samples == 200
    assert abs(acc.cka() - linear_cka(x, y)) < 1e-10
    assert abs(acc.cka() - _cka_gram_definition(x, y)) < 1e-10


@FAST
@given(seed=st.integers(0, 2**31 - 1), split=st.integers(0, 150), chunk=st.integers(1, 64))
def test_cka_merge_equals_single_pass(seed, split, chunk):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((150, 6)) * rng.uniform(0.1, 10, 6) + rng.uniform(-50, 50, 6)
    y = x @ rng.standard_normal((6, 4)) + rng.standard_normal((150, 4))
    single = LinearCKAAccumulator(6, 4)
    for lo in range(0, 150, chunk):
        single.update(x[lo : lo + chunk], y[lo : lo + chunk])
    left, right = LinearCKAAccumulator(6, 4), LinearCKAAccumulator(6, 4)
    left.update(x[:split], y[:split])
    right.update(x[split:], y[split:])
    merged = left.merge(right)
    assert merged.n_samples == 150
    assert abs(merged.cka() - single.cka()) < 1e-10
    np.testing.assert_allclose(
        merged.cross_covariance(), np.cov(x, y, rowvar=False)[:6, 6:], atol=1e-9
    )


def test_cka_accumulator_errors_name_both_shapes():
    acc = LinearCKAAccumulator(3, 2)
    with pytest.raises(ValueError, match=r"\(5, 3\).*\(4, 2\)"):
        acc.update(np.zeros((5, 3)), np.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"x_chunk has shape \(5, 4\): expected 3 columns"):
        acc.update(np.zeros((5, 4)), np.zeros((5, 2)))
    with pytest.raises(ValueError, match="NaN"):
        acc.update(np.full((2, 3), np.nan), np.zeros((2, 2)))
    with pytest.raises(ValueError, match=r"widths \(d_x, d_y\) = \(3, 3\)"):
        acc.merge(LinearCKAAccumulator(3, 3))
    acc.update(np.ones((4, 3)), np.random.default_rng(0).standard_normal((4, 2)))
    with pytest.raises(ValueError, match="representation x has zero variance"):
        acc.cka()
    with pytest.raises(ValueError, match="a representation has zero variance"):
        linear_cka(np.ones((4, 3)), np.random.default_rng(0).standard_normal((4, 2)))


# ----------------------------------------------------------------------- unbiased CKA


def test_hsic1_matches_the_u_statistic_definition():
    """HSIC_1 equals the U-statistic mean over ordered distinct 4-tuples of
    k_ij l_ij + k_ij l_qr − 2 k_ij l_iq (Song et al. 2012, Theorem 2)."""
    rng = np.random.default_rng(3)
    n = 7
    x, y = rng.standard_normal((n, 3)), rng.standard_normal((n, 2))
    y[:, 0] += x[:, 0]
    k, l_ = x @ x.T, y @ y.T
    terms = [
        k[i, j] * l_[i, j] + k[i, j] * l_[q, r] - 2 * k[i, j] * l_[i, q]
        for i, j, q, r in itertools.permutations(range(n), 4)
    ]
    kz, lz = _gram_zero_diag(x), _gram_zero_diag(y)
    rows_k, sum_k = _hsic1_terms(kz)
    rows_l, sum_l = _hsic1_terms(lz)
    assert _hsic1(kz, lz, rows_k, sum_k, rows_l, sum_l) == pytest.approx(np.mean(terms), rel=1e-10)


def test_unbiased_cka_is_near_zero_for_unrelated_wide_representations():
    """The plain estimator is biased upwards when d ≫ n; HSIC_1 removes that bias."""
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((100, 400)), rng.standard_normal((100, 400))
    assert linear_cka(x, y) > 0.7
    assert abs(unbiased_cka(x, y)) < 0.05
    assert unbiased_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    q = _orthogonal(rng, 400)
    assert unbiased_cka(x, 2.5 * x @ q) == pytest.approx(1.0, abs=1e-10)


# ------------------------------------------------------------------------ mutual kNN


def _mutual_knn_brute_force(x: np.ndarray, y: np.ndarray, k: int) -> float:
    def neighbours(z: np.ndarray) -> list[set[int]]:
        zn = z / np.linalg.norm(z, axis=1, keepdims=True)
        sim = zn @ zn.T
        np.fill_diagonal(sim, -np.inf)
        return [set(np.argsort(-row, kind="stable")[:k].tolist()) for row in sim]

    return float(
        np.mean([len(a & b) / k for a, b in zip(neighbours(x), neighbours(y), strict=True)])
    )


@FAST
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(12, 60), d=st.integers(2, 8))
def test_mutual_knn_of_identical_inputs_is_one(seed, n, d):
    x = np.random.default_rng(seed).standard_normal((n, d))
    assert mutual_knn(x, x, k=10) == 1.0
    assert mutual_knn(x, 3.0 * x, k=10) == 1.0


def test_mutual_knn_matches_brute_force():
    rng = np.random.default_rng(1)
    shared = rng.standard_normal((300, 4))
    x = np.hstack([shared, rng.standard_normal((300, 4))])
    y = np.hstack([shared @ _orthogonal(rng, 4), 2 * rng.standard_normal((300, 6))])
    value = mutual_knn(x, y, k=10)
    assert value == pytest.approx(_mutual_knn_brute_force(x, y, 10), abs=1e-12)
    assert 0.05 < value < 0.95  # neither trivial case: the test can tell right from wrong


# ---------------------------------------------------------------------------- SVCCA


def test_svcca_rotated_copy_is_one_and_keeps_many_directions():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((500, 16)) * np.linspace(1, 4, 16)
    result = svcca(x, 0.3 * x @ _orthogonal(rng, 16))
    assert result.n_components_x > 1
    assert result.n_components_x == result.n_components_y
    assert result.mean_correlation == pytest.approx(1.0, abs=1e-10)


def test_svcca_keeps_exactly_the_directions_for_99_percent():
    """Variance shares 0.5, 0.3, 0.195, 0.0025, 0.0025: 99 % takes three directions."""
    rng = np.random.default_rng(4)
    n = 400
    m = rng.standard_normal((n, 5))
    u = np.linalg.qr(m - m.mean(0))[0]  # orthonormal, centred columns
    s = np.sqrt([0.5, 0.3, 0.195, 0.0025, 0.0025])
    x = (u * s) @ _orthogonal(rng, 5)
    y = rng.standard_normal((n, 3))
    assert svcca(x, y).n_components_x == 3
    assert svcca(x, y).n_components_y == 3
    assert svcca(x, y, variance_kept=0.45).n_components_x == 1
    assert svcca(x, y, variance_kept=0.75).n_components_x == 2
    # Independent data: canonical correlations stay far from 1.
    assert svcca(x, y).mean_correlation < 0.3


def test_svcca_refuses_too_few_samples():
    x = np.random.default_rng(0).standard_normal((10, 8))
    with pytest.raises(
        ValueError, match=r"kept \d+ \+ \d+ directions for n_samples = 10; expected n_samples > \d+"
    ):
        svcca(x, x)


# ------------------------------------------------------------------------------ RSA


def test_rsa_equals_spearman_of_rdm_upper_triangles():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((60, 8))
    y = x @ rng.standard_normal((8, 5)) + rng.standard_normal((60, 5))
    iu = np.triu_indices(60, 1)
    expected = spearmanr((1 - np.corrcoef(x))[iu], (1 - np.corrcoef(y))[iu]).statistic
    assert rsa(x, y) == pytest.approx(expected, abs=1e-12)
    assert rsa(x, x) == pytest.approx(1.0, abs=1e-12)


# ------------------------------------------------------------------ permutation tests


@pytest.mark.parametrize("metric", METRICS)
def test_permuted_statistic_equals_recomputation_on_permuted_rows(metric):
    """Each measure's shortcut for a permuted pairing equals scoring x against y[p]."""
    rng = np.random.default_rng(6)
    x = rng.standard_normal((80, 6))
    y = x[:, :3] @ rng.standard_normal((3, 4)) + rng.standard_normal((80, 4))
    statistic = SIMILARITY[metric].prepare(x, y)
    # RSA's null draws gather its rank matrix in float32 (`_permuted_vdot`): a float32 dot
    # over n² terms; every other measure here works in float64 feature space
    tol = 1e-7 if metric == "rsa" else 1e-12
    for _ in range(3):
        p = rng.permutation(80)
        assert statistic(p) == pytest.approx(SIMILARITY[metric].prepare(x, y[p])(None), abs=tol)


@pytest.mark.parametrize("metric", ["linear_cka", "unbiased_cka"])
def test_gram_form_null_draws_equal_recomputation_to_float32_accuracy(metric):
    """Wide representations (d_x·d_y > 128 n, e.g. SAE latents) score permutations through
    the n² Gram gather in float32: equal to rescoring y[p] in float64 within 1e-6."""
    rng = np.random.default_rng(8)
    x = np.maximum(rng.standard_normal((64, 120)), 0)
    y = x[:, :90] @ np.abs(rng.standard_normal((90, 100))) + rng.standard_normal((64, 100))
    statistic = SIMILARITY[metric].prepare(x, y)
    for _ in range(3):
        p = rng.permutation(64)
        exact = SIMILARITY[metric].prepare(x, y[p])(None)
        assert statistic(p) == pytest.approx(exact, abs=1e-6)
        assert statistic(p) != exact  # the float32 path did run (else this proves nothing)


def _topk_code(rng, n: int, d: int, k: int) -> np.ndarray:
    """A TopK-like code: k of d latents fire per row, frequent latents more often."""
    freq = 1.0 / np.arange(1, d + 1) ** 0.8
    x = np.zeros((n, d))
    for i in range(n):
        x[i, rng.choice(d, k, replace=False, p=freq / freq.sum())] = rng.random(k) + 0.1
    return x


@pytest.mark.parametrize("d_y", [90, 200])  # the feature form's width, and the Gram form's
def test_sparse_codes_score_null_draws_through_sparse_products(d_y):
    """Sparse codes (SAE latents) score a permutation as ‖XᵀY_p‖² − 2n aᵀb_p + n²‖μ_x‖²‖μ_y‖²
    from sparse copies: in float64, equal to rescoring y[p] densely up to rounding; the
    observed value is the dense forms' own."""
    from stages.alignment.similarity import _sparse_cross_norm

    rng = np.random.default_rng(9)
    n = 256
    x = _topk_code(rng, n, 200, 4)
    y = np.concatenate([x[:, : d_y // 2], _topk_code(rng, n, d_y - d_y // 2, 2)], axis=1)
    assert _sparse_cross_norm(x, y, n, 200, d_y) is not None  # the sparse form runs here
    statistic = SIMILARITY["linear_cka"].prepare(x, y)
    assert statistic(None) == linear_cka(x, y)
    for _ in range(3):
        p = rng.permutation(n)
        exact = SIMILARITY["linear_cka"].prepare(x, y[p])(None)
        assert statistic(p) == pytest.approx(exact, rel=1e-12)
    # dense inputs keep the dense forms: 2.5 r_x r_y against min(n, d_x d_y / 128)
    dense = rng.standard_normal((n, 200))
    assert _sparse_cross_norm(dense, y, n, 200, d_y) is None


@pytest.mark.parametrize("metric", METRICS)
def test_permutation_test_separates_related_from_unrelated(metric):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((120, 6))
    related = x @ rng.standard_normal((6, 6)) + 0.5 * rng.standard_normal((120, 6))
    unrelated = rng.standard_normal((120, 6))
    hit = permutation_test(x, related, metric, n_permutations=99, seed=1)
    assert hit.p_value == pytest.approx(1 / 100)
    assert hit.statistic > hit.null.max()
    miss = permutation_test(x, unrelated, metric, n_permutations=99, seed=1)
    assert miss.p_value > 0.05
    again = permutation_test(x, unrelated, metric, n_permutations=99, seed=1)
    np.testing.assert_array_equal(again.null, miss.null)  # seeded


def test_permutation_p_values_are_roughly_uniform_under_the_null():
    rng = np.random.default_rng(8)
    p = [
        permutation_test(
            rng.standard_normal((40, 3)),
            rng.standard_normal((40, 3)),
            "linear_cka",
            n_permutations=49,
            seed=s,
        ).p_value
        for s in range(60)
    ]
    assert 0.3 < np.mean(p) < 0.7
    assert np.mean(np.array(p) <= 0.1) < 0.25


# ----------------------------------------------------------------------- layer grid


def _chunks(a: np.ndarray, size: int) -> list[np.ndarray]:
    return [a[i : i + size] for i in range(0, len(a), size)]


def test_layer_similarity_matches_per_pair_computations():
    rng = np.random.default_rng(9)
    n = 600
    a0 = rng.standard_normal((n, 6))
    a1 = np.tanh(a0 @ rng.standard_normal((6, 8)))
    b0 = a0 @ _orthogonal(rng, 6) + 0.1 * rng.standard_normal((n, 6))
    b1 = rng.standard_normal((n, 5))
    hooks_a = {"blocks.0.hook_resid_post": a0, "blocks.1.hook_resid_post": a1}
    hooks_b = {"blocks.0.hook_resid_post": b0, "blocks.1.hook_resid_post": b1}
    out = layer_similarity(
        {h: _chunks(v, 128) for h, v in hooks_a.items()},
        {h: iter(_chunks(v, 128)) for h, v in hooks_b.items()},
        n_samples=200,
        n_permutations=19,
        seed=3,
    )
    assert set(out) == set(METRICS)
    sample = subsample_rows(
        {f"a{i}": _chunks(v, 128) for i, v in enumerate(hooks_a.values())}
        | {f"b{i}": _chunks(v, 128) for i, v in enumerate(hooks_b.values())},
        200,
        seed=3,
    )
    for i, va in enumerate(hooks_a.values()):
        for j, vb in enumerate(hooks_b.values()):
            cka = out["linear_cka"]
            assert cka.values[i, j] == pytest.approx(linear_cka(va, vb), abs=1e-10)
            xs, ys = sample[f"a{i}"], sample[f"b{j}"]
            assert out["rsa"].values[i, j] == pytest.approx(rsa(xs, ys), abs=1e-12)
            assert out["mutual_knn"].values[i, j] == pytest.approx(mutual_knn(xs, ys), abs=1e-12)
    assert out["linear_cka"].n_samples == n and out["svcca"].n_samples == 200
    assert out["linear_cka"].values[0, 0] > 0.95 and out["linear_cka"].values[0, 1] < 0.1
    assert out["linear_cka"].p_values[0, 0] == pytest.approx(1 / 20)
    records = out["svcca"].to_records()
    assert len(records) == 4 and records[0]["hook_a"] == "blocks.0.hook_resid_post"


def test_grid_work_per_hook_is_done_once_per_hook(monkeypatch):
    """A 3 × 4 layer grid needs each hook's kNN lists (and Gram matrix) once, 7 in all,
    not once per side of each cell (24), and gets the same numbers either way."""
    from stages.alignment import similarity as sim

    rng = np.random.default_rng(4)
    n, d = 300, 40  # d² > 128·n: linear CKA's p-values take the Gram form
    hooks_a = {f"a{i}": rng.standard_normal((n, d)) for i in range(3)}
    hooks_b = {f"b{j}": rng.standard_normal((n, d)) for j in range(4)}
    calls = {"knn": 0}
    knn = sim._knn_indices

    def counted(*args, **kwargs):
        calls["knn"] += 1
        return knn(*args, **kwargs)

    def grid():
        return layer_similarity({h: _chunks(v, 100) for h, v in hooks_a.items()},
                                {h: _chunks(v, 100) for h, v in hooks_b.items()},
                                metrics=("linear_cka", "mutual_knn"), n_samples=n,
                                n_permutations=5)  # fmt: skip

    monkeypatch.setattr(sim, "_knn_indices", counted)
    out = grid()
    assert calls["knn"] == 7
    monkeypatch.setattr(sim, "shared_per_representation", contextlib.nullcontext)
    calls["knn"] = 0
    unshared = grid()
    assert calls["knn"] == 24
    for m in out:
        np.testing.assert_array_equal(out[m].values, unshared[m].values)
        np.testing.assert_array_equal(out[m].p_values, unshared[m].p_values)


def test_subsample_keeps_the_same_rows_in_every_stream():
    rows = np.arange(1000, dtype=np.float64)[:, None]
    sample = subsample_rows({"a": _chunks(rows, 97), "b": _chunks(rows * 2, 97)}, 50, seed=1)
    assert sample["a"].shape == (50, 1)
    np.testing.assert_array_equal(sample["b"], 2 * sample["a"])
    assert np.all(np.diff(sample["a"][:, 0]) > 0)  # stream order, no repeats
    assert sample["a"][:, 0].max() > 500  # reaches beyond the first chunks


def test_layer_similarity_names_the_misaligned_stream():
    x = np.zeros((10, 2))
    with pytest.raises(ValueError, match=r"'b:h'.*ended after 1 chunks"):
        layer_similarity({"h": [x, x]}, {"h": [x]}, metrics=["linear_cka"])
    with pytest.raises(ValueError, match="different row counts"):
        layer_similarity({"h": [x]}, {"h": [x[:5]]}, metrics=["linear_cka"])
    with pytest.raises(ValueError, match="unknown similarity metric 'cca'"):
        layer_similarity({"h": [x]}, {"h": [x]}, metrics=["cca"])
