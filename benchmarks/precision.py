"""fp32 vs bf16 (`compute.precision`) on the real default data: speed and SAE quality.

    .venv/bin/python benchmarks/precision.py [--model toy-a] [--hook blocks.1.hook_resid_post]
        [--windows 512] [--sae-tokens 1000000]

Needs the pipeline's outputs (`data/models/<model>`, `data/activations/<model>`). On the
device `compute.device` resolves to (this machine: the CPU), prints:

1. caching: tokens/s of `cache_shards` over `--windows` held-out windows, all the
   model's cached hooks, in fp32 and bf16, and the relative error of the bf16 rows;
2. SAE: the default sweep's TopK (1024 latents, k 16) trained on `--sae-tokens` rows of
   the hook in fp32 and bf16, then evaluated identically (fp32, held-out rows, CE with
   the SAE spliced in): tokens/s of training, FVU, L0, dead fraction, CE loss recovered.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def caching(model, store, windows: int, dev_spec: str) -> None:
    from stages.activations import ActivationStore, CacheInputs, cache_activations
    from stages.compute import Device
    from stages.config import StoreParams
    from stages.tokens import Windows

    toks = store.windows("heldout", windows).numpy().astype(np.int32)
    n, seq = toks.shape
    pos = np.tile(np.arange(seq, dtype=np.int32), (n, 1))
    w = Windows(toks, np.zeros_like(toks), pos, pos + 1)
    empty = Windows(toks[:0], toks[:0], pos[:0], pos[:0])
    inputs = CacheInputs(w, empty, None, [], "benchmark")
    params = StoreParams(seq_len=seq, batch_size=64, shard_rows=65536, chunk_rows=8192)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for prec in ("fp32", "bf16"):
            out = Path(tmp) / prec
            t0 = time.perf_counter()
            cache_activations(model, "bench", store.hooks, inputs, params, out,
                              device=Device(dev_spec, prec))  # fmt: skip
            dt = time.perf_counter() - t0
            s = ActivationStore(out)
            rows[prec] = {h: s.read(h).astype(np.float32) for h in store.hooks}
            err = ""
            if prec == "bf16":
                rel = [np.linalg.norm(rows["bf16"][h] - rows["fp32"][h])
                       / np.linalg.norm(rows["fp32"][h]) for h in store.hooks]  # fmt: skip
                err = f"; bf16 rows' relative error {min(rel):.4f}..{max(rel):.4f}"
            print(f"  caching {prec}: {n * (seq - 1) / dt:,.0f} tok/s (incl. writing){err}")


def sae(store, model, hook: str, n_tokens: int, dev_spec: str) -> None:
    from stages.compute import Device
    from stages.sae import SliceSource, TopKConfig, evaluate_sae, train_saes

    held = store.source(hook, "heldout")
    held = SliceSource(held, 0, min(held.n_rows, 65536))
    for prec in ("fp32", "bf16"):
        cfg = TopKConfig(expansion_factor=8, k=16, n_training_tokens=n_tokens, batch_size=4096,
                         lr=1e-3, seed=0)  # fmt: skip
        t0 = time.perf_counter()
        (r,) = train_saes(store.source(hook, "train"), [cfg], progress=False,
                          device=Device(dev_spec, prec))  # fmt: skip
        dt = time.perf_counter() - t0
        torch.manual_seed(0)
        m = evaluate_sae(r.sae, held, model=model, hook_name=hook,
                         tokens=store.windows("heldout", 64)).metrics  # fmt: skip
        print(f"  SAE topk-1024-k16 {prec}: {r.n_tokens / dt:,.0f} tok/s training; FVU "
              f"{m['fvu']:.4f}, L0 {m['l0']:.2f}, dead {m['dead_fraction']:.3f}, CE recovered "
              f"{m['downstream']['ce_loss_recovered']:.4f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="toy-a")
    ap.add_argument("--hook", default="blocks.1.hook_resid_post")
    ap.add_argument("--windows", type=int, default=512)
    ap.add_argument("--sae-tokens", type=int, default=1_000_000)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    from stages.activations import ActivationStore
    from stages.compute import resolve_device
    from stages.models import load_model

    dev = str(resolve_device(a.device, "--device"))
    print(f"# {a.model} {a.hook} on {dev}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), load {os.getloadavg()[0]:.1f}")  # fmt: skip
    model = load_model(Path("data/models") / a.model)
    store = ActivationStore(Path("data/activations") / a.model)
    caching(model, store, a.windows, dev)
    sae(store, model, a.hook, a.sae_tokens, dev)


if __name__ == "__main__":
    main()
