import pytest
import torch

from stages.sae import ARCHITECTURES, build_sae, parse_sae_config
from stages.sae.jumprelu import JumpReLUFn, StepFn, StepFnToPreActs, pre_act_loss

D_IN, D_SAE = 12, 40
ARCH_CFG = {
    "relu": {"l1_coefficient": 1.0},
    "topk": {"k": 5},
    "batchtopk": {"k": 5},
    "jumprelu": {"l0_coefficient": 0.1},
    "gated": {"l1_coefficient": 0.1},
}


def make(arch, **kw):
    cfg = {
        "architecture": arch,
        "d_in": D_IN,
        "d_sae": D_SAE,
        "n_training_tokens": 4096,
        "batch_size": 64,
        **ARCH_CFG[arch],
        **kw,
    }
    return build_sae(cfg)


def randomise(sae, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sae.named_parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        if hasattr(sae, "threshold"):
            sae.threshold.abs_()  # thresholds are kept positive in training
    return sae


def test_registry_has_the_five_architectures():
    assert set(ARCHITECTURES) == {"relu", "topk", "batchtopk", "jumprelu", "gated"}


@pytest.mark.parametrize("arch", sorted(ARCH_CFG))
def test_forward_shapes_loss_terms_and_gradients(arch):
    sae = randomise(make(arch))
    x = torch.randn(64, D_IN)
    out = sae(x)
    assert out.x_hat.shape == x.shape
    assert "mse" in out.terms and torch.isfinite(out.loss)
    assert float(out.loss.detach()) == pytest.approx(
        sum(float(v.detach()) for v in out.terms.values()), rel=1e-5
    )
    assert float(out.terms["mse"]) == pytest.approx(
        float(((out.x_hat - x) ** 2).sum(1).mean()), rel=1e-5
    )
    out.loss.backward()
    assert sae.W_enc.grad is not None and torch.isfinite(sae.W_enc.grad).all()
    assert sae.W_dec.grad is not None and sae.W_dec.grad.abs().sum() > 0
    f = sae.encode(x)
    assert f.shape == (64, D_SAE) and (f >= 0).all()
    assert sae.W_enc.shape == (D_IN, D_SAE) and sae.W_dec.shape == (D_SAE, D_IN)


@pytest.mark.parametrize("arch", ["relu", "topk", "jumprelu", "gated"])
def test_training_forward_matches_inference_encode(arch):
    sae = randomise(make(arch)).eval()
    x = torch.randn(32, D_IN)
    with torch.no_grad():
        assert torch.allclose(sae(x).x_hat, sae.decode(sae.encode(x)), atol=1e-5)


def test_topk_keeps_at_most_k():
    sae = randomise(make("topk"))
    f = sae.encode(torch.randn(50, D_IN))
    assert ((f > 0).sum(1) <= 5).all()


@pytest.mark.parametrize("with_dead", [False, True])
def test_topk_sparse_kernels_match_dense_autograd(with_dead):
    x = torch.randn(64, D_IN)
    dead = torch.zeros(D_SAE, dtype=torch.bool)
    dead[::3] = with_dead
    grads, losses = [], []
    for sparse in (True, False):
        sae = randomise(make("topk", use_sparse_kernels=sparse, k_aux=6))
        out = sae(x, dead_mask=dead)
        out.loss.backward()
        losses.append({k: float(v) for k, v in out.terms.items()})
        grads.append({n: p.grad.clone() for n, p in sae.named_parameters()})
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)
    assert ("auxk" in losses[0]) == with_dead
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-5), n


def test_batchtopk_mean_l0_is_k_and_threshold_is_learned():
    sae = randomise(make("batchtopk")).train()
    x = torch.randn(64, D_IN)
    out = sae(x)
    assert float(out.l0) == pytest.approx(5, abs=0.01)
    assert (sae.threshold > 0).all() and (sae.threshold == sae.threshold[0]).all()
    sae.eval()  # inference uses the threshold, not the batch
    f1 = sae.encode(x[:1])
    f2 = sae.encode(x)[:1]
    assert torch.allclose(f1, f2, atol=1e-6)


def test_jumprelu_straight_through_gradients():
    z = torch.tensor([[0.5, 1.02, 2.0]], requires_grad=True)
    th = torch.tensor([1.0, 1.0, 1.0], requires_grad=True)
    eps = 0.1
    JumpReLUFn.apply(z, th, eps).sum().backward()
    # d/dz: 1 where z > θ; d/dθ: −(θ/ε)·K((z−θ)/ε) with K the unit rectangle
    assert z.grad.tolist() == [[0.0, 1.0, 1.0]]
    assert th.grad.tolist() == pytest.approx([0.0, -10.0, 0.0])
    th.grad = None
    StepFn.apply(z.detach(), th, eps).sum().backward()
    assert th.grad.tolist() == pytest.approx([0.0, -10.0, 0.0])
    # with a target L0 the step's gradient reaches z too: +(1/ε)·K((z−θ)/ε)
    th.grad, z.grad = None, None
    StepFnToPreActs.apply(z, th, eps).sum().backward()
    assert th.grad.tolist() == pytest.approx([0.0, -10.0, 0.0])
    assert z.grad.tolist() == [pytest.approx([0.0, 10.0, 0.0])]


