"""Pearson correlation of every latent of SAE A with every latent of SAE B, streaming.

Feature matching across models (Bricken et al. 2023; Wang et al. 2025 "universal
features") starts from one number per latent pair: the Pearson correlation of their
activations over the same tokens. With m_A = m_B = 16k latents and millions of tokens
the activations never fit in memory together, so `CorrelationAccumulator` streams
paired chunks of tokens and keeps only O(m_A·m_B) float64 statistics — n, the means,
Σ(a − ā)², Σ(b − b̄)² and Σ(a − ā)ᵀ(b − b̄) (the sufficient statistics Σa, Σb, Σa², Σb²,
ΣaᵀB in centred form; see `moments.py` for why) — whatever the number of tokens.
Accumulators over disjoint token ranges `merge` exactly, so workers can split a cache.

Dead latents: a latent with zero variance over the tokens seen (never fires, or is
constant) has no defined correlation. We report 0 for every pair it is in — "no
evidence of a shared feature" — rather than NaN, which would poison max/argmax and the
Hungarian solver; `dead_a` / `dead_b` say which latents they are. "Zero" is exact for a
never-firing latent; a constant non-zero one is recognised by a spread below 8 ulps of
its mean (rounding noise of the chunk shift, not signal).

Precision and speed of the chunk product (the only O(n·m_A·m_B) work): it runs in
float32 by default, summed over at most `block_rows` = 8192 centred rows before being
added into float64. `benchmarks/alignment_correlation.py` measures both: the float32
GEMM runs at about twice the float64 rate here (~150 vs ~68 GFLOP/s unloaded), and
the float32 correlations differ from the float64 ones by at most ~1e-6 (max |Δr| over a
1024 × 1024 matrix of SAE-like latents, 32k tokens, with dense mean-20 latents; best
match identical for every latent). The sampling error of r over those tokens is ~5e-3,
three orders of magnitude larger, so float32 changes no conclusion; pass
`matmul_dtype=torch.float64` when values exact to rounding are needed.

Null distribution (`shuffled_chunk_pairs`, `null_correlation`): the same pass with B's
tokens shuffled against A's. A full random permutation of B's rows would need random
single-row reads from the cache (slow in zarr), so we shuffle at two levels: chunk i of
A is paired with a different chunk σ(i) of B (a seeded random derangement when B's
chunks can be indexed, else a circular shift by one chunk), and the rows of that chunk
are shuffled with a seeded permutation. Pairing with a *different* chunk matters:
shuffling only within chunks keeps chunk-level co-variation (chunks from the same
documents), so the "null" would not be centred on 0.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from stages.alignment.inputs import (
    Array,
    as_tensor_2d,
    check_paired,
    check_width,
)
from stages.alignment.moments import CentredMoments


class CorrelationAccumulator:
    """Streaming Pearson correlation between every column of A and every column of B.

    Memory: the float64 co-moment [m_a, m_b], a float32 scratch of the same shape (only
    with float32 matmuls) and O(m_a + m_b) vectors — plus the caller's chunk and its
    centred copy. Independent of the number of tokens.
    """

    def __init__(
        self,
        m_a: int,
        m_b: int,
        *,
        matmul_dtype: torch.dtype = torch.float32,
        block_rows: int = 8192,
        device: torch.device | str = "cpu",
    ) -> None:
        if m_a < 1 or m_b < 1:
            raise ValueError(f"(m_a, m_b) = {(m_a, m_b)}: expected at least one latent each")
        self.m_a, self.m_b = int(m_a), int(m_b)
        self._moments = CentredMoments(
            {"a": self.m_a, "b": self.m_b},
            products=[("a", "b")],
            variances=["a", "b"],
            matmul_dtype=matmul_dtype,
            block_rows=block_rows,
            labels={"a": "a_chunk", "b": "b_chunk"},
            device=device,
        )

    def to(self, device: torch.device | str) -> CorrelationAccumulator:
        """Move the accumulator to `device` (in place); read results on the CPU."""
        self._moments.to(device)
        return self

    @property
    def n_tokens(self) -> int:
        return self._moments.n

    @property
    def matmul_dtype(self) -> torch.dtype:
        return self._moments.matmul_dtype

    @property
    def nbytes(self) -> int:
        """Bytes held by the accumulator itself (the O(m_a·m_b) part)."""
        return self._moments.nbytes

    def update(self, a_chunk: Array, b_chunk: Array) -> None:
        """Absorb paired activations of the same tokens: a_chunk [n, m_a], b_chunk [n, m_b]."""
        a = as_tensor_2d(a_chunk, "a_chunk")
        b = as_tensor_2d(b_chunk, "b_chunk")
        check_width(a, self.m_a, "a_chunk")
        check_width(b, self.m_b, "b_chunk")
        check_paired(a, b, "a_chunk", "b_chunk")
        self._moments.update({"a": a, "b": b})

    def merge(self, other: CorrelationAccumulator) -> CorrelationAccumulator:
        """Absorb an accumulator over other tokens (same m_a, m_b) in place; return self."""
        if (other.m_a, other.m_b) != (self.m_a, self.m_b):
            raise ValueError(
                f"cannot merge a correlation accumulator of shape {(other.m_a, other.m_b)} "
                f"into one of shape {(self.m_a, self.m_b)}"
            )
        self._moments.merge(other._moments)
        return self

    @property
    def mean_a(self) -> np.ndarray:
        return self._moments.mean["a"].numpy()

    @property
    def mean_b(self) -> np.ndarray:
        return self._moments.mean["b"].numpy()

    @property
    def variance_a(self) -> np.ndarray:
        return self._variance("a")

    @property
    def variance_b(self) -> np.ndarray:
        return self._variance("b")

    @property
    def dead_a(self) -> np.ndarray:
        """Boolean mask of A's latents with zero variance (correlation reported as 0)."""
        return self._dead("a").numpy()

    @property
    def dead_b(self) -> np.ndarray:
        return self._dead("b").numpy()

    def _dead(self, k: str) -> torch.Tensor:
        """Zero variance: exactly 0 for a never-firing or exactly constant latent; we also
        count a spread below 8 ulps of the products' dtype around the mean, which is
        rounding noise of a constant, not signal."""
        m = self._moments
        eps = torch.finfo(m.matmul_dtype).eps
        noise = m.n * (8 * eps * m.mean[k]) ** 2
        return m.m2[k] <= noise

    def _variance(self, k: str) -> np.ndarray:
        if self.n_tokens < 2:
            raise ValueError(f"correlation needs at least 2 tokens, got {self.n_tokens}")
        return (self._moments.m2[k] / (self.n_tokens - 1)).numpy()

    def correlation(self) -> np.ndarray:
        """Pearson r [m_a, m_b] in float64; 0 wherever either latent has zero variance."""
        if self.n_tokens < 2:
            raise ValueError(f"correlation needs at least 2 tokens, got {self.n_tokens}")
        m = self._moments
        # 1/std with 0 for dead latents, so every pair they are in gets r = 0.
        inv_a = torch.where(self._dead("a"), 0.0, m.m2["a"].rsqrt())
        inv_b = torch.where(self._dead("b"), 0.0, m.m2["b"].rsqrt())
        r = m.comoment[("a", "b")] * inv_a[:, None] * inv_b[None, :]
        # Rounding can leave |r| a hair above 1 for (near-)duplicate latents.
        return r.clamp_(-1.0, 1.0).numpy()


