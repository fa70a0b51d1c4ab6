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

`downstream_null` asks which of those changes the concept causes, rather than any push of
that size: every later latent's mean change under the vector is tested against its mean
changes under `n_random` random directions of the same norm. The statistic is z against
the null draws' mean and sd (per latent). A per-latent normal tail is anti-conservative
here (a latent's change under random pushes is heavy-tailed: measured on a tiny model,
held-out random directions "moved" 4–8 of 127 latents at FDR 0.05), and 32 draws give
an empirical p no lower than 1/33, which no correction over a thousand latents can use.
So the test is SAM's (Tusher, Tibshirani & Chu 2001, "Significance analysis of
microarrays", PNAS 98): d = (Δ − μ) / (sd + s₀), with the fudge constant s₀ the median sd
over the hook's tested latents (a latent that almost never moves cannot give an
unbounded d), and the null of d pooled over latents (an empirical null, as in SAM and
Efron 2004, JASA 99): every null draw's leave-one-out d against its own latent's other
draws, over every tested latent of every later hook. A latent's two-sided p is
(1 + #{|d_null| ≥ |d|}) / (1 + N), N = n_random × latents tested (floor 1/(N + 1)). The p-values are corrected by Benjamini–Hochberg (1995) over every
tested latent of every later hook. `n_control` further random directions, held out of
the null, go through the same test: the number of latents they "move significantly" is
what the test gives for a vector that carries no concept, the calibration check.

Beside it, the per-latent normal tail 2 Φ(−|Δ − μ| / sd), BH-corrected the same way
(`normal` in each hook's record): far more power, since a latent's own null is not
diluted by other latents' rare large moves, but calibrated only as far as the held-out
random directions' counts under the same test say. On the default toy models the
pooled test finds nothing (its null holds rare pushes of 2–3 that a random direction
gives some latent), while single latents move by 2.7 against a null of −0.07 ± 0.03:
report both, with the controls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from stages.activations import check_hooks, stop_layer
from stages.activations.hook_names import hook_layer
from stages.alignment.pvalues import p_floor
from stages.steering.apply import Positions, position_mask, steering_hook
from stages.steering.controls import random_directions

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

# where a hook sits inside its block, in forward order
_RANK = {"hook_resid_pre": 0, "hook_attn_out": 1, "hook_resid_mid": 2, "hook_pre": 3,
         "hook_post": 4, "hook_mlp_out": 5, "hook_resid_post": 6}  # fmt: skip


def hook_order(hook: str) -> tuple[int, int]:
    """(layer, position in the block) for sorting hooks in forward order."""
    layer = hook_layer(hook)
    return (-1 if layer is None else layer, _RANK.get(hook.split(".")[-1], 7))


def later_hooks(hook: str, hooks) -> list[str]:
    """The hooks at or after `hook` in forward order (e.g. those with an SAE)."""
    here = hook_order(hook)
    return sorted((h for h in hooks if hook_order(h) >= here), key=hook_order)


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
    later = later_hooks(hook, saes)
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


BH = "Benjamini–Hochberg (1995) false discovery rate, over every tested latent of every later hook"


@torch.no_grad()
def _mean_latents(model: HookedTransformer, tokens: Tensor, later: list[str], saes: dict,
                  stop: int | None, directions: Tensor | None, multiplier: float,
                  batch_size: int) -> dict[str, Tensor]:  # fmt: skip
    """hook -> [n_directions, d_sae] (float64): each later SAE's latents averaged over the
    windows' tokens (BOS excluded), with `multiplier` × each direction added at
    `directions`' hook at every position but BOS; [1, d_sae] clean when None. Rows of a
    batch are (direction, window) pairs."""
    at_hook, dirs = (None, None) if directions is None else directions
    n_dir = 1 if dirs is None else len(dirs)
    n_win, n_tok = len(tokens), tokens.shape[1]
    sums = {h: torch.zeros(n_dir, saes[h].d_sae, dtype=torch.float64) for h in later}
    pairs = [(i, w) for i in range(n_dir) for w in range(n_win)]
    for b0 in range(0, len(pairs), batch_size):
        chunk = pairs[b0 : b0 + batch_size]
        di = torch.tensor([i for i, _ in chunk])
        tok = tokens[torch.tensor([w for _, w in chunk])]
        got: dict[str, Tensor] = {}

        def grab(act: Tensor, hook, into=got) -> None:
            into[hook.name] = act[:, 1:].float()

        fwd = [(h, grab) for h in later]
        if dirs is not None:
            mask = position_mask((len(chunk), n_tok), "all")[..., None]
            rows = (multiplier * dirs[di]).to(torch.float32)[:, None, :]

            def push(act: Tensor, hook, mask=mask, rows=rows) -> Tensor:  # noqa: ARG001
                return act + mask.to(act.dtype) * rows.to(act.dtype)

            fwd = [(at_hook, push), *fwd]
        model.run_with_hooks(tok, fwd_hooks=fwd, stop_at_layer=stop)
        for h in later:
            f = saes[h].encode(got[h].reshape(-1, got[h].shape[-1])).double()
            f = f.reshape(len(chunk), n_tok - 1, -1).sum(1)
            sums[h].index_add_(0, di, f)
    return {h: v / (n_win * (n_tok - 1)) for h, v in sums.items()}


@torch.no_grad()
def downstream_null(
    model: HookedTransformer,
    hook: str,
    vector: Tensor,
    multiplier: float,
    tokens: Tensor,
    saes: dict[str, Any],
    *,
    n_random: int = 32,
    n_control: int = 4,
    seed: int = 0,
    alpha: float = 0.05,
    top_n: int = 10,
    batch_size: int = 128,
) -> dict[str, Any]:
    """Which later latents the vector moves beyond random directions of its norm (see the
    module docstring). Steering adds `multiplier` × the direction at every position but
    BOS; the vector and every random direction see the same windows."""
    check_hooks(model, [hook, *saes], "steering.downstream hooks")
    if n_random < 2:
        raise ValueError(f"n_random = {n_random}, expected an integer >= 2 (the null's spread)")
    later = later_hooks(hook, saes)
    out: dict[str, Any] = {"hook": hook, "multiplier": float(multiplier), "n_random": n_random,
                           "n_control": n_control, "alpha": alpha, "correction": BH,
                           "p_floor_per_latent": p_floor(n_random), "n_windows": len(tokens),
                           "hooks": {}}  # fmt: skip
    if not later:
        return out
    stop = stop_layer(model, later)
    v = vector.detach().double().flatten()
    dirs = torch.cat([v[None], random_directions(v.numel(), n_random + n_control, seed).double()
                      * v.norm()])  # fmt: skip
    clean = _mean_latents(model, tokens, later, saes, stop, None, multiplier, batch_size)
    steered = _mean_latents(model, tokens, later, saes, stop, (hook, dirs), multiplier,
                            batch_size)  # fmt: skip
    delta = {h: (steered[h] - clean[h]).numpy() for h in later}
    null = {h: d[1 : 1 + n_random] for h, d in delta.items()}
    mu = {h: x.mean(0) for h, x in null.items()}
    sd = {h: x.std(0, ddof=1) for h, x in null.items()}
    tested = {h: sd[h] > 0 for h in later}
    s0 = {h: float(np.median(sd[h][tested[h]])) if tested[h].any() else 1.0 for h in later}

    # the pooled empirical null: each draw's leave-one-out z against its latent's others
    n = n_random
    z_null = []
    for h in later:
        x = null[h][:, tested[h]]
        s1, s2 = x.sum(0), (x * x).sum(0)
        mu_o = (s1[None] - x) / (n - 1)
        var_o = (s2[None] - x * x - (n - 1) * mu_o * mu_o) / max(n - 2, 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            zo = (x - mu_o) / (np.sqrt(np.clip(var_o, 0, None)) + s0[h])
        z_null.append(np.abs(zo[np.isfinite(zo)]))
    pooled = np.sort(np.concatenate(z_null)) if z_null else np.zeros(0)
    out["p"] = (
        "SAM d = (change - null mean) / (null sd + s0), s0 = the hook's median null "
        "sd (Tusher et al. 2001); two-sided, against the pooled leave-one-out d of "
        "every null draw of every tested latent"
    )
    out["s0"] = s0
    out["n_null_z"] = int(pooled.size)
    out["p_floor"] = p_floor(int(pooled.size))

    def significant(row: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray],
                                       dict[str, np.ndarray]]:  # fmt: skip
        """z, p and BH-adjusted q of delta row `row`, per hook (NaN where untested)."""
        z = {h: np.where(tested[h], (delta[h][row] - mu[h]) / (sd[h] + s0[h]), np.nan)
             for h in later}  # fmt: skip
        p = {}
        for h in later:
            above = pooled.size - np.searchsorted(pooled, np.abs(np.nan_to_num(z[h])), "left")
            p[h] = np.where(tested[h], (1 + above) / (1 + pooled.size), np.nan)
        return z, p, bh(p)

    def normal(row: int) -> dict[str, np.ndarray]:
        """BH-adjusted q of the per-latent normal tail, 2 Φ(−|Δ − μ| / sd)."""
        p = {h: np.where(tested[h], 2 * stats.norm.sf(np.abs(delta[h][row] - mu[h])
                                                      / np.where(tested[h], sd[h], 1.0)), np.nan)
             for h in later}  # fmt: skip
        return bh(p)

    def bh(p: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        flat = np.concatenate([p[h][tested[h]] for h in later])
        qs = stats.false_discovery_control(flat, method="bh") if flat.size else flat
        q, at = {}, 0
        for h in later:
            q[h] = np.full(p[h].shape, np.nan)
            k = int(tested[h].sum())
            q[h][tested[h]] = qs[at : at + k]
            at += k
        return q

    z, p, q = significant(0)
    controls = [significant(1 + n_random + c)[2] for c in range(n_control)]
    q_norm = normal(0)
    controls_norm = [normal(1 + n_random + c) for c in range(n_control)]
    for h in later:
        d0 = delta[h][0]
        sig = np.nan_to_num(q[h], nan=1.0) < alpha
        sig_n = np.nan_to_num(q_norm[h], nan=1.0) < alpha
        dev = np.abs(null[h] - mu[h])
        emp = (1 + (dev >= np.abs(d0 - mu[h])[None]).sum(0)) / (1 + n_random)
        order = np.argsort(-np.nan_to_num(np.abs(z[h]), nan=-1.0))[:top_n]
        out["hooks"][h] = {
            "n_latents": int(d0.size), "n_tested": int(tested[h].sum()),
            "n_untested_moved": int(((~tested[h]) & (d0 != mu[h])).sum()),
            "s0": s0[h], "n_significant": int(sig.sum()), "n_up": int((sig & (d0 > mu[h])).sum()),
            "n_down": int((sig & (d0 < mu[h])).sum()),
            "control_n_significant": [int((np.nan_to_num(c[h], nan=1.0) < alpha).sum())
                                      for c in controls],
            # the per-latent normal tail: more power, calibrated only as far as the held-out
            # random directions' counts say
            "normal": {"n_significant": int(sig_n.sum()),
                       "n_up": int((sig_n & (d0 > mu[h])).sum()),
                       "n_down": int((sig_n & (d0 < mu[h])).sum()),
                       "control_n_significant": [int((np.nan_to_num(c[h], nan=1.0) < alpha)
                                                     .sum()) for c in controls_norm]},
            "top": [{"latent": int(j), "mean_change": float(d0[j]), "null_mean": float(mu[h][j]),
                     "null_sd": float(sd[h][j]), "z": float(z[h][j]), "p": float(p[h][j]),
                     "q": float(q[h][j]), "p_empirical": float(emp[j])}
                    for j in order if tested[h][j]],
        }  # fmt: skip
    return out
