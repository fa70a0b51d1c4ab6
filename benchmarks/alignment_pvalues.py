"""What the align stage's sequential Holm family costs (stages/alignment/pvalues.py).

Per permutation, at `align.config.n_samples` rows (2048): each similarity measure on a
toy model's width (d 64), and the subspace CKA on SAE latents (700 matched latents of a
TopK k 16 code: from sparse products, as the stage runs it, against its n² Gram gather in
float32 and in float64, as it ran before). Then the default family (4 hook pairs × 5 measures + 4 SAE pairs × 2
subspace CKAs = 28 tests), every effect strong, at fixed `n_permutations` (100) and with
the caps `pvalues.holm_caps` plans for `family_alpha` 0.01 and 0.05: draws, seconds
(per-permutation cost × draws) and the Holm floor each reaches. The data are synthetic
(correlated Gaussians; sparse non-negative codes); only the timings are looked at.

Usage: python benchmarks/alignment_pvalues.py [--n 2048]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from threadpoolctl import threadpool_limits

from stages.alignment.pvalues import holm, holm_caps, p_floor
from stages.alignment.similarity import SIMILARITY, _permuted, _permuted_vdot
from stages.alignment.stream import CAP_ORDER


def per_permutation_ms(statistic, n: int, draws: int, rng: np.random.Generator) -> float:
    perms = [rng.permutation(n) for _ in range(draws)]
    statistic(perms[0])  # warm-up
    t = time.perf_counter()
    for p in perms:
        statistic(p)
    return (time.perf_counter() - t) / draws * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--draws", type=int, default=60)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    n = args.n
    x = rng.standard_normal((n, 64))
    y = x @ rng.standard_normal((64, 64)) + rng.standard_normal((n, 64))
    codes = np.zeros((2, n, 700))
    for c in codes:
        for i in range(n):
            c[i, rng.choice(700, 16, replace=False)] = rng.exponential(1.0, 16)
    za, zb = codes[0], 0.5 * codes[0] + 0.5 * codes[1]
    ms: dict[str, float] = {}
    with threadpool_limits(1, user_api="blas"):  # as the stage runs them
        for metric in CAP_ORDER:
            a, b, name = (za, zb, "linear_cka") if metric == "subspace_cka" else (x, y, metric)
            kw = {o: {"k": 10, "variance_kept": 0.99}[o] for o in SIMILARITY[name].options}
            ms[metric] = per_permutation_ms(
                SIMILARITY[name].prepare(a, b, **kw), n, args.draws, rng
            )
        kc, lc = za - za.mean(0), zb - zb.mean(0)
        k64, l64 = kc @ kc.T, lc @ lc.T
        ms64 = per_permutation_ms(lambda p: np.vdot(k64, _permuted(l64, p)), n, args.draws, rng)
        ms32 = per_permutation_ms(_permuted_vdot(k64, l64), n, args.draws, rng)
    print(f"ms per permutation at n = {n} (1 BLAS thread):")
    for metric in CAP_ORDER:
        print(f"  {metric:>14}: {ms[metric]:7.2f}")
    print(f"  subspace_cka float32 Gram gather (before the sparse form): {ms32:.2f}")
    print(f"  subspace_cka float64 Gram gather (before that): {ms64:.2f}")

    # the default family: CAP_ORDER's measures over 4 hook pairs; subspace: 4 SAE pairs × 2
    count = {m: (8 if m == "subspace_cka" else 4) for m in CAP_ORDER}
    order = [m for m in CAP_ORDER for _ in range(count[m])]
    m = len(order)
    print(f"\nthe default family, {m} tests, every effect strong (each runs to its cap):")
    rows = [("fixed 100", [100] * m)]
    for alpha in (0.05, 0.01):
        rows.append((f"family_alpha {alpha}", holm_caps(m, alpha, at_least=100)))
    for label, caps in rows:
        seconds = sum(ms[t] * c for t, c in zip(order, caps, strict=True)) / 1e3
        floor = float(holm([p_floor(c) for c in caps]).max())
        print(f"  {label:>18}: {sum(caps):6d} draws, {seconds:6.1f} s, Holm floor {floor:.4f}")
    before = sum((ms64 if t in ("subspace_cka", "rsa") else ms[t]) * 100 for t in order) / 1e3
    print(
        f"  {'fixed 100, float64':>18}: {100 * m:6d} draws, {before:6.1f} s (the gathers as before)"
    )


if __name__ == "__main__":
    main()
