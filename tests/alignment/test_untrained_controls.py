"""The dense measures' untrained-model controls (stages/alignment/controls.py) on real tiny
toy models and the activation stores cached from them: the untrained models are built
as the lm stage builds them before training (`build_toy_model`, each model's own seed),
and their activations at the subsample's rows are recomputed from the stores' windows."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch

from stages.activations import ActivationStore, CacheInputs, cache_activations
from stages.alignment.controls import untrained_controls
from stages.alignment.stream import AlignConfig, align_pair
from stages.config import StoreParams, ToyModel
from stages.corpus import CONCEPT_NAMES, generate_story
from stages.models import (
    build_toy_model,
    model_at_rows,
    train_tokenizer,
    train_toy_model,
    windows_for,
)
from stages.sae import build_sae

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one torch thread (tests/conftest.py)."""


def _toy(seed: int) -> ToyModel:
    return ToyModel.model_validate({
        "source": "toy", "seed": seed, "tokenizer": {"vocab_size": 300},
        "arch": {"n_layers": 2, "d_model": 32, "n_heads": 2, "d_mlp": 64, "n_ctx": 32},
        "train": {"tokens": 40_000, "batch_size": 16, "seq_len": 32, "lr": 0.01,
                  "warmup_steps": 5, "eval_tokens": 2048},
    })  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Two toy models (seeds 0 and 1) trained for a few dozen steps, their stores, and
    the untrained models of the same architectures and seeds."""
    stories = [generate_story(7, i) for i in range(160)]
    texts = [t for t, _ in stories]
    tok = train_tokenizer(texts, 300, tmp_path_factory.mktemp("tok"))
    train = windows_for(tok, texts[:130], list(range(130)), 32)
    held = windows_for(tok, texts[130:], list(range(130, 160)), 32)
    labels = [(i, s, e, c) for i, (_, spans) in enumerate(stories) for s, e, c in spans]
    cols = list(zip(*labels, strict=True))
    table = pa.table({"doc_id": pa.array(cols[0], pa.int64()),
                      "char_start": pa.array(cols[1], pa.int32()),
                      "char_end": pa.array(cols[2], pa.int32()),
                      "concept": pa.array(cols[3], pa.string())})  # fmt: skip
    inputs = CacheInputs(train, held, table, CONCEPT_NAMES, "corpus-test")
    params = StoreParams(seq_len=32, batch_size=16, shard_rows=4096, chunk_rows=1024)
    out = {}
    for name, seed in (("a", 0), ("b", 1)):
        m = _toy(seed)
        model = build_toy_model(m, tok)
        train_toy_model(model, m, train, held)
        model.eval()
        path = tmp_path_factory.mktemp("store") / name
        cache_activations(model, name, HOOKS, inputs, params, path)
        out[name] = (m, model, ActivationStore(path))
    out["tok"] = tok
    return out


def test_model_at_scattered_rows_recomputes_the_cached_rows(world):
    _, model, store = world["a"]
    rows = np.random.default_rng(0).choice(store.n_rows, 300, replace=False)
    got = model_at_rows(model, store, rows, HOOKS)
    for h in HOOKS:
        cached = np.asarray(store.array(h)[:])[rows]
        assert got[h].dtype == cached.dtype
        np.testing.assert_allclose(got[h].astype(np.float32), cached.astype(np.float32),
                                   rtol=2e-3, atol=2e-3)  # fmt: skip


def test_two_identical_untrained_models_give_cka_one(world):
    """Same architecture, same seed: the same function, so linear CKA is exactly 1 (and
    mutual kNN 1) at every hook — the closed form of the control."""
    m, _, store = world["a"]
    u1, u2 = (build_toy_model(m, world["tok"]).eval() for _ in range(2))
    rows = np.arange(0, store.n_rows, 3)[:400]
    x1, x2 = model_at_rows(u1, store, rows, HOOKS), model_at_rows(u2, store, rows, HOOKS)
    trained = {h: np.asarray(store.array(h)[:])[rows] for h in HOOKS}
    ctl = untrained_controls(trained, x1, x2, [(h, h) for h in HOOKS], n_permutations=5, seed=0)
    for h in HOOKS:
        assert ctl[h]["linear_cka"]["untrained"].statistic == pytest.approx(1.0, abs=1e-9)
        assert ctl[h]["mutual_knn"]["untrained"].statistic == pytest.approx(1.0, abs=1e-9)
        assert ctl[h]["linear_cka"]["trained_vs_untrained"].statistic < 0.99


def test_trained_pair_beats_trained_vs_untrained(world):
    (ma, _, sa), (mb, _, sb) = world["a"], world["b"]
    ua = build_toy_model(ma, world["tok"]).eval()
    ub = build_toy_model(mb, world["tok"]).eval()
    saes = {h: {"s": build_sae({"architecture": "topk", "d_in": 32, "d_sae": 64, "k": 4,
                                "n_training_tokens": 4096, "batch_size": 64, "seed": 0})}
            for h in HOOKS}  # fmt: skip
    cfg = AlignConfig(n_permutations=19, n_samples=600, max_tokens=4000, top_up=True, chunk_rows=1024,
                      n_null=1, seed=0)  # fmt: skip
    with torch.no_grad():
        res = align_pair(sa, sb, saes, saes, cfg, untrained=(ua, ub))
    s = res.scores
    for h in HOOKS:
        for m in ("linear_cka", "mutual_knn", "svcca"):
            trained = s[f"{m}_subsample/{h}"] if m == "linear_cka" else s[f"{m}/{h}"]
            assert trained > s[f"{m}_trained_vs_untrained/{h}"], (m, h)
        assert 0 < s[f"linear_cka_untrained/{h}"] < 1
    print({k: round(v, 3) for k, v in s.items()
           if any(k.startswith(f"{m}") for m in ("linear_cka", "mutual_knn", "svcca"))
           and "_z" not in k and "holm" not in k and "normal" not in k})  # fmt: skip
