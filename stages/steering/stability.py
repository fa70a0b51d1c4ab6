"""How stable is a steering vector over its prompt set and its read position?

- **Split halves** (the split-half reliability of a mean-difference direction, as in
  Tan et al. 2024, "Analyzing the Generalization and Reliability of Steering Vectors"):
  the training pairs are split into two random halves `n_splits` times; each half gives
  its own mean-difference vector and the cosine between the two is recorded. The null is
  the same statistic with shuffled labels: within each half, its 2·n/2 activations are
  relabelled at random, half "positive" and half "negative", so neither half's vector
  carries the concept; its cosines centre on 0. (Flipping each pair's sides instead
  keeps the shared direction up to a random sign: cosines near ±1, a useless null.) Reported: the mean cosine with the 2.5–97.5 % range over
  splits, the null's mean and range, and the one-sided empirical p of the mean cosine
  against the null draws with its floor 1/(n + 1) (Phipson & Smyth 2010).
- **Half-vectors' steering**: at the best hook, the first `n_effect_splits` splits' half
  vectors steer the eval prompts (held out from both halves); their steerability beside
  the full vector's, and each rescaled to the full vector's norm against the
  random-direction null the steering stage already drew at that norm (`controls.py`).
- **Read position**: the vector read `offset` tokens before each pair's own read
  position (offset 1, 2): cosine to the vector at every hook, and its steerability at
  the best hook (own norm, and at the full vector's norm against the same null). Pairs
  whose earlier position would be BOS are left out (counted); where the two sides are
  the same text up to that position the vector is zero: cosine NaN, hook listed in
  `same_text`, no steering.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from stages.alignment.pvalues import empirical_p, p_floor
from stages.steering.controls import last_token_grid, null_test, t_interval
from stages.steering.evaluate import slope
from stages.steering.vectors import mean_diff, read_activations, resolve_positions, tokenize

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from stages.steering.prompts import SteeringSet


def _cos(a: Tensor, b: Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0))


def split_half_cosines(
    pos: Tensor, neg: Tensor, n_splits: int = 20, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, list[tuple[np.ndarray, np.ndarray]]]:
    """(cosines [n_splits], null cosines [n_splits], the splits as (half A, half B) row
    indices) for paired activations pos, neg [n_pairs, d]: mean difference of half A vs
    of half B; the null shuffles the positive / negative labels among each half's rows
    first."""
    n = len(pos)
    if n < 4 or len(neg) != n:
        raise ValueError(f"split_half_cosines: {n} positive / {len(neg)} negative rows, "
                         "expected the same number, at least 4 pairs")  # fmt: skip
    if n_splits < 2:
        raise ValueError(f"split_half_cosines: n_splits = {n_splits}, expected ≥ 2")
    rng = np.random.default_rng(seed)
    P, N = pos.double().numpy(), neg.double().numpy()
    real, null, splits = np.empty(n_splits), np.empty(n_splits), []

    def shuffled(rows: np.ndarray) -> np.ndarray:
        # the half's 2·len(rows) activations, labels shuffled: a random half "positive"
        x = np.concatenate([P[rows], N[rows]])[rng.permutation(2 * len(rows))]
        return x[: len(rows)].mean(0) - x[len(rows) :].mean(0)

    for i in range(n_splits):
        perm = rng.permutation(n)
        a, b = np.sort(perm[: n // 2]), np.sort(perm[n // 2 : 2 * (n // 2)])
        splits.append((a, b))
        real[i] = _np_cos(P[a].mean(0) - N[a].mean(0), P[b].mean(0) - N[b].mean(0))
        null[i] = _np_cos(shuffled(a), shuffled(b))
    return real, null, splits


def _np_cos(a: np.ndarray, b: np.ndarray) -> float:
    den = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(a @ b / den) if den > 0 else float("nan")


def _range(x: np.ndarray) -> list[float]:
    return [float(np.percentile(x, 2.5)), float(np.percentile(x, 97.5))]


def split_half_summary(real: np.ndarray, null: np.ndarray) -> dict[str, Any]:
    m = float(real.mean())
    return {"n_splits": int(len(real)), "cosine_mean": m, "cosine_range95": _range(real),
            "null_mean": float(null.mean()), "null_range95": _range(null),
            "p": empirical_p(m, null), "p_floor": p_floor(len(null)),
            "p_sided": "one-sided: null cosine >= mean cosine",
            "cosines": real.tolist(), "null_cosines": null.tolist()}  # fmt: skip


def shifted_positions(model: HookedTransformer, prompts: Sequence[str],
                      read_positions: Sequence, offset: int) -> list[int | None]:  # fmt: skip
    """Each prompt's read index moved `offset` tokens earlier (None where that is BOS or
    the pair is read at the mean)."""
    seqs = tokenize(model, prompts)
    idx = resolve_positions(torch.tensor([len(q) for q in seqs]), read_positions, prompts)
    return [None if i == "mean" or int(i) - offset < 1 else int(i) - offset for i in idx]


def vector_stability(
    model: HookedTransformer,
    s: SteeringSet,
    vectors: dict[str, Tensor],
    best: str,
    multipliers: Sequence[float],
    null_slopes: Sequence[float] | None = None,
    *,
    n_splits: int = 20,
    n_effect_splits: int = 2,
    offsets: Sequence[int] = (1, 2),
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Split-half cosines per hook, half-vectors' and earlier-position vectors' steering at
    the best hook (module doc). `vectors` are the steering stage's mean-difference
    vectors; `null_slopes` the equal-norm random-direction slopes at `best`."""
    hooks = list(vectors)
    pairs = s.train_pairs
    pp, nn = [p.positive for p in pairs], [p.negative for p in pairs]
    rps = [p.read_position for p in pairs]
    acts = read_activations(model, pp + nn, hooks, rps + rps, batch_size)
    n = len(pairs)
    out: dict[str, Any] = {"n_pairs": n, "seed": seed, "split_half": {}, "positions": {}}
    splits = None
    for j, h in enumerate(hooks):
        real, null, sp = split_half_cosines(acts[h][:n], acts[h][n:], n_splits, seed + j)
        out["split_half"][h] = split_half_summary(real, null)
        if h == best:
            splits = sp
    # the vector read earlier: cosine at every hook
    pos_vecs: dict[int, Tensor] = {}
    for off in offsets:
        sp_ = shifted_positions(model, pp, rps, off)
        sn_ = shifted_positions(model, nn, rps, off)
        keep = [i for i in range(n) if sp_[i] is not None and sn_[i] is not None]
        if len(keep) < 2:
            out["positions"][str(off)] = {"skipped": "fewer than 2 pairs have that position",
                                          "n_pairs": len(keep)}  # fmt: skip
            continue
        a = read_activations(model, [pp[i] for i in keep] + [nn[i] for i in keep], hooks,
                             [sp_[i] for i in keep] + [sn_[i] for i in keep], batch_size)  # fmt: skip
        vs = {h: mean_diff(a[h][: len(keep)], a[h][len(keep) :]) for h in hooks}
        # a zero vector: the two sides are the same text up to there (no direction)
        flat = {h: float(vs[h].norm()) <= 1e-6 * float(vectors[h].norm()) for h in hooks}
        out["positions"][str(off)] = {
            "n_pairs": len(keep),
            "cosine": {h: float("nan") if flat[h] else _cos(vs[h], vectors[h]) for h in hooks},
            "norm_ratio": {h: float(vs[h].norm() / vectors[h].norm()) for h in hooks},
            "same_text": [h for h in hooks if flat[h]],
        }  # fmt: skip
        if not flat[best]:
            pos_vecs[off] = vs[best]
    # steering: full vector, half vectors, earlier-position vectors at the best hook
    v = vectors[best].float()
    r_norm = float(v.norm())
    dh = (acts[best][:n] - acts[best][n:]).double()
    halves = [dh[torch.as_tensor(x)].mean(0).float() for a_b in (splits or [])[:n_effect_splits]
              for x in a_b]  # fmt: skip
    cand = [v, *halves, *pos_vecs.values()]
    cand_eq = [c * (r_norm / max(float(c.norm()), 1e-12)) for c in cand]
    grid = last_token_grid(model, s, best, torch.stack(cand + cand_eq[1:]), multipliers)
    x = torch.tensor(list(multipliers), dtype=torch.float64)
    per = slope(x, grid).numpy()
    nc = len(cand)
    own, eq = per[:nc], np.concatenate([per[:1], per[nc:]])
    null = np.asarray(null_slopes if null_slopes is not None else [], dtype=np.float64)

    def entry(i: int) -> dict[str, Any]:
        e = {"steerability": float(own[i].mean()), "ci95": t_interval(own[i]),
             "norm": float(cand[i].norm()), "equal_norm": float(eq[i].mean())}  # fmt: skip
        if null.size >= 2:
            e.update({k: v for k, v in null_test(float(eq[i].mean()), null).items()
                      if k in ("z", "p", "p_floor", "null_mean", "null_sd")})  # fmt: skip
        return e

    eff: dict[str, Any] = {"hook": best, "full": entry(0)}
    nh = len(halves)
    eff["halves"] = [entry(1 + i) for i in range(nh)]
    if nh:
        hs = np.array([e["steerability"] for e in eff["halves"]])
        full = eff["full"]["steerability"]
        eff["half_steerability_mean"] = float(hs.mean())
        eff["half_over_full_min"] = float((hs / full).min()) if full else float("nan")
        eff["half_z_min"] = min((e.get("z", math.nan) for e in eff["halves"]), default=math.nan)
    for k, off in enumerate(pos_vecs):
        eff[f"position_minus_{off}"] = entry(1 + nh + k)
    out["effects"] = eff
    return out


