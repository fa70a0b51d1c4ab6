"""Steering along the simplex (stages/geometry/steer.py) on the real tiny model: the
sentences it builds point at the noun and the verbs, a zero edge changes nothing, and
the control is a distribution of same-norm random directions."""

from __future__ import annotations

import numpy as np
import pytest

from stages.corpus import ANIMALS, MOVES, generate_story
from stages.geometry.steer import sentences, simplex_steering


@pytest.fixture(scope="module")
def texts():
    return [generate_story(11, i)[0] for i in range(150)]


def test_sentences_point_at_the_noun_and_the_two_classes_verbs(tiny_model, texts):
    tok = tiny_model.tokenizer
    sents = sentences(tok, texts, "mammal", "bird", tiny_model.cfg.n_ctx, max_sites=20)
    assert len(sents) == 20
    mammals = {f for forms in ANIMALS["mammal"].values() for f in forms}
    first = {c: {tok(" " + f, add_special_tokens=False)["input_ids"][0]
                 for v in MOVES[c] for f in v} for c in MOVES}  # fmt: skip
    for s in sents:
        assert tok.decode([s.tokens[i] for i in s.noun]).strip() in mammals
        assert set(s.target) <= first["bird"] and set(s.source) <= first["mammal"]
        assert len(s.target) == len(s.source) == 3  # one form of each class's three verbs


def test_a_zero_edge_does_nothing_and_the_null_has_its_floor(tiny_model, texts):
    d = tiny_model.cfg.d_model
    rng = np.random.default_rng(0)
    same = rng.standard_normal(d).astype(np.float32)
    sents = sentences(tiny_model.tokenizer, texts, "mammal", "bird", tiny_model.cfg.n_ctx, 16)
    r = simplex_steering(tiny_model, sents, "blocks.0.hook_resid_post",
                         {"mammal": same, "bird": same}, n_random=8)  # fmt: skip
    assert r["edge_norm"] == 0 and r["effect"] == pytest.approx(0.0, abs=1e-9)
    assert r["flip_rate"] == 0 and r["p_floor"] == pytest.approx(1 / 9)
    edge = {"mammal": np.zeros(d, np.float32), "bird": 3 * same}
    r = simplex_steering(tiny_model, sents, "blocks.0.hook_resid_post", edge, n_random=8)
    assert r["n_sentences"] == 16 and r["edge_norm"] == pytest.approx(3 * np.linalg.norm(same))
    assert r["p"] >= r["p_floor"] and r["null_sd"] > 0 and np.isfinite(r["z"])
    assert r["effect_ci95"][0] <= r["effect"] <= r["effect_ci95"][1]
