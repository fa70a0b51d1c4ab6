"""The GPU path against the CPU reference: same answers, and how fast.

    .venv/bin/python benchmarks/gpu_check.py [--device cuda] [--windows 256] [--sae-steps 50]

Needs a CUDA build of torch and a GPU; without one it says so and exits 0
(`--device cpu --windows 8 --sae-steps 2` runs every part on the CPU: a dry run of the
script itself). Prints:

1. SAE training on planted features (stages/sae/synthetic.py: 64 features in 32
   dimensions), TopK and ReLU, on the CPU in fp32 and on the GPU in fp32 and bf16:
   recovery (MMCS), held-out FVU and L0, evaluated on the CPU. Expected: the same
   quality everywhere (differences in the third decimal, as between fp32 and bf16 on
   the CPU in tests/sae/test_precision.py).
2. SAE evaluation on the GPU vs the CPU for one SAE: every metric, max relative
   difference (float32 vs float32, different kernels: expected ~1e-6).
3. Caching on the GPU (`cache_shards` with a GPT-2-small-shaped model, 12 hooks) in fp32
   and bf16 vs the CPU: max |difference| of the stored float16 rows, and tokens/s; then
   tokens/s and peak memory for forward batches of 16..1024 windows: the
   `activations.store.batch_size` that fills the device is where tokens/s levels off.
4. TopK 768 -> 24576 (k 32) training throughput on the GPU in fp32 and bf16: tokens/s
   and TFLOP/s of the dense formulation (3 GEMMs forward + backward).
5. Alignment (`align_pair`) of a GPT-2-shaped store with itself through two random TopK
   768 -> 4096 SAEs on 2 hooks, the token pass on the CPU and on the GPU: seconds of
   the pass, and the largest difference of any score (float32 products into float64
   sums on both: expected ~1e-6; the Hungarian matches should be identical).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def sae_quality(dev_name: str) -> None:
    from stages.compute import Device
    from stages.sae import ArraySource, evaluate_sae, parse_sae_config, train_saes
    from stages.sae.synthetic import SyntheticFeatures, mmcs

    gen = SyntheticFeatures(32, 64, mean_active=4, seed=0)
    train = ArraySource(gen.source(200_000, chunk_rows=1024).materialize(), chunk_rows=1024)
    held = SyntheticFeatures(32, 64, mean_active=4, seed=0).source(8192, chunk_rows=1024)
    held = ArraySource(held.materialize(), chunk_rows=1024)
    print("1. SAE quality on planted features (evaluated on the CPU)")
    for arch in ({"architecture": "topk", "k": 4}, {"architecture": "relu", "l1_coefficient": 1.0}):
        cfg = parse_sae_config({**arch, "d_sae": 128, "n_training_tokens": 200_000,
                                "batch_size": 512, "lr": 1e-3, "dead_feature_window": 10240,
                                "seed": 0})  # fmt: skip
        for dev in (Device("cpu"), Device(dev_name), Device(dev_name, "bf16")):
            t0 = time.perf_counter()
            (r,) = train_saes(train, [cfg], progress=False, device=dev)
            dt = time.perf_counter() - t0
            m = evaluate_sae(r.sae, held).metrics
            print(f"   {arch['architecture']:5s} {dev.name:7s} {dev.precision}: MMCS "
                  f"{mmcs(r.sae.W_dec, gen.features):.4f}  FVU {m['fvu']:.4f}  "
                  f"L0 {m['l0']:.2f}  ({dt:.1f} s)")  # fmt: skip


def sae_eval_agreement(dev_name: str) -> None:
    from stages.compute import Device
    from stages.sae import ArraySource, evaluate_sae, parse_sae_config, train_saes
    from stages.sae.synthetic import SyntheticFeatures

    gen = SyntheticFeatures(32, 64, mean_active=4, seed=1)
    x = gen.source(40_000, chunk_rows=1024).materialize()
    cfg = parse_sae_config({"architecture": "topk", "k": 4, "d_sae": 128,
                            "n_training_tokens": 30_000, "batch_size": 512, "seed": 0})  # fmt: skip
    (r,) = train_saes(ArraySource(x[:30_000]), [cfg], progress=False)
    held = ArraySource(x[30_000:], chunk_rows=1024)
    labels = np.random.default_rng(0).random((10_000, 2)) < 0.1
    a = evaluate_sae(r.sae, held, labels=labels, concept_names=["a", "b"]).metrics
    b = evaluate_sae(r.sae, held, labels=labels, concept_names=["a", "b"],
                     device=Device(dev_name)).metrics  # fmt: skip
    worst = max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-12)
                for k in a if isinstance(a[k], float) and np.isfinite(a[k]))  # fmt: skip
    print(f"2. SAE evaluation {dev_name} vs cpu: max relative difference {worst:.2e}; "
          f"ground truth F1 {a['ground_truth']['mean_best_f1']:.4f} vs "
          f"{b['ground_truth']['mean_best_f1']:.4f}")  # fmt: skip


def caching(dev_name: str, n_windows: int) -> None:
    from benchmarks.gpt2_estimate import gpt2_shaped_cache
    from stages.compute import Device

    print(f"3. caching, GPT-2-small shape, 12 hooks, {n_windows} windows of 128")
    ref = None
    for dev in (Device("cpu"), Device(dev_name), Device(dev_name, "bf16")):
        with tempfile.TemporaryDirectory() as tmp:
            tps, rows = gpt2_shaped_cache(n_windows, Path(tmp), dev, batch_size=32)
        diff = "" if ref is None else (
            f", max |diff| vs cpu {np.abs(rows.astype(np.float32) - ref).max():.3g}"
            f" (rows' std {ref.std():.3g})")  # fmt: skip
        ref = rows.astype(np.float32) if ref is None else ref
        print(f"   {dev.name:7s} {dev.precision}: {tps:,.0f} tok/s{diff}")
    # activations.store.batch_size is the forward batch (windows): the one that fills
    # the device is where tokens/s stops rising
    for bs in (16, 64, 256, 1024):
        if bs > n_windows:
            break
        with tempfile.TemporaryDirectory() as tmp:
            tps, _ = gpt2_shaped_cache(n_windows, Path(tmp), Device(dev_name, "bf16"), bs)
        mem = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0
        print(f"   bf16, activations.store.batch_size {bs}: {tps:,.0f} tok/s, peak "
              f"{mem:.1f} GiB")  # fmt: skip
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()


def sae_throughput(dev_name: str, steps: int) -> None:
    from stages.compute import Device
    from stages.sae import ArraySource, TopKConfig, train_saes

    d, d_sae, k, batch = 768, 24576, 32, 4096
    x = np.random.default_rng(0).standard_normal((batch * 8, d)).astype(np.float16)
    flops = 3 * 2 * 2 * d * d_sae  # encoder, decoder (dense on a GPU), forward + backward
    print(f"4. TopK {d} -> {d_sae} k{k}, batch {batch}, {steps} steps")
    for prec in ("fp32", "bf16"):
        dev = Device(dev_name, prec)
        times = []
        for n in (3, steps):  # a warm-up run, then the measured one
            cfg = TopKConfig(d_sae=d_sae, k=k, batch_size=batch, n_training_tokens=batch * n,
                             lr=1e-3, seed=0)  # fmt: skip
            _sync()
            t0 = time.perf_counter()
            train_saes(ArraySource(x), [cfg], progress=False, n_norm_rows=batch, device=dev)
            _sync()
            times.append(time.perf_counter() - t0)
        tps = batch * steps / times[-1]
        print(f"   {prec}: {tps:,.0f} tok/s, {tps * flops / 1e12:.2f} TFLOP/s")


def alignment(dev_name: str, n_windows: int) -> None:
    from benchmarks.alignment_pair import random_saes
    from benchmarks.gpt2_estimate import gpt2_shaped_cache
    from stages.activations import ActivationStore
    from stages.alignment import AlignConfig, align_pair
    from stages.compute import Device

    with tempfile.TemporaryDirectory() as tmp:
        gpt2_shaped_cache(n_windows, Path(tmp), Device("cpu"), batch_size=32)
        store = ActivationStore(Path(tmp) / "store")
        hooks = tuple((h, h) for h in store.hooks[-2:])
        saes_a = {h: s for h, s in random_saes(store, 4096, seed=1).items() if (h, h) in hooks}
        saes_b = {h: s for h, s in random_saes(store, 4096, seed=2).items() if (h, h) in hooks}
        cfg = AlignConfig(hook_pairs=hooks, max_tokens=store.n_rows, n_permutations=10)
        print(f"5. alignment, {store.n_rows:,} tokens, random TopK 768 -> 4096 on {len(hooks)} "
              "hooks (a store aligned with itself)")  # fmt: skip
        out = []
        for dev in (Device("cpu"), Device(dev_name)):
            _sync()
            r = align_pair(store, store, saes_a, saes_b, cfg, progress=False, device=dev)
            out.append(r)
            print(f"   {dev.name:7s}: " + ", ".join(f"{k} {v:.1f} s" for k, v in r.timings.items()))
        ref, got = out
        worst = max(abs(ref.scores[k] - got.scores[k]) for k in ref.scores
                    if np.isfinite(ref.scores[k]))  # fmt: skip
        same = all(np.array_equal(p.hungarian.b_index, q.hungarian.b_index)
                   for p, q in zip(ref.pairs, got.pairs, strict=True))  # fmt: skip
        print(f"   {dev_name} vs cpu: max |score difference| {worst:.2e}; Hungarian matches "
              f"{'identical' if same else 'DIFFER'}")  # fmt: skip


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--windows", type=int, default=256)
    ap.add_argument("--sae-steps", type=int, default=50)
    a = ap.parse_args()
    if not torch.cuda.is_available() and a.device != "cpu":
        print(f"no CUDA device (torch {torch.__version__}, CUDA {torch.version.cuda}): "
              "nothing to check here; run this on a GPU machine")  # fmt: skip
        return
    from stages.compute import resolve_device

    dev = str(resolve_device(a.device, "--device"))
    name = torch.cuda.get_device_name(dev) if dev != "cpu" else "CPU (a dry run of the script)"
    print(f"# {name}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    sae_quality(dev)
    sae_eval_agreement(dev)
    caching(dev, a.windows)
    sae_throughput(dev, a.sae_steps)
    alignment(dev, a.windows)


if __name__ == "__main__":
    main()
