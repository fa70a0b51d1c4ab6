"""Language models: toy HookedTransformers trained here, or pretrained ones loaded by name.

Every model the pipeline touches is a TransformerLens `HookedTransformer`. The `lm`
stage writes one folder per model, `data/models/<name>/`:

    config.json              source, and for toy models the architecture + tokenizer
    model.safetensors        toy models only: the state dict (never pickle)
    tokenizer.json, ...      toy models only: the byte-level BPE tokenizer
    world.json               toy models only: what the model learned of the planted world
                             (capture per dependency, held-out loss vs corpus entropy;
                             stages/capture.py)

`load_model(folder)` gives back the HookedTransformer either way, so later stages do
not care where a model came from.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from stages.io import load_safetensors, read_json, replace_dir, write_json
from stages.models_config import PretrainedModel, ToyModel
from stages.tokens import Windows, pack_windows, tokenise

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

log = logging.getLogger(__name__)
SPECIAL = "<|endoftext|>"


def seed_everything(seed: int) -> None:
    import random

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: Path):
    """Train a byte-level BPE tokenizer, save it with save_pretrained, load it back.

    Loading back from `out_dir` matters: TransformerLens re-creates the tokenizer from
    its `name_or_path`, which must then be a folder that exists.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[SPECIAL],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL, pad_token=SPECIAL
    )
    fast.save_pretrained(out_dir)
    return load_tokenizer(out_dir)


def load_tokenizer(folder: Path):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.from_pretrained(str(folder))


# ---------------------------------------------------------------------------- toy models


