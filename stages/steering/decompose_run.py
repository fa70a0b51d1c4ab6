"""A steering vector in SAE features, per concept: the `decompose@<model>` stage's analysis.

    vectors, meta = load_vector(Path("data/steering/toy-a/emotion_polarity"))
    ev = read_json(... "evaluation.json")                # the steering stage's layer sweep
    dd = decompose_concept(model, s, vectors, ev, saes, store, ConceptConfig(),
                           probes=load_probes(folder))
    write_decomposition(dd, Path("data/decomposition/toy-a"), s.name, "toy-a")

It reads what `run.run_concept` wrote (the vectors and the layer sweep) and the SAEs, so
changing the SAE sweep re-runs this and not the steering vectors. At the decomposition
hook (the sweep's best hook, or the best-steering hook that has an SAE):

- the vector's SAE decomposition (NN-OMP, cosine, encoder and encode-shift rankings),
  precision@k against ground-truth latents from the concept's labels and, separately, at
  the position the vector is read from (`read_position_truth`);
- downstream effects: steer at each hook, read every later hook that has an SAE; at the
  decomposition hook, every later latent's change against random directions of the
  vector's norm, Benjamini–Hochberg-corrected (`downstream.downstream_null`);
- the feature-targeted vectors against the raw one and the random directions, at equal
  norm and at equal KL (`controls.controlled_effects`);
- steering by clamping the decomposition's top latents (SAE error term kept) against
  adding the raw vector at the same KL and against clamping random active latents
  (`interventions.feature_clamping`);
- attribution patching per latent against true ablation (`attribution`);
- a sparse feature circuit from that hook on (`circuit.feature_circuit`): nodes by
  attribution at every later hook with an SAE, edges between adjacent hooks, against
  random active latents.

File: `<decomposition_dir>/<concept>/decomposition.json` (written atomically).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from stages.activations import check_hooks
from stages.io import atomic_dir, write_json
from stages.layout import inside, safe_name
from stages.steering import decompose as D
from stages.steering.attribution import ablation_side_effects, attribution_vs_ablation
from stages.steering.circuit import feature_circuit
from stages.steering.controls import controlled_effects
from stages.steering.downstream import downstream_effects, downstream_null
from stages.steering.interventions import feature_clamping
from stages.steering.probes import cosine_table
from stages.steering.prompts import SteeringSet
from stages.steering.run import (
    ConceptConfig,
    control_headline,
    finite_rounded,
    jsonable,
    neutral_windows,
)
from stages.steering.similarity import similarity_headline, similarity_vs_effect
from stages.steering.targeted import compare_vectors, targeted_vectors
from stages.steering.vectors import read_activations, resolve_positions, tokenize

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from transformer_lens import HookedTransformer

log = logging.getLogger(__name__)


def decomposition_hook(evaluation: dict[str, Any], saes: dict[str, Any]) -> str | None:
    """The sweep's best hook when it has an SAE, else the best-steering hook that has one;
    None when no steering hook has an SAE."""
    sweep = evaluation["sweep"]
    best, slopes = sweep["best_hook"], sweep["steerability"]
    with_sae = [h for h in slopes if h in saes]
    if not with_sae:
        return None
    return best if best in saes else max(with_sae, key=lambda h: slopes[h]["slope"])


def decompose_concept(
    model: HookedTransformer,
    s: SteeringSet,
    vectors: dict[str, Tensor],
    evaluation: dict[str, Any],
    saes: dict[str, Any],
    store=None,
    cfg: ConceptConfig | None = None,
    *,
    probes: dict[str, Tensor] | None = None,
    neutral_tokens: Tensor | None = None,
    ground_truth: dict[str, list[int]] | None = None,
) -> dict[str, Any]:
    """The decomposition record of one concept (see the module docstring).

    `vectors` and `evaluation` are the steering stage's (`run_concept`); `probes` (hook ->
    probe direction, `run.load_probes`) adds the probe to the cosine table. `store`
    supplies held-out windows (unless `neutral_tokens`) and the concept labels for the
    ground truth; `ground_truth` (hook -> latent ids) overrides the latents found from
    labels."""
    cfg = cfg or ConceptConfig()
    check_hooks(model, list(saes), "steering.saes")
    hooks = list(evaluation["sweep"]["steerability"])
    dh = decomposition_hook(evaluation, saes)
    if dh is None:
        log.info("decompose %s: no SAE at %s; skipped", s.name, hooks)
        return {"skipped": "no SAE at any steering hook"}
    tokens = neutral_windows(store, neutral_tokens, cfg.n_windows, "decompose_concept")
    bs = cfg.batch_size
    best = evaluation["sweep"]["best_hook"]
    sae, v = saes[dh], vectors[dh]
    W = sae.W_dec.detach()
    x_eval = read_activations(model, [e.prompt for e in s.eval_prompts], [dh], -1, bs)[dh]
    enc_v = D.encode_vector(sae, v)
    shift = D.encode_shift(sae, x_eval, v, 1.0)
    dec = D.nn_decompose(v, W, cfg.max_features, cfg.n_candidates)
    n_top = max(cfg.ks + (cfg.top_n,))
    rankings = {
        "nnls": dec.top(len(dec.features)),
        "cosine": D.top_by_cosine(v, W, n_top)[0],
        "encode": D.top_by_value(enc_v, n_top)[0],
        "encode_shift": D.top_by_value(shift, n_top)[0],
    }
    dd: dict[str, Any] = {"hook": dh, "chosen_hook": best, "sae_d": sae.d_sae,
                          "vector_norm": float(v.norm())}  # fmt: skip
    cos_all = D.decoder_cosines(v, W)
    dd["top_features"] = {
        name: [{"latent": j, "encode": float(enc_v[j]), "encode_shift": float(shift[j]),
                "cosine": float(cos_all[j])} for j in r[: cfg.top_n]]
        for name, r in rankings.items()
    }  # fmt: skip
    dd["nn_decomposition"] = dec.to_dict()
    truth = (ground_truth or {}).get(dh)
    if truth is None and store is not None and s.concept in (store.concept_names or []) \
            and dh in store.hooks:  # fmt: skip
        lo, hi = store.split_range("heldout")
        hi = min(hi, lo + cfg.gt_rows)
        x = torch.from_numpy(np.asarray(store.array(dh)[lo:hi]).astype(np.float32))
        ci = store.concept_names.index(s.concept)
        lab = torch.from_numpy(np.asarray(store.array("concept_labels")[lo:hi, ci : ci + 1]))
        f1 = D.latent_f1(sae, x, lab)[0]
        truth = D.concept_latents(f1, cfg.gt_f1_threshold)
        dd["ground_truth_f1"] = {str(j): float(f1[j]) for j in truth}
    rp = read_position_truth(sae, s, store, dh, model, cfg)
    if rp is not None:
        dd["ground_truth_read_position"] = rp
        if rp.get("latents"):
            dd["precision_at_k_read_position"] = {
                name: {str(k): D.precision_at_k(r, rp["latents"], k) for k in cfg.ks}
                for name, r in rankings.items()}  # fmt: skip
    if truth:
        dd["ground_truth"] = truth
        dd["precision_at_k"] = {name: {str(k): D.precision_at_k(r, truth, k) for k in cfg.ks}
                                for name, r in rankings.items()}  # fmt: skip
        dirs = {"steering_vector": v, **{f"decoder_{j}": W[j] for j in truth[:3]}}
        if probes and dh in probes:
            dirs["probe"] = probes[dh].float()
        dd["cosines"] = cosine_table(dirs)
    # ---- downstream: steer at each hook, read every later hook with an SAE
    dd["downstream"] = {h: downstream_effects(model, h, vectors[h], cfg.kl_multiplier, tokens,
                                              saes, positions=cfg.side_positions,
                                              top_n=cfg.top_n).to_dict()
                        for h in hooks}  # fmt: skip
    # which later latents the decomposition hook's vector moves beyond random directions
    # of its norm (BH-corrected; held-out random directions as the calibration check)
    dd["downstream_null"] = downstream_null(model, dh, v, cfg.kl_multiplier,
                                            tokens[: cfg.kl_windows], saes,
                                            n_random=cfg.n_random, seed=cfg.seed,
                                            top_n=cfg.top_n)  # fmt: skip
    # ---- targeted vs raw vs random
    tv = targeted_vectors(v, W, dec, cfg.targeted_k, cfg.seed, 1)
    dd["targeted"] = {"hook": dh, "k": cfg.targeted_k,
                      "vectors": compare_vectors(model, s, dh, tv, cfg.multipliers, tokens,
                                                 cfg.kl_multiplier, positions=cfg.positions,
                                                 side_positions=cfg.side_positions,
                                                 batch_size=bs)}  # fmt: skip
    # the raw vector and every variant against the same random directions, at equal norm
    # and at equal KL
    dd["controls"] = controlled_effects(
        model, s, dh, {k: x for k, x in tv.items() if k != "random"}, cfg.multipliers,
        tokens[: cfg.kl_windows], n_random=cfg.n_random, seed=cfg.seed,
        equal_kl_at=cfg.equal_kl_at, positions=cfg.positions,
        side_positions=cfg.side_positions, batch_size=bs,
    )  # fmt: skip
    # steering by clamping the decomposition's top latents (error term kept) against
    # adding the raw vector at equal KL and against clamping random active latents
    coef = dict(zip(dec.features, dec.coefficients, strict=True))
    top = dec.top(cfg.targeted_k)
    dd["clamp"] = feature_clamping(
        model, s, dh, sae, top, [coef[j] for j in top], v, tokens[: cfg.kl_windows],
        multiples=tuple(cfg.clamp_multiples), clamp_at=cfg.clamp_at,
        add_multipliers=tuple(cfg.multipliers), n_random=cfg.clamp_random,
        n_kl_random=cfg.clamp_kl_random, seed=cfg.seed,
        batch_size=bs,
    )  # fmt: skip
    # which latents carry the behaviour: attribution patching against true ablation
    dd["attribution"] = attribution_vs_ablation(model, s, dh, sae, cfg.attribution_sample,
                                                cfg.attribution_sample, cfg.seed)  # fmt: skip
    # the same single-latent ablations' cost on held-out text: CE rise and KL per token
    att = dd["attribution"]
    n_top = min(cfg.attribution_sample, len(att["latents"]))
    att["side_effects"] = ablation_side_effects(model, dh, sae, att["latents"],
                                                tokens[: cfg.kl_windows], n_top=n_top,
                                                seed=cfg.seed)  # fmt: skip
    # does a latent's decoder cosine with the vector predict its ablation effect?
    dd["similarity_vs_effect"] = similarity_vs_effect(
        model, s, dh, sae, v, dd["attribution"], n_boot=cfg.similarity_draws,
        n_perm=cfg.similarity_draws, seed=cfg.seed)  # fmt: skip
    # the latents carrying the behaviour from the decomposition hook on, and their edges
    dd["circuit"] = feature_circuit(model, s, saes, start=dh, n_nodes=cfg.targeted_k,
                                    n_random=8, n_draws=8, seed=cfg.seed)  # fmt: skip
    return dd


def read_position_truth(sae, s: SteeringSet, store, hook: str, model: HookedTransformer,
                        cfg: ConceptConfig) -> dict[str, Any] | None:  # fmt: skip
    """Ground-truth latents where the vector lives: held-out store rows whose token is one
    the training pairs are read at, split by the set's concept (positive) and its
    negative concept (or its absence); latents whose firing-rate contrast exceeds
    `gt_contrast_threshold` (`decompose.contrast_at_tokens`), best first, or the best one.
    None without a store, labels or hook; a dict with `skipped` when too few rows."""
    if store is None or not s.concept or s.concept not in (store.concept_names or []) \
            or hook not in store.hooks:  # fmt: skip
        return None
    seqs = tokenize(model, [x for p in s.train_pairs for x in (p.positive, p.negative)])
    rps = [p.read_position for p in s.train_pairs for _ in (0, 1)]
    idx = resolve_positions(torch.tensor([len(q) for q in seqs]), rps)
    read_ids = sorted({int(q[i]) for q, i in zip(seqs, idx, strict=True) if i != "mean"})
    if not read_ids:
        return {"skipped": "the pairs are read at the mean over positions"}
    lo, hi = store.split_range("heldout")
    hi = min(hi, lo + cfg.gt_rows)
    tok = np.asarray(store.array("token_ids")[lo:hi])
    at = np.isin(tok, read_ids)
    names = store.concept_names
    lab = np.asarray(store.array("concept_labels")[lo:hi])[at]
    pos = lab[:, names.index(s.concept)].astype(bool)
    if s.negative_concept and s.negative_concept in names:
        neg = lab[:, names.index(s.negative_concept)].astype(bool) & ~pos
    else:
        neg = ~pos
    out: dict[str, Any] = {"read_tokens": read_ids, "n_positive": int(pos.sum()),
                           "n_negative": int(neg.sum()), "concept": s.concept,
                           "negative": s.negative_concept or f"not {s.concept}",
                           "threshold": cfg.gt_contrast_threshold,
                           "rule": "P(fires | concept) − P(fires | negative) among held-out "
                                   "rows at the pairs' read tokens"}  # fmt: skip
    if pos.sum() < cfg.gt_min_rows or neg.sum() < cfg.gt_min_rows:
        out["skipped"] = f"fewer than {cfg.gt_min_rows} positive or negative read-token rows"
        return out
    rows = np.flatnonzero(at)
    x = torch.from_numpy(np.asarray(store.array(hook)[lo:hi])[rows].astype(np.float32))
    c = D.contrast_at_tokens(sae, x, torch.from_numpy(pos), torch.from_numpy(neg))
    order = torch.argsort(c, descending=True)
    keep = [int(j) for j in order if float(c[j]) > cfg.gt_contrast_threshold]
    out["latents"] = keep or [int(order[0])]
    out["contrast"] = {str(j): float(c[j]) for j in out["latents"]}
    return out


def write_decomposition(dd: dict[str, Any], decomposition_dir: Path, concept: str,
                        model: str = "") -> Path:  # fmt: skip
    """Write `<decomposition_dir>/<concept>/decomposition.json`; returns the folder."""
    out = inside(decomposition_dir, safe_name(concept, "steering set name"))
    with atomic_dir(out, within=decomposition_dir) as tmp:
        write_json(tmp / "decomposition.json",
                   jsonable({"concept": concept, "model": model, **dd}))  # fmt: skip
    return out


def decomposition_figures(dd: dict[str, Any], name: str) -> dict[str, Figure]:
    """Decomposition bars + error curve, downstream heatmap, targeted vs raw vs random,
    drawn from the JSON record (`decomposition.json`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dd = jsonable(dd)
    figs: dict[str, Figure] = {}
    if "nn_decomposition" in dd:
        nd = dd["nn_decomposition"]
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
        order = np.argsort(-np.asarray(nd["coefficients"]))[:15]
        a1.bar(range(len(order)), [nd["coefficients"][i] for i in order])
        a1.set_xticks(range(len(order)), [str(nd["features"][i]) for i in order],
                      rotation=60, fontsize=7)  # fmt: skip
        a1.set(title=f"{name}: NN decomposition at {dd['hook']}", ylabel="coefficient")
        a2.plot(range(1, len(nd["curve"]) + 1), nd["curve"], marker=".")
        a2.set(xlabel="features used", ylabel="‖v − v̂‖ / ‖v‖", title="reconstruction error")
        fig.tight_layout()
        figs["decomposition"] = fig
    ds = dd.get("downstream", {})
    first = next((r for r in ds.values() if r["hooks"]), None)
    if first is not None:
        fig, ax = plt.subplots(figsize=(6, 1.2 + 0.5 * len(first["hooks"])))
        mat = np.asarray(first["matrix"])
        lim = float(np.abs(mat).max()) or 1.0
        ax.imshow(mat, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
        for i, row in enumerate(first["latents"]):
            for j, lat in enumerate(row):
                ax.text(j, i, str(lat), ha="center", va="center", fontsize=6)
        ax.set_yticks(range(len(first["hooks"])), first["hooks"], fontsize=7)
        ax.set(xlabel="rank (latent id in cell)",
               title=f"{name}: downstream of {first['hook']}")  # fmt: skip
        fig.tight_layout()
        figs["downstream"] = fig
    dn = (dd.get("downstream_null") or {}).get("hooks") or {}
    if dn:
        hs = list(dn)
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=False)
        x = np.arange(len(hs))
        for ax, (label, get) in zip(axes, (("SAM, pooled null", lambda r: r),
                                           ("per-latent normal tail",
                                            lambda r: r.get("normal") or {})), strict=True):  # fmt: skip
            rs = [get(dn[h]) for h in hs]
            ax.bar(x - 0.2, [r.get("n_up", 0) for r in rs], 0.4, color="C3", label="vector: up")
            ax.bar(x - 0.2, [-r.get("n_down", 0) for r in rs], 0.4, color="C0",
                   label="vector: down")  # fmt: skip
            ctl = [r.get("control_n_significant") or [0] for r in rs]
            mean = [float(np.mean(c)) for c in ctl]
            ax.errorbar(x + 0.2, mean, yerr=[[m - min(c) for m, c in zip(mean, ctl, strict=True)],
                                             [max(c) - m for m, c in zip(mean, ctl, strict=True)]],
                        fmt="s", color="grey", label="random directions (mean, range)")  # fmt: skip
            ax.axhline(0, color="black", lw=0.5)
            ax.set_xticks(x, hs, rotation=20, fontsize=7)
            ax.set(title=label, ylabel=f"latents moved (BH q < {dd['downstream_null']['alpha']:g})")
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{name}: downstream of {dd['downstream_null']['hook']} vs random directions",
                     fontsize=9)  # fmt: skip
        fig.tight_layout()
        figs["downstream_null"] = fig
    cl = dd.get("clamp")
    if cl:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
        al = cl["multiples"]
        a1.plot(al, cl["effect_by_multiple"], "o-", color="C0",
                label=f"top {cl['k']} latents {cl['latents']}")  # fmt: skip
        ne = [u for u in cl["random"]["null_effects"] if u is not None]
        if ne:
            a1.errorbar([cl["clamp_at"]], [np.mean(ne)], yerr=[np.std(ne)], fmt="s",
                        color="grey", label=f"{len(ne)} random active-latent sets (mean ± sd)")  # fmt: skip
        if cl["add_equal_kl"]["effect"] is not None:
            a1.axhline(cl["add_equal_kl"]["effect"], color="C3", ls="--",
                       label=f"add raw vector at the KL of the clamp at ×{cl['clamp_at']:g}")  # fmt: skip
        a1.set(xlabel="clamp value (× max activation on positive prompts)",
               ylabel="Δ metric vs clean", title="behaviour")  # fmt: skip
        a1.legend(fontsize=6)
        a2.plot(al, [np.nan if k is None else k for k in cl["kl_curve"]], "o-", color="C0")
        nk = [u for u in cl["random"]["null_kl"] if u is not None]
        if nk:
            a2.errorbar([cl["clamp_at"]], [np.mean(nk)], yerr=[np.std(nk)], fmt="s",
                        color="grey", label="random latent sets (mean ± sd)")  # fmt: skip
        a2.set(xlabel="clamp value (× max)", ylabel="KL (nats/token)",
               title="side effect")  # fmt: skip
        a2.legend(fontsize=7)
        fig.suptitle(f"{name}: clamping SAE latents at {cl['hook']} vs adding the vector",
                     fontsize=9)  # fmt: skip
        fig.tight_layout()
        figs["clamp"] = fig
    if "targeted" in dd:
        tv = dd["targeted"]["vectors"]
        names = list(tv)
        fig, ax = plt.subplots(figsize=(5, 3.5))
        x = np.arange(len(names))
        ax.bar(x - 0.2, [tv[n]["slope"] for n in names], 0.4, label="steerability")
        ax.bar(x + 0.2, [tv[n]["kl"] for n in names], 0.4, label="KL")
        ax.set_xticks(x, names, fontsize=8)
        ax.set(title=f"{name}: targeted vs raw vs random")
        ax.legend(fontsize=7)
        fig.tight_layout()
        figs["targeted"] = fig
    return figs


