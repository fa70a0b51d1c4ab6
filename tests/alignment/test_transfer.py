"""transfer_vector: B a permuted copy of A must give back the same vector."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.alignment import hungarian_matches
from stages.alignment.transfer import decompose_vector, transfer_vector
from tests.alignment._stores import permuted_copy, tiny_topk_sae

D, M = 16, 48


@pytest.fixture(scope="module")
def pair():
    rng = np.random.default_rng(0)
    sae_a = tiny_topk_sae(D, M, 4, seed=3)
    with torch.no_grad():
        sae_a.b_enc.copy_(torch.from_numpy(rng.normal(0, 0.1, M)).float())
    perm = rng.permutation(M)  # B's latent j is A's latent perm[j]
    sae_b = permuted_copy(sae_a, perm)
    # The matches a permuted copy gets from its activation correlations.
    x = torch.randn(4000, D, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fa, fb = sae_a.encode(x).numpy(), sae_b.encode(x).numpy()
    live = (fa > 0).any(0)
    corr = np.corrcoef(fa[:, live].T, fb.T)[: live.sum(), live.sum() :]
    full = np.zeros((M, M))
    full[live] = np.nan_to_num(corr)
    matches = hungarian_matches(full)
    np.testing.assert_array_equal(matches.b_index[live], np.argsort(perm)[live])
    return sae_a, sae_b, matches


def test_nnls_transfer_to_a_permuted_copy_returns_the_vector(pair):
    sae_a, sae_b, matches = pair
    w = sae_a.W_dec.detach()
    live = np.flatnonzero(np.isin(np.arange(M), matches.a_index[matches.score > 0.99]))
    v = 2.0 * w[live[0]] + 0.5 * w[live[3]]  # in the cone of A's decoder rows
    coef = decompose_vector(v, sae_a, "nnls")
    assert coef.min() >= 0.0
    out = transfer_vector(v, sae_a, sae_b, matches, min_score=0.99)
    torch.testing.assert_close(out, v, atol=1e-5, rtol=1e-5)


def test_encode_transfer_equals_the_decoder_rebuild_in_a(pair):
    sae_a, sae_b, matches = pair
    v = torch.randn(D, generator=torch.Generator().manual_seed(1)) * 3
    f = decompose_vector(v, sae_a, "encode")
    assert (f >= 0).all() and (f > 0).sum() <= 4
    expected = torch.from_numpy(f @ sae_a.W_dec.detach().double().numpy()).float()
    out = transfer_vector(v, sae_a, sae_b, matches, method="encode")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # k keeps only the largest coefficient.
    top = int(np.argmax(f))
    out1 = transfer_vector(v, sae_a, sae_b, matches, k=1, method="encode")
    torch.testing.assert_close(
        out1, float(f[top]) * sae_a.W_dec.detach()[top], atol=1e-5, rtol=1e-5
    )


def test_transfer_refuses_matches_of_other_saes(pair):
    sae_a, _, matches = pair
    other = tiny_topk_sae(D, M + 1, 4)
    with pytest.raises(ValueError, match="matches are between"):
        transfer_vector(torch.zeros(D), sae_a, other, matches)