def test_pre_act_loss_closed_form():
    """mean_b Σ_{i dead} ReLU(θ_i − pre_bi) ‖W_dec,i‖: rows (0.9·2, 0.5·2), mean 1.4;
    its gradient lifts only a dead latent's pre-activations below θ, by ‖W_dec,i‖ / B."""
    pre = torch.tensor([[0.1, 2.0, 0.0], [0.5, -1.0, 3.0]], requires_grad=True)
    th = torch.tensor([1.0, 1.5, 1.0], requires_grad=True)
    dead = torch.tensor([True, False, True])
    W_dec = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    loss = pre_act_loss(pre, th, dead, W_dec)
    assert float(loss.detach()) == pytest.approx(
        (1.8 + 1.0 + 1.0) / 2
    )  # latent 2: row 1 is above θ
    loss.backward()
    assert pre.grad.tolist() == [pytest.approx([-1.0, 0.0, -0.5]), pytest.approx([-1.0, 0.0, 0.0])]
    assert th.grad.tolist() == pytest.approx([2.0, 0.0, 0.5])


def test_pre_act_loss_revives_dead_jumprelu_latents():
    """Half the latents start with a threshold no row reaches. Trained with the trainer's
    dead mask, they stay silent without the loss (θ's straight-through gradient lives only
    within ε of θ) and fire again with it."""
    x = torch.randn(256, D_IN, generator=torch.Generator().manual_seed(0))
    dead = torch.arange(D_SAE) % 2 == 0

    def firing_after(pre_act_coefficient, steps=60):
        sae = make("jumprelu", pre_act_coefficient=pre_act_coefficient)
        randomise(sae)
        with torch.no_grad():
            sae.threshold[dead] = 4.0 + sae.pre_acts(x).max()
        opt = torch.optim.Adam(sae.parameters(), lr=0.05)
        for _ in range(steps):
            opt.zero_grad()
            sae(x, dead_mask=dead).loss.backward()
            opt.step()
            sae.after_optimizer_step()
        return int((sae.encode(x)[:, dead] > 0).any(0).sum())

    assert firing_after(0.0) == 0
    assert firing_after(1.0) == int(dead.sum())


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "jumprelu", "gated"])
def test_unit_norm_decoder_is_kept(arch):
    sae = make(arch)
    x = torch.randn(64, D_IN) * 3
    opt = torch.optim.Adam(sae.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        sae(x).loss.backward()
        sae.before_optimizer_step()
        # the parallel component is gone: each grad row is orthogonal to its decoder row
        assert (sae.W_dec.grad * sae.W_dec).sum(1).abs().max() < 1e-4
        opt.step()
        sae.after_optimizer_step()
        assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(D_SAE), atol=1e-5)


def test_relu_decoder_is_free_and_starts_small():
    sae = make("relu")
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.full((D_SAE,), 0.1), atol=1e-6)
    assert torch.allclose(sae.W_enc, sae.W_dec.T)
    assert not sae.apply_b_dec_to_input


@pytest.mark.parametrize("arch", sorted(ARCH_CFG))
def test_folding_the_input_scale(arch):
    sae = randomise(make(arch)).eval()
    x = torch.randn(30, D_IN) * 5
    s = 0.37
    with torch.no_grad():
        f_scaled = sae.encode(s * x)
        xhat_scaled = sae.decode(f_scaled)
        sae.fold_input_scale(s)
        assert torch.allclose(sae.encode(x), f_scaled, atol=1e-5)
        assert torch.allclose(sae.decode(sae.encode(x)), xhat_scaled / s, atol=1e-4)


def test_sparsity_scale_multiplies_the_penalty():
    sae = randomise(make("relu"))
    x = torch.randn(16, D_IN)
    full, half = sae(x, sparsity_scale=1.0), sae(x, sparsity_scale=0.5)
    assert float(half.terms["l1"]) == pytest.approx(0.5 * float(full.terms["l1"]))


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match="unknown SAE architecture 'nope'"):
        parse_sae_config({"architecture": "nope"})
    with pytest.raises(ValueError, match="k"):
        parse_sae_config({"architecture": "topk", "d_sae": 8, "n_training_tokens": 10**5})
    with pytest.raises(ValueError, match="k = 9 exceeds d_sae = 8"):
        parse_sae_config({"architecture": "topk", "k": 9, "d_sae": 8, "n_training_tokens": 10**5})
    with pytest.raises(ValueError, match="d_sae or expansion_factor"):
        parse_sae_config({"architecture": "relu", "n_training_tokens": 10**5})
    with pytest.raises(ValueError, match="extra"):
        parse_sae_config({"architecture": "relu", "d_sae": 4, "n_training_tokens": 10**5, "kk": 1})


def test_expansion_factor_and_d_in_check():
    cfg = parse_sae_config(
        {"architecture": "topk", "k": 4, "expansion_factor": 4, "n_training_tokens": 10**5}
    )
    assert cfg.with_d_in(16).width == 64
    assert cfg.with_d_in(16).display_name == "topk-64-k4"
    with pytest.raises(ValueError, match=r"d_in = 16, but acts has d_in = 32"):
        cfg.with_d_in(16).with_d_in(32, "acts")


def test_schedules():
    cfg = parse_sae_config(
        {
            "architecture": "relu",
            "d_sae": 4,
            "n_training_tokens": 100 * 4096,
            "lr": 1.0,
            "lr_warmup_steps": 10,
            "lr_decay_fraction": 0.2,
            "sparsity_warmup_steps": 5,
        }
    )
    assert cfg.lr_at(0) == pytest.approx(0.1) and cfg.lr_at(9) == 1.0
    assert cfg.lr_at(50) == 1.0 and cfg.lr_at(90) == pytest.approx(0.5)
    assert cfg.lr_at(99) == pytest.approx(0.05)
    assert cfg.sparsity_scale_at(0) == pytest.approx(0.2) and cfg.sparsity_scale_at(10) == 1.0
