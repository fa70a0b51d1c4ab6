"""Attribution patching against true ablation (stages/steering/attribution.py) on the
tiny model and a random TopK SAE: closed-form checks, seconds."""

from __future__ import annotations

import pytest
import torch

from stages.steering import EvalPrompt, SteeringSet
from stages.steering.attribution import (
    ablation_effects,
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
