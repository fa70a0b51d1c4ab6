"""Seconds the untrained-model controls add to `align@toy-a__toy-b` (stages/alignment/controls.py).

What the align stage runs for them, at the default sizes of params.yaml: both untrained
models (toy-a's and toy-b's architecture and seed, `build_toy_model`) recompute their
activations at the `align.config.n_samples` subsample rows of a store of seq_len 128
(`model_at_rows`: one prefix per sampled row's window, up to that row), then every dense
measure with `n_permutations` permutations, for (untrained A, untrained B) and (trained A,
untrained B), on every compared hook pair. The stores here are cached from the untrained
models themselves over generated stories (the figures are wall time; the scores are not
looked at).

Usage: python benchmarks/alignment_controls.py [--stories 1600]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from stages.activations import ActivationStore, CacheInputs, cache_activations
from stages.alignment import AlignConfig
from stages.alignment.controls import untrained_controls
from stages.config import StoreParams, load_params
from stages.corpus import CONCEPT_NAMES, generate_story
from stages.models import build_toy_model, model_at_rows, train_tokenizer, windows_for


def machine_context() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown CPU")  # fmt: skip
    return (f"machine: {cpu}; os.cpu_count() = {os.cpu_count()}; load average "
            f"{os.getloadavg()[0]:.1f} (shared machine); torch threads "
            f"{torch.get_num_threads()}; torch {torch.__version__}; python "
            f"{platform.python_version()}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stories", type=int, default=1600)
    ap.add_argument("--metrics", nargs="*", help="control_metrics (default: params.yaml's)")
    args = ap.parse_args()
    params = load_params()
    cfg = AlignConfig.from_params(params.align.config)
    if args.metrics is not None:
        cfg = dataclasses.replace(cfg, control_metrics=tuple(args.metrics))
    pair = next(iter(params.align.pairs.values()))
    ms = [params.models[pair.a], params.models[pair.b]]
    hooks = params.hooks(pair.a)
    print(machine_context())
    with tempfile.TemporaryDirectory() as tmp:
        stories = [generate_story(7, i) for i in range(args.stories)]
        texts = [t for t, _ in stories]
        tok = train_tokenizer(texts, ms[0].tokenizer.vocab_size, Path(tmp) / "tok")
        seq = params.activations.store.seq_len
        n_train = int(0.8 * len(texts))
        train = windows_for(tok, texts[:n_train], list(range(n_train)), seq)
        held = windows_for(tok, texts[n_train:], list(range(n_train, len(texts))), seq)
        empty = pa.table({"doc_id": pa.array([], pa.int64()), "char_start": pa.array([], pa.int32()),
                          "char_end": pa.array([], pa.int32()), "concept": pa.array([], pa.string())})  # fmt: skip
        inputs = CacheInputs(train, held, empty, CONCEPT_NAMES, "bench")
        sp = StoreParams(seq_len=seq, batch_size=64, shard_rows=65536, chunk_rows=8192)
        models, stores = [], []
        for i, m in enumerate(ms):
            model = build_toy_model(m, tok).eval()
            path = Path(tmp) / f"store{i}"
            cache_activations(model, f"m{i}", hooks, inputs, sp, path)
            models.append(model)
            stores.append(ActivationStore(path))
        n = stores[0].n_rows
        rows = np.sort(np.random.default_rng(0).choice(n, min(cfg.n_samples, n), replace=False))
        print(f"stores: {n:,} rows, seq_len {seq}; {len(rows)} subsample rows, {len(hooks)} "
              f"hook pairs, {cfg.n_permutations} permutations")  # fmt: skip
        with torch.no_grad():
            t0 = time.perf_counter()
            ua = model_at_rows(models[0], stores[0], rows, hooks)
            ub = model_at_rows(models[1], stores[1], rows, hooks)
            t_fwd = time.perf_counter() - t0
        trained = {h: np.asarray(stores[0].array(h)[:])[rows] for h in hooks}
        from threadpoolctl import threadpool_limits

        with threadpool_limits(1, user_api="blas"):  # as align_pair runs its measures
            t0 = time.perf_counter()
            untrained_controls(trained, ua, ub, [(h, h) for h in hooks],
                               n_permutations=cfg.n_permutations, seed=cfg.seed, k=cfg.knn_k,
                               metrics=cfg.control_metrics, trained_b=trained)  # fmt: skip
            t_measures = time.perf_counter() - t0
    print(f"untrained activations at the subsample rows (both models): {t_fwd:.2f} s")
    print(
        f"{', '.join(cfg.control_metrics)} x 2 controls x {len(hooks)} hook pairs: {t_measures:.2f} s"
    )
    print(f"added to align@{pair.a}__{pair.b}: {t_fwd + t_measures:.2f} s")


if __name__ == "__main__":
    main()