def stability_headline(st: dict[str, Any] | None, best: str) -> dict[str, float]:
    """Flat metrics (`stability.*`) at the best hook."""
    if not st or best not in st.get("split_half", {}):
        return {}
    sh = st["split_half"][best]
    out: dict[str, Any] = {"stability.split_half_cosine": sh["cosine_mean"],
                           "stability.split_half_cosine_lo": sh["cosine_range95"][0],
                           "stability.split_half_cosine_hi": sh["cosine_range95"][1],
                           "stability.null_cosine_mean": sh["null_mean"],
                           "stability.null_cosine_hi": sh["null_range95"][1],
                           "stability.split_half_p": sh["p"],
                           "stability.n_splits": sh["n_splits"]}  # fmt: skip
    eff = st.get("effects", {})
    for key in ("half_steerability_mean", "half_over_full_min", "half_z_min"):
        if key in eff:
            out[f"stability.{key}"] = eff[key]
    for off, r in st.get("positions", {}).items():
        if "cosine" in r:
            out[f"stability.position_minus_{off}.cosine"] = r["cosine"][best]
        e = eff.get(f"position_minus_{off}")
        if e:
            out[f"stability.position_minus_{off}.steerability"] = e["steerability"]
            if "z" in e:
                out[f"stability.position_minus_{off}.z"] = e["z"]
    return {k: float(v) for k, v in out.items() if v is not None and math.isfinite(float(v))}
