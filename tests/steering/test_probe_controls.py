"""The concept probes' untrained-model control (stages/concept_probes.py) on a real tiny
model and store: `model_rows` re-computes exactly the rows the store cached, and the
control adds its F1 beside the trained probe's."""

from __future__ import annotations

import numpy as np
import pytest

from stages.concept_probes import model_rows, probe_concepts, probe_untrained
from tests.steering.conftest import HOOKS


def test_model_rows_are_the_cached_rows(tiny_model, tiny_store):
    for split in ("train", "heldout"):
        got = model_rows(tiny_model, tiny_store, split, HOOKS, max_rows=100)
        lo, _ = tiny_store.split_range(split)
        for h in HOOKS:
            cached = np.asarray(tiny_store.array(h)[lo : lo + 100])
            assert got[h].shape == cached.shape
            assert got[h].dtype == cached.dtype  # the store's precision
            np.testing.assert_allclose(got[h], cached, rtol=2e-3, atol=2e-3)


@pytest.mark.slow
def test_untrained_control_sits_beside_every_probe(tiny_model, tiny_store):
    table = probe_concepts(tiny_store, min_positives=5)
    probe_untrained(table, tiny_store, tiny_model)  # the store's own model: the same F1
    assert table["concepts"]
    for row in table["concepts"].values():
        assert set(row["untrained_f1"]) == set(row["probe_f1"])
        for h, f1 in row["probe_f1"].items():
            assert abs(row["untrained_f1"][h] - f1) < 0.02  # up to float16 rounding
        assert row["untrained_best_f1"] == max(row["untrained_f1"].values())
