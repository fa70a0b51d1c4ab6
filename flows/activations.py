"""DVC stage `activations@<model>`: cache hook activations into sharded zarr.

    python -m flows.activations toy-a

Runs the model over the whole corpus (training split, then held-out) in batches through
TransformerLens hooks and writes `data/activations/<model>/`; see stages/activations.py
for the layout. Before any forward it prints the plan (rows, GiB, memory, minutes at the
last rate measured here) and refuses a store this disk or memory cannot hold
(stages/activations/budget.py). Interrupted and re-run, it resumes from the last complete shard. With
`activations.store.url` set, the store is written to object storage and
`data/activations/<model>/` holds only a pointer to it (`remote.json`).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from flows.common import main, transient_only, with_runner
from stages.compute import Device
from stages.config import flatten, load_params
from stages.io import content_hash, write_json
from stages.layout import Layout
from stages.tracking import stage_run

LAYOUT = Layout()
CORPUS = LAYOUT.corpus


@task(cache_policy=NO_CACHE, retries=1, retry_condition_fn=transient_only)
def load(name: str, hooks: list[str]):
    from stages.activations import check_hooks
    from stages.models import load_model

    model = load_model(LAYOUT.model(name))
    check_hooks(model, hooks, f"params.yaml: activations.hooks.{name}")  # before any work
    return model


@task(cache_policy=NO_CACHE)
def windows(model, store_params):
    from stages.activations import cache_inputs

    return cache_inputs(CORPUS, model.tokenizer, store_params)


@task(cache_policy=NO_CACHE, retries=2, retry_condition_fn=transient_only)
def cache(model, name, hooks, inputs, store_params, model_hash, dev):
    from stages.activations import cache_activations

    return cache_activations(model, name, hooks, inputs, store_params,
                             LAYOUT.activations(name), model_hash=model_hash, device=dev)  # fmt: skip


@task(cache_policy=NO_CACHE)
def prepare(model, name, hooks, inputs, store_params, model_hash, precision, cuda):
    from stages.activations import prepare_cache

    return prepare_cache(model, name, hooks, inputs, store_params,
                         LAYOUT.activations(name), model_hash=model_hash,
                         precision=precision, cuda=cuda)  # fmt: skip


@functools.lru_cache(maxsize=2)
def _worker_model(model_dir: str):
    """A Dask worker loads each model once, however many shard runs it is given."""
    from stages.models import load_model

    return load_model(Path(model_dir))


@task(cache_policy=NO_CACHE, retries=2, retry_condition_fn=transient_only)
def cache_part(model_dir: str, plan, shards: list[int], dev) -> dict:
    from stages.activations import cache_shards
    from stages.models import exclusive

    model = _worker_model(model_dir)
    with exclusive(model):  # the worker's other threads share this model and its hooks
        return cache_shards(model, plan, shards, progress=False, device=dev)


def cache_on_dask(model, name, hooks, inputs, sp, model_hash, n_parts: int, dev) -> dict:
    """Shard runs (document ranges) on the Dask workers; each writes its own shard files."""
    from stages.activations import finish_cache, shard_runs, summarize_cache

    plan = prepare(quote(model), name, hooks, quote(inputs), sp, model_hash, dev.precision,
                   dev.is_cuda)  # fmt: skip
    todo = plan.todo()
    runs = shard_runs(todo, n_parts)
    print(f"activations@{name}: {len(todo)} shards in {len(runs)} runs on Dask workers")
    model_dir = str(LAYOUT.model(name))
    futures = [cache_part.submit(model_dir, plan.part(r), r, dev) for r in runs]
    stats = [f.result() for f in futures]
    finish_cache(plan)
    return summarize_cache(plan, stats, todo)


@task(cache_policy=NO_CACHE)
def concept_probes(store, lexical: dict) -> dict:
    """A dense probe per labelled concept at every cached hook (stages/concept_probes.py)."""
    from stages.concept_probes import probe_concepts

    return probe_concepts(store, lexical=lexical)


@task(cache_policy=NO_CACHE)
def untrained_probes(table: dict, store, m, tokenizer) -> dict:
    """The probes' control: the same probes on the untrained model (same architecture and
    seed) at the same rows (stages/concept_probes.py `probe_untrained`)."""
    from stages.concept_probes import probe_untrained
    from stages.models import build_toy_model

    untrained = build_toy_model(m, tokenizer)
    return probe_untrained(table, store, untrained.eval())


@flow(name="activations")
def activations_flow(name: str) -> dict:
    params = load_params()
    if name not in params.models:
        raise KeyError(f"model {name!r} is not in params.yaml models ({', '.join(params.models)})")
    hooks, sp = params.hooks(name), params.activations.store
    model_dir = LAYOUT.model(name)
    logged = {**flatten(sp, "activations.store."), f"activations.hooks.{name}": hooks}
    if sp.url:  # an unwritable url fails here, before the model is loaded
        from stages.activations import check_store_url

        check_store_url(sp.url)
    compute = params.compute.with_env()
    dev = Device.from_params(compute)
    inputs_ = {"corpus": CORPUS, "model": model_dir}
    with stage_run(f"activations@{name}", logged, inputs_, dev.tags()) as run:
        model = load(name, hooks)
        inputs = windows(quote(model), sp)
        if compute.runner == "dask":
            res = cache_on_dask(model, name, hooks, inputs, sp, content_hash(model_dir),
                                compute.dask.n_workers, dev)  # fmt: skip
        else:
            res = cache(quote(model), name, hooks, quote(inputs), sp, content_hash(model_dir),
                        dev)  # fmt: skip
        from stages.activations import count_files, forward_flops_per_token, record_rate

        if res["rows_computed"]:  # the next plan's minutes (machine-local, not an output)
            c = model.cfg
            record_rate(name, res["tokens_per_s_forward"],
                        forward_flops_per_token(c.n_layers, c.d_model, c.d_mlp or 0, sp.seq_len))  # fmt: skip

        out = LAYOUT.activations(name)
        summary = {"n_rows": res["n_rows"], "heldout_rows": res["n_rows"] - res["heldout_start"],
                   "n_hooks": len(hooks), "n_files": count_files(out)}  # fmt: skip
        from stages.activations import ActivationStore
        from stages.concept_probes import contextual_wins
        from stages.lexical import store_lexical_baseline

        store = ActivationStore(out)
        if store.concept_names:  # token-level lexical baseline per concept, held-out rows
            lex = store_lexical_baseline(store, "heldout")
            summary["lexical_baseline_f1"] = {c: v["f1"] for c, v in lex.items()}
            # beside the store, not in it: a store's folder is its bytes (or, for an
            # object-storage store, its pointer) and nothing else
            probes = concept_probes(quote(store), lex)
            if params.models[name].source == "toy":  # a pretrained model has no seed to redo
                probes = untrained_probes(probes, quote(store), params.models[name],
                                          quote(model.tokenizer))  # fmt: skip
            summary["probes"] = probes
            summary["probe_best_f1"] = {c: r["best_f1"] for c, r in probes["concepts"].items()}
            summary["contextual_read_by_probe"] = contextual_wins(probes)
            for c in summary["contextual_read_by_probe"]:
                r = probes["concepts"][c]
                print(f"activations@{name}: contextual concept {c}: probe F1 {r['best_f1']:.3f} "
                      f"at {r['best_hook']} vs lexical {r['lexical_f1']:.3f}")  # fmt: skip
        metrics_file = LAYOUT.metrics("activations", name)
        metrics_file.parent.mkdir(parents=True, exist_ok=True)
        write_json(metrics_file, summary)
        run.metrics({k: v for k, v in summary.items() if isinstance(v, int | float)})
        run.metrics({k: res[k] for k in ("forward_s", "enqueue_wait_s", "tokens_per_s_forward")})
        where = f"{res['url']} (pointer: {out}/remote.json)" if res.get("url") else f"{out}/"
        print(f"activations@{name}: {res['n_rows']:,} rows x {len(hooks)} hooks "
              f"({res['tokens_per_s_forward']:,.0f} tokens/s in forward) -> {where}")  # fmt: skip
    return summary


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m flows.activations <model-name>")
    main(lambda: with_runner(activations_flow)(sys.argv[1]), f"activations@{sys.argv[1]}")
