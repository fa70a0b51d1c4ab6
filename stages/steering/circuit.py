"""A sparse feature circuit per concept: which SAE latents carry the behaviour, layer by
layer, and which latents at one hook they depend on at the hook before.

After Marks et al. 2024 ("Sparse Feature Circuits"), simplified to a chain of hooks
h₁ < h₂ < … (each with an SAE, residual stream by default). Every SAE is spliced in at
once *with its error term kept*, x_h ← decode(f_h) + ε_h, ε_h = x_h − decode(f_h) held
fixed, f_h = encode(x_h) computed from the (spliced) stream: the forward pass is the
clean one, and a later hook's latents depend on an earlier hook's only through the
latents in between. The behaviour metric m is the steering set's log-odds at each eval
prompt's last token (`evaluate.behaviour_metric`), averaged over prompts.

- Node attribution (attribution patching of zero-ablation): a_{h,j} = mean over prompts
  of Σ_positions ∂m/∂f_{h,j} · (0 − f_{h,j}) (the total derivative, through every later
  hook). The circuit keeps the `n_nodes` latents with the largest |a| at each hook.
- Edge attribution between adjacent hooks (Marks et al.'s edge weight): for upstream u at
  h and downstream d at h', e(u → d) = mean over prompts of Σ_positions
  [∂/∂f_u Σ_positions (∂m/∂f_d) · f_d] · (0 − f_u): how much of d's contribution to m
  the ablation of u removes, to first order. One backward pass per downstream node.

Controls, computed the same way: edges from `n_random` random active latents at each
upstream hook into the same downstream nodes (does the circuit pick out the latents
that matter, or would any active latent do?), and true ablation, with error terms kept,
of the whole circuit (all its nodes at once) against `n_draws` draws of as many random
active latents per hook.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from stages.activations import check_hooks
from stages.steering.attribution import prompt_batch
from stages.steering.downstream import hook_order, later_hooks
from stages.steering.evaluate import behaviour_metric

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from stages.steering.prompts import SteeringSet


def _spliced_metric(model: HookedTransformer, s: SteeringSet, saes: dict[str, Any],
                    hooks: Sequence[str], zero: dict[str, Tensor] | None = None,
                    grad: bool = True) -> tuple[Tensor, dict[str, Tensor], Tensor]:  # fmt: skip
    """(m summed over prompts, hook -> latents f [n, L, d_sae] in the graph, live mask
    [n, L]) with every SAE spliced in, error terms kept. `zero`: hook -> bool [d_sae]
    latents set to 0 at every live position (true ablation)."""
    toks, lens, pos, neg = prompt_batch(model, s)
    n, length = toks.shape
    live = (torch.arange(length)[None] < lens[:, None]) & (torch.arange(length) > 0)
    keep = live[..., None]
    held: dict[str, Tensor] = {}

    def splice(act: Tensor, hook) -> Tensor:
        sae = saes[hook.name]
        x = act.float()
        f = sae.encode(x)
        err = (x - sae.decode(f)).detach()
        if zero is not None and hook.name in zero:
            f = f * ~(zero[hook.name][None, None] & keep)
        held[hook.name] = f
        return ((sae.decode(f) + err) * keep + x * ~keep).to(act.dtype)

    with torch.set_grad_enabled(grad):
        logits = model.run_with_hooks(toks, fwd_hooks=[(h, splice) for h in hooks])
        m = behaviour_metric(logits[torch.arange(n), lens - 1], pos, neg).sum()
    return m, held, live


def feature_circuit(
    model: HookedTransformer,
    s: SteeringSet,
    saes: dict[str, Any],
    *,
    start: str | None = None,
    n_nodes: int = 5,
    n_random: int = 8,
    n_draws: int = 8,
    seed: int = 0,
) -> dict[str, Any]:
    """The circuit over the hooks with an SAE at or after `start` (all of them when None),
    in forward order; see the module docstring. Needs two or more such hooks for edges."""
    hooks = later_hooks(start, saes) if start is not None else sorted(saes, key=hook_order)
    check_hooks(model, hooks, "circuit hooks")
    if not hooks:
        return {"skipped": "no SAE at or after the start hook"}
    n_prompts = len(s.eval_prompts)
    m, f, live = _spliced_metric(model, s, saes, hooks)
    fs = [f[h] for h in hooks]
    grads = torch.autograd.grad(m, fs, retain_graph=True)
    mask = live[..., None].float()
    nodes: dict[str, list[int]] = {}
    attr: dict[str, Tensor] = {}
    active: dict[str, Tensor] = {}
    for h, fh, gh in zip(hooks, fs, grads, strict=True):
        a = (gh * (0.0 - fh.detach()) * mask).sum((0, 1)).double() / n_prompts
        act = torch.nonzero((fh.detach() * mask).abs().amax((0, 1)) > 0).flatten()
        order = act[torch.argsort(a[act].abs(), descending=True)]
        nodes[h], attr[h], active[h] = [int(j) for j in order[:n_nodes]], a, act
    rng = np.random.default_rng(seed)
    random_up: dict[str, list[int]] = {}
    for h in hooks[:-1]:
        rest = [int(j) for j in active[h] if int(j) not in nodes[h]]
        random_up[h] = sorted(rng.choice(rest, size=min(n_random, len(rest)), replace=False)
                              .tolist()) if rest else []  # fmt: skip
    edges, random_edges = [], []
    for i, (up, down) in enumerate(zip(hooks[:-1], hooks[1:], strict=True)):
        g_down = grads[i + 1].detach()
        f_up = fs[i]
        for d in nodes[down]:
            contrib = (g_down[..., d] * fs[i + 1][..., d] * live).sum()
            (j_up,) = torch.autograd.grad(contrib, f_up, retain_graph=True)
            w = (j_up * (0.0 - f_up.detach()) * mask).sum((0, 1)).double() / n_prompts
            edges += [{"from_hook": up, "from": u, "to_hook": down, "to": d, "weight": float(w[u])}
                      for u in nodes[up]]  # fmt: skip
            random_edges += [float(w[u]) for u in random_up[up]]
    out: dict[str, Any] = {
        "hooks": hooks, "n_prompts": n_prompts,
        "nodes": {h: [{"latent": j, "attribution": float(attr[h][j])} for j in nodes[h]]
                  for h in hooks},
        "edges": edges,
        "method": "Marks et al. 2024 sparse feature circuits: every SAE spliced in with its "
                  "error term kept; node = attribution patching of zero-ablation, edge = "
                  "first-order effect of ablating the upstream latent on the downstream "
                  "latent's contribution to m; m = mean log-odds over eval prompts",
    }  # fmt: skip
    circuit_abs = [abs(e["weight"]) for e in edges]
    if circuit_abs and random_edges:
        rnd = np.abs(np.asarray(random_edges))
        out["edge_control"] = {
            "circuit_mean_abs": float(np.mean(circuit_abs)),
            "random_mean_abs": float(rnd.mean()), "random_p95_abs": float(np.quantile(rnd, 0.95)),
            "n_random_edges": int(rnd.size),
            "frac_circuit_above_random_p95": float(np.mean(np.asarray(circuit_abs)
                                                          > np.quantile(rnd, 0.95))),
            "what": f"edges from {n_random} random active latents per upstream hook into the "
                    "same downstream nodes",
        }  # fmt: skip
    out["ablation"] = _ablation_control(model, s, saes, hooks, nodes, active, n_draws, rng)
    return out


@torch.no_grad()
def _ablation_control(model, s, saes, hooks, nodes, active, n_draws: int,
                      rng: np.random.Generator) -> dict[str, Any]:  # fmt: skip
    """Δm of zero-ablating the whole circuit against as many random active latents per
    hook, `n_draws` times (error terms kept, every live position)."""
    n = len(s.eval_prompts)

    def ablated(chosen: dict[str, list[int]]) -> float:
        zero = {}
        for h in hooks:
            z = torch.zeros(saes[h].d_sae, dtype=torch.bool)
            z[chosen[h]] = True
            zero[h] = z
        return float(_spliced_metric(model, s, saes, hooks, zero, grad=False)[0]) / n

    clean = float(_spliced_metric(model, s, saes, hooks, grad=False)[0]) / n
    circuit = ablated(nodes) - clean
    draws = []
    for _ in range(n_draws):
        pick = {h: rng.choice(active[h].numpy(), size=min(len(nodes[h]), len(active[h])),
                              replace=False).tolist() for h in hooks}  # fmt: skip
        draws.append(ablated(pick) - clean)
    d = np.asarray(draws)
    sd = float(d.std(ddof=1)) if d.size > 1 else float("nan")
    return {"clean_metric": clean, "circuit_delta": circuit, "random_delta_mean": float(d.mean()),
            "random_delta_sd": sd, "random_deltas": d.tolist(), "n_draws": n_draws,
            "z": (circuit - float(d.mean())) / sd if sd and sd > 0 else float("nan")}  # fmt: skip
