"""DVC stage `saes@<model>`: train and evaluate the SAE sweep of one model.

    python -m flows.saes toy-a

For each hook named in `saes.sweep.<model>` (one {hooks, saes} group or a list of them),
the SAEs planned for that hook are trained in one shared pass over the cached training
rows (resumable from `data/saes/<model>.partial/`),
evaluated on held-out rows only (reconstruction, CE loss recovered / KL with the SAE
spliced into the model, the Gurnee perturbation ratio, concept ground truth), and
saved in SAELens format to `data/saes/<model>/<hook>/<sae>/`. One MLflow child run per
SAE; the L0-vs-quality Pareto data goes to `plots/saes/<model>.json` for `dvc plots`.
"""

from __future__ import annotations

import functools
import shutil
import sys
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from flows.common import main, transient_only, with_runner
from stages.config import flatten, load_params
from stages.io import atomic_dir, content_hash, resume_or_reset, write_json
from stages.layout import Layout, inside
from stages.tracking import stage_run

# The headline numbers per SAE: what metrics/ and the Pareto plot carry.
HEADLINE = ("l0", "fvu", "explained_variance", "mse", "cosine_similarity", "shrinkage",
            "dead_fraction", "dense_fraction")  # fmt: skip
DOWNSTREAM = (
    "ce_loss_recovered",
    "kl_sae",
    "random_to_sae_kl_ratio",
    "ce_delta_sae",
    "ce_loss_recovered_mean_ablation",
    "ce_delta_pca",
    "kl_sae_over_pca",
    # Gurnee (2024): the random null over draws, the SAE / random ratio with its interval
    "kl_random",
    "kl_random_sd_draws",
    "sae_to_random_kl_ratio",
    "sae_to_random_kl_ratio_lo",
    "sae_to_random_kl_ratio_hi",
    "sae_to_random_kl_ratio_rare",
    "sae_to_random_kl_ratio_common",
    "kl_gap_freq_spearman",
    "kl_sae_rescaled",
    "ce_delta_sae_rescaled",
    "kl_sae_lo",
    "kl_sae_hi",
    "ce_delta_sae_lo",
    "ce_delta_sae_hi",
    "ce_loss_recovered_saturated",
)


def _flat_metrics(m: dict) -> dict[str, float]:
    """Headline metrics, rounded as in metrics.json (same bytes on any thread count)."""
    from stages.sae.io import round_metric

    out = {k: m[k] for k in HEADLINE if isinstance(m.get(k), int | float)}
    down = m.get("downstream") or {}
    out.update({k: down[k] for k in DOWNSTREAM if isinstance(down.get(k), int | float)})
    gt = m.get("ground_truth") or {}
    if isinstance(gt.get("mean_best_f1"), int | float):
        out["mean_best_f1"] = gt["mean_best_f1"]
    out.update(_flat_ground_truth(gt.get("sparse_probing") or {}))
    return {k: round_metric(v) for k, v in out.items()}


def _flat_ground_truth(sp: dict) -> dict[str, float]:
    """k-sparse probing (mean F1 over concepts with its interval, and over the contextual
    ones) beside the dense probe and the lexical lookup; absorption per parent."""
    out: dict[str, float] = {}
    for tag, v in (sp.get("summary") or {}).items():
        if isinstance(v, dict):
            out[f"probe_{tag}"] = v["mean"]
            out[f"probe_{tag}_lo"], out[f"probe_{tag}_hi"] = v["lo"], v["hi"]
        else:
            out[f"probe_{tag}"] = v
    rates = []
    for parent, a in (sp.get("absorption") or {}).items():
        if isinstance(a.get("rate"), int | float) and a.get("n_tokens", 0) > 0:
            out[f"absorption_{parent}"] = a["rate"]
            out[f"absorption_{parent}_random"] = a["random_direction_rate"]
            rates.append(a["rate"])
    if rates:
        out["absorption_mean"] = sum(rates) / len(rates)
    return out


@task(cache_policy=NO_CACHE, retries=1, retry_condition_fn=transient_only)
def train(source, configs, ckpt: Path, every: int, dev):
    from stages.sae import train_saes

    return train_saes(source, configs, checkpoint_dir=ckpt, checkpoint_every=every, device=dev)


