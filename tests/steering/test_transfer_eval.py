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
    # the floor of 6 random directions; 6 draws are too few for a normal tail beyond it
    assert d["p_floor"] == t.p_floor == pytest.approx(1 / 7)
    assert math.isnan(d["p_normal_vs_random"])
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


def test_holm_over_the_pairs_concepts_and_hooks():
    """Holm across every concept × hook of one pair: hand-computed on four tests."""
    from stages.alignment.transfer import correct_transfer, transfer_headline

    def row(p, p_normal):
        unit = {"steerability": 1.0, "ci95": [0.5, 1.5]}
        return {"own": unit, "transferred": unit, "random": {"steerability": 0.0},
                "p_vs_random": p, "p_floor": 1 / 33, "z_vs_random": 3.0,
                "p_normal_vs_random": p_normal, "fraction_of_own": 1.0,
                "cosine_transferred_own": 0.5}  # fmt: skip

    transfer = {"concepts": {"a": {"h0": row(1 / 33, 1e-9), "h1": row(0.5, 0.4)},
                             "b": {"h0": row(1 / 33, 1e-3), "h1": row(0.1, 0.02)}}}  # fmt: skip
    correct_transfer(transfer)
    c = transfer["concepts"]
    # sorted 1/33, 1/33, 0.1, 0.5 (m = 4): 4/33, max(4/33, 3/33), max(·, 2·0.1), 0.5
    assert c["a"]["h0"]["p_vs_random_holm"] == pytest.approx(4 / 33)
    assert c["b"]["h0"]["p_vs_random_holm"] == pytest.approx(4 / 33)
    assert c["b"]["h1"]["p_vs_random_holm"] == pytest.approx(0.2)
    assert c["a"]["h1"]["p_vs_random_holm"] == pytest.approx(0.5)
    # normal tail: 1e-9, 1e-3, 0.02, 0.4 -> 4e-9, 3e-3, 0.04, 0.4
    assert [c[k][h]["p_normal_vs_random_holm"] for k, h in (("a", "h0"), ("b", "h0"),
            ("b", "h1"), ("a", "h1"))] == pytest.approx([4e-9, 3e-3, 0.04, 0.4])  # fmt: skip
    assert transfer["correction"]["family_size"] == 4
    assert transfer["correction"]["method"].startswith("Holm")
    scores = transfer_headline(transfer)
    assert scores["transfer/a/h0/p_vs_random_holm"] == round(4 / 33, 6)
    assert scores["transfer/a/h0/p_normal_vs_random_holm"] == pytest.approx(4e-9)  # not 0
    assert scores["transfer/a/h0/p_floor"] == round(1 / 33, 6)


def test_transfer_follows_the_alignments_hook_pair(tiny_model, tmp_path):
    """Across model families the alignment pairs different hooks (gpt2's
    blocks.8.hook_resid_pre with pythia's blocks.3.hook_resid_post): A's vector at hook_a
    is carried into B's SAE at hook_b and tested there. Here B's own vector at hook_b is the
    carried vector itself, so the test must find it steering exactly like B's own."""
    import json

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.alignment.transfer import Matches, transfer_steering, transfer_vector
    from tests.alignment._stores import tiny_topk_sae

    ha, hb = HOOKS
    sae_a, sae_b = tiny_topk_sae(32, 64, 4, seed=1), tiny_topk_sae(32, 64, 4, seed=2)
    la, lb = np.arange(64), np.random.default_rng(0).permutation(64)
    corr = np.linspace(0.9, 0.3, 64)
    key = f"{ha}~{hb}/x~y"
    (tmp_path / "matches").mkdir()
    (tmp_path / "meta.json").write_text(json.dumps({"sae_pairs": [key]}))
    pq.write_table(pa.table({"method": ["hungarian"] * 64, "latent_a": la, "latent_b": lb,
                             "correlation": corr}),
                   tmp_path / "matches" / f"{key.replace('/', '__')}.parquet")  # fmt: skip
    v = torch.randn(32, generator=torch.Generator().manual_seed(4)) * 3
    carried = transfer_vector(v, sae_a, sae_b, Matches(la, lb, corr, 64, 64, "hungarian"), None)
    s = toy_sets(0, 8, 8)["mammal_vs_bird"]
    out = transfer_steering(tmp_path, {"c": {ha: v}}, {"c": {hb: carried}}, {ha: {"x": sae_a}},
                            {hb: {"y": sae_b}}, tiny_model, {"c": s}, MULTS, n_random=3,
                            seed=0)  # fmt: skip
    r = out["concepts"]["c"][f"{ha}~{hb}"]
    assert (r["hook_a"], r["hook_b"], r["sae_a"], r["sae_b"]) == (ha, hb, "x", "y")
    assert r["cosine_transferred_own"] == pytest.approx(1.0, abs=1e-6)
    assert r["transferred"]["steerability"] == pytest.approx(r["own"]["steerability"], rel=1e-4)
    assert r["own"]["steerability"] != 0 and out["correction"]["family_size"] == 1


def test_a_null_at_its_floor_is_extended_and_p_counts_every_draw(setup):
    """Two-stage null: where the carried vector beats its first 3 random directions, 9
    more are drawn (4 × 3 in all), continuing the same seeded sequence, and p's floor
    falls from 1/4 to 1/13. Not extended when a first-stage draw reaches it."""
    model, s, v = setup
    own = steerability(model, s, HOOKS[0], v, MULTS).slope

    def first3(seed: int) -> list[float]:
        return [steerability(model, s, HOOKS[0], random_like(v, seed + i), MULTS).slope
                for i in range(3)]  # fmt: skip

    # a seed whose first three directions all fall below the own vector's slope, and one
    # where one of them reaches it (the tiny model is untrained, so both exist)
    beaten = next(sd for sd in range(0, 200, 3) if max(first3(sd)) < own)
    reached = next(sd for sd in range(0, 200, 3) if max(first3(sd)) >= own)
    t = evaluate_transfer(model, s, HOOKS[0], v, v, MULTS, n_random=3, seed=beaten)
    assert len(t.random_slopes) == 12 and t.p_floor == pytest.approx(1 / 13)
    above = sum(r >= t.transferred.slope for r in t.random_slopes)
    assert t.p_vs_random == pytest.approx((1 + above) / 13)
    extra = steerability(model, s, HOOKS[0], random_like(v, beaten + 10), MULTS).slope
    assert t.random_slopes[10] == extra
    short = evaluate_transfer(model, s, HOOKS[0], v, v, MULTS, n_random=3, seed=beaten,
                              extend_to=3)  # fmt: skip
    assert short.random_slopes == t.random_slopes[:3] and short.p_floor == pytest.approx(1 / 4)
    kept = evaluate_transfer(model, s, HOOKS[0], v, v, MULTS, n_random=3, seed=reached)
    assert len(kept.random_slopes) == 3
