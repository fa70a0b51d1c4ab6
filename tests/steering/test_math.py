"""Closed-form checks of the vector, steering, metric, decomposition and probe maths."""

from __future__ import annotations

import math
import re

import pytest
import torch

from stages.steering.apply import position_mask, steer
from stages.steering.decompose import (
    concept_latents,
    decoder_cosines,
    nn_decompose,
    precision_at_k,
    top_by_cosine,
)
from stages.steering.evaluate import behaviour_metric, pick_best, steerability_from_grid
from stages.steering.probes import cosine_table, train_probe
from stages.steering.targeted import random_like, targeted_vectors
from stages.steering.vectors import mean_diff, pca_direction, vector_from_acts


def test_mean_diff_is_the_hand_computed_difference():
    pos = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]])
    neg = torch.tensor([[0.0, 0.0, 0.0], [2.0, 2.0, 2.0]])
    assert torch.allclose(mean_diff(pos, neg), torch.tensor([1.0, 1.0, 1.0]))
    assert torch.allclose(vector_from_acts(pos, neg, "mean_diff"), torch.ones(3))


def test_pca_recovers_a_planted_axis():
    g = torch.Generator().manual_seed(0)
    axis = torch.randn(16, generator=g)
    axis /= axis.norm()
    scale = 3 + torch.rand(200, 1, generator=g)
    diffs = scale * axis + 0.05 * torch.randn(200, 16, generator=g)
    u = pca_direction(diffs)
    assert float(u @ axis) > 0.99
    # on the mean difference's scale and sign
    v = vector_from_acts(diffs, torch.zeros_like(diffs), "pca")
    assert float(v @ axis) > 0
    assert math.isclose(float(v.norm()), float(diffs.mean(0) @ u), rel_tol=1e-5)


def test_unknown_method():
    with pytest.raises(ValueError, match="expected one of"):
        vector_from_acts(torch.zeros(2, 3), torch.zeros(2, 3), "ica")


def test_directional_ablation_leaves_activations_orthogonal():
    g = torch.Generator().manual_seed(1)
    act, v = torch.randn(3, 5, 8, generator=g), torch.randn(8, generator=g)
    mask = position_mask((3, 5), "all")
    out = steer(act, v, 0.0, mask, "ablate")
    u = v / v.norm()
    assert (out[:, 1:] @ u).abs().max() < 1e-5
    assert torch.equal(out[:, 0], act[:, 0])  # BOS untouched
    # ablate-then-add sets the component to m·‖v‖
    out = steer(act, v, 2.0, mask, "ablate_add")
    assert torch.allclose(out[:, 1:] @ u, torch.full((3, 4), 2.0 * float(v.norm())), atol=1e-4)


def test_add_and_positions():
    act, v = torch.zeros(2, 4, 3), torch.tensor([1.0, 2.0, 3.0])
    out = steer(act, v, 2.0, position_mask((2, 4), "last", torch.tensor([2, 3])), "add")
    assert torch.equal(out[0, 2], 2 * v) and torch.equal(out[1, 3], 2 * v)
    assert out[0, 3].abs().sum() == 0 and out[:, :2].abs().sum() == 0
    out = steer(act, v, torch.tensor([1.0, -1.0]), position_mask((2, 4), [1, -1]), "add")
    assert torch.equal(out[0, 1], v) and torch.equal(out[1, 3], -v) and out[:, 0].sum() == 0
    with pytest.raises(ValueError, match="BOS"):
        position_mask((2, 4), [0])


def test_behaviour_metric_closed_form():
    # p = [0.5, 0.25, 0.125, 0.125]: log-odds of {0} vs {1, 2} = log(0.5 / 0.375)
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.125, 0.125]], dtype=torch.float64))
    pos = torch.tensor([True, False, False, False])
    neg = torch.tensor([False, True, True, False])
    assert math.isclose(float(behaviour_metric(logits, pos, neg)), math.log(0.5 / 0.375),
                        rel_tol=1e-9)  # fmt: skip


def test_steerability_slope_of_a_linear_metric():
    m = torch.tensor([-4.0, -2.0, 0.0, 2.0, 4.0])
    slopes = torch.tensor([1.0, 2.0, 3.0, -1.0])
    grid = 0.5 + slopes[:, None] * m[None, :]
    st = steerability_from_grid("h", m.tolist(), grid.double())
    assert math.isclose(st.slope, float(slopes.mean()), rel_tol=1e-9)
    assert math.isclose(st.intercept, 0.5, abs_tol=1e-9)
    assert st.wrong_way_fraction == 0.25
    assert torch.allclose(torch.tensor(st.per_prompt_slope, dtype=torch.float64), slopes.double())


