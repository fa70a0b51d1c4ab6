"""Directional ablation, ablate+add and SAE-latent clamping (stages/steering/interventions.py)
on the tiny model: closed forms that fail if the splice, the projection or the batching
is wrong."""

from __future__ import annotations

import copy

import pytest
import torch

from stages.steering import ContrastivePair, EvalPrompt, SteeringSet
from stages.steering.apply import steer
from stages.steering.controls import kl_curves, last_token_edit_grid, last_token_grid
from stages.steering.interventions import (
    clamp_delta,
    clamp_edit,
    directional_ablation,
    feature_clamping,
    latent_scales,
    live_mask,
)
from tests.steering.conftest import HOOKS, tiny_sae

PAIRS = [("On Monday the weather is sunny, so Tom feels",
          "On Monday the weather is stormy, so Tom feels"),
         ("The brown dog", "The brown owl"), ("Anna saw the cat.", "Anna sees the cat."),
         ("On Friday the weather is warm, so Mia feels",
          "On Friday the weather is cold, so Mia feels")]  # fmt: skip


def _set() -> SteeringSet:
    pairs = [ContrastivePair(p, n, -1, split) for p, n in PAIRS for split in ("train", "heldout")]
    prompts = ["Tom sees the dog", "On Monday the weather is windy, so Anna feels", "The cat",
               "Three brown owls fly over the park and Mia is"]  # fmt: skip
    return SteeringSet("tiny", pairs, [EvalPrompt(p) for p in prompts], ["happy", "glad"],
                       ["sad", "angry"])  # fmt: skip


def _zero_dim_model(model, d0: int = 0):
    """A copy whose residual stream is exactly 0 along coordinate d0 everywhere: nothing
    writes to it (embeddings, attention and MLP outputs zeroed there)."""
    m = copy.deepcopy(model)
    with torch.no_grad():
        m.W_E[:, d0] = 0
        m.W_pos[:, d0] = 0
        for b in m.blocks:
            b.attn.W_O[..., d0] = 0
            b.attn.b_O[d0] = 0
            b.mlp.W_out[:, d0] = 0
            b.mlp.b_out[d0] = 0
    return m


def test_clamping_a_latent_to_its_own_value_is_the_clean_forward(tiny_model):
    """With the error term kept, x' = x + Σ (c_j − f_j(x)) W_dec[j] is x itself when
    c = f(x): bit for bit, through the model too. Clamping to c moves x by exactly
    (c − f_j) W_dec[j]."""
    torch.manual_seed(0)
    sae, s = tiny_sae(k=8), _set()
    _, cache = tiny_model.run_with_cache(tiny_model.to_tokens("The brown dog"),
                                         names_filter=[HOOKS[0]])  # fmt: skip
    x = cache[HOOKS[0]][0]
    f = sae.encode(x)
    lat = torch.tensor([int(f[-1].argmax()), 3, 7])
    assert torch.equal(x + clamp_delta(sae, x, lat, f[:, lat]), x)
    c = torch.tensor([2.5, 0.0, -1.0])
    want = ((c - f[:, lat])[..., None] * sae.W_dec[lat]).sum(-2)
    assert torch.allclose(clamp_delta(sae, x, lat, c), want, atol=1e-6)

    def own(act, vi, mult):  # noqa: ARG001
        return act + clamp_delta(sae, act, lat, sae.encode(act)[..., lat])

    clamped = last_token_edit_grid(tiny_model, s, HOOKS[0], 1, [0.0, 1.0], own)
    clean = last_token_grid(tiny_model, s, HOOKS[0], torch.zeros(1, 32), [0.0, 1.0])
    assert torch.equal(clamped, clean)


