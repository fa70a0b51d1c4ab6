"""Dashboard data: the streaming pass against brute force, quantile samples, logit lens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.report.dashboards import (
    DashboardConfig,
    RowMeta,
    collect_feature_stats,
    context_rows,
    logit_lens,
    quantile_samples,
    select_features,
    top_activations,
)
from stages.sae import build_sae


class ArraySource:
    def __init__(self, x: np.ndarray):
        self.x, self.n_rows, self.d_in = x, len(x), x.shape[1]

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.x[start:stop]


def _sae(d_in=8, d_sae=24, k=3, seed=0):
    return build_sae({"architecture": "topk", "d_in": d_in, "d_sae": d_sae, "k": k,
                      "n_training_tokens": 4096, "batch_size": 64, "seed": seed}).eval()  # fmt: skip


def test_streaming_pass_equals_brute_force():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(203, 8)).astype(np.float32)
    labels = (rng.random((203, 3)) < 0.3).astype(np.uint8)
    sae = _sae()
    sel = [0, 5, 17]
    # odd chunk size so the running top-k merges across many chunks, k > chunk size
    stats = collect_feature_stats(sae, ArraySource(x), sel, labels=labels, k=10, batch_rows=7)
    with torch.no_grad():
        f = sae.encode(torch.from_numpy(x)).numpy()
    fired = f > 0
    assert np.array_equal(stats.fire_counts, fired.sum(0))
    np.testing.assert_allclose(stats.max_act, f.max(0), rtol=1e-6)
    np.testing.assert_allclose(stats.selected_acts, f[:, sel], rtol=1e-6)
    np.testing.assert_allclose(stats.concept_tp, labels.T.astype(float) @ fired, rtol=0)
    np.testing.assert_allclose(stats.concept_pos, labels.sum(0))
    for j in range(sae.d_sae):
        want = np.sort(f[:, j])[::-1][:10]
        np.testing.assert_allclose(stats.top_vals[:, j], want, rtol=1e-6)
        # the rows point at those values
        np.testing.assert_allclose(f[stats.top_rows[:, j], j], stats.top_vals[:, j], rtol=1e-6)
    # F1 of "latent fires" as a concept detector, by hand for one pair
    tp = (fired[:, 5] & labels[:, 1].astype(bool)).sum()
    want_f1 = 2 * tp / (fired[:, 5].sum() + labels[:, 1].sum())
    assert stats.concept_f1()[1, 5] == pytest.approx(want_f1)


def test_top_activations_brute_force():
    rng = np.random.default_rng(1)
    a = np.maximum(rng.normal(size=500), 0).astype(np.float32)
    got = top_activations(a, 7)
    order = np.argsort(-a, kind="stable")[:7]
    assert [r for r, _ in got] == order.tolist()
    assert [v for _, v in got] == pytest.approx(a[order].tolist())
    assert top_activations(np.zeros(5, np.float32), 3) == []  # nothing fires: no contexts


def test_quantile_samples_lie_in_their_intervals():
    rng = np.random.default_rng(2)
    a = np.where(rng.random(1000) < 0.4, rng.exponential(2.0, 1000), 0).astype(np.float32)
    qs = quantile_samples(a, 4, 5, seed=3)
    nz = a[a > 0]
    assert len(qs) == 4 and sum(q["n"] for q in qs) == len(nz)
    assert qs[0]["hi"] == pytest.approx(nz.max()) and qs[-1]["lo"] == pytest.approx(nz.min())
    for q in qs:
        assert len(q["rows"]) == 5
        for r, v in q["rows"]:
            assert a[r] == v > 0 and q["lo"] <= v <= q["hi"]
        assert [v for _, v in q["rows"]] == sorted((v for _, v in q["rows"]), reverse=True)
    # the intervals hold equal shares of the firing tokens (±1 for ties at the edges)
    assert max(q["n"] for q in qs) - min(q["n"] for q in qs) <= 2
    assert quantile_samples(np.zeros(4, np.float32), 4, 2) == []


def test_logit_lens_signs():
    d_in, vocab = 4, 9
    W_dec = torch.zeros(2, d_in)
    W_dec[0, 0] = 1.0  # latent 0 writes +e0
    W_dec[1, 1] = -2.0  # latent 1 writes -2·e1
    W_U = torch.zeros(d_in, vocab)
    W_U[0, 3], W_U[0, 7] = 5.0, -4.0  # e0 promotes token 3, suppresses token 7
    W_U[1, 2], W_U[1, 6] = 1.0, -3.0
    pos_ids, pos_vals, neg_ids, neg_vals = logit_lens(W_dec, W_U, [0, 1], 2)
    assert pos_ids[0, 0] == 3 and pos_vals[0, 0] == pytest.approx(5.0)
    assert neg_ids[0, 0] == 7 and neg_vals[0, 0] == pytest.approx(-4.0)
    # a negative decoder row flips the roles: -2·e1 promotes token 6 (+6), suppresses 2 (-2)
    assert pos_ids[1, 0] == 6 and pos_vals[1, 0] == pytest.approx(6.0)
    assert neg_ids[1, 0] == 2 and neg_vals[1, 0] == pytest.approx(-2.0)


def test_context_stays_in_window_and_document():
    # two windows of 5 rows (positions 1..5); doc 1 starts inside window 0 at row 3
    meta = RowMeta(
        token_ids=np.arange(10),
        doc_ids=np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1]),
        positions=np.array([1, 2, 3, 4, 5, 1, 2, 3, 4, 5]),
    )
    assert list(context_rows(meta, 4, left=10, right=10)) == [3, 4]  # doc 1, window 0
    assert list(context_rows(meta, 6, left=10, right=10)) == [5, 6, 7, 8, 9]  # window 1
    assert list(context_rows(meta, 8, left=1, right=0)) == [7, 8]
    assert list(context_rows(meta, 1, left=5, right=1)) == [0, 1, 2]


def test_select_features_reasons():
    dens = np.log10(np.array([0.5, 1e-10, 0.01, 0.2]))
    gt = {"concepts": {"dog": {"best_latent": 2, "f1": 0.8, "n_positive": 5},
                       "cat": {"best_latent": 3, "f1": 0.0, "n_positive": 0}}}  # fmt: skip
    cfg = DashboardConfig(n_most_active=3)
    got = select_features(dens, gt, {1: ["steering component"]}, cfg, d_sae=4)
    assert got == {0: ["most active #1"], 3: ["most active #2"],
                   2: ["most active #3", "concept dog (F1 0.80)"], 1: ["steering component"]}  # fmt: skip
    with pytest.raises(ValueError, match="out of range"):
        select_features(dens, None, {9: ["x"]}, cfg, d_sae=4)
