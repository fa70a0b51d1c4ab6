"""Time of one-to-one (Hungarian) feature matching as the number of latents grows.

`hungarian_matches` runs scipy's `linear_sum_assignment` (a shortest-augmenting-path
solver, O(m³) worst case) on the m_A × m_B correlation matrix. Its running time
depends on the matrix, not only its size, so three kinds are timed:

- `noise`: i.i.d. correlations around 0 (two unrelated SAEs: no structure to exploit);
- `shared`: half the latents have a partner (r between 0.3 and 0.95, permuted), the
  rest noise — what two seeds of one model look like;
- `dead`: as `shared`, with 20 % of each side's latents dead (rows/columns of exact 0,
  as `CorrelationAccumulator` reports them): many ties.

For each, the median of `--repeats` runs, and the growth exponent between successive
sizes (time ∝ m^k). The issue's target: 4096 × 4096 within a minute.

Usage: python benchmarks/alignment_hungarian.py [--sizes 512 1024 2048 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import scipy
import torch

from stages.alignment import hungarian_matches, max_matches


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
        f"machine: {model}; os.cpu_count() = {os.cpu_count()}; torch threads = "
        f"{torch.get_num_threads()} (linear_sum_assignment is single-threaded); "
        f"scipy {scipy.__version__}; numpy {np.__version__}; python {platform.python_version()}"
    )


def correlation_like(kind: str, m: int, rng: np.random.Generator) -> np.ndarray:
    """A synthetic m × m correlation matrix of the given kind (see the module docstring)."""
    scores = rng.normal(0.0, 0.03, (m, m))
    if kind == "noise":
        return scores
    half = m // 2
    rows = rng.permutation(m)[:half]
    cols = rng.permutation(m)[:half]
    scores[rows, cols] = rng.uniform(0.3, 0.95, half)
    if kind == "dead":
        scores[rng.permutation(m)[: m // 5], :] = 0.0
        scores[:, rng.permutation(m)[: m // 5]] = 0.0
    return scores


def time_it(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    print(machine_context())
    print(f"\nmedian of {args.repeats} runs; k = growth exponent vs the previous size\n")
    print(
        f"{'kind':>7} {'m':>6} {'hungarian s':>12} {'k':>5} {'max-match s':>12} "
        f"{'mean matched r':>15}"
    )
    for kind in ("noise", "shared", "dead"):
        previous: tuple[int, float] | None = None
        for m in args.sizes:
            scores = correlation_like(kind, m, rng)
            t = time_it(lambda s=scores: hungarian_matches(s), args.repeats)
            t_max = time_it(lambda s=scores: max_matches(s), args.repeats)
            mean_r = float(hungarian_matches(scores).score.mean())
            k = (
                ""
                if previous is None
                else f"{math.log(t / previous[1]) / math.log(m / previous[0]):.1f}"
            )
            print(f"{kind:>7} {m:6d} {t:12.3f} {k:>5} {t_max:12.4f} {mean_r:15.3f}")
            previous = (m, t)
    largest = max(args.sizes)
    print(f"\ntarget: {largest} x {largest} within 60 s (see the rows above).")


if __name__ == "__main__":
    main()
