"""A tiny real setup: a byte-level BPE tokenizer trained on toy stories, a random 2-layer
HookedTransformer, an activation store cached from it (real zarr, real labels) and a
random TopK SAE. Built once per session."""

from __future__ import annotations

import pyarrow as pa
import pytest

from stages.activations import ActivationStore, CacheInputs, cache_activations
from stages.config import StoreParams
from stages.corpus import CONCEPT_NAMES, generate_story
from stages.models import train_tokenizer, windows_for
from stages.sae import build_sae

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="session")
def stories():
    return [generate_story(7, i) for i in range(160)]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, stories):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    tok = train_tokenizer([t for t, _ in stories], 400, tmp_path_factory.mktemp("tok"))
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_heads=2, d_head=16, d_mlp=64,
                                  n_ctx=64, d_vocab=len(tok), act_fn="gelu",
                                  normalization_type="LN", seed=0, default_prepend_bos=True,
                                  device="cpu")  # fmt: skip
    model = HookedTransformer(cfg, tokenizer=tok)
    model.eval()
    return model


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory, tiny_model, stories):
    texts = [t for t, _ in stories]
    labels = [(i, s, e, c) for i, (_, spans) in enumerate(stories) for s, e, c in spans]
    cols = list(zip(*labels, strict=True))
    table = pa.table({"doc_id": pa.array(cols[0], pa.int64()),
                      "char_start": pa.array(cols[1], pa.int32()),
                      "char_end": pa.array(cols[2], pa.int32()),
                      "concept": pa.array(cols[3], pa.string())})  # fmt: skip
    tok = tiny_model.tokenizer
    train = windows_for(tok, texts[:130], list(range(130)), 32)
    held = windows_for(tok, texts[130:], list(range(130, 160)), 32)
    out = tmp_path_factory.mktemp("store") / "tiny"
    params = StoreParams(seq_len=32, batch_size=16, shard_rows=4096, chunk_rows=1024)
    inputs = CacheInputs(train, held, table, CONCEPT_NAMES, "corpus-test")
    cache_activations(tiny_model, "tiny", HOOKS, inputs, params, out)
    return ActivationStore(out)


def tiny_sae(d_in: int = 32, d_sae: int = 128, k: int = 8, seed: int = 0):
    sae = build_sae({"architecture": "topk", "d_in": d_in, "d_sae": d_sae, "k": k,
                     "n_training_tokens": 4096, "batch_size": 64, "seed": seed})  # fmt: skip
    sae.eval()
    return sae
