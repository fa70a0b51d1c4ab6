"""Synthetic activations with known ground-truth features (Sharkey et al. 2022,
"Taking features out of superposition with sparse autoencoders").

x = Σ_i a_i · g_i with `n_features` > d unit-norm ground-truth directions g_i in R^d.
Feature i is active with probability p_i, where the p_i decay geometrically from
`max_probability` (feature-frequency structure; `probability_decay = 1` gives equal
rates) and are scaled so that on average `mean_active` features are on. Activations can
be correlated (`correlation > 0`: a Gaussian copula with a random correlation matrix
decides which features fire together). Magnitudes a_i ~ Uniform(0, 1] as in the paper.

MMCS (mean max cosine similarity) = mean over true features of the largest cosine to
any learned decoder row: 1 means every planted feature has a matching latent.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.special import ndtri


class SyntheticFeatures:
    def __init__(
        self,
        d: int,
        n_features: int,
        *,
        mean_active: float = 5.0,
        probability_decay: float = 1.0,
        correlation: float = 0.0,
        seed: int = 0,
    ) -> None:
        rng = np.random.default_rng([seed, 0])
        g = rng.standard_normal((n_features, d))
        self.features = (g / np.linalg.norm(g, axis=1, keepdims=True)).astype(np.float32)
        p = probability_decay ** np.arange(n_features, dtype=np.float64)
        self.probabilities = np.clip(p * mean_active / p.sum(), 0.0, 1.0)
        self.d, self.n_features, self.seed = d, n_features, seed
        self.correlation = correlation
        if correlation > 0:
            # random correlation matrix: (1 - c) I + c · normalised low-rank factor
            f = rng.standard_normal((n_features, max(1, n_features // 8)))
            cov = f @ f.T
            dg = np.sqrt(np.diag(cov))
            corr = (1 - correlation) * np.eye(n_features) + correlation * cov / np.outer(dg, dg)
            self._chol = np.linalg.cholesky(corr + 1e-9 * np.eye(n_features))
            self._z_thresh = ndtri(1 - self.probabilities)

    def sample(self, n: int, rng: np.random.Generator) -> np.ndarray:
        """n activation vectors [n, d] float32."""
        if self.correlation > 0:
            z = rng.standard_normal((n, self.n_features)) @ self._chol.T
            on = z > self._z_thresh
        else:
            on = rng.random((n, self.n_features)) < self.probabilities
        mags = rng.random((n, self.n_features), dtype=np.float32)
        coeffs = np.where(on, 1.0 - mags, 0.0).astype(np.float32)  # (0, 1]
        return coeffs @ self.features

    def source(
        self, n_rows: int, chunk_rows: int = 4096, name: str | None = None
    ) -> SyntheticSource:
        return SyntheticSource(self, n_rows, chunk_rows, name)


class SyntheticSource:
    """A deterministic activation source: chunk c is generated from seed (seed, c), so any
    chunk-aligned read is reproducible without holding the data in memory."""

    def __init__(
        self, gen: SyntheticFeatures, n_rows: int, chunk_rows: int = 4096, name: str | None = None
    ) -> None:
        self.gen, self.n_rows, self.d_in, self.chunk_rows = gen, n_rows, gen.d, chunk_rows
        self.name = name or f"synthetic(d={gen.d}, n_features={gen.n_features}, seed={gen.seed})"

    def _chunk(self, c: int) -> np.ndarray:
        rows = min(self.chunk_rows, self.n_rows - c * self.chunk_rows)
        return self.gen.sample(rows, np.random.default_rng([self.gen.seed, 1, c]))

    def read(self, start: int, stop: int) -> np.ndarray:
        c0, c1 = start // self.chunk_rows, math.ceil(stop / self.chunk_rows)
        block = np.concatenate([self._chunk(c) for c in range(c0, c1)])
        off = c0 * self.chunk_rows
        return block[start - off : stop - off]

    def materialize(self) -> np.ndarray:
        return self.read(0, self.n_rows)


def mmcs(decoder: torch.Tensor, true_features: torch.Tensor | np.ndarray) -> float:
    """Mean over true features [n_true, d] of the max cosine to any row of decoder [d_sae, d]."""
    t = torch.as_tensor(true_features, dtype=torch.float32)
    w = decoder.detach().float()
    t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return float((t @ w.T).max(dim=1).values.mean())
