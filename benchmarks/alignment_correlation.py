"""Throughput, precision and memory of the streaming latent-latent correlation pass.

Measures, on this machine:
1. the GEMM rate (float32 and float64) for the product the pass performs, AᵀB with
   A [n_chunk, m_A], B [n_chunk, m_B];
2. the correlation pass (`CorrelationAccumulator.update`) in GFLOP/s of its matmuls
   (2·n·m_A·m_B per chunk) and as a fraction of that GEMM rate (target ≥ 50 %);
3. the precision of float32 chunk products against float64, on SAE-like sparse data
   with a few dense high-mean latents — the evidence for the float32 default;
4. peak resident memory of a full pass (a fresh subprocess per configuration) as the
   number of tokens grows, and the accumulator's own bytes as the width grows:
   O(m_A·m_B), independent of the number of tokens.

Usage: python benchmarks/alignment_correlation.py [--m 2048] [--chunk 8192] [--chunks 6]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from stages.alignment import CorrelationAccumulator


def machine_context() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"machine: {model}; os.cpu_count() = {os.cpu_count()}; "
        f"torch {torch.__version__} threads = {torch.get_num_threads()} "
        f"(interop {torch.get_num_interop_threads()}); numpy {np.__version__}; "
        f"python {platform.python_version()}"
    )


def gemm_rate(n: int, m_a: int, m_b: int, dtype: torch.dtype, repeats: int = 5) -> float:
    """Median GFLOP/s of torch.mm(A.T, B), the exact product the pass performs."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, m_a, generator=g, dtype=dtype)
    b = torch.randn(n, m_b, generator=g, dtype=dtype)
    out = torch.empty(m_a, m_b, dtype=dtype)
    torch.mm(a.T, b, out=out)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a.T, b, out=out)
        times.append(time.perf_counter() - t0)
    return 2.0 * n * m_a * m_b / statistics.median(times) / 1e9


