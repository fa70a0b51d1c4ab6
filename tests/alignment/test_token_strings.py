"""Two toy tokenizers compared through their decoded strings: what the align flow hands
`align_pair` as `token_strings` (`stages.models.token_strings`)."""

import numpy as np

from stages.alignment.matching import shared_vocabulary
from stages.config import ToyModel
from stages.corpus import generate_story
from stages.models import build_toy_model, save_toy_model, token_strings, train_tokenizer


def _saved(tmp_path, vocab_size: int, name: str):
    texts = [generate_story(5, i)[0] for i in range(80)]
    tok_dir, out = tmp_path / f"tok-{name}", tmp_path / name
    out.mkdir()
    tok = train_tokenizer(texts, vocab_size, tok_dir)
    m = ToyModel.model_validate({"source": "toy", "tokenizer": {"vocab_size": vocab_size}, "arch": {
        "n_layers": 1, "d_model": 16, "n_heads": 2, "d_mlp": 32, "n_ctx": 64},
        "train": {"seq_len": 64}})  # fmt: skip
    save_toy_model(build_toy_model(m, tok), m, tok_dir, out)
    return tok, out


def test_token_strings_decode_every_id_and_join_two_tokenizers(tmp_path):
    tok_a, a = _saved(tmp_path, 300, "a")
    tok_b, b = _saved(tmp_path, 420, "b")
    sa, sb = token_strings(a), token_strings(b)
    assert len(sa) == len(tok_a) and len(sb) == len(tok_b) and len(sa) != len(sb)
    assert all(sa[i] == tok_a.decode([i]) for i in range(len(sa)))
    # one word, two different ids: the same string once both are renumbered
    ia = tok_a.encode(" the", add_special_tokens=False)
    ib = tok_b.encode(" the", add_special_tokens=False)
    assert len(ia) == len(ib) == 1
    top_a, top_b = np.array([[ia[0], -1]]), np.array([[ib[0], -1]])
    ja, jb = shared_vocabulary(top_a, top_b, sa, sb)
    assert set(ja[0][ja[0] >= 0]) == set(jb[0][jb[0] >= 0]) and (ja[0] >= 0).sum() == 1
