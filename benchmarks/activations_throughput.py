"""Activation caching throughput against a bare forward pass of the same model and batches.

    python benchmarks/activations_throughput.py [--model data/models/toy-a] [--tokens 200000]

Prints tokens/s for: the bare full forward, the bare forward with `stop_at_layer` (what
caching needs), and `cache_activations` end to end (hooks, float16 copy, zarr writes in
a background thread, resume bookkeeping). Overhead is reported against both. Uses the
pipeline's own model and corpus when present, else a freshly initialised toy model.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="data/models/toy-a")
    ap.add_argument("--corpus", default="data/corpus")
    ap.add_argument("--tokens", type=int, default=200_000)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    from stages.activations import CacheInputs, cache_activations, stop_layer
    from stages.config import StoreParams, load_params
    from stages.corpus import read_corpus
    from stages.models import load_model, windows_for

    params = load_params()
    name = Path(a.model).name
    hooks = params.hooks(name)
    sp = params.activations.store
    model = load_model(Path(a.model))
    c = read_corpus(Path(a.corpus))
    ix = [i for i, s in enumerate(c.splits) if s == "train"]
    w = windows_for(model.tokenizer, [c.texts[i] for i in ix], [c.doc_ids[i] for i in ix],
                    sp.seq_len, max_tokens=a.tokens)  # fmt: skip
    held = windows_for(model.tokenizer, [c.texts[i] for i in ix[:8]], ix[:8], sp.seq_len)
    held.tokens, held.doc_ids = held.tokens[:0], held.doc_ids[:0]
    held.char_start, held.char_end = held.char_start[:0], held.char_end[:0]
    tokens = torch.from_numpy(w.tokens.astype(np.int64))
    n_rows = w.n * (sp.seq_len - 1)
    bs = sp.batch_size
    stop = stop_layer(model, hooks)

    def bare(stop_at):
        t0 = time.perf_counter()
        with torch.inference_mode():
            for i in range(0, len(tokens), bs):
                model(tokens[i : i + bs], stop_at_layer=stop_at)
        return n_rows / (time.perf_counter() - t0)

    def cached():
        d = Path(tempfile.mkdtemp(prefix="bench-cache-"))
        try:
            inputs = CacheInputs(w, held, None, [], "bench")
            p = StoreParams(**{**sp.model_dump(), "max_train_tokens": None, "url": None})
            t0 = time.perf_counter()
            cache_activations(model, name, hooks, inputs, p, d / "store")
            return n_rows / (time.perf_counter() - t0)
        finally:
            shutil.rmtree(d, ignore_errors=True)

    bare(None)  # warm-up
    results = {
        "bare full forward": [],
        f"bare forward, stop_at_layer={stop}": [],
        "cache_activations": [],
    }
    for _ in range(a.repeats):  # interleaved so drift in machine load hits all three alike
        results["bare full forward"].append(bare(None))
        results[f"bare forward, stop_at_layer={stop}"].append(bare(stop))
        results["cache_activations"].append(cached())
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")  # fmt: skip
    print(f"model {name}: d_model {model.cfg.d_model}, {model.cfg.n_layers} layers; hooks {hooks}")
    print(f"{n_rows:,} tokens in {len(tokens)} windows of {sp.seq_len}, batch {bs}, "
          f"dtype {sp.dtype}, best of {a.repeats}")  # fmt: skip
    best = {k: max(v) for k, v in results.items()}
    for k, v in best.items():
        print(f"  {k:38s} {v:12,.0f} tokens/s")
    cache = best["cache_activations"]
    for k in list(best)[:2]:
        print(f"  caching overhead vs {k:24s} {100 * (best[k] / cache - 1):6.1f} %")


if __name__ == "__main__":
    main()
