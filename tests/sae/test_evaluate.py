import json
import math

import numpy as np
import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from stages.sae import ArraySource, build_sae, evaluate_sae, save_sae
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
    """Random tokens: an untrained model predicts them worse than a zero-ablated one."""
    t = torch.randint(1, 40, (n, seq), generator=torch.Generator().manual_seed(1))
    t[:, 0] = 0  # BOS
    return t


@pytest.fixture(scope="module")
def model_tokens(model):
    """Greedy continuations of the model itself: text it predicts well, so zero-ablating
    the hook hurts (CE_zero > CE_clean) and CE loss recovered is defined."""
    t = tokens()
    with torch.no_grad():
        for i in range(2, t.shape[1]):
            t[:, i] = model(t[:, :i])[:, -1].argmax(-1)
    return t


def test_perfect_sae_recovers_all_ce_and_has_zero_kl(model, model_tokens):
    out = evaluate_downstream(model, identity_sae(), HOOK, model_tokens)
    assert out["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-6)
    assert out["kl_sae"] == pytest.approx(0.0, abs=1e-9)
    assert out["ce_zero"] > out["ce_clean"] + 0.5  # the ablation hurts
    assert out["n_predictions"] == 6 * 8


def test_zero_sae_recovers_nothing(model, model_tokens):
    out = evaluate_downstream(model, zero_sae(), HOOK, model_tokens)
    assert out["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-9)
    assert out["ce_sae"] == pytest.approx(out["ce_zero"])


def test_imperfect_sae_sits_between_and_random_kl_is_finite(model, model_tokens):
    out = evaluate_downstream(model, noisy_sae(0.3), HOOK, model_tokens)
    assert 0 < out["kl_sae"] and 0 < out["kl_random"]
    assert out["random_to_sae_kl_ratio"] == pytest.approx(out["kl_random"] / out["kl_sae"])
    want = (out["ce_zero"] - out["ce_sae"]) / (out["ce_zero"] - out["ce_clean"])
    assert out["ce_loss_recovered"] == pytest.approx(want)
    assert 0.3 < out["ce_loss_recovered"] < 0.95  # measured 0.684
    assert out["ce_sae"] != pytest.approx(out["ce_clean"])


def test_ce_recovered_is_nan_when_zero_ablation_does_not_hurt(model, tmp_path):
    """On random tokens the untrained model is beaten by zero-ablating the hook (measured
    CE 4.03 clean, 3.96 zero); the ratio would read 1.0 for a perfect SAE, yet means
    nothing. It is NaN, and metrics.json stores it as null."""
    out = evaluate_downstream(model, identity_sae(), HOOK, tokens())
    assert out["ce_zero"] < out["ce_clean"]
    assert math.isnan(out["ce_loss_recovered"])
    assert out["kl_sae"] == pytest.approx(0.0, abs=1e-9)  # the other numbers are still there
    x = np.random.default_rng(0).standard_normal((100, D)).astype(np.float32)
    res = evaluate_sae(identity_sae(), x, model=model, hook_name=HOOK, tokens=tokens())
    assert math.isnan(res.metrics["downstream"]["ce_loss_recovered"])
    save_sae(tmp_path, identity_sae(), hook_name=HOOK, metrics=res.metrics)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["downstream"]["ce_loss_recovered"] is None


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
        "precision": 1.0,
        "recall": 1.0,
        "auroc": 1.0,
        "n_positive": int(labels[:, 0].sum()),
    }
    assert gt["concepts"]["noise"]["f1"] < 0.7
    assert gt["mean_best_f1"] == pytest.approx((1.0 + gt["concepts"]["noise"]["f1"]) / 2)
    with pytest.raises(ValueError, match="concept labels: shape"):
        evaluate_ground_truth(identity_sae(), src, labels[:10], ["a", "b"])


def test_evaluate_sae_bundles_everything(model, model_tokens):
    x = np.random.default_rng(0).standard_normal((300, D)).astype(np.float32)
    labels = x[:, :1] > 1
    res = evaluate_sae(
        noisy_sae(0.1),
        ArraySource(x, 100),
        model=model,
        hook_name=HOOK,
        tokens=model_tokens,
        labels=labels,
        concept_names=["c"],
    )
    assert {"fvu", "downstream", "ground_truth", "log10_feature_density_histogram"} <= set(
        res.metrics
    )
    assert not math.isnan(res.metrics["downstream"]["ce_loss_recovered"])


def test_bare_arrays_and_tensors_are_taken_as_sources():
    """A notebook passes activations straight in: a 2-D numpy array or torch tensor is
    wrapped in an ArraySource and gives the same metrics; anything else is a TypeError
    saying what was expected."""
    x = np.random.default_rng(0).standard_normal((300, D)).astype(np.float32)
    labels = x[:, :1] > 1
    want = evaluate_sae(noisy_sae(0.1), ArraySource(x, 100), labels=labels, concept_names=["c"])
    for data in (x, torch.from_numpy(x), torch.from_numpy(x).requires_grad_()):
        got = evaluate_sae(noisy_sae(0.1), data, labels=labels, concept_names=["c"])
        assert got.metrics == want.metrics
    m, _ = evaluate_reconstruction(identity_sae(), torch.from_numpy(x))
    assert m["fvu"] == pytest.approx(0, abs=1e-10) and m["n_tokens"] == 300
    gt = evaluate_ground_truth(identity_sae(), x, labels, ["c"])
    assert gt == want.metrics["ground_truth"]
    with pytest.raises(
        TypeError,
        match=r"evaluate_sae: eval_source: got list, expected an "
        r"ActivationSource .*ArraySource\(x\)",
    ):
        evaluate_sae(identity_sae(), x.tolist())
    with pytest.raises(ValueError, match=r"expected a 2-D \[n_rows, d_in\] array, got \(300,\)"):
        evaluate_sae(identity_sae(), x[:, 0])


def _hook_rows(model, toks):
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=[HOOK])
    return cache[HOOK][:, 1:].reshape(-1, D)


