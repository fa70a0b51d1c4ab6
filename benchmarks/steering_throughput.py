"""Steering throughput: vector extraction and evaluation vs a bare batched forward pass.

    .venv/bin/python benchmarks/steering_throughput.py [--model data/models/toy-a]
        [--pairs 512] [--batch 64] [--threads 1]

Extraction (`compute_vectors`: tokenise, right-pad, run to `stop_at_layer` with capture
hooks, gather each prompt's read position) is compared with a bare
`model(tokens, stop_at_layer=...)` over the same padded batches; evaluation
(`metric_grid`: every prompt × multiplier row with the steering hook on, metric at each
prompt's last token) with a bare full forward over the same rows. Target: within 20 %.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from stages.activations import stop_layer
from stages.models import load_model
from stages.steering import toy_sets
from stages.steering.evaluate import metric_grid
from stages.steering.vectors import compute_vectors, pad_right, tokenize


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="data/models/toy-a")
    ap.add_argument("--pairs", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(Path(a.model))
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(model.cfg.n_layers)]
    pairs = toy_sets(0, a.pairs, 32, ["past_vs_present"])["past_vs_present"].train_pairs
    prompts = [p.positive for p in pairs] + [p.negative for p in pairs]
    pad = model.tokenizer.pad_token_id or 0
    seqs = tokenize(model, prompts)
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    batches = [pad_right([seqs[i] for i in order[b : b + a.batch]], pad)[0]
               for b in range(0, len(order), a.batch)]  # fmt: skip
    n_tok = sum(len(x) for x in seqs)
    stop = stop_layer(model, hooks)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, threads {a.threads}; model {a.model} "
          f"(d_model {model.cfg.d_model}, {model.cfg.n_layers} layers)")  # fmt: skip
    with torch.inference_mode():
        bare = best_of(lambda: [model(b, stop_at_layer=stop) for b in batches])
        ext = best_of(lambda: compute_vectors(model, pairs, hooks, batch_size=a.batch))
    print(f"extraction: {len(prompts)} prompts, {n_tok} tokens, hooks {hooks}")
    print(f"  bare batched forward (stop_at_layer={stop}): {bare:.3f} s  {n_tok / bare:,.0f} tok/s")
    print(f"  compute_vectors (tokenise + hooks + gather): {ext:.3f} s  {n_tok / ext:,.0f} tok/s"
          f"  overhead {ext / bare - 1:+.1%}")  # fmt: skip

    mults = [-4.0, -2.0, 0.0, 2.0, 4.0]
    ev = toy_sets(0, 64, 256, ["mammal_vs_bird"])["mammal_vs_bird"]
    eseqs = tokenize(model, [e.prompt for e in ev.eval_prompts])
    rows = [eseqs[i] for i in range(len(eseqs)) for _ in mults]
    ebatches = [pad_right(rows[b : b + a.batch], pad)[0] for b in range(0, len(rows), a.batch)]
    e_tok = sum(len(x) for x in rows)
    v = torch.randn(model.cfg.d_model)
    with torch.inference_mode():
        bare_e = best_of(lambda: [model(b) for b in ebatches])
        grid = best_of(lambda: metric_grid(model, ev, hooks[-1], v, mults, batch_size=a.batch))
    print(f"evaluation: {len(eseqs)} prompts × {len(mults)} multipliers = {len(rows)} rows, "
          f"{e_tok} tokens")  # fmt: skip
    print(f"  bare batched forward (logits): {bare_e:.3f} s  {e_tok / bare_e:,.0f} tok/s")
    print(f"  metric_grid (steering hook + metric): {grid:.3f} s  {e_tok / grid:,.0f} tok/s"
          f"  overhead {grid / bare_e - 1:+.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
