"""DVC stage `align@<A>__<B>`: do two models learn the same features?

    python -m flows.align toy-a__toy-b

Pairs the two activation caches' tokens (row by row with one tokenizer, on shared
character spans otherwise), correlates every latent of A's SAE with every latent of B's
over those tokens (streamed), matches them (max, Hungarian) against a shuffled-token
null, scores representation similarity (CKA, mutual kNN, SVCCA, RSA, with permutation
p-values, layer by layer), checks the planted concepts, and then carries each of A's
steering vectors into B through the matches and tests whether it steers B (against B's
own vector and random directions of the same norm):

    data/alignment/<A>__<B>/   matches/*.parquet, scores.json, similarity.json, null.json,
                               ground_truth.json, meta.json, transfer.json
    metrics/alignment/<A>__<B>.json   headline scores (DVC metrics)

See stages/alignment/ for the rules and definitions.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from flows.common import main, transient_only, with_runner
from stages.config import flatten, load_params
from stages.io import atomic_dir, write_json
from stages.tracking import stage_run


@task(cache_policy=NO_CACHE)
def align(store_a, store_b, saes_a, saes_b, cfg, best_a, best_b, dev):
    from stages.alignment.pipeline import align_pair

    return align_pair(store_a, store_b, saes_a, saes_b, cfg,
                      best_latents_a=best_a, best_latents_b=best_b, device=dev)  # fmt: skip


@task(cache_policy=NO_CACHE, retries=1, retry_condition_fn=transient_only)
def align_part(plan, c0: int, c1: int, threads: int):
    """One contiguous range of token chunks through every accumulator (a Dask worker),
    with the flow process's torch thread count, as on the local path (see flows/saes.py
    `fit_one`: full reductions split their sums by thread)."""
    import torch

    from stages.alignment.pipeline import run_part

    torch.set_num_threads(threads)
    return run_part(plan, c0, c1)


def parts_on_dask(plan, parts):
    """`align_pair`'s map_parts: each part a task on the Dask cluster, results in order
    (the float64 accumulators are merged in that order, as on the local path)."""
    print(f"align: {len(parts)} parts of the token pass on Dask workers")
    import torch

    threads = torch.get_num_threads()
    futures = [align_part.submit(plan, c0, c1, threads) for c0, c1 in parts]
    return [f.result() for f in futures]


def transfer_steering(result, saes_a, saes_b, a: str, b: str, params) -> dict:
    """Each concept both models steered: A's vector carried through the matches into B,
    tested on B's held-out set against B's own vector and random directions, all at the
    own vector's norm (`stages.alignment.evaluate_transfer`)."""
    from flows.steering import load_sets
    from stages.alignment import evaluate_transfer, transfer_vector
    from stages.models import load_model
    from stages.steering import load_vector

    st, tp = params.steering, params.align.transfer
    dir_a, dir_b = Path("data/steering") / a, Path("data/steering") / b
    if st is None or not dir_a.is_dir() or not dir_b.is_dir() or b not in st.models:
        return {"skipped": f"no steering vectors for both {a} and {b}"}
    sets = load_sets(st.models[b].sets, st.toy_sets, f"steering.models.{b}.sets")
    pairs = {(p.hook_a, p.hook_b): p for p in result.pairs}
    model_b = load_model(Path("data/models") / b)
    mults = st.config.multipliers
    out: dict = {"method": tp.method, "k": tp.k, "min_correlation": tp.min_correlation,
                 "n_random": tp.n_random, "multipliers": mults, "concepts": {}}  # fmt: skip
    for concept in sorted(p.name for p in dir_a.iterdir() if (dir_b / p.name).is_dir()):
        if concept not in sets:
            continue
        va, _ = load_vector(dir_a / concept)
        vb, _ = load_vector(dir_b / concept)
        rows = {}
        for hook in sorted(set(va) & set(vb)):
            pair = pairs.get((hook, hook))
            if pair is None:
                continue
            sa, sb = saes_a[hook][pair.name_a], saes_b[hook][pair.name_b]
            vt = transfer_vector(va[hook], sa, sb, pair.hungarian, tp.k, method=tp.method,
                                 min_score=tp.min_correlation)  # fmt: skip
            test = evaluate_transfer(model_b, sets[concept], hook, vb[hook], vt, mults,
                                     n_random=tp.n_random, seed=st.config.seed)  # fmt: skip
            rows[hook] = {"sae_a": pair.name_a, "sae_b": pair.name_b, **test.to_dict()}
        out["concepts"][concept] = rows
    return out


