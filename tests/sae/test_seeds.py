"""SAE seeds: groups that differ only in seed, mean ± sd with a t interval, and the
seed-to-seed overlap by the alignment's Hungarian matching (stages/sae/seeds.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stages.sae.seeds import mean_sd_interval, seed_groups, seed_overlap, seed_report
from tests.alignment._stores import permuted_copy, tiny_topk_sae

BASE = {"architecture": "topk", "k": 4, "expansion_factor": 4, "lr": 0.001}


def test_groups_are_configs_equal_but_for_seed_and_name():
    configs = {
        "topk-k4": {**BASE, "seed": 0, "name": None},
        "topk-k4-s1": {**BASE, "seed": 1, "name": "topk-k4-s1"},
        "topk-k4-s2": {**BASE, "seed": 2, "name": "topk-k4-s2"},
        "topk-k8": {**BASE, "k": 8, "seed": 0, "name": None},  # another config: alone
        "topk-k8-again": {**BASE, "k": 8, "seed": 0, "name": "topk-k8-again"},  # same seed
    }
    assert seed_groups(configs) == {"topk-k4": ["topk-k4", "topk-k4-s1", "topk-k4-s2"]}


def test_mean_sd_and_student_t_interval_match_the_closed_form():
    s = mean_sd_interval([1.0, 2.0, 3.0, float("nan")])  # NaN is left out: n = 3
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, 2) · sd(=1) / sqrt(3)
    assert s["n"] == 3 and s["mean"] == 2.0 and s["sd"] == pytest.approx(1.0)
    assert s["lo"] == pytest.approx(2 - half) and s["hi"] == pytest.approx(2 + half)
    one = mean_sd_interval([5.0])
    assert one["mean"] == 5.0 and math.isnan(one["sd"]) and math.isnan(one["lo"])


def _rows(n: int, d: int, seed: int = 0) -> list[torch.Tensor]:
    x = torch.from_numpy(np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32))
    return list(x.split(500))


def test_a_permuted_copy_is_found_again_and_an_unrelated_sae_is_not():
    a = tiny_topk_sae(16, 48, 4, seed=0)
    perm = np.random.default_rng(1).permutation(48)
    same = seed_overlap(a, permuted_copy(a, perm), _rows(3000, 16))
    assert same["fraction_with_partner_hungarian"] == 1.0
    assert same["mean_matched_corr_hungarian"] == pytest.approx(1.0, abs=1e-6)
    assert same["mean_decoder_cosine_hungarian"] == pytest.approx(1.0, abs=1e-6)
    # rows shuffled against each other: the chance level sits far below
    assert same["null_fraction_with_partner_hungarian"] == 0.0
    assert same["null_mean_matched_corr_hungarian"] < 0.2
    other = seed_overlap(a, tiny_topk_sae(16, 48, 4, seed=7), _rows(3000, 16))
    assert other["fraction_with_partner_hungarian"] < 0.5
    assert other["mean_decoder_cosine_hungarian"] < 0.9


def test_seed_report_summarises_metrics_and_overlap_over_seed_pairs():
    a = tiny_topk_sae(16, 48, 4, seed=0)
    saes = {"s0": a, "s1": permuted_copy(a, np.arange(48)[::-1].copy()), "s2": a}
    configs = {n: {**BASE, "seed": i, "name": n} for i, n in enumerate(saes)}
    flat = {"s0": {"fvu": 0.1}, "s1": {"fvu": 0.2}, "s2": {"fvu": 0.3}}
    rep = seed_report(saes, configs, flat, lambda: iter(_rows(2000, 16)))
    (g,) = rep.values()
    assert g["seeds"] == ["s0", "s1", "s2"] and len(g["overlap_pairs"]) == 3
    assert g["metrics"]["fvu"]["mean"] == pytest.approx(0.2)
    assert g["metrics"]["fvu"]["sd"] == pytest.approx(0.1)
    assert g["overlap"]["fraction_with_partner_hungarian"]["mean"] == 1.0


def test_the_saes_flow_finds_seed_groups_on_a_store(tmp_path):
    """flows.saes._seed_groups: per hook, the groups of SAEs that differ only in seed,
    scored on the store's held-out rows; hooks without a group are left out."""
    from flows.saes import _seed_groups
    from tests.alignment._stores import write_store

    n, hook = 4000, "blocks.0.hook_resid_post"
    x = np.random.default_rng(0).standard_normal((n, 16)).astype(np.float32)
    store = write_store(tmp_path / "store", {hook: x, "blocks.1.hook_resid_post": x},
                        doc_ids=np.arange(n) // 50, char_end=np.arange(n), heldout_start=1000)  # fmt: skip
    a = tiny_topk_sae(16, 48, 4, seed=0)
    trained = {
        hook: {"s0": (a, {**BASE, "seed": 0, "name": None}),
               "s1": (permuted_copy(a, np.arange(48)[::-1].copy()), {**BASE, "seed": 1, "name": "s1"}),
               "k8": (a, {**BASE, "k": 8, "seed": 0, "name": None})},
        "blocks.1.hook_resid_post": {"s0": (a, {**BASE, "seed": 0, "name": None})},
    }  # fmt: skip
    metrics = {hook: {"s0": {"fvu": 0.1, "l0": 4.0}, "s1": {"fvu": 0.3, "l0": 4.0}}}
    out = _seed_groups(trained, metrics, store, max_rows=None)
    assert list(out) == [hook] and list(out[hook]) == ["s0"]
    g = out[hook]["s0"]
    assert g["seeds"] == ["s0", "s1"] and g["metrics"]["fvu"]["mean"] == pytest.approx(0.2)
    (pair,) = g["overlap_pairs"].values()
    assert pair["n_rows"] == 3000 and pair["fraction_with_partner_hungarian"] == 1.0
