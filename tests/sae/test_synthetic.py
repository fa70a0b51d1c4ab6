import numpy as np
import pytest
import torch

from stages.sae import ArraySource, TopKConfig, train_saes
from stages.sae.synthetic import SyntheticFeatures, mmcs


def test_mmcs_closed_forms():
    gen = SyntheticFeatures(8, 20, seed=0)
    feats = torch.from_numpy(gen.features)
    assert mmcs(feats, feats) == pytest.approx(1.0)
    assert mmcs(feats[torch.randperm(20)] * 3, feats) == pytest.approx(1.0)  # order, scale
    assert mmcs(-feats, feats) < 0.9  # sign matters
    assert mmcs(torch.eye(8), np.eye(8)[:2]) == pytest.approx(1.0)


def test_generator_statistics_and_determinism():
    gen = SyntheticFeatures(16, 64, mean_active=4, probability_decay=0.97, seed=1)
    src = gen.source(20000, chunk_rows=1000)
    assert np.array_equal(src.read(1500, 2500), src.materialize()[1500:2500])
    assert gen.probabilities.sum() == pytest.approx(4)
    assert gen.probabilities[0] > gen.probabilities[-1]
    corr = SyntheticFeatures(16, 64, mean_active=4, correlation=0.5, seed=1)
    x = corr.sample(5000, np.random.default_rng(0))
    assert x.shape == (5000, 16) and np.isfinite(x).all()


def test_topk_sae_recovers_planted_features():
    """Sharkey et al. set-up: 64 sparse features in superposition in 32 dimensions
    (≈4 active per sample); a TopK SAE with twice as many latents finds them."""
    gen = SyntheticFeatures(32, 64, mean_active=4, seed=0)
    n = 400_000
    src = ArraySource(gen.source(n, chunk_rows=1024).materialize(), chunk_rows=1024)
    cfg = TopKConfig(
        k=4,
        d_sae=128,
        n_training_tokens=n,
        batch_size=512,
        lr=1e-3,
        dead_feature_window=20 * 512,
        seed=0,
    )
    (r,) = train_saes(src, [cfg], progress=False)
    score = mmcs(r.sae.W_dec, gen.features)
    assert score >= 0.9, f"MMCS {score:.3f}"
