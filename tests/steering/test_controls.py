"""Random-direction controls (stages/steering/controls.py): the fast paths equal the plain
ones, and the statistics give closed-form answers on constructed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stages.steering import EvalPrompt, SteeringSet
from stages.steering.controls import (
    controlled_effects,
    crossing,
    effect_at,
    kl_curves,
    last_token_grid,
    null_test,
    random_directions,
    t_interval,
)
from stages.steering.evaluate import metric_grid, side_effects
from stages.steering.prompts import target_ids
from tests.steering.conftest import HOOKS


def _set() -> SteeringSet:
    prompts = ["Tom sees the dog", "On Monday the weather is sunny, so Anna feels", "The cat",
               "Three brown owls fly over the park and Mia is", "Anna"]  # fmt: skip
    return SteeringSet("tiny", [], [EvalPrompt(p) for p in prompts], ["happy", "glad"],
                       ["sad", "angry"])  # fmt: skip


@pytest.fixture(scope="module")
def rotary_model(tiny_model):
    """The tiny model's shape with rotary positions (the toy default's), random weights."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=2, d_head=16, d_mlp=64,
                                  n_ctx=64, d_vocab=tiny_model.cfg.d_vocab, act_fn="gelu",
                                  normalization_type="LN", positional_embedding_type="rotary",
                                  seed=1, default_prepend_bos=True, device="cpu")  # fmt: skip
    return HookedTransformer(cfg, tokenizer=tiny_model.tokenizer).eval()


@pytest.mark.parametrize("which", ["tiny_model", "rotary_model"])
@pytest.mark.parametrize("hook", [HOOKS[0], "blocks.1.hook_mlp_out"])
def test_last_token_grid_equals_metric_grid(request, which, hook):
    """The key-value-cache path (prefix once, one token per row) gives the full batched
    forward's numbers, for several vectors at once and prompts of different lengths."""
    model = request.getfixturevalue(which)
    s = _set()
    vs = torch.randn(3, 32, generator=torch.Generator().manual_seed(0)) * 2
    mults = [-2.0, 0.0, 0.5, 3.0]
    fast = last_token_grid(model, s, hook, vs, mults, batch_size=7)
    for i, v in enumerate(vs):
        want = metric_grid(model, s, hook, v, mults, batch_size=5)
        assert torch.allclose(fast[i], want, atol=1e-4), (i, (fast[i] - want).abs().max())


@pytest.mark.parametrize("hook", [HOOKS[0], "blocks.1.hook_mlp_out"])
def test_kl_curves_equal_side_effects(tiny_model, tiny_store, hook):
    """From the cached residual (a resid hook) or with a hook (any other), the KL of each
    vector and multiplier is `side_effects`' KL; `until` stops a vector past it."""
    tokens = tiny_store.windows("heldout", max_windows=3)
    vs = torch.randn(2, 32, generator=torch.Generator().manual_seed(1))
    kl = kl_curves(tiny_model, hook, vs, [0.0, 1.0, 4.0], tokens, batch_size=4)
    assert torch.all(kl[:, 0] == 0)
    for i in range(2):
        for j, m in enumerate([1.0, 4.0]):
            se = side_effects(tiny_model, hook, vs[i], m, tokens)
            assert float(kl[i, j + 1]) == pytest.approx(se.kl, rel=1e-5, abs=1e-9)
    cut = kl_curves(tiny_model, hook, vs, [1.0, 4.0], tokens, until=0.0)
    assert torch.all(torch.isnan(cut[:, 1])) and torch.allclose(cut[:, 0], kl[:, 1])


def test_null_test_closed_form():
    null = np.array([-1.0, 0.0, 1.0, 2.0])  # mean 0.5, sd (ddof 1) √(5/3)
    at_mean = null_test(0.5, null)
    assert at_mean["z"] == pytest.approx(0.0) and at_mean["p"] == pytest.approx(3 / 5)
    far = null_test(1e9, null)
    assert far["p"] == far["p_floor"] == pytest.approx(1 / 5)  # never below its floor
    assert null_test(-5.0, null)["p"] == 1.0
    assert null_test(2.0, null)["z"] == pytest.approx(1.5 / math.sqrt(5 / 3))
    # a direction that never reached the KL target is left out and counted
    part = null_test(0.5, [np.nan, *null])
    assert part["n_null"] == 4 and part["n_unreached"] == 1 and part["z"] == pytest.approx(0)


