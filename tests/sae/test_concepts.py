"""SAEBench-style ground truth (stages/sae/concepts.py) against constructed cases whose
answer is known exactly: separable concepts, a lexical concept, planted absorption."""

import math

import numpy as np
import pytest
import torch

from stages.sae import concepts as C


def test_best_thresholds_and_f1_closed_forms():
    s = torch.tensor([[0.9], [0.8], [0.3], [0.1]], dtype=torch.float64)
    y = torch.tensor([[1], [0], [1], [0]]).bool()
    t, f1 = C.best_thresholds(s, y)
    # cuts: top1 F1 2/3, top2 1/2, top3 4/5, all 2/3 -> best keeps the top 3
    assert float(f1[0]) == pytest.approx(0.8) and 0.1 < float(t[0]) < 0.3
    boot = C.Bootstrap.of(np.arange(4), n_boot=50)
    r = C.f1_with_interval(s > t, y, boot)
    assert float(r["precision"][0]) == pytest.approx(2 / 3) and float(r["recall"][0]) == 1.0
    yy = y.repeat(25, 1)
    perfect = C.f1_with_interval(yy, yy, C.Bootstrap.of(np.arange(100), n_boot=50))
    assert float(perfect["f1"][0]) == float(perfect["lo"][0]) == float(perfect["hi"][0]) == 1.0


def test_split_keeps_documents_whole_and_is_seeded():
    groups = np.repeat(np.arange(40), 7)
    tr = C.split_by_group(groups, seed=3)
    assert tr.sum() == 20 * 7
    for g in range(40):
        assert len(set(tr[groups == g])) == 1
    assert (C.split_by_group(groups, seed=3) == tr).all()
    assert not (C.split_by_group(groups, seed=4) == tr).all()


def test_wilson_interval_closed_form():
    lo, hi = C.wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert all(math.isnan(v) for v in C.wilson(0, 0))


