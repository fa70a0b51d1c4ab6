"""DVC stage `decompose@<model>`: each steering vector in SAE features, and what it moves.

    python -m flows.decompose toy-a

For each concept `steering@<model>` wrote, `stages.steering.decompose_run` decomposes the
vector at its decomposition hook (the sweep's best hook, or the best-steering hook with
an SAE in `steering.models.<model>.saes`) into that SAE's features, scores the rankings
against ground-truth latents (by label, and at the read position), reads every later SAE
under steering (downstream effects), tests the feature-targeted vectors against the raw
one and random directions at equal norm and equal KL, and checks attribution patching
against true ablation. Outputs:

    data/decomposition/<model>/<concept>/  decomposition.json
    metrics/decomposition/<model>.json     headline numbers per concept (DVC metrics)

One MLflow child run per concept, with its figures. Changing the SAE sweep re-runs this
stage and not the steering vectors.
"""

from __future__ import annotations

import sys

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from flows.common import main
from stages.config import flatten, load_params
from stages.io import atomic_dir, read_json, write_json
from stages.layout import Layout
from stages.tracking import stage_run

LAYOUT = Layout()


def load_chosen_saes(model: str, chosen: dict[str, str]) -> dict:
    """hook -> the SAE `steering.models.<model>.saes` names there, trained by saes@<model>."""
    from stages.sae import load_sae

    saes = {}
    for hook, name in chosen.items():
        folder = LAYOUT.sae(model, hook, name)
        if not (folder / "cfg.json").exists():
            raise FileNotFoundError(
                f"params.yaml: steering.models.{model}.saes.{hook} = '{name}': no SAE folder "
                f"{folder}/ (expected one trained by saes@{model})"
            )
        saes[hook] = load_sae(folder).eval()
    return saes


@task(cache_policy=NO_CACHE)
def decompose(model, s, saes, store, cfg, folder):
    from stages.steering import load_vector
    from stages.steering.decompose_run import decompose_concept
    from stages.steering.run import load_probes

    vectors, _ = load_vector(folder)
    ev = read_json(folder / "evaluation.json", f"steering evaluation of '{s.name}'")
    return decompose_concept(model, s, vectors, ev, saes, store, cfg, probes=load_probes(folder))


@flow(name="decompose")
def decompose_flow(name: str) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from stages.activations import ActivationStore
    from stages.models import load_model
    from stages.steering import ConceptConfig, load_sets
    from stages.steering.decompose_run import (
        decomposition_figures,
        decomposition_headline,
        write_decomposition,
    )

    params = load_params()
    if params.steering is None or name not in params.steering.models:
        raise KeyError(f"params.yaml: steering.models.{name} is missing, expected the model's "
                       "steering sets, hooks and SAEs")  # fmt: skip
    st, ms = params.steering, params.steering.models[name]
    torch.manual_seed(st.config.seed)
    sets = load_sets(ms.sets, st.toy_sets.seed, st.toy_sets.n_train, st.toy_sets.n_heldout,
                     f"steering.models.{name}.sets")  # fmt: skip
    model_dir, store_dir, steering_dir = (LAYOUT.model(name), LAYOUT.activations(name),
                                          LAYOUT.steering(name))  # fmt: skip
    inputs = {"model": model_dir, "activations": store_dir, "saes": LAYOUT.saes(name),
              "steering": steering_dir}  # fmt: skip
    logged = {**flatten(st.config, "steering.config."), **flatten(st.toy_sets, "steering.toy_sets."),
              **flatten(ms, f"steering.models.{name}.")}  # fmt: skip
    cfg = ConceptConfig(**{**st.config.model_dump(), "multipliers": tuple(st.config.multipliers)})
    with stage_run(f"decompose@{name}", logged, inputs) as run:
        model = load_model(model_dir)
        store = ActivationStore(store_dir)
        saes = load_chosen_saes(name, ms.saes)
        metrics: dict[str, dict] = {}
        out = LAYOUT.decomposition(name)
        with atomic_dir(out, within=LAYOUT.data) as tmp:
            for cname, s in sets.items():
                folder = steering_dir / cname
                if not (folder / "evaluation.json").exists():
                    raise FileNotFoundError(f"{folder}/evaluation.json: missing; expected the "
                                            f"vectors steering@{name} writes (dvc repro "
                                            f"steering@{name})")  # fmt: skip
                dd = decompose(quote(model), quote(s), quote(saes), quote(store), cfg, folder)
                if "hook" in dd:  # which SAE the decomposition used
                    dd["sae"] = ms.saes[dd["hook"]]
                write_decomposition(dd, tmp, cname, name)
                metrics[cname] = decomposition_headline(dd)
                with run.child(f"{name}/{cname}", {"concept": cname, "set.hash": s.content_hash()},
                               {"atlas.kind": "decomposition", "steering.model": name}) as child:  # fmt: skip
                    child.metrics(metrics[cname])
                    for fname, fig in decomposition_figures(dd, cname).items():
                        child.figure(fig, f"{fname}.png")
                        plt.close(fig)
                m = metrics[cname]
                print(f"decompose@{name}: {cname}: at {dd.get('hook', '-')}, NNLS error at 5 "
                      f"{m.get('nnls_rel_error_at_5', float('nan')):.2f}, precision@5 (read "
                      f"position) {m.get('precision_at_5_nnls_read_position', float('nan')):.2f}")  # fmt: skip
        write_json(LAYOUT.metrics("decomposition", name), metrics)
        print(f"decompose@{name}: {len(sets)} concepts -> {out}/")
    return metrics


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m flows.decompose <model-name>")
    main(lambda: decompose_flow(sys.argv[1]), f"decompose@{sys.argv[1]}")
