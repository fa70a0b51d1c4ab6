"""The L1 family's sparse training path (`stages/sae/sparse_ops.py`): the CSR active set,
and loss terms, firing counts and every gradient equal to dense autograd's."""

import numpy as np
import pytest
import torch

from stages.sae import build_sae, sparse_ops, train_saes
from stages.sae.data import ArraySource
from stages.sae.synthetic import SyntheticFeatures

D_IN, D_SAE, B = 16, 256, 128
COEF = {"relu": {"l1_coefficient": 1.0}, "gated": {"l1_coefficient": 0.3},
        "jumprelu": {"l0_coefficient": 0.1}}  # fmt: skip


def test_active_set_is_the_csr_of_the_entries_above_the_floor():
    pre = torch.tensor([[0.5, -1.0, 2.0, 0.0], [-3.0, -1.0, -2.0, -0.5], [1.0, 1.0, -1.0, 0.1]])
    sparse_ops_max = sparse_ops.MAX_SPARSE_DENSITY
    try:
        sparse_ops.MAX_SPARSE_DENSITY = 1.0
        code = sparse_ops.active_set(pre)
        assert code.crow.tolist() == [0, 2, 2, 5]
        assert code.col.tolist() == [0, 2, 0, 1, 3]
        assert code.vals.tolist() == pytest.approx([0.5, 2.0, 1.0, 1.0, 0.1])
        # a floor per column: column 3's floor −1 lets −0.5 and 0.0 in
        code = sparse_ops.active_set(pre, torch.tensor([0.0, 0.0, 0.0, -1.0]))
        assert code.col.tolist() == [0, 2, 3, 3, 0, 1, 3]
        assert code.crow.tolist() == [0, 3, 4, 7]
        assert sparse_ops.active_set(pre, 5.0) is None  # nothing active
        sparse_ops.MAX_SPARSE_DENSITY = 0.4  # 5 of 12 entries is 0.42: too dense
        assert sparse_ops.active_set(pre) is None
    finally:
        sparse_ops.MAX_SPARSE_DENSITY = sparse_ops_max


def _pair(arch, seed, **kw):
    """A sparse-kernel SAE and a dense twin with the same random state, its biases
    lowered so that a few percent of latents fire."""
    cfg = {"architecture": arch, "d_in": D_IN, "d_sae": D_SAE, "n_training_tokens": 4096,
           "batch_size": B, **COEF[arch], **kw}  # fmt: skip
    sae, twin = (
        build_sae({**cfg, "use_sparse_kernels": True}),
        build_sae({**cfg, "use_sparse_kernels": False}),
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sae.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        for name in ("b_enc", "b_gate"):
            if hasattr(sae, name):
                getattr(sae, name).sub_(2.0)
        if arch == "jumprelu":  # thresholds spread over the pre-activations' upper tail
            sae.threshold.copy_(torch.rand(D_SAE, generator=g) * 0.5 + 0.02)
        twin.load_state_dict(sae.state_dict())
    return sae, twin


@pytest.mark.parametrize(
    "arch,kw",
    [("relu", {}), ("gated", {}), ("jumprelu", {}), ("jumprelu", {"target_l0": 4.0})],
    ids=["relu", "gated", "jumprelu", "jumprelu-target"],
)
def test_sparse_path_matches_dense_autograd(arch, kw):
    x = torch.randn(B, D_IN, generator=torch.Generator().manual_seed(7))
    sae, twin = _pair(arch, seed=1, **kw)
    bias = sae.b_gate if arch == "gated" else sae.b_enc
    floor = 0.0
    if arch == "jumprelu":
        floor = sae.threshold.detach() - 0.5 * sae.cfg.bandwidth * (1 + 1e-3)
    code = sae.sparse_code(sae.fused_pre_acts(x, bias), floor)
    assert code is not None, "the state must put this batch on the sparse path"
    assert 0 < code.col.numel() < 0.05 * B * D_SAE
    outs = [m(x, 0.7) for m in (sae, twin)]
    assert torch.equal(outs[0].fire_counts, outs[1].fire_counts)
    assert float(outs[0].l0) == pytest.approx(float(outs[1].l0), abs=1e-6)
    # x̂ = b_dec + Σ f_k W_dec[k] sums terms up to |x̂|'s scale that can cancel to a small
    # entry; the two paths add them in other orders, so they may differ by a few float32
    # ulps of that scale, not of the entry (gated on an AMD EPYC: 1.07e-6 at an entry of
    # 0.0073 beside terms near 6, over an atol of 1e-6 that held on another CPU)
    scale = float(outs[1].x_hat.detach().abs().max())
    atol = 32 * torch.finfo(torch.float32).eps * scale
    assert torch.allclose(outs[0].x_hat, outs[1].x_hat, rtol=1e-5, atol=atol)
    assert set(outs[0].terms) == set(outs[1].terms)
    for k in outs[0].terms:
        assert float(outs[0].terms[k]) == pytest.approx(float(outs[1].terms[k]), rel=1e-5), k
    for out in outs:
        out.loss.backward()
    for (name, p), (_, q) in zip(sae.named_parameters(), twin.named_parameters(), strict=True):
        scale = float(q.grad.abs().max())
        assert scale > 0, f"{name}: no gradient to compare"
        assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-5 * scale), name
        assert p.grad.stride() == q.grad.stride(), name  # W_enc stays column-major