def _world(n=6000, seed=0):
    """Rows with a parent concept (40 %) of three children, a lexical concept read off the
    token id, and a noise concept. Three rare children (4 % of the parent's rows each) are
    absorbed: on their rows the parent latent is silent and the child's latent, whose
    decoder is (e_parent + e_child) / sqrt 2, carries the parent direction."""
    rng = np.random.default_rng(seed)
    d = 8
    groups = np.repeat(np.arange(n // 20), 20)
    parent = rng.random(n) < 0.4
    kind = rng.choice(4, n, p=[0.04, 0.04, 0.04, 0.88])  # 0-2 absorbed children, 3 the rest
    tok = rng.integers(0, 50, n)
    lexical = tok < 5
    noise = rng.random(n) < 0.2
    x = rng.standard_normal((n, d)) * 0.05
    x[:, 0] += parent
    for c in range(3):
        x[:, 1 + c] += parent & (kind == c)
    x[:, 4] += 2.0 * (parent & (kind == 3))  # not used by any latent: the other child
    x[:, 5] += lexical
    labels = np.stack([parent, *(parent & (kind == c) for c in range(3)), lexical, noise], 1)
    names = ["parent", "child0", "child1", "child2", "lex", "noise"]
    # SAE: latent 0 parent (silent on absorbed rows), 1-3 absorbing children, 4 lexical,
    # 5-7 random noise latents
    w_dec = torch.zeros(8, d, dtype=torch.float64)
    w_dec[0, 0] = 1.0
    for c in range(3):
        w_dec[1 + c, 0] = w_dec[1 + c, 1 + c] = 2**-0.5
    w_dec[4, 5] = 1.0
    w_dec[5:, 6:] = torch.eye(2, dtype=torch.float64)[[0, 1, 0]]
    acts = torch.zeros(n, 8, dtype=torch.float64)
    absorbed = parent & (kind < 3)
    acts[:, 0] = torch.from_numpy((parent & ~absorbed).astype(float))
    for c in range(3):
        acts[:, 1 + c] = torch.from_numpy((parent & (kind == c)) * 2**0.5)
    acts[:, 4] = torch.from_numpy(lexical.astype(float))
    acts[:, 5:] = torch.from_numpy(rng.random((n, 3)) * (rng.random((n, 3)) < 0.3))
    return (torch.from_numpy(x), labels, names, groups, tok, acts, w_dec,
            absorbed)  # fmt: skip


def test_ksparse_probing_dense_probe_and_lexical_on_a_constructed_world():
    x, labels, names, groups, tok, acts, w_dec, _ = _world()
    base = C.concept_baselines(x, labels, names, groups, tok, {"parent": names[1:4]})
    assert base.names == names
    dense = dict(zip(names, base.dense["f1"].tolist(), strict=True))
    lex = dict(zip(names, base.lexical["f1"].tolist(), strict=True))
    # the activations carry parent, children and lex linearly; tokens carry only lex
    for c in ("parent", "child0", "lex"):
        assert dense[c] == pytest.approx(1.0)
    assert lex["lex"] == pytest.approx(1.0) and lex["parent"] < 0.7
    assert dense["noise"] < 0.5 and lex["noise"] < 0.5
    probes = C.ksparse_probing(acts, base)
    f1 = {k: dict(zip(names, probes[k]["f1"].tolist(), strict=True)) for k in probes}
    latents = {k: probes[k]["latents"] for k in probes}
    assert int(latents[1][names.index("lex")][0]) == 4  # mean difference finds the latent
    assert f1[1]["lex"] == pytest.approx(1.0)
    assert int(latents[1][0][0]) == 0  # the parent latent ranks first for the parent ...
    assert 0.9 < f1[1]["parent"] < 0.97  # ... but misses the absorbed 12 %
    assert f1[5]["parent"] == pytest.approx(1.0)  # with the children's latents it is whole
    for k in probes:  # an interval around each score
        assert (probes[k]["lo"] <= probes[k]["f1"] + 1e-12).all()
        assert (probes[k]["f1"] <= probes[k]["hi"] + 1e-12).all()


def test_absorption_rate_equals_the_planted_share():
    x, labels, names, groups, tok, acts, w_dec, absorbed = _world()
    base = C.concept_baselines(x, labels, names, groups, tok, {"parent": names[1:4]})
    probes = C.ksparse_probing(acts, base)
    out = C.absorption(acts, x, w_dec, torch.zeros(x.shape[1]), base, probes)["parent"]
    test = ~base.train
    parent = labels[:, 0]
    want = absorbed[test & parent].mean()  # every parent row is read right by the probe
    assert out["main_latents"] == [0]  # no single child adds 0.03 F1: not a split
    assert out["n_tokens"] == int((test & parent).sum())
    assert out["rate"] == pytest.approx(want, abs=1e-12)
    assert out["main_miss_rate"] == pytest.approx(want, abs=1e-12)
    assert out["lo"] < want < out["hi"]
    for c in ("child0", "child1", "child2"):
        assert out["children"][c]["rate"] == 1.0  # each absorbed child is absorbed always
    assert out["random_direction_rate"] < want  # in 8 dimensions a random direction is close
    # an SAE without absorption: the parent latent fires on every parent row
    fixed = acts.clone()
    fixed[:, 0] = torch.from_numpy(parent.astype(float))
    probes = C.ksparse_probing(fixed, base)
    assert C.absorption(fixed, x, w_dec, torch.zeros(8), base, probes)["parent"]["rate"] == 0.0


def test_summary_json_has_tables_and_intervals():
    x, labels, names, groups, tok, acts, w_dec, _ = _world(n=2000)
    base = C.concept_baselines(x, labels, names, groups, tok, {"parent": names[1:4]})
    probes = C.ksparse_probing(acts, base)
    absorb = C.absorption(acts, x, w_dec, torch.zeros(8), base, probes)
    best = {"lex": {"best_latent": 4, "f1": 1.0, "precision": 1.0, "recall": 1.0}}
    out = C.summarise(base, probes, absorb, best, {"noise": "contextual"})
    s = out["summary"]
    assert set(s) >= {"k1_f1", "k20_f1", "dense_f1", "lexical_f1", "k5_f1_contextual"}
    assert s["k1_f1"]["lo"] <= s["k1_f1"]["mean"] <= s["k1_f1"]["hi"]
    assert out["concepts"]["lex"]["best_latent"]["latent"] == 4
    assert out["concepts"]["lex"]["k1"]["latents"] == [4]
    assert out["n_train_rows"] + out["n_test_rows"] == 2000