@task(cache_policy=NO_CACHE)
def evaluate(sae, store, model, hook: str, eval_params, dev):
    import torch

    from stages.sae import SliceSource, evaluate_sae

    torch.manual_seed(0)
    heldout = store.source(hook, "heldout")
    n = min(heldout.n_rows, eval_params.max_rows or heldout.n_rows)
    heldout = SliceSource(heldout, 0, n)
    labels = store.read("concept_labels", "heldout")[:n] if store.concept_names else None
    probe = labels is not None and eval_params.sparse_probing
    context = _concept_context(store, hook, n) if probe else None
    return evaluate_sae(
        sae, heldout, model=model, hook_name=hook,
        tokens=store.windows("heldout", eval_params.ce_windows),
        labels=labels, concept_names=store.concept_names or None, context=context,
        token_counts=_token_counts(store), random_draws=eval_params.random_draws,
        random_windows=eval_params.random_windows,
        max_rows=n, device=dev,
    )  # fmt: skip


# One per (store, hook): the SAEs of a hook share the held-out split, the dense probe and
# the lexical lookup (computed by the first SAE evaluated there).
@functools.lru_cache(maxsize=8)
def _concept_context(store, hook: str, n: int):
    from stages.corpus import CONCEPTS
    from stages.sae.concepts import ConceptContext

    names = set(store.concept_names)
    hierarchy: dict[str, list[str]] = {}
    for c in CONCEPTS:
        if c.parent in names and c.name in names:
            hierarchy.setdefault(c.parent, []).append(c.name)
    return ConceptContext(
        groups=store.read("doc_ids", "heldout")[:n],
        token_ids=store.read("token_ids", "heldout")[:n],
        hierarchy=hierarchy,
        kinds={c.name: c.kind for c in CONCEPTS if c.name in names},
    )


@functools.lru_cache(maxsize=2)
def _token_counts(store):
    """Unigram counts of the training split (token frequency for Gurnee's KL gap)."""
    import numpy as np

    return np.bincount(store.read("token_ids", "train").astype(np.int64))


@functools.lru_cache(maxsize=2)
def _worker_inputs(store_dir: str, model_dir: str):
    """A Dask worker opens the store and loads the model once per stage."""
    from stages.activations import ActivationStore
    from stages.models import load_model

    return ActivationStore(Path(store_dir)), load_model(Path(model_dir))


@task(cache_policy=NO_CACHE, retries=1, retry_condition_fn=transient_only)
def fit_one(store_dir: str, model_dir: str, hook: str, config, ckpt: Path, every: int,
            eval_params, threads: int, dev):  # fmt: skip
    """One SAE, trained and evaluated on a Dask worker: alone it sees exactly the batches
    it sees in a shared pass (the loader is seeded by (batch_size, seed), not by company).
    With the flow process's torch thread count: full reductions (the input-scale
    estimate, loss normalisers) split their sums by thread, so the count is part of the
    result — the same count gives the local path's bytes."""
    import torch

    from stages.models import exclusive
    from stages.sae import train_saes

    torch.set_num_threads(threads)
    store, model = _worker_inputs(store_dir, model_dir)
    (r,) = train_saes(store.source(hook, "train"), [config], checkpoint_dir=ckpt,
                      checkpoint_every=every, progress=False, device=dev)  # fmt: skip
    with exclusive(model):  # the worker's other threads share this model and its hooks
        return r, evaluate.fn(r.sae, store, model, hook, eval_params, dev)


def _fit_all(plan, store, model, store_dir: Path, model_dir: Path, partial: Path, sp,
             data_fp: dict, compute, dev):  # fmt: skip
    """(hook, TrainResult, EvalResult) for every planned SAE, in plan order: one shared
    pass per hook locally, or one SAE per Dask task."""
    for hook, configs in plan.items():
        # resume only what this very data and sweep started
        fp = {**data_fp, "saes": [c.model_dump(mode="json") for c in configs]}
        if resume_or_reset(partial / hook, fp):
            print(f"saes: resuming from checkpoints in {partial / hook}")
    if compute.runner == "dask":
        import torch

        threads = torch.get_num_threads()
        futures = [(hook, fit_one.submit(str(store_dir), str(model_dir), hook, c, partial / hook,
                                         sp.checkpoint_every, sp.eval, threads, dev))
                   for hook, configs in plan.items() for c in configs]  # fmt: skip
        for hook, f in futures:
            yield (hook, *f.result())
        return
    for hook, configs in plan.items():
        results = train(quote(store.source(hook, "train")), configs, partial / hook,
                        sp.checkpoint_every, dev)  # fmt: skip
        for r in results:
            yield hook, r, evaluate(quote(r.sae), quote(store), quote(model), hook, sp.eval, dev)