def sae_like_chunk(g: torch.Generator, n: int, m: int, density: float = 0.05) -> torch.Tensor:
    """ReLU latents firing on ~`density` of tokens, latent-specific scales, plus 1 % of
    latents dense with a large mean (the case where cancellation would bite)."""
    threshold = float(torch.distributions.Normal(0, 1).icdf(torch.tensor(1 - density)))
    scale = torch.linspace(0.5, 3.0, m)
    x = torch.relu(torch.randn(n, m, generator=g) - threshold) * scale
    n_dense = max(1, m // 100)
    x[:, :n_dense] += 20.0 + torch.rand(n, n_dense, generator=g)
    return x


def paired_chunk(g: torch.Generator, n: int, m_a: int, m_b: int, perm: torch.Tensor):
    """A and B share half of B's latents (permuted, noisy copies of A's): realistic mix of
    strong, weak and zero correlations."""
    a = sae_like_chunk(g, n, m_a)
    b = sae_like_chunk(g, n, m_b)
    half = m_b // 2
    b[:, :half] = 0.7 * a[:, perm[:half]] + 0.3 * b[:, :half]
    return a, b


def throughput(m: int, chunk: int, n_chunks: int, dtype: torch.dtype) -> dict[str, float]:
    """The pass's matmul GFLOP/s, timing only `update` (data generation excluded).

    Other work on this shared machine changes the GEMM rate from second to minute, so
    each timed chunk is followed by a bare GEMM of the same shape on the same inputs;
    the ratio per chunk is what the pass achieves of what the machine gave just then.
    """
    g = torch.Generator().manual_seed(1)
    perm = torch.randperm(m, generator=g)
    acc = CorrelationAccumulator(m, m, matmul_dtype=dtype)
    a, b = paired_chunk(g, chunk, m, m, perm)
    acc.update(a, b)  # warm-up (allocates the reused buffers)
    out = torch.empty(m, m, dtype=dtype)
    flops = 2.0 * chunk * m * m
    pass_times, gemm_times = [], []
    for _ in range(n_chunks):
        a, b = paired_chunk(g, chunk, m, m, perm)
        t0 = time.perf_counter()
        acc.update(a, b)
        pass_times.append(time.perf_counter() - t0)
        a_, b_ = a.to(dtype), b.to(dtype)
        t0 = time.perf_counter()
        torch.mm(a_.T, b_, out=out)
        gemm_times.append(time.perf_counter() - t0)
    ratios = [gt / pt for pt, gt in zip(pass_times, gemm_times, strict=True)]
    return {
        "pass_gflops": flops / statistics.median(pass_times) / 1e9,
        "gemm_gflops": flops / statistics.median(gemm_times) / 1e9,
        "fraction": statistics.median(ratios),
        "s_per_chunk": statistics.median(pass_times),
    }


def precision(m: int, chunk: int, n_chunks: int) -> dict[str, float]:
    """float32-product correlations against float64-product correlations, same data."""
    g = torch.Generator().manual_seed(2)
    perm = torch.randperm(m, generator=g)
    acc32 = CorrelationAccumulator(m, m, matmul_dtype=torch.float32)
    acc64 = CorrelationAccumulator(m, m, matmul_dtype=torch.float64)
    for _ in range(n_chunks):
        a, b = paired_chunk(g, chunk, m, m, perm)
        acc32.update(a, b)
        acc64.update(a, b)
    r32, r64 = acc32.correlation(), acc64.correlation()
    err = np.abs(r32 - r64)
    best32, best64 = r32.max(1), r64.max(1)
    return {
        "tokens": acc32.n_tokens,
        "max_abs_err": float(err.max()),
        "mean_abs_err": float(err.mean()),
        "max_abs_err_of_best_match": float(np.abs(best32 - best64).max()),
        "argmax_agreement": float(np.mean(r32.argmax(1) == r64.argmax(1))),
        "sampling_sd_of_r": float(1.0 / np.sqrt(acc32.n_tokens)),
    }


def child_memory(m: int, chunk: int, n_tokens: int) -> None:
    """Run one full pass (generating chunks on the fly) and print the peak RSS."""
    g = torch.Generator().manual_seed(3)
    perm = torch.randperm(m, generator=g)
    acc = CorrelationAccumulator(m, m)
    done = 0
    while done < n_tokens:
        n = min(chunk, n_tokens - done)
        a, b = paired_chunk(g, n, m, m, perm)
        acc.update(a, b)
        done += n
        del a, b
    acc.correlation()
    # VmHWM, not getrusage's ru_maxrss: the latter survives fork+exec and would report
    # the parent's peak.
    status = Path("/proc/self/status").read_text()
    peak_kib = int(next(ln for ln in status.splitlines() if ln.startswith("VmHWM")).split()[1])
    print(json.dumps({"peak_rss_mib": peak_kib / 1024, "accumulator_mib": acc.nbytes / 2**20}))


def run_child(m: int, chunk: int, n_tokens: int) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--child-memory", str(m), str(chunk), str(n_tokens)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=2048, help="latents per SAE (m_A = m_B)")
    parser.add_argument("--chunk", type=int, default=8192, help="tokens per chunk")
    parser.add_argument("--chunks", type=int, default=6, help="timed chunks per dtype")
    parser.add_argument(
        "--child-memory",
        nargs=3,
        type=int,
        metavar=("M", "CHUNK", "TOKENS"),
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.child_memory:
        child_memory(*args.child_memory)
        return

    m, chunk = args.m, args.chunk
    print(machine_context())
    print(
        f"\ncorrelation pass: m_A = m_B = {m}, chunk = {chunk} tokens, "
        f"{args.chunks} timed chunks per dtype\n"
    )
    print(
        f"{'dtype':>8} {'GEMM GFLOP/s':>13} {'pass GFLOP/s':>13} {'% of GEMM':>10} "
        f"{'s/chunk':>8} {'tokens/s':>9}"
    )
    for dtype in (torch.float32, torch.float64):
        standalone = gemm_rate(chunk, m, m, dtype)
        r = throughput(m, chunk, args.chunks, dtype)
        name = str(dtype).removeprefix("torch.")
        print(
            f"{name:>8} {r['gemm_gflops']:13.1f} {r['pass_gflops']:13.1f} "
            f"{100 * r['fraction']:9.0f}% {r['s_per_chunk']:8.3f} "
            f"{chunk / r['s_per_chunk']:9.0f}   (standalone GEMM just before: {standalone:.1f})"
        )

    p = precision(min(m, 1024), chunk, 4)
    print(
        f"\nprecision, float32 products vs float64 (m = {min(m, 1024)}, {p['tokens']} tokens, "
        f"SAE-like sparse latents + dense mean-20 latents):"
    )
    print(
        f"  max |Δr| = {p['max_abs_err']:.2e}, mean |Δr| = {p['mean_abs_err']:.2e}, "
        f"max |Δ best-match r| = {p['max_abs_err_of_best_match']:.2e}, "
        f"argmax agreement = {100 * p['argmax_agreement']:.2f} %"
    )
    print(
        f"  for scale: the sampling s.d. of r at r = 0 over these tokens is "
        f"{p['sampling_sd_of_r']:.1e}"
    )

    print("\npeak memory of a full pass (fresh process each, chunks generated on the fly):")
    print(f"{'m':>6} {'tokens':>9} {'peak RSS MiB':>13} {'accumulator MiB':>16}")
    for n_tokens in (2 * chunk, 8 * chunk, 24 * chunk):
        r = run_child(m, chunk, n_tokens)
        print(f"{m:6d} {n_tokens:9d} {r['peak_rss_mib']:13.0f} {r['accumulator_mib']:16.1f}")
    for width in (512, 1024, 4096):
        r = run_child(width, chunk, 2 * chunk)
        print(f"{width:6d} {2 * chunk:9d} {r['peak_rss_mib']:13.0f} {r['accumulator_mib']:16.1f}")
    print(
        "accumulator = float64 co-moment + float32 product scratch (12 B per latent pair)\n"
        "+ reused row blocks (block_rows x (m_A + m_B + max(m_A, m_B)) x 4 B) + vectors;\n"
        "the rest is the interpreter, torch, and the benchmark's own generated chunks."
    )


if __name__ == "__main__":
    main()
