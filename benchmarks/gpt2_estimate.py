"""Time and storage for GPT-2 small at 100M tokens x 12 layers, from measured per-token costs.

    .venv/bin/python benchmarks/gpt2_estimate.py [--tokens 100e6] [--gpu-tflops 989]
        [--mfu 0.35] [--disk-gbs 2.0] [--gpus 4]

Measured here (no hub needed: a randomly initialised model of GPT-2 small's shape —
12 layers, d_model 768, 12 heads, d_mlp 3072, vocab 50257 — runs exactly the same
FLOPs as the real one):

1. caching: `prepare_cache` + `cache_shards` of that model over random token windows
   (seq 128) into a zarr store, all 12 `hook_resid_post`, float16 — tokens/s and
   bytes/token on disk;
2. SAE training: one TopK SAE (768 -> 12288, k 32) on 768-wide rows — tokens/s;
3. the float32 GEMM rate of this machine, to turn both into FLOP utilisation.

Beside it, the same per-token costs (tokens/s of caching, bytes/token on disk against
the activations stage's plan, stages/activations/budget.py) on the tiny models the tests and
the default pipeline cache, and the GPT-2-shape rate recorded as FLOP/s in
`.benchmarks/activation_rates.json`, which the stage's plan turns into minutes for a model
not yet cached on this machine.

Last measured (2026-12, this project's 2-core machine shared, load 4.7, 1 torch thread;
`--windows 32 --sae-steps 3`): tests-d16 111,211 tok/s, 71.4 bytes/token on disk (planned
100.0: metadata, counted uncompressed, dominates at d 16); toy-d128 26,423 tok/s, 519.2
bytes/token (planned 537.0, +3.4 %); GPT-2-small shape 128 tok/s = 22 GFLOP/s (81 % of a
27 GFLOP/s GEMM), 18,586 bytes/token; SAE TopK 768->12288 k32 1,235 tok/s. One run each,
no interval: rates on a shared machine vary with its load; the bytes do not.

Then the estimate: time = max(compute, I/O) per stage, where compute = FLOPs/token x
tokens / (GPU dense bf16 peak x MFU) and I/O = bytes / disk bandwidth. The GPU figures
are assumptions, printed with the result (H100 SXM: 989 TFLOP/s dense bf16); the CPU
figures are what this machine measured and show that the FLOP model accounts for the
time (utilisation near the GEMM rate means no hidden costs).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

D, L, D_MLP, VOCAB, SEQ, D_SAE, K = 768, 12, 3072, 50257, 128, 12288, 32


def gemm_gflops(n: int = 2048) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    t0 = time.perf_counter()
    for _ in range(5):
        torch.mm(a, b)
    return 5 * 2 * n**3 / (time.perf_counter() - t0) / 1e9


def forward_flops_per_token() -> float:
    """Blocks only (caching stops at n_layers: no unembedding): QKV/O + MLP matmuls and
    attention scores/values at the mean causal context of a 128-token window (the same
    count the activations stage's plan uses: stages/activations/budget.py)."""
    from stages.activations.budget import forward_flops_per_token as f

    return f(L, D, D_MLP, SEQ)


def measure_tiny(n_windows: int = 512) -> list[tuple[str, float, float, float]]:
    """Per-token costs measured on the tiny models the tests and the default pipeline use:
    the tests' 2-layer d16 model (tests/backbone/_cache_script.py) and the default toy
    shape (2 layers, d_model 128, d_mlp 512, 4 heads, vocab 4k, seq 128), each caching 2
    hooks. Returns (name, tok/s of cache_shards, bytes/token on disk, planned
    bytes/token); the planned figure is the budget's (activations exact, metadata counted
    uncompressed), so planned >= measured."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from stages.activations import (
        CacheInputs,
        cache_shards,
        finish_cache,
        prepare_cache,
        store_budget,
    )
    from stages.config import StoreParams
    from stages.tokens import Windows

    out = []
    shapes = {"tests-d16": (2, 16, 2, 32, 50, 16), "toy-d128": (2, 128, 4, 512, 4096, 128)}
    for name, (n_l, d, h, d_mlp, vocab, seq) in shapes.items():
        cfg = HookedTransformerConfig(n_layers=n_l, d_model=d, n_heads=h, d_head=d // h,
                                      d_mlp=d_mlp, n_ctx=seq, d_vocab=vocab, act_fn="gelu",
                                      seed=0)  # fmt: skip
        model = HookedTransformer(cfg).eval()

        class Tok:
            bos_token_id = 0
            padding_side = "right"

        model.tokenizer = Tok()
        rng = np.random.default_rng(0)
        toks = rng.integers(1, vocab, (n_windows, seq)).astype(np.int32)
        toks[:, 0] = 0
        pos = np.tile(np.arange(seq, dtype=np.int32), (n_windows, 1))
        docs = np.repeat(np.arange(n_windows), seq).reshape(n_windows, seq)
        w = Windows(toks, docs, pos, pos + 1)
        inputs = CacheInputs(w, Windows(toks[:0], docs[:0], pos[:0], pos[:0]), None, [], "x")
        hooks = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
        p = StoreParams(seq_len=seq, batch_size=64, shard_rows=8192, chunk_rows=1024)
        with tempfile.TemporaryDirectory() as tmp:
            plan = prepare_cache(model, name, hooks, inputs, p, Path(tmp) / "store")
            t0 = time.perf_counter()
            cache_shards(model, plan, plan.todo(), progress=False)
            dt = time.perf_counter() - t0
            finish_cache(plan)
            on_disk = sum(f.stat().st_size for f in (Path(tmp) / "store").rglob("*")
                          if f.is_file())  # fmt: skip
        rows = n_windows * (seq - 1)
        planned = store_budget(model, name, hooks, inputs, p).disk_bytes
        out.append((name, rows / dt, on_disk / rows, planned / rows))
    return out


def sae_flops_per_token() -> float:
    """TopK training step as our trainer runs it (stages/sae/sparse_ops.py): one dense
    encoder GEMM; decode, the two decoder products and the encoder weight grad touch only
    the k selected latents (AuxK adds a few more k-sparse products: left out)."""
    return 2 * D * D_SAE + 4 * 2 * K * D


def gpt2_shaped_cache(n_windows: int, tmp: Path, device=None,
                      batch_size: int = 8) -> tuple[float, np.ndarray]:  # fmt: skip
    """Cache all 12 `hook_resid_post` of a random GPT-2-small-shaped model over random
    windows into `tmp/store` on `device` (a `stages.compute.Device`; CPU by default).
    Returns tokens/s of `cache_shards` and the stored rows of the last hook."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from stages.activations import (
        ActivationStore,
        CacheInputs,
        cache_shards,
        finish_cache,
        prepare_cache,
    )
    from stages.compute import CPU
    from stages.config import StoreParams
    from stages.tokens import Windows

    cfg = HookedTransformerConfig(n_layers=L, d_model=D, n_heads=12, d_head=64, d_mlp=D_MLP,
                                  n_ctx=SEQ, d_vocab=VOCAB, act_fn="gelu_new", seed=0)  # fmt: skip
    model = HookedTransformer(cfg)
    model.eval()

    class Tok:  # what prepare_cache and the forward read from a tokenizer
        bos_token_id = 50256
        padding_side = "right"

    model.tokenizer = Tok()
    rng = np.random.default_rng(0)
    toks = rng.integers(0, VOCAB, (n_windows, SEQ)).astype(np.int32)
    toks[:, 0] = 50256
    pos = np.tile(np.arange(SEQ, dtype=np.int32), (n_windows, 1))
    docs = np.repeat(np.arange(n_windows), SEQ).reshape(n_windows, SEQ)
    w = Windows(toks, docs, pos, pos + 1)
    empty = Windows(toks[:0], docs[:0], pos[:0], pos[:0])
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(L)]
    p = StoreParams(seq_len=SEQ, batch_size=batch_size, shard_rows=4096, chunk_rows=1024)
    device = device or CPU
    plan = prepare_cache(model, "gpt2-shape", hooks, CacheInputs(w, empty, None, [], "x"),
                         p, tmp / "store", precision=device.precision)  # fmt: skip
    t0 = time.perf_counter()
    cache_shards(model, plan, plan.todo(), progress=False, device=device)
    dt = time.perf_counter() - t0
    finish_cache(plan)
    rows = ActivationStore(tmp / "store").read(hooks[-1])
    return n_windows * (SEQ - 1) / dt, rows


