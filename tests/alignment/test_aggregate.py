"""Aggregates over model pairs (stages/alignment/aggregate.py) on synthetic metric dicts,
against closed forms: mean / sample sd, Holm over the whole family, the Wilson interval."""

import json
import math

import pytest

from stages.alignment.aggregate import pair_kind, summarise, transfer_aggregate, universality_rows
from stages.report.alignment import aggregate_html, aligned_pairs

H = "blocks.1.hook_resid_post"
S = f"{H}/topk-1024-k16"


def _scores(cka, untrained, tvu, partner, jac, chance):
    return {f"linear_cka/{H}": cka + 0.01, f"linear_cka_subsample/{H}": cka,
            f"linear_cka_untrained/{H}": untrained, f"linear_cka_trained_vs_untrained/{H}": tvu,
            f"mutual_knn/{H}": 0.3, f"{S}/fraction_with_partner": partner,
            f"{S}/mean_jaccard_hungarian": jac, f"{S}/mean_jaccard_all_pairs": chance,
            f"{S}/mean_matched_corr_hungarian": 0.4, "p_floor": 0.0099}  # fmt: skip


PAIRS = {"a__b": _scores(0.8, 0.3, 0.1, 0.30, 0.6, 0.1),
         "a__c": _scores(0.6, 0.5, 0.2, 0.40, 0.5, 0.2),
         "b__c": _scores(0.7, 0.4, 0.3, 0.35, 0.7, 0.3)}  # fmt: skip


def test_summarise_is_mean_and_sample_sd():
    s = summarise([1.0, 2.0, 3.0, None, float("nan")])
    assert (s.mean, s.sd, s.n) == (2.0, 1.0, 3)
    one = summarise([5.0])
    assert one.mean == 5.0 and math.isnan(one.sd) and one.n == 1
    assert summarise([]).n == 0


def test_universality_rows_mean_sd_across_pairs_beside_controls():
    rows = {(r.key, r.where): r for r in universality_rows(PAIRS)}
    sub = rows[("linear_cka_subsample", H)]
    assert sub.trained.mean == pytest.approx(0.7) and sub.trained.sd == pytest.approx(0.1)
    assert sub.trained.n == 3
    assert sub.untrained.mean == pytest.approx(0.4) and sub.untrained.sd == pytest.approx(0.1)
    assert sub.trained_vs_untrained.mean == pytest.approx(0.2)
    # the exact CKA has no control of its own; mutual kNN has none in these dicts
    assert rows[("linear_cka", H)].untrained is None
    assert rows[("mutual_knn", H)].trained.sd == pytest.approx(0.0)
    assert rows[("mutual_knn", H)].untrained is None
    partner = rows[("fraction_with_partner", S)]
    assert partner.trained.mean == pytest.approx(0.35) and partner.reference is None
    assert partner.trained.sd == pytest.approx(0.05)
    jac = rows[("mean_jaccard_hungarian", S)]
    assert jac.trained.mean == pytest.approx(0.6) and jac.trained.sd == pytest.approx(0.1)
    assert jac.reference.mean == pytest.approx(0.2)
    assert jac.reference_label == "all latent pairs (chance)"
    assert ("p_floor", "") not in rows and len(rows) == 6


def test_control_pairs_fill_the_sae_measures_untrained_columns():
    """Pairs with an untrained model (meta.json `trained`) are not averaged with the
    trained pairs: their SAE measures become the controls beside them."""
    assert pair_kind({"toy-a": True, "toy-b": True}) == "trained" == pair_kind(None)
    assert pair_kind({"toy-u0": False, "toy-u1": False}) == "untrained"
    assert pair_kind({"toy-a": True, "toy-u1": False}) == "trained_vs_untrained"
    scores = {**PAIRS, "u0__u1": {f"{S}/fraction_with_partner": 0.05},
              "a__u1": {f"{S}/fraction_with_partner": 0.09},
              "b__u0": {f"{S}/fraction_with_partner": 0.11}}  # fmt: skip
    kinds = {"u0__u1": "untrained", "a__u1": "trained_vs_untrained",
             "b__u0": "trained_vs_untrained"}  # fmt: skip
    rows = {(r.key, r.where): r for r in universality_rows(scores, kinds)}
    partner = rows[("fraction_with_partner", S)]
    assert partner.trained.mean == pytest.approx(0.35) and partner.trained.n == 3
    assert partner.untrained.mean == pytest.approx(0.05) and partner.untrained.n == 1
    assert partner.trained_vs_untrained.mean == pytest.approx(0.10)
    assert partner.trained_vs_untrained.sd == pytest.approx(0.02**0.5 / 10)
    assert len(rows) == 6  # the control pairs add no rows of their own