def test_pick_best_respects_the_kl_budget():
    assert pick_best({"a": 3.0, "b": 2.0}, {"a": 1.0, "b": 0.1}, 0.5) == ("b", True)
    assert pick_best({"a": 3.0, "b": 2.0}, {"a": 1.0, "b": 0.9}, 0.5) == ("b", False)


def test_nn_decomposition_recovers_three_decoder_rows():
    g = torch.Generator().manual_seed(2)
    W = torch.randn(200, 32, generator=g)
    W /= W.norm(dim=1, keepdim=True)
    rows, coefs = [5, 77, 150], torch.tensor([2.0, 1.0, 0.5])
    v = coefs @ W[rows]
    dec = nn_decompose(v, W, max_features=10)
    assert sorted(dec.features[:3]) == rows
    assert dec.curve[2] < 1e-6 and len(dec.curve) == 3  # stops once exact
    assert dec.top(3) == rows  # ordered by coefficient
    assert torch.allclose(torch.tensor(dec.coefficients), coefs, atol=1e-6)
    assert torch.allclose(dec.reconstruct(W), v, atol=1e-5)
    # the curve never increases
    assert all(a >= b - 1e-12 for a, b in zip(dec.curve, dec.curve[1:], strict=False))
    tv = targeted_vectors(v, W, dec, 2)
    assert torch.allclose(tv["top2"], coefs[:2] @ W[rows[:2]], atol=1e-5)
    assert torch.allclose(tv["off_ablated2"], tv["top2"], atol=1e-5)
    assert math.isclose(float(tv["random"].norm()), float(v.norm()), rel_tol=1e-5)
    assert torch.equal(random_like(v, 3), random_like(v, 3))


def test_precision_at_k_and_concept_latents():
    assert precision_at_k([3, 1, 4, 5], [1, 5, 9], 2) == 0.5
    assert precision_at_k([3, 1, 4, 5], [1, 5, 9], 4) == 0.5
    assert precision_at_k([1], [1], 3) == pytest.approx(1 / 3)
    f1 = torch.tensor([0.1, 0.8, 0.6, 0.2])
    assert concept_latents(f1, 0.5) == [1, 2]
    assert concept_latents(f1, 0.9) == [1]


def test_probe_on_separable_data():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(10, generator=g)
    x = torch.randn(400, 10, generator=g) * 3 + 1
    margin = x @ w
    keep = margin.abs() > 0.5
    x, y = x[keep], (margin[keep] > 0).double()
    p = train_probe(x[:200], y[:200])
    assert p.train_accuracy == 1.0
    assert p.accuracy(x[200:], y[200:]) > 0.97
    assert cosine_table({"probe": p.weight, "true": w})["probe"]["true"] > 0.9
    with pytest.raises(ValueError, match="both classes"):
        train_probe(x[:5], torch.ones(5))


def test_decomposition_takes_an_sae_decoder_as_loaded():
    """load_sae gives Parameters that require grad; the helpers read them detached."""
    import stages.steering

    g = torch.Generator().manual_seed(4)
    W = torch.nn.Parameter(torch.randn(50, 16, generator=g))
    v = 2.0 * W.detach()[7] + W.detach()[30]
    dec = nn_decompose(v, W, max_features=4)
    assert sorted(dec.features[:2]) == [7, 30] and dec.curve[1] < 1e-6
    assert not dec.reconstruct(W).requires_grad
    cos = decoder_cosines(v, W)
    assert not cos.requires_grad and cos.numpy().shape == (50,)
    assert set(top_by_cosine(v, W, 2)[0]) <= set(range(50))
    assert not targeted_vectors(v, W, dec, 1)["top1"].requires_grad
    # everything the package docstring lists is importable from the package
    listed = stages.steering.__doc__.split("Modules and public functions", 1)[1]
    names = set(re.findall(r"`([A-Za-z_]\w*)[`(]", listed)) - {
        "prompts", "vectors", "apply", "evaluate", "decompose", "downstream", "probes",
        "targeted", "run", "train_pairs", "decompose_run",
    }  # fmt: skip
    assert names - set(stages.steering.__all__) == set()
    assert all(hasattr(stages.steering, n) for n in stages.steering.__all__)
