"""The rest of the seeds' steering programme: multi-layer steering
(stages/steering/multilayer.py), the vector's stability over prompt subsets and read
positions (stability.py), and whether decoder similarity predicts ablation effect
(similarity.py). Closed forms on constructed cases and the tiny real model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.steering import ContrastivePair, EvalPrompt, SteeringSet
from stages.steering.controls import last_token_grid
from stages.steering.multilayer import multi_hook_grid, multilayer_steering, split_weights
from stages.steering.similarity import similarity_vs_effect, spearman_test
from stages.steering.stability import split_half_cosines, split_half_summary, vector_stability
from stages.steering.vectors import compute_vectors
from tests.steering.conftest import HOOKS, tiny_sae


def _set() -> SteeringSet:
    prompts = ["Tom sees the dog", "On Monday the weather is sunny, so Anna feels", "The cat",
               "Three brown owls fly over the park and Mia is", "Anna"]  # fmt: skip
    pairs = [ContrastivePair(f"{w} weather, so {n} feels", f"{o} weather, so {n} feels")
             for n in ("Anna", "Tom", "Mia", "Ben") for w, o in
             (("Sunny", "Rainy"), ("Warm", "Cold"), ("Bright", "Grey"))]  # fmt: skip
    return SteeringSet("tiny", pairs, [EvalPrompt(p) for p in prompts], ["happy", "glad"],
                       ["sad", "angry"])  # fmt: skip


# ---------------------------------------------------------------------------- multi-layer


def test_multi_hook_grid_with_other_hooks_at_zero_is_single_hook(tiny_model):
    """All hooks but one at multiplier 0 (zero vectors): exactly single-hook steering."""
    s = _set()
    vs = torch.randn(3, 32, generator=torch.Generator().manual_seed(0)) * 2
    mults = [-2.0, 0.0, 1.0, 3.0]
    single = last_token_grid(tiny_model, s, HOOKS[1], vs, mults, batch_size=7)
    multi = multi_hook_grid(tiny_model, s, {HOOKS[0]: torch.zeros_like(vs), HOOKS[1]: vs},
                            mults, batch_size=7)  # fmt: skip
    assert torch.equal(single, multi)
    # and both hooks on differs from either alone
    both = multi_hook_grid(tiny_model, s, {HOOKS[0]: vs, HOOKS[1]: vs}, mults, batch_size=7)
    assert (both - multi).abs().max() > 1e-3


def test_split_weights_sum_to_the_single_norm():
    v = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0, 10.0]), "c": torch.ones(2)}
    w = split_weights(v, "a")
    added = [w[h] * float(v[h].norm()) for h in v]
    assert added == pytest.approx([5 / 3] * 3) and sum(added) == pytest.approx(5.0)


def test_multilayer_steering_record(tiny_model):
    s = _set()
    vec = compute_vectors(tiny_model, s, HOOKS)
    mults = [-2.0, 0.0, 2.0]
    r = multilayer_steering(tiny_model, s, vec, HOOKS[1], mults, n_random=8, seed=0)
    assert r["p_floor"] == pytest.approx(1 / 9) and len(r["null_slopes"]) == 8
    # "single" is the best hook's own vector: the plain grid's slope
    g = last_token_grid(tiny_model, s, HOOKS[1], vec[HOOKS[1]][None], mults)[0]
    x = torch.tensor(mults, dtype=torch.float64)
    want = float(((g - g.mean(1, keepdim=True)) * (x - x.mean())).sum(1).mean() / 8.0)
    assert r["single"]["steerability"] == pytest.approx(want, rel=1e-6, abs=1e-9)
    lo, hi = r["multi"]["ci95"]
    assert lo <= r["multi"]["steerability"] <= hi
    assert "skipped" in multilayer_steering(tiny_model, s, {HOOKS[0]: vec[HOOKS[0]]},
                                            HOOKS[0], mults)  # fmt: skip


# ---------------------------------------------------------------------------- stability


def test_split_half_of_a_planted_direction_is_near_one_and_the_null_near_zero():
    g = torch.Generator().manual_seed(0)
    d, n = 64, 48
    u = torch.zeros(d)
    u[0] = 1.0
    neg = torch.randn(n, d, generator=g)
    pos = neg + 3.0 * u + 0.05 * torch.randn(n, d, generator=g)  # planted + small noise
    real, null, splits = split_half_cosines(pos, neg, n_splits=20, seed=1)
    assert real.min() > 0.99
    # shuffled labels carry (almost) no direction: cosines centre on 0 (sd ~ 1/sqrt(d))
    assert abs(null.mean()) < 0.1 and np.abs(null).max() < 0.5
    a, b = splits[0]
    assert len(set(a) | set(b)) == 2 * (n // 2) and not set(a) & set(b)
    sm = split_half_summary(real, null)
    assert sm["p"] == pytest.approx(1 / 21) and sm["p_floor"] == pytest.approx(1 / 21)


def test_split_half_of_pure_noise_is_null():
    g = torch.Generator().manual_seed(2)
    pos, neg = torch.randn(40, 64, generator=g), torch.randn(40, 64, generator=g)
    real, null, _ = split_half_cosines(pos, neg, n_splits=50, seed=0)
    assert abs(real.mean()) < 0.1 and abs(null.mean()) < 0.1


def test_vector_stability_on_the_tiny_model(tiny_model):
    s = _set()
    vec = compute_vectors(tiny_model, s, HOOKS)
    null = list(np.linspace(-0.5, 0.5, 9))
    st = vector_stability(tiny_model, s, vec, HOOKS[1], [-2.0, 0.0, 2.0], null, n_splits=6,
                          n_effect_splits=1, offsets=(1,))  # fmt: skip
    assert set(st["split_half"]) == set(HOOKS)
    assert st["split_half"][HOOKS[1]]["n_splits"] == 6
    pos = st["positions"]["1"]
    assert pos["n_pairs"] == 12 and -1 <= pos["cosine"][HOOKS[0]] <= 1
    eff = st["effects"]
    assert len(eff["halves"]) == 2
    # the full vector's equal-norm slope is its own slope (it is at the full norm)
    assert eff["full"]["equal_norm"] == pytest.approx(eff["full"]["steerability"], rel=1e-6)
    assert eff["full"]["p_floor"] == pytest.approx(1 / 10)


# ---------------------------------------------------------------------------- similarity


def test_spearman_closed_forms():
    x = np.arange(50, dtype=float)
    r = spearman_test(x, x**3, n_boot=200, n_perm=500, seed=0)  # monotone: ρ = 1
    assert r["spearman"] == pytest.approx(1.0) and r["ci95"] == pytest.approx([1.0, 1.0])
    assert r["p"] == pytest.approx(1 / 501)  # no shuffle reaches |ρ| = 1
    assert abs(r["null_mean"]) < 0.02  # the shuffled null centres on 0
    r = spearman_test(x, -np.exp(x / 10), n_boot=200, n_perm=500, seed=0)
    assert r["spearman"] == pytest.approx(-1.0)
    rng = np.random.default_rng(0)
    r = spearman_test(rng.normal(size=200), rng.normal(size=200), n_perm=2000, seed=1)
    assert r["ci95"][0] < 0 < r["ci95"][1] and r["p"] > 0.05 and abs(r["null_mean"]) < 0.01


def test_similarity_vs_effect_on_the_tiny_model(tiny_model):
    torch.manual_seed(0)
    s = _set()
    sae = tiny_sae(k=8)
    v = compute_vectors(tiny_model, s, [HOOKS[0]])[HOOKS[0]]
    abl = {"latents": [0, 1, 2, 3], "ablation": [0.1, -0.2, 0.3, 0.0]}
    r = similarity_vs_effect(tiny_model, s, HOOKS[0], sae, v, abl, n_boot=100, n_perm=100)
    assert 0 < r["n_active"] <= 128 and r["attribution"]["signed"]["n"] == r["n_active"]
    assert r["ablation"]["signed"]["n"] == 4


# ---------------------------------------------------------------------------- in the stages


def test_run_concept_and_decompose_carry_the_programme(tiny_model, tiny_store):
    """run_concept writes `multilayer` and `stability`, decompose_concept
    `similarity_vs_effect`, and their flat keys reach the headlines."""
    from stages.steering import ConceptConfig, concept_headline, run_concept, toy_sets
    from stages.steering.decompose_run import decompose_concept, decomposition_headline
    from stages.steering.run import jsonable

    s = toy_sets(0, 16, 8)["mammal_vs_bird"]
    cfg = ConceptConfig(multipliers=(-2.0, 0.0, 2.0), n_windows=4, max_features=8,
                        n_candidates=64, gt_rows=2048, probe_rows=4096, n_generations=1,
                        max_new_tokens=3, kl_budget=10.0, stability_splits=8,
                        similarity_draws=200)  # fmt: skip
    r = run_concept(tiny_model, s, HOOKS, tiny_store, cfg, model_name="tiny")
    ev = jsonable(r.evaluation_dict())
    best = ev["sweep"]["best_hook"]
    ml = ev["multilayer"]
    assert ml["hooks"] == HOOKS and len(ml["null_slopes"]) == 32
    # the paired single-hook row is the sweep's best hook at its own norm
    assert ml["single"]["steerability"] == pytest.approx(
        ev["controls"][best]["vectors"]["raw"]["own_norm"]["steerability"], rel=1e-6
    )
    st = ev["stability"]
    assert st["split_half"][best]["n_splits"] == 8 and len(st["effects"]["halves"]) == 2
    head = concept_headline(ev)
    for key in ("multilayer.steerability", "multilayer.z", "multilayer.minus_single_ci95_lo",
                "stability.split_half_cosine", "stability.null_cosine_mean",
                "stability.position_minus_1.cosine"):  # fmt: skip
        assert key in head, key
    assert -1 <= head["stability.split_half_cosine"] <= 1
    dd = decompose_concept(tiny_model, s, r.vectors, ev, {HOOKS[1]: tiny_sae()}, tiny_store, cfg)
    sv = dd["similarity_vs_effect"]
    assert sv["attribution"]["signed"]["n"] == sv["n_active"]
    assert sv["ablation"]["signed"]["n"] == len(dd["attribution"]["latents"])
    dh = decomposition_headline(dd)
    assert "similarity_vs_effect.attribution.signed.spearman" in dh
    assert "similarity_vs_effect.ablation.absolute.p" in dh


def test_an_earlier_position_of_identical_text_has_no_vector(tiny_model):
    """Pairs that differ only in their last token: one token earlier both sides are the
    same text, the mean difference is exactly 0, its cosine undefined (NaN), no steering."""
    pairs = [ContrastivePair(f"{n} sees the {a}", f"{n} sees the {b}")
             for n in ("Anna", "Tom", "Mia", "Ben") for a, b in (("dog", "owl"), ("cat", "dog"))]  # fmt: skip
    s = SteeringSet("last", pairs, _set().eval_prompts, ["happy"], ["sad"])
    vec = compute_vectors(tiny_model, s, HOOKS)
    st = vector_stability(tiny_model, s, vec, HOOKS[1], [-1.0, 0.0, 1.0], None, n_splits=3,
                          n_effect_splits=0, offsets=(1,))  # fmt: skip
    p1 = st["positions"]["1"]
    assert p1["same_text"] == HOOKS and all(np.isnan(c) for c in p1["cosine"].values())
    assert p1["norm_ratio"][HOOKS[0]] == 0.0 and "position_minus_1" not in st["effects"]


def test_report_tables_show_the_records(tiny_model, tiny_store):
    """stages/report/steering_programme.py draws the three tables from the JSON records."""
    from types import SimpleNamespace

    from stages.report.steering_programme import programme_tables
    from stages.steering import ConceptConfig, run_concept, toy_sets
    from stages.steering.decompose_run import decompose_concept
    from stages.steering.run import jsonable

    s = toy_sets(0, 16, 8)["emotion_polarity"]
    cfg = ConceptConfig(multipliers=(-2.0, 0.0, 2.0), n_windows=4, max_features=8,
                        n_candidates=64, gt_rows=2048, probe_rows=4096, n_generations=0,
                        kl_budget=10.0, stability_splits=6, similarity_draws=100)  # fmt: skip
    r = run_concept(tiny_model, s, HOOKS, tiny_store, cfg, model_name="tiny")
    ev = jsonable(r.evaluation_dict())
    dd = jsonable(decompose_concept(tiny_model, s, r.vectors, ev, {HOOKS[1]: tiny_sae()},
                                    tiny_store, cfg))  # fmt: skip
    html = programme_tables([SimpleNamespace(concept=s.name, evaluation=ev, decomposition=dd)])
    assert "Multi-layer steering" in html and "Vector stability" in html
    assert "feature similarity predict" in html
    m = ev["multilayer"]["multi"]
    assert f"{m['z']:.2f} ({m['p']:.3f})" in html
    best = ev["sweep"]["best_hook"]
    assert f"{ev['stability']['split_half'][best]['cosine_mean']:.3f}" in html
    rho = dd["similarity_vs_effect"]["ablation"]["signed"]["spearman"]
    assert f"{rho:.3f}" in html
    assert programme_tables([SimpleNamespace(concept="x", evaluation={}, decomposition={})]) == ""
