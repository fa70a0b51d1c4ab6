"""Concept labels per stored token: the corpus's labelled character spans mapped onto
the store's rows (`concept_labels`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pyarrow as pa


def token_concept_labels(
    doc_ids: np.ndarray,
    char_start: np.ndarray,
    char_end: np.ndarray,
    labels: pa.Table,
    concept_names: list[str],
) -> np.ndarray:
    """uint8 [n_rows, n_concepts]: 1 where a token's span overlaps a labelled span.

    Vectorised: rows and label spans are mapped into one global character axis
    (document d occupies [d * stride, d * stride + len)), where rows are sorted, so each
    span's rows are found with two searchsorted calls and marked with a difference array.
    """
    n, k = len(doc_ids), len(concept_names)
    out = np.zeros((n, k), np.uint8)
    if n == 0 or k == 0 or labels.num_rows == 0:
        return out
    stride = np.int64(max(int(char_end.max()), int(labels.column("char_end").to_numpy().max())) + 2)
    # The separator row opening a document has an empty span: it must match nothing.
    empty = char_end <= char_start
    g_start = doc_ids.astype(np.int64) * stride + char_start
    g_end = doc_ids.astype(np.int64) * stride + char_end
    g_end[empty] = g_start[empty]
    # Held-out rows follow the training rows, so sort (stably) onto the global axis.
    order = np.argsort(g_start, kind="stable")
    g_start, g_end = g_start[order], g_end[order]
    if np.any(np.diff(g_end) < 0):
        raise ValueError("token spans overlap out of order; cannot map labels to tokens")
    col = {c: i for i, c in enumerate(concept_names)}
    l_doc = labels.column("doc_id").to_numpy().astype(np.int64)
    l_s = l_doc * stride + labels.column("char_start").to_numpy()
    l_e = l_doc * stride + labels.column("char_end").to_numpy()
    l_c = np.array([col.get(c, -1) for c in labels.column("concept").to_pylist()])
    keep = l_c >= 0
    l_s, l_e, l_c = l_s[keep], l_e[keep], l_c[keep]
    # Rows overlapping [s, e) are those with g_end > s and g_start < e: a contiguous
    # range, since both g_start and g_end are non-decreasing. Empty rows are cleared after.
    i0 = np.searchsorted(g_end, l_s, side="right")
    i1 = np.searchsorted(g_start, l_e, side="left")
    valid = i1 > i0
    diff = np.zeros((n + 1, k), np.int32)
    np.add.at(diff, (i0[valid], l_c[valid]), 1)
    np.add.at(diff, (i1[valid], l_c[valid]), -1)
    out[order] = np.cumsum(diff[:-1], axis=0) > 0
    out[empty] = 0
    return out
