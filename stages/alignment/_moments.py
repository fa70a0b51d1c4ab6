"""Streaming first and second moments, held in centred form and merged exactly.

Linear CKA and Pearson correlation both need n, the sums Σx, Σy and the products
XᵀX, YᵀY, XᵀY. We hold the *same* sufficient statistics in centred form — the means
and the co-moments M_xy = Σ (x − x̄)ᵀ(y − ȳ) — and combine two partial results with
the pairwise update of Chan, Golub & LeVeque (1979):

    n = n_a + n_b,  δ = x̄_b − x̄_a,  M = M_a + M_b + (n_a n_b / n) δ_x δ_yᵀ.

Why not the raw sums: the centred covariance from raw sums is XᵀX − n x̄x̄ᵀ, a
difference of two large numbers when a dimension's mean is large against its spread
(residual streams have such outlier dimensions; some SAE latents are dense). The
centred form loses nothing there, and it lets the per-chunk product run in float32
(see `matmul_dtype`) because the chunk is centred before it is multiplied.

A chunk's own product is summed over at most `block_rows` rows at a time before being
added to the float64 accumulator, so float32 rounding error grows with `block_rows`,
never with the total number of tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch


class CentredMoments:
    """n, per-stream means, and centred co-moments for chosen pairs of streams.

    `dims` maps a stream name to its width; `products` lists (u, v) pairs whose full
    co-moment matrix [dims[u], dims[v]] is kept; `variances` lists streams whose diagonal
    Σ (x − x̄)² alone is kept (O(dim) memory instead of O(dim²)).
    """

    def __init__(
        self,
        dims: Mapping[str, int],
        products: Iterable[tuple[str, str]] = (),
        variances: Iterable[str] = (),
        *,
        matmul_dtype: torch.dtype = torch.float64,
        block_rows: int = 4096,
    ) -> None:
        if matmul_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"matmul_dtype = {matmul_dtype}: expected torch.float32 or float64")
        if block_rows < 1:
            raise ValueError(f"block_rows = {block_rows}: expected an integer >= 1")
        self.dims = dict(dims)
        self.matmul_dtype = matmul_dtype
        self.block_rows = block_rows
        self.n = 0
        f64 = torch.float64
        self.mean = {k: torch.zeros(d, dtype=f64) for k, d in self.dims.items()}
        self.comoment = {
            (u, v): torch.zeros(self.dims[u], self.dims[v], dtype=f64) for u, v in products
        }
        self.m2 = {k: torch.zeros(self.dims[k], dtype=f64) for k in variances}
        # A float32 scratch buffer per product avoids reallocating m_a x m_b every block.
        self._scratch: dict[tuple[str, str], torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        """Bytes held by the accumulators (the O(m_a·m_b) part of the memory)."""
        tensors = [
            *self.mean.values(),
            *self.comoment.values(),
            *self.m2.values(),
            *self._scratch.values(),
        ]
        return sum(t.numel() * t.element_size() for t in tensors)

    def update(self, chunks: Mapping[str, torch.Tensor]) -> None:
        """Absorb one row-aligned chunk per stream (already checked 2-D tensors)."""
        n_c = next(iter(chunks.values())).shape[0]
        if n_c == 0:
            return
        chunk_mean = {k: chunks[k].sum(0, dtype=torch.float64) / n_c for k in self.dims}
        # Rank-one correction for the shift from the running mean to the chunk mean;
        # applied before the chunk's own product is added (the terms are independent).
        n_a = self.n
        n = n_a + n_c
        delta = {k: chunk_mean[k] - self.mean[k] for k in self.dims}
        f = n_a * n_c / n
        if n_a > 0:
            for (u, v), m in self.comoment.items():
                m.addr_(delta[u], delta[v], alpha=f)
            for k, m2 in self.m2.items():
                m2.add_(delta[k].square(), alpha=f)
        for k in self.dims:
            self.mean[k].add_(delta[k], alpha=n_c / n)
        self.n = n

        # Centre in the matmul dtype. A constant column (e.g. a dead latent) centres to
        # exactly zero: its float64 mean of identical float16/32 values is exact.
        needed = {k for pair in self.comoment for k in pair} | set(self.m2)
        centred = {
            k: chunks[k].to(self.matmul_dtype) - chunk_mean[k].to(self.matmul_dtype) for k in needed
        }
        for k, m2 in self.m2.items():
            m2.add_(centred[k].square().sum(0, dtype=torch.float64))
        for (u, v), m in self.comoment.items():
            self._add_product(m, (u, v), centred[u], centred[v])

    def _add_product(
        self, out: torch.Tensor, key: tuple[str, str], cu: torch.Tensor, cv: torch.Tensor
    ) -> None:
        if self.matmul_dtype == torch.float64:
            out.addmm_(cu.T, cv)
            return
        buf = self._scratch.get(key)
        if buf is None:
            buf = self._scratch[key] = torch.empty(out.shape, dtype=self.matmul_dtype)
        for start in range(0, cu.shape[0], self.block_rows):
            stop = start + self.block_rows
            torch.mm(cu[start:stop].T, cv[start:stop], out=buf)
            out.add_(buf)

    def merge(self, other: CentredMoments) -> None:
        """Absorb another accumulator's statistics (e.g. from another worker), exactly."""
        if (
            other.dims != self.dims
            or set(other.comoment) != set(self.comoment)
            or set(other.m2) != set(self.m2)
        ):
            raise ValueError(
                f"cannot merge accumulators of different layouts: dims {other.dims} vs "
                f"{self.dims}, products {sorted(other.comoment)} vs {sorted(self.comoment)}"
            )
        if other.n == 0:
            return
        n_a, n_b = self.n, other.n
        n = n_a + n_b
        delta = {k: other.mean[k] - self.mean[k] for k in self.dims}
        f = n_a * n_b / n
        for key, m in self.comoment.items():
            m.add_(other.comoment[key])
            if n_a > 0:
                m.addr_(delta[key[0]], delta[key[1]], alpha=f)
        for k, m2 in self.m2.items():
            m2.add_(other.m2[k])
            if n_a > 0:
                m2.add_(delta[k].square(), alpha=f)
        for k in self.dims:
            self.mean[k].add_(delta[k], alpha=n_b / n)
        self.n = n