def streaming_correlation(
    pairs: Iterable[tuple[Array, Array]],
    *,
    matmul_dtype: torch.dtype = torch.float32,
    block_rows: int = 8192,
) -> CorrelationAccumulator:
    """Accumulate correlations over an iterable of (a_chunk, b_chunk) pairs; the widths
    are taken from the first pair. Use `zip(chunks_a, chunks_b)` for aligned streams."""
    acc: CorrelationAccumulator | None = None
    for step, (a, b) in enumerate(pairs):
        if acc is None:
            acc = CorrelationAccumulator(
                int(a.shape[1]),
                int(b.shape[1]),
                matmul_dtype=matmul_dtype,
                block_rows=block_rows,
            )
        try:
            acc.update(a, b)
        except ValueError as e:
            raise ValueError(f"chunk pair {step}: {e}") from e
    if acc is None:
        raise ValueError("streaming_correlation: no chunks (expected at least one shared token)")
    return acc


def random_derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A uniform random permutation with no fixed point (rejection; ~e tries on average)."""
    if n < 2:
        return np.arange(n)
    while True:
        sigma = rng.permutation(n)
        if not np.any(sigma == np.arange(n)):
            return sigma


def _is_indexable(x: Any) -> bool:
    return hasattr(x, "__len__") and hasattr(x, "__getitem__") and not isinstance(x, Iterator)


def _shuffle_rows(b: Array, rows: int, rng: np.random.Generator) -> torch.Tensor:
    t = as_tensor_2d(b, "b chunk")
    perm = torch.from_numpy(rng.permutation(t.shape[0])[:rows])
    return t[perm]


def shuffled_chunk_pairs(
    chunks_a: Iterable[Array],
    chunks_b: Iterable[Array] | Sequence[Array],
    *,
    seed: int = 0,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (a_i, shuffled rows of b_σ(i)) with σ(i) ≠ i: the shuffled-token-order null.

    If `chunks_b` supports len() and indexing (a list, or a thin wrapper over a zarr
    array), σ is a seeded random derangement of the chunk indices; otherwise σ(i) = i + 1
    (mod number of chunks), which streams with two chunks buffered. Rows of each B chunk
    are shuffled by a seeded permutation. When paired chunks differ in length (a ragged
    last chunk), both are cut to the shorter. With a single chunk σ is the identity and
    only the row shuffle remains.
    """
    rng = np.random.default_rng(seed)
    if _is_indexable(chunks_b):
        seq_b: Sequence[Array] = chunks_b  # type: ignore[assignment]
        n_b = len(seq_b)
        if _is_indexable(chunks_a) and len(chunks_a) != n_b:  # type: ignore[arg-type]
            raise ValueError(
                f"chunks_a has {len(chunks_a)} chunks and chunks_b has {n_b}: expected "  # type: ignore[arg-type]
                f"the same chunking of the shared tokens"
            )
        sigma = random_derangement(n_b, rng)
        for i, a in enumerate(chunks_a):
            if i >= n_b:
                raise ValueError(f"chunks_a has more chunks than chunks_b ({n_b})")
            yield _cut_pair(a, seq_b[int(sigma[i])], rng)
        return

    # Iterable only: pair A_i with B_(i+1), and the last A chunk with B_0 (held back).
    first_b: Array | None = None
    previous_a: Array | None = None
    n_pairs = 0
    iterator_b = iter(chunks_b)
    for a in chunks_a:
        b = next(iterator_b, None)
        if b is None:
            raise ValueError(
                f"chunks_a has more chunks than chunks_b ({n_pairs}): expected the same "
                f"chunking of the shared tokens"
            )
        if previous_a is None:
            first_b = b
        else:
            yield _cut_pair(previous_a, b, rng)
        previous_a = a
        n_pairs += 1
    if next(iterator_b, None) is not None:
        raise ValueError(f"chunks_b has more chunks than chunks_a ({n_pairs})")
    if previous_a is not None and first_b is not None:
        yield _cut_pair(previous_a, first_b, rng)