def test_clamping_a_silent_latent_is_adding_its_decoder_row(tiny_model, tiny_store):
    """A latent that never fires (zero encoder column, negative bias) has f_j = 0, so
    clamping it to c adds c · W_dec[j]: the same metric grid as adding that vector, and the
    same KL as `controls.kl_curves`."""
    torch.manual_seed(0)
    sae, s = tiny_sae(k=8), _set()
    with torch.no_grad():
        sae.W_enc[:, 0] = 0
        sae.b_enc[0] = -10.0
    w = sae.W_dec[0].detach().clone()
    mults = [-2.0, 0.0, 3.0]
    grid = last_token_edit_grid(tiny_model, s, HOOKS[0], 1, mults,
                                clamp_edit(sae, torch.tensor([[0]]), torch.ones(1, 1)))  # fmt: skip
    assert torch.allclose(grid, last_token_grid(tiny_model, s, HOOKS[0], w[None], mults),
                          atol=1e-9)  # fmt: skip
    assert not torch.allclose(grid[0, :, 0], grid[0, :, 1])  # it does move the metric
    tokens = tiny_store.windows("heldout", max_windows=2)
    from stages.steering.interventions import _kl_reduce, clean_pass, run_edits

    cp = clean_pass(tiny_model, HOOKS[0], tokens)
    mask = live_mask(tokens)[..., None]
    kl = run_edits(tiny_model, HOOKS[0], tokens, 1,
                   lambda x0, i: x0 + mask * clamp_delta(sae, x0, torch.tensor([0]),
                                                          torch.tensor([3.0])),
                   _kl_reduce(cp[0]), clean=cp)[1]  # fmt: skip
    want = kl_curves(tiny_model, HOOKS[0], w[None], [3.0], tokens)[0, 0]
    assert float(kl[0]) == pytest.approx(float(want), rel=1e-5)
    assert float(want) > 1e-4


def test_ablate_add_with_zero_multiplier_is_ablate_and_sets_the_component():
    """Arditi et al.'s ablate+add: m = 0 is the ablation exactly; otherwise the component
    along v̂ becomes m‖v‖ at the steered positions and nothing else changes."""
    g = torch.Generator().manual_seed(0)
    x, v = torch.randn(3, 5, 16, generator=g), torch.randn(16, generator=g) * 2.5
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[:, 0] = False
    abl = steer(x, v, 0.0, mask, "ablate")
    assert torch.equal(steer(x, v, 0.0, mask, "ablate_add"), abl)
    u = v / v.norm()
    out = steer(x, v, 1.7, mask, "ablate_add")
    assert torch.allclose(out[:, 1:] @ u, torch.full((3, 4), 1.7 * float(v.norm())), atol=1e-5)
    assert torch.equal(out[:, 0], x[:, 0])
    assert torch.allclose(abl[:, 1:] @ u, torch.zeros(3, 4), atol=1e-5)


@pytest.mark.parametrize("hook", [HOOKS[0], "blocks.1.hook_mlp_out"])
def test_ablating_a_direction_nothing_writes_to_changes_nothing(tiny_model, hook):
    """Coordinate 0 of the residual stream (and of every block's output) is exactly 0 in
    this model: projecting it out keeps every pair's contrast (retained 1, drop 0, no
    shift), while ablating the pairs' own mean difference does change the contrast. At
    an MLP output the whole forward runs with the edit hooked in (no `start_at_layer`)."""
    m, s = _zero_dim_model(tiny_model), _set()
    e0 = torch.zeros(32)
    e0[0] = 3.0
    r = directional_ablation(m, s, hook, e0, n_random=4, seed=0)
    assert r["n_pairs"] == len(PAIRS) and r["pairs"] == "heldout"
    assert abs(r["clean_contrast"]) > 1e-3
    assert r["ablate"]["retained"] == pytest.approx(1.0, abs=1e-6)
    assert r["ablate"]["mean_shift"] == pytest.approx(0.0, abs=1e-6)
    # with the component 0 everywhere, ablate+add is adding m·v: the slope is not 0
    assert abs(r["ablate_add"]["steerability"]) > 1e-3
    assert r["ablate"]["n_null"] == 4 and r["p_floor"] == pytest.approx(1 / 5)
    from stages.steering.vectors import compute_vectors

    v = compute_vectors(m, s.train_pairs, [hook], "mean_diff")[hook]
    r2 = directional_ablation(m, s, hook, v, n_random=4, seed=0)
    assert r2["clean_contrast"] == pytest.approx(r["clean_contrast"], rel=1e-9)
    assert abs(r2["ablate"]["retained"] - 1.0) > 1e-3


