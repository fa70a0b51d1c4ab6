"""`feature_circuit`: nodes by attribution with every SAE spliced in (error terms kept),
edges between adjacent hooks, and its random-latent controls."""

from __future__ import annotations

import math

import torch

from stages.steering import toy_sets
from stages.steering.attribution import latent_attribution, prompt_batch
from stages.steering.circuit import feature_circuit
from tests.steering.conftest import HOOKS, tiny_sae


def test_the_last_hooks_nodes_are_its_attribution_patching_alone(tiny_model):
    """Splicing every SAE with its error term kept leaves the forward pass clean, so the
    last hook's node attributions equal single-hook attribution patching there."""
    s = toy_sets(0, 16, 8)["mammal_vs_bird"]
    saes = {h: tiny_sae(seed=i) for i, h in enumerate(HOOKS)}
    c = feature_circuit(tiny_model, s, saes, n_nodes=4, n_random=6, n_draws=4)
    assert c["hooks"] == HOOKS and all(len(c["nodes"][h]) == 4 for h in HOOKS)
    alone, _ = latent_attribution(tiny_model, s, HOOKS[1], saes[HOOKS[1]])
    for node in c["nodes"][HOOKS[1]]:
        assert math.isclose(node["attribution"], float(alone[node["latent"]]), rel_tol=1e-3,
                            abs_tol=1e-6)  # fmt: skip
    # nodes ranked by |attribution|, and the largest is the largest of all latents
    a = [abs(n["attribution"]) for n in c["nodes"][HOOKS[1]]]
    assert a == sorted(a, reverse=True) and math.isclose(a[0], float(alone.abs().max()),
                                                         rel_tol=1e-3)  # fmt: skip
    # 4 upstream × 4 downstream edges, each naming adjacent hooks; the controls
    assert len(c["edges"]) == 16
    assert {(e["from_hook"], e["to_hook"]) for e in c["edges"]} == {(HOOKS[0], HOOKS[1])}
    ec = c["edge_control"]
    assert ec["n_random_edges"] == 6 * 4 and 0 <= ec["frac_circuit_above_random_p95"] <= 1
    ab = c["ablation"]
    assert len(ab["random_deltas"]) == 4 and math.isfinite(ab["circuit_delta"])


def test_an_edge_is_the_first_order_effect_of_its_upstream_latent(tiny_model):
    """e(u → d) against a finite difference: scaling f_u by (1 − ε) at the upstream hook
    changes d's contribution Σ (∂m/∂f_d) f_d by ε · e(u → d) to first order."""
    from stages.steering.circuit import _spliced_metric

    s = toy_sets(0, 16, 8)["mammal_vs_bird"]
    saes = {h: tiny_sae(seed=i) for i, h in enumerate(HOOKS)}
    c = feature_circuit(tiny_model, s, saes, n_nodes=3, n_random=2, n_draws=2)
    e = max(c["edges"], key=lambda e: abs(e["weight"]))
    u, d = e["from"], e["to"]
    m, f, live = _spliced_metric(tiny_model, s, saes, HOOKS)
    g_d = torch.autograd.grad(m, f[HOOKS[1]])[0][..., d].detach()
    n = len(s.eval_prompts)
    toks = prompt_batch(tiny_model, s)[0]

    def contribution(eps: float) -> float:
        def scale(act, hook):
            sae = saes[hook.name]
            x = act.float()
            fu = sae.encode(x)
            err = x - sae.decode(fu)
            fu[..., u] = fu[..., u] * (1 - eps * live)  # live positions, as the edge
            return sae.decode(fu) + err

        got = {}

        def grab(act, hook):
            got["f"] = saes[hook.name].encode(act.float())

        with torch.no_grad():
            tiny_model.run_with_hooks(toks, fwd_hooks=[(HOOKS[0], scale), (HOOKS[1], grab)])
        return float((g_d * got["f"][..., d] * live).sum()) / n

    eps = 1e-2
    fd = (contribution(eps) - contribution(0.0)) / eps
    assert math.isclose(fd, e["weight"], rel_tol=0.02, abs_tol=1e-5), (fd, e["weight"])