@pytest.mark.parametrize("arch", sorted(COEF))
def test_dense_batches_stay_on_the_dense_path(arch):
    """At initialisation about half of all latents fire: far above the sparse path's
    density limit, so training starts dense."""
    sae = build_sae({"architecture": arch, "d_in": D_IN, "d_sae": D_SAE,
                     "n_training_tokens": 4096, **COEF[arch]})  # fmt: skip
    x = torch.randn(B, D_IN)
    bias = sae.b_gate if arch == "gated" else sae.b_enc
    assert sae.sparse_code(sae.fused_pre_acts(x, bias)) is None


def test_relu_training_takes_the_sparse_path_and_lands_where_dense_does():
    """A ReLU SAE trained on planted features: its L0 falls below the density limit,
    after which its steps run sparse; the result is the dense run's to within the noise
    of a different summation order."""
    gen = SyntheticFeatures(32, 256, mean_active=4, probability_decay=0.99, seed=0)
    x = gen.source(98304, chunk_rows=4096).read(0, 98304).astype(np.float32)
    train, held = ArraySource(x[:81920]), torch.from_numpy(x[81920:])
    results = {}
    for sparse in (True, False):
        cfg = {"architecture": "relu", "d_in": 32, "d_sae": 1024, "n_training_tokens": 81920,
               "batch_size": 512, "lr": 3e-3, "l1_coefficient": 5.0, "use_sparse_kernels": sparse}  # fmt: skip
        (r,) = train_saes(train, [cfg], progress=False)
        with torch.no_grad():
            f = r.sae.encode(held)
            fvu = float(((r.sae.decode(f) - held) ** 2).sum() / ((held - held.mean(0)) ** 2).sum())
        results[sparse] = (fvu, float((f > 0).sum(1).float().mean()), r.sae)
    (fvu_s, l0_s, sae_s), (fvu_d, l0_d, _) = results[True], results[False]
    # the trained SAE's batches run sparse (the scale is folded in: raw rows will do)
    xb = torch.from_numpy(x[:512])
    assert sae_s.sparse_code(sae_s.fused_pre_acts(xb, sae_s.b_enc)) is not None
    assert fvu_s < 0.8 and fvu_d < 0.8, (fvu_s, fvu_d)  # it learns (FVU 0.66 here)
    assert fvu_s == pytest.approx(fvu_d, rel=0.1)
    assert l0_s == pytest.approx(l0_d, rel=0.15)