def decomposition_headline(dd: dict[str, Any]) -> dict[str, float]:
    """The decomposition's numbers a reader compares across experiments (DVC metrics /
    MLflow): reconstruction error, precision@5 (label and read-position ground truth),
    attribution vs ablation, the targeted variants and every vector against the random
    directions at equal norm and equal KL."""
    out: dict[str, Any] = {}
    if "nn_decomposition" in dd:
        curve = dd["nn_decomposition"]["curve"]
        out["nnls_rel_error_at_5"] = curve[min(4, len(curve) - 1)]
        out["nnls_rel_error_at_max"] = curve[-1]
    for ranking, at in dd.get("precision_at_k", {}).items():
        if "5" in at:
            out[f"precision_at_5_{ranking}"] = at["5"]
    if "attribution" in dd:
        out["attribution_vs_ablation.pearson"] = dd["attribution"]["pearson"]
        out["attribution_vs_ablation.spearman"] = dd["attribution"]["spearman"]
        se = dd["attribution"].get("side_effects") or {}
        for key in ("delta_ce", "kl"):
            if f"{key}_top_mean" in se:
                pre = f"latent_ablation.{key}"
                out[f"{pre}.top_mean"] = se[f"{key}_top_mean"]
                out[f"{pre}.random_mean"] = se[f"{key}_random_mean"]
                out[f"{pre}.top_minus_random"] = se[f"{key}_top_minus_random"]
                lo, hi = se[f"{key}_top_minus_random_ci95"]
                out[f"{pre}.top_minus_random_ci95_lo"] = lo
                out[f"{pre}.top_minus_random_ci95_hi"] = hi
    circ = dd.get("circuit") or {}
    if "ablation" in circ:
        out["circuit.ablation_delta"] = circ["ablation"]["circuit_delta"]
        out["circuit.ablation_random_mean"] = circ["ablation"]["random_delta_mean"]
        out["circuit.ablation_z"] = circ["ablation"]["z"]
    if "edge_control" in circ:
        out["circuit.edges_above_random_p95"] = circ["edge_control"][
            "frac_circuit_above_random_p95"
        ]
    for ranking, at in dd.get("precision_at_k_read_position", {}).items():
        if "5" in at:
            out[f"precision_at_5_{ranking}_read_position"] = at["5"]
    for h, r in (dd.get("downstream_null") or {}).get("hooks", {}).items():
        out[f"downstream_null.{h}.n_significant"] = r["n_significant"]
        out[f"downstream_null.{h}.control_n_significant_max"] = max(
            r["control_n_significant"], default=float("nan")
        )
        if "normal" in r:
            out[f"downstream_null.{h}.normal.n_significant"] = r["normal"]["n_significant"]
            out[f"downstream_null.{h}.normal.control_n_significant_max"] = max(
                r["normal"]["control_n_significant"], default=float("nan")
            )
    for kind, r in dd.get("targeted", {}).get("vectors", {}).items():
        out[f"targeted.{kind}.steerability"] = r["slope"]
        out[f"targeted.{kind}.kl"] = r["kl"]
    out.update(control_headline(dd.get("controls"), raw=False))
    out.update(similarity_headline(dd.get("similarity_vs_effect")))
    out.update(clamp_headline(dd.get("clamp")))
    return finite_rounded(out)