def test_cross_tokenizer_pairs_have_their_own_column_and_join_the_transfer_family(tmp_path):
    """Trained pairs whose rows pair on character spans (token_rule "char_end") are not
    averaged with the one-tokenizer seed pairs: a column of their own."""
    assert pair_kind({"a": True, "c": True}, "char_end") == "cross_tokenizer"
    assert pair_kind({"a": True, "b": True}, "identical") == "trained"
    assert pair_kind({"a": True, "u": False}, "char_end") == "trained_vs_untrained"
    kinds = {"a__c": "cross_tokenizer", "b__c": "cross_tokenizer"}
    rows = {(r.key, r.where): r for r in universality_rows(PAIRS, kinds)}
    sub = rows[("linear_cka_subsample", H)]
    assert (sub.trained.mean, sub.trained.n) == (pytest.approx(0.8), 1)
    assert sub.cross_tokenizer.mean == pytest.approx(0.65) and sub.cross_tokenizer.n == 2
    assert sub.cross_tokenizer.sd == pytest.approx(0.1 / 2**0.5)
    partner = rows[("fraction_with_partner", S)]
    assert partner.trained.mean == pytest.approx(0.30)
    assert partner.cross_tokenizer.mean == pytest.approx(0.375)
    assert universality_rows(PAIRS)[0].cross_tokenizer is None
    # only cross-tokenizer pairs: the rows are still there, the one-tokenizer column empty
    only = universality_rows({"a__c": PAIRS["a__c"]}, {"a__c": "cross_tokenizer"})
    assert len(only) == 6 and only[1].trained.n == 0 and only[1].cross_tokenizer.n == 1
    # the report: its own column, named; the transfer family counts all three pairs
    align, transfer = tmp_path / "alignment", tmp_path / "transfer"
    for name, ps in (("a__b", (0.009, 0.04)), ("a__c", (0.03, 0.5)), ("b__c", (0.002, 0.2))):
        _pair_folder(align, name, PAIRS[name], transfer, _transfer(ps))
        if name != "a__b":
            meta = json.loads((align / name / "meta.json").read_text())
            meta.update(token_rule="char_end", trained={name[0]: True, name[-1]: True})
            (align / name / "meta.json").write_text(json.dumps(meta))
    html = aggregate_html(aligned_pairs(align), transfer)
    assert "Across 1 model pair, 2 across tokenizers" in html
    assert "trained, different tokenizers" in html and "0.650 ± 0.071" in html
    assert "single Holm (1979) family of 6" in html
    assert "has floor 0.030, so over 6 tests" in html  # one floor: every test drew 32
    # a test whose null drew on (to extend_to) has the lower floor; the text names both
    t = json.loads((transfer / "a__b" / "transfer.json").read_text())
    t["concepts"]["tense"]["blocks.1.hook_resid_post"]["p_floor"] = 1 / 721
    (transfer / "a__b" / "transfer.json").write_text(json.dumps(t))
    html = aggregate_html(aligned_pairs(align), transfer)
    assert "has floor 0.030 (0.001 where the draws went on), so over 6 tests" in html
    assert "Holm p can fall below 0.008" in html  # 6 / 721