def toy_config(m: ToyModel, d_vocab: int):
    from transformer_lens import HookedTransformerConfig

    a = m.arch
    return HookedTransformerConfig(
        n_layers=a.n_layers,
        d_model=a.d_model,
        n_heads=a.n_heads,
        d_head=a.d_model // a.n_heads,
        d_mlp=a.d_mlp,
        n_ctx=a.n_ctx,
        d_vocab=d_vocab,
        act_fn=a.act_fn,
        normalization_type="LN",
        positional_embedding_type=a.positional,
        **({"rotary_dim": a.d_model // a.n_heads} if a.positional == "rotary" else {}),
        seed=m.seed,
        default_prepend_bos=True,
        device="cpu",
    )


def build_toy_model(m: ToyModel, tokenizer) -> HookedTransformer:
    from transformer_lens import HookedTransformer

    seed_everything(m.seed)
    return HookedTransformer(toy_config(m, len(tokenizer)), tokenizer=tokenizer)


def model_at_rows(model, store, rows: np.ndarray, hooks: list[str],
                  batch_size: int = 64) -> dict[str, np.ndarray]:  # fmt: skip
    """What `model` computes at `hooks` for the (any, scattered) rows `rows` of `store`, in
    the store's precision: row g was cached at position 1 + g % (seq_len - 1) of window
    g // (seq_len - 1) (the store's windows run on from row 0, BOS first), so each needed
    window is run only up to the last position asked of it (the model is causal), and
    only up to the deepest hook's block. `stages.concept_probes.model_rows` for the first rows of a split."""
    rows = np.asarray(rows, dtype=np.int64)
    body = store.seq_len - 1
    win, pos = rows // body, rows % body + 1
    needed, inverse = np.unique(win, return_inverse=True)
    length = np.zeros(len(needed), dtype=np.int64)
    np.maximum.at(length, inverse, pos + 1)
    order = np.argsort(length, kind="stable")  # batches of similar prefix length
    first = int(needed[0]) * body if len(needed) else 0
    span = np.asarray(store.array("token_ids")[first : (int(needed[-1]) + 1) * body]) \
        if len(needed) else np.empty(0, np.int32)  # fmt: skip
    bos = int(store.attrs["bos_id"])
    blocks = [int(h.split(".")[1]) for h in hooks if h.startswith("blocks.")]
    stop = max(blocks) + 1 if len(blocks) == len(hooks) else None
    out = {h: np.empty((len(rows), store.d(h)), dtype=store.array(h).dtype) for h in hooks}
    with torch.no_grad():
        for i in range(0, len(order), batch_size):
            sel = order[i : i + batch_size]
            n = int(length[sel].max())
            toks = np.full((len(sel), n), bos, dtype=np.int64)
            for j, w in enumerate(needed[sel]):
                toks[j, 1:] = span[w * body - first : w * body - first + n - 1]
            _, cache = model.run_with_cache(torch.from_numpy(toks), names_filter=hooks,
                                            stop_at_layer=stop)  # fmt: skip
            # every asked row whose window is in this batch, and its place in the batch
            place = np.full(len(needed), -1)
            place[sel] = np.arange(len(sel))
            mine = np.flatnonzero(place[inverse] >= 0)
            b = place[inverse[mine]]
            for h in hooks:
                x = cache[h][torch.from_numpy(b), torch.from_numpy(pos[mine])].float().numpy()
                out[h][mine] = x.astype(out[h].dtype)
    return out


@dataclass
class TrainResult:
    heldout_loss: float
    unigram_entropy: float
    final_train_loss: float
    steps: int
    tokens_seen: int
    tokens_per_s: float
    loss_curve: list[tuple[int, float]]


def unigram_entropy(windows: Windows) -> float:
    """Entropy (nats/token) of the unigram distribution of the training tokens."""
    counts = np.bincount(windows.tokens[:, 1:].ravel())
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def _lr(step: int, total: int, warmup: int, lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def heldout_loss(model: HookedTransformer, tokens: torch.Tensor, batch: int = 64) -> float:
    """Mean next-token loss over all non-BOS predictions of the held-out windows."""
    total, n = 0.0, 0
    for i in range(0, len(tokens), batch):
        b = tokens[i : i + batch]
        loss = model(b, return_type="loss", loss_per_token=True)
        total += loss.sum().item()
        n += loss.numel()
    return total / max(n, 1)


def _save_checkpoint(ckpt: Path, model, opt, step: int, curve) -> None:
    """Checkpoint weights + AdamW state as safetensors, step as JSON, atomically."""
    tmp = ckpt.with_name(ckpt.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors")
    names = {id(p): n for n, p in model.named_parameters()}
    opt_tensors, opt_steps = {}, {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p)
            if st:
                n = names[id(p)]
                opt_tensors[f"{n}.exp_avg"] = st["exp_avg"].contiguous()
                opt_tensors[f"{n}.exp_avg_sq"] = st["exp_avg_sq"].contiguous()
                opt_steps[n] = float(st["step"])
    save_file(opt_tensors, tmp / "optimizer.safetensors")
    write_json(tmp / "state.json", {"step": step, "opt_steps": opt_steps, "curve": curve})
    replace_dir(tmp, ckpt)


def _load_checkpoint(ckpt: Path, model, opt) -> tuple[int, list]:
    model.load_state_dict(load_safetensors(ckpt / "model.safetensors", "checkpoint's weights"))
    state = read_json(ckpt / "state.json")
    tensors = load_safetensors(ckpt / "optimizer.safetensors", "checkpoint's optimizer state")
    for n, p in model.named_parameters():
        if n in state["opt_steps"]:
            opt.state[p] = {
                "step": torch.tensor(state["opt_steps"][n]),
                "exp_avg": tensors[f"{n}.exp_avg"],
                "exp_avg_sq": tensors[f"{n}.exp_avg_sq"],
            }
    return state["step"], [tuple(x) for x in state["curve"]]


def train_toy_model(
    model: HookedTransformer,
    m: ToyModel,
    train: Windows,
    heldout: Windows,
    ckpt_dir: Path | None = None,
    ckpt_every: int = 50,
) -> TrainResult:
    """Train with AdamW, warm-up + cosine decay, a seeded window order; resumable.

    With `ckpt_dir`, a checkpoint is written every `ckpt_every` steps and a re-run picks
    up from the last one; the result equals an uninterrupted run's. torch's
    deterministic algorithms are on throughout (`stages.compute.deterministic_algorithms`:
    the embedding lookup's backward otherwise varies in its last bits run to run).
    """
    from stages.compute import deterministic_algorithms

    with deterministic_algorithms():
        return _train_toy_model(model, m, train, heldout, ckpt_dir, ckpt_every)


def _train_toy_model(model, m, train, heldout, ckpt_dir, ckpt_every) -> TrainResult:
    import time

    t = m.train
    seed_everything(m.seed)
    if t.seq_len != train.tokens.shape[1]:
        raise ValueError(f"windows of {train.tokens.shape[1]} tokens, expected {t.seq_len}")
    tokens_per_step = t.batch_size * (t.seq_len - 1)
    steps = 0 if t.tokens == 0 else max(1, t.tokens // tokens_per_step)  # 0: untrained
    rng = np.random.default_rng(m.seed)
    # Enough epochs of shuffled window indices for all steps; fixed up front so a
    # resumed run sees exactly the same batches.
    order = np.concatenate(
        [rng.permutation(train.n) for _ in range(math.ceil(steps * t.batch_size / train.n))]
        or [np.zeros(0, dtype=np.int64)]
    )
    data = torch.from_numpy(train.tokens.astype(np.int64))
    opt = torch.optim.AdamW(
        model.parameters(), lr=t.lr, betas=(0.9, 0.99), weight_decay=t.weight_decay
    )
    if t.engine == "fused":
        from stages.lm_fused import fused_loss

        def loss_of(tokens):
            return fused_loss(model, tokens)
    else:

        def loss_of(tokens):
            return model(tokens, return_type="loss")

    start, curve = 0, []
    if ckpt_dir is not None and (ckpt_dir / "state.json").exists():
        start, curve = _load_checkpoint(ckpt_dir, model, opt)
        log.info("resuming LM training from step %d (%s)", start, ckpt_dir)
    model.train()
    t0, loss_val = time.perf_counter(), float("nan")
    bar = tqdm(range(start, steps), desc="lm train", unit="step", initial=start, total=steps)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr(step, steps, t.warmup_steps, t.lr)
        idx = torch.from_numpy(order[step * t.batch_size : (step + 1) * t.batch_size])
        loss = loss_of(data[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_val = loss.item()
        if not math.isfinite(loss_val):
            raise FloatingPointError(f"LM training diverged at step {step} (loss {loss_val})")
        if step % 10 == 0 or step == steps - 1:
            curve.append((step, loss_val))
            bar.set_postfix(loss=f"{loss_val:.3f}")
        if ckpt_dir is not None and (step + 1) % ckpt_every == 0 and step + 1 < steps:
            _save_checkpoint(ckpt_dir, model, opt, step + 1, curve)
    elapsed = time.perf_counter() - t0
    model.eval()
    eval_n = max(1, min(heldout.n, t.eval_tokens // (t.seq_len - 1)))
    hl = heldout_loss(model, torch.from_numpy(heldout.tokens[:eval_n].astype(np.int64)))
    return TrainResult(
        heldout_loss=hl,
        unigram_entropy=unigram_entropy(train),
        final_train_loss=loss_val,
        steps=steps,
        tokens_seen=steps * tokens_per_step,
        tokens_per_s=(steps - start) * tokens_per_step / max(elapsed, 1e-9),
        loss_curve=curve,
    )


@torch.no_grad()
def sample(
    model: HookedTransformer, prompts: list[str], seed: int, n_tokens: int = 30
) -> list[str]:
    """A few sampled continuations (seeded), to see at a glance what the model learned."""
    out = []
    for i, p in enumerate(prompts):
        torch.manual_seed(seed * 1000 + i)
        room = model.cfg.n_ctx - model.to_tokens(p).shape[1]
        if room <= 0:
            continue
        out.append(
            model.generate(
                p,
                max_new_tokens=min(n_tokens, room),
                temperature=0.7,
                verbose=False,
                stop_at_eos=True,
            )
        )
    return out


def windows_for(tokenizer, texts: list[str], doc_ids: list[int], seq_len: int,
                max_tokens: int | None = None) -> Windows:  # fmt: skip
    bos = tokenizer.bos_token_id
    return pack_windows(tokenise(tokenizer, texts), doc_ids, seq_len, bos, bos, max_tokens)


def corpus_windows(corpus, tokenizer, seq_len: int, split: str,
                   max_tokens: int | None = None) -> Windows:  # fmt: skip
    """The documents of one split (`train` | `heldout`) of a corpus (`stages.corpus.Corpus`)
    as windows of `seq_len` tokens, by the packing rule of `stages/tokens.py`: what the LM
    trains on and what the activation cache stores, one function for both."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split = {split!r}, expected 'train' or 'heldout'")
    ix = [i for i, s in enumerate(corpus.splits) if s == split]
    return windows_for(tokenizer, [corpus.texts[i] for i in ix], [corpus.doc_ids[i] for i in ix],
                       seq_len, max_tokens=max_tokens)  # fmt: skip


# ---------------------------------------------------------------------------- save / load


def save_toy_model(model: HookedTransformer, m: ToyModel, tok_dir: Path, out: Path) -> None:
    """Write weights (safetensors), config and tokenizer files into folder `out`."""
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    for f in Path(tok_dir).iterdir():
        shutil.copy2(f, out / f.name)
    write_json(
        out / "config.json",
        {
            "source": "toy",
            "model": m.model_dump(mode="json"),
            "d_vocab": model.cfg.d_vocab,
            "n_layers": model.cfg.n_layers,
            "d_model": model.cfg.d_model,
        },
    )


def load_pretrained(name: str, dtype: str = "float32") -> HookedTransformer:
    """HookedTransformer.from_pretrained, with a clear message when offline and uncached."""
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        official = get_official_model_name(name)
    except ValueError:
        raise ValueError(
            f"models: {name!r} is not a TransformerLens model name "
            "(e.g. 'gpt2', 'pythia-70m-deduped')"
        ) from None
    try:
        return HookedTransformer.from_pretrained(
            official, device="cpu", dtype=getattr(torch, dtype)
        )
    except Exception as e:  # hub / cache errors come in many types
        home = os.environ.get("HF_HOME", "~/.cache/huggingface")
        offline = os.environ.get("HF_HUB_OFFLINE", "0")
        raise RuntimeError(
            f"could not load pretrained model {name!r} ({official}): it needs the Hugging Face "
            f"hub or an HF cache holding {official}'s config, weights and tokenizer "
            f"(HF_HOME={home}, HF_HUB_OFFLINE={offline}). Cause: {type(e).__name__}: {e}"
        ) from e


def write_pretrained_card(model: HookedTransformer, p: PretrainedModel, out: Path) -> None:
    cfg = model.cfg
    write_json(
        out / "config.json",
        {
            "source": "pretrained",
            "model": p.model_dump(mode="json"),
            "d_vocab": cfg.d_vocab,
            "n_layers": cfg.n_layers,
            "d_model": cfg.d_model,
        },
    )


def token_strings(folder: Path) -> list[str]:
    """The decoded string of every token id of the model in `folder` (what the `lm` stage
    wrote), in id order: alignment compares two tokenizers' top tokens through these.
    A pretrained model's tokenizer comes from the HF cache (or the hub)."""
    folder = Path(folder)
    card = read_json(folder / "config.json", "the lm stage's output (run `dvc repro lm`)")
    if card["source"] == "pretrained":
        from transformer_lens.loading_from_pretrained import get_official_model_name
        from transformers import AutoTokenizer

        official = get_official_model_name(PretrainedModel.model_validate(card["model"]).name)
        try:
            tok = AutoTokenizer.from_pretrained(official)
        except Exception as e:  # hub / cache errors come in many types
            home = os.environ.get("HF_HOME", "~/.cache/huggingface")
            raise RuntimeError(
                f"could not load the tokenizer of {official}: it needs the Hugging Face hub or "
                f"an HF cache holding it (HF_HOME={home}). Cause: {type(e).__name__}: {e}"
            ) from e
    else:
        tok = load_tokenizer(folder)
    return [tok.decode([i]) for i in range(len(tok))]


def load_model(folder: Path) -> HookedTransformer:
    """Load what the `lm` stage wrote for one model (toy or pretrained), in eval mode."""
    folder = Path(folder)
    card = read_json(folder / "config.json", "the lm stage's output (run `dvc repro lm`)")
    if card["source"] == "pretrained":
        p = PretrainedModel.model_validate(card["model"])
        model = load_pretrained(p.name, p.dtype)
    else:
        from transformer_lens import HookedTransformer

        m = ToyModel.model_validate(card["model"])
        tok = load_tokenizer(folder)
        model = HookedTransformer(toy_config(m, card["d_vocab"]), tokenizer=tok)
        model.load_state_dict(load_safetensors(folder / "model.safetensors", "toy model's weights"))
    model.eval()
    return model


_IN_USE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_IN_USE_GUARD = threading.Lock()


def exclusive(model: torch.nn.Module) -> threading.Lock:
    """The lock that serialises every hooked forward pass on `model` in this process.

    TransformerLens keeps hooks on the model's modules, not on the call: while one thread
    runs `run_with_hooks` (an SAE spliced in) or caches through hooks, another thread's
    forward pass through the same model object fires those hooks too and computes, or
    stores, the wrong numbers. A Dask worker with several threads shares one loaded
    model between its tasks (`flows.saes._worker_inputs`, `flows.activations._worker_model`),
    so each task holds this lock while it uses the model (measured: two threads splicing
    different hooks into one tiny model, 198 of 400 forward passes wrong unlocked, 0 locked;
    tests/backbone/test_model_lock.py)."""
    with _IN_USE_GUARD:
        lock = _IN_USE.get(model)
        if lock is None:
            lock = _IN_USE[model] = threading.Lock()
        return lock
