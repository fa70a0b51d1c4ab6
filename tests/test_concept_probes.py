"""Dense concept probes (stages/concept_probes.py) on a constructed store whose answers
are known: a document-level concept written into one direction of the activations (no
token names it), a lexical concept that is a token identity, and the controls."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stages.concept_probes import (
    best_threshold,
    contextual_wins,
    f1_score,
    fit_probes,
    probe_concepts,
)
from tests.alignment._stores import write_store


def test_best_threshold_and_f1_closed_forms():
    thr, f1 = best_threshold(np.array([3.0, 2.0, 1.0, 0.0]), np.array([1, 1, 0, 0]))
    assert (thr, f1) == (1.5, 1.0)
    # tied scores cannot be split: the best cut takes both tied rows (tp 2 of 3 predicted)
    thr, f1 = best_threshold(np.array([2.0, 1.0, 1.0, 0.0]), np.array([1, 1, 0, 0]))
    assert f1 == pytest.approx(max(2 * 1 / (1 + 2), 2 * 2 / (3 + 2)))
    assert f1_score(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0])) == 0.5
    assert f1_score(np.zeros(3), np.zeros(3)) == 0.0


def _reference_objective(x, y, w, b, l2):
    """The probes' objective per column through torch's own loss, in raw coordinates:
    positive-weighted BCE averaged over rows + l2·‖w‖² with w on standardised x."""
    x, y = x.double(), y.double()
    sd = x.std(0).clamp_min(1e-6)
    pos = y.sum(0)
    pw = ((len(y) - pos) / pos.clamp_min(1)).clamp_min(1e-3)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(
        x @ w + b, y, pos_weight=pw, reduction="none").mean(0)  # fmt: skip
    return loss + l2 * ((w * sd[:, None]) ** 2).sum(0)


def _problem(seed=0):
    # unbalanced columns (pos_weight 1 to ~30), one nearly separable, features on
    # different scales and off-centre
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3000, 12, generator=g) * torch.linspace(0.5, 3.0, 12) + 1.0
    s = x @ torch.randn(12, 3, generator=g)
    y = (s > torch.tensor([0.0, 4.0, 8.0])).double()
    y[:, 0] = (s[:, 0] + 0.5 * torch.randn(3000, generator=g) > 0).double()
    return x, y


def test_probes_reach_the_optimum_of_the_weighted_logistic_loss():
    x, y = _problem()
    w, b = fit_probes(x, y, l2=1e-3)
    # stationarity of the reference objective (autograd through torch's BCE): the
    # optimum of a strictly convex loss, whatever solver found it
    wg, bg = w.clone().requires_grad_(), b.clone().requires_grad_()
    _reference_objective(x, y, wg, bg, 1e-3).sum().backward()
    assert wg.grad.abs().max() < 1e-7 and bg.grad.abs().max() < 1e-7
    # and no lower than what a long LBFGS run on the reference objective reaches
    w2 = torch.zeros_like(w, requires_grad=True)
    b2 = torch.zeros_like(b, requires_grad=True)
    opt = torch.optim.LBFGS([w2, b2], max_iter=500, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-15)  # fmt: skip

    def closure():
        opt.zero_grad()
        total = _reference_objective(x, y, w2, b2, 1e-3).sum()
        total.backward()
        return total

    opt.step(closure)
    ours = _reference_objective(x, y, w, b, 1e-3)
    lbfgs = _reference_objective(x, y, w2.detach(), b2.detach(), 1e-3)
    assert (ours <= lbfgs + 1e-10).all()
    assert (w.abs() > 1e-2).any()  # it moved


def _world(tmp_path, seed: int = 0):
    rng = np.random.default_rng(seed)
    n_docs, per_doc, d = 200, 30, 24
    n = n_docs * per_doc
    doc_ids = np.repeat(np.arange(n_docs), per_doc)
    past = rng.random(n_docs) < 0.3  # a document property, prevalence 0.3
    tokens = rng.integers(0, 20, n)  # token identity is independent of it
    x = rng.standard_normal((n, d)).astype(np.float32)
    x[:, 0] += np.where(past[doc_ids], 3.0, -3.0)  # ... and the model writes it here
    emb = rng.standard_normal((20, d)).astype(np.float32)
    x[:, 1:] += emb[tokens, 1:]
    labels = np.stack([past[doc_ids], np.isin(tokens, [1, 2])], 1).astype(np.uint8)
    return write_store(
        tmp_path / "store", {"blocks.0.hook_resid_post": x}, doc_ids=doc_ids,
        char_end=np.arange(n) + 1, token_ids=tokens, heldout_start=n - 60 * per_doc,
        concept_labels=labels, concept_names=["doc_past", "mammal"],
    )  # fmt: skip


def test_a_probe_reads_a_contextual_concept_that_no_token_names(tmp_path):
    table = probe_concepts(_world(tmp_path))
    ctx, lex = table["concepts"]["doc_past"], table["concepts"]["mammal"]
    assert ctx["kind"] == "contextual" and lex["kind"] == "lexical"
    p = ctx["prevalence"]
    # a lookup of an independent label does no better than "always yes": F1 2p / (1 + p)
    assert ctx["lexical_f1"] == pytest.approx(2 * p / (1 + p), abs=0.05)
    assert ctx["best_f1"] > 0.97 and ctx["lift"] > 0.4
    # the shuffled-label control sits at chance, ~ 2p / (1 + p)
    assert max(ctx["null_f1"].values()) < 2 * p / (1 + p) + 0.05
    # a token identity: the lookup is exact, and the probe recovers it from the embedding
    assert lex["lexical_f1"] == 1.0 and lex["best_f1"] > 0.9
    assert contextual_wins(table) == ["doc_past"]
    assert table["n_heldout_rows"] == 60 * 30 and table["skipped"] == []


def test_rare_concepts_are_skipped_not_scored(tmp_path):
    store = _world(tmp_path)
    table = probe_concepts(store, min_positives=10_000)
    assert table["concepts"] == {} and table["skipped"] == ["doc_past", "mammal"]
