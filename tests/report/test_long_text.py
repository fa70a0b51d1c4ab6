"""Issue 20 item 6: `atlas features` read only the first n_ctx - 1 tokens of a longer
text, silently. Now the whole text is read, window by window, as the pipeline caches."""

from __future__ import annotations

import torch

from stages.report import features_of_text
from stages.sae import build_sae
from tests.backbone import _cache_script

HOOK = "blocks.0.hook_resid_post"


def test_a_text_longer_than_the_context_is_covered_window_by_window(tmp_path):
    from transformers import PreTrainedTokenizerFast

    model, _ = _cache_script.tiny_setup()  # n_ctx = 16, word-level tokens w1 .. w48
    model.tokenizer.save_pretrained(tmp_path)  # (TransformerLens reloads it by its path)
    model.set_tokenizer(PreTrainedTokenizerFast.from_pretrained(tmp_path))
    n_ctx = model.cfg.n_ctx
    sae = build_sae({"architecture": "topk", "d_in": 16, "d_sae": 32, "k": 4,
                     "n_training_tokens": 4096, "batch_size": 4096})  # fmt: skip
    words = [f"w{1 + i % 48}" for i in range(40)]  # 40 tokens: 3 windows of 15
    rows = features_of_text(" ".join(words), model, HOOK, sae, k=2)
    assert [r.token for r in rows] == words
    assert [r.position for r in rows] == list(range(1, 41))
    # the second window is BOS + tokens 15..29, run on its own
    ids = model.to_tokens(" ".join(words), prepend_bos=False, truncate=False)[0]
    window = torch.cat([torch.tensor([0]), ids[n_ctx - 1 : 2 * (n_ctx - 1)]])[None]
    _, cache = model.run_with_cache(window, names_filter=[HOOK])
    with torch.no_grad():
        f = sae.encode(cache[HOOK][0])
    for j in range(1, n_ctx):
        r = rows[n_ctx - 1 + j - 1]
        vals, ids_ = torch.topk(f[j], 2)
        want = [(int(i), round(float(v), 5)) for v, i in zip(vals, ids_, strict=True) if v > 0]
        assert [(a.feature, round(a.activation, 5)) for a in r.features] == want
