"""Caches activations of a fixed tiny model; run as a subprocess so a test can kill -9 it."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch


def tiny_setup(n_windows: int = 96, seq_len: int = 16):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformers import PreTrainedTokenizerFast

    from stages.activations import CacheInputs
    from stages.tokens import Windows

    tok = Tokenizer(
        models.WordLevel(
            {"<|endoftext|>": 0, **{f"w{i}": i + 1 for i in range(49)}}, unk_token="<|endoftext|>"
        )
    )
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>")
    cfg = HookedTransformerConfig(
        n_layers=2,
        d_model=16,
        n_heads=2,
        d_head=8,
        d_mlp=32,
        n_ctx=seq_len,
        d_vocab=50,
        act_fn="gelu",
        seed=0,
        device="cpu",
    )
    model = HookedTransformer(cfg)
    model.tokenizer = fast
    model.eval()
    rng = np.random.default_rng(0)

    def windows(n, doc0):
        toks = rng.integers(1, 50, size=(n, seq_len)).astype(np.int32)
        toks[:, 0] = 0
        docs = np.repeat(np.arange(doc0, doc0 + n), seq_len).reshape(n, seq_len).astype(np.int64)
        pos = np.tile(np.arange(seq_len, dtype=np.int32) * 3, (n, 1))
        return Windows(toks, docs, pos, pos + 2)

    inputs = CacheInputs(
        windows(n_windows, 0), windows(16, 10_000), None, [], "hash-of-test-corpus"
    )
    return model, inputs


def run(out: Path, slow: float = 0.0) -> None:
    from stages.activations import cache_activations
    from stages.config import StoreParams

    model, inputs = tiny_setup()
    if slow:
        model.blocks[0].hook_resid_post.add_hook(lambda a, hook: time.sleep(slow))
    params = StoreParams(seq_len=16, batch_size=8, shard_rows=128, chunk_rows=64)
    cache_activations(
        model, "tiny", ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"], inputs, params, out
    )


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(Path(sys.argv[1]), float(sys.argv[2]))
