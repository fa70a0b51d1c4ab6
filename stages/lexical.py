"""The lexical baseline of a concept: the best F1 of any token-id lookup.

A lookup is a set S of token ids (or word types); it predicts the concept wherever the
current unit is in S. Among all sets, the best F1 is reached by a set of the form "every
unit whose precision P(concept | unit) is at least a threshold" (F1 is a ratio that only
grows by adding a unit whose precision exceeds the current F1 / 2), so sorting units by
precision and scanning the prefixes finds it exactly.

    best_f1, ids = lexical_baseline_one(token_ids, labels[:, j])
    table = lexical_baseline(token_ids, labels, concept_names)   # {concept: {...}}

A concept with F1 near 1 is a token identity; a ground-truth score (probe, SAE latent)
on it says little beyond that. Report scores as lift over this baseline.
"""

from __future__ import annotations

import numpy as np


def lexical_baseline_one(unit_ids: np.ndarray, label: np.ndarray) -> tuple[float, np.ndarray]:
    """Best F1 of any lookup `unit_id in S` against the boolean `label`, and that S.

    `unit_ids`: int [n] (token ids, or word-type indices); `label`: bool/0-1 [n].
    A concept that never occurs has F1 0 and an empty S.
    """
    unit_ids = np.asarray(unit_ids).astype(np.int64).ravel()
    ids, inv = np.unique(unit_ids, return_inverse=True)
    return _best_lookup(ids, inv, label)


def _best_lookup(ids: np.ndarray, inv: np.ndarray, label: np.ndarray) -> tuple[float, np.ndarray]:
    label = np.asarray(label).astype(bool).ravel()
    if inv.shape != label.shape:
        raise ValueError(f"lexical_baseline: {inv.shape[0]} ids but {label.shape[0]} labels")
    n_pos = int(label.sum())
    if n_pos == 0:
        return 0.0, np.zeros(0, np.int64)
    total = np.bincount(inv, minlength=len(ids)).astype(np.float64)
    pos = np.bincount(inv, weights=label, minlength=len(ids))
    order = np.argsort(-(pos / total), kind="stable")
    tp, pred = np.cumsum(pos[order]), np.cumsum(total[order])
    f1 = 2 * tp / (pred + n_pos)
    best = int(np.argmax(f1))
    return float(f1[best]), ids[order[: best + 1]]


def lexical_baseline(unit_ids: np.ndarray, labels: np.ndarray, concept_names: list[str]) -> dict:
    """Per concept (columns of `labels` [n, k]): best lookup F1, its size, and prevalence."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.shape[1] != len(concept_names):
        raise ValueError(
            f"lexical_baseline: labels of shape {labels.shape}, expected [n, {len(concept_names)}]"
        )
    uniq, inv = np.unique(np.asarray(unit_ids).astype(np.int64).ravel(), return_inverse=True)
    out = {}
    for j, name in enumerate(concept_names):
        f1, ids = _best_lookup(uniq, inv, labels[:, j])
        out[name] = {
            "f1": round(f1, 6),
            "n_lookup_units": int(len(ids)),
            "prevalence": round(float(labels[:, j].astype(bool).mean()), 6),
        }
    return out


def store_lexical_baseline(store, split: str = "heldout") -> dict:
    """Token-level lexical baseline of every concept of an activation store
    (`stages.activations.ActivationStore`: its row-aligned `token_ids` and
    `concept_labels`) on one split ('train' | 'heldout' | 'all')."""
    if not store.concept_names:
        raise ValueError(f"{store.path}: the store has no concept labels (an unlabelled corpus)")
    return lexical_baseline(
        store.read("token_ids", split), store.read("concept_labels", split), store.concept_names
    )