def _transfer(ps, own_lo=(0.1, -0.2), frac=(0.5, 2.0), normal=(1e-4, 0.3)):
    rec = {}
    for i, h in enumerate(("blocks.1.hook_resid_post", "blocks.2.hook_resid_post")):
        rec[h] = {"p_vs_random": ps[i], "p_normal_vs_random": normal[i], "p_floor": 1 / 33,
                  "fraction_of_own": frac[i], "own": {"ci95": [own_lo[i], 1.0]}}  # fmt: skip
    return {"concepts": {"tense": rec}}


def test_transfer_holm_over_every_pair_and_wilson_interval():
    ps = {"a__b": (0.009, 0.04), "a__c": (0.03, 0.5), "b__c": (0.002, 0.2)}
    agg = transfer_aggregate({k: _transfer(v) for k, v in ps.items()})
    assert agg.m == 6
    got = {(t.pair, t.hook[7]): t.p_holm for t in agg.tests}
    # Holm (1979) by hand: sorted 0.002, 0.009, 0.03, 0.04, 0.2, 0.5 times 6..1, running max
    assert got[("b__c", "1")] == pytest.approx(0.012)
    assert got[("a__b", "1")] == pytest.approx(0.045)
    assert got[("a__c", "1")] == pytest.approx(0.12)
    assert got[("a__b", "2")] == pytest.approx(0.12)
    assert got[("b__c", "2")] == pytest.approx(0.4)
    assert got[("a__c", "2")] == pytest.approx(0.5)
    assert agg.transfers == 2
    # Wilson (1927) score interval of 2 / 6 at z = 1.96, in closed form
    z, n, p = 1.96, 6, 2 / 6
    c = (p + z * z / (2 * n)) / (1 + z * z / n)
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    assert agg.interval == pytest.approx((c - h, c + h))
    assert agg.interval == pytest.approx((0.0968, 0.7000), abs=1e-4)
    # normal tail: 1e-4 (x3) and 0.3 (x3) -> Holm 6e-4, 5e-4 ... 3 pass
    assert agg.transfers_normal == 3 and agg.n_normal == 6
    # fraction of own: all six (0.5, 2.0 per pair) and only where own steers (lo > 0)
    assert agg.fraction_of_own.mean == pytest.approx(1.25)
    assert agg.fraction_of_own_steering.mean == pytest.approx(0.5)
    assert agg.fraction_of_own_steering.n == 3
    assert agg.best_possible_holm == pytest.approx(6 / 33)


def _pair_folder(root, name, scores, transfer_root=None, transfer=None):
    d = root / name
    d.mkdir(parents=True)
    a, b = name.split("__")
    (d / "meta.json").write_text(json.dumps({"model_a": a, "model_b": b,
                                             "config": {"threshold": 0.5}}))  # fmt: skip
    (d / "scores.json").write_text(json.dumps(scores))
    if transfer is not None:
        (transfer_root / name).mkdir(parents=True)
        (transfer_root / name / "transfer.json").write_text(json.dumps(transfer))


def test_report_aggregate_only_with_two_pairs(tmp_path):
    align, transfer = tmp_path / "alignment", tmp_path / "transfer"
    _pair_folder(align, "a__b", PAIRS["a__b"], transfer, _transfer((0.009, 0.04)))
    one = aggregate_html(aligned_pairs(align), transfer)
    # one pair: the transfer summary only (no mean ± sd over pairs, no per-test table)
    assert "Steering transfer over 1 pair<" in one and "family of 2" in one
    assert "model pairs</h3>" not in one and "p (Holm, all pairs)" not in one
    _pair_folder(align, "a__c", PAIRS["a__c"], transfer, _transfer((0.03, 0.5)))
    html = aggregate_html(aligned_pairs(align), transfer)
    assert "Across 2 model pairs" in html
    assert "0.700 ± 0.141" in html  # linear CKA (subsample): 0.8, 0.6
    assert "0.400 ± 0.141" in html  # its untrained control: 0.3, 0.5
    assert "single Holm (1979) family of 4" in html
