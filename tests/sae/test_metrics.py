import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from stages.sae import metrics as M


def _x(n=200, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 2 + 1


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 64), d=st.integers(1, 16), seed=st.integers(0, 2**31 - 1))
def test_perfect_reconstruction(n, d, seed):
    x = _x(n, d, seed)
    assert M.fvu(x, x) == 0
    assert M.mse(x, x) == 0
    assert M.explained_variance(x, x) == 1
    assert M.cosine_similarity(x, x) == pytest.approx(1)
    assert M.shrinkage(x, x) == pytest.approx(1)


def test_predicting_the_mean_gives_fvu_one():
    x = _x()
    assert M.fvu(x, x.mean(0).expand_as(x)) == pytest.approx(1, abs=1e-12)


@settings(max_examples=40, deadline=None)
@given(c=st.floats(0.01, 10), n=st.integers(1, 64), d=st.integers(1, 16),
       seed=st.integers(0, 2**31 - 1))  # fmt: skip
def test_shrinkage_of_scaled_reconstruction_is_the_scale(c, n, d, seed):
    x = _x(n, d, seed)
    assert M.shrinkage(x, c * x) == pytest.approx(c, rel=1e-5)


def test_fvu_is_not_the_per_dimension_average():
    # one dimension with tiny variance reconstructed badly: the per-dimension-averaged
    # variant would call this FVU ≈ 0.5, the total-variance definition ≈ 0
    g = torch.Generator().manual_seed(1)
    x = torch.cat(
        [torch.randn(500, 1, generator=g) * 10, torch.randn(500, 1, generator=g) * 0.01], 1
    )
    x_hat = x.clone()
    x_hat[:, 1] = 0
    assert M.fvu(x, x_hat) < 1e-5


def test_mse_value():
    x = torch.zeros(4, 2)
    assert M.mse(x, torch.ones(4, 2) * 3) == 9


def test_l0_l1():
    f = torch.tensor([[0.0, 2.0, -1.0], [0.0, 0.0, 0.5]])
    assert M.l0(f) == 1.5
    assert M.l1(f) == pytest.approx((3 + 0.5) / 2)


def test_dead_dense_and_histogram():
    counts = torch.tensor([0, 0, 5, 50, 1000])
    dens = M.feature_density(counts, 1000)
    assert M.dead_fraction(dens) == 0.4
    assert M.dense_fraction(dens) == 0.2  # > 10 %: only the latent at 100 %
    h = M.log10_density_histogram(dens, bins=8, lo=-8, hi=0)
    assert h["dead"] == 2 and sum(h["counts"]) == 3
    assert M.log10_density(dens)[2] == pytest.approx(math.log10(0.005), abs=1e-6)


def test_ce_recovered_closed_form():
    assert M.ce_loss_recovered(2.0, 2.0, 5.0) == 1.0
    assert M.ce_loss_recovered(2.0, 5.0, 5.0) == 0.0
    assert M.ce_loss_recovered(2.0, 3.5, 5.0) == 0.5
    assert M.ce_loss_recovered(2.0, 6.0, 5.0) == pytest.approx(-1 / 3)  # worse than ablation


def test_ce_recovered_is_nan_when_zero_ablation_does_not_hurt():
    # CE_zero ≤ CE_clean (an untrained model): no loss to recover, the ratio means nothing
    assert math.isnan(M.ce_loss_recovered(4.03, 4.08, 3.96))  # would read 1.71
    assert math.isnan(M.ce_loss_recovered(4.03, 4.03, 3.96))  # would read 1.0
    assert math.isnan(M.ce_loss_recovered(2.0, 2.0, 2.0))


def test_kl():
    a = torch.randn(3, 10)
    assert torch.allclose(M.kl_divergence(a, a), torch.zeros(3, dtype=torch.float64), atol=1e-12)
    p = torch.log(torch.tensor([0.5, 0.5]))
    q = torch.log(torch.tensor([0.9, 0.1]))
    want = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert float(M.kl_divergence(p, q)) == pytest.approx(want)


def test_auroc_closed_forms():
    lab = torch.tensor([0, 0, 1, 1]).bool()
    assert M.auroc(torch.tensor([0.1, 0.2, 0.3, 0.4]), lab) == 1.0
    assert M.auroc(torch.tensor([0.4, 0.3, 0.2, 0.1]), lab) == 0.0
    assert M.auroc(torch.zeros(4), lab) == 0.5  # all tied
    assert M.auroc(torch.tensor([0.1, 0.3, 0.2, 0.4]), lab) == 0.75


@settings(max_examples=30, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.booleans()), min_size=2, max_size=30))
def test_auroc_matches_pair_counting(pairs):
    s = torch.tensor([float(a) for a, _ in pairs])
    lab = torch.tensor([b for _, b in pairs])
    pos, neg = s[lab], s[~lab]
    if len(pos) == 0 or len(neg) == 0:
        assert math.isnan(M.auroc(s, lab))
        return
    want = sum(float(p > n) + 0.5 * float(p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert M.auroc(s, lab) == pytest.approx(want)


def test_best_latent_f1_finds_the_planted_latent():
    g = torch.Generator().manual_seed(0)
    labels = torch.rand(300, 2, generator=g) < 0.2
    acts = torch.rand(300, 6, generator=g) * (torch.rand(300, 6, generator=g) < 0.3)
    acts[:, 4] = labels[:, 0].float() * 2.0  # latent 4 is concept 0 exactly
    idx, f1 = M.best_latent_f1(acts, labels)
    assert int(idx[0]) == 4 and float(f1[0]) == 1.0
    assert float(f1[1]) < 1.0


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 5), st.integers(0, 1000))
def test_streaming_stats_equal_the_formulas(n_batches, seed):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(17, 5, generator=g) + 3 for _ in range(n_batches)]
    hs = [x * 0.8 + torch.randn(x.shape, generator=g) * 0.1 for x in xs]
    fs = [torch.relu(torch.randn(17, 7, generator=g)) for _ in range(n_batches)]
    stats = M.ReconstructionStats(5, 7)
    for x, h, f in zip(xs, hs, fs, strict=True):
        stats.update(x, h, f)
    out = stats.compute()
    x, h, f = torch.cat(xs), torch.cat(hs), torch.cat(fs)
    assert out["fvu"] == pytest.approx(M.fvu(x, h), rel=1e-9)
    assert out["mse"] == pytest.approx(M.mse(x, h), rel=1e-9)
    assert out["shrinkage"] == pytest.approx(M.shrinkage(x, h), rel=1e-9)
    assert out["cosine_similarity"] == pytest.approx(M.cosine_similarity(x, h), rel=1e-9)
    assert out["l0"] == pytest.approx(M.l0(f)) and out["l1"] == pytest.approx(M.l1(f))
