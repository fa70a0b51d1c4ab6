"""evaluate_transfer (stages/alignment/transfer.py): the carried vector is compared with
B's own at the own vector's norm, against a null of random directions of that norm."""

from __future__ import annotations

import math

import pytest
import torch

from stages.alignment import evaluate_transfer
from stages.steering import steerability, toy_sets
from stages.steering.targeted import random_like
from tests.steering.conftest import HOOKS

MULTS = (-4.0, -2.0, 0.0, 2.0, 4.0)  # symmetric: -v at m steers as v at -m


@pytest.fixture(scope="module")
def setup(tiny_model):
    s = toy_sets(0, 8, 8)["mammal_vs_bird"]
    v = torch.randn(32, generator=torch.Generator().manual_seed(1)) * 3
    return tiny_model, s, v


def test_a_rescaled_copy_of_the_own_vector_steers_exactly_like_it(setup):
    model, s, v = setup
    t = evaluate_transfer(model, s, HOOKS[0], v, 3 * v, MULTS, n_random=3, seed=5)
    assert t.norm_carried == pytest.approx(3 * t.norm_own, rel=1e-6)
    assert t.cosine == pytest.approx(1.0, abs=1e-6)
    assert t.transferred.slope == pytest.approx(t.own.slope, rel=1e-4, abs=1e-6)
    assert t.fraction_of_own == pytest.approx(1.0, rel=1e-3)
    assert t.own.slope != 0


def test_the_opposite_vector_steers_the_other_way(setup):
    model, s, v = setup
    t = evaluate_transfer(model, s, HOOKS[0], v, -v, MULTS, n_random=2)
    assert t.cosine == pytest.approx(-1.0, abs=1e-6)
    assert t.transferred.slope == pytest.approx(-t.own.slope, rel=1e-4, abs=1e-6)
    assert t.fraction_of_own == pytest.approx(-1.0, rel=1e-3)


def test_the_null_is_random_directions_of_the_own_norm_and_p_counts_them(setup):
    model, s, v = setup
    carried = random_like(v, 99) * 0.5
    t = evaluate_transfer(model, s, HOOKS[1], v, carried, MULTS, n_random=6, seed=10)
    assert len(t.random_slopes) == 6 and len(set(t.random_slopes)) == 6
    # the i-th null direction is random_like(own, seed + i): same norm as the own vector
    r2 = random_like(v, 12)
    assert float(r2.norm()) == pytest.approx(t.norm_own, rel=1e-6)
    assert t.random_slopes[2] == steerability(model, s, HOOKS[1], r2, MULTS).slope
    above = sum(r >= t.transferred.slope for r in t.random_slopes)
    assert t.p_vs_random == (1 + above) / 7
    mean = sum(t.random_slopes) / 6
    sd = math.sqrt(sum((r - mean) ** 2 for r in t.random_slopes) / 5)
    assert t.z_vs_random == pytest.approx((t.transferred.slope - mean) / sd, rel=1e-9)
    d = t.to_dict()
    lo, hi = d["transferred"]["ci95"]
    assert lo < d["transferred"]["steerability"] < hi
    assert d["random"]["n"] == 6 and d["random"]["steerability"] == pytest.approx(mean)
    assert d["random"]["sd"] == pytest.approx(sd) and d["p_vs_random"] == t.p_vs_random
    assert d["transferred"]["n_prompts"] == len(s.eval_prompts)


def test_nothing_carried_steers_nothing(setup):
    model, s, v = setup
    t = evaluate_transfer(model, s, HOOKS[0], v, torch.zeros(32), MULTS, n_random=2)
    assert t.norm_carried == 0 and math.isnan(t.cosine)
    assert t.transferred.slope == pytest.approx(0.0, abs=1e-9) and t.fraction_of_own == 0


def test_a_null_of_one_is_refused(setup):
    model, s, v = setup
    with pytest.raises(ValueError, match="n_random = 1, expected an integer >= 2"):
        evaluate_transfer(model, s, HOOKS[0], v, v, MULTS, n_random=1)
