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

`evaluate_transfer` then asks whether the carried vector steers B: against B's own
vector and a null of random directions, all at the own vector's norm (`TransferTest`:
empirical p with its floor 1/(n_random + 1), z and its normal tail). `transfer_steering`
runs it for every concept × hook of a pair and Holm-corrects that family
(`correct_transfer`).

The decomposition is self-contained on purpose (the steering stage has its own).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from scipy.optimize import nnls
from torch import Tensor

from stages.alignment.matching import Matches
from stages.alignment.pvalues import HOLM, holm, normal_tail, p_floor
from stages.sae.base import BaseSAE
from stages.steering.evaluate import Steerability, steerability
from stages.steering.targeted import random_like

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from stages.steering.prompts import SteeringSet


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


@dataclass
class TransferTest:
    """Does A's vector, carried into B, steer B? Three kinds of vector, all at the norm
    of B's own vector (so slopes compare directions, not lengths), on B's held-out set:
    B's own vector, the carried one rescaled, and `n_random` random directions — the
    null. Slopes are of the behaviour metric against the multiplier (steerability)."""

    own: Steerability
    transferred: Steerability
    random_slopes: list[float]
    cosine: float  # carried vs own (nan when nothing was carried)
    norm_own: float
    norm_carried: float  # before rescaling

    @property
    def p_vs_random(self) -> float:
        """One-sided empirical p: (1 + #{random slope ≥ transferred}) / (n_random + 1)."""
        t = self.transferred.slope
        return (1 + sum(r >= t for r in self.random_slopes)) / (len(self.random_slopes) + 1)

    @property
    def p_floor(self) -> float:
        """The smallest p_vs_random n_random directions can give: 1 / (n_random + 1)."""
        return p_floor(len(self.random_slopes))

    @property
    def p_normal_vs_random(self) -> float:
        """1 − Φ(z_vs_random): the normal approximation of the random-direction null,
        which resolves below `p_floor` (`pvalues.normal_tail` says when to distrust it)."""
        return normal_tail(self.transferred.slope, self.random_slopes)[1]

    @property
    def random_sd(self) -> float:
        """Standard deviation of the null's slopes (nan with fewer than two)."""
        r = np.asarray(self.random_slopes, dtype=np.float64)
        return float(r.std(ddof=1)) if len(r) > 1 else float("nan")

    @property
    def z_vs_random(self) -> float:
        sd, mean = self.random_sd, float(np.mean(self.random_slopes))
        return (self.transferred.slope - mean) / sd if sd > 0 else float("nan")

    @property
    def fraction_of_own(self) -> float:
        """Transferred slope / own slope: 1 = steers B as well as B's own vector."""
        own = self.own.slope
        return self.transferred.slope / own if own else float("nan")

    def to_dict(self) -> dict[str, Any]:
        r = np.asarray(self.random_slopes, dtype=np.float64)
        return {
            "norm_own": self.norm_own, "norm_carried": self.norm_carried,
            "cosine_transferred_own": self.cosine,
            "own": _summary(self.own), "transferred": _summary(self.transferred),
            "random": {"steerability": float(r.mean()), "sd": self.random_sd,
                       "n": len(r), "slopes": [float(x) for x in r]},
            "p_vs_random": self.p_vs_random, "p_floor": self.p_floor,
            "z_vs_random": self.z_vs_random, "p_normal_vs_random": self.p_normal_vs_random,
            "fraction_of_own": self.fraction_of_own,
        }  # fmt: skip


def _summary(s: Steerability) -> dict[str, float]:
    """Slope with its 95 % interval over prompts (the slope of the mean curve is the mean
    of the per-prompt slopes, so its standard error is theirs / √n)."""
    per = np.asarray(s.per_prompt_slope, dtype=np.float64)
    half = 1.96 * per.std(ddof=1) / np.sqrt(len(per)) if len(per) > 1 else float("nan")
    return {"steerability": s.slope, "ci95": [s.slope - half, s.slope + half],
            "wrong_way_fraction": s.wrong_way_fraction, "n_prompts": len(per)}  # fmt: skip


