"""align_pair end to end on tiny stores and SAEs whose answer is known.

Model B is model A seen through an orthogonal rotation Q of its activation space, and
B's SAE is A's SAE rotated by Q with its latents permuted: every latent of B is exactly
a latent of A, so the matching must recover the permutation with correlation ≈ 1 (the
stores hold float16), the decoder cosine after Procrustes must be ≈ 1, and every
concept's best latent must be matched.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from stages.alignment.outputs import figures, write_alignment
from stages.alignment.stream import AlignConfig, align_pair
from tests.alignment._stores import permuted_copy, tiny_topk_sae, write_store

D, M, K, N = 16, 32, 4, 3000
HOOK = "blocks.0.hook_resid_post"
OTHER = "blocks.1.hook_resid_post"
CFG = AlignConfig(max_tokens=N, top_up=True, chunk_rows=512, n_permutations=20, n_samples=256,
                  top_k=8, self_check_tokens=1024, family_alpha=None)  # fmt: skip


def _orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def _rotated_copy(sae, perm: np.ndarray, q: np.ndarray):
    b = permuted_copy(sae, perm)
    qt = torch.from_numpy(q).float()
    with torch.no_grad():
        b.W_enc.copy_(qt.T @ b.W_enc)
        b.W_dec.copy_(b.W_dec @ qt)
        b.b_dec.copy_(b.b_dec @ qt)
    return b


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, D)).astype(np.float32)
    y = np.tanh(x @ rng.standard_normal((D, D))).astype(np.float32)  # a second "layer"
    q = _orthogonal(rng, D)
    sae_a = tiny_topk_sae(D, M, K, seed=1)
    perm = rng.permutation(M)  # B's latent j is A's latent perm[j]
    sae_b = _rotated_copy(sae_a, perm, q)
    # x and x @ q hold the same float16-rounded values up to rotation; store A's rounded
    # values so that B's latents equal A's up to the rounding of the rotated copy.
    x = x.astype(np.float16).astype(np.float32)
    with torch.no_grad():
        fa = sae_a.encode(torch.from_numpy(x)).numpy()
    concepts = ["c0", "c1", "c2"]
    labels = (fa[:, [3, 10, 20]] > 0).astype(np.uint8)  # concept j = where latent fires
    doc = np.repeat(np.arange(N // 30), 30)
    end = np.tile(np.arange(1, 31), N // 30)
    common = {"doc_ids": doc, "char_end": end, "heldout_start": N - 600,
              "concept_labels": labels, "concept_names": concepts}  # fmt: skip
    store_a = write_store(tmp / "a", {HOOK: x, OTHER: y}, model="A", **common)
    store_b = write_store(tmp / "b", {HOOK: x @ q, OTHER: y @ q}, model="B", **common)
    wide = tiny_topk_sae(D, 2 * M, K, seed=2)
    saes_a = {HOOK: {"topk": sae_a, "wide": wide}}
    saes_b = {HOOK: {"topk": sae_b}}
    return store_a, store_b, saes_a, saes_b, perm, q


def test_permuted_rotated_copy_is_matched_back(setup):
    store_a, store_b, saes_a, saes_b, perm, _ = setup
    result = align_pair(store_a, store_b, saes_a, saes_b, CFG, progress=False)
    assert result.token_rule == "identical" and result.n_tokens == N
    # the 600 held-out rows, topped up with the last 2400 training rows (select_rows)
    assert result.n_heldout_tokens == result.scores["n_heldout_tokens"] == 600
    (pair,) = result.pairs
    inverse = np.argsort(perm)  # A's latent i is B's latent inverse[i]
    assert pair.scores["dead_a"] == 0
    np.testing.assert_array_equal(pair.hungarian.b_index, inverse)
    np.testing.assert_array_equal(pair.max_ab.b_index, inverse)
    assert pair.hungarian.score.min() > 0.995
    s = pair.scores
    assert s["fraction_with_partner"] == 1.0 and s["fraction_with_partner_hungarian"] == 1.0
    assert s["mean_matched_corr_hungarian"] > 0.995
    # The shuffled-token null of independent-looking latents sits far below.
    assert s["null_p95_hungarian"] < 0.3 and s["fraction_above_null_hungarian"] == 1.0
    # top-k distinct token ids by max activation: matched latents are the same latent,
    # so the same ids; all pairs (the chance level of a random matching) far below
    assert s["mean_jaccard_hungarian"] == 1.0 and s["mean_jaccard_all_pairs"] < 0.2
    assert result.jaccard_vocabulary == "token ids"
    assert s["mean_decoder_cosine_hungarian"] > 0.99 and s["decoder_activation_agreement"] == 1.0
    assert s["subspace_cka"] > 0.99
    assert s["ground_truth_fraction_hungarian"] == 1.0 and s["ground_truth_fraction_max"] == 1.0
    assert s["self_match_identity_fraction"] == 1.0
    assert s["self_match_mean_corr"] == pytest.approx(1.0, abs=1e-6)
    # Raw activations: B is a rotation of A, so CKA and mutual kNN (cosine) are 1.
    tests = result.hook_pairs[HOOK]
    assert tests["linear_cka"].statistic == pytest.approx(1.0, abs=1e-4)
    assert tests["mutual_knn"].statistic == pytest.approx(1.0)
    assert tests["linear_cka"].p_value == pytest.approx(1 / 21) == tests["linear_cka"].p_floor
    # ... its z far beyond the null; with 20 draws (< MIN_NORMAL_DRAWS) no normal tail p
    assert tests["linear_cka"].z > 10 and math.isnan(tests["linear_cka"].p_normal)
    # Holm over the pair's 12 tests (5 measures × 2 hooks, 2 subspace CKAs), every one
    # at its floor 1/21: each adjusted p = 12/21
    sc = result.scores
    assert sc["holm_family_size"] == 12 and sc["p_floor"] == pytest.approx(1 / 21)
    holm_keys = [k for k in sc if "_p_holm" in k]
    assert len(holm_keys) == 12
    assert all(sc[k] == pytest.approx(12 / 21) for k in holm_keys)
    # no normal tail from 20 draws, so none to correct
    assert math.isnan(sc[f"rsa_p_normal/{HOOK}"]) and math.isnan(sc[f"rsa_p_normal_holm/{HOOK}"])
    grid = result.grid["linear_cka"]
    assert grid.values.shape == (2, 2) and grid.values[0, 1] < 0.99
    # The narrow and the wide SAE of A on one hook: feature splitting is reported.
    assert "a/blocks.0.hook_resid_post/topk>wide" in result.splitting


def test_sequential_family_resolves_after_holm(setup):
    """family_alpha = 0.05: each of the 12 tests draws until 10 permutations reach it or
    its planned cap (⌈(12 − j + 1)/0.05⌉ − 1, at least 20); every effect here is strong,
    so each sits at its own floor and every Holm-adjusted p is 12/240 = 0.05, where the
    fixed 20 permutations give 12/21 = 0.57."""
    store_a, store_b, saes_a, saes_b, _, _ = setup
    cfg = AlignConfig(**{**CFG.__dict__, "family_alpha": 0.05})
    result = align_pair(store_a, store_b, saes_a, saes_b, cfg, progress=False)
    sc = result.scores
    assert sc["holm_family_size"] == 12
    # CAP_ORDER: mutual kNN (2 hooks), unbiased CKA, SVCCA, linear CKA, subspace (2), RSA
    caps = {f"mutual_knn_p/{HOOK}": 239, f"mutual_knn_p/{OTHER}": 219,
            f"linear_cka_p/{HOOK}": 119, f"rsa_p/{OTHER}": 20}  # fmt: skip
    for key, cap in caps.items():
        metric, name = key.split("_p/")
        test = result.hook_pairs[name][metric]
        assert test.n_permutations == test.max_permutations == cap and test.stop_after == 10
        assert sc[key] == pytest.approx(1 / (cap + 1)) == sc[f"{metric}_p_floor/{name}"]
    holm_keys = [k for k in sc if k.endswith("_p_holm") or "_p_holm/" in k]
    assert len(holm_keys) == 12 and all(sc[k] <= 0.05 + 1e-12 for k in holm_keys)
    assert sc["holm_floor"] == pytest.approx(0.05)
    # the grid stays descriptive: 20 permutations a cell
    assert result.grid["linear_cka"].n_permutations == 20


def test_scores_are_plain_floats(setup):
    store_a, store_b, saes_a, saes_b, _, _ = setup
    cfg = AlignConfig(**{**CFG.__dict__, "n_permutations": 5})
    scores = align_pair(store_a, store_b, saes_a, saes_b, cfg, progress=False).scores
    assert f"unbiased_cka/{HOOK}" in scores and any(k.startswith("splitting/") for k in scores)
    assert {k: type(v).__name__ for k, v in scores.items() if type(v) is not float} == {}


def test_saes_are_paired_by_name(setup):
    """Both sides have SAEs on the hook but no name in common: an error naming both sides'
    SAEs, never zero pairs. SAEs on one side only leave the hook to raw activations."""
    store_a, store_b, saes_a, saes_b, _, _ = setup
    cfg = AlignConfig(**{**CFG.__dict__, "n_permutations": 0})
    renamed = {HOOK: {"seed1": saes_b[HOOK]["topk"]}}
    for names in (None, "all"):
        with pytest.raises(ValueError, match=r"SAEs on blocks\.0\.hook_resid_post: model A has "
                           r"\['topk', 'wide'\], model B has \['seed1'\].*paired by name.*"
                           "same key"):  # fmt: skip
            align_pair(store_a, store_b, saes_a, renamed,
                       AlignConfig(**{**cfg.__dict__, "sae_names": names}), progress=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"sae_names: \['topk'\] not trained on both.*"
                       "paired by name"):  # fmt: skip
        align_pair(store_a, store_b, saes_a, renamed,
                   AlignConfig(**{**cfg.__dict__, "sae_names": ("topk",)}), progress=False)  # fmt: skip
    result = align_pair(store_a, store_b, saes_a, {OTHER: renamed[HOOK]}, cfg, progress=False)
    assert result.pairs == [] and f"linear_cka/{HOOK}" in result.scores
    # the same key pairs them whatever they were called
    same = align_pair(store_a, store_b, {HOOK: {"x": saes_a[HOOK]["topk"]}},
                      {HOOK: {"x": saes_b[HOOK]["topk"]}}, cfg, progress=False)  # fmt: skip
    assert [p.key for p in same.pairs] == [f"{HOOK}/x"]


def test_ground_truth_from_metrics_best_latents(setup):
    store_a, store_b, saes_a, saes_b, perm, _ = setup
    inverse = np.argsort(perm)
    best_a = {HOOK: {"topk": {"c0": 3, "c1": 10}}}
    right = {HOOK: {"topk": {"c0": int(inverse[3]), "c1": int(inverse[10])}}}
    wrong = {HOOK: {"topk": {"c0": int(inverse[3]), "c1": int(inverse[11])}}}
    cfg = AlignConfig(**{**CFG.__dict__, "n_permutations": 0})
    for best_b, expected in ((right, 1.0), (wrong, 0.5)):
        result = align_pair(store_a, store_b, saes_a, saes_b, cfg, progress=False,
                            best_latents_a=best_a, best_latents_b=best_b)  # fmt: skip
        assert result.pairs[0].scores["ground_truth_fraction_hungarian"] == expected


def test_different_tokenisation_streams_scattered_rows_of_b(tmp_path, setup):
    """B merges pairs of A's tokens: only A's rows ending where B's tokens end pair up."""
    store_a, store_b, saes_a, saes_b, perm, q = setup
    keep = np.flatnonzero(np.arange(N) % 3 != 1)  # B has no token ending at these offsets
    order = np.random.default_rng(1).permutation(N // 30)  # and stores documents reordered
    rows_b = np.concatenate([keep[(keep >= 30 * d) & (keep < 30 * d + 30)] for d in order])
    arrays = {h: store_b.read(h)[rows_b].astype(np.float32) for h in store_b.hooks}
    b = write_store(tmp_path / "b2", arrays, doc_ids=store_b.read("doc_ids")[rows_b],
                    char_end=store_b.read("char_end")[rows_b],
                    concept_labels=store_b.read("concept_labels")[rows_b],
                    concept_names=store_b.concept_names, model="B2")  # fmt: skip
    cfg = AlignConfig(**{**CFG.__dict__, "split": "all", "n_permutations": 0})
    result = align_pair(store_a, b, saes_a, saes_b, cfg, progress=False)
    assert result.token_rule == "char_end" and result.n_tokens == len(keep)
    pair = result.pairs[0]
    np.testing.assert_array_equal(pair.max_ab.b_index, np.argsort(perm))
    assert pair.scores["mean_matched_corr_hungarian"] > 0.995
    assert result.hook_pairs[HOOK]["linear_cka"].statistic == pytest.approx(1.0, abs=1e-4)
    # B's token ids are another vocabulary: without decoded strings no Jaccard ...
    assert result.jaccard_vocabulary == "none"
    assert np.isnan(pair.scores["mean_jaccard_hungarian"])
    # ... with them, ids compare through their strings: B's id 1000 + i decodes as A's i
    b3 = write_store(tmp_path / "b3", arrays, doc_ids=store_b.read("doc_ids")[rows_b],
                     char_end=store_b.read("char_end")[rows_b],
                     token_ids=store_a.read("token_ids")[rows_b] + 1000, model="B3")  # fmt: skip
    strings_a = [f"t{i}" for i in range(97)]
    strings_b = ["?"] * 1000 + [f" t{i}" for i in range(97)]  # leading space stripped
    both = align_pair(store_a, b3, saes_a, saes_b, cfg, progress=False,
                      token_strings=(strings_a, strings_b))  # fmt: skip
    assert both.jaccard_vocabulary == "decoded token strings"
    s3 = both.pairs[0].scores
    assert s3["mean_jaccard_hungarian"] > 0.9 and s3["mean_jaccard_all_pairs"] < 0.2


def test_sae_with_itself_is_the_identity(setup):
    store_a, _, saes_a, _, _, _ = setup
    cfg = AlignConfig(**{**CFG.__dict__, "n_permutations": 0, "sae_names": ("topk",)})
    result = align_pair(store_a, store_a, saes_a, saes_a, cfg, progress=False)
    (pair,) = result.pairs
    np.testing.assert_array_equal(pair.hungarian.b_index, np.arange(M))
    assert np.allclose(pair.hungarian.score, 1.0)
    assert pair.scores["self_match_identity_fraction"] == 1.0


def test_write_alignment_outputs(tmp_path, setup):
    store_a, store_b, saes_a, saes_b, _, _ = setup
    cfg = AlignConfig(**{**CFG.__dict__, "n_permutations": 5})
    result = align_pair(store_a, store_b, saes_a, saes_b, cfg, progress=False)
    out = write_alignment(result, tmp_path / "align" / "A__B")
    scores = json.loads((out / "scores.json").read_text())
    assert all(isinstance(v, float | int | None) for v in scores.values())
    assert scores[f"{HOOK}/topk/fraction_with_partner"] == 1.0
    table = pq.read_table(out / "matches" / f"{HOOK}__topk.parquet")
    assert set(table.column("method").to_pylist()) == {"hungarian", "max_ab", "max_ba"}
    assert table.num_rows == 3 * M
    assert {"latent_a", "latent_b", "correlation", "jaccard", "decoder_cosine_procrustes",
            "above_threshold"} <= set(table.column_names)  # fmt: skip
    sim = json.loads((out / "similarity.json").read_text())
    assert sim["grid"]["linear_cka"]["hooks_a"] == [HOOK, OTHER]
    assert sim["grid"]["linear_cka"]["p_floor"] == pytest.approx(1 / 6)
    test = sim["hook_pairs"][HOOK]["svcca"]
    assert test["p_value"] == test["p_floor"] == pytest.approx(1 / 6)  # 5 permutations
    assert test["p_holm"] == pytest.approx(min(1.0, 12 / 6)) and test["z"] > 3
    assert sim["correction"]["method"].startswith("Holm") and sim["correction"]["family_size"] == 12
    meta = json.loads((out / "meta.json").read_text())
    assert meta["jaccard_vocabulary"] == "token ids" and "Holm" in meta["correction"]["method"]
    null = json.loads((out / "null.json").read_text())
    pair = null[f"{HOOK}/topk"]
    assert sum(pair["hungarian"]["observed"]) == M
    figs = figures(result)
    assert {"cka_layers", "mutual_knn_layers"} <= set(figs)
    assert any(k.startswith("matched_vs_null") for k in figs)
    assert all(hasattr(f, "savefig") for f in figs.values())
    assert not list((tmp_path / "align").glob(".*tmp*"))


def test_config_from_params_and_errors():
    cfg = AlignConfig.from_params({"hook_pairs": [[HOOK, OTHER]], "sae_names": ["topk"],
                                   "max_tokens": 1000})  # fmt: skip
    assert cfg.hook_pairs == ((HOOK, OTHER),) and cfg.sae_names == ("topk",)
    with pytest.raises(ValueError, match="unknown keys \\['n_nulls'\\]"):
        AlignConfig.from_params({"n_nulls": 2})
    with pytest.raises(ValueError, match="max_tokens = 1"):
        AlignConfig(max_tokens=1)


def _same(a: dict, b: dict) -> bool:
    """Equal dicts of numbers, NaN equal to NaN (e.g. z without permutations)."""
    return a.keys() == b.keys() and all(a[k] == b[k] or (a[k] != a[k] and b[k] != b[k])
                                        for k in a)  # fmt: skip


def test_pass_in_parts_on_any_mapper_gives_the_same_result(setup):
    """Parts computed in any order (as Dask workers would) and merged in order give the
    same numbers as in-order parts; more parts change only rounding."""
    from stages.alignment.stream import run_part

    store_a, store_b, saes_a, saes_b, _, _ = setup
    cfg = AlignConfig(**{**CFG.__dict__, "n_parts": 3, "n_permutations": 0})
    ref = align_pair(store_a, store_b, saes_a, saes_b, cfg, progress=False)
    seen = []

    def backwards(plan, parts):
        seen.extend(parts)
        done = {p: run_part(plan, *p) for p in reversed(parts)}
        return [done[p] for p in parts]

    out = align_pair(store_a, store_b, saes_a, saes_b, cfg, progress=False, map_parts=backwards)
    assert len(seen) == 3 and seen[0][0] == 0 and seen[-1][1] > seen[-1][0]
    assert [b for _, b in seen[:-1]] == [a for a, _ in seen[1:]]  # contiguous, in order
    assert _same(out.scores, ref.scores)
    one = align_pair(store_a, store_b, saes_a, saes_b,
                     AlignConfig(**{**cfg.__dict__, "n_parts": 1}), progress=False)  # fmt: skip
    for key, v in one.scores.items():
        assert out.scores[key] == pytest.approx(v, rel=1e-5, abs=1e-6, nan_ok=True), key


def test_pass_on_an_explicit_device_gives_the_default_numbers(setup):
    """`device=` is where each part's token pass runs (its SAEs lent there for the
    part); the parts' accumulators come back on the CPU, the SAEs where they were."""
    from stages.alignment.stream import run_part
    from stages.compute import Device

    store_a, store_b, saes_a, saes_b, _, _ = setup
    cfg = AlignConfig(**{**CFG.__dict__, "n_parts": 2, "n_permutations": 0})
    ref = align_pair(store_a, store_b, saes_a, saes_b, cfg, progress=False)
    states = []

    def keep(plan, parts):
        assert plan.device == Device("cpu")
        states.extend(run_part(plan, *p) for p in parts)
        return states

    out = align_pair(store_a, store_b, saes_a, saes_b, cfg, progress=False, map_parts=keep,
                     device=Device("cpu"))  # fmt: skip
    assert _same(out.scores, ref.scores) and len(states) == 2
    for s in states:
        assert {t.device.type for t in s.moments.comoment.values()} == {"cpu"}
        assert {t.device.type for st in s.states for t in (st.corr._moments.mean["a"],
                st.top_a.value, st.concepts_b.tp)} == {"cpu"}  # fmt: skip


def test_row_samples_of_consecutive_chunks_merge_exactly():
    from stages.alignment.similarity import RowSample

    rng = np.random.default_rng(0)
    chunks = [{"x": torch.from_numpy(rng.normal(size=(n, 3)))} for n in (50, 70, 40, 90)]
    whole = RowSample(["x"], 64, seed=5)
    for c in chunks:
        whole.update(c)
    first, second = RowSample(["x"], 64, seed=5), RowSample(["x"], 64, seed=5)
    first.update(chunks[0])
    first.update(chunks[1])
    second.update(chunks[2], chunk_id=2, row0=120)
    second.update(chunks[3], chunk_id=3, row0=160)
    first.merge(second)
    a, b = whole.result()["x"], first.result()["x"]
    assert a.shape == (64, 3) and np.array_equal(a, b)


def test_without_top_up_alignment_reads_held_out_rows_only(setup):
    store_a, store_b, saes_a, saes_b, perm, _ = setup
    cfg = AlignConfig(**{**CFG.__dict__, "top_up": False, "n_permutations": 0})
    result = align_pair(store_a, store_b, saes_a, saes_b, cfg, progress=False)
    assert result.n_tokens == result.n_heldout_tokens == 600
    (pair,) = result.pairs
    np.testing.assert_array_equal(pair.hungarian.b_index, np.argsort(perm))
