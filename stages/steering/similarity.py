"""Does a latent's similarity to the steering vector predict its effect on the output?

Per latent j of the decomposition hook's SAE: the cosine of its decoder row with the
steering vector, against the change of the behaviour metric when j is ablated (zeroed at
every position but BOS, SAE error term kept; `attribution.py`). For every latent active
on the eval prompts the effect is attribution patching's first-order estimate; for the
sample `attribution_vs_ablation` ablated for real, the true ablation effect.

Statistic: Spearman's ρ between cosine and effect (signed: a latent along the vector
that carries the behaviour loses metric when ablated, so ρ < 0 is "similarity predicts
effect"; and |cosine| against |effect|: "similar latents matter more, either way"). Each
with a percentile bootstrap 95 % interval over latents (Efron & Tibshirani 1993) and a
permutation null (the cosines shuffled across latents): its mean, 2.5–97.5 % range and
the two-sided empirical p = (1 + #{|ρ_null| ≥ |ρ|}) / (1 + n) with its floor 1/(n + 1).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor

from stages.alignment.pvalues import p_floor
from stages.steering.attribution import latent_attribution

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from stages.steering.prompts import SteeringSet


def _pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson r of each row of a with the same row of b ([..., n])."""
    a = a - a.mean(-1, keepdims=True)
    b = b - b.mean(-1, keepdims=True)
    den = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (a * b).sum(-1) / den, np.nan)


def spearman_test(x: np.ndarray, y: np.ndarray, n_boot: int = 1000, n_perm: int = 1000,
                  seed: int = 0) -> dict[str, Any]:  # fmt: skip
    """Spearman ρ(x, y) (average ranks for ties), bootstrap 95 % interval, permutation
    null of shuffled x (module doc)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(x)
    nan = float("nan")
    if n < 3 or len(y) != n:
        return {"n": n, "spearman": nan, "ci95": [nan, nan], "null_mean": nan,
                "null_range95": [nan, nan], "p": nan, "p_floor": p_floor(n_perm)}  # fmt: skip
    rng = np.random.default_rng(seed)
    rx, ry = rankdata(x), rankdata(y)
    rho = float(_pearson_rows(rx, ry))
    idx = rng.integers(0, n, size=(n_boot, n))
    boot = _pearson_rows(rankdata(x[idx], axis=1), rankdata(y[idx], axis=1))
    boot = boot[np.isfinite(boot)]
    null = _pearson_rows(rng.permuted(np.broadcast_to(rx, (n_perm, n)), axis=1), ry)
    p = (1 + int(np.sum(np.abs(null) >= abs(rho) - 1e-12))) / (1 + n_perm) \
        if np.isfinite(rho) else nan  # fmt: skip
    return {"n": n, "spearman": rho,
            "ci95": [float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
            if boot.size else [nan, nan],
            "null_mean": float(null.mean()),
            "null_range95": [float(np.percentile(null, 2.5)), float(np.percentile(null, 97.5))],
            "p": p, "p_floor": p_floor(n_perm), "p_sided": "two-sided: |ρ_null| >= |ρ|",
            "n_boot": n_boot, "n_perm": n_perm}  # fmt: skip


def similarity_vs_effect(
    model: HookedTransformer,
    s: SteeringSet,
    hook: str,
    sae,
    vector: Tensor,
    ablation: dict[str, Any] | None = None,
    *,
    n_boot: int = 1000,
    n_perm: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Decoder cosine to `vector` against the ablation effect per latent (module doc):
    over every active latent by attribution, and over `ablation`'s sample (the record of
    `attribution.attribution_vs_ablation`) by true ablation."""
    W = sae.W_dec.detach().double()
    v = vector.detach().double()
    cos = (W @ v / (W.norm(dim=1).clamp_min(1e-12) * v.norm().clamp_min(1e-12))).numpy()
    attr, f = latent_attribution(model, s, hook, sae)
    active = torch.nonzero(f.abs().amax((0, 1)) > 0).flatten().numpy()
    a = attr.numpy()[active]
    out: dict[str, Any] = {"hook": hook, "n_latents": int(W.shape[0]),
                           "n_active": int(len(active)),
                           "expected_sign": "negative: ablating a latent along the vector "
                                            "lowers the metric"}  # fmt: skip
    out["attribution"] = {
        "signed": spearman_test(cos[active], a, n_boot, n_perm, seed),
        "absolute": spearman_test(np.abs(cos[active]), np.abs(a), n_boot, n_perm, seed + 1),
    }
    if ablation and ablation.get("latents"):
        lat = np.asarray(ablation["latents"], dtype=np.int64)
        e = np.asarray(ablation["ablation"], dtype=np.float64)
        out["ablation"] = {
            "signed": spearman_test(cos[lat], e, n_boot, n_perm, seed + 2),
            "absolute": spearman_test(np.abs(cos[lat]), np.abs(e), n_boot, n_perm, seed + 3),
            "sample": ablation.get("sample", ""),
        }
    return out


def similarity_headline(sv: dict[str, Any] | None) -> dict[str, float]:
    """Flat metrics (`similarity_vs_effect.<attribution|ablation>.<signed|absolute>.*`)."""
    out: dict[str, float] = {}
    for src in ("attribution", "ablation"):
        for kind in ("signed", "absolute"):
            r = ((sv or {}).get(src) or {}).get(kind)
            if not r:
                continue
            pre = f"similarity_vs_effect.{src}.{kind}"
            vals = {"spearman": r["spearman"], "ci95_lo": r["ci95"][0], "ci95_hi": r["ci95"][1],
                    "null_hi": r["null_range95"][1], "p": r["p"], "n": r["n"]}  # fmt: skip
            out.update({f"{pre}.{k}": float(x) for k, x in vals.items() if np.isfinite(x)})
    return out