def evaluate_transfer(
    model_b: HookedTransformer,
    steering_set: SteeringSet,
    hook: str,
    own: Tensor,
    carried: Tensor,
    multipliers: Sequence[float],
    *,
    n_random: int = 32,
    seed: int = 0,
    extend_to: int | None = None,
) -> TransferTest:
    """Steerability of B's own vector, of the carried vector rescaled to its norm, and of
    `n_random` seeded random directions of that norm, at `hook` of model B.

    Two-stage null (after Besag & Clifford 1991, sequential Monte Carlo p-values): when
    none of the first `n_random` directions reaches the carried vector's slope (p at its
    floor 1/(n_random + 1)), more are drawn, up to `extend_to` in all (default 4 ×
    n_random), and p counts them all; otherwise the first n_random decide. Still a valid
    p at every level α: under the null the first stage's rank is uniform, so a rejection
    without extending has probability ⌊α(n+1)⌋/(n+1) − 1/(n+1) and one after extending at
    most min(α, 1/(n+1)). It lets a strong effect's p fall below 1/(n_random + 1) — and
    below α/m after Holm over m tests — at the cost of extra draws only where needed."""
    if n_random < 2:
        raise ValueError(f"n_random = {n_random}, expected an integer >= 2 (the null's spread)")
    extend_to = 4 * n_random if extend_to is None else max(extend_to, n_random)
    own, carried = own.detach().float(), carried.detach().float()
    norm_own, norm_carried = float(own.norm()), float(carried.norm())
    scaled = carried * (norm_own / norm_carried) if norm_carried > 0 else carried
    cos = float(own.double() @ carried.double() / (norm_own * norm_carried)) if norm_carried else float("nan")  # fmt: skip

    def slope(v: Tensor) -> Steerability:
        return steerability(model_b, steering_set, hook, v, multipliers)

    transferred = slope(scaled)
    randoms = [slope(random_like(own, seed + i)).slope for i in range(n_random)]
    if all(r < transferred.slope for r in randoms):  # at the floor: draw more
        randoms += [slope(random_like(own, seed + i)).slope for i in range(n_random, extend_to)]
    return TransferTest(
        own=slope(own), transferred=transferred, random_slopes=randoms,
        cosine=cos, norm_own=norm_own, norm_carried=norm_carried,
    )  # fmt: skip


def read_hungarian(alignment_dir: Path) -> dict[tuple[str, str], tuple[str, str, dict]]:
    """(hook_a, hook_b) -> (SAE name in A, SAE name in B, Hungarian match columns), read
    back from an alignment folder (`meta.json`'s `sae_pairs`, `matches/*.parquet`): the
    matches `align_pair` found (latent ids and float64 correlations are stored as is)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from stages.io import read_json

    meta = read_json(alignment_dir / "meta.json", "alignment metadata")
    out = {}
    for key in meta.get("sae_pairs", []):
        hooks, names = key.split("/", 1)
        hook_a, _, hook_b = hooks.partition("~")
        name_a, _, name_b = names.partition("~")
        t = pq.read_table(alignment_dir / "matches" / f"{key.replace('/', '__')}.parquet")
        t = t.filter(pc.equal(t.column("method"), "hungarian"))
        cols = {c: t.column(c).to_numpy() for c in ("latent_a", "latent_b", "correlation")}
        out[(hook_a, hook_b or hook_a)] = (name_a, name_b or name_a, cols)
    return out


def transfer_steering(
    alignment_dir: Path,
    vectors_a: dict[str, dict[str, Tensor]],
    vectors_b: dict[str, dict[str, Tensor]],
    saes_a: dict[str, dict[str, BaseSAE]],
    saes_b: dict[str, dict[str, BaseSAE]],
    model_b: HookedTransformer,
    sets: dict[str, SteeringSet],
    multipliers: Sequence[float],
    *,
    method: Literal["nnls", "encode"] = "nnls",
    k: int | None = None,
    min_correlation: float | None = None,
    n_random: int = 32,
    extend_to: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Every concept steered in both models (`vectors_*`: concept -> hook -> vector): A's
    vector carried through the Hungarian matches of the alignment at `alignment_dir` into
    B (`transfer_vector`) and tested on B's held-out set of that concept against B's own
    vector and random directions, all at the own vector's norm (`evaluate_transfer`).
    Returns what `transfer.json` holds: settings, then concept -> hook -> test (the key
    `<hook_a>~<hook_b>` where the alignment paired different hooks)."""
    matched = read_hungarian(alignment_dir)
    out: dict[str, Any] = {"method": method, "k": k, "min_correlation": min_correlation,
                           "n_random": n_random,
                           "extend_to": 4 * n_random if extend_to is None else extend_to,
                           "multipliers": list(multipliers),
                           "concepts": {}}  # fmt: skip
    for concept in sorted(set(vectors_a) & set(vectors_b)):
        if concept not in sets:
            continue
        va, vb, rows = vectors_a[concept], vectors_b[concept], {}
        # the alignment's hook pairs: the same hook in two models of one architecture, or
        # e.g. gpt2's blocks.8.hook_resid_pre with pythia's blocks.3.hook_resid_post
        for (hook_a, hook_b), (name_a, name_b, m) in sorted(matched.items()):
            if hook_a not in va or hook_b not in vb:
                continue
            sa, sb = saes_a[hook_a][name_a], saes_b[hook_b][name_b]
            matches = Matches(m["latent_a"], m["latent_b"], m["correlation"], sa.d_sae,
                              sb.d_sae, "hungarian")  # fmt: skip
            vt = transfer_vector(va[hook_a], sa, sb, matches, k, method=method,
                                 min_score=min_correlation)  # fmt: skip
            test = evaluate_transfer(model_b, sets[concept], hook_b, vb[hook_b], vt,
                                     multipliers, n_random=n_random, extend_to=extend_to,
                                     seed=seed)  # fmt: skip
            if hook_a == hook_b:
                rows[hook_a] = {"sae_a": name_a, "sae_b": name_b, **test.to_dict()}
            else:  # keyed as the alignment keys its SAE pairs
                rows[f"{hook_a}~{hook_b}"] = {"hook_a": hook_a, "hook_b": hook_b,
                                               "sae_a": name_a, "sae_b": name_b,
                                               **test.to_dict()}  # fmt: skip
        out["concepts"][concept] = rows
    return correct_transfer(out)


