"""End to end: run_concept then decompose_concept on the tiny model, store and SAE; files,
JSON and figures."""

from __future__ import annotations

import json
import math

import pytest
from safetensors.torch import load_file

from stages.steering import (
    ConceptConfig,
    concept_headline,
    figures,
    load_probes,
    load_vector,
    run_concept,
    toy_sets,
    write_concept,
)
from stages.steering.decompose_run import (
    decompose_concept,
    decomposition_figures,
    decomposition_headline,
    write_decomposition,
)
from stages.steering.run import figures_from_dict
from tests.steering.conftest import HOOKS, tiny_sae


def test_run_concept_end_to_end(tiny_model, tiny_store, tmp_path):
    s = toy_sets(0, 16, 8)["mammal_vs_bird"]
    saes = {HOOKS[1]: tiny_sae()}
    cfg = ConceptConfig(multipliers=(-2.0, 0.0, 2.0), n_windows=4, max_features=8,
                        n_candidates=64, gt_rows=2048, probe_rows=4096, n_generations=1,
                        max_new_tokens=3, kl_budget=10.0)  # fmt: skip
    r = run_concept(tiny_model, s, HOOKS, tiny_store, cfg, model_name="tiny",
                    input_hashes={"model": "abc"})  # fmt: skip
    out = write_concept(r, tmp_path / "steering")
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
    # every hook's raw vector against 32 random directions of its norm, no KL test here
    assert set(ev["controls"]) == set(HOOKS)
    assert all("equal_kl" not in c and set(c["vectors"]) == {"raw"}
               for c in ev["controls"].values())  # fmt: skip
    # the probe directions travel beside the vectors, for the decomposition's cosines
    assert set(load_probes(out)) == set(HOOKS)
    head = concept_headline(ev)
    assert head["random.n"] == 32 and "steerability_z" in head and "targeted.top5.kl" not in head
    # directional ablation and ablate+add at every hook, against random directions
    da = ev["directional_ablation"]
    assert set(da) == set(HOOKS) and all(d["n_random"] == 8 for d in da.values())
    assert all(len(d["ablate"]["null_retained"]) == 8 for d in da.values())
    assert "ablation.retained" in head and "ablate_add.z" in head
    assert head["ablation.random.p_floor"] == pytest.approx(1 / 9)
    figs = figures(r)
    assert set(figs) == {"steerability", "layer_sweep", "ablation"}
    assert set(figures_from_dict({"evaluation": ev})) == set(figs)

    # ---- the decompose stage: from the files the steering stage wrote
    vecs, _ = load_vector(out)
    dd = decompose_concept(tiny_model, s, vecs, ev, saes, tiny_store, cfg,
                           probes=load_probes(out))  # fmt: skip
    dout = write_decomposition(dd, tmp_path / "decomposition", s.name, "tiny")
    assert json.loads((dout / "decomposition.json").read_text())["concept"] == s.name
    dd = json.loads((dout / "decomposition.json").read_text())
    assert dd["hook"] == HOOKS[1] and dd["ground_truth"]
    assert len(dd["nn_decomposition"]["curve"]) >= 1 and set(dd["precision_at_k"]) >= {"nnls"}
    assert dd["downstream"][HOOKS[0]]["hooks"] == [HOOKS[1]]  # steer at 0, read 1
    assert set(dd["targeted"]["vectors"]) == {"raw", "top5", "off_ablated5", "random"}
    # every vector against 32 random directions: raw at each hook, the variants at the
    # decomposition hook at equal norm and at equal KL; flat keys in the headline
    assert "probe" in dd["cosines"]
    c = dd["controls"]
    # the raw vector's null is the steering stage's: same directions, same equal-norm test
    raw_s = ev["controls"][HOOKS[1]]["vectors"]["raw"]["equal_norm"]
    assert c["vectors"]["raw"]["equal_norm"] == raw_s
    assert c["n_random"] == 32 and len(c["null_equal_norm_slopes"]) == 32
    assert set(c["vectors"]) == {"raw", "top5", "off_ablated5"} and "equal_kl" in c
    for v in c["vectors"].values():
        assert v["equal_norm"]["p"] >= c["p_floor"] == 1 / 33
    # ground truth at the read position (the noun): mammal vs bird rows at those tokens
    rp = dd["ground_truth_read_position"]
    assert rp["read_tokens"] and rp["concept"] == "mammal" and rp["negative"] == "bird"
    if "skipped" not in rp:
        assert rp["latents"] and set(dd["precision_at_k_read_position"]) == {
            "nnls", "cosine", "encode", "encode_shift"}  # fmt: skip
    at = dd["attribution"]
    assert at["hook"] == HOOKS[1] and len(at["latents"]) == len(at["ablation"]) > 3
    head = decomposition_headline(dd)
    assert head["random.n"] == 32 and "targeted.top5.equal_kl.z" in head
    assert "attribution_vs_ablation.spearman" in head and "steerability" not in head
    assert set(decomposition_figures(dd, s.name)) == {"decomposition", "downstream",
                                                      "downstream_null", "targeted", "clamp"}  # fmt: skip
    # clamping the top targeted_k latents against adding the vector and random latents
    cl = dd["clamp"]
    assert cl["hook"] == HOOKS[1] and cl["k"] == cfg.targeted_k
    assert set(cl["latents"]) <= set(dd["nn_decomposition"]["features"])
    assert cl["random"]["n"] == 32 and len(cl["random"]["null_effects"]) == 32
    assert "clamp.effect" in head and "clamp.z" in head and head["clamp.random.n"] == 32
    dn = dd["downstream_null"]
    assert dn["hook"] == HOOKS[1] and list(dn["hooks"]) == [HOOKS[1]]
    assert f"downstream_null.{HOOKS[1]}.n_significant" in head
    # the circuit from the decomposition hook on (one hook with an SAE here: nodes only)
    assert dd["circuit"]["hooks"] == [HOOKS[1]] and dd["circuit"]["nodes"][HOOKS[1]]
    assert "circuit.ablation_z" in head
