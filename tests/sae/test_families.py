"""Latent families across widths (stages/sae/families.py) on a planted hierarchy with a
known answer: animal → classes A, B → species a1, a2, b1, b2, one SAE per level."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from stages.alignment.matching import feature_splitting
from stages.sae.families import (
    WidthInputs,
    ancestors,
    best_latents,
    coactivation,
    families,
    hierarchy_match,
)

SPECIES = {"A": ["a1", "a2"], "B": ["b1", "b2"]}
HIER = {"animal": ["A", "B"], **SPECIES}
NAMES = ["animal", "A", "B", "a1", "a2", "b1", "b2", "other"]
PER = 40  # rows per species; 2 * PER non-animal rows


def _unit(*dims: int, d: int = 8) -> np.ndarray:
    v = np.zeros(d)
    v[list(dims)] = 1.0
    return v / np.linalg.norm(v)


def _world():
    """Rows: PER of each species, then 2·PER non-animal rows split in two kinds; each
    row its own document. Labels [n, NAMES]; which species (or -1, -2) each row is."""
    kind = np.repeat([0, 1, 2, 3, -1, -2], PER)
    lab = np.zeros((len(kind), len(NAMES)), dtype=bool)
    for s in range(4):
        rows = kind == s
        lab[rows, 0] = True
        lab[rows, 1 + s // 2] = True
        lab[rows, 3 + s] = True
    lab[kind < 0, 7] = True
    return kind, lab


def _ladder(kind: np.ndarray) -> list[WidthInputs]:
    """Width 2: animal / other. Width 4: A, B, other, other'. Width 8: the four species,
    then four other latents. Decoders nest: a child's direction is its parent's plus a
    new orthogonal part, so cosine and co-activation agree on every parent."""
    animal, a, b = kind >= 0, (kind == 0) | (kind == 1), (kind == 2) | (kind == 3)
    other = kind < 0

    def codes(cols: list[np.ndarray]) -> sp.csr_matrix:
        return sp.csr_matrix(np.stack(cols, 1).astype(float))

    w0 = WidthInputs("w2", np.stack([_unit(0), _unit(7)]), codes([animal, other]))
    w1 = WidthInputs(
        "w4",
        np.stack([_unit(0, 1), _unit(0, 2), _unit(7), _unit(7, 6)]),
        codes([a, b, kind == -1, kind == -2]),
    )
    spec = [_unit(0, 1, 3), _unit(0, 1, 4), _unit(0, 2, 5), _unit(0, 2, 6)]
    rest = [_unit(7), _unit(7, 6), _unit(7, 5), _unit(7, 4)]
    cols = [kind == s for s in range(4)] + [kind == -1, kind == -2, kind == -1, kind == -2]
    w2 = WidthInputs("w8", np.stack(spec + rest), codes(cols))
    return [w0, w1, w2]


def test_coactivation_is_pearson_and_dead_latents_are_zero():
    rng = np.random.default_rng(0)
    a = np.maximum(rng.normal(size=(200, 5)), 0)
    b = np.maximum(rng.normal(size=(200, 3)), 0)
    a[:, 4] = 0.0  # dead
    rho = coactivation(sp.csr_matrix(a), b)
    want = np.corrcoef(a[:, :4].T, b.T)[:4, 4:]
    assert np.allclose(rho[:4], want, atol=1e-10)
    assert np.all(rho[4] == 0.0)
    assert coactivation(a, a)[2, 2] == pytest.approx(1.0)


def test_best_latents_f1_closed_form():
    # latent 0 fires on rows 0-3, latent 1 on rows 0-1; the concept is rows 0-1
    acts = np.zeros((8, 2))
    acts[:4, 0], acts[:2, 1] = 1.0, 2.0
    lab = np.zeros((8, 1), dtype=bool)
    lab[:2] = True
    best, f1 = best_latents(sp.csr_matrix(acts), lab)
    assert best.tolist() == [1] and f1[0] == pytest.approx(1.0)
    lab[:3] = True  # now latent 0: 2·3 / (4 + 3) ; latent 1: 2·2 / (2 + 3)
    best, f1 = best_latents(acts, lab)
    assert best.tolist() == [0] and f1[0] == pytest.approx(6 / 7)


def test_coactivation_overrides_a_decoy_cosine():
    """Wide latent 0 points closest to narrow latent 1 (cos 0.8 vs 0.6) but fires only
    with narrow latent 0: the combined rule picks 0, the cosine control picks 1."""
    narrow = np.stack([_unit(0), _unit(1)])
    wide = np.array([[0.6, 0.8, 0, 0, 0, 0, 0, 0], _unit(1)])
    fires = np.array([1, 1, 0, 0, 1, 0, 1, 0], dtype=float)
    acts_n = np.stack([fires, 1 - fires], 1)
    acts_w = np.stack([fires * 2.0, 1 - fires], 1)
    rho = coactivation(acts_w, acts_n)
    assert rho[0].tolist() == pytest.approx([1.0, -1.0])
    comb = feature_splitting(narrow, wide, coactivation=rho)
    cos = feature_splitting(narrow, wide)
    assert comb.parent.tolist() == [0, 1] and cos.parent.tolist() == [1, 1]
    assert comb.parent_score[0] == pytest.approx(0.5 * (0.6 + 1.0))
    assert comb.parent_cosine[0] == pytest.approx(0.6)
    with pytest.raises(ValueError, match="coactivation has shape"):
        feature_splitting(narrow, wide, coactivation=rho[:1])


def test_ancestors_follow_links_down():
    parents = [np.array([0, 0, 1, 1]), np.array([3, 2, 1, 0, 0, 1, 2, 3])]
    assert ancestors(parents, 0, 2, np.array([0, 4, 6])).tolist() == [1, 0, 1]
    assert ancestors(parents, 1, 1, np.array([2])).tolist() == [2]


def test_hierarchy_match_and_its_null_closed_form():
    # one parent concept P with 2 children; 2 widths; parent P at latent 0 of width 2,
    # children at wide latents 0 and 1 whose parent is 0; wide latents 2, 3 → parent 1.
    best = np.array([[0, 1, 1], [3, 0, 1]])  # [W, C]: (P, c1, c2)
    parents = [np.array([0, 0, 1, 1])]
    r = hierarchy_match(best, parents, ["P", "c1", "c2"], {"P": ["c1", "c2"]},
                        n_draws=4000, seed=1)  # fmt: skip
    assert (r["k"], r["n"], r["fraction"]) == (2, 2, 1.0)
    # null: each child's shuffled parent is 0 with probability 2/4; both: (2/4)(1/3)
    assert r["null_mean"] == pytest.approx(0.5, abs=0.03)
    assert r["p"] == pytest.approx(1 / 6, abs=0.03)
    assert r["by_gap"][1]["n"] == 2 and 2 not in r["by_gap"]
    broken = hierarchy_match(best, [np.array([1, 1, 0, 0])], ["P", "c1", "c2"],
                             {"P": ["c1", "c2"]}, n_draws=200)  # fmt: skip
    assert broken["fraction"] == 0.0 and broken["p"] == 1.0


def test_families_recovers_the_planted_split():
    kind, lab = _world()
    out = families(_ladder(kind), lab, NAMES, np.arange(len(kind)), HIER, min_positives=5,
                   n_draws=500)  # fmt: skip
    assert out["widths"] == [2, 4, 8]
    w0, w1, w2 = out["per_width"]
    # animal splits: one latent for the whole subtree, then one per class, then per species
    assert [w["distinct_animal_latents"] for w in out["per_width"]] == [1, 2, 4]
    assert w0["concepts"]["animal"]["f1"] == 1.0 and w0["concepts"]["animal"]["latent"] == 0
    assert w1["concepts"]["A"]["f1"] == 1.0 and w2["concepts"]["b2"]["latent"] == 3
    # a species at the class width: its class latent fires on twice its rows, F1 2/3
    assert w1["concepts"]["a1"]["f1"] == pytest.approx(2 / 3)
    m = out["hierarchy_match"]["combined"]
    # every (parent, child) pair at every width pair: 6 pairs × 2 width steps at gap 1.
    # One miss: at width 4 'animal' has split, its best latent is one class's (whichever
    # class has more probe-train rows), so the other class's best latent at width 8 (one
    # of its species) descends from that other class, not from it.
    assert (m["by_gap"][1]["k"], m["by_gap"][1]["n"]) == (11, 12)
    assert (m["by_gap"][2]["k"], m["by_gap"][2]["n"]) == (6, 6)
    other = "B" if w1["concepts"]["animal"]["latent"] == w1["concepts"]["A"]["latent"] else "A"
    miss = [{k: q[k] for k in ("parent", "child", "width_index", "gap")}
            for q in m["pairs"] if not q["match"]]  # fmt: skip
    assert miss == [{"parent": "animal", "child": other, "width_index": 1, "gap": 1}]
    # unsplit: the child's best latent at the wider width is also the parent's. A species
    # at width 4 is read by its class latent (4 pairs); at width 8 a class's best latent is
    # one of its two species' latents, so exactly one species per class is unsplit
    pair = {(q["parent"], q["child"], q["width_index"], q["gap"]): q for q in m["pairs"]}
    assert all(pair[(c, sp_, 0, 1)]["unsplit"] for c, ch in SPECIES.items() for sp_ in ch)
    assert [sum(pair[(c, sp_, 1, 1)]["unsplit"] for sp_ in ch) for c, ch in SPECIES.items()] == [
        1,
        1,
    ]
    # null at gap 1: mean over pairs of children(parent's latent) / m_wide
    # = (6 · 2/4 + 6 · 2/8) / 12 = 0.375
    assert m["by_gap"][1]["null_mean"] == pytest.approx(0.375, abs=0.03)
    assert m["p"] < 0.01
    # unrelated-concept null at gap 1: at width 2 every animal concept is latent 0, so any
    # stand-in matches (6 pairs); at width 4 a class's stand-ins (the other class and its
    # species) never do, a species' four stand-ins once (its sibling): (6 + 4 · 1/4) / 12
    assert m["by_gap"][1]["unrelated_null_mean"] == pytest.approx(7 / 12, abs=0.02)
    assert m["by_gap"][1]["unrelated_p"] < 0.01 and m["by_gap"][2]["unrelated_p"] == 1.0
    # the last 'other' latent at width 8 (direction e7 + e4, firing with width 4's e7 + e6
    # latent) is nearer e7 by cosine (0.71 vs 0.5): the one link where the rules differ
    assert out["links"][0]["agreement_with_cosine"] == 1.0
    assert out["links"][1]["agreement_with_cosine"] == 7 / 8
    assert out["hierarchy_match"]["cosine"]["k"] == m["k"] == 17
    tree = {(t["concept"], t["width_index"]): t for t in out["animal_tree"]}
    assert tree[("a2", 2)]["parent_latent"] == tree[("A", 1)]["latent"]


def test_families_rejects_a_shrinking_ladder():
    kind, lab = _world()
    lad = _ladder(kind)
    with pytest.raises(ValueError, match="increasing width"):
        families(lad[::-1], lab, NAMES, np.arange(len(kind)), HIER)


def test_unrelated_concept_null_closed_form():
    """Parents P, Q with one child each (c1, c2), two widths. c1's unrelated concepts are
    Q and c2 (P is its ancestor), c2's are P and c1, each drawn with probability 1/2."""
    names = ["P", "Q", "c1", "c2"]
    hier = {"P": ["c1"], "Q": ["c2"]}
    parents = [np.array([0, 0, 1, 1])]
    # narrow: P at latent 0, Q at 1, c1 at 0, c2 at 0; wide: c1 at 0 (parent 0), c2 at 2
    # (parent 1). Observed: both match. Null: c1 matches when c2 is drawn (its narrow
    # latent is 0 too), never with Q; c2 (ancestor 1) matches neither P nor c1 (both 0).
    best = np.array([[0, 1, 0, 0], [3, 2, 0, 2]])
    r = hierarchy_match(best, parents, names, hier, n_draws=4000, seed=2)
    assert r["fraction"] == 1.0
    assert r["unrelated_null_mean"] == pytest.approx(0.25, abs=0.02)
    assert r["unrelated_p"] == pytest.approx(1 / 4001)
    # splits only: c1's wide latent 0 is not P's wide best (3), a split; c2 shares Q's
    # wide latent 2, persistence. Null: c1 with stand-in c2 (wide latent 2 ≠ 0) is a split
    assert r["k_unsplit"] == 1 and r["split_fraction"] == 0.5
    assert r["split_unrelated_null_mean"] == pytest.approx(0.25, abs=0.02)
    assert r["split_unrelated_p"] == pytest.approx(0.5, abs=0.03)
    # every concept read by one narrow latent: any concept "matches", the null says so
    same = np.array([[0, 0, 0, 0], [3, 2, 0, 1]])
    r = hierarchy_match(same, parents, names, hier, n_draws=500)
    assert r["fraction"] == 1.0 and r["unrelated_null_mean"] == 1.0 and r["unrelated_p"] == 1.0
    # ...while the shuffled-links null still calls it significant: links are informative
    assert r["p"] < 0.5
