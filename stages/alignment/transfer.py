"""Carry a steering vector from model A to model B through matched SAE features.

    v_A  ──decompose──►  c ∈ R₊^{m_A}  ──matches──►  c' ∈ R₊^{m_B}  ──W_dec(B)──►  v_B

1. Decompose A's vector into A's features with non-negative coefficients, either
   - `method="nnls"` (default): c = argmin_{c ≥ 0} ‖W_dec(A)ᵀ c − v‖ (scipy's NNLS over
     decoder rows) — a pure decomposition of the direction, no encoder bias involved;
   - `method="encode"`: c = sae_a.encode(v), the latents A's SAE gives the vector read as
     an activation (what the SAE "sees"; includes b_dec / b_enc / thresholds).
2. Optionally keep only the `k` largest coefficients.
3. Move each coefficient along its match (a → b); a B latent matched by several A
   latents (max matches) receives their sum. Use Hungarian matches for a one-to-one
   transfer; pass `min_score` to drop matches whose correlation is too weak to trust.
4. Rebuild with B's decoder rows: v_B = Σ_b c'_b W_dec(B)[b] (no b_dec: a direction).

Coefficients keep their scale: two SAEs of different models need not give matched
latents the same magnitude per unit of activation, so compare transferred vectors by
direction, or rescale the result to the norm that steers B as intended.

Self-contained on purpose (the steering stage has its own decomposition module).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from scipy.optimize import nnls
from torch import Tensor

from stages.alignment.matching import Matches
from stages.sae.base import BaseSAE


def decompose_vector(
    v: Tensor | np.ndarray, sae: BaseSAE, method: Literal["nnls", "encode"] = "nnls"
) -> np.ndarray:
    """Non-negative coefficients [d_sae] of `v` [d_in] on the SAE's features."""
    x = torch.as_tensor(np.asarray(v) if isinstance(v, np.ndarray) else v).detach().float()
    if x.shape != (sae.d_in,):
        raise ValueError(f"vector has shape {tuple(x.shape)}: expected ({sae.d_in},) (d_in)")
    if method == "nnls":
        w = sae.W_dec.detach().double().numpy()  # [d_sae, d_in]: columns of the NNLS system
        coef, _ = nnls(w.T, x.double().numpy())
        return coef
    if method == "encode":
        with torch.no_grad():
            return sae.encode(x[None])[0].double().numpy()
    raise ValueError(f"method = {method!r}, expected 'nnls' or 'encode'")


def transfer_vector(
    v_a: Tensor | np.ndarray,
    sae_a: BaseSAE,
    sae_b: BaseSAE,
    matches: Matches,
    k: int | None = None,
    *,
    method: Literal["nnls", "encode"] = "nnls",
    min_score: float | None = None,
) -> Tensor:
    """Model A's vector v_a [d_in(A)] carried into model B's space [d_in(B)] (float32)."""
    if (matches.n_a, matches.n_b) != (sae_a.d_sae, sae_b.d_sae):
        raise ValueError(
            f"matches are between {matches.n_a} and {matches.n_b} latents, the SAEs have "
            f"{sae_a.d_sae} and {sae_b.d_sae}: expected matches of these two SAEs"
        )
    coef = decompose_vector(v_a, sae_a, method)
    if k is not None:
        if k < 1:
            raise ValueError(f"k = {k}, expected an integer >= 1 (or None for all features)")
        top = np.argsort(coef, kind="stable")[::-1][:k]
        kept = np.zeros_like(coef)
        kept[top] = coef[top]
        coef = kept
    use = np.ones(len(matches.a_index), bool)
    if min_score is not None:
        use = matches.score >= min_score
    coef_b = np.zeros(sae_b.d_sae)
    np.add.at(coef_b, matches.b_index[use], coef[matches.a_index[use]])
    w_b = sae_b.W_dec.detach().double().numpy()
    return torch.from_numpy(coef_b @ w_b).float()
