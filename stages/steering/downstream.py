"""Downstream effects: steer at one hook, read every later hook through its SAE.

Clean and steered forward passes run on the same token windows; at each later hook
that has an SAE (and at the steered hook itself, after the vector is added) the
latents of both are compared per token (BOS excluded):

- mean_change[j]   = mean over tokens of f_steered[j] − f_clean[j]
- frac_affected[j] = fraction of tokens where |f_steered[j] − f_clean[j]| exceeds
  `rel_tol` × the latent's largest clean activation on these tokens (or, for a latent
  silent on clean text, where it fires at all)

`DownstreamResult.table` lists the top latents per hook by |mean change|; `matrix` is
[hooks × rank] (mean change of each hook's rank-r latent) with `latents` naming the
cell, ready for a heatmap.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from stages.activations import check_hooks, stop_layer
from stages.activations.hook_names import hook_layer
from stages.steering.apply import Positions, steering_hook

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

# where a hook sits inside its block, in forward order
_RANK = {"hook_resid_pre": 0, "hook_attn_out": 1, "hook_resid_mid": 2, "hook_pre": 3,
         "hook_post": 4, "hook_mlp_out": 5, "hook_resid_post": 6}  # fmt: skip


def hook_order(hook: str) -> tuple[int, int]:
    """(layer, position in the block) for sorting hooks in forward order."""
    layer = hook_layer(hook)
    return (-1 if layer is None else layer, _RANK.get(hook.split(".")[-1], 7))


@dataclass
class DownstreamResult:
    hook: str
    multiplier: float
    hooks: list[str]  # rows of the matrix, forward order
    table: list[dict[str, Any]]  # {hook, rank, latent, mean_change, frac_affected, mean_clean}
    matrix: list[list[float]]  # [hooks × top_n] mean change
    latents: list[list[int]]  # [hooks × top_n] latent id of each cell
    n_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


@torch.no_grad()
def downstream_effects(
    model: HookedTransformer,
    hook: str,
    vector: Tensor,
    multiplier: float,
    tokens: Tensor,
    saes: dict[str, Any],
    *,
    positions: Positions = "all",
    mode: str = "add",
    top_n: int = 10,
    rel_tol: float = 0.1,
    batch_size: int = 16,
) -> DownstreamResult:
    check_hooks(model, [hook, *saes], "steering.downstream hooks")
    here = hook_order(hook)
    later = sorted((h for h in saes if hook_order(h) >= here), key=hook_order)
    if not later:
        return DownstreamResult(hook, float(multiplier), [], [], [], [], 0)
    stop = stop_layer(model, later)
    sums = {h: torch.zeros(saes[h].d_sae, dtype=torch.float64) for h in later}
    clean_sum = {h: torch.zeros(saes[h].d_sae, dtype=torch.float64) for h in later}
    deltas: dict[str, list[Tensor]] = {h: [] for h in later}
    cleans: dict[str, list[Tensor]] = {h: [] for h in later}
    n = 0
    steer_fn = steering_hook(vector, multiplier, positions, mode)
    for b0 in range(0, len(tokens), batch_size):
        tok = tokens[b0 : b0 + batch_size]
        acts: dict[str, dict[str, Tensor]] = {"clean": {}, "steered": {}}
        for kind in ("clean", "steered"):

            def grab(act: Tensor, hook, into=acts[kind]) -> None:
                into[hook.name] = act[:, 1:].reshape(-1, act.shape[-1]).float()

            fwd = ([(hook, steer_fn)] if kind == "steered" else []) + [(h, grab) for h in later]
            model.run_with_hooks(tok, fwd_hooks=fwd, stop_at_layer=stop)
        for h in later:
            fc = saes[h].encode(acts["clean"][h])
            d = saes[h].encode(acts["steered"][h]) - fc
            sums[h] += d.double().sum(0)
            clean_sum[h] += fc.double().sum(0)
            deltas[h].append(d)
            cleans[h].append(fc)
        n += tok.shape[0] * (tok.shape[1] - 1)
    table, matrix, latents = [], [], []
    for h in later:
        mean = sums[h] / n
        d, fc = torch.cat(deltas[h]), torch.cat(cleans[h])
        scale = fc.max(0).values
        affected = torch.where(scale > 0, d.abs() > rel_tol * scale, d.abs() > 0)
        frac = affected.double().mean(0)
        top = mean.abs().topk(min(top_n, len(mean))).indices
        matrix.append([float(mean[j]) for j in top])
        latents.append([int(j) for j in top])
        for r, j in enumerate(top.tolist()):
            table.append({"hook": h, "rank": r, "latent": j, "mean_change": float(mean[j]),
                          "frac_affected": float(frac[j]),
                          "mean_clean": float(clean_sum[h][j] / n)})  # fmt: skip
    return DownstreamResult(hook, float(multiplier), later, table, matrix, latents, n)