def test_feature_clamping_record_and_equal_kl(tiny_model, tiny_store):
    """The raw vector is added where its KL equals the clamp's: KL(add at that multiplier),
    measured again, is the clamp's KL (to the interpolation's error); the null has the
    draws asked for, p is at least its floor 1/(n + 1), and it is deterministic."""
    torch.manual_seed(0)
    sae, s = tiny_sae(k=8), _set()
    from stages.steering.vectors import compute_vectors

    v = compute_vectors(tiny_model, s.train_pairs, [HOOKS[0]], "mean_diff")[HOOKS[0]]
    tokens = tiny_store.windows("heldout", max_windows=2)
    lat = torch.nonzero(sae.W_dec @ v > 0).flatten()[:3].tolist()
    kw = {"multiples": (0.5, 1.0, 2.0), "n_random": 6, "seed": 0,
          "add_multipliers": (0.5, 1.0, 2.0, 4.0)}  # fmt: skip
    r = feature_clamping(tiny_model, s, HOOKS[0], sae, lat, [1.0] * 3, v, tokens, **kw)
    m = r["add_equal_kl"]["multiplier"]
    assert m == m and m > 0, r["add_equal_kl"]
    again_kl = float(kl_curves(tiny_model, HOOKS[0], v[None], [m], tokens)[0, 0])
    assert again_kl == pytest.approx(r["kl"], rel=0.25)  # KL is convex in m: linear interp.
    assert r["kl_curve"][r["multiples"].index(1.0)] == r["kl"]
    assert r["random"]["n"] == r["n_null"] == 6 and r["k"] == 3 and r["latents"] == lat
    assert r["p_floor"] == pytest.approx(1 / 7) and r["p"] >= r["p_floor"]
    # the KL of the first n_kl_random (default 4) random sets is measured, not all 6
    assert len(r["random"]["null_kl"]) == r["random"]["n_kl"] == 4
    assert min(r["random"]["null_kl"]) > 0
    again = feature_clamping(tiny_model, s, HOOKS[0], sae, lat, [1.0] * 3, v, tokens, **kw)
    assert again["random"]["null_effects"] == r["random"]["null_effects"]
    assert (
        again["effect"] == r["effect"]
        and again["add_equal_kl"]["effect"] == r["add_equal_kl"]["effect"]
    )


@pytest.mark.parametrize(("key", "value"), [("ablate_add_multipliers", [1.0, 2.0]),
                                            ("clamp_multiples", [0.0, 1.0]),
                                            ("ablation_random", 1)])  # fmt: skip
def test_bad_intervention_params_are_named(key, value):
    from stages.steering.config import SteeringConfig

    with pytest.raises(ValueError, match=key):
        SteeringConfig(**{key: value})


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_pre", HOOKS[1], "blocks.1.hook_mlp_out"])
def test_clamp_scales_are_read_where_the_hook_fires(tiny_model, hook):
    """latent_scales stops the forward after the block that fires the hook: for a
    `resid_pre` hook that is its own block (stopping at its index never reaches it; the
    offline GPT-2 profile, whose SAEs read resid_pre, caught that as a KeyError). Equal to
    the largest encoding over a full forward's cache, every position but BOS."""
    torch.manual_seed(0)
    sae, s = tiny_sae(k=8), _set()
    got = latent_scales(tiny_model, s, hook, sae)
    want = torch.zeros(sae.d_sae)
    for p in s.train_pairs:
        _, cache = tiny_model.run_with_cache(p.positive, names_filter=[hook])
        want = torch.maximum(want, sae.encode(cache[hook][0, 1:].float()).amax(0))
    assert got.shape == want.shape and bool((want > 0).any())
    assert torch.allclose(got, want, atol=1e-5)
