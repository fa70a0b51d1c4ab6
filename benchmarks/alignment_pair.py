"""Wall time of one model pair's alignment (`align_pair`) on the cached stores, and its
headline numbers.

Runs `align_pair` on `data/activations/<A>` vs `<B>` with the SAEs of
`data/saes/<A>` / `<B>` (ground truth from their metrics.json), prints the time of each
phase (token alignment, the streaming pass, similarity measures, matching) and the
scores a researcher looks at first. `--random-saes W` replaces the trained SAEs by
random TopK SAEs of width W on every compared hook (to time the pass before the SAE
stage has run; the scores are then meaningless). `--out DIR` also writes the outputs
(and the figures as PNG) as the align stage would.

Usage: python benchmarks/alignment_pair.py [--a toy-a] [--b toy-b] [--max-tokens 200000]
       [--n-null 1] [--sae-names topk-1024-k16 ...] [--random-saes 1024] [--out DIR]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

from stages.activations import ActivationStore
from stages.alignment import AlignConfig, align_pair, figures, write_alignment
from stages.sae import build_sae
from stages.sae.io import load_model_saes


def machine_context() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "unknown CPU")  # fmt: skip
    load = os.getloadavg()[0]
    return (f"machine: {cpu}; os.cpu_count() = {os.cpu_count()}; load average {load:.1f} "
            f"(shared machine); torch {torch.__version__}; python {platform.python_version()}")  # fmt: skip


def random_saes(store: ActivationStore, width: int, seed: int) -> dict:
    return {
        h: {
            f"random-topk-{width}": build_sae(
                {
                    "architecture": "topk",
                    "d_in": store.d(h),
                    "d_sae": width,
                    "k": 16,
                    "n_training_tokens": 4096,
                    "seed": seed,
                }
            ).eval()
        }  # fmt: skip
        for h in store.hooks
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--a", default="toy-a")
    ap.add_argument("--b", default="toy-b")
    ap.add_argument("--data", type=Path, default=Path("data"))
    ap.add_argument("--max-tokens", type=int, default=AlignConfig.max_tokens)
    ap.add_argument("--n-null", type=int, default=AlignConfig.n_null)
    ap.add_argument("--n-permutations", type=int, default=AlignConfig.n_permutations)
    ap.add_argument("--sae-names", nargs="*", default=None)
    ap.add_argument("--random-saes", type=int, default=None)
    ap.add_argument("--saes-b", type=Path, default=None, help="B's SAE root if not data/saes/<B>")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    print(machine_context())
    store_a = ActivationStore(args.data / "activations" / args.a)
    store_b = ActivationStore(args.data / "activations" / args.b)
    if args.random_saes:
        saes_a, saes_b = (
            random_saes(store_a, args.random_saes, 0),
            random_saes(store_b, args.random_saes, 1),
        )
        best_a = best_b = None
    else:
        saes_a, best_a = load_model_saes(args.data / "saes" / args.a)
        saes_b, best_b = load_model_saes(args.saes_b or args.data / "saes" / args.b)
    cfg = AlignConfig(
        max_tokens=args.max_tokens,
        n_null=args.n_null,
        n_permutations=args.n_permutations,
        sae_names=("all" if args.sae_names == ["all"] else tuple(args.sae_names))
        if args.sae_names
        else None,
    )
    print(f"config: {cfg}")
    t0 = time.perf_counter()
    result = align_pair(store_a, store_b, saes_a, saes_b, cfg,
                        best_latents_a=best_a, best_latents_b=best_b)  # fmt: skip
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\n{args.a} vs {args.b}: {result.n_tokens} tokens ({result.token_rule}), "
          f"{len(result.pairs)} SAE pairs, wall {wall:.1f} s, peak RSS {rss:.0f} MiB, "
          f"torch threads {torch.get_num_threads()}")  # fmt: skip
    print("phases: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.timings.items()))

    print("\nraw activations (same hook):")
    for name, tests in result.hook_pairs.items():
        print(f"  {name}: " + ", ".join(f"{m} {t.statistic:.3f} (p {t.p_value:.3f})"
                                          for m, t in tests.items()))  # fmt: skip
    for metric, g in result.grid.items():
        print(f"\n{metric}, rows {args.a} hooks, columns {args.b} hooks ({g.hooks_b}):")
        with np.printoptions(precision=3, suppress=True):
            for h, row in zip(g.hooks_a, g.values, strict=True):
                print(f"  {h:28s} {row}")
    keys = ["fraction_with_partner", "fraction_with_partner_ba", "fraction_with_partner_hungarian",
            "mean_matched_corr_hungarian", "null_mean_hungarian", "null_p95_hungarian",
            "fraction_above_null_hungarian", "mean_max_corr_ab", "mean_jaccard_hungarian",
            "mean_decoder_cosine_hungarian", "decoder_activation_agreement", "subspace_cka",
            "ground_truth_fraction_hungarian", "ground_truth_fraction_max",
            "self_match_identity_fraction", "self_match_mean_corr", "dead_a", "dead_b"]  # fmt: skip
    print("\nSAE pairs:")
    print(f"  {'pair':48s} " + " ".join(f"{k[:14]:>14s}" for k in keys))
    for p in result.pairs:
        print(f"  {p.key:48s} " + " ".join(f"{p.scores.get(k, float('nan')):14.3f}" for k in keys))
    if args.out:
        out = write_alignment(result, args.out)
        for name, fig in figures(result).items():
            fig.savefig(out.parent / f"{out.name}.{name}.png", dpi=90)
        print(f"\nwritten to {out} (figures beside it)")


if __name__ == "__main__":
    main()