@pytest.mark.parametrize("arch", ["relu", "gated", "jumprelu"])
def test_sparse_gradients_are_reproducible_on_a_large_batch(arch):
    # ~100k active entries, enough for CPU kernels to split the work across threads:
    # picking per-latent parameters with t[col] summed its gradient (index_put_ with
    # accumulate) in a thread-dependent order, so relu, gated and JumpReLU training was
    # not bit-reproducible on the sparse path (index_select sums in a fixed order)
    cfg = {"architecture": arch, "d_in": D_IN, "d_sae": 1024, "n_training_tokens": 4096,
           "batch_size": 4096, **COEF[arch]}  # fmt: skip
    sae = build_sae(cfg)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, D_IN, generator=g)
    with torch.no_grad():
        for _, p in sae.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        # each latent active on ~2 % of the rows: its encoder bias (relu, gated) or its
        # threshold (JumpReLU) at its pre-activations' 98th percentile
        bias = "threshold" if arch == "jumprelu" else ("b_gate" if arch == "gated" else "b_enc")
        q = sae.fused_pre_acts(x, torch.zeros(1024)).quantile(0.98, dim=0)
        getattr(sae, bias).copy_(q + sae.cfg.bandwidth if arch == "jumprelu" else -q)
    grads, threads = [], torch.get_num_threads()
    torch.set_num_threads(2)  # this folder's tests run on one thread, which hid it
    try:
        for _ in range(4):
            sae.zero_grad(set_to_none=True)
            out = sae(x)
            assert 50_000 < int(out.fire_counts.sum()) < 0.05 * 4096 * 1024  # sparse path
            out.loss.backward()
            grads.append({n: p.grad.clone() for n, p in sae.named_parameters()})
    finally:
        torch.set_num_threads(threads)
    for other in grads[1:]:
        for n, v in grads[0].items():
            assert torch.equal(v, other[n]), n


@pytest.mark.parametrize("threads", [1, 2])
def test_transposed_products_are_torchs_own_transpose_bit_for_bit(threads):
    # Sᵀ @ dense through the pattern's transpose (built once per code, kept in its memo)
    # instead of torch's S.t() @ dense, which converts the transpose back to CSR on every
    # call: the same sums in the same order, so the same bits (the SAE weights and every
    # stage after them stay byte-identical); rows and columns without entries included
    g = torch.Generator().manual_seed(0)
    b, n, d = 3000, 700, 48
    pre = torch.randn(b, n, generator=g)
    pre[::7] = -10.0  # empty rows
    pre[:, ::11] = -10.0  # empty columns
    code = sparse_ops.active_set(pre, 2.0)  # ~2 % of the entries
    assert code is not None and code.memo == {}
    dense = torch.randn(b, d, generator=g)
    values = torch.randn(code.col.shape, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ref = sparse_ops._csr(code.crow, code.col, values, n).t() @ dense
        got = sparse_ops.transposed_product(code.crow, code.col, values, n, dense, code.memo)
        kept = code.memo["t"]
        again = sparse_ops.transposed_product(code.crow, code.col, values, n, dense, code.memo)
        plain = sparse_ops.transposed_product(code.crow, code.col, values, n, dense, None)
    finally:
        torch.set_num_threads(before)
    assert ref.shape == (n, d) and ref.abs().sum() > 0
    assert torch.equal(got, ref) and torch.equal(again, ref) and torch.equal(plain, ref)
    assert code.memo["t"] is kept  # built once, reused
    crow_t, col_t, perm = kept
    assert crow_t.tolist() == torch.cat([torch.zeros(1, dtype=torch.int64),
                                         torch.bincount(code.col, minlength=n).cumsum(0)]).tolist()  # fmt: skip
    # within each transposed row the original rows ascend (the stable order)
    for j in range(0, n, 97):
        rows = col_t[crow_t[j] : crow_t[j + 1]]
        assert torch.all(rows[1:] > rows[:-1])
    assert torch.equal(code.col[perm], torch.repeat_interleave(torch.arange(n), crow_t.diff()))