def clamp_headline(c: dict[str, Any] | None) -> dict[str, float]:
    """Flat metrics of `interventions.feature_clamping`: the clamp's effect (`clamp.effect`,
    interval) and KL (`clamp.kl`), z / p against random active latents clamped the same
    way, adding the raw vector at the multiplier with the clamp's KL (`clamp.add_effect`,
    `clamp.add_multiplier`) and the paired difference clamp − add (`clamp.minus_add`)."""
    if not c:
        return {}
    out = {"clamp.k": c["k"], "clamp.effect": c["effect"], "clamp.kl": c["kl"],
           "clamp.random.n": c["random"]["n"], "clamp.random.p_floor": c["p_floor"],
           "clamp.ablated_effect": c["ablated_effect"],
           "clamp.add_multiplier": c["add_equal_kl"]["multiplier"],
           "clamp.add_effect": c["add_equal_kl"]["effect"],
           "clamp.minus_add": c["clamp_minus_add"]["effect"]}  # fmt: skip
    out["clamp.add_ci95_lo"], out["clamp.add_ci95_hi"] = c["add_equal_kl"]["ci95"]
    out["clamp.ci95_lo"], out["clamp.ci95_hi"] = c["ci95"]
    out["clamp.minus_add_ci95_lo"], out["clamp.minus_add_ci95_hi"] = c["clamp_minus_add"]["ci95"]
    for key in ("z", "p", "null_mean", "null_sd"):
        out[f"clamp.{key}"] = c[key]
    return out
