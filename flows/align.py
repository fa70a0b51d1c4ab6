"""DVC stage `align@<A>__<B>`: do two models learn the same features?

    python -m flows.align toy-a__toy-b

Pairs the two activation caches' tokens (row by row with one tokenizer, on shared
character spans otherwise), correlates every latent of A's SAE with every latent of B's
over those tokens (streamed), matches them (max, Hungarian) against a shuffled-token
null, scores representation similarity (CKA, mutual kNN, SVCCA, RSA, with permutation
p-values, layer by layer) and checks the planted concepts (steering vectors carried
through the matches are the `transfer` stage's, flows/transfer.py):

    data/alignment/<A>__<B>/   matches/*.parquet, scores.json, similarity.json, null.json,
                               ground_truth.json, meta.json
    metrics/alignment/<A>__<B>.json   headline scores (DVC metrics)

See stages/alignment/ for the rules and definitions.
"""

from __future__ import annotations

import re
import sys

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from flows.common import main, transient_only, with_runner
from stages.config import flatten, load_params
from stages.io import write_json
from stages.layout import Layout
from stages.tracking import stage_run


@task(cache_policy=NO_CACHE)
def align(store_a, store_b, saes_a, saes_b, cfg, best_a, best_b, dev, strings, untrained):
    from stages.alignment.stream import align_pair

    return align_pair(store_a, store_b, saes_a, saes_b, cfg, best_latents_a=best_a,
                      best_latents_b=best_b, device=dev, token_strings=strings,
                      untrained=untrained)  # fmt: skip


def trained(model) -> bool:
    """False for an untrained control model (a toy model with train.tokens 0)."""
    return not (model.source == "toy" and model.train.tokens == 0)


def untrained_models(params, lay, a: str, b: str):
    """The dense measures' control: both models' architectures and seeds before training
    (`build_toy_model`, as the probes' control in flows/activations.py builds them), with
    their own tokenizers; None unless both are toy models (a pretrained model has no seed
    to redo)."""
    from stages.models import build_toy_model, load_tokenizer

    ms = [params.models[m] for m in (a, b)]
    if any(m.source != "toy" for m in ms):
        return None
    return tuple(build_toy_model(m, load_tokenizer(lay.model(name))).eval()
                 for m, name in zip(ms, (a, b), strict=True))  # fmt: skip


@task(cache_policy=NO_CACHE, retries=1, retry_condition_fn=transient_only)
def align_part(plan, c0: int, c1: int, threads: int):
    """One contiguous range of token chunks through every accumulator (a Dask worker),
    with the flow process's torch thread count, as on the local path (see flows/saes.py
    `fit_one`: full reductions split their sums by thread)."""
    import torch

    from stages.alignment.stream import run_part

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


@flow(name="align")
def align_flow(pair_name: str) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stages.activations import ActivationStore
    from stages.alignment import AlignConfig, figures
    from stages.alignment.outputs import write_alignment
    from stages.compute import Device
    from stages.models import token_strings
    from stages.sae.io import load_model_saes

    params = load_params()
    if params.align is None or pair_name not in params.align.pairs:
        raise KeyError(f"params.yaml: align.pairs.{pair_name} is missing, expected the pair "
                       "{a: <model>, b: <model>}")  # fmt: skip
    pair = params.align.pairs[pair_name]
    a, b = pair.a, pair.b
    lay = Layout()
    cfg = AlignConfig.from_params(params.align.config)
    inputs = {f"{kind}.{m}": getattr(lay, kind)(m)
              for kind in ("activations", "saes", "model") for m in (a, b)}  # fmt: skip
    logged = {**flatten(params.align.config, "align.config."), "align.a": a, "align.b": b}
    # the token pass runs on compute.device, always in float32 products (align_pair)
    dev = Device(params.compute.with_env().device)
    with stage_run(f"align@{pair_name}", logged, inputs, dev.tags()) as run:
        store_a, store_b = ActivationStore(lay.activations(a)), ActivationStore(lay.activations(b))
        saes_a, best_a = load_model_saes(lay.saes(a))
        saes_b, best_b = load_model_saes(lay.saes(b))
        # two tokenizers: top tokens are compared through their decoded strings
        strings = (token_strings(lay.model(a)), token_strings(lay.model(b)))
        untrained = untrained_models(params, lay, a, b)
        if params.compute.with_env().runner == "dask":
            from stages.alignment.stream import align_pair

            result = align_pair(store_a, store_b, saes_a, saes_b, cfg, best_latents_a=best_a,
                                best_latents_b=best_b, map_parts=parts_on_dask, device=dev,
                                token_strings=strings, untrained=untrained)  # fmt: skip
        else:
            result = align(quote(store_a), quote(store_b), quote(saes_a), quote(saes_b), cfg,
                           best_a, best_b, dev, quote(strings), quote(untrained))  # fmt: skip
        result.trained = {m: trained(params.models[m]) for m in (a, b)}
        out = lay.alignment(pair_name)
        write_alignment(result, out)
        metrics = {k: round(float(v), 6) for k, v in result.scores.items()
                   if isinstance(v, int | float) and v == v}  # fmt: skip
        write_json(lay.metrics("alignment", pair_name), metrics)
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
        for name, cells in result.controls.items():  # stages/alignment/controls.py
            print(f"align@{pair_name}: {name}: untrained pair / trained vs untrained: " + ", ".join(
                f"{m} {c['untrained'].statistic:.3f} / {c['trained_vs_untrained'].statistic:.3f}"
                for m, c in cells.items()))  # fmt: skip
        print(f"align@{pair_name}: {result.n_tokens:,} aligned tokens -> {out}/")
    return metrics


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m flows.align <A>__<B>")
    main(lambda: with_runner(align_flow)(sys.argv[1]), f"align@{sys.argv[1]}")
