"""The fused LM engine (stages/lm_fused.py) is HookedTransformer's loss, up to rounding:
the loss and every parameter's gradient agree on random weights for each positional
scheme and activation the toy configs allow, training with it learns and is
bit-reproducible, and a config it does not cover is refused by name."""

from __future__ import annotations

import hashlib

import pytest
import torch

from stages.compute import deterministic_algorithms
from stages.lm_fused import fused_loss, unsupported


def _model(positional: str, act_fn: str, **extra):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(
        n_layers=2, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=24, d_vocab=97,
        act_fn=act_fn, normalization_type="LN", positional_embedding_type=positional,
        **({"rotary_dim": 8} if positional == "rotary" else {}), seed=0, device="cpu", **extra,
    )  # fmt: skip
    model = HookedTransformer(cfg)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # every parameter away from its initialisation (biases are 0 there)
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen))
    return model


@pytest.mark.parametrize(("positional", "act_fn"), [("rotary", "gelu"), ("standard", "gelu"),
                                                    ("rotary", "relu"), ("standard", "silu"),
                                                    ("rotary", "gelu_new")])  # fmt: skip
def test_fused_loss_and_gradients_are_hooked_transformers(positional, act_fn):
    model = _model(positional, act_fn)
    tokens = torch.randint(0, 97, (3, 24), generator=torch.Generator().manual_seed(2))
    params = list(model.parameters())
    with deterministic_algorithms():
        ref = model(tokens, return_type="loss")
        ref_grads = torch.autograd.grad(ref, params)
        loss = fused_loss(model, tokens)
        grads = torch.autograd.grad(loss, params)
    assert ref.item() > 3.0  # random weights: far from a trivial loss
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    top = max(r.abs().max().item() for r in ref_grads)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads, strict=True):
        scale = r.abs().max().item()
        if name.endswith("b_K") and positional == "standard":
            # 0 in exact arithmetic: a key bias adds the same q·b_K to a query's every
            # score, and softmax ignores it; both engines give rounding noise
            assert max(scale, g.abs().max().item()) < 1e-6 * top
            continue
        assert scale > 1e-3 * top, name
        torch.testing.assert_close(g, r, rtol=0, atol=1e-5 * scale, msg=name)


def test_a_config_the_fused_engine_does_not_cover_is_refused_by_name():
    model = _model("rotary", "gelu")
    assert unsupported(model.cfg) is None
    model.cfg.normalization_type = "RMS"
    with pytest.raises(ValueError, match="normalization_type 'RMS', expected 'LN'"):
        fused_loss(model, torch.zeros(1, 4, dtype=torch.long))
    model.cfg.normalization_type = "LN"
    model.cfg.use_qk_norm = True
    assert "use_qk_norm" in unsupported(model.cfg)


def _md5(model) -> str:
    return hashlib.md5(
        b"".join(t.numpy().tobytes() for t in model.state_dict().values())
    ).hexdigest()


@pytest.fixture(params=[1, 2], ids=["1-thread", "2-threads"])
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def test_fused_training_learns_reproducibly_and_matches_the_hooked_engine(toy_windows, threads):
    from stages.config import ToyModel
    from stages.models import build_toy_model, train_toy_model

    tok, train, held = toy_windows
    spec = {"source": "toy", "tokenizer": {"vocab_size": 1000},
            "train": {"seq_len": 64, "batch_size": 16, "tokens": 16 * 63 * 20, "warmup_steps": 2},
            "arch": {"n_layers": 2, "d_model": 64, "n_heads": 4, "d_mlp": 128, "n_ctx": 64,
                     "positional": "rotary"}}  # fmt: skip
    results = {}
    for engine in ("fused", "fused", "hooked"):
        spec["train"]["engine"] = engine
        m = ToyModel.model_validate(spec)
        model = build_toy_model(m, tok)
        res = train_toy_model(model, m, train, held)
        results.setdefault(engine, []).append((_md5(model), res))
    (a, ra), (b, rb) = results["fused"]
    _, rh = results["hooked"][0]
    assert a == b  # bit-reproducible
    curve = dict(ra.loss_curve)
    assert ra.steps == 20 and curve[19] < curve[0] - 2.0  # it learned
    # the same training up to rounding: 20 steps keep the two engines within 1e-3 nats
    assert ra.heldout_loss == pytest.approx(rh.heldout_loss, abs=1e-3)
    assert ra.heldout_loss < rh.loss_curve[0][1] - 2.0
