"""Streaming latent-latent correlation, its shuffled-token null, and top activations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.alignment import (
    CorrelationAccumulator,
    RowChunks,
    TopActivations,
    TopTokens,
    null_correlation,
    shuffled_chunk_pairs,
    streaming_correlation,
)

FAST = settings(max_examples=25, deadline=None)


def _sae_like(rng: np.random.Generator, n: int, m: int) -> np.ndarray:
    """Sparse non-negative activations (~20 % of tokens fire, latent-specific scales)."""
    return np.maximum(rng.standard_normal((n, m)) * rng.uniform(0.5, 2.0, m) - 0.84, 0.0)


def _reference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.corrcoef(a.astype(np.float64), b.astype(np.float64), rowvar=False)
    return r[: a.shape[1], a.shape[1] :]


@FAST
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(3, 150),
    m_a=st.integers(1, 9),
    m_b=st.integers(1, 9),
    chunk=st.integers(1, 64),
)
def test_streaming_correlation_equals_corrcoef(seed, n, m_a, m_b, chunk):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, m_a)) * rng.uniform(0.1, 10, m_a) + rng.uniform(-20, 20, m_a)
    b = a[:, :1] @ rng.standard_normal((1, m_b)) + rng.standard_normal((n, m_b))
    acc = streaming_correlation(
        zip(RowChunks(a, chunk), RowChunks(b, chunk), strict=True), matmul_dtype=torch.float64
    )
    assert acc.n_tokens == n
    np.testing.assert_allclose(acc.correlation(), _reference(a, b), atol=1e-12)
    np.testing.assert_allclose(acc.mean_a, a.mean(0), atol=1e-12)
    np.testing.assert_allclose(acc.variance_b, b.var(0, ddof=1), rtol=1e-10)


@FAST
@given(seed=st.integers(0, 2**31 - 1), chunk=st.integers(1, 300))
def test_float32_products_stay_within_1e5_of_corrcoef(seed, chunk):
    rng = np.random.default_rng(seed)
    a = _sae_like(rng, 600, 12).astype(np.float32)
    a[:, 0] += 50.0  # a dense latent with a large mean: the cancellation-prone case
    b = (a[:, ::-1] + 0.5 * _sae_like(rng, 600, 12)).astype(np.float32)
    acc = streaming_correlation(
        zip(RowChunks(a, chunk), RowChunks(b, chunk), strict=True), block_rows=128
    )
    np.testing.assert_allclose(acc.correlation(), _reference(a, b), atol=1e-5)


@FAST
@given(seed=st.integers(0, 2**31 - 1), split=st.integers(0, 200))
def test_correlation_merge_equals_single_pass(seed, split):
    rng = np.random.default_rng(seed)
    a, b = rng.standard_normal((200, 5)) + 3.0, rng.standard_normal((200, 4))
    b[:, 0] += a[:, 1]
    single = CorrelationAccumulator(5, 4, matmul_dtype=torch.float64)
    single.update(a, b)
    left = CorrelationAccumulator(5, 4, matmul_dtype=torch.float64)
    right = CorrelationAccumulator(5, 4, matmul_dtype=torch.float64)
    left.update(a[:split], b[:split])
    right.update(a[split:], b[split:])
    merged = left.merge(right)
    assert merged.n_tokens == 200
    np.testing.assert_allclose(merged.correlation(), single.correlation(), atol=1e-12)
    np.testing.assert_allclose(merged.variance_a, single.variance_a, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dead_and_constant_latents_give_zero_not_nan(dtype):
    rng = np.random.default_rng(0)
    a = _sae_like(rng, 300, 6).astype(np.float16)
    a[:, 2] = 0  # never fires
    a[:, 4] = np.float16(0.1)  # constant (not exactly representable as a decimal)
    b = np.hstack([a[:, :3], rng.standard_normal((300, 2)).astype(np.float16)])
    b[:, 1] = 0
    acc = CorrelationAccumulator(6, 5, matmul_dtype=dtype)
    for lo in range(0, 300, 64):
        acc.update(a[lo : lo + 64], b[lo : lo + 64])
    r = acc.correlation()
    assert np.isfinite(r).all()
    assert np.flatnonzero(acc.dead_a).tolist() == [2, 4]
    assert np.flatnonzero(acc.dead_b).tolist() == [1, 2]
    assert np.all(r[[2, 4], :] == 0.0) and np.all(r[:, [1, 2]] == 0.0)
    assert r[0, 0] == pytest.approx(1.0, abs=1e-6)  # live latents are unaffected


def test_correlation_memory_does_not_grow_with_tokens():
    rng = np.random.default_rng(0)
    acc = CorrelationAccumulator(64, 32, block_rows=256)
    acc.update(rng.random((500, 64), np.float32), rng.random((500, 32), np.float32))
    before = acc.nbytes
    for rows in (1000, 10, 4000, 256, 3):
        acc.update(rng.random((rows, 64), np.float32), rng.random((rows, 32), np.float32))
    assert acc.n_tokens == 5769
    # float64 co-moment + float32 product scratch + means and variances (float64)
    # + centred row blocks per stream and one squares block (float32, block_rows rows,
    # the wider stream's width): none depends on n.
    expected = 64 * 32 * (8 + 4) + (64 + 32) * 8 * 2 + 256 * (64 + 32 + 64) * 4
    assert acc.nbytes == before == expected


def test_correlation_errors_name_the_shapes():
    acc = CorrelationAccumulator(3, 2)
    with pytest.raises(
        ValueError,
        match=r"a_chunk has shape \(4, 3\) and b_chunk has shape "
        r"\(5, 2\)",
    ):
        acc.update(np.zeros((4, 3)), np.zeros((5, 2)))
    with pytest.raises(ValueError, match=r"b_chunk has shape \(4, 7\): expected 2 columns"):
        acc.update(np.zeros((4, 3)), np.zeros((4, 7)))
    with pytest.raises(ValueError, match=r"shape \(3, 3\) into one of shape \(3, 2\)"):
        acc.merge(CorrelationAccumulator(3, 3))
    with pytest.raises(ValueError, match="no chunks"):
        streaming_correlation([])
    with pytest.raises(ValueError, match="at least 2 tokens"):
        acc.correlation()


def test_a_non_finite_chunk_is_refused_before_any_state_changes():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((100, 4)), rng.standard_normal((100, 3))
    acc = CorrelationAccumulator(4, 3)
    acc.update(a, b)
    before = acc.correlation().copy()
    bad = a.copy()
    bad[5, 2] = np.nan
    with pytest.raises(ValueError, match="a_chunk: contains NaN or inf"):
        acc.update(bad, b)
    b_inf = b.copy()
    b_inf[0, 0] = np.inf
    with pytest.raises(ValueError, match="b_chunk: contains NaN or inf"):
        acc.update(a, b_inf)
    assert acc.n_tokens == 100
    np.testing.assert_array_equal(acc.correlation(), before)


# ---------------------------------------------------------------------------- the null


def _chunk_ids(n_chunks: int, rows: int) -> list[np.ndarray]:
    """Chunk i holds rows [[i, r], ...]: column 0 identifies the chunk, column 1 the row."""
    return [
        np.stack([np.full(rows, i, float), np.arange(rows, dtype=float)], axis=1)
        for i in range(n_chunks)
    ]


@pytest.mark.parametrize("indexable", [True, False])
def test_shuffled_pairs_pair_every_chunk_with_another_chunk(indexable):
    chunks = _chunk_ids(7, 20)
    chunks_b = chunks if indexable else iter(chunks)
    pairs = list(shuffled_chunk_pairs(iter(chunks), chunks_b, seed=3))
    assert len(pairs) == 7
    partners = [int(b[0, 0]) for _, b in pairs]
    assert sorted(partners) == list(range(7))  # each B chunk used once
    assert all(int(a[0, 0]) != p for (a, _), p in zip(pairs, partners, strict=True))
    for _, b in pairs:
        assert len(set(b[:, 0].tolist())) == 1  # rows come from one chunk ...
        assert sorted(b[:, 1].tolist()) == list(range(20))  # ... all of them, shuffled
    assert any(not np.array_equal(b[:, 1], np.arange(20)) for _, b in pairs)
    again = list(shuffled_chunk_pairs(iter(chunks), chunks if indexable else iter(chunks), seed=3))
    assert all(np.array_equal(x[1], y[1]) for x, y in zip(pairs, again, strict=True))


def test_shuffled_pairs_cut_ragged_chunks_to_the_shorter():
    a = [np.zeros((10, 2)), np.zeros((4, 2))]
    b = [np.ones((10, 2)), np.ones((4, 2))]
    shapes = [(x.shape[0], y.shape[0]) for x, y in shuffled_chunk_pairs(a, b, seed=0)]
    assert shapes == [(4, 4), (4, 4)]
    with pytest.raises(ValueError, match="chunks_a has 2 chunks and chunks_b has 1"):
        list(shuffled_chunk_pairs(a, b[:1]))


@pytest.mark.parametrize("indexable", [True, False])
def test_null_correlations_are_centred_near_zero(indexable):
    """A and B share strong token-level structure *and* chunk-level drift (each chunk comes
    from one 'document' with its own offset). The real pass sees both; the null sees
    neither. Shuffling rows only within chunks would keep the drift."""
    rng = np.random.default_rng(0)
    n_chunks, rows, m = 16, 256, 24
    drift = np.repeat(rng.standard_normal((n_chunks, m)), rows, axis=0)
    a = rng.standard_normal((n_chunks * rows, m)) + 2 * drift
    b = a + 0.5 * rng.standard_normal(a.shape)
    chunks_a, chunks_b = RowChunks(a, rows), RowChunks(b, rows)
    real = streaming_correlation(zip(chunks_a, chunks_b, strict=True)).correlation()
    assert np.diag(real).min() > 0.9
    null = null_correlation(chunks_a, chunks_b if indexable else iter(chunks_b), seed=1)
    r = null.correlation()
    assert null.n_tokens == n_chunks * rows
    assert abs(r.mean()) < 0.02
    assert abs(np.diag(r).mean()) < 0.1  # the true partners lose their correlation
    within_only = streaming_correlation(
        (x, y[rng.permutation(len(y))]) for x, y in zip(chunks_a, chunks_b, strict=True)
    ).correlation()
    assert np.diag(within_only).mean() > 0.5  # why the null pairs different chunks


# ------------------------------------------------------------------- top activations


def test_top_activations_match_a_full_sort():
    rng = np.random.default_rng(0)
    acts = _sae_like(rng, 500, 10).astype(np.float32)
    acts[:, 3] = 0.0
    acts[:, 7] = 0.0
    acts[[5, 77, 301], 7] = [1.0, 3.0, 2.0]  # fires on three tokens only
    top = TopActivations(10, k=8)
    for chunk in RowChunks(acts, 64):
        top.update(chunk)
    sets = top.token_sets()
    for j in (0, 1, 2, 4, 9):
        expected = np.argsort(-acts[:, j], kind="stable")[:8]
        assert set(sets[j].tolist()) == set(expected.tolist())
    assert np.all(sets[3] == -1)
    assert sets[7].tolist() == [77, 301, 5, -1, -1, -1, -1, -1]
    first, second = TopActivations(10, k=8), TopActivations(10, k=8)
    first.update(acts[:250])
    second.update(acts[250:], token_index=np.arange(250, 500))
    np.testing.assert_array_equal(np.sort(first.merge(second).token_sets(), 1), np.sort(sets, 1))


def _top_ids_by_max(acts: np.ndarray, ids: np.ndarray, j: int, k: int) -> list[int]:
    """The definition, directly: distinct ids ranked by max activation (> 0) of latent j,
    ties to the lower id."""
    best: dict[int, float] = {}
    for v, t in zip(acts[:, j], ids, strict=True):
        if v > 0:
            best[int(t)] = max(best.get(int(t), -np.inf), float(v))
    return [t for t, _ in sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))][:k]


def test_top_tokens_are_distinct_ids_by_max_activation_in_any_chunking():
    rng = np.random.default_rng(0)
    acts = _sae_like(rng, 600, 10).astype(np.float32)
    acts[:, 3] = 0.0  # never fires
    ids = rng.integers(0, 25, size=600)  # 25 ids repeated ~24 times each
    # a latent that fires hardest on many occurrences of one id: over rows its top 8
    # would be 8 occurrences of id 7, over ids it is id 7 then 1 and 2
    acts[:, 5] = 0.0
    acts[ids == 7, 5] = 10.0
    acts[np.flatnonzero(ids == 1)[:2], 5] = [2.0, 3.0]
    acts[np.flatnonzero(ids == 2)[0], 5] = 2.5
    top = TopTokens(10, k=8)
    for lo in range(0, 600, 64):
        top.update(acts[lo : lo + 64], ids[lo : lo + 64])
    sets = top.token_sets()
    for j in (0, 1, 2, 4, 9):
        assert sets[j].tolist() == _top_ids_by_max(acts, ids, j, 8)
    assert np.all(sets[3] == -1)
    assert sets[5].tolist() == [7, 1, 2, -1, -1, -1, -1, -1]
    # parts over other chunkings merge into the same sets (one part per worker)
    first, second = TopTokens(10, k=8), TopTokens(10, k=8)
    first.update(torch.from_numpy(acts[:250]), ids[:250])
    second.update(acts[250:], torch.from_numpy(ids[250:]))
    np.testing.assert_array_equal(first.merge(second).token_sets(), sets)
    with pytest.raises(ValueError, match=r"token_ids has shape \(3,\): expected \(4,\)"):
        top.update(acts[:4], ids[:3])


def test_streaming_pairs_iterate_in_lockstep_with_zip():
    """RowChunks iterates and indexes the same windows (the null relies on indexing)."""
    a = np.arange(23.0)[:, None]
    chunks = RowChunks(a, 5)
    assert len(chunks) == 5
    assert [c.shape[0] for c in chunks] == [5, 5, 5, 5, 3]
    for i, c in enumerate(chunks):
        np.testing.assert_array_equal(c, chunks[i])
    assert list(itertools.chain.from_iterable(c[:, 0] for c in chunks)) == list(range(23))
    with pytest.raises(IndexError, match="chunk 5 out of range for 5 chunks"):
        chunks[5]
