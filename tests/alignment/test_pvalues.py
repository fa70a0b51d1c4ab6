"""p-values that resolve: the floor, the normal tail of the permutation null, Holm."""

from __future__ import annotations

import math

import numpy as np
import pytest

from stages.alignment import permutation_test
from stages.alignment.pvalues import (
    MIN_NORMAL_DRAWS,
    empirical_p,
    holm,
    holm_caps,
    holm_dict,
    normal_tail,
    p_floor,
    sequential_p,
)
from stages.alignment.similarity import _run_permutations


def test_holm_on_a_hand_computed_family():
    # sorted 0.01 < 0.02 < 0.03 < 0.04 < 0.5 (m = 5): 5·0.01 = 0.05, 4·0.02 = 0.08,
    # 3·0.03 = 0.09, 2·0.04 = 0.08 -> 0.09 (monotone), 1·0.5 = 0.5
    p = [0.04, 0.01, 0.5, 0.03, 0.02]
    np.testing.assert_allclose(holm(p), [0.09, 0.05, 0.5, 0.09, 0.08])
    # capped at 1, NaN is not a test (m = 2 here), ties keep their order
    np.testing.assert_allclose(holm([0.6, float("nan"), 0.2]), [0.6, np.nan, 0.4])
    np.testing.assert_allclose(holm([0.3, 0.3, 0.3]), [0.9, 0.9, 0.9])
    np.testing.assert_allclose(holm([0.7, 0.8]), [1.0, 1.0])
    assert holm_dict({"a": 0.01, "b": 0.04}) == pytest.approx({"a": 0.02, "b": 0.04})
    assert holm([]).shape == (0,)
    with pytest.raises(ValueError, match=r"values in \[0, 1\]"):
        holm([1.5])


def test_holm_is_never_below_the_raw_p_nor_above_bonferroni():
    rng = np.random.default_rng(0)
    p = rng.uniform(size=40) ** 3
    adjusted = holm(p)
    assert np.all(adjusted >= p) and np.all(adjusted <= np.minimum(1, 40 * p) + 1e-15)
    assert np.all(np.diff(adjusted[np.argsort(p)]) >= 0)  # order of the raw p kept


def test_floor_and_empirical_p():
    assert p_floor(100) == pytest.approx(1 / 101) and p_floor(0) == 1.0
    null = np.array([0.1, 0.2, 0.3, 0.4])
    assert empirical_p(0.35, null) == pytest.approx(2 / 5)
    assert empirical_p(9.0, null) == pytest.approx(p_floor(4))  # exhausted: the floor
    assert empirical_p(0.3 - 1e-13, null, rtol=1e-12) == pytest.approx(3 / 5)


def test_normal_tail_closed_form():
    # 30 draws of -1, 0, 1 (10 each): mean 0, sd (ddof 1) = sqrt(20/29), p = 1 − Φ(z)
    null = [-1.0, 0.0, 1.0] * 10
    sd = math.sqrt(20 / 29)
    z, p = normal_tail(1.959963984540054 * sd, null)
    assert z == pytest.approx(1.959963984540054) and p == pytest.approx(0.025, rel=1e-12)
    z, p = normal_tail(7.0, [2.0, 4.0, 6.0] * 10)  # mean 4
    assert z == pytest.approx(3.0 / math.sqrt(80 / 29))
    assert p == pytest.approx(0.5 * math.erfc(z / math.sqrt(2)))
    # fewer than MIN_NORMAL_DRAWS draws: z, but no tail p (an sd from 3 draws is no basis)
    assert MIN_NORMAL_DRAWS == 30
    z, p = normal_tail(7.0, [2.0, 4.0, 6.0])  # mean 4, sd 2: z = 1.5
    assert z == pytest.approx(1.5) and math.isnan(p)
    assert normal_tail(0.0, [1.0]) == pytest.approx((math.nan, math.nan), nan_ok=True)
    assert normal_tail(0.0, [1.0] * 40) == pytest.approx((math.nan, math.nan), nan_ok=True)


def test_permutation_test_reports_floor_z_and_normal_tail():
    """A statistic whose permutation values are known: p at its floor, z and the normal
    tail from the null's mean and sd exactly."""
    values = iter([0.0, 1.0, -1.0, 0.5, -0.5])

    def statistic(p):  # observed 3, then the null draws 1, −1, 0.5, −0.5 (mean 0)
        return 3.0 if p is None else next(values)

    next(values)  # the first value is skipped: the observed call returns 3
    t = _run_permutations("x", statistic, 10, 4, seed=0)
    sd = float(np.std([1.0, -1.0, 0.5, -0.5], ddof=1))
    assert t.p_value == pytest.approx(1 / 5) == pytest.approx(t.p_floor)
    assert t.z == pytest.approx(3.0 / sd)
    assert math.isnan(t.p_normal)  # 4 draws: below MIN_NORMAL_DRAWS