def measure_caching(n_windows: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        tps, _ = gpt2_shaped_cache(n_windows, Path(tmp))
        store = Path(tmp) / "store"
        on_disk = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    return tps, on_disk / (n_windows * (SEQ - 1))


def measure_sae(steps: int, batch: int) -> float:
    from stages.sae import ArraySource, TopKConfig, train_saes

    x = np.random.default_rng(0).standard_normal((batch * 4, D)).astype(np.float16)
    cfg = TopKConfig(d_sae=D_SAE, k=K, batch_size=batch, n_training_tokens=batch * steps,
                     lr=1e-3, seed=0)  # fmt: skip
    t0 = time.perf_counter()
    train_saes(ArraySource(x), [cfg], progress=False, n_norm_rows=batch)
    return batch * steps / (time.perf_counter() - t0)


def hms(s: float) -> str:
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=float, default=100e6)
    ap.add_argument("--gpu-tflops", type=float, default=989.0, help="dense bf16 peak per GPU")
    ap.add_argument("--mfu", type=float, default=0.35, help="fraction of peak reached")
    ap.add_argument("--disk-gbs", type=float, default=2.0, help="write/read GB/s per node")
    ap.add_argument("--gpus", type=int, default=4)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--sae-steps", type=int, default=6)
    a = ap.parse_args()
    print(f"# {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), load {os.getloadavg()[0]:.1f}")  # fmt: skip
    gemm = gemm_gflops()
    f_fwd, f_sae = forward_flops_per_token(), sae_flops_per_token()
    tps_cache, bytes_tok = measure_caching(a.windows)
    from stages.activations import record_rate

    record_rate("gpt2-shape (benchmark)", tps_cache, f_fwd)
    tps_sae = measure_sae(a.sae_steps, 2048)
    print(f"float32 GEMM: {gemm:.0f} GFLOP/s")
    for name, tps, b_tok, planned in measure_tiny():
        print(f"caching, {name}, 2 hooks: {tps:,.0f} tok/s on this CPU; {b_tok:,.1f} "
              f"bytes/token on disk, planned {planned:,.1f} (the plan's bound)")  # fmt: skip
    print(f"caching, GPT-2-small shape, 12 hooks: {tps_cache:,.0f} tok/s on this CPU = "
          f"{tps_cache * f_fwd / 1e9:.0f} GFLOP/s ({tps_cache * f_fwd / 1e9 / gemm:.0%} of GEMM);"
          f" {bytes_tok:,.0f} bytes/token on disk")  # fmt: skip
    print(
        f"SAE TopK 768->{D_SAE} k{K}: {tps_sae:,.0f} tok/s on this CPU = "
        f"{tps_sae * f_sae / 1e9:.0f} GFLOP/s ({tps_sae * f_sae / 1e9 / gemm:.0%} of GEMM)"
    )

    n, rate = a.tokens, a.gpu_tflops * 1e12 * a.mfu
    store = n * bytes_tok
    io = a.disk_gbs * 1e9
    print(f"\nestimate for {n:.0e} tokens x {L} layers (assumed: {a.gpu_tflops:.0f} TFLOP/s "
          f"peak x {a.mfu:.0%} MFU per GPU, {a.disk_gbs} GB/s disk per node, one GPU per node)")  # fmt: skip
    print(f"  activation store: {store / 1e12:.2f} TB (float16, 12 x 768 per token)")
    for g in (1, a.gpus):
        cache = max(n * f_fwd / (rate * g), store / (io * g))
        # one SAE per layer; every SAE reads its layer's rows once
        sae = max(L * n * f_sae / (rate * g), store / (io * g))
        print(f"  {g} GPU(s): caching {hms(cache)} ({'I/O' if store / (io * g) > n * f_fwd / (rate * g) else 'compute'}-bound), "
              f"12 SAEs {hms(sae)}; on this CPU: caching {hms(n / tps_cache)}, "
              f"SAEs {hms(L * n / tps_sae)}")  # fmt: skip


if __name__ == "__main__":
    main()
