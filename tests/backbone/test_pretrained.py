"""The pretrained path, offline: `source: pretrained` through the real from_pretrained code,
against an HF-cache-shaped folder holding a tiny random GPT-2 saved with `transformers`."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from tests.backbone import _fake_hf_cache
from tests.backbone.conftest import TINY, run, scratch_project

pytestmark = pytest.mark.slow

PARAMS = {
    "corpus": TINY["corpus"],
    "models": {"gpt2": {"source": "pretrained", "name": "gpt2"}},
    "activations": {
        "store": {"seq_len": 32, "batch_size": 16, "shard_rows": 4096, "chunk_rows": 1024},
        "hooks": {"gpt2": ["blocks.1.hook_resid_post"]},
    },
}


def test_gpt2_from_an_offline_hf_cache(tmp_path, prefect_api):
    hf_home = tmp_path / "hf"
    _fake_hf_cache.build(hf_home)
    root = tmp_path / "proj"
    root.mkdir()
    env = scratch_project(root, PARAMS, prefect_api, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1")
    run([sys.executable, "-m", "flows.corpus"], root, env)
    run([sys.executable, "-m", "flows.lm", "gpt2"], root, env)
    card = json.loads((root / "data/models/gpt2/config.json").read_text())
    assert card["source"] == "pretrained" and card["n_layers"] == 2 and card["d_model"] == 32
    assert not (
        root / "data/models/gpt2/model.safetensors"
    ).exists()  # weights stay in the HF cache
    run([sys.executable, "-m", "flows.activations", "gpt2"], root, env)
    from stages.activations import ActivationStore

    store = ActivationStore(root / "data/activations/gpt2")
    x = store.read("blocks.1.hook_resid_post")
    assert x.shape == (store.n_rows, 32) and np.isfinite(x).all() and x.std() > 0


def test_missing_hub_and_cache_fail_with_what_was_needed(tmp_path, prefect_api):
    root = tmp_path / "proj"
    root.mkdir()
    env = scratch_project(root, PARAMS, prefect_api, HF_HOME=str(tmp_path / "empty"),
                          HF_HUB_OFFLINE="1")  # fmt: skip
    p = run([sys.executable, "-m", "flows.lm", "gpt2"], root, env, check=False)
    assert p.returncode != 0
    assert "needs the Hugging Face hub or an HF cache holding gpt2" in p.stderr
    assert not (root / "data/models/gpt2").exists()
