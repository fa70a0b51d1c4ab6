"""Seconds the seeds' steering programme adds per concept (multi-layer steering, vector
stability, similarity vs effect), beside the random-direction controls of one hook that
the steering stage already runs (`controls.controlled_effects`, the reference cost).

    .venv/bin/python benchmarks/steering_programme.py            # both profiles below
    .venv/bin/python benchmarks/steering_programme.py --profile default --model data/models/toy-a

Profiles: `tiny` (tests/backbone's TINY params: 2 layers, d_model 32, vocab 400, 16 pairs,
8 eval prompts, 5 multipliers, one steering hook: multi-layer steering is skipped there)
and `default` (params.yaml's toy model shape: 4 layers, d_model 64, vocab 1024, rotary,
64 pairs, 32 eval prompts, 11 multipliers, steering hooks blocks.1 and blocks.2, a TopK
SAE of 1024 latents, k 16). Without `--model` the weights are random (the cost of a
forward does not depend on them); the tokenizer is trained on generated stories.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

PROFILES = {
    "tiny": {"arch": dict(n_layers=2, d_model=32, n_heads=2, d_head=16, d_mlp=64, n_ctx=32),
             "vocab": 400, "n_train": 16, "n_heldout": 8, "mults": [-4, -2, 0, 2, 4],
             "hooks": ["blocks.0.hook_resid_post"], "d_sae": 128, "k": 4,
             "sets": ["past_vs_present"]},
    "default": {"arch": dict(n_layers=4, d_model=64, n_heads=4, d_head=16, d_mlp=256,
                             n_ctx=128, positional_embedding_type="rotary"),
                "vocab": 1024, "n_train": 64, "n_heldout": 32,
                "mults": [-8, -6, -4, -2, -1, 0, 1, 2, 4, 6, 8],
                "hooks": ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"],
                "d_sae": 1024, "k": 16,
                "sets": ["emotion_polarity", "mammal_vs_bird", "past_vs_present"]},
}  # fmt: skip


def build_model(p: dict, model_dir: str | None):
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from stages.corpus import generate_story
    from stages.models import load_model, train_tokenizer

    if model_dir:
        return load_model(Path(model_dir))
    stories = [generate_story(7, i)[0] for i in range(400)]
    tok = train_tokenizer(stories, p["vocab"], Path(tempfile.mkdtemp()))
    cfg = HookedTransformerConfig(**p["arch"], d_vocab=len(tok), act_fn="gelu",
                                  normalization_type="LN", seed=0, default_prepend_bos=True,
                                  device="cpu")  # fmt: skip
    return HookedTransformer(cfg, tokenizer=tok).eval()


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def run(profile: str, model_dir: str | None) -> None:
    from stages.sae import build_sae
    from stages.steering import toy_sets
    from stages.steering.attribution import attribution_vs_ablation
    from stages.steering.controls import controlled_effects
    from stages.steering.multilayer import multilayer_steering
    from stages.steering.similarity import similarity_vs_effect
    from stages.steering.stability import vector_stability
    from stages.steering.vectors import compute_vectors

    p = PROFILES[profile]
    model = build_model(p, model_dir)
    sets = toy_sets(0, p["n_train"], p["n_heldout"], p["sets"])
    sae = build_sae({"architecture": "topk", "d_in": model.cfg.d_model, "d_sae": p["d_sae"],
                     "k": p["k"], "n_training_tokens": 4096, "batch_size": 64,
                     "seed": 0}).eval()  # fmt: skip
    hooks, mults = p["hooks"], [float(m) for m in p["mults"]]
    print(f"## profile {profile}: d_model {model.cfg.d_model}, {model.cfg.n_layers} layers, "
          f"vocab {model.cfg.d_vocab}, hooks {hooks}, {len(mults)} multipliers")  # fmt: skip
    tot = {"controls": 0.0, "multilayer": 0.0, "stability": 0.0, "similarity": 0.0}
    for name, s in sets.items():
        vec = compute_vectors(model, s, hooks)
        best = hooks[-1]
        c, t_c = timed(controlled_effects, model, s, best, {"raw": vec[best]}, mults, None,
                       n_random=32)  # fmt: skip
        _, t_m = timed(multilayer_steering, model, s, vec, best, mults, n_random=32)
        _, t_s = timed(vector_stability, model, s, vec, best, mults,
                       c["null_equal_norm_slopes"], n_splits=20, n_effect_splits=1)  # fmt: skip
        abl = attribution_vs_ablation(model, s, hooks[0], sae, 16, 16)
        _, t_v = timed(similarity_vs_effect, model, s, hooks[0], sae, vec[hooks[0]], abl)
        for k, t in zip(tot, (t_c, t_m, t_s, t_v), strict=True):
            tot[k] += t
        print(f"  {name}: {len(s.eval_prompts)} eval prompts, {len(s.train_pairs)} pairs: "
              f"controls at one hook {t_c:.2f} s | multilayer {t_m:.2f} s | stability "
              f"{t_s:.2f} s | similarity {t_v:.2f} s")  # fmt: skip
    added = tot["multilayer"] + tot["stability"] + tot["similarity"]
    print(f"  all {len(sets)} concepts: controls at one hook {tot['controls']:.2f} s; added "
          f"{added:.2f} s (multilayer {tot['multilayer']:.2f}, stability "
          f"{tot['stability']:.2f}, similarity {tot['similarity']:.2f}) per model")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", choices=[*PROFILES, "both"], default="both")
    ap.add_argument("--model", default=None, help="a model folder (else random weights)")
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.1f}, torch {torch.__version__}, threads {a.threads}")  # fmt: skip
    for prof in PROFILES if a.profile == "both" else [a.profile]:
        run(prof, a.model)


if __name__ == "__main__":
    main()