def _cut_pair(a: Array, b: Array, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    ta = as_tensor_2d(a, "a chunk")
    rows = min(ta.shape[0], int(b.shape[0]))
    return ta[:rows], _shuffle_rows(b, rows, rng)


def null_correlation(
    chunks_a: Iterable[Array],
    chunks_b: Iterable[Array] | Sequence[Array],
    *,
    seed: int = 0,
    matmul_dtype: torch.dtype = torch.float32,
    block_rows: int = 8192,
) -> CorrelationAccumulator:
    """Correlations under the shuffled-token-order null (see `shuffled_chunk_pairs`).

    Compare the matched correlations of the real pass against the same matching run on
    this matrix (e.g. the max-correlation per A latent): that is the score two unrelated
    feature sets of these sparsities reach by chance.
    """
    return streaming_correlation(
        shuffled_chunk_pairs(chunks_a, chunks_b, seed=seed),
        matmul_dtype=matmul_dtype,
        block_rows=block_rows,
    )


class TopActivations:
    """The k tokens on which each latent activates most, streaming: O(m·k) memory.

    Feeds the Jaccard check of matched pairs (`matching.top_token_jaccard`). Only positive
    activations count (a latent "fires" when > 0); a latent firing on fewer than k tokens
    has its remaining slots set to -1. Token indices are global row numbers in the stream
    (or the indices passed to `update`), so A and B agree on them over shared tokens.
    """

    def __init__(self, n_latents: int, k: int, device: torch.device | str = "cpu") -> None:
        if k < 1 or n_latents < 1:
            raise ValueError(f"(n_latents, k) = {(n_latents, k)}: expected both >= 1")
        self.n_latents, self.k = int(n_latents), int(k)
        shape = (self.n_latents, self.k)
        self.values = torch.full(shape, -torch.inf, dtype=torch.float32, device=device)
        self.indices = torch.full(shape, -1, dtype=torch.int64, device=device)
        self._seen = 0

    def to(self, device: torch.device | str) -> TopActivations:
        """Move the running top-k to `device` (in place)."""
        self.values, self.indices = self.values.to(device), self.indices.to(device)
        return self

    def update(self, chunk: Array, token_index: Array | None = None) -> None:
        """Absorb activations [n, n_latents]; token_index [n] defaults to running row numbers."""
        t = as_tensor_2d(chunk, "chunk")
        check_width(t, self.n_latents, "chunk")
        n = t.shape[0]
        if token_index is None:
            idx = torch.arange(self._seen, self._seen + n, dtype=torch.int64, device=t.device)
        else:
            idx = torch.as_tensor(np.asarray(token_index), dtype=torch.int64).to(t.device)
            if idx.shape != (n,):
                raise ValueError(f"token_index has shape {tuple(idx.shape)}: expected ({n},)")
        self._seen += n
        if n == 0:
            return
        # Along dim 0 of the [n, m] chunk: no transposed copy (~1.5x faster than on t.T).
        vals, pos = torch.topk(t.to(torch.float32), min(self.k, n), dim=0)
        self._absorb(vals.T, idx[pos].T)

    def _absorb(self, vals: torch.Tensor, idx: torch.Tensor) -> None:
        all_vals = torch.cat([self.values, vals], dim=1)
        all_idx = torch.cat([self.indices, idx], dim=1)
        top, pos = torch.topk(all_vals, self.k, dim=1)
        self.values = top
        self.indices = torch.gather(all_idx, 1, pos)

    def merge(self, other: TopActivations) -> TopActivations:
        """Absorb another TopActivations over other tokens (same shape); return self."""
        if (other.n_latents, other.k) != (self.n_latents, self.k):
            raise ValueError(
                f"cannot merge TopActivations {(other.n_latents, other.k)} into "
                f"{(self.n_latents, self.k)}"
            )
        self._absorb(other.values, other.indices)
        self._seen += other._seen
        return self

    def token_sets(self) -> np.ndarray:
        """[n_latents, k] token indices, -1 where the latent fired on fewer than k tokens."""
        out = self.indices.clone()
        out[~(self.values > 0)] = -1
        return out.numpy()


class TopTokens:
    """Each latent's k distinct token ids with the highest activation, streaming.

    A token id's score for a latent is its MAX activation over every occurrence of that
    id in the stream (only activations > 0 count: a latent "fires" when > 0). The max,
    not the mean: the top-k distinct ids by max merge exactly over chunks and workers —
    an id in the top k of the whole stream is in the top k of the chunk holding its
    largest activation, since every id ranked above it there ranks above it overall —
    so O(m·k) state suffices, while a mean needs a running sum for every (latent, id)
    pair ever seen (O(m·vocabulary)). Feeds `matching.top_token_jaccard` over vocabulary
    ids, the measure ARCHITECTURE.md names ("not over row indices": for a dense latent
    the top 20 of thousands of near-equal occurrences rarely coincide between models
    even when they fire on the same few tokens).

    Work per chunk is over the fired entries only (a sparse SAE fires L0 latents per
    token): sort-unique their (latent, id) keys, max per key, keep k per latent.
    """

    def __init__(self, n_latents: int, k: int, device: torch.device | str = "cpu") -> None:
        if k < 1 or n_latents < 1:
            raise ValueError(f"(n_latents, k) = {(n_latents, k)}: expected both >= 1")
        self.n_latents, self.k = int(n_latents), int(k)
        self.latent = torch.empty(0, dtype=torch.int64, device=device)
        self.token = torch.empty(0, dtype=torch.int64, device=device)
        self.value = torch.empty(0, dtype=torch.float32, device=device)

    def to(self, device: torch.device | str) -> TopTokens:
        """Move the kept (latent, id, value) triples to `device` (in place)."""
        self.latent, self.token = self.latent.to(device), self.token.to(device)
        self.value = self.value.to(device)
        return self

    def update(self, chunk: Array, token_ids: Array) -> None:
        """Absorb activations [n, n_latents] of tokens whose vocabulary ids are token_ids [n]."""
        t = as_tensor_2d(chunk, "chunk") if not isinstance(chunk, torch.Tensor) else chunk
        if t.ndim != 2:
            raise ValueError(f"chunk has shape {tuple(t.shape)}: expected [n_tokens, n_latents]")
        check_width(t, self.n_latents, "chunk")
        ids = torch.as_tensor(np.asarray(token_ids) if not isinstance(token_ids, torch.Tensor)
                              else token_ids).to(device=t.device, dtype=torch.int64)  # fmt: skip
        if ids.shape != (t.shape[0],):
            raise ValueError(f"token_ids has shape {tuple(ids.shape)}: expected ({t.shape[0]},)")
        if ids.numel() and int(ids.min()) < 0:
            raise ValueError("token_ids: expected non-negative vocabulary ids")
        rows, lat = torch.nonzero(t >= self._entry_threshold().to(t.device), as_tuple=True)
        self._absorb(lat, ids[rows], t[rows, lat].to(torch.float32))

    def _entry_threshold(self) -> torch.Tensor:
        """[n_latents] the least activation that can still enter each latent's top k: its
        k-th best value once it has k ids (an id seen below it cannot pass the k ids kept,
        whose maxima are all at least that), else the smallest positive float. Exact, and
        it skips most fired entries after the first chunks (dense latents fire on many)."""
        tiny = torch.finfo(torch.float32).tiny
        out = torch.full((self.n_latents,), tiny, dtype=torch.float32, device=self.value.device)
        full = torch.bincount(self.latent, minlength=self.n_latents) >= self.k
        kth = torch.full_like(out, torch.inf).scatter_reduce_(0, self.latent, self.value, "amin")
        return torch.where(full, kth, out)

    def _absorb(self, lat: torch.Tensor, tok: torch.Tensor, val: torch.Tensor) -> None:
        lat = torch.cat([self.latent, lat.to(self.latent.device)])
        tok = torch.cat([self.token, tok.to(self.token.device)])
        val = torch.cat([self.value, val.to(self.value.device)])
        if lat.numel() == 0:
            return
        key, inverse = torch.unique(lat * (1 << 32) + tok, return_inverse=True)
        best = torch.full(key.shape, -torch.inf, dtype=torch.float32, device=key.device)
        best.scatter_reduce_(0, inverse, val, "amax")
        klat = torch.div(key, 1 << 32, rounding_mode="floor")
        # per latent, ids by value descending (ties: the lower id first, from unique's order)
        order = torch.argsort(best, descending=True, stable=True)
        order = order[torch.argsort(klat[order], stable=True)]
        sorted_lat = klat[order]
        rank = torch.arange(len(order), device=key.device) - torch.searchsorted(
            sorted_lat, sorted_lat
        )
        keep = order[rank < self.k]
        self.latent, self.token, self.value = (
            klat[keep],
            key[keep] - klat[keep] * (1 << 32),
            best[keep],
        )

    def merge(self, other: TopTokens) -> TopTokens:
        """Absorb a TopTokens over other tokens (same shape); return self."""
        if (other.n_latents, other.k) != (self.n_latents, self.k):
            raise ValueError(
                f"cannot merge TopTokens {(other.n_latents, other.k)} into "
                f"{(self.n_latents, self.k)}"
            )
        self._absorb(other.latent, other.token, other.value)
        return self

    def token_sets(self) -> np.ndarray:
        """[n_latents, k] token ids, best first, -1 where the latent fired on fewer than k
        distinct ids."""
        out = np.full((self.n_latents, self.k), -1, dtype=np.int64)
        lat, tok, val = (x.cpu().numpy() for x in (self.latent, self.token, self.value))
        order = np.lexsort((tok, -val, lat))  # by latent, value descending, id
        lat, tok = lat[order], tok[order]
        rank = np.arange(len(lat)) - np.searchsorted(lat, lat)
        out[lat, rank] = tok
        return out