def test_interval_crossing_and_interpolated_effect():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    lo, hi = t_interval(x)  # mean 3, sd √2.5, t(0.975, 4) = 2.776
    assert (lo + hi) / 2 == pytest.approx(3.0)
    assert hi - 3.0 == pytest.approx(2.7764451 * math.sqrt(2.5) / math.sqrt(5), rel=1e-6)
    assert crossing([0, 1, 2, 4], [0, 0.1, 0.3, 0.7], 0.5) == pytest.approx(3.0)
    assert math.isnan(crossing([0, 1, 2], [0, 0.1, 0.2], 0.5))
    grid = torch.tensor([[-4.0, 0.0, 2.0, 6.0]])  # metric 2m on m ∈ {-2, 0, 1, 3}
    assert effect_at(grid, [-2, 0, 1, 3], 2.0)[0] == pytest.approx(4.0)


def test_random_directions_are_seeded_unit_and_spread():
    a, b = random_directions(32, 40, 5), random_directions(32, 40, 5)
    assert torch.equal(a, b) and torch.allclose(a.norm(dim=1), torch.ones(40))
    assert not torch.equal(a, random_directions(32, 40, 6))
    with pytest.raises(ValueError, match="n_random = 1"):
        random_directions(32, 1)


def test_planted_direction_beats_its_null_and_a_random_one_does_not(tiny_model, tiny_store):
    """At the last hook, W_U[:, pos] − W_U[:, neg] moves the log-odds through ln_final
    alone: far outside 32 random directions of its norm (p at its floor). A random
    direction of the same norm, drawn outside the null's seeds, stays inside it (|z| < 3).
    A variant that is the raw vector doubled is the raw vector at equal norm and at equal
    KL, reached at half the multiplier."""
    s = _set()
    tok = tiny_model.tokenizer
    pos, neg = target_ids(tok, s.positive_targets), target_ids(tok, s.negative_targets)
    v = (tiny_model.W_U[:, pos].mean(1) - tiny_model.W_U[:, neg].mean(1)).detach()
    v = v / v.norm() * 4
    other = random_directions(32, 2, seed=999)[0] * 4
    tokens = tiny_store.windows("heldout", max_windows=2)
    mults = [-2.0, -1.0, 0.0, 1.0, 2.0]
    r = controlled_effects(tiny_model, s, HOOKS[1], {"raw": v, "double": 2 * v,
                                                     "random": other}, mults, tokens,
                           n_random=32, seed=0)  # fmt: skip
    raw = r["vectors"]["raw"]
    assert raw["equal_norm"]["z"] > 3 and raw["equal_norm"]["p"] == pytest.approx(1 / 33)
    assert r["p_floor"] == pytest.approx(1 / 33)
    assert abs(r["vectors"]["random"]["equal_norm"]["z"]) < 3
    dbl = r["vectors"]["double"]
    assert dbl["equal_norm"]["steerability"] == pytest.approx(raw["own_norm"]["steerability"])
    # at twice the norm it steers harder (not twice: ln_final rescales the residual)
    assert dbl["own_norm"]["steerability"] > 1.2 * raw["own_norm"]["steerability"]
    assert raw["equal_kl"]["multiplier"] == pytest.approx(1.0)
    assert dbl["equal_kl"]["effect"] == pytest.approx(raw["equal_kl"]["effect"])
    assert dbl["equal_kl"]["multiplier_own_norm"] == pytest.approx(0.5)
    assert raw["equal_kl"]["z"] > 3


def test_read_position_contrast_closed_form():
    """Latent 0 fires on every positive row only, 1 everywhere, 2 on negative rows only,
    3 on half the positive rows: contrasts 1, 0, −1, 0.5."""
    from types import SimpleNamespace

    from stages.steering.decompose import contrast_at_tokens

    sae = SimpleNamespace(d_sae=4, encode=lambda x: x)
    pos = torch.tensor([True, True, True, True, False, False])
    neg = ~pos
    x = torch.zeros(6, 4)
    x[pos, 0] = 1.0
    x[:, 1] = 2.0
    x[neg, 2] = 0.5
    x[:2, 3] = 1.0
    c = contrast_at_tokens(sae, x, pos, neg, batch_size=4)
    assert c.tolist() == pytest.approx([1.0, 0.0, -1.0, 0.5])
    with pytest.raises(ValueError, match="0 negative rows"):
        contrast_at_tokens(sae, x, pos, torch.zeros(6, dtype=torch.bool))
