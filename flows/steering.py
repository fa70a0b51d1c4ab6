"""DVC stage `steering@<model>`: steering vectors per concept and their evaluation.

    python -m flows.steering toy-a

For each contrastive set in `steering.models.<model>.sets` (generated from the corpus
grammar, or a JSONL file under data/prompts/), `stages.steering.run_concept` builds the
vector at every hook in `steering.models.<model>.hooks`, sweeps the layers (steerability,
wrong-way fraction, KL / CE rise on held-out text, best layer within the KL budget),
tests every hook's vector against random directions of its norm, trains concept probes
and writes generations. No SAE is read: `decompose@<model>` (flows/decompose.py) takes
the vectors into SAE features. Outputs:

    data/steering/<model>/<concept>/       vector.safetensors, probe.safetensors,
                                           meta.json, evaluation.json
    metrics/steering/<model>.json          headline numbers per concept (DVC metrics)

One MLflow child run per concept, with its figures.
"""

from __future__ import annotations

import sys
from pathlib import Path

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from flows.common import main
from stages.config import flatten, load_params
from stages.io import atomic_dir, write_json
from stages.layout import Layout
from stages.tracking import stage_run

LAYOUT = Layout()


@task(cache_policy=NO_CACHE)
def concept(model, s, hooks, store, cfg, name: str, hashes: dict):
    from stages.steering import run_concept

    return run_concept(model, s, hooks, store, cfg, model_name=name, input_hashes=hashes)


@flow(name="steering")
def steering_flow(name: str) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from stages.activations import ActivationStore
    from stages.models import load_model
    from stages.steering import ConceptConfig, concept_headline, figures, load_sets, write_concept

    params = load_params()
    if params.steering is None or name not in params.steering.models:
        raise KeyError(f"params.yaml: steering.models.{name} is missing, expected the model's "
                       "steering sets and hooks")  # fmt: skip
    st, ms = params.steering, params.steering.models[name]
    torch.manual_seed(st.config.seed)
    sets = load_sets(ms.sets, st.toy_sets.seed, st.toy_sets.n_train, st.toy_sets.n_heldout,
                     f"steering.models.{name}.sets")  # fmt: skip
    model_dir, store_dir = LAYOUT.model(name), LAYOUT.activations(name)
    inputs = {"model": model_dir, "activations": store_dir}
    inputs.update({f"set.{Path(n).stem}": Path(n) for n in ms.sets if n.endswith(".jsonl")})
    logged = {**flatten(st.config, "steering.config."), **flatten(st.toy_sets, "steering.toy_sets."),
              **flatten({"sets": ms.sets, "hooks": ms.hooks}, f"steering.models.{name}.")}  # fmt: skip
    cfg = ConceptConfig(**{**st.config.model_dump(), "multipliers": tuple(st.config.multipliers)})
    with stage_run(f"steering@{name}", logged, inputs) as run:
        model = load_model(model_dir)
        store = ActivationStore(store_dir)
        tags = run.client.get_run(run.run_id).data.tags
        hashes = {k: tags.get(f"input.{k}", "") for k in ("model", "activations")}
        metrics: dict[str, dict] = {}
        out = LAYOUT.steering(name)
        with atomic_dir(out, within=LAYOUT.data) as tmp:
            for cname, s in sets.items():
                r = concept(quote(model), quote(s), ms.hooks, quote(store), cfg, name, hashes)
                write_concept(r, tmp)
                ev = r.evaluation_dict()
                metrics[cname] = concept_headline(ev)
                with run.child(f"{name}/{cname}", {"concept": cname, "set.hash": s.content_hash()},
                               {"atlas.kind": "steering", "steering.model": name}) as child:  # fmt: skip
                    child.metrics({**metrics[cname], "seconds": r.evaluation.get("seconds")})
                    for fname, fig in figures(r).items():
                        child.figure(fig, f"{fname}.png")
                        plt.close(fig)
                m = metrics[cname]
                print(f"steering@{name}: {cname}: best hook {ev['sweep']['best_hook']}, "
                      f"steerability {m['steerability']:.3f} (z {m.get('steerability_z', float('nan')):.1f} "
                      f"against random directions), KL {m['kl']:.3f}, wrong-way "
                      f"{m['wrong_way_fraction']:.2f}")  # fmt: skip
        write_json(LAYOUT.metrics("steering", name), metrics)
        print(f"steering@{name}: {len(sets)} concepts -> {out}/")
    return metrics


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m flows.steering <model-name>")
    main(lambda: steering_flow(sys.argv[1]), f"steering@{sys.argv[1]}")
