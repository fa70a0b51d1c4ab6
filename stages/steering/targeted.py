"""Feature-targeted steering: the vector rebuilt from its top SAE features, and the
vector with its off-target features removed, against the raw vector and a random
vector of the same norm.

With the non-negative decomposition v ≈ Σ_i c_i W_dec[i] (`decompose.nn_decompose`):
- `topk`:         Σ_{i ∈ top-k} c_i W_dec[i]  (only the k largest coefficients)
- `off_ablated`:  v − Σ_{i ∉ top-k} c_i W_dec[i]  (v minus what its other features add)
- `random`:       seeded Gaussian directions scaled to ‖v‖; `compare_vectors` averages
                  every metric over the `random*` entries (n_random seeds) into `random`.
                  The pipeline keeps one, as an example beside the others: the test of
                  every vector against ≥ 32 random directions is `controls.py`
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from stages.steering.decompose import Decomposition
from stages.steering.evaluate import side_effects, steerability

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from stages.steering.prompts import SteeringSet


def random_like(v: Tensor, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(v.shape, generator=g, dtype=torch.float64)
    return (r / r.norm() * v.double().norm()).float()


def targeted_vectors(v: Tensor, W_dec: Tensor, dec: Decomposition, k: int,
                     seed: int = 0, n_random: int = 1) -> dict[str, Tensor]:  # fmt: skip
    top = dec.top(k)
    off = [f for f in dec.features if f not in set(top)]
    return {
        "raw": v.float(),
        f"top{k}": dec.reconstruct(W_dec, top),
        f"off_ablated{k}": (v.double() - dec.reconstruct(W_dec, off).double()).float(),
        **({"random": random_like(v, seed)} if n_random == 1 else
           {f"random{i}": random_like(v, seed + i) for i in range(n_random)}),
    }  # fmt: skip


def compare_vectors(model: HookedTransformer, s: SteeringSet, hook: str,
                    vectors: dict[str, Tensor], multipliers, tokens: Tensor,
                    kl_multiplier: float, *, positions="last", side_positions="all",
                    batch_size: int = 64) -> dict[str, dict[str, Any]]:  # fmt: skip
    """Steerability and side effects of each named vector at one hook."""
    raw = vectors.get("raw")
    out = {}
    for name, vec in vectors.items():
        st = steerability(model, s, hook, vec, multipliers, positions=positions,
                          batch_size=batch_size)  # fmt: skip
        se = side_effects(model, hook, vec, kl_multiplier, tokens, positions=side_positions)
        cos = float(vec.double() @ raw.double() / (vec.double().norm() * raw.double().norm())
                    ) if raw is not None else float("nan")  # fmt: skip
        out[name] = {"slope": st.slope, "wrong_way_fraction": st.wrong_way_fraction,
                     "kl": se.kl, "ce_rise": se.ce_rise, "norm": float(vec.norm()),
                     "cos_to_raw": cos, "mean_metric": st.mean_metric}  # fmt: skip
    rand = [k for k in out if k.startswith("random") and k != "random"]
    if rand:  # several seeds: their mean under "random", the spread beside it
        keys = ("slope", "wrong_way_fraction", "kl", "ce_rise", "norm", "cos_to_raw")
        out["random"] = {k: sum(out[r][k] for r in rand) / len(rand) for k in keys}
        out["random"]["slopes"] = [out[r]["slope"] for r in rand]
        for r in rand:
            del out[r]
    return out
