"""Synthetic feature recovery (Sharkey et al. 2022): MMCS against dictionary size for
every architecture.

Activations are sums of sparse ground-truth features in superposition
(`stages.sae.synthetic.SyntheticFeatures`: 64 features in 32 dimensions, ≈4 active per
sample, magnitudes U(0, 1]); each architecture is trained at several dictionary sizes and
we report MMCS (mean over true features of the best cosine with a decoder row), the
held-out FVU and L0.

    python benchmarks/sae_synthetic_recovery.py [--tokens 400000] [--correlation 0.3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.sae import ArraySource, parse_sae_config, train_saes  # noqa: E402
from stages.sae.evaluate import evaluate_reconstruction  # noqa: E402
from stages.sae.synthetic import SyntheticFeatures, mmcs  # noqa: E402

# sparsity settings aiming at L0 ≈ the true mean number of active features (4)
SPARSITY = {
    "topk": {"k": 4},
    "batchtopk": {"k": 4},
    "relu": {"l1_coefficient": 0.5, "lr": 3e-3},
    "jumprelu": {"l0_coefficient": 0.5, "threshold_init": 0.1, "bandwidth": 0.1},
    "gated": {"l1_coefficient": 0.3},
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--d", type=int, default=32)
    p.add_argument("--n-features", type=int, default=64)
    p.add_argument("--mean-active", type=float, default=4.0)
    p.add_argument("--correlation", type=float, default=0.0)
    p.add_argument("--tokens", type=int, default=400_000)
    p.add_argument("--sizes", default="0.5,1,2,4", help="d_sae as multiples of n_features")
    p.add_argument("--archs", default=",".join(SPARSITY))
    args = p.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))

    gen = SyntheticFeatures(args.d, args.n_features, mean_active=args.mean_active,
                            correlation=args.correlation, seed=0)  # fmt: skip
    train = ArraySource(gen.source(args.tokens, 1024).materialize(), 1024, name="synthetic")
    held = ArraySource(
        SyntheticFeatures(args.d, args.n_features, mean_active=args.mean_active,
                          correlation=args.correlation, seed=0)
        .source(args.tokens + 32768, 1024).read(args.tokens, args.tokens + 32768),
        1024, name="synthetic-held-out",
    )  # fmt: skip
    print(
        f"machine: {os.cpu_count()} cores, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(
        f"data: {args.n_features} true features in d={args.d}, mean active "
        f"{args.mean_active}, correlation {args.correlation}, {args.tokens} training tokens"
    )
    sizes = [float(s) for s in args.sizes.split(",")]
    print(
        f"{'arch':10s} "
        + " ".join(f"{'d_sae=' + str(int(s * args.n_features)):>24s}" for s in sizes)
    )
    print(f"{'':10s} " + " ".join(f"{'MMCS / FVU / L0':>24s}" for _ in sizes))
    for arch in args.archs.split(","):
        cells = []
        t = time.perf_counter()
        for s in sizes:
            d_sae = int(s * args.n_features)
            extra = dict(SPARSITY[arch])
            if "k" in extra:
                extra["k"] = min(extra["k"], d_sae)
            cfg = parse_sae_config({
                "architecture": arch, "d_sae": d_sae, "n_training_tokens": args.tokens,
                "batch_size": 512, "lr": 1e-3, "dead_feature_window": 20 * 512, "seed": 0,
                **extra,
            })  # fmt: skip
            (r,) = train_saes(train, [cfg], progress=False)
            m, _ = evaluate_reconstruction(r.sae, held)
            score = mmcs(r.sae.W_dec, gen.features)
            cells.append(f"{score:.3f} / {m['fvu']:.3f} / {m['l0']:4.1f}")
        print(
            f"{arch:10s} "
            + " ".join(f"{c:>24s}" for c in cells)
            + f"   ({time.perf_counter() - t:.0f} s)"
        )


if __name__ == "__main__":
    main()
