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
(see `matmul_dtype`).

Within a chunk we use the shifted-data algorithm: rows are shifted by K, the chunk
mean computed in the matmul dtype, c = x − K, and with s = Σc (≈ 0) the chunk's exact
centred co-moment is Σ c_u c_vᵀ − s_u s_vᵀ / n_c, so K's own rounding costs nothing.
(Shifting by a data row instead would keep constant columns exactly zero, but a sparse
latent that fires on that row is then shifted far from its mean, and float32 products
lose two digits to the correction; measured, 3e-5 against 1e-6.) A never-firing latent
still centres to exactly zero; a constant non-zero one leaves rounding noise, which
`correlation.py` recognises relative to the mean.

The chunk is processed in blocks of at most `block_rows` rows through preallocated
buffers (no fresh multi-megabyte temporaries per chunk, which cost page faults), and
each block's product is added into the float64 accumulator: float32 rounding error
grows with `block_rows`, never with the total number of tokens.
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
        labels: Mapping[str, str] | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        if matmul_dtype not in (torch.float32, torch.float64):
            raise ValueError(f"matmul_dtype = {matmul_dtype}: expected torch.float32 or float64")
        if block_rows < 1:
            raise ValueError(f"block_rows = {block_rows}: expected an integer >= 1")
        self.dims = dict(dims)
        self.labels = dict(labels or {})  # stream -> name used in error messages
        self.matmul_dtype = matmul_dtype
        self.block_rows = block_rows
        self.device = torch.device(device)  # where the sums live; chunks must be there
        self.n = 0
        f64 = torch.float64
        zeros = dict(dtype=f64, device=self.device)
        self.mean = {k: torch.zeros(d, **zeros) for k, d in self.dims.items()}
        self.comoment = {
            (u, v): torch.zeros(self.dims[u], self.dims[v], **zeros) for u, v in products
        }
        self.m2 = {k: torch.zeros(self.dims[k], **zeros) for k in variances}
        # Reused per-block buffers (centred rows, squares, float32 products).
        self._scratch: dict[tuple[str, ...], torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        """Bytes held: the accumulators (O(m_a·m_b)) plus the reused block buffers
        (O(block_rows·(m_a + m_b)) and, for float32 products, one m_a×m_b scratch)."""
        tensors = [
            *self.mean.values(),
            *self.comoment.values(),
            *self.m2.values(),
            *self._scratch.values(),
        ]
        return sum(t.numel() * t.element_size() for t in tensors)

    def update(self, chunks: Mapping[str, torch.Tensor]) -> None:
        """Absorb one row-aligned chunk per stream (checked, finite 2-D tensors)."""
        n_c = next(iter(chunks.values())).shape[0]
        if n_c == 0:
            return
        dt = self.matmul_dtype
        f64 = torch.float64
        # Shift by the chunk's own mean, in the matmul dtype (one cheap reduction). Its
        # column sums double as the finite check, done before any state is touched.
        shift = {}
        for k in self.dims:
            total = chunks[k].sum(0, dtype=dt)
            if not bool(torch.isfinite(total).all()):
                raise ValueError(
                    f"{self.labels.get(k, k)}: contains NaN or inf values (or values too "
                    f"large to sum); expected finite activations"
                )
            shift[k] = total / n_c
        sums = {k: torch.zeros(self.dims[k], dtype=f64, device=self.device) for k in self.dims}
        squares = {k: torch.zeros(self.dims[k], dtype=f64, device=self.device) for k in self.m2}
        # Products go straight into the running co-moments; the shift corrections and the
        # Chan update below are rank-one and commute with them.
        for start in range(0, n_c, self.block_rows):
            stop = min(start + self.block_rows, n_c)
            centred = {}
            for k in self.dims:
                buf = self._buffer(("centred", k), (stop - start, self.dims[k]))
                torch.sub(chunks[k][start:stop], shift[k], out=buf)
                sums[k].add_(buf.sum(0))
                centred[k] = buf
            for k in self.m2:
                # One squares buffer shared by all streams (used one stream at a time).
                sq = self._buffer(("square",), (stop - start, self.dims[k]))
                squares[k].add_(torch.mul(centred[k], centred[k], out=sq).sum(0))
            for (u, v), m in self.comoment.items():
                if dt == f64:
                    m.addmm_(centred[u].T, centred[v])
                else:
                    prod = self._buffer(("product", u, v), m.shape)
                    m.add_(torch.mm(centred[u].T, centred[v], out=prod))

        # Chunk mean and the shift correction: M_chunk = Σ c_u c_vᵀ − s_u s_vᵀ / n_c.
        chunk_mean = {k: shift[k].to(f64) + sums[k] / n_c for k in self.dims}
        for (u, v), m in self.comoment.items():
            m.addr_(sums[u], sums[v], alpha=-1.0 / n_c)
        for k, m2 in self.m2.items():
            m2.add_(squares[k]).sub_(sums[k].square() / n_c)
        # Chan et al.: combine (n_a, running mean, M) with (n_c, chunk mean, M_chunk).
        n_a = self.n
        n = n_a + n_c
        if n_a > 0:
            delta = {k: chunk_mean[k] - self.mean[k] for k in self.dims}
            f = n_a * n_c / n
            for (u, v), m in self.comoment.items():
                m.addr_(delta[u], delta[v], alpha=f)
            for k, m2 in self.m2.items():
                m2.add_(delta[k].square(), alpha=f)
            for k in self.dims:
                self.mean[k].add_(delta[k], alpha=n_c / n)
        else:
            for k in self.dims:
                self.mean[k].copy_(chunk_mean[k])
        for m2 in self.m2.values():
            m2.clamp_(min=0.0)  # rounding in the corrections must not make a variance < 0
        self.n = n

    def _buffer(self, key: tuple[str, ...], shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
        """A reusable scratch tensor; a shorter last block takes a view of the same memory."""
        buf = self._scratch.get(key)
        numel = 1
        for s in shape:
            numel *= s
        if buf is None or buf.numel() < numel:
            buf = self._scratch[key] = torch.empty(numel, dtype=self.matmul_dtype,
                                                   device=self.device)  # fmt: skip
        return buf[:numel].view(*shape)

    def to(self, device: torch.device | str) -> CentredMoments:
        """Move the statistics to `device` (in place; the scratch buffers are dropped)."""
        self.device = torch.device(device)
        for store in (self.mean, self.comoment, self.m2):
            for k, t in store.items():
                store[k] = t.to(self.device)
        self._scratch.clear()
        return self

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
