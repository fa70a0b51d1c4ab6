"""Interventions beyond adding a vector: directional ablation, ablate+add, SAE-latent clamping.

- **Directional ablation** (Arditi et al. 2024, "Refusal in Language Models Is Mediated by
  a Single Direction"): x ← x − (x·v̂) v̂ at every position but BOS at one hook. Measured
  on the set's held-out contrastive pairs: the *contrast* of pair i is
  m(positive_i) − m(negative_i), m the behaviour metric (`evaluate.behaviour_metric`) at
  the prompt's last token. If the concept lives along v, ablating v removes the contrast:
  `retained` = mean ablated contrast / mean clean contrast (1 = nothing removed, 0 = both
  sides read the same, the neutral baseline). Against `n_random` random directions
  (Gaussian, uniform on the sphere; ablation only uses the unit direction): the effect is
  the drop 1 − retained, z and empirical p (one-sided, null ≥ effect, floor 1/(n + 1)),
  95 % t interval over pairs.
- **Ablate+add** (Arditi et al.: set the component along v̂ to m‖v‖): x ← x − (x·v̂) v̂ + m·v
  at the same positions, over `ablate_add_multipliers`; steerability = slope of the mean
  metric over both sides of the pairs against m, against random directions of ‖v‖ through
  the same operation. With m = 0 it is the ablation (`apply.steer`).
- **Clamping SAE latents** (Templeton et al. 2024, "Scaling Monosemanticity", feature
  steering by clamping; the error term kept as in Marks et al. 2024): with
  x = decode(f) + ε and ε held fixed, setting latents L to values c is
  x ← x + Σ_{j∈L} (c_j − f_j(x)) W_dec[j], exactly the clean x when c = f(x). The concept's
  top-k latents of the non-negative decomposition are clamped to α × their largest
  activation on the set's positive training prompts (signed by the decomposition's
  coefficient) at each eval prompt's last token (where adding the vector steers); the
  effect is the mean change of the metric against the clean pass at α = `clamp_at`, and
  KL(clean ‖ clamped) is measured on held-out windows with the clamp at every position but
  BOS. Equal side effect: the raw vector is added (last token for the metric, every
  position for KL, as steering does) at the multiplier whose KL equals the clamp's
  (`controls.kl_curves` + `crossing`, linear interpolation on its KL curve), and the
  paired difference clamp − add gets a 95 % t interval over prompts. The null: `n_random`
  draws of k random latents that fire on the positive prompts, clamped the same way at
  the same α (the KL of the first `n_kl_random` recorded beside): z, empirical p with its
  floor, interval over prompts.

All passes are batched: the clean residual at the hook is cached once and the edited
rows run the blocks after the hook only (`run_edits`); the clamp's behaviour rows run one
token each through the key-value-cache path (`controls.last_token_edit_grid`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from stages.activations import check_hooks
from stages.alignment.pvalues import p_floor
from stages.steering.apply import steer
from stages.steering.controls import (
    crossing,
    kl_curves,
    last_token_edit_grid,
    last_token_grid,
    null_test,
    random_directions,
    t_interval,
)
from stages.steering.evaluate import behaviour_metric, slope, target_masks
from stages.steering.prompts import EvalPrompt, SteeringSet
from stages.steering.vectors import pad_right, tokenize

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

_RESID = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")


def resid_start(hook: str) -> int | None:
    """The block a forward starts at to run everything after a residual hook (None for
    other hooks: they need the whole forward with the edit hooked in)."""
    m = _RESID.match(hook)
    return None if m is None else int(m[1]) + (1 if m[2] == "post" else 0)


def live_mask(tokens: Tensor, lens: Tensor | None = None) -> Tensor:
    """Bool [N, L]: every position but BOS (and, with `lens`, but right padding)."""
    n, L = tokens.shape
    ar = torch.arange(L)[None]
    m = ar > 0
    return (m & (ar < lens[:, None])) if lens is not None else m.expand(n, L)


@torch.inference_mode()
def run_edits(
    model: HookedTransformer,
    hook: str,
    tokens: Tensor,
    n_variants: int,
    edit: Callable[[Tensor, int], Tensor],
    reduce: Callable[[Tensor], Tensor],
    *,
    batch_size: int = 64,
    clean: tuple[Tensor, Tensor] | None = None,
    last: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(clean logits [N, L, V], reduce(edited logits [a, N, L, V]) stacked over variants).

    `edit(x0, i)` returns variant i's activation [N, L, d] from the clean one x0 at `hook`.
    At a residual hook only the blocks after it run; `batch_size` sequences per forward.
    `clean`: (clean logits, x0) of an earlier call on the same tokens (`clean_pass`).
    `last` [N]: only these positions are read: ln_final and the unembedding run on them
    alone, and `reduce` gets [a, N, V]."""
    check_hooks(model, [hook], "intervention hook")
    start = resid_start(hook)
    clean_lg, x0 = clean if clean is not None else clean_pass(model, hook, tokens)
    n = len(tokens)
    per = max(1, batch_size // n)
    outs = []
    for c0 in range(0, n_variants, per):
        vi = range(c0, min(c0 + per, n_variants))
        xs = torch.cat([edit(x0, i) for i in vi])  # [a·N, L, d]
        if start is not None and last is not None:
            r = model(xs, start_at_layer=start, stop_at_layer=model.cfg.n_layers)
            rows = torch.arange(len(r))
            lg = model.unembed(model.ln_final(r[rows, last.repeat(len(vi))][:, None]))[:, 0]
        else:
            if start is not None:
                lg = model(xs, start_at_layer=start)
            else:
                lg = model.run_with_hooks(tokens.repeat(len(vi), 1),
                                          fwd_hooks=[(hook, lambda a, hook, xs=xs: xs)])  # fmt: skip
            if last is not None:
                lg = lg[torch.arange(len(lg)), last.repeat(len(vi))]
        outs.append(reduce(lg.reshape(len(vi), n, *lg.shape[1:])))
    return clean_lg, torch.cat(outs)


@torch.inference_mode()
def clean_pass(model: HookedTransformer, hook: str, tokens: Tensor) -> tuple[Tensor, Tensor]:
    """(logits [N, L, V], the activation at `hook` [N, L, d]) of the clean forward."""
    held: dict[str, Tensor] = {}

    def grab(act: Tensor, hook) -> None:  # noqa: ARG001 - TL's signature
        held["x"] = act

    logits = model.run_with_hooks(tokens, fwd_hooks=[(hook, grab)])
    return logits, held["x"]


def _kl_reduce(clean: Tensor) -> Callable[[Tensor], Tensor]:
    """Mean KL(clean ‖ edited) per predicted token per variant, BOS's and the last
    position's predictions excluded (as `evaluate.side_effects`)."""
    lp = torch.log_softmax(clean[:, 1:-1].double(), -1)
    p = lp.exp()
    n_pred = lp.shape[0] * lp.shape[1]

    def reduce(lg: Tensor) -> Tensor:
        lq = torch.log_softmax(lg[:, :, 1:-1].double(), -1)
        return (p[None] * (lp[None] - lq)).sum((1, 2, 3)) / n_pred

    return reduce


# ---------------------------------------------------------------- directional ablation


def pair_prompts(s: SteeringSet) -> tuple[SteeringSet, int, str]:
    """The held-out pairs (else the training pairs) as a set of eval prompts: the P
    positives, then the P negatives, with the set's targets; P; which pairs."""
    pairs, which = (s.heldout_pairs, "heldout") if s.heldout_pairs else (s.train_pairs, "train")
    if not pairs:
        raise ValueError(f"steering set '{s.name}': no pairs to measure ablation on")
    texts = [p.positive for p in pairs] + [p.negative for p in pairs]
    ps = SteeringSet(s.name, [], [EvalPrompt(t) for t in texts], s.positive_targets,
                     s.negative_targets, s.target_prefix)  # fmt: skip
    return ps, len(pairs), which


@torch.inference_mode()
def directional_ablation(
    model: HookedTransformer,
    s: SteeringSet,
    hook: str,
    vector: Tensor,
    *,
    multipliers: Sequence[float] = (-1.0, 0.0, 1.0),
    n_random: int = 32,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, Any]:
    """Ablation and ablate+add of `vector` at `hook` against random directions of its
    norm (module docstring). `multipliers` (ablate+add) must include 0: the ablation."""
    mults = [float(m) for m in multipliers]
    if 0.0 not in mults or len(set(mults)) < 2:
        raise ValueError(f"ablate_add_multipliers = {mults}, expected at least two distinct "
                         "values including 0 (m = 0 is the ablation)")  # fmt: skip
    v = vector.detach().float()
    norm = float(v.norm())
    if not norm > 0:
        raise ValueError(f"directional_ablation: the vector at {hook} is zero")
    ps, P, which = pair_prompts(s)
    pos_m, neg_m = target_masks(model, ps)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    toks, lens = pad_right(tokenize(model, [e.prompt for e in ps.eval_prompts]), pad)
    mask = live_mask(toks, lens)
    dirs = torch.cat([v[None], random_directions(v.numel(), n_random, seed) * norm])
    k = len(mults)
    rows = torch.arange(len(toks))

    def edit(x0: Tensor, i: int) -> Tensor:
        return steer(x0, dirs[i // k], mults[i % k], mask, "ablate_add")

    def reduce(lg: Tensor) -> Tensor:  # [a, N, V] -> [a, N]
        return torch.stack([behaviour_metric(x, pos_m, neg_m) for x in lg])

    clean_lg, grid = run_edits(model, hook, toks, len(dirs) * k, edit, reduce,
                               batch_size=batch_size, last=lens - 1)  # fmt: skip
    m0 = behaviour_metric(clean_lg[rows, lens - 1], pos_m, neg_m)  # [2P]
    grid = grid.reshape(len(dirs), k, 2 * P).double()  # [dir, mult, prompt]
    c0 = (m0[:P] - m0[P:]).numpy()
    z = mults.index(0.0)
    c_abl = (grid[:, z, :P] - grid[:, z, P:]).numpy()  # [dir, P]
    mean_c0 = float(c0.mean())
    ok = abs(mean_c0) > 1e-9
    retained = c_abl.mean(1) / mean_c0 if ok else np.full(len(dirs), np.nan)
    drop = 1.0 - retained
    lo, hi = t_interval(c_abl[0] - c0)
    ci = sorted([1 + lo / mean_c0, 1 + hi / mean_c0]) if ok else [float("nan")] * 2
    x = torch.tensor(mults, dtype=torch.float64)
    slopes = slope(x, grid.permute(0, 2, 1))  # [dir, prompt]: per prompt over m
    mean_slopes = slopes.mean(1).numpy()
    retained_add = (grid[:, :, :P] - grid[:, :, P:]).mean(2).numpy() / mean_c0 if ok else None
    return {
        "hook": hook, "pairs": which, "n_pairs": P, "n_random": n_random, "seed": seed,
        "p_floor": p_floor(n_random), "vector_norm": norm, "positions": "all but BOS",
        "clean_contrast": mean_c0, "clean_contrast_ci95": t_interval(c0),
        "ablate": {
            "contrast": float(c_abl[0].mean()), "retained": float(retained[0]),
            "retained_ci95": ci, "drop": float(drop[0]),
            "mean_shift": float((grid[0, z] - m0).mean()),
            "null_retained": retained[1:].tolist(),
            **null_test(float(drop[0]), drop[1:]),
        },
        "ablate_add": {
            "multipliers": mults, "steerability": float(mean_slopes[0]),
            "ci95": t_interval(slopes[0].numpy()),
            "null_slopes": mean_slopes[1:].tolist(),
            "retained_by_multiplier": None if retained_add is None else retained_add[0].tolist(),
            **null_test(float(mean_slopes[0]), mean_slopes[1:]),
        },
        "method": "Arditi et al. 2024: x - (x.u)u (+ m v) at every position but BOS; contrast "
                  "= m(positive) - m(negative) over pairs; p one-sided (null >= effect)",
    }  # fmt: skip


# ---------------------------------------------------------------- clamping SAE latents


def clamp_delta(sae, x: Tensor, latents: Tensor, values: Tensor) -> Tensor:
    """x' − x when latents [..., k] are clamped to values [..., k] with the SAE error term
    kept: Σ_j (c_j − f_j(x)) W_dec[j]. Broadcasts over x [..., d]."""
    f = sae.encode(x.float())
    cur = f.gather(-1, latents.expand(*f.shape[:-1], latents.shape[-1]))
    W = sae.W_dec.detach().float()[latents]  # [..., k, d]
    return ((values - cur)[..., None] * W).sum(-2).to(x.dtype)


def clamp_edit(sae, sets: Tensor, base: Tensor) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """An edit for `controls.last_token_edit_grid`: row r clamps latents sets[v_r] [k] to
    m_r × base[v_r] [k] (v_r its variant, m_r its multiplier), error term kept."""

    def edit(act: Tensor, vi: Tensor, mult: Tensor) -> Tensor:
        L = sets[vi][:, None, :]  # [R, 1, k]
        return act + clamp_delta(sae, act, L, (mult[:, None] * base[vi])[:, None, :])

    return edit


@torch.inference_mode()
def latent_scales(model: HookedTransformer, s: SteeringSet, hook: str, sae,
                  batch_size: int = 64) -> Tensor:  # fmt: skip
    """[d_sae]: each latent's largest activation over the set's positive training prompts,
    every position but BOS."""
    texts = [p.positive for p in s.train_pairs]
    if not texts:
        raise ValueError(f"steering set '{s.name}': no training pairs for clamp scales")
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    toks, lens = pad_right(tokenize(model, texts), pad)
    m = _RESID.match(hook)  # run through the block that fires the hook (resid_pre L: L + 1)
    layer = None if m is None else int(m[1]) + 1
    out = torch.zeros(sae.d_sae)
    for b0 in range(0, len(toks), batch_size):
        t, ln = toks[b0 : b0 + batch_size], lens[b0 : b0 + batch_size]
        _, cache = model.run_with_cache(t, names_filter=[hook], stop_at_layer=layer)
        f = sae.encode(cache[hook].float()) * live_mask(t, ln)[..., None]
        out = torch.maximum(out, f.amax((0, 1)).float())
    return out


@torch.inference_mode()
def feature_clamping(
    model: HookedTransformer,
    s: SteeringSet,
    hook: str,
    sae,
    latents: Sequence[int],
    signs: Sequence[float],
    raw_vector: Tensor,
    kl_tokens: Tensor,
    *,
    multiples: Sequence[float] = (0.5, 1.0, 2.0, 4.0, 8.0),
    clamp_at: float = 1.0,
    add_multipliers: Sequence[float] = (1.0, 2.0, 4.0, 6.0, 8.0),
    n_random: int = 32,
    n_kl_random: int = 4,
    seed: int = 0,
    batch_size: int = 64,
) -> dict[str, Any]:
    """The clamp of `latents` at `clamp_at` × their scale against adding `raw_vector` at
    the multiplier giving the same KL, and against `n_random` draws of as many random
    active latents clamped at the same multiple (module docstring). `multiples` is the
    grid drawn in the figure (behaviour of every set, KL of the concept's)."""
    alphas = sorted({float(a) for a in multiples} | {float(clamp_at)})
    if len(alphas) < 2 or alphas[0] <= 0 or not math.isfinite(alphas[-1]):
        raise ValueError(f"clamp_multiples = {list(multiples)}, expected ≥ 2 distinct positive "
                         "values")  # fmt: skip
    lat = [int(j) for j in latents]
    k = len(lat)
    if k == 0:
        raise ValueError("feature_clamping: no latents to clamp")
    scales = latent_scales(model, s, hook, sae, batch_size)
    pool = [j for j in torch.nonzero(scales > 0).flatten().tolist() if j not in set(lat)]
    rng = np.random.default_rng(seed)
    draws = [sorted(rng.choice(pool, size=k, replace=False).tolist())
             for _ in range(n_random)] if len(pool) >= k else []  # fmt: skip
    sets = torch.tensor([lat, *draws], dtype=torch.long)  # [1 + n, k]
    sgn = torch.ones(len(sets), k)
    sgn[0] = torch.tensor([1.0 if float(x) >= 0 else -1.0 for x in signs])
    # a chosen latent that never fires on the positive prompts: clamp it to the median
    # scale of the ones that do (recorded), so that α still means something
    sc = scales.clone()
    fallback = [j for j in lat if not sc[j] > 0]
    if fallback:
        sc[fallback] = float(scales[scales > 0].median()) if (scales > 0).any() else 1.0
    base = sgn * sc[sets]  # [1 + n, k]: the value at α = 1
    # ---- behaviour at each eval prompt's last token, every (set, α); α = 0 is a clamp to
    # 0 (the latents ablated), not the clean pass
    # the concept's latents over the grid, the random sets at clamp_at only
    grid = last_token_edit_grid(model, s, hook, 1, [0.0, *alphas],
                                clamp_edit(sae, sets[:1], base[:1]))[0]  # fmt: skip
    clean = last_token_grid(model, s, hook, torch.zeros(1, model.cfg.d_model), [0.0])[0, :, 0]
    d_m = grid[:, 1:] - clean[:, None]  # [prompt, α]
    ai = alphas.index(float(clamp_at))
    e0 = d_m[:, ai].numpy()
    if draws:
        ng = last_token_edit_grid(model, s, hook, len(draws), [float(clamp_at)],
                                  clamp_edit(sae, sets[1:], base[1:]))[:, :, 0]  # fmt: skip
        null = (ng - clean[None]).mean(1).numpy()
    else:
        null = np.zeros(0)
    # ---- KL of the clamp at every position but BOS: the concept's over the grid, the
    # first `n_kl_random` random sets' at clamp_at
    mask = live_mask(kl_tokens)[..., None]
    cp = clean_pass(model, hook, kl_tokens)
    reduce = _kl_reduce(cp[0])
    n_kl = min(n_kl_random, len(draws))
    jobs = [(0, a) for a in alphas] + [(j, float(clamp_at)) for j in range(1, 1 + n_kl)]

    def edit(x0: Tensor, i: int) -> Tensor:
        j, a = jobs[i]
        return x0 + mask * clamp_delta(sae, x0, sets[j], a * base[j])

    kls = run_edits(model, hook, kl_tokens, len(jobs), edit, reduce, batch_size=batch_size,
                    clean=cp)[1].tolist()  # fmt: skip
    kl_curve, null_kl = kls[: len(alphas)], kls[len(alphas) :]
    target = kl_curve[ai]
    # ---- adding the raw vector (every position but BOS for KL, the last token for the
    # metric, as steering does) at the multiplier reaching the clamp's KL
    raw = raw_vector.detach().float()
    add_x = sorted({float(m) for m in add_multipliers if m > 0})
    while add_x[-1] < 64 * max(add_x[0], 1.0) and len(add_x) < 16:  # room to reach a big KL
        add_x.append(2 * add_x[-1])
    add_kl = kl_curves(model, hook, raw[None], add_x, kl_tokens, until=target,
                       batch_size=batch_size)[0].tolist()  # fmt: skip
    m_star = crossing([0.0, *add_x], [0.0, *add_kl], target)
    if math.isfinite(m_star):
        add_g = last_token_grid(model, s, hook, raw[None], [0.0, m_star])[0]
        add_e = (add_g[:, 1] - add_g[:, 0]).numpy()
    else:
        add_e = np.full(len(e0), np.nan)
    diff = e0 - add_e
    eff = float(e0.mean())
    return {
        "hook": hook, "latents": lat, "signs": sgn[0].tolist(), "k": k,
        "scales": [float(sc[j]) for j in lat], "scale_fallback": fallback,
        "scale_rule": "max activation over the positive training prompts, every position but "
                      "BOS; value = sign × multiple × scale",
        "clamp_at": float(clamp_at), "multiples": alphas, "kl_windows": int(len(kl_tokens)),
        "kl": target, "kl_curve": kl_curve, "effect": eff, "ci95": t_interval(e0),
        "effect_by_multiple": d_m.mean(0).tolist(),
        "ablated_effect": float((grid[:, 0] - clean).mean()),
        "add_equal_kl": {"multiplier": m_star, "effect": float(np.mean(add_e)),
                         "ci95": t_interval(add_e), "kl_multipliers": add_x,
                         "kl_curve": add_kl},
        "clamp_minus_add": {"effect": float(np.mean(diff)), "ci95": t_interval(diff)},
        "random": {"n": len(draws), "pool": len(pool), "null_effects": null.tolist(),
                   "null_kl": null_kl, "n_kl": n_kl},
        **null_test(eff, null),
        "method": "Templeton et al. 2024 clamping with the SAE error term kept (Marks et al. "
                  "2024); the raw vector added at the multiplier whose KL equals the clamp's "
                  "(linear interpolation on its KL curve); random latents at the same multiple; "
                  "p one-sided (null >= effect)",
    }  # fmt: skip
