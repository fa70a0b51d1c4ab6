"""Pure metric functions with the definitions in ARCHITECTURE.md.

Every function takes tensors and returns numbers; nothing here knows about files or
models. `ReconstructionStats` accumulates the same quantities over batches exactly
(float64 sums), so a streamed evaluation equals the formula on the concatenated data.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from stages.logits import kl_divergence  # noqa: F401  (re-exported: metrics.kl_divergence)


def mse(x: Tensor, x_hat: Tensor) -> float:
    """Mean over tokens and dimensions of (x - x̂)²."""
    return float((x.double() - x_hat.double()).pow(2).mean())


def fvu(x: Tensor, x_hat: Tensor) -> float:
    """Σ‖x − x̂‖² / Σ‖x − x̄‖², x̄ the per-dimension mean over the set."""
    x, x_hat = x.double(), x_hat.double()
    return float((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def explained_variance(x: Tensor, x_hat: Tensor) -> float:
    return 1.0 - fvu(x, x_hat)


def cosine_similarity(x: Tensor, x_hat: Tensor) -> float:
    """Mean over tokens of cos(x, x̂)."""
    return float(torch.nn.functional.cosine_similarity(x.double(), x_hat.double(), dim=-1).mean())


def l0(f: Tensor) -> float:
    """Mean number of non-zero latents per token."""
    return float((f != 0).sum(-1).double().mean())


def l1(f: Tensor) -> float:
    """Mean over tokens of Σ_i |f_i|."""
    return float(f.double().abs().sum(-1).mean())


def shrinkage(x: Tensor, x_hat: Tensor) -> float:
    """γ = E‖x̂‖² / E[x·x̂]; γ < 1 means the SAE shrinks, x̂ = c·x gives γ = c."""
    x, x_hat = x.double(), x_hat.double()
    return float(x_hat.pow(2).sum(-1).mean() / (x * x_hat).sum(-1).mean())


def feature_density(fire_counts: Tensor, n_tokens: int) -> Tensor:
    """Fraction of tokens on which each latent is non-zero."""
    return fire_counts.double() / max(1, n_tokens)


def dead_fraction(density: Tensor) -> float:
    """Fraction of latents that never fire on the set."""
    return float((density == 0).double().mean())


def dense_fraction(density: Tensor, threshold: float = 0.1) -> float:
    """Fraction of latents firing on more than `threshold` (10 %) of tokens."""
    return float((density > threshold).double().mean())


def log10_density(density: Tensor, eps: float = 1e-10) -> Tensor:
    """log10(density + eps) per latent (SAELens' sparsity.safetensors convention)."""
    return torch.log10(density.double() + eps).float()


def log10_density_histogram(
    density: Tensor, bins: int = 40, lo: float = -8.0, hi: float = 0.0
) -> dict[str, list[float] | int]:
    """Histogram of log10 feature density over [lo, hi]; dead latents counted apart."""
    alive = density[density > 0].double()
    logs = torch.log10(alive).clamp(lo, hi)
    counts = torch.histc(logs, bins=bins, min=lo, max=hi) if alive.numel() else torch.zeros(bins)
    edges = torch.linspace(lo, hi, bins + 1)
    return {
        "bin_edges": [round(float(e), 6) for e in edges],
        "counts": [int(c) for c in counts],
        "dead": int((density == 0).sum()),
    }


def ce_loss_recovered(ce_clean: float, ce_sae: float, ce_zero: float) -> float:
    """(CE_zero − CE_sae) / (CE_zero − CE_clean): 1 = as good as the model, 0 = as bad
    as zero-ablating the hook. NaN when zero-ablation does not hurt (CE_zero ≤ CE_clean,
    e.g. an untrained model): there is then no loss to recover and the ratio means nothing."""
    denom = ce_zero - ce_clean
    return (ce_zero - ce_sae) / denom if denom > 0 else float("nan")


def binary_f1_counts(tp: Tensor, fp: Tensor, fn: Tensor) -> Tensor:
    """F1 = 2TP / (2TP + FP + FN), 0 where undefined."""
    tp, fp, fn = tp.double(), fp.double(), fn.double()
    denom = 2 * tp + fp + fn
    return torch.where(denom > 0, 2 * tp / denom.clamp_min(1), torch.zeros_like(tp))


def auroc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve (Mann–Whitney U with mid-ranks for ties)."""
    scores, labels = scores.double().flatten(), labels.bool().flatten()
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = torch.argsort(scores)
    s = scores[order]
    ranks = torch.empty_like(s)
    # mid-ranks: every member of a tie group gets the group's mean rank (1-based)
    _, inverse, counts = torch.unique_consecutive(s, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mid = ends - (counts.double() - 1) / 2
    ranks[order] = mid[inverse]
    rank_sum = ranks[labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def best_latent_f1(acts: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """For each concept (column of labels [n, c]) the latent (column of acts [n, d_sae])
    whose firing (act > 0) best detects it by F1. Returns (best latent ids [c], F1 [c])."""
    fired = (acts > 0).double()
    lab = labels.double()
    tp = lab.T @ fired  # [c, d_sae]
    fp = fired.sum(0)[None, :] - tp
    fn = lab.sum(0)[:, None] - tp
    f1 = binary_f1_counts(tp, fp, fn)
    best, idx = f1.max(dim=1)
    return idx, best


class ReconstructionStats:
    """Streaming sums for MSE, FVU, cosine, L0, L1, shrinkage and feature density."""

    def __init__(self, d_in: int, d_sae: int, device: torch.device | str = "cpu") -> None:
        self.n = 0
        self.sum_x = torch.zeros(d_in, dtype=torch.float64, device=device)
        self.sum_x2 = 0.0  # Σ‖x‖²
        self.sum_err2 = 0.0  # Σ‖x − x̂‖²
        self.sum_xhat2 = 0.0  # Σ‖x̂‖²
        self.sum_dot = 0.0  # Σ x·x̂
        self.sum_cos = 0.0
        self.sum_l0 = 0.0
        self.sum_l1 = 0.0
        self.fire_counts = torch.zeros(d_sae, dtype=torch.int64, device=device)

    @torch.no_grad()
    def update(self, x: Tensor, x_hat: Tensor, f: Tensor) -> None:
        xd, hd = x.double(), x_hat.double()
        self.n += x.shape[0]
        self.sum_x += xd.sum(0)
        self.sum_x2 += float(xd.pow(2).sum())
        self.sum_err2 += float((xd - hd).pow(2).sum())
        self.sum_xhat2 += float(hd.pow(2).sum())
        self.sum_dot += float((xd * hd).sum())
        self.sum_cos += float(torch.nn.functional.cosine_similarity(xd, hd, dim=-1).sum())
        active = f != 0
        self.sum_l0 += float(active.sum())
        self.sum_l1 += float(f.double().abs().sum())
        self.fire_counts += active.sum(0)

    def density(self) -> Tensor:
        return feature_density(self.fire_counts.cpu(), self.n)

    def compute(self) -> dict[str, float]:
        n, d = self.n, self.sum_x.numel()
        total_var = self.sum_x2 - float(self.sum_x.pow(2).sum()) / n  # Σ‖x − x̄‖²
        f = self.sum_err2 / total_var if total_var > 0 else math.nan
        dens = self.density()
        return {
            "n_tokens": n,
            "mse": self.sum_err2 / (n * d),
            "fvu": f,
            "explained_variance": 1.0 - f,
            "cosine_similarity": self.sum_cos / n,
            "l0": self.sum_l0 / n,
            "l1": self.sum_l1 / n,
            "shrinkage": self.sum_xhat2 / self.sum_dot if self.sum_dot != 0 else math.nan,
            "dead_fraction": dead_fraction(dens),
            "dense_fraction": dense_fraction(dens),
        }
