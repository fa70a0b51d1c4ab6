"""`downstream_null`: later latents' changes under a steering vector against random
directions of its norm, BH-corrected, with held-out random directions as the control."""

from __future__ import annotations

import math

import torch

from stages.steering.downstream import downstream_effects, downstream_null
from tests.steering.conftest import HOOKS, tiny_sae


def _windows(tiny_store, n: int = 4):
    return tiny_store.windows("heldout", max_windows=n)


def test_the_vectors_mean_change_is_downstream_effects_own(tiny_model, tiny_store):
    """Same windows, same multiplier: the vector's row of the null test is exactly the mean
    change `downstream_effects` reports (the batched per-direction pass adds nothing)."""
    saes = {h: tiny_sae(seed=i) for i, h in enumerate(HOOKS)}
    tok = _windows(tiny_store)
    v = torch.randn(32, generator=torch.Generator().manual_seed(1))
    eff = downstream_effects(tiny_model, HOOKS[0], v, 2.0, tok, saes, top_n=5)
    res = downstream_null(tiny_model, HOOKS[0], v, 2.0, tok, saes, n_random=8, n_control=2,
                          top_n=128)  # fmt: skip
    assert list(res["hooks"]) == HOOKS and res["p_floor_per_latent"] == 1 / 9
    for row in eff.table:
        top = {t["latent"]: t for t in res["hooks"][row["hook"]]["top"]}
        if row["latent"] in top:
            assert math.isclose(top[row["latent"]]["mean_change"], row["mean_change"],
                                rel_tol=1e-5, abs_tol=1e-7)  # fmt: skip
    h = res["hooks"][HOOKS[1]]
    assert h["n_latents"] == 128 and len(h["control_n_significant"]) == 2
    assert h["n_up"] + h["n_down"] == h["n_significant"] <= h["n_tested"]


def test_a_latent_reading_the_vectors_direction_is_found_and_random_ones_move_none(
    tiny_model, tiny_store
):
    """An SAE latent j whose encoder row reads the steering direction u: steering with
    2u pushes j far beyond what random directions of that norm do (their component along
    u is ~ N(0, 4/32)), so j is the top latent and the only one the test needs to find;
    the held-out random directions, tested the same way, move (almost) nothing."""
    sae, j = tiny_sae(seed=3), 17
    u = torch.randn(32, generator=torch.Generator().manual_seed(5))
    u = u / u.norm()
    with torch.no_grad():
        sae.W_enc[:, j] = 4.0 * u
    tok = _windows(tiny_store)
    res = downstream_null(tiny_model, HOOKS[1], 2.0 * u, 2.0, tok, {HOOKS[1]: sae},
                          n_random=32, n_control=4)  # fmt: skip
    h = res["hooks"][HOOKS[1]]
    top = h["top"][0]
    assert top["latent"] == j and top["mean_change"] > 0 and top["q"] < 0.05, h["top"][:3]
    assert h["n_up"] >= 1 and top["p_empirical"] == 1 / 33  # beyond every random draw
    assert res["p_floor"] == 1 / (1 + res["n_null_z"]) and res["n_null_z"] > 32 * 100
    assert max(h["control_n_significant"]) <= 2, h["control_n_significant"]
    # the per-latent normal tail finds j too; its controls are reported beside it
    assert h["normal"]["n_up"] >= 1 and len(h["normal"]["control_n_significant"]) == 4
