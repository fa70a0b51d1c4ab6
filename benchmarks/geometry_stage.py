"""Time of the geometry stage's analysis per model, part by part (no Prefect, no MLflow).

    python benchmarks/geometry_stage.py [--root .] [--models toy-a toy-b] [--out DIR]

Runs `stages.geometry.run.model_geometry` on a finished pipeline's data (`<root>/data/`:
corpus, models, activations, saes) with the params file's `geometry` section, and prints
the seconds of each part (reading rows, each space's tests, each SAE's clusters) with the
machine's context. Writes the outputs under --out when given (never into <root>/data).

Measured 2026-12-04 on the 2-core shared machine, the default run (4-layer d_model 64
toy models, 262 144 rows, n_null 200, 4 TopK SAEs clustered): 17-21 s per model with the
machine otherwise lightly loaded, of which ~2/3 is the four SAEs' clusters (encoding the
held-out rows and 20 random-direction draws of k-means + agglomerative), ~0.5 s per
space for the vector tests; ~50 s per model while two end-to-end test suites ran beside.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=".")
    ap.add_argument("--models", nargs="*", default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    from stages.activations import ActivationStore
    from stages.config import load_params
    from stages.geometry.run import config_from_params, model_geometry, write_geometry

    root = Path(args.root)
    params = load_params(root / "params.yaml")
    cfg = config_from_params(params.geometry)
    models = args.models or list(params.models)
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch "
          f"{torch.__version__}, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    for m in models:
        t0 = time.perf_counter()
        r = model_geometry(ActivationStore(root / "data/activations" / m), root / "data/models" / m,
                           root / "data/corpus", root / "data/saes" / m, cfg)  # fmt: skip
        wall = time.perf_counter() - t0
        parts = ", ".join(f"{k} {v:.2f}" for k, v in r.summary["seconds"].items() if k != "total")
        print(f"{m}: {wall:.1f} s ({parts})")
        if args.out:
            write_geometry(r, Path(args.out) / m)


if __name__ == "__main__":
    main()
