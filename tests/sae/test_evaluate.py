import math

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from stages.sae import ArraySource, build_sae, evaluate_sae
from stages.sae.evaluate import evaluate_downstream, evaluate_ground_truth, evaluate_reconstruction

D = 16
HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=D,
        n_ctx=12,
        d_head=8,
        n_heads=2,
        d_vocab=40,
        act_fn="relu",
        d_mlp=32,
        seed=0,
    )
    return HookedTransformer(cfg).eval()


def identity_sae():
    """f = (ReLU(x), ReLU(−x)), x̂ = f·[I; −I] = x: reconstructs exactly."""
    sae = build_sae({"architecture": "relu", "d_in": D, "d_sae": 2 * D, "n_training_tokens": 4096})
    eye = torch.eye(D)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def zero_sae():
    sae = identity_sae()
    with torch.no_grad():
        sae.W_dec.zero_()
    return sae


def noisy_sae(scale):
    sae = identity_sae()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        sae.W_dec.add_(torch.randn(sae.W_dec.shape, generator=g) * scale)
    return sae


def tokens(n=6, seq=10):
    t = torch.randint(1, 40, (n, seq), generator=torch.Generator().manual_seed(1))
    t[:, 0] = 0  # BOS
    return t


def test_perfect_sae_recovers_all_ce_and_has_zero_kl(model):
    out = evaluate_downstream(model, identity_sae(), HOOK, tokens())
    assert out["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert out["kl_sae"] == pytest.approx(0.0, abs=1e-9)
    assert out["ce_zero"] != pytest.approx(out["ce_clean"])  # the ablation does something
    assert out["n_predictions"] == 6 * 8


def test_zero_sae_recovers_nothing(model):
    out = evaluate_downstream(model, zero_sae(), HOOK, tokens())
    assert out["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-9)
    assert out["ce_sae"] == pytest.approx(out["ce_zero"])


def test_imperfect_sae_sits_between_and_random_kl_is_finite(model):
    out = evaluate_downstream(model, noisy_sae(0.3), HOOK, tokens())
    assert 0 < out["kl_sae"] and 0 < out["kl_random"]
    assert out["random_to_sae_kl_ratio"] == pytest.approx(out["kl_random"] / out["kl_sae"])
    # a random toy model need not be hurt by zero-ablation, so only the formula is checked
    want = (out["ce_zero"] - out["ce_sae"]) / (out["ce_zero"] - out["ce_clean"])
    assert out["ce_loss_recovered"] == pytest.approx(want)
    assert out["ce_sae"] != pytest.approx(out["ce_clean"])


def test_bad_hook_and_tokens_are_named(model):
    with pytest.raises(KeyError, match="hook 'blocks.9.nope'"):
        evaluate_downstream(model, identity_sae(), "blocks.9.nope", tokens())
    with pytest.raises(ValueError, match="seq"):
        evaluate_downstream(model, identity_sae(), HOOK, tokens(seq=2))


def test_reconstruction_metrics_of_perfect_and_scaled_saes():
    x = np.random.default_rng(0).standard_normal((700, D)).astype(np.float32) + 1
    src = ArraySource(x, chunk_rows=128)
    m, logd = evaluate_reconstruction(identity_sae(), src, batch_size=100)
    assert m["fvu"] == pytest.approx(0, abs=1e-10) and m["shrinkage"] == pytest.approx(1)
    assert m["l0"] == pytest.approx(D)  # each dimension lights exactly one of its two latents
    assert m["dead_fraction"] == 0 and m["n_tokens"] == 700
    half = identity_sae()
    with torch.no_grad():
        half.W_dec.mul_(0.5)
    m2, _ = evaluate_reconstruction(half, src)
    assert m2["shrinkage"] == pytest.approx(0.5, rel=1e-6)
    assert logd.shape == (2 * D,)


def test_ground_truth_finds_the_planted_latent():
    rng = np.random.default_rng(0)
    n = 500
    labels = rng.random((n, 2)) < 0.3
    x = rng.standard_normal((n, D)).astype(np.float32) * 0.1
    x[:, 3] = np.where(labels[:, 0], 2.0 + rng.random(n), -1.0)  # concept 0 ⇔ x_3 > 0
    src = ArraySource(x, chunk_rows=64)
    gt = evaluate_ground_truth(identity_sae(), src, labels, ["planted", "noise"], batch_size=50)
    assert gt["concepts"]["planted"] == {
        "best_latent": 3,
        "f1": 1.0,
        "auroc": 1.0,
        "n_positive": int(labels[:, 0].sum()),
    }
    assert gt["concepts"]["noise"]["f1"] < 0.7
    assert gt["mean_best_f1"] == pytest.approx((1.0 + gt["concepts"]["noise"]["f1"]) / 2)
    with pytest.raises(ValueError, match="concept labels: shape"):
        evaluate_ground_truth(identity_sae(), src, labels[:10], ["a", "b"])


def test_evaluate_sae_bundles_everything(model):
    x = np.random.default_rng(0).standard_normal((300, D)).astype(np.float32)
    labels = x[:, :1] > 1
    res = evaluate_sae(
        noisy_sae(0.1),
        ArraySource(x, 100),
        model=model,
        hook_name=HOOK,
        tokens=tokens(),
        labels=labels,
        concept_names=["c"],
    )
    assert {"fvu", "downstream", "ground_truth", "log10_feature_density_histogram"} <= set(
        res.metrics
    )
    assert not math.isnan(res.metrics["downstream"]["ce_loss_recovered"])
