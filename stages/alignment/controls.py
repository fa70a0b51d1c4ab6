"""Untrained-model controls for the dense similarity measures: what architecture alone gives.

Two models of the same architectures, randomly initialised (each with its own model's
seed, as `stages.models.build_toy_model` builds it before training), already score a
CKA or an SVCCA well above 0 on the same tokens: token embeddings and random attention
mixing give any two such models a shared geometry (Kornblith et al. 2019, "Similarity of
Neural Network Representations Revisited", §6.1, compare CKA between networks at
initialisation; Raghu et al. 2017, SVCCA, §4). The trained pair's similarity means
something only beside these controls, measured by the same measures on the same rows:

- `untrained`: (untrained A, untrained B);
- `trained_vs_untrained`: (trained A, untrained B).

Each is a `PermutationTest` (same permutations, seed, k and SVCCA variance as the trained
pair's), on the row subsample the trained pair's O(n²) measures use. Linear CKA of the
trained pair is exact over every aligned token; `trained_subsample` is its value on the
subsample, the one comparable with the controls.

SAE-latent measures (partner fraction, matched correlations) would need SAEs trained on the
untrained models' activations: not done here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from stages.alignment.similarity import (
    METRICS,
    PermutationTest,
    linear_cka,
    pair_name,
    permutation_test,
    shared_per_representation,
)

CONTROLS = ("untrained", "trained_vs_untrained")


def check_control_metrics(metrics: Sequence[str]) -> None:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"align: control_metrics has {unknown}, expected some of {list(METRICS)}")


def untrained_controls(
    trained_a: Mapping[str, np.ndarray],
    untrained_a: Mapping[str, np.ndarray],
    untrained_b: Mapping[str, np.ndarray],
    hook_pairs: Sequence[tuple[str, str]],
    *,
    n_permutations: int,
    seed: int,
    k: int = 10,
    metrics: Sequence[str] = METRICS,
    trained_b: Mapping[str, np.ndarray] | None = None,
) -> dict[str, dict[str, dict[str, PermutationTest | float]]]:
    """Per compared hook pair ("h" or "ha~hb"), per measure of `metrics`: the `untrained`
    and `trained_vs_untrained` PermutationTests, and (given `trained_b`, with linear CKA
    among the metrics) the trained pair's linear CKA on these rows as
    `trained_subsample`. Every array holds the same rows in the same order ([n, d] per
    hook)."""
    check_control_metrics(metrics)
    out: dict[str, dict[str, dict[str, PermutationTest | float]]] = {}
    with shared_per_representation():
        for ha, hb in hook_pairs:
            name = pair_name(ha, hb)
            xa, ua, ub = (np.asarray(d[h], dtype=np.float64) for d, h in
                          ((trained_a, ha), (untrained_a, ha), (untrained_b, hb)))  # fmt: skip
            if not (len(xa) == len(ua) == len(ub)):
                raise ValueError(f"untrained controls at {name}: {len(xa)}, {len(ua)} and "
                                 f"{len(ub)} rows, expected the same rows")  # fmt: skip
            cells: dict[str, dict[str, PermutationTest | float]] = {}
            for m in metrics:
                cells[m] = {
                    c: permutation_test(x, y, m, n_permutations=n_permutations, seed=seed, k=k)
                    for c, (x, y) in zip(CONTROLS, ((ua, ub), (xa, ub)), strict=True)
                }
            if trained_b is not None and "linear_cka" in cells:
                cells["linear_cka"]["trained_subsample"] = linear_cka(
                    xa, np.asarray(trained_b[hb], dtype=np.float64)
                )
            out[name] = cells
    return out


def control_scores(controls: Mapping[str, Mapping[str, Mapping[str, object]]]) -> dict[str, float]:
    """Flat keys for scores.json / metrics: `{metric}_{control}/{pair}` (its statistic),
    `..._p` (permutation p, floor 1/(1 + n_permutations)) and `..._z`, and
    `linear_cka_subsample/{pair}` (the trained pair on the controls' rows)."""
    out: dict[str, float] = {}
    for name, cells in controls.items():
        for m, tests in cells.items():
            for c in CONTROLS:
                t = tests[c]
                assert isinstance(t, PermutationTest)
                out[f"{m}_{c}/{name}"] = t.statistic
                out[f"{m}_{c}_p/{name}"] = t.p_value
                out[f"{m}_{c}_z/{name}"] = t.z
            if "trained_subsample" in tests:
                out[f"{m}_subsample/{name}"] = float(tests["trained_subsample"])  # type: ignore[arg-type]
    return out