TRANSFER_FAMILY = "every (concept, hook) transfer test of one model pair"


def correct_transfer(transfer: dict[str, Any]) -> dict[str, Any]:
    """Holm (1979) over the pair's family of transfer tests (every concept × hook of
    `transfer["concepts"]`), in place: each row gains `p_vs_random_holm` (of the exact
    empirical p, floor 1/(n_random + 1)) and `p_normal_vs_random_holm` (of the normal
    approximation); `transfer["correction"]` names the method and the family. Returns
    `transfer`."""
    rows = [r for by_hook in transfer.get("concepts", {}).values() for r in by_hook.values()]
    for raw in ("p_vs_random", "p_normal_vs_random"):
        adjusted = holm([float(r.get(raw, float("nan"))) if r.get(raw) is not None
                         else float("nan") for r in rows])  # fmt: skip
        for r, v in zip(rows, adjusted, strict=True):
            r[f"{raw}_holm"] = float(v)
    transfer["correction"] = {"method": HOLM, "family": TRANSFER_FAMILY,
                              "family_size": len(rows)}  # fmt: skip
    return transfer


def transfer_headline(transfer: dict[str, Any]) -> dict[str, float]:
    """The flat numbers of `transfer.json` that DVC metrics and MLflow carry."""
    scores: dict[str, float] = {}
    for concept, rows in transfer.get("concepts", {}).items():
        for hook, r in rows.items():
            key = f"transfer/{concept}/{hook}"
            for kind in ("own", "transferred", "random"):
                scores[f"{key}/{kind}"] = round(r[kind]["steerability"], 6)
            for k in ("p_vs_random", "p_vs_random_holm", "p_floor", "z_vs_random",
                      "p_normal_vs_random", "p_normal_vs_random_holm", "fraction_of_own",
                      "cosine_transferred_own"):  # fmt: skip
                v = r.get(k)
                if v is not None and v == v:
                    scores[f"{key}/{k}"] = _round(v)
    return scores


def _round(v: float) -> float:
    """6 decimals, or 6 significant digits below 1e-6 (a resolving p must not read 0)."""
    return round(v, 6) if abs(v) >= 1e-6 or v == 0 else float(f"{v:.6g}")
