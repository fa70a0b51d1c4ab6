"""Random-direction controls for every steering effect, at equal norm and at equal KL.

A steering effect means little without the spread of the same measurement for vectors
that carry no concept. For a vector v at a hook this module measures, in one batched
pass, v and `n_random` seeded random directions (Gaussian, so uniform on the sphere):

- **equal norm**: every direction scaled to a reference norm (the raw vector's), and
  the effect is the steerability (slope of the behaviour metric over the multipliers,
  `evaluate.py`). A targeted variant's slope at its own norm is reported beside it,
  with its interval, untested (its norm is smaller: the equal-norm test is the fair one).
- **equal side effect**: the multiplier m* at which the KL(clean ‖ steered) on neutral
  text reaches a fixed target (the raw vector's KL at `equal_kl_at`), found by linear
  interpolation on the positive multiplier grid, and the effect is the mean change of
  the behaviour metric at m* against m = 0 (interpolated on the metric grid). "Targeted
  steers with fewer side effects" is then a test: more behaviour for the same KL.

Each effect gets z against the null draws (mean, sd with ddof 1), the one-sided empirical
p = (1 + #{null ≥ effect}) / (1 + n) with its floor 1/(1 + n) (Phipson & Smyth 2010,
`stages.alignment.pvalues`), and a 95 % t interval over prompts (the slope of the mean
curve is the mean of the per-prompt slopes).

Cost. With steering at each prompt's last token only (`positions="last"`, the default)
the positions before it are the same in every row, so the prompts' prefixes run once
with a key-value cache and each (direction, prompt, multiplier) row runs one token
(`last_token_grid`). The KL curves run the blocks after the hook only, from the clean
residual cached at the hook, on `kl_windows` held-out windows.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from stages.activations import check_hooks
from stages.alignment.pvalues import empirical_p, normal_tail, p_floor
from stages.steering.apply import position_mask
from stages.steering.evaluate import behaviour_metric, metric_grid, slope, target_masks
from stages.steering.vectors import tokenize

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from stages.steering.prompts import SteeringSet


def random_directions(d: int, n: int, seed: int = 0) -> Tensor:
    """[n, d] seeded unit vectors, uniform on the sphere (normalised Gaussians)."""
    if n < 2:
        raise ValueError(f"n_random = {n}, expected an integer >= 2 (the null's spread)")
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n, d, generator=g, dtype=torch.float64)
    return (r / r.norm(dim=1, keepdim=True)).float()


@torch.inference_mode()
def last_token_grid(
    model: HookedTransformer,
    s: SteeringSet,
    hook: str,
    vectors: Tensor,
    multipliers: Sequence[float],
    *,
    batch_size: int = 2048,
) -> Tensor:
    """Behaviour metric [n_vectors, n_prompts, n_multipliers] (float64), each vector
    added at each prompt's last token only. Equals `metric_grid(..., positions="last")`
    per vector (tests/steering/test_controls.py checks it), at a fraction of its cost:
    the prompts' prefixes run once into a key-value cache and every row runs one token.
    """
    if vectors.ndim != 2 or vectors.shape[1] != model.cfg.d_model:
        raise ValueError(f"vectors: expected [n, d_model = {model.cfg.d_model}], got "
                         f"{tuple(vectors.shape)}")  # fmt: skip
    vecs = vectors.float()

    def add(act: Tensor, vi: Tensor, mult: Tensor) -> Tensor:
        return act + (mult[:, None] * vecs[vi])[:, None, :].to(act.device, act.dtype)

    return last_token_edit_grid(model, s, hook, len(vecs), multipliers, add,
                                batch_size=batch_size)  # fmt: skip


@torch.inference_mode()
def last_token_edit_grid(
    model: HookedTransformer,
    s: SteeringSet,
    hook: str | Sequence[str],
    n_variants: int,
    multipliers: Sequence[float],
    edit,
    *,
    batch_size: int = 2048,
) -> Tensor:
    """Behaviour metric [n_variants, n_prompts, n_multipliers] (float64) with
    `edit(act [R, 1, d], variant [R], multiplier [R]) -> act` applied at `hook` at each
    prompt's last token only (the key-value-cache path of `last_token_grid`: adding a
    vector is one edit, clamping SAE latents another, `interventions.py`). Several hooks
    at once: `hook` a list and `edit` a dict hook -> edit (`multilayer.multi_hook_grid`)."""
    from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache
    from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry

    hooks = [hook] if isinstance(hook, str) else list(hook)
    edits = edit if isinstance(edit, dict) else {h: edit for h in hooks}
    check_hooks(model, hooks, "steering.hook" if isinstance(hook, str) else "steering.hooks")
    pos_mask, neg_mask = target_masks(model, s)
    seqs = tokenize(model, [e.prompt for e in s.eval_prompts])
    n_v, k = n_variants, len(multipliers)
    out = torch.empty(n_v, len(seqs), k, dtype=torch.float64)
    mults = torch.tensor(list(multipliers), dtype=torch.float32)
    state: dict[str, Tensor] = {}

    def add(act: Tensor, hook) -> Tensor:
        return edits[hook.name](act, state["vec"], state["mult"])

    by_len: dict[int, list[int]] = {}
    for i, sq in enumerate(seqs):
        if len(sq) < 2:
            raise ValueError(f"steering set '{s.name}': eval prompt {i} has no token after "
                             "BOS to steer")  # fmt: skip
        by_len.setdefault(len(sq), []).append(i)
    for length, idx in sorted(by_len.items()):
        toks = torch.tensor([seqs[i] for i in idx], dtype=torch.long)
        g = len(idx)
        cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, g)
        model(toks[:, :-1], past_kv_cache=cache, attention_mask=torch.ones(g, length - 1,
              dtype=torch.long))  # fmt: skip
        # row r = (prompt r // (n_v k), vector (r // k) % n_v, multiplier r % k)
        n_rows = g * n_v * k
        for r0 in range(0, n_rows, batch_size):
            r = torch.arange(r0, min(r0 + batch_size, n_rows))
            p, vi, mi = r // (n_v * k), (r // k) % n_v, r % k
            rows = TransformerLensKeyValueCache(
                entries=[TransformerLensKeyValueCacheEntry(e.past_keys[p], e.past_values[p],
                                                           frozen=True)
                         for e in cache.entries],
                previous_attention_mask=cache.previous_attention_mask[p], frozen=True,
            )  # fmt: skip
            state["vec"], state["mult"] = vi, mults[mi]
            with model.hooks(fwd_hooks=[(h, add) for h in hooks]):
                logits = model(toks[p, -1:], past_kv_cache=rows,
                               attention_mask=torch.ones(len(r), 1, dtype=torch.long))[:, -1]  # fmt: skip
            pi = torch.tensor(idx)[p]
            out[vi, pi, mi] = behaviour_metric(logits, pos_mask[pi], neg_mask[pi])
    return out


def metric_grids(model, s, hook, vectors: Tensor, multipliers, *, positions="last",
                 batch_size: int = 64) -> Tensor:  # fmt: skip
    """[n_vectors, n_prompts, n_multipliers]: the fast path for `positions="last"`, else
    `metric_grid` per vector."""
    if positions == "last":
        return last_token_grid(model, s, hook, vectors, multipliers)
    return torch.stack([metric_grid(model, s, hook, v, multipliers, positions=positions,
                                    batch_size=batch_size) for v in vectors])  # fmt: skip


_RESID = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


@torch.inference_mode()
def kl_curves(
    model: HookedTransformer,
    hook: str,
    vectors: Tensor,
    multipliers: Sequence[float],
    tokens: Tensor,
    *,
    positions="all",
    until: float | None = None,
    batch_size: int = 64,
) -> Tensor:
    """Mean KL(clean ‖ steered) per predicted token [n_vectors, n_multipliers] on windows
    [N, L] (BOS first; predictions from BOS and of the last position excluded, as in
    `evaluate.side_effects`), multipliers in the order given.

    At a residual-stream hook only the blocks after it run, on the clean residual cached
    there, all vectors of a multiplier in one batch of up to `batch_size` sequences.
    `until`: a vector whose KL has reached it is not run at later multipliers (NaN there);
    a search for the multiplier reaching a KL needs no more.
    """
    check_hooks(model, [hook], "steering.hook")
    if tokens.ndim != 2 or tokens.shape[1] < 3:
        raise ValueError(f"tokens: expected LongTensor [n, seq ≥ 3], got {tuple(tokens.shape)}")
    m = _RESID.match(hook)
    start = None if m is None else int(m[1]) + (1 if m[2] == "post" else 0)
    n_v, k = len(vectors), len(multipliers)
    out = torch.full((n_v, k), float("nan"), dtype=torch.float64)
    resid: dict[str, Tensor] = {}

    def grab(act: Tensor, hook) -> None:  # noqa: ARG001
        resid["x"] = act

    lp = torch.log_softmax(model.run_with_hooks(tokens, fwd_hooks=[(hook, grab)])[:, 1:-1]
                           .double(), -1)  # fmt: skip
    x0 = resid["x"]
    mask = position_mask(tuple(tokens.shape), positions)[..., None].float()
    n, n_pred = len(tokens), lp.shape[0] * lp.shape[1]
    active = list(range(n_v))
    per = max(1, batch_size // n)  # vectors per forward
    for mi, mult in enumerate(multipliers):
        for c0 in range(0, len(active), per):
            vi = torch.tensor(active[c0 : c0 + per])
            # [a, n, L, d]: each vector at every steered position of every window
            delta = (float(mult) * vectors[vi].float()[:, None, None, :] * mask[None]).to(x0.device)
            if start is not None:
                xs = (x0[None] + delta).reshape(-1, *x0.shape[1:])
                steered = model(xs, start_at_layer=start)
            else:
                d = delta.reshape(-1, *delta.shape[2:])
                steered = model.run_with_hooks(
                    tokens.repeat(len(vi), 1),
                    fwd_hooks=[(hook, lambda a, hook, d=d: a + d)])  # fmt: skip
            lq = torch.log_softmax(steered[:, 1:-1].double(), -1).reshape(len(vi), *lp.shape)
            out[vi, mi] = (lp.exp()[None] * (lp[None] - lq)).sum((1, 2, 3)) / n_pred
        if until is not None:
            active = [i for i in active if not out[i, mi] >= until]
            if not active:
                break
    return out


# ---------------------------------------------------------------------------- statistics


def t_interval(x: Sequence[float] | np.ndarray, level: float = 0.95) -> list[float]:
    """Student-t interval of the mean of x (NaN with fewer than two finite values)."""
    a = np.asarray(x, dtype=np.float64)
    a = a[np.isfinite(a)]
    if a.size < 2:
        return [float("nan"), float("nan")]
    half = stats.t.ppf(0.5 + level / 2, a.size - 1) * a.std(ddof=1) / math.sqrt(a.size)
    return [float(a.mean() - half), float(a.mean() + half)]


def null_test(effect: float, null: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """Effect against its random-direction null: z, one-sided empirical p with its floor,
    normal tail. NaN null draws (a direction that never reaches the KL target) are left
    out and counted in `n_unreached`."""
    a = np.asarray(null, dtype=np.float64)
    ok = a[np.isfinite(a)]
    if not math.isfinite(effect) or ok.size < 2:
        nan = float("nan")
        return {"null_mean": nan, "null_sd": nan, "n_null": int(ok.size), "z": nan,
                "p": nan, "p_floor": p_floor(int(ok.size)), "p_normal": nan,
                "n_unreached": int(a.size - ok.size)}  # fmt: skip
    z, pn = normal_tail(effect, ok)
    return {"null_mean": float(ok.mean()), "null_sd": float(ok.std(ddof=1)),
            "n_null": int(ok.size), "z": z, "p": empirical_p(effect, ok),
            "p_floor": p_floor(int(ok.size)), "p_normal": pn,
            "n_unreached": int(a.size - ok.size)}  # fmt: skip


def crossing(x: Sequence[float], y: Sequence[float], target: float) -> float:
    """The first x where the piecewise-linear y(x) reaches `target` (x, y from x = 0 up,
    y[0] below target); NaN if it never does."""
    for i in range(1, len(x)):
        if y[i] >= target:
            y0, y1 = y[i - 1], y[i]
            f = 1.0 if y1 == y0 else (target - y0) / (y1 - y0)
            return float(x[i - 1] + f * (x[i] - x[i - 1]))
    return float("nan")


def effect_at(grid: Tensor, multipliers: Sequence[float], m: float) -> np.ndarray:
    """Per prompt: metric(m) − metric(0), linear interpolation on the metric grid
    [n_prompts, n_multipliers] (NaN where m is NaN)."""
    g = grid.double().numpy()
    xs = np.asarray(multipliers, dtype=np.float64)
    order = np.argsort(xs)
    xs, g = xs[order], g[:, order]
    if not math.isfinite(m):
        return np.full(len(g), np.nan)
    at = np.array([np.interp(m, xs, row) for row in g])
    zero = np.array([np.interp(0.0, xs, row) for row in g])
    return at - zero


def _slope_summary(grid: Tensor, x: Tensor) -> tuple[float, list[float]]:
    per = slope(x, grid).numpy()
    return float(per.mean()), t_interval(per)


def controlled_effects(
    model: HookedTransformer,
    s: SteeringSet,
    hook: str,
    vectors: dict[str, Tensor],
    multipliers: Sequence[float],
    kl_tokens: Tensor | None = None,
    *,
    n_random: int = 32,
    seed: int = 0,
    equal_kl_at: float = 1.0,
    positions="last",
    side_positions="all",
    batch_size: int = 64,
) -> dict[str, Any]:
    """Every named vector at `hook` against `n_random` random directions (see module doc).

    `vectors` must contain "raw" (the reference norm and the KL target). Without
    `kl_tokens` the equal-KL comparison is skipped.
    """
    if "raw" not in vectors:
        raise ValueError(f"controlled_effects: vectors {list(vectors)}, expected a 'raw' entry")
    names = list(vectors)
    raw = vectors["raw"].detach().float()
    r_norm = float(raw.norm())
    if not r_norm > 0:
        raise ValueError("controlled_effects: the raw vector is zero")
    U = random_directions(raw.numel(), n_random, seed)
    own = torch.stack([vectors[n].detach().float() for n in names])
    norms = own.norm(dim=1)
    at_raw = own * (r_norm / norms.clamp_min(1e-12))[:, None]
    others = [i for i, n in enumerate(names) if n != "raw"]
    # one batch: the vectors at their own norms, the others rescaled to ‖raw‖, the null
    parts = [own, at_raw[others], U * r_norm]
    grids = metric_grids(model, s, hook, torch.cat(parts), multipliers, positions=positions,
                         batch_size=batch_size)  # fmt: skip
    x = torch.tensor(list(multipliers), dtype=torch.float64)
    nv, no = len(names), len(others)
    g_own, g_eq = grids[:nv], grids[nv : nv + no]
    g_null_raw = grids[nv + no : nv + no + n_random]
    null_raw = slope(x, g_null_raw.mean(1)).numpy()
    out: dict[str, Any] = {"hook": hook, "n_random": n_random, "seed": seed,
                           "reference_norm": r_norm, "p_floor": p_floor(n_random),
                           "p_sided": "one-sided: null >= effect",
                           "null_equal_norm_slopes": null_raw.tolist(), "vectors": {}}  # fmt: skip
    for i, n in enumerate(names):
        eff, ci = _slope_summary(g_own[i], x)
        entry: dict[str, Any] = {"norm": float(norms[i]),
                                 "own_norm": {"steerability": eff, "ci95": ci}}  # fmt: skip
        ge = g_own[i] if n == "raw" else g_eq[others.index(i)]
        eff_e, ci_e = _slope_summary(ge, x)
        entry["equal_norm"] = {"steerability": eff_e, "ci95": ci_e, **null_test(eff_e, null_raw)}
        out["vectors"][n] = entry
    if kl_tokens is None:
        return out
    # ---- equal KL: KL curves on the positive multipliers, all at ‖raw‖
    pos = sorted(float(m) for m in multipliers if m > 0)
    if not pos:
        raise ValueError(f"multipliers {list(multipliers)}: expected positive values")
    kl_vecs = torch.cat([at_raw, U * r_norm])
    ri = names.index("raw")
    target = float(kl_curves(model, hook, at_raw[ri : ri + 1], [equal_kl_at], kl_tokens,
                             positions=side_positions)[0, 0])  # fmt: skip
    kl = torch.cat([torch.full((len(kl_vecs), 1), target, dtype=torch.float64),
                    kl_curves(model, hook, kl_vecs, pos, kl_tokens, positions=side_positions,
                              until=target)], dim=1)  # fmt: skip
    xs = [0.0, *pos]
    g_all = torch.cat([torch.stack([g_own[i] if n == "raw" else g_eq[others.index(i)]
                                    for i, n in enumerate(names)]), g_null_raw])  # fmt: skip
    m_star = [crossing(xs, [0.0, *kl[j, 1:].tolist()], target) for j in range(len(kl_vecs))]
    effects = [effect_at(g_all[j], multipliers, m_star[j]) for j in range(len(kl_vecs))]
    null_eff = np.array([float(np.mean(e)) if math.isfinite(m_star[nv + j]) else np.nan
                         for j, e in enumerate(effects[nv:])])  # fmt: skip
    out["equal_kl"] = {"target_kl": target, "at_raw_multiplier": equal_kl_at,
                       "kl_windows": int(len(kl_tokens)), "kl_multipliers": pos,
                       "null_multiplier": [m_star[nv + j] for j in range(n_random)],
                       "null_effects": null_eff.tolist()}  # fmt: skip
    for i, n in enumerate(names):
        e = effects[i]
        eff = float(np.mean(e)) if math.isfinite(m_star[i]) else float("nan")
        out["vectors"][n]["equal_kl"] = {
            "multiplier": m_star[i], "multiplier_own_norm": m_star[i] * r_norm / float(norms[i]),
            "effect": eff, "ci95": t_interval(e), "kl_curve": kl[i, 1:].tolist(),
            **null_test(eff, null_eff)}  # fmt: skip
    return out
