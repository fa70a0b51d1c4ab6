"""DVC stage `geometry@<model>`: concept geometry against the planted world.

    python -m flows.geometry toy-a

Concept vectors of the corpus's lexical concepts (Park et al. 2024's LDA-style estimator
under the causal inner product) in the unembedding and at every cached hook; their
hierarchical orthogonality, the mammal / bird / fish simplex and the weekday / month
circles, each against a null; and the purity of clusters of SAE decoder directions
(`stages/geometry/`). Outputs:

    data/geometry/<model>/     geometry.json (every test with its null), vectors.npz
    metrics/geometry/<model>.json   per space: each test's statistic, z and p (DVC metrics)
"""

from __future__ import annotations

import re
import sys

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.utilities.annotations import quote

from flows.common import main
from stages.config import flatten, load_params
from stages.io import atomic_dir, write_json
from stages.layout import Layout

LAYOUT = Layout()


@task(cache_policy=NO_CACHE)
def analyse(store, name: str, cfg):
    from stages.geometry.run import model_geometry

    return model_geometry(store, LAYOUT.model(name), LAYOUT.corpus, LAYOUT.saes(name), cfg)


@flow(name="geometry")
def geometry_flow(name: str) -> dict:
    from stages.activations import ActivationStore
    from stages.geometry.run import config_from_params, write_geometry
    from stages.tracking import stage_run

    params = load_params()
    if name not in params.models:
        raise KeyError(f"params.yaml: models.{name} is missing, expected a model of "
                       f"{list(params.models)}")  # fmt: skip
    cfg = config_from_params(params.geometry)
    inputs = {"model": LAYOUT.model(name), "activations": LAYOUT.activations(name),
              "saes": LAYOUT.saes(name), "corpus": LAYOUT.corpus}  # fmt: skip
    inputs = {k: p for k, p in inputs.items() if p.exists()}
    with stage_run(f"geometry@{name}", flatten(params.geometry, "geometry."), inputs) as run:
        store = ActivationStore(LAYOUT.activations(name))
        result = analyse(quote(store), name, cfg)
        out = LAYOUT.geometry(name)
        with atomic_dir(out, within=LAYOUT.data) as tmp:
            write_geometry(result, tmp)
        write_json(LAYOUT.metrics("geometry", name), result.metrics)
        run.metrics({re.sub(r"[^\w\-. :/]", "-", k): v for k, v in flatten(result.metrics).items()
                     if isinstance(v, int | float) and v == v})  # fmt: skip
        run.metrics({f"seconds.{k}": v for k, v in result.seconds.items()})
        run.artifact(out / "geometry.json")
        if isinstance(whole := result.summary.get("skipped"), str):  # the stage as a whole
            print(f"geometry@{name}: skipped: {whole}")
            return result.metrics
        for concept, why in result.summary.get("skipped", {}).items():
            print(f"geometry@{name}: {concept}: skipped ({why})")
        print(f"geometry@{name}: {len(result.summary.get('spaces', {}))} spaces in "
              f"{result.seconds.get('total', 0):.1f} s -> {out}/")  # fmt: skip
    return result.metrics


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m flows.geometry <model-name>")
    main(lambda: geometry_flow(sys.argv[1]), f"geometry@{sys.argv[1]}")
