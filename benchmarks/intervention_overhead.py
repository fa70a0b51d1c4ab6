"""Feature interventions and controls vs a bare batched forward on the same rows.

    .venv/bin/python benchmarks/intervention_overhead.py [--model data/models/toy-a]
        [--sae data/saes/toy-a/blocks.2.hook_resid_post/topk-1024-k16]
        [--latents 32] [--directions 32] [--threads 1]

- Ablation (`attribution.ablation_effects`): every (latent, prompt) row with one SAE
  latent removed at its hook, error term kept, metric at each prompt's last token; against
  a bare `model(tokens)` over the same padded rows, same batch size. Target: ≤ 20 %.
- Attribution (`attribution.latent_attribution`): one forward + backward with the SAE
  spliced in, against one bare forward of the prompts (a backward costs about two
  forwards, so ≈ 3× is the floor).
- Random-direction null (`controls.last_token_grid`): every (direction, prompt,
  multiplier) row through the key-value-cache path, against a bare full forward of the
  same rows (what `metric_grid` costs per vector).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch

from stages.models import load_model
from stages.sae import load_sae
from stages.steering import toy_sets
from stages.steering.attribution import _batch, ablation_effects, latent_attribution
from stages.steering.controls import last_token_grid, random_directions
from stages.steering.evaluate import DEFAULT_MULTIPLIERS


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="data/models/toy-a")
    ap.add_argument("--sae", default="data/saes/toy-a/blocks.2.hook_resid_post/topk-1024-k16")
    ap.add_argument("--set", default="emotion_polarity")
    ap.add_argument("--latents", type=int, default=32)
    ap.add_argument("--directions", type=int, default=32)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = load_model(Path(a.model))
    sae = load_sae(Path(a.sae)).eval()
    hook = Path(a.sae).parent.name
    s = toy_sets(0, 64, 32, [a.set])[a.set]
    toks, lens, _, _ = _batch(model, s)
    n = len(toks)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__}, threads {a.threads}, load {os.getloadavg()[0]:.1f}; "
          f"model {a.model} (d_model {model.cfg.d_model}, {model.cfg.n_layers} layers), "
          f"SAE {a.sae}, {n} prompts of ≤ {toks.shape[1]} tokens")  # fmt: skip

    _, f = latent_attribution(model, s, hook, sae)
    active = torch.nonzero(f.abs().amax((0, 1)) > 0).flatten()[: a.latents].tolist()
    rows = len(active) * n

    @torch.no_grad()
    def bare(n_rows: int) -> None:
        for r0 in range(0, n_rows, a.batch):
            p = torch.arange(r0, min(r0 + a.batch, n_rows)) % n
            model(toks[p])

    t_abl = best_of(lambda: ablation_effects(model, s, hook, sae, active, f, batch_size=a.batch))
    t_bare = best_of(lambda: bare(rows + n))  # + the clean pass ablation_effects makes
    print(f"ablation   {len(active)} latents × {n} prompts: {t_abl:.3f} s, bare forward of the "
          f"same rows {t_bare:.3f} s, overhead {100 * (t_abl / t_bare - 1):+.1f} %")  # fmt: skip
    t_att = best_of(lambda: latent_attribution(model, s, hook, sae))
    t_one = best_of(lambda: bare(n))
    print(f"attribution fwd+bwd over {n} prompts: {t_att:.3f} s = {t_att / t_one:.2f} × one "
          f"bare forward ({t_one:.3f} s)")  # fmt: skip

    mults = DEFAULT_MULTIPLIERS
    U = random_directions(model.cfg.d_model, a.directions, 0) * 3.0
    grid_rows = a.directions * n * len(mults)
    t_null = best_of(lambda: last_token_grid(model, s, hook, U, mults), repeats=2)
    t_full = best_of(lambda: bare(grid_rows), repeats=2)
    print(f"null       {a.directions} directions × {n} prompts × {len(mults)} multipliers: "
          f"{t_null:.3f} s, bare full forward of the same rows {t_full:.3f} s "
          f"({t_full / t_null:.1f}× slower)")  # fmt: skip


if __name__ == "__main__":
    main()
