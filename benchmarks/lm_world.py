"""Toy LM training throughput and what the model learns of the world, per config.

    python benchmarks/lm_world.py                                   # the params.yaml toy-a config
    python benchmarks/lm_world.py --set arch.n_layers=4 --set train.tokens=2000000 \
        --set train.lr=0.002 --set train.batch_size=32

Builds the default corpus (params.yaml corpus), trains one toy model with the
overrides, and prints: train tokens/s against the machine's float32 GEMM rate and the
model's FLOPs per token (6 N + attention), wall time, held-out loss against the corpus
entropy per token, and the capture of each planted dependency (stages/capture.py) with
its 95 % interval. Nothing is written under data/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch


def gemm_gflops(n: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t0) / 1e9


def _set(d: dict, key: str, value: str) -> None:
    *path, last = key.split(".")
    for k in path:
        d = d.setdefault(k, {})
    try:  # numbers, true / false, lists and objects as JSON; anything else as a string
        d[last] = json.loads(value)
    except json.JSONDecodeError:
        d[last] = value


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="toy-a", help="params.yaml model to start from")
    ap.add_argument("--set", action="append", default=[], help="key=value on the model entry")
    ap.add_argument("--n-docs", type=int, default=None, help="corpus size (default: params)")
    ap.add_argument("--sites", type=int, default=64, help="held-out contexts per dependency")
    a = ap.parse_args()

    from stages.capture import world_metrics
    from stages.config import ToyModel, load_params
    from stages.corpus import build_corpus
    from stages.models import build_toy_model, train_tokenizer, train_toy_model, windows_for

    params = load_params()
    entry = params.models[a.model].model_dump(mode="json")
    for kv in a.set:
        k, v = kv.split("=", 1)
        _set(entry, k, v)
    m = ToyModel.model_validate(entry)
    cp = params.corpus
    if a.n_docs:
        cp = cp.model_copy(update={"toy": cp.toy.model_copy(update={"n_docs": a.n_docs})})
    t0 = time.perf_counter()
    c = build_corpus(cp)
    tr = [i for i, s in enumerate(c.splits) if s == "train"]
    he = [i for i, s in enumerate(c.splits) if s == "heldout"]
    with tempfile.TemporaryDirectory() as tmp:
        tok = train_tokenizer([c.texts[i] for i in tr], m.tokenizer.vocab_size, Path(tmp))
        train_w = windows_for(tok, [c.texts[i] for i in tr], tr, m.train.seq_len)
        held_w = windows_for(tok, [c.texts[i] for i in he], he, m.train.seq_len)
        t_prep = time.perf_counter() - t0
        model = build_toy_model(m, tok)
        t1 = time.perf_counter()
        res = train_toy_model(model, m, train_w, held_w)
        t_train = time.perf_counter() - t1
        t2 = time.perf_counter()
        w = world_metrics(model, [c.texts[i] for i in he], [c.entropy_nats[i] for i in he], a.sites)
        t_world = time.perf_counter() - t2
    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    ar = m.arch
    flops_tok = 6 * n_params + 6 * ar.n_layers * m.train.seq_len * ar.d_model  # fwd+bwd
    gemm = gemm_gflops()
    out = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "arch": ar.model_dump(),
        "train": m.train.model_dump(),
        "n_params": n_params,
        "steps": res.steps,
        "train_tokens_per_s": round(res.tokens_per_s),
        "train_gflops": round(res.tokens_per_s * flops_tok / 1e9, 1),
        "gemm_gflops": round(gemm, 1),
        "time_prepare_s": round(t_prep, 1),
        "time_train_s": round(t_train, 1),
        "time_world_s": round(t_world, 1),
        "heldout_loss": round(res.heldout_loss, 4),
        "unigram_entropy": round(res.unigram_entropy, 4),
        **w,
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
