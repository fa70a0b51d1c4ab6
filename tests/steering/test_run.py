"""End to end: run_concept on the tiny model, store and SAE; files, JSON and figures."""

from __future__ import annotations

import json
import math

from safetensors.torch import load_file

from stages.steering import (
    ConceptConfig,
    concept_headline,
    figures,
    load_vector,
    run_concept,
    toy_sets,
    write_concept,
)
from stages.steering.run import figures_from_dict
from tests.steering.conftest import HOOKS, tiny_sae


def test_run_concept_end_to_end(tiny_model, tiny_store, tmp_path):
    s = toy_sets(0, 16, 8)["mammal_vs_bird"]
    saes = {HOOKS[1]: tiny_sae()}
    cfg = ConceptConfig(multipliers=(-2.0, 0.0, 2.0), n_windows=4, max_features=8,
                        n_candidates=64, gt_rows=2048, probe_rows=4096, n_generations=1,
                        max_new_tokens=3, kl_budget=10.0)  # fmt: skip
    r = run_concept(tiny_model, s, HOOKS, saes, tiny_store, cfg, model_name="tiny",
                    input_hashes={"model": "abc"})  # fmt: skip
    out = write_concept(r, tmp_path / "steering", tmp_path / "decomposition")
    assert out == tmp_path / "steering" / "mammal_vs_bird"
    assert set(load_file(out / "vector.safetensors")) == set(HOOKS)
    vecs, meta = load_vector(out)
    assert meta["n_pairs"] == 16 and meta["method"] == "mean_diff" and meta["model"] == "tiny"
    assert meta["input_hashes"]["model"] == "abc" and set(meta["norm"]) == set(HOOKS)
    ev = json.loads((out / "evaluation.json").read_text())
    sw = ev["sweep"]
    assert sw["best_hook"] in HOOKS and set(sw["steerability"]) == set(HOOKS)
    assert all(math.isfinite(sw["steerability"][h]["slope"]) for h in HOOKS)
    assert set(ev["probes"]) == set(HOOKS) and ev["generations"]["prompts"]
    # the held-out pairs give their own vector, compared with the training one
    assert set(ev["heldout_pair_cosine"]) == set(HOOKS)
    dd = json.loads(
        (tmp_path / "decomposition" / "mammal_vs_bird" / "decomposition.json").read_text()
    )
    assert dd["hook"] == HOOKS[1] and dd["ground_truth"]
    assert len(dd["nn_decomposition"]["curve"]) >= 1 and set(dd["precision_at_k"]) >= {"nnls"}
    assert dd["downstream"][HOOKS[0]]["hooks"] == [HOOKS[1]]  # steer at 0, read 1
    assert set(dd["targeted"]["vectors"]) == {"raw", "top5", "off_ablated5", "random"}
    # every vector against 32 random directions: raw at each hook, the variants at the
    # decomposition hook at equal norm and at equal KL; flat keys in the headline
    assert set(ev["controls"]) == set(HOOKS) and dd["controls"] == ev["controls"][HOOKS[1]]
    c = dd["controls"]
    assert c["n_random"] == 32 and len(c["null_equal_norm_slopes"]) == 32
    assert set(c["vectors"]) == {"raw", "top5", "off_ablated5"} and "equal_kl" in c
    for v in c["vectors"].values():
        assert v["equal_norm"]["p"] >= c["p_floor"] == 1 / 33
    assert "equal_kl" not in ev["controls"][HOOKS[0]]
    # ground truth at the read position (the noun): mammal vs bird rows at those tokens
    rp = dd["ground_truth_read_position"]
    assert rp["read_tokens"] and rp["concept"] == "mammal" and rp["negative"] == "bird"
    if "skipped" not in rp:
        assert rp["latents"] and set(dd["precision_at_k_read_position"]) == {
            "nnls", "cosine", "encode", "encode_shift"}  # fmt: skip
    at = dd["attribution"]
    assert at["hook"] == HOOKS[1] and len(at["latents"]) == len(at["ablation"]) > 3
    head = concept_headline(ev, dd)
    assert head["random.n"] == 32 and "targeted.top5.equal_kl.z" in head
    assert "attribution_vs_ablation.spearman" in head
    figs = figures(r)
    assert {"steerability", "layer_sweep", "decomposition", "downstream", "targeted"} <= set(figs)
    redrawn = figures_from_dict({"evaluation": ev, "decomposition": dd})
    assert set(redrawn) == set(figs)