@flow(name="saes")
def saes_flow(name: str) -> dict:
    from stages.activations import ActivationStore
    from stages.compute import Device
    from stages.models import load_model
    from stages.sae import save_sae
    from stages.sae.figures import pareto_figure
    from stages.sae.io import resolve_pretrained_sae

    params = load_params()
    if params.saes is None or name not in params.saes.sweep:
        raise KeyError(f"params.yaml: saes.sweep.{name} is missing, expected the model's SAE sweep")
    sp, plan = params.saes, params.sae_plan(name)
    lay = Layout()
    store_dir, model_dir = lay.activations(name), lay.model(name)
    out = lay.saes(name)
    partial = lay.partial(out)
    logged = {**flatten(sp.sweep[name], f"saes.sweep.{name}."), **flatten(sp.eval, "saes.eval."),
              **flatten(sp.pretrained.get(name, {}), f"saes.pretrained.{name}.")}  # fmt: skip
    compute = params.compute.with_env()
    dev = Device.from_params(compute)
    inputs = {"activations": store_dir, "model": model_dir}
    pretrained = sp.pretrained.get(name, {})  # SAEs trained elsewhere: evaluated, then written
    inputs.update({f"pretrained.{n}": Path(e.path) for n, e in pretrained.items() if e.path})
    with stage_run(f"saes@{name}", logged, inputs, dev.tags()) as run:
        store = ActivationStore(store_dir)
        model = load_model(model_dir)
        rows, metrics = [], {}
        data_fp = {"store": content_hash(store.descriptor), "model": content_hash(model_dir)}
        with atomic_dir(out, within=lay.saes()) as tmp:
            fits = _fit_all(plan, store, model, store_dir, model_dir, partial, sp, data_fp,
                            compute, dev)  # fmt: skip
            trained: dict[str, dict] = {}  # hook -> name -> (SAE, config), for seed groups
            for hook, r, ev in fits:
                trained.setdefault(hook, {})[r.name] = (r.sae, r.config.model_dump(mode="json"))
                if r.config.intended_l0 is not None:  # k or target_l0: matched-L0 figures
                    ev.metrics["target_l0"] = r.config.intended_l0
                if "sparsity_calibration" in r.sae.metadata:  # coefficients tried, L0s, result
                    ev.metrics["sparsity_calibration"] = r.sae.metadata["sparsity_calibration"]
                folder = inside(tmp, hook, r.name)  # names checked by params; never outside
                save_sae(folder, r.sae, hook_name=hook, model_name=name,
                         log_feature_density=ev.log10_feature_density, metrics=ev.metrics,
                         training_config=r.config)  # fmt: skip
                flat = _flat_metrics(ev.metrics)
                if r.config.intended_l0 is not None:  # k or target_l0: the matched-L0 plot
                    flat["target_l0"] = r.config.intended_l0
                metrics.setdefault(hook, {})[r.name] = {k: round(v, 6) for k, v in flat.items()}
                rows.append({"model": name, "hook": hook, "sae": r.name,
                             "architecture": r.config.architecture, **flat})  # fmt: skip
                _log_sae_run(run, name, hook, r, ev, flat)
                print(f"saes@{name}: {hook} {r.name}: L0 {flat.get('l0', 0):.1f}, "
                      f"FVU {flat.get('fvu', 0):.3f}, CE recovered "
                      f"{flat.get('ce_loss_recovered', float('nan')):.3f}")  # fmt: skip
            seeds = _seed_groups(trained, metrics, store, sp.eval.max_rows)
            if seeds:
                write_json(tmp / "seeds.json", seeds)
            for sae_name, entry in pretrained.items():
                hook = entry.hook
                where = f"params.yaml: saes.pretrained.{name}.{sae_name}"
                sae = resolve_pretrained_sae(entry, where, store.source(hook, "heldout").d_in)
                ev = evaluate(quote(sae), quote(store), quote(model), hook, sp.eval, dev)
                save_sae(inside(tmp, hook, sae_name), sae, hook_name=hook, model_name=name,
                         log_feature_density=ev.log10_feature_density, metrics=ev.metrics,
                         training_config={"pretrained": sae.metadata["pretrained"]})  # fmt: skip
                flat = _flat_metrics(ev.metrics)
                metrics.setdefault(hook, {})[sae_name] = {k: round(v, 6) for k, v in flat.items()}
                rows.append({"model": name, "hook": hook, "sae": sae_name,
                             "architecture": f"pretrained:{sae.architecture}", **flat})  # fmt: skip
                tags = {"atlas.kind": "sae", "sae.hook": hook, "sae.model": name,
                        "sae.source": entry.source()}  # fmt: skip
                with run.child(f"{name}/{hook}/{sae_name}",
                               flatten(entry, "sae.pretrained."), tags) as child:  # fmt: skip
                    child.metrics(flat)
                print(f"saes@{name}: {hook} {sae_name} ({entry.source()}): L0 "
                      f"{flat.get('l0', 0):.1f}, FVU {flat.get('fvu', 0):.3f}, CE recovered "
                      f"{flat.get('ce_loss_recovered', float('nan')):.3f}")  # fmt: skip
        shutil.rmtree(partial, ignore_errors=True)
        if seeds:  # mean ± sd over seeds, and the overlap's, beside the SAEs' own metrics
            metrics["seeds"] = {f"{hook}/{first}": {**g["metrics"], **g["overlap"]}
                                for hook, groups in seeds.items() for first, g in groups.items()}  # fmt: skip
        write_json(lay.metrics("saes", name), metrics)
        write_json(lay.plot("saes", name), rows)
        run.figure(pareto_figure(rows, name), "pareto.png")
        print(f"saes@{name}: {len(rows)} SAEs -> {out}/, metrics -> metrics/saes/{name}.json")
    return metrics


