"""An HF-cache-shaped folder holding a tiny random GPT-2, saved with `transformers`.

Lets the real `HookedTransformer.from_pretrained("gpt2")` path run offline: with
HF_HOME pointing here and HF_HUB_OFFLINE=1, the hub client resolves `refs/main` to the
snapshot folder exactly as it would for a cached download.
"""

from __future__ import annotations

from pathlib import Path

COMMIT = "0" * 40


def build(hf_home: Path, repo: str = "gpt2") -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    snap = hf_home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    refs = snap.parent.parent / "refs"
    refs.mkdir(exist_ok=True)
    (refs / "main").write_text(COMMIT)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = ["the cat sat on the mat", "a dog ran to the park", "hello world"] * 20
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))  # fmt: skip
    fast = GPT2TokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                             eos_token="<|endoftext|>", unk_token="<|endoftext|>")  # fmt: skip
    fast.save_pretrained(snap)
    torch.manual_seed(0)
    # n_ctx: the real gpt2 config.json carries it and TransformerLens reads it
    cfg = GPT2Config(vocab_size=len(fast), n_positions=64, n_ctx=64, n_embd=32, n_layer=2, n_head=2,
                     bos_token_id=0, eos_token_id=0)  # fmt: skip
    GPT2LMHeadModel(cfg).save_pretrained(snap, safe_serialization=True)
    return snap
