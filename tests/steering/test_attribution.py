"""Attribution patching against true ablation (stages/steering/attribution.py) on the
tiny model and a random TopK SAE: closed-form checks, seconds."""

from __future__ import annotations

import pytest
import torch

from stages.steering import EvalPrompt, SteeringSet
from stages.steering.attribution import (
    ablation_effects,
    ablation_side_effects,
    attribution_vs_ablation,
    latent_attribution,
)
from tests.steering.conftest import HOOKS, tiny_sae


def _set() -> SteeringSet:
    prompts = ["Tom sees the dog", "On Monday the weather is sunny, so Anna feels", "The cat",
               "Three brown owls fly over the park and Mia is"]  # fmt: skip
    return SteeringSet("tiny", [], [EvalPrompt(p) for p in prompts], ["happy", "glad"],
                       ["sad", "angry"])  # fmt: skip


@pytest.fixture(scope="module")
def setup(tiny_model):
    torch.manual_seed(0)
    return tiny_model, _set(), HOOKS[0], tiny_sae(k=8)


def test_an_inactive_latent_changes_nothing(setup):
    """With the error term kept, ablating a latent that never fires is the clean pass."""
    model, s, hook, sae = setup
    attr, f = latent_attribution(model, s, hook, sae)
    dead = torch.nonzero(f.abs().amax((0, 1)) == 0).flatten()[:3].tolist()
    assert dead, "expected some latents silent on four prompts (k = 8 of 128)"
    assert ablation_effects(model, s, hook, sae, dead, f).abs().max() == 0.0
    assert attr[dead].abs().max() == 0.0
    # keeping every latent (scale 1) is the clean pass too
    live = torch.nonzero(f.abs().amax((0, 1)) > 0).flatten()[:3].tolist()
    assert ablation_effects(model, s, hook, sae, live, f, scale=1.0).abs().max() == 0.0


def test_attribution_is_the_first_order_ablation(setup):
    """Scaling latent j by (1 − ε) changes the metric by ε · attribution_j + O(ε²)."""
    model, s, hook, sae = setup
    attr, f = latent_attribution(model, s, hook, sae)
    top = attr.abs().topk(4).indices.tolist()
    eps = 1e-2
    small = ablation_effects(model, s, hook, sae, top, f, scale=1 - eps, batch_size=5) / eps
    assert small.numpy() == pytest.approx(attr[top].numpy(), rel=0.05, abs=1e-4)


def test_report_has_sample_and_correlations(setup):
    model, s, hook, sae = setup
    r = attribution_vs_ablation(model, s, hook, sae, n_top=5, n_random=5, seed=0)
    assert len(r["latents"]) == len(set(r["latents"])) == len(r["ablation"]) == 10
    assert -1 <= r["spearman"] <= 1 and -1 <= r["pearson"] <= 1
    again = attribution_vs_ablation(model, s, hook, sae, n_top=5, n_random=5, seed=0)
    assert again["latents"] == r["latents"] and again["ablation"] == r["ablation"]


def test_single_latent_ablation_costs_match_the_spliced_sae(setup, tiny_store):
    """ablation_side_effects against the closed form: splicing the SAE in with its error
    term kept and latent j's code set to 0 (x' = decode(f with f_j = 0) + x − decode(f))
    gives the same CE rise and KL; a latent silent on the windows costs exactly 0; KL is
    never negative; the top/random split gives its difference with an interval."""
    from stages.logits import ce_full, kl_divergence

    model, _, hook, sae = setup
    tokens = torch.as_tensor(tiny_store.windows("heldout", max_windows=2)).long()
    with torch.no_grad():
        clean, cache = model.run_with_cache(tokens, names_filter=[hook])
        f = sae.encode(cache[hook].float())
    f[:, 0] = 0
    fired = f.abs().amax((0, 1))
    live = torch.nonzero(fired > 0).flatten()[:4].tolist()
    dead = torch.nonzero(fired == 0).flatten()[:1].tolist()
    assert len(live) == 4 and dead
    r = ablation_side_effects(model, hook, sae, live + dead, tokens, n_top=2, n_boot=200)
    assert r["delta_ce"][-1] == 0.0 and r["kl"][-1] == 0.0  # the silent latent
    assert min(r["kl"]) >= 0.0 and max(r["kl"]) > 0.0
    j = live[0]

    def splice(act, hook):  # noqa: ARG001
        x = act.float()
        g = sae.encode(x)
        g0 = g.clone()
        g0[:, 1:, j] = 0.0
        return (sae.decode(g0) + x - sae.decode(g)).to(act.dtype)

    with torch.no_grad():
        lg = model.run_with_hooks(tokens, fwd_hooks=[(hook, splice)])
    want_ce = float(ce_full(lg[:, :-1], tokens[:, 1:]).mean()
                    - ce_full(clean[:, :-1], tokens[:, 1:]).mean())  # fmt: skip
    want_kl = float(kl_divergence(clean[:, :-1], lg[:, :-1]).mean())
    assert r["delta_ce"][0] == pytest.approx(want_ce, abs=1e-5)
    assert r["kl"][0] == pytest.approx(want_kl, rel=1e-3, abs=1e-8)
    lo, hi = r["kl_top_minus_random_ci95"]
    assert lo <= r["kl_top_minus_random"] <= hi
    assert r["kl_top_mean"] == pytest.approx(sum(r["kl"][:2]) / 2)