def _seed_groups(trained: dict, metrics: dict, store, max_rows: int | None) -> dict:
    """hook -> `stages.sae.seeds.seed_report` for the SAEs of each hook that differ only
    in their seed (none in the default sweep: empty), on the held-out rows."""
    from stages.sae.data import iter_rows
    from stages.sae.seeds import seed_report

    out = {}
    for hook, by_name in trained.items():
        rows = functools.partial(iter_rows, store.source(hook, "heldout"), 8192, max_rows)
        groups = seed_report({n: s for n, (s, _) in by_name.items()},
                             {n: c for n, (_, c) in by_name.items()}, metrics.get(hook, {}), rows)  # fmt: skip
        if not groups:
            continue
        out[hook] = groups
        for first, g in groups.items():
            o = g["overlap"]["fraction_with_partner_hungarian"]
            print(f"saes: {hook} {first} over {len(g['seeds'])} seeds: FVU "
                  f"{g['metrics']['fvu']['mean']:.4f} ± {g['metrics']['fvu']['sd']:.4f}, "
                  f"seed-to-seed partners {o['mean']:.3f} ± {o['sd']:.3f}")  # fmt: skip
    return out


def _log_sae_run(stage, model: str, hook: str, r, ev, flat: dict) -> None:
    """One MLflow child run per SAE (under the stage's run): config, metrics, density plot."""
    from stages.sae.figures import density_figure

    tags = {"atlas.kind": "sae", "sae.hook": hook, "sae.model": model}
    with stage.child(f"{model}/{hook}/{r.name}", flatten(r.config, "sae."), tags) as child:
        child.metrics(flat)
        child.figure(density_figure(ev.log10_feature_density, f"{r.name} @ {hook}"),
                     "feature_density.png")  # fmt: skip


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m flows.saes <model-name>")
    main(lambda: with_runner(saes_flow)(sys.argv[1]), f"saes@{sys.argv[1]}")
