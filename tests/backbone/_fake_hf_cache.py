"""HF-cache-shaped folders holding tiny random models of real architectures, saved with
`transformers`, and SAELens-format SAEs laid out as a pretrained release's repo.

Lets the real loading code run offline: with HF_HOME pointing here and HF_HUB_OFFLINE=1,
the hub client resolves `refs/main` to the snapshot folder exactly as it would for a
cached download, so `HookedTransformer.from_pretrained("gpt2")` (or
`"pythia-70m-deduped"`) and `sae_lens.SAE.from_pretrained(release, sae_id)` read these
files through their own code paths.
"""

from __future__ import annotations

from pathlib import Path

COMMIT = "0" * 40
# the hub repos TransformerLens reads for each model name
REPOS = {"gpt2": "gpt2", "pythia-70m-deduped": "EleutherAI/pythia-70m-deduped"}


def snapshot(hf_home: Path, repo: str) -> Path:
    """`hub/models--<org>--<name>/snapshots/<commit>/` with `refs/main` pointing at it."""
    snap = hf_home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots" / COMMIT
    snap.mkdir(parents=True, exist_ok=True)
    refs = snap.parent.parent / "refs"
    refs.mkdir(exist_ok=True)
    (refs / "main").write_text(COMMIT)
    return snap


def _tokenizer(texts: list[str], vocab_size: int, cls):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))  # fmt: skip
    return cls(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
               unk_token="<|endoftext|>")  # fmt: skip


def build(hf_home: Path, repo: str = "gpt2", texts: list[str] | None = None,
          vocab_size: int = 300, n_ctx: int = 64) -> Path:  # fmt: skip
    """A tiny random GPT-2 (2 layers, d_model 32), its byte-level BPE tokenizer trained on
    `texts`, in the HF cache at `hf_home`."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

    snap = snapshot(hf_home, repo)
    texts = texts or ["the cat sat on the mat", "a dog ran to the park", "hello world"] * 20
    fast = _tokenizer(texts, vocab_size, GPT2TokenizerFast)
    fast.save_pretrained(snap)
    torch.manual_seed(0)
    # n_ctx: the real gpt2 config.json carries it and TransformerLens reads it
    cfg = GPT2Config(vocab_size=len(fast), n_positions=n_ctx, n_ctx=n_ctx, n_embd=32, n_layer=2,
                     n_head=2, bos_token_id=0, eos_token_id=0)  # fmt: skip
    GPT2LMHeadModel(cfg).save_pretrained(snap, safe_serialization=True)
    return snap


def build_pythia(hf_home: Path, texts: list[str], vocab_size: int = 300, n_ctx: int = 256) -> Path:
    """A tiny random GPT-NeoX (Pythia's architecture: rotary on a quarter of each head,
    here 4 of d_head 16 (TransformerLens needs an even rotary_dim); parallel attention +
    MLP) under EleutherAI/pythia-70m-deduped, with its own BPE tokenizer (another
    vocabulary than the GPT-2 one: alignment crosses tokenizers)."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    snap = snapshot(hf_home, REPOS["pythia-70m-deduped"])
    fast = _tokenizer(texts, vocab_size, PreTrainedTokenizerFast)
    fast.save_pretrained(snap)
    torch.manual_seed(1)
    cfg = GPTNeoXConfig(vocab_size=len(fast), hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=96, rotary_pct=0.25,
                        max_position_embeddings=n_ctx, use_parallel_residual=True,
                        bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)  # fmt: skip
    GPTNeoXForCausalLM(cfg).save_pretrained(snap, safe_serialization=True)
    return snap


def add_sae_release(hf_home: Path, release: str, sae_id: str, *, d_in: int, d_sae: int,
                    hook: str, seed: int = 0) -> Path:  # fmt: skip
    """A random ReLU SAE in SAELens format in the HF repo that SAELens' registry names for
    `release` / `sae_id` (`pretrained_saes.yaml`), at the folder it names: what a cached
    download of that release looks like."""
    import torch
    from sae_lens.loading.pretrained_saes_directory import get_repo_id_and_folder_name

    from stages.sae import build_sae, save_sae
    from stages.sae.io import CHECKSUMS_FILENAME, METRICS_FILENAME

    repo_id, folder = get_repo_id_and_folder_name(release, sae_id)
    out = snapshot(hf_home, repo_id) / folder
    torch.manual_seed(seed)
    sae = build_sae({"architecture": "relu", "d_in": d_in, "d_sae": d_sae,
                     "n_training_tokens": 4096, "batch_size": 4096})  # fmt: skip
    with torch.no_grad():  # decoder rows of unit norm, encoder its transpose: a usable SAE
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(d_sae, d_in), dim=1))
        sae.W_enc.copy_(sae.W_dec.T)
    save_sae(out, sae, hook_name=hook, model_name=release,
             log_feature_density=torch.full((d_sae,), -2.0))  # fmt: skip
    # a published folder has SAELens' files only
    for extra in (CHECKSUMS_FILENAME, METRICS_FILENAME):
        (out / extra).unlink(missing_ok=True)
    return out


def copy_sae(hf_home: Path, release: str, sae_id: str, dest: Path) -> Path:
    """The cached files of `release` / `sae_id` copied to `dest`: a local SAELens folder."""
    import shutil

    from sae_lens.loading.pretrained_saes_directory import get_repo_id_and_folder_name

    repo_id, folder = get_repo_id_and_folder_name(release, sae_id)
    return Path(shutil.copytree(snapshot(hf_home, repo_id) / folder, dest))
