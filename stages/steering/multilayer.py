"""Multi-layer steering: one concept's vectors added at several hooks at once.

Each steering hook h adds its own vector v_h at each eval prompt's last token, scaled so
that the norms added sum to the single-hook norm: at multiplier m, hook h adds
m · (‖v_best‖ / |H|) · v_h / ‖v_h‖, so Σ_h ‖added_h‖ = m · ‖v_best‖, what steering at the
best single hook adds (Turner et al. 2023, "Activation Addition", add at one layer;
here the same budget spread over |H| layers). The effect is the steerability (slope of
the behaviour metric over the multipliers, `evaluate.py`), compared with

- the best single hook's vector at its own norm, in the same batched pass, paired per
  prompt (the difference's 95 % t interval over prompts);
- `n_random` draws of independent random directions at the same hooks with the same
  per-hook norms: z, one-sided empirical p with its floor 1/(n + 1) (Phipson & Smyth
  2010), and the effect's 95 % t interval over prompts.

Only the last token is steered (`positions="last"`), so, as in `controls.last_token_grid`,
the prompts' prefixes run once into a key-value cache and each (direction, prompt,
multiplier) row runs one token with every hook adding its part.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from stages.activations import check_hooks
from stages.alignment.pvalues import p_floor
from stages.steering.controls import last_token_edit_grid, null_test, random_directions, t_interval
from stages.steering.evaluate import slope

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from stages.steering.prompts import SteeringSet


@torch.inference_mode()
def multi_hook_grid(
    model: HookedTransformer,
    s: SteeringSet,
    vectors: dict[str, Tensor],
    multipliers: Sequence[float],
    *,
    batch_size: int = 2048,
) -> Tensor:
    """Behaviour metric [n_vectors, n_prompts, n_multipliers] (float64): row i adds
    m · vectors[h][i] at every hook h at once, at each prompt's last token only.
    `vectors`: hook -> [n_vectors, d_model]. With one hook this is
    `controls.last_token_grid` (tests/steering/test_multilayer.py checks it)."""
    hooks = list(vectors)
    check_hooks(model, hooks, "steering.hooks")
    shapes = {tuple(v.shape) for v in vectors.values()}
    if (
        len(shapes) != 1
        or len(next(iter(shapes))) != 2
        or next(iter(shapes))[1] != model.cfg.d_model
    ):
        raise ValueError(f"multi_hook_grid: vectors {[tuple(v.shape) for v in vectors.values()]}, "
                         f"expected one [n, d_model = {model.cfg.d_model}] per hook")  # fmt: skip
    vecs = {h: v.float() for h, v in vectors.items()}

    def adder(h: str):
        def add(act: Tensor, vi: Tensor, mult: Tensor) -> Tensor:
            delta = mult[:, None] * vecs[h][vi]
            return act + delta[:, None, :].to(act.device, act.dtype)

        return add

    return last_token_edit_grid(model, s, hooks, next(iter(shapes))[0], multipliers,
                                {h: adder(h) for h in hooks}, batch_size=batch_size)  # fmt: skip


def split_weights(vectors: dict[str, Tensor], reference: str) -> dict[str, float]:
    """hook -> the factor w_h on v_h such that every hook adds ‖v_ref‖ / |H| and the
    norms added sum to ‖v_ref‖ (the single-hook norm)."""
    r = float(vectors[reference].norm())
    n = len(vectors)
    return {h: r / n / max(float(v.norm()), 1e-12) for h, v in vectors.items()}


def multilayer_steering(
    model: HookedTransformer,
    s: SteeringSet,
    vectors: dict[str, Tensor],
    best: str,
    multipliers: Sequence[float],
    *,
    n_random: int = 32,
    seed: int = 0,
) -> dict[str, Any]:
    """The concept's vectors at every hook at once (norm split, module doc) against the
    best single hook and against random directions at the same hooks and norms."""
    hooks = list(vectors)
    if len(hooks) < 2:
        return {"skipped": f"one steering hook ({hooks}): multi-layer steering needs two"}
    if best not in vectors:
        raise ValueError(f"multilayer_steering: best hook {best!r} not among {hooks}")
    w = split_weights(vectors, best)
    r_norm = float(vectors[best].norm())
    d = vectors[best].numel()
    # one pass: row 0 all hooks (split), row 1 the best hook alone (others 0), rows 2..
    # independent random unit directions per hook at the same per-hook norm
    U = random_directions(d, n_random * len(hooks), seed + 1).reshape(n_random, len(hooks), d)
    rows = {}
    for j, h in enumerate(hooks):
        v = vectors[h].float()
        single = v if h == best else torch.zeros_like(v)
        rows[h] = torch.cat([(w[h] * v)[None], single[None], U[:, j] * (r_norm / len(hooks))])
    grid = multi_hook_grid(model, s, rows, multipliers)
    x = torch.tensor(list(multipliers), dtype=torch.float64)
    per = slope(x, grid).numpy()  # [n_rows, n_prompts]
    null = slope(x, grid[2:].mean(1)).numpy()  # slope of each random draw's mean curve
    multi, single = float(per[0].mean()), float(per[1].mean())
    return {
        "hooks": hooks, "best_hook": best, "weights": w,
        "norm_per_hook": r_norm / len(hooks), "total_norm": r_norm,
        "n_random": n_random, "seed": seed + 1, "p_floor": p_floor(n_random),
        "p_sided": "one-sided: null >= effect",
        "multi": {"steerability": multi, "ci95": t_interval(per[0]), **null_test(multi, null)},
        "single": {"steerability": single, "ci95": t_interval(per[1])},
        "multi_minus_single": {"mean": float((per[0] - per[1]).mean()),
                               "ci95": t_interval(per[0] - per[1])},
        "null_slopes": null.tolist(),
        "method": "each hook adds m·‖v_best‖/|H| along its own vector at the last token; "
                  "null: independent random directions at the same hooks and norms",
    }  # fmt: skip


def multilayer_headline(ml: dict[str, Any] | None) -> dict[str, float]:
    """Flat metrics (`multilayer.*`) of `multilayer_steering`."""
    if not ml or "multi" not in ml:
        return {}
    m, sg, dl = ml["multi"], ml["single"], ml["multi_minus_single"]
    out = {"multilayer.steerability": m["steerability"], "multilayer.z": m["z"],
           "multilayer.p": m["p"], "multilayer.null_mean": m["null_mean"],
           "multilayer.null_sd": m["null_sd"], "multilayer.n_hooks": len(ml["hooks"]),
           "multilayer.single_steerability": sg["steerability"],
           "multilayer.minus_single": dl["mean"]}  # fmt: skip
    out["multilayer.ci95_lo"], out["multilayer.ci95_hi"] = m["ci95"]
    out["multilayer.minus_single_ci95_lo"], out["multilayer.minus_single_ci95_hi"] = dl["ci95"]
    return {k: float(v) for k, v in out.items() if v is not None and np.isfinite(v)}