def test_pca_baseline_closed_forms(model, model_tokens):
    """Full-rank PCA is the identity (no CE rise, KL 0); rank 0 is mean-ablation's limit;
    mean-ablation CE recovered of a perfect SAE is 1; the SAE-over-PCA KL ratio is a ratio."""
    from stages.sae.evaluate import pca_baseline

    rows = _hook_rows(model, model_tokens)
    full = pca_baseline(rows, D)
    assert torch.allclose(full[1] @ full[1].T, torch.eye(D), atol=1e-5)
    out = evaluate_downstream(model, noisy_sae(0.3), HOOK, model_tokens, baseline=full)
    assert out["pca_rank"] == D and out["kl_pca"] == pytest.approx(0.0, abs=1e-6)
    assert out["ce_delta_pca"] == pytest.approx(0.0, abs=1e-5)
    assert out["ce_loss_recovered_pca"] == pytest.approx(1.0, abs=1e-5)
    assert math.isnan(out["kl_sae_over_pca"])  # at full rank there is no baseline to beat
    half = evaluate_downstream(model, noisy_sae(0.3), HOOK, model_tokens,
                               baseline=pca_baseline(rows, D // 2))  # fmt: skip
    assert half["kl_sae_over_pca"] == pytest.approx(half["kl_sae"] / half["kl_pca"])
    assert out["ce_delta_sae"] == pytest.approx(out["ce_sae"] - out["ce_clean"])
    want = (out["ce_mean"] - out["ce_sae"]) / (out["ce_mean"] - out["ce_clean"])
    assert out["ce_loss_recovered_mean_ablation"] == pytest.approx(want)
    one = pca_baseline(rows, 1)
    perfect = evaluate_downstream(model, identity_sae(), HOOK, model_tokens, baseline=one)
    assert perfect["ce_loss_recovered_mean_ablation"] == pytest.approx(1.0, abs=1e-6)
    assert perfect["kl_pca"] > 0 and perfect["kl_sae_over_pca"] == pytest.approx(0.0, abs=1e-6)
    # the projection keeps the mean and the top direction: its error is the rest's variance
    mu, basis = one
    centred = rows.double() - rows.double().mean(0)
    ev = torch.linalg.eigvalsh(centred.T @ centred / len(rows))
    resid = ((rows - mu) - (rows - mu) @ basis.T @ basis).pow(2).sum(1).mean()
    assert float(resid) == pytest.approx(float(ev[:-1].sum()), rel=1e-3)


# ---- Gurnee's follow-ups (several draws, rescaled SAE, frequency) ----------------------


def scaled_sae(c):
    """x̂ = c·x: a pure shrinkage SAE, whose norm-rescaled reconstruction is exactly x."""
    sae = identity_sae()
    with torch.no_grad():
        sae.W_dec.mul_(c)
    return sae


def test_rescaled_sae_of_pure_shrinkage_is_perfect(model, model_tokens):
    out = evaluate_downstream(model, scaled_sae(0.5), HOOK, model_tokens, random_draws=4)
    assert out["kl_sae"] > 1e-4
    assert out["kl_sae_rescaled"] == pytest.approx(0.0, abs=1e-9)
    assert out["ce_delta_sae_rescaled"] == pytest.approx(0.0, abs=1e-7)
    assert out["rescaled_to_sae_kl_ratio"] == pytest.approx(0.0, abs=1e-6)


def test_random_null_over_draws_has_spread_and_a_paired_interval(model, model_tokens):
    out = evaluate_downstream(model, noisy_sae(0.3), HOOK, model_tokens, random_draws=16)
    assert out["random_draws"] == 16
    assert out["kl_random_min_draw"] < out["kl_random"] < out["kl_random_max_draw"]
    assert out["kl_random_sd_draws"] > 0
    assert out["sae_to_random_kl_ratio"] == pytest.approx(out["kl_sae"] / out["kl_random"])
    assert out["sae_to_random_kl_ratio_lo"] <= out["sae_to_random_kl_ratio"]
    assert out["sae_to_random_kl_ratio"] <= out["sae_to_random_kl_ratio_hi"]
    assert out["kl_sae_lo"] <= out["kl_sae"] <= out["kl_sae_hi"]
    assert out["ce_delta_sae_lo"] <= out["ce_delta_sae"] <= out["ce_delta_sae_hi"]
    bins = out["kl_gap_by_token_frequency"]
    assert sum(b["n"] for b in bins) == out["n_predictions"]
    assert all(b["count_lo"] <= b["count_hi"] for b in bins)
    assert [b["count_hi"] for b in bins] == sorted(b["count_hi"] for b in bins)
    assert -1 <= out["kl_gap_freq_spearman"] <= 1
    few = evaluate_downstream(model, noisy_sae(0.3), HOOK, model_tokens, random_windows=2)
    assert few["random_windows"] == 2 and few["kl_sae"] == pytest.approx(out["kl_sae"])
    assert few["random_to_sae_kl_ratio"] == pytest.approx(few["kl_random"] / few["kl_sae_paired"])
    assert sum(b["n"] for b in few["kl_gap_by_token_frequency"]) == 2 * (model_tokens.shape[1] - 2)
    with pytest.raises(ValueError, match="random_draws = 0"):
        evaluate_downstream(model, noisy_sae(0.3), HOOK, model_tokens, random_draws=0)


def test_tail_run_equals_a_full_forward_with_the_hook(model, model_tokens):
    """A splice at blocks.0.hook_resid_post runs only the blocks after it; the same splice
    at blocks.1.hook_resid_pre (the same vector) runs the full model: same numbers."""
    tail = evaluate_downstream(model, noisy_sae(0.3), HOOK, model_tokens, random_draws=2)
    full = evaluate_downstream(model, noisy_sae(0.3), "blocks.1.hook_resid_pre", model_tokens,
                               random_draws=2)  # fmt: skip
    for key in ("ce_clean", "ce_sae", "kl_sae", "ce_zero", "kl_random", "kl_sae_rescaled"):
        assert tail[key] == pytest.approx(full[key], rel=1e-6, abs=1e-9), key


def test_unigram_entropy_and_saturation_flag(model, model_tokens):
    counts = np.ones(40)
    out = evaluate_downstream(model, noisy_sae(0.3), HOOK, model_tokens, random_draws=1,
                              token_counts=counts)  # fmt: skip
    assert out["unigram_entropy"] == pytest.approx(math.log(40))
    assert out["ce_loss_recovered_saturated"] == (out["ce_zero"] > math.log(40))


def test_spearman_closed_forms():
    from stages.sae.evaluate import _spearman

    a = torch.arange(10.0)
    assert _spearman(a, a**3) == pytest.approx(1.0)
    assert _spearman(a, -a) == pytest.approx(-1.0)
    assert _spearman(torch.tensor([1.0, 1, 2, 2]), torch.tensor([1.0, 1, 2, 2])) == pytest.approx(1)


def test_wide_saes_are_probed_on_the_first_rows_only(monkeypatch):
    """The codes held for k-sparse probing are capped (MAX_CODE_ELEMENTS); the best-latent
    table still reads every row, in a second pass, and is unchanged."""
    from stages.sae import evaluate as ev
    from stages.sae.concepts import ConceptContext

    rng = np.random.default_rng(0)
    n = 800
    labels = rng.random((n, 2)) < 0.3
    x = rng.standard_normal((n, D)).astype(np.float32) * 0.1
    x[:, 3] = np.where(labels[:, 0], 2.0 + rng.random(n), -1.0)
    groups = np.arange(n) // 8

    def run():
        ctx = ConceptContext(groups, rng.integers(0, 9, n))
        return evaluate_ground_truth(identity_sae(), x, labels, ["a", "b"], context=ctx,
                                     batch_size=64)  # fmt: skip

    full = run()
    monkeypatch.setattr(ev, "MAX_CODE_ELEMENTS", 400 * 2 * D)
    capped = run()
    assert capped["concepts"] == full["concepts"]
    assert full["sparse_probing"]["n_rows"] == n and capped["sparse_probing"]["n_rows"] == 400
    assert capped["sparse_probing"]["concepts"]["a"]["k1"]["f1"] == 1.0
