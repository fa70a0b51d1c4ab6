"""A steering vector in terms of SAE features.

- `encode_vector(sae, v)`: the SAE's latents of v itself (sae.encode(v)), and
  `encode_shift(sae, x, v, m)`: mean of sae.encode(x + m·v) − sae.encode(x) over real
  activations x (held-out prompts), which respects the encoder bias and sparsity.
- `top_by_cosine(v, W_dec)`: decoder rows most aligned with v.
- `nn_decompose(v, W_dec)`: a sparse non-negative reconstruction v ≈ Σ c_i W_dec[i],
  c ≥ 0, by non-negative orthogonal matching pursuit: pick the candidate row most
  correlated with the residual, refit all chosen coefficients with NNLS
  (scipy.optimize.nnls), repeat. The relative error ‖v − v̂‖/‖v‖ after each step is
  the error-vs-number-of-features curve.
- `precision_at_k(ranked, truth, k)` and `concept_latents(...)`: ground truth from
  activations + concept labels — every latent whose F1 for the concept exceeds a
  threshold (firing = latent > 0), or the best one if none does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from scipy.optimize import nnls
from torch import Tensor

from stages.sae.metrics import binary_f1_counts


@torch.no_grad()
def encode_vector(sae, v: Tensor) -> Tensor:
    """sae.encode(v) [d_sae] (note: includes the encoder's biases, as SAELens does)."""
    return sae.encode(v.float()[None])[0]


@torch.no_grad()
def encode_shift(sae, x: Tensor, v: Tensor, multiplier: float = 1.0) -> Tensor:
    """Mean over rows of sae.encode(x + m·v) − sae.encode(x); x [n, d_in]."""
    x = x.float()
    return (sae.encode(x + multiplier * v.float()) - sae.encode(x)).mean(0)


def top_by_cosine(v: Tensor, W_dec: Tensor, k: int = 10) -> tuple[list[int], list[float]]:
    """The k decoder rows with the highest cosine to v (signed: aligned, not anti-aligned)."""
    cos = decoder_cosines(v, W_dec)
    vals, idx = cos.topk(min(k, len(cos)))
    return idx.tolist(), vals.tolist()


def decoder_cosines(v: Tensor, W_dec: Tensor) -> Tensor:
    """Cosine of v with every decoder row [d_sae] (float64, detached from autograd)."""
    w, v = W_dec.detach().double(), v.detach().double()
    return (w @ v) / (w.norm(dim=1).clamp_min(1e-12) * v.norm().clamp_min(1e-12))


def top_by_value(f: Tensor, k: int = 10) -> tuple[list[int], list[float]]:
    vals, idx = f.detach().double().topk(min(k, len(f)))
    return idx.tolist(), vals.tolist()


@dataclass
class Decomposition:
    features: list[int]  # chosen decoder rows, in order of selection
    coefficients: list[float]  # non-negative, for the final fit (same order)
    curve: list[float]  # relative error after 1, 2, ... features
    n_candidates: int
    norm: float  # ‖v‖

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def top(self, k: int) -> list[int]:
        """The k features with the largest coefficient × ... contribution (coefficient)."""
        order = np.argsort(-np.asarray(self.coefficients), kind="stable")
        return [self.features[i] for i in order[:k]]

    def reconstruct(self, W_dec: Tensor, features: Sequence[int] | None = None) -> Tensor:
        """Σ c_i W_dec[i] over `features` (default: all chosen ones)."""
        keep = set(self.features if features is None else features)
        W_dec = W_dec.detach()
        out = torch.zeros(W_dec.shape[1], dtype=torch.float64)
        for f, c in zip(self.features, self.coefficients, strict=True):
            if f in keep:
                out += c * W_dec[f].double()
        return out.float()


def nn_decompose(v: Tensor, W_dec: Tensor, max_features: int = 32,
                 n_candidates: int = 256, tol: float = 1e-6) -> Decomposition:  # fmt: skip
    """Non-negative OMP over the `n_candidates` rows best aligned with v (see module doc).

    `W_dec` may be the SAE's parameter itself (`sae.W_dec`): it is read detached."""
    v, W_dec = v.detach(), W_dec.detach()
    target = v.double().numpy()
    norm = float(np.linalg.norm(target))
    if norm == 0:
        raise ValueError("nn_decompose: the vector is zero")
    cos = decoder_cosines(v, W_dec)
    cand = cos.topk(min(n_candidates, len(cos))).indices.numpy()
    A = W_dec.double().numpy()[cand]  # [n_cand, d]
    unit = A / np.maximum(np.linalg.norm(A, axis=1, keepdims=True), 1e-12)
    chosen: list[int] = []
    coef = np.zeros(0)
    curve: list[float] = []
    resid = target.copy()
    for _ in range(min(max_features, len(cand))):
        score = unit @ resid
        score[chosen] = -np.inf
        j = int(np.argmax(score))
        if score[j] <= 0:
            break  # no candidate can reduce the residual with a non-negative coefficient
        chosen.append(j)
        coef, _ = nnls(A[chosen].T, target, maxiter=50 * len(chosen) + 100)
        resid = target - coef @ A[chosen]
        curve.append(float(np.linalg.norm(resid) / norm))
        if curve[-1] < tol:
            break
    return Decomposition([int(cand[j]) for j in chosen], [float(c) for c in coef], curve,
                         len(cand), norm)  # fmt: skip


def precision_at_k(ranked: Sequence[int], truth: Sequence[int], k: int) -> float:
    """|top-k of `ranked` ∩ truth| / k (k larger than the list counts misses)."""
    if k < 1:
        raise ValueError(f"precision_at_k: k = {k}, expected ≥ 1")
    t = set(int(x) for x in truth)
    return sum(1 for x in list(ranked)[:k] if int(x) in t) / k


@torch.no_grad()
def latent_f1(sae, x: Tensor, labels: Tensor, batch_size: int = 8192) -> Tensor:
    """F1 [n_concepts, d_sae] of every latent's firing (> 0) against labels [n, c]."""
    lab = labels.bool()
    tp = torch.zeros(lab.shape[1], sae.d_sae, dtype=torch.float64)
    fires = torch.zeros(sae.d_sae, dtype=torch.float64)
    for i in range(0, len(x), batch_size):
        fired = (sae.encode(x[i : i + batch_size].float()) > 0).double()
        tp += lab[i : i + batch_size].double().T @ fired
        fires += fired.sum(0)
    pos = lab.sum(0).double()
    return binary_f1_counts(tp, fires[None] - tp, pos[:, None] - tp)


def concept_latents(f1_row: Tensor, threshold: float = 0.5) -> list[int]:
    """Latents with F1 > threshold, best first; the single best one if none passes."""
    order = torch.argsort(f1_row, descending=True)
    keep = [int(i) for i in order if float(f1_row[i]) > threshold]
    return keep or [int(order[0])]


@torch.no_grad()
def contrast_at_tokens(sae, x: Tensor, positive: Tensor, negative: Tensor,
                       batch_size: int = 8192) -> Tensor:  # fmt: skip
    """Firing-rate contrast [d_sae]: P(latent > 0 | positive row) − P(latent > 0 | negative
    row), over rows x [n, d_in] with bool masks `positive`, `negative` [n].

    The ground truth of a steering vector at the position where it is read: among rows
    holding the read token ("feels", "."), the latents that fire when the concept holds
    there (the next word is a positive emotion) and not when its opposite does. An F1 over
    every row instead picks latents of the concept's own word, one token later."""
    pos, neg = positive.bool(), negative.bool()
    if int(pos.sum()) == 0 or int(neg.sum()) == 0:
        raise ValueError(f"contrast_at_tokens: {int(pos.sum())} positive and {int(neg.sum())} "
                         "negative rows, expected at least one of each")  # fmt: skip
    fp = torch.zeros(sae.d_sae, dtype=torch.float64)
    fn = torch.zeros(sae.d_sae, dtype=torch.float64)
    for i in range(0, len(x), batch_size):
        fired = (sae.encode(x[i : i + batch_size].float()) > 0).double()
        fp += fired[pos[i : i + batch_size]].sum(0)
        fn += fired[neg[i : i + batch_size]].sum(0)
    return fp / pos.sum() - fn / neg.sum()