def test_a_strong_effect_resolves_below_the_floor():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 8))
    related = permutation_test(x, x @ rng.standard_normal((8, 8)), "linear_cka",
                               n_permutations=50)  # fmt: skip
    unrelated = permutation_test(x, rng.standard_normal((200, 8)), "linear_cka",
                                 n_permutations=50)  # fmt: skip
    assert related.p_value == pytest.approx(related.p_floor) == pytest.approx(1 / 51)
    assert related.z > 10 and related.p_normal < 1e-20  # far beyond the floor
    assert unrelated.p_value > 0.05 and unrelated.p_normal > 0.01


def test_sequential_p_closed_forms():
    # stopped at h = 10 exceedances after 40 draws: h / L (Besag & Clifford 1991)
    assert sequential_p(10, 40, 10) == pytest.approx(0.25)
    # the cap came first: 3 exceedances in 999 draws -> (3 + 1) / (999 + 1)
    assert sequential_p(3, 999, 10) == pytest.approx(0.004)
    assert sequential_p(0, 999, 10) == pytest.approx(p_floor(999))
    with pytest.raises(ValueError, match="stop_after = 0"):
        sequential_p(0, 5, 0)
    with pytest.raises(ValueError, match="exceedances = 6, draws = 5"):
        sequential_p(6, 5, 1)


def test_sequential_p_is_valid_under_the_null():
    """P(p ≤ α) ≤ α when the statistic is one more draw of the null: 20,000 replicate
    tests with h = 5 and a cap of 200, each a uniform observed value against uniform
    null draws (the rank of the observed among the draws is all that matters)."""
    rng = np.random.default_rng(0)
    h, cap, reps = 5, 200, 20_000
    observed = rng.uniform(size=reps)
    draws = rng.uniform(size=(reps, cap)) >= observed[:, None]  # exceedances, in order
    counts = np.cumsum(draws, axis=1)
    stopped = counts[:, -1] >= h
    at = np.where(stopped, np.argmax(counts >= h, axis=1) + 1, cap)
    p = np.array([sequential_p(int(min(c[-1], h)) if s else int(c[-1]), int(n), h)
                  for c, s, n in zip(counts, stopped, at, strict=True)])  # fmt: skip
    se = lambda a: math.sqrt(a * (1 - a) / reps)  # noqa: E731
    for alpha in (0.01, 0.05, 0.2, 0.5):
        assert np.mean(p <= alpha) <= alpha + 3 * se(alpha)
    # and not wastefully conservative: a weak effect stops after about h / p draws
    assert np.median(at) < 20


def test_holm_caps_resolve_a_family_of_strong_effects():
    caps = holm_caps(28, 0.01, at_least=100)
    assert caps[:3] == [2799, 2699, 2599] and caps[-1] == 100 and caps[-2] == 199
    # every test at its floor 1/(cap + 1): every Holm-adjusted p <= 0.01
    adjusted = holm([p_floor(c) for c in caps])
    assert adjusted.max() == pytest.approx(0.01)
    # the fixed 100 permutations: 28/101 for all
    assert holm([p_floor(100)] * 28).max() == pytest.approx(28 / 101)
    assert holm_caps(4, 0.05) == [79, 59, 39, 19]
    with pytest.raises(ValueError, match="alpha = 1"):
        holm_caps(3, 1.0)


def test_a_sequential_test_stops_early_on_a_weak_effect_and_shares_the_fixed_draws():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 4))
    y = rng.standard_normal((200, 4))  # unrelated: p is large, h exceedances come fast
    fixed = permutation_test(x, y, "linear_cka", n_permutations=50, seed=3)
    seq = permutation_test(x, y, "linear_cka", n_permutations=5000, seed=3, stop_after=10)
    assert seq.max_permutations == 5000 and seq.n_permutations < 60
    np.testing.assert_array_equal(seq.null, fixed.null[: seq.n_permutations])
    assert seq.p_value == pytest.approx(10 / seq.n_permutations)
    assert seq.p_floor == pytest.approx(1 / 5001)
    # a strong effect runs to its cap and sits at that floor
    strong = permutation_test(x, x @ rng.standard_normal((4, 4)), "linear_cka",
                              n_permutations=300, seed=3, stop_after=10)  # fmt: skip
    assert strong.n_permutations == 300 and strong.p_value == pytest.approx(1 / 301)
