"""DVC stage `transfer@<A>__<B>`: does A's steering vector, carried into B, steer B?

    python -m flows.transfer toy-a__toy-b

For every concept both models steered (`steering@A`, `steering@B`), A's vector at each
hook is decomposed into A's SAE features, carried along the Hungarian matches of
`align@<A>__<B>` into B's features and rebuilt with B's decoder
(`stages.alignment.transfer_vector`); it is then tested on B's held-out prompts against
B's own vector and `align.transfer.n_random` random directions, all at the own vector's
norm (`stages.alignment.transfer_steering`). Outputs:

    data/transfer/<A>__<B>/transfer.json   per concept and hook: own / transferred /
                                           random steerability, p (floor 1/(n+1)), z, its
                                           normal tail, Holm over the pair's tests,
                                           fraction of own
    metrics/transfer/<A>__<B>.json         headline numbers (DVC metrics)

Its own stage, so that changing steering re-runs this test and not the alignment pass.
"""

from __future__ import annotations

import re
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


@task(cache_policy=NO_CACHE)
def test_transfer(alignment, vectors_a, vectors_b, saes_a, saes_b, model_b, sets, mults, tp,
                  seed):  # fmt: skip
    from stages.alignment import transfer_steering

    return transfer_steering(alignment, vectors_a, vectors_b, saes_a, saes_b, model_b, sets,
                             mults, method=tp.method, k=tp.k, min_correlation=tp.min_correlation,
                             n_random=tp.n_random, extend_to=tp.extend_to, seed=seed)  # fmt: skip


def read_vectors(folder: Path) -> dict:
    """concept -> hook -> vector, for every concept folder under a steering output."""
    from stages.steering import load_vector

    if not folder.is_dir():
        return {}
    return {p.name: load_vector(p)[0] for p in sorted(folder.iterdir())
            if p.is_dir() and not p.name.startswith(".")}  # fmt: skip


@flow(name="transfer")
def transfer_flow(pair_name: str) -> dict:
    from stages.alignment import transfer_headline
    from stages.models import load_model
    from stages.sae.io import load_model_saes
    from stages.steering import load_sets

    params = load_params()
    if params.align is None or pair_name not in params.align.pairs:
        raise KeyError(f"params.yaml: align.pairs.{pair_name} is missing, expected the pair "
                       "{a: <model>, b: <model>}")  # fmt: skip
    pair, st, tp = params.align.pairs[pair_name], params.steering, params.align.transfer
    a, b = pair.a, pair.b
    lay = Layout()
    alignment, steer_a, steer_b = lay.alignment(pair_name), lay.steering(a), lay.steering(b)
    inputs = {"alignment": alignment, f"steering.{a}": steer_a, f"steering.{b}": steer_b,
              f"saes.{a}": lay.saes(a), f"saes.{b}": lay.saes(b),
              f"model.{b}": lay.model(b)}  # fmt: skip
    logged = {**flatten(tp, "align.transfer."), "align.a": a, "align.b": b}
    out, metrics_file = (
        lay.transfer(pair_name),
        lay.metrics("transfer", pair_name),
    )
    with stage_run(f"transfer@{pair_name}", logged, inputs) as run:
        if st is None or b not in st.models or not steer_a.is_dir() or not steer_b.is_dir():
            transfer = {"skipped": f"no steering vectors for both {a} and {b}"}
        else:
            ts = st.toy_sets
            sets = load_sets(st.models[b].sets, ts.seed, ts.n_train, ts.n_heldout,
                             f"steering.models.{b}.sets")  # fmt: skip
            saes_a, _ = load_model_saes(lay.saes(a))
            saes_b, _ = load_model_saes(lay.saes(b))
            transfer = test_transfer(alignment, quote(read_vectors(steer_a)),
                                     quote(read_vectors(steer_b)), quote(saes_a), quote(saes_b),
                                     quote(load_model(lay.model(b))), quote(sets),
                                     st.config.multipliers, tp, st.config.seed)  # fmt: skip
        with atomic_dir(out) as tmp:
            write_json(tmp / "transfer.json", transfer)
        metrics = transfer_headline(transfer)
        write_json(metrics_file, metrics)
        # MLflow keys allow letters, digits and _-. :/ only
        run.metrics({re.sub(r"[^\w\-. :/]", "-", k): v for k, v in metrics.items()})
        for concept, rows in transfer.get("concepts", {}).items():
            for hook, r in rows.items():
                rnd = r["random"]
                print(f"transfer@{pair_name}: {concept} @ {hook}: steerability in {b} — "
                      f"own {r['own']['steerability']:.3f}, transferred "
                      f"{r['transferred']['steerability']:.3f} (p {r['p_vs_random']:.3f}, "
                      f"Holm {r['p_vs_random_holm']:.3f}, z {r['z_vs_random']:.2f} "
                      f"against {rnd['n']} random: {rnd['steerability']:.3f} ± "
                      f"{rnd['sd']:.3f})")  # fmt: skip
        print(f"transfer@{pair_name}: {len(transfer.get('concepts', {}))} concepts -> {out}/")
    return metrics


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m flows.transfer <A>__<B>")
    main(lambda: transfer_flow(sys.argv[1]), f"transfer@{sys.argv[1]}")