def headline(result, transfer: dict) -> dict[str, float]:
    scores = {k: round(float(v), 6) for k, v in result.scores.items()
              if isinstance(v, int | float) and v == v}  # fmt: skip
    for concept, rows in transfer.get("concepts", {}).items():
        for hook, r in rows.items():
            key = f"transfer/{concept}/{hook}"
            for kind in ("own", "transferred", "random"):
                scores[f"{key}/{kind}"] = round(r[kind]["steerability"], 6)
            for k in ("p_vs_random", "fraction_of_own", "cosine_transferred_own"):
                if r[k] == r[k]:
                    scores[f"{key}/{k}"] = round(r[k], 6)
    return scores


@flow(name="align")
def align_flow(pair_name: str) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stages.activations import ActivationStore
    from stages.alignment import AlignConfig, figures, load_saes
    from stages.alignment.outputs import write_alignment
    from stages.compute import Device

    params = load_params()
    if params.align is None or pair_name not in params.align.pairs:
        raise KeyError(f"params.yaml: align.pairs.{pair_name} is missing, expected the pair "
                       "{a: <model>, b: <model>}")  # fmt: skip
    pair = params.align.pairs[pair_name]
    a, b = pair.a, pair.b
    cfg = AlignConfig.from_params(params.align.config)
    inputs = {f"{kind}.{m}": Path("data") / kind / m
              for kind in ("activations", "saes") for m in (a, b)}  # fmt: skip
    logged = {**flatten(params.align.config, "align.config."),
              **flatten(params.align.transfer, "align.transfer."), "align.a": a, "align.b": b}  # fmt: skip
    # the token pass runs on compute.device, always in float32 products (align_pair)
    dev = Device(params.compute.with_env().device)
    with stage_run(f"align@{pair_name}", logged, inputs, dev.tags()) as run:
        store_a = ActivationStore(Path("data/activations") / a)
        store_b = ActivationStore(Path("data/activations") / b)
        saes_a, best_a = load_saes(Path("data/saes") / a)
        saes_b, best_b = load_saes(Path("data/saes") / b)
        if params.compute.with_env().runner == "dask":
            from stages.alignment.pipeline import align_pair

            result = align_pair(store_a, store_b, saes_a, saes_b, cfg, best_latents_a=best_a,
                                best_latents_b=best_b, map_parts=parts_on_dask, device=dev)  # fmt: skip
        else:
            result = align(quote(store_a), quote(store_b), quote(saes_a), quote(saes_b), cfg,
                           best_a, best_b, dev)  # fmt: skip
        transfer = transfer_steering(result, saes_a, saes_b, a, b, params)
        out = Path("data/alignment") / pair_name
        with atomic_dir(out, within=Path("data/alignment")) as tmp:
            write_alignment(result, tmp)
            write_json(tmp / "transfer.json", transfer)
        metrics = headline(result, transfer)
        Path("metrics/alignment").mkdir(parents=True, exist_ok=True)
        write_json(Path("metrics/alignment") / f"{pair_name}.json", metrics)
        # MLflow keys allow letters, digits and _-. :/ only
        run.metrics({re.sub(r"[^\w\-. :/]", "-", k): v for k, v in metrics.items()})
        run.metrics({f"seconds.{k}": v for k, v in result.timings.items()})
        for name, fig in figures(result).items():
            run.figure(fig, f"{name}.png")
            plt.close(fig)
        for p in result.pairs:
            s = p.scores
            print(f"align@{pair_name}: {p.key}: " + ", ".join(
                f"{k} {v:.3f}" for k, v in s.items() if isinstance(v, float))[:400])  # fmt: skip
        for concept, rows in transfer.get("concepts", {}).items():
            for hook, r in rows.items():
                rnd = r["random"]
                print(f"align@{pair_name}: transfer {concept} @ {hook}: steerability in {b} — "
                      f"own {r['own']['steerability']:.3f}, transferred "
                      f"{r['transferred']['steerability']:.3f} (p {r['p_vs_random']:.3f} "
                      f"against {rnd['n']} random: {rnd['steerability']:.3f} ± "
                      f"{rnd['sd']:.3f})")  # fmt: skip
        print(f"align@{pair_name}: {result.n_tokens:,} aligned tokens -> {out}/")
    return metrics


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m flows.align <A>__<B>")
    main(lambda: with_runner(align_flow)(sys.argv[1]), f"align@{sys.argv[1]}")
