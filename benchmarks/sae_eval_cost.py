"""What the SAE evaluation costs per SAE, and what the SAEBench-style ground truth and
Gurnee's follow-ups add, at the default run's shapes.

The default toy model's architecture (4 layers, d_model 64, vocab 1024, rotary; untrained
weights: the cost does not depend on them), 64 evaluation windows of 128 tokens, ~35 k
held-out rows of the model's own activations at blocks.0-3 with 44 synthetic concepts at the world's
prevalences (0.3-20 %), documents of ~64 rows, and d_sae 1024 SAEs (TopK k 16 and a ReLU
at L0 ≈ 120, the default run's densest). Each SAE is evaluated as `flows/saes.py` does,
(a) as before this change (`--repo /path/to/main`: that checkout's code), (b) "legacy":
this code with one random draw and no k-sparse probing, (c) in full; the per-hook baselines (dense probe, lexical lookup) are paid by the first SAE of
a hook only, and printed apart.

    python benchmarks/sae_eval_cost.py [--rows 35000] [--repeats 2]

Run it with OMP_NUM_THREADS=1 for the one-thread figure.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

# --repo PATH times another checkout's evaluation (e.g. main, before this change)
_repo = sys.argv[sys.argv.index("--repo") + 1] if "--repo" in sys.argv else None
sys.path.insert(0, _repo or str(Path(__file__).resolve().parents[1]))

from stages.sae import build_sae, evaluate_sae  # noqa: E402

try:
    from stages.sae.concepts import ConceptContext  # noqa: E402
except ImportError:  # a checkout from before the SAEBench-style ground truth
    ConceptContext = None


def toy_model():
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    cfg = HookedTransformerConfig(n_layers=4, d_model=64, n_heads=4, d_head=16, d_mlp=256,
                                  n_ctx=128, d_vocab=1024, act_fn="gelu",
                                  normalization_type="LN", positional_embedding_type="rotary",
                                  rotary_dim=16, seed=0, device="cpu")  # fmt: skip
    return HookedTransformer(cfg).eval()


def sae(kind: str, rows: torch.Tensor):
    d = rows.shape[1]
    cfg = {"architecture": kind, "d_in": d, "d_sae": 16 * d, "n_training_tokens": 4096}
    if kind == "topk":
        cfg["k"] = 16
    s = build_sae(cfg).eval()
    if kind == "relu":  # shift the bias to an L0 of about 120 of 1024
        with torch.no_grad():
            pre = rows[:2048] @ s.W_enc
            s.b_enc.copy_(-torch.quantile(pre, 1 - 120 / (16 * d), dim=0))
    return s


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=35_000)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--repo", default=None, help="checkout whose stages/ to time")
    a = p.parse_args()
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = toy_model()
    n_win = -(-a.rows // 127)
    toks = torch.from_numpy(rng.integers(1, 1024, (n_win, 128)))
    toks[:, 0] = 0
    hooks = [f"blocks.{i}.hook_resid_post" for i in (3, 0, 1, 2)]
    with torch.no_grad():
        _, cache = model.run_with_cache(toks, names_filter=hooks)
    prevalence = np.geomspace(0.003, 0.2, 44)
    labels = rng.random((a.rows, 44)) < prevalence
    names = [f"c{i}" for i in range(44)]
    groups = np.arange(a.rows) // 64
    token_ids = toks[:, 1:].reshape(-1)[: a.rows].numpy()
    counts = np.bincount(token_ids, minlength=1024)
    hierarchy = {"c20": ["c0", "c1", "c2"], "c30": ["c3", "c4", "c5", "c6"]}
    print(f"threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
          f", rows {a.rows}, windows 64 x 128, d_sae 1024, 44 concepts")  # fmt: skip
    for hook in hooks:
        rows = cache[hook][:, 1:].reshape(-1, 64)[: a.rows].float()
        # x carries the labels a little, so the probes have something to find
        rows = (
            rows + torch.from_numpy(labels[:, :32].astype(np.float32)) @ torch.randn(32, 64) * 0.3
        )
        # the default sweep: 7 SAEs on blocks.3 (densest: L0 ~120), one TopK on the others
        for kind in ("topk", "relu") if hook.startswith("blocks.3") else ("topk",):
            s = sae(kind, rows)
            for mode in ("legacy", "full") if ConceptContext else ("before",):
                ctx = None
                best = []
                for _ in range(a.repeats):
                    if mode == "full":
                        ctx = ConceptContext(groups, token_ids, hierarchy, {})
                    kw = {"random_draws": 16, "context": ctx, "token_counts": counts}
                    kw = {"before": {}, "legacy": {"random_draws": 1}}.get(mode, kw)
                    t = time.perf_counter()
                    ev = evaluate_sae(s, rows, model=model, hook_name=hook, tokens=toks[:64],
                                      labels=labels, concept_names=names, **kw)  # fmt: skip
                    first = time.perf_counter() - t
                    if mode == "full":  # a second SAE of the hook reuses the baselines
                        t = time.perf_counter()
                        evaluate_sae(s, rows, model=model, hook_name=hook, tokens=toks[:64],
                                     labels=labels, concept_names=names, **kw)  # fmt: skip
                        best.append((first, time.perf_counter() - t))
                    else:
                        best.append((first, first))
                first, later = min(b[0] for b in best), min(b[1] for b in best)
                l0 = ev.metrics["l0"]
                print(f"{hook} {kind:5s} L0 {l0:6.1f} {mode:6s}: first SAE of the hook "
                      f"{first:5.2f} s, each further SAE {later:5.2f} s")  # fmt: skip


if __name__ == "__main__":
    main()
