"""Shared fixtures for the backbone tests: a tiny, valid params mapping."""

from __future__ import annotations

import copy

import pytest

TINY = {
    "corpus": {"source": "toy", "heldout_fraction": 0.1, "toy": {"n_docs": 240, "seed": 3}},
    "models": {
        "tiny-a": {
            "source": "toy",
            "seed": 0,
            "arch": {"n_layers": 2, "d_model": 32, "n_heads": 2, "d_mlp": 64, "n_ctx": 32},
            "tokenizer": {"vocab_size": 400},
            "train": {
                "tokens": 24000,
                "batch_size": 16,
                "seq_len": 32,
                "lr": 0.01,
                "warmup_steps": 5,
                "eval_tokens": 2048,
            },
        },
        "tiny-b": {
            "source": "toy",
            "seed": 1,
            "arch": {"n_layers": 2, "d_model": 32, "n_heads": 2, "d_mlp": 64, "n_ctx": 32},
            "tokenizer": {"vocab_size": 400},
            "train": {
                "tokens": 24000,
                "batch_size": 16,
                "seq_len": 32,
                "lr": 0.01,
                "warmup_steps": 5,
                "eval_tokens": 2048,
            },
        },
    },
    "activations": {
        "store": {"seq_len": 32, "batch_size": 16, "shard_rows": 4096, "chunk_rows": 1024},
        "hooks": {
            "tiny-a": ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"],
            "tiny-b": ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"],
        },
    },
}


@pytest.fixture
def tiny() -> dict:
    return copy.deepcopy(TINY)
