"""Feature interventions and controls vs a bare batched forward on the same rows.

    .venv/bin/python benchmarks/intervention_overhead.py [--model data/models/toy-a]
        [--untrained toy-a --hook blocks.2.hook_resid_post --sae-shape 1024,16]
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
- Directional ablation + ablate+add (`interventions.directional_ablation`): every
  (direction, multiplier, pair prompt) row, edited at every position from the hook on,
  against a bare full forward of the same rows. Target: ≤ 20 %.
- Clamping SAE latents (`interventions.feature_clamping`'s two passes): the behaviour
  rows through the key-value-cache path with the SAE spliced in, against the same rows
  adding a vector (`last_token_grid`) and a bare full forward; the KL rows (clamp at every
  position of held-out windows, blocks after the hook only) against a bare forward of
  the same windows. Target: ≤ 20 %.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

from stages.models import load_model
from stages.sae import load_sae
from stages.steering import toy_sets
from stages.steering.attribution import ablation_effects, latent_attribution, prompt_batch
from stages.steering.controls import last_token_edit_grid, last_token_grid, random_directions
from stages.steering.evaluate import DEFAULT_MULTIPLIERS
from stages.steering.interventions import (
    _kl_reduce,
    clamp_delta,
    clamp_edit,
    clean_pass,
    directional_ablation,
    live_mask,
    pair_prompts,
    run_edits,
)
from stages.steering.vectors import compute_vectors


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
    ap.add_argument("--store", default=None, help="activation store (default: beside the model)")
    ap.add_argument("--untrained", default=None, metavar="NAME",
                    help="no trained outputs: params.yaml's toy model NAME with random weights, "
                         "a random TopK SAE (--sae-shape) at --hook and random windows (the "
                         "costs do not depend on training)")  # fmt: skip
    ap.add_argument("--hook", default="blocks.2.hook_resid_post")
    ap.add_argument("--sae-shape", default="1024,16", help="d_sae,k of the random SAE")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    if a.untrained:
        model, sae, hook = untrained(a)
        a.model, a.sae = f"untrained {a.untrained}", f"random topk {a.sae_shape}"
    else:
        model = load_model(Path(a.model))
        sae = load_sae(Path(a.sae)).eval()
        hook = Path(a.sae).parent.name
    s = toy_sets(0, 64, 32, [a.set])[a.set]
    toks, lens, _, _ = prompt_batch(model, s)
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

    # ---- directional ablation + ablate+add over the held-out pairs
    v = compute_vectors(model, s.train_pairs, [hook], "mean_diff")[hook]
    ps, P, _ = pair_prompts(s)
    ptoks, _, _, _ = prompt_batch(model, ps)
    k_m = 3
    abl_rows = (a.directions + 1) * k_m * 2 * P

    @torch.no_grad()
    def bare_rows(tk: Tensor, n_rows: int, bs: int = 64) -> None:
        for r0 in range(0, n_rows, bs):
            model(tk[torch.arange(r0, min(r0 + bs, n_rows)) % len(tk)])

    t_da = best_of(lambda: directional_ablation(model, s, hook, v, n_random=a.directions),
                   repeats=2)  # fmt: skip
    t_db = best_of(lambda: bare_rows(ptoks, abl_rows + 2 * P), repeats=2)
    print(f"ablation   {a.directions + 1} directions × {k_m} multipliers × {2 * P} pair "
          f"prompts: {t_da:.3f} s, bare forward of the same rows {t_db:.3f} s, overhead "
          f"{100 * (t_da / t_db - 1):+.1f} %")  # fmt: skip

    # ---- clamping: behaviour rows (KV path) and KL rows (from the hook on)
    kk, alphas = 5, [0.0, 0.5, 1.0, 2.0, 4.0, 8.0]
    sets = torch.tensor([active[i : i + kk] for i in range(0, kk * (a.directions + 1), kk)
                         if len(active[i : i + kk]) == kk] or [active[:kk]])  # fmt: skip
    base = torch.ones(sets.shape)
    cl_rows = len(sets) * n * len(alphas)
    t_cg = best_of(lambda: last_token_edit_grid(model, s, hook, len(sets), alphas,
                                                clamp_edit(sae, sets, base)), repeats=2)  # fmt: skip
    U = random_directions(model.cfg.d_model, len(sets), 1)
    t_ag = best_of(lambda: last_token_grid(model, s, hook, U, alphas), repeats=2)
    t_cb = best_of(lambda: bare(cl_rows), repeats=2)
    print(f"clamp      {len(sets)} latent sets × {n} prompts × {len(alphas)} values: {t_cg:.3f} s "
          f"(KV path), adding a vector on the same path {t_ag:.3f} s ({100 * (t_cg / t_ag - 1):+.1f} "
          f"%), bare full forward of the same rows {t_cb:.3f} s ({100 * (t_cg / t_cb - 1):+.1f} %)")  # fmt: skip
    win = store_windows(a, model)
    if win is not None:
        mask = live_mask(win)[..., None]
        cp = clean_pass(model, hook, win)
        red = _kl_reduce(cp[0])

        def kl_all() -> None:
            run_edits(model, hook, win, len(sets),
                      lambda x0, i: x0 + mask * clamp_delta(sae, x0, sets[i], 2.0 * base[i]),
                      red, clean=cp)  # fmt: skip

        t_kl = best_of(kl_all, repeats=2)
        t_kb = best_of(lambda: bare_rows(win, len(sets) * len(win)), repeats=2)
        print(f"clamp KL   {len(sets)} latent sets × {len(win)} windows of {win.shape[1]} tokens: "
              f"{t_kl:.3f} s, bare forward of the same windows {t_kb:.3f} s, overhead "
              f"{100 * (t_kl / t_kb - 1):+.1f} %")  # fmt: skip


def untrained(a):
    """params.yaml's toy model `a.untrained` with random weights (a tokenizer trained on
    toy stories to its vocabulary size) and a random TopK SAE at `a.hook`."""
    from stages.config import load_params
    from stages.corpus import generate_story
    from stages.models import build_toy_model, train_tokenizer
    from stages.sae import build_sae

    m = load_params().models[a.untrained]
    tok = train_tokenizer([generate_story(7, i)[0] for i in range(400)],
                          m.tokenizer.vocab_size, Path(tempfile.mkdtemp()))  # fmt: skip
    model = build_toy_model(m, tok).eval()
    d_sae, k = (int(x) for x in a.sae_shape.split(","))
    sae = build_sae({"architecture": "topk", "d_in": model.cfg.d_model, "d_sae": d_sae, "k": k,
                     "n_training_tokens": 4096, "batch_size": 64, "seed": 0}).eval()  # fmt: skip
    return model, sae, a.hook


def store_windows(a, model) -> Tensor | None:
    """8 held-out windows of the model's activation store (None without one; random
    tokens of the model's context length for --untrained)."""
    from stages.activations import ActivationStore

    if a.untrained:
        g = torch.Generator().manual_seed(0)
        w = torch.randint(0, model.cfg.d_vocab, (8, model.cfg.n_ctx), generator=g)
        w[:, 0] = model.tokenizer.bos_token_id or 0
        return w

    path = Path(a.store) if a.store else Path(a.model).parent.parent / "activations" / Path(
        a.model).name  # fmt: skip
    if not path.exists():
        print(f"# no activation store at {path}: clamp KL rows not measured (--store)")
        return None
    return ActivationStore(path).windows("heldout", max_windows=8)


if __name__ == "__main__":
    main()
