"""The whole per-concept analysis in one call, its files and its figures.

    result = run_concept(model, steering_set, hooks, saes, store, ConceptConfig())
    write_concept(result, Path("data/steering/toy-a"), Path("data/decomposition/toy-a"))
    figs = figures(result)          # name -> matplotlib Figure

Files (each folder written atomically):

    <steering_dir>/<concept>/vector.safetensors   one float32 tensor per hook (key = hook)
    <steering_dir>/<concept>/meta.json            model, hooks, method, read position(s),
                                                  n pairs, input hashes, norm per hook
    <steering_dir>/<concept>/evaluation.json      layer sweep (steerability curves, KL, CE
                                                  rise), best hook, generations, probes
    <decomposition_dir>/<concept>/decomposition.json   SAE decomposition, precision@k,
                                                  downstream effects, cosines, targeted
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from stages.activations import check_hooks
from stages.io import atomic_dir, write_json
from stages.layout import inside, safe_name
from stages.steering import decompose as D
from stages.steering.apply import generate_steered
from stages.steering.attribution import attribution_vs_ablation
from stages.steering.controls import controlled_effects
from stages.steering.downstream import downstream_effects
from stages.steering.evaluate import DEFAULT_MULTIPLIERS, LayerSweep, layer_sweep
from stages.steering.probes import concept_probe, cosine_table
from stages.steering.prompts import SteeringSet
from stages.steering.targeted import compare_vectors, targeted_vectors
from stages.steering.vectors import (
    compute_vectors,
    pairs_hash,
    read_activations,
    resolve_positions,
    save_vector,
    tokenize,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from transformer_lens import HookedTransformer

log = logging.getLogger(__name__)


@dataclass
class ConceptConfig:
    method: str = "mean_diff"  # "mean_diff" | "pca"
    multipliers: tuple[float, ...] = DEFAULT_MULTIPLIERS
    positions: str = "last"  # where eval prompts are steered: "last" | "all"
    side_positions: str = "all"  # where neutral text is steered for KL / CE
    kl_multiplier: float = 4.0
    kl_budget: float = 0.5  # nats per token
    n_windows: int = 32  # held-out corpus windows for side effects and downstream
    batch_size: int = 64
    max_features: int = 32  # NN-OMP steps (the error curve's length)
    n_candidates: int = 256
    ks: tuple[int, ...] = (1, 3, 5, 10)  # precision@k
    top_n: int = 10  # features listed per ranking / per downstream hook
    gt_f1_threshold: float = 0.3
    # read-position ground truth: firing-rate contrast above this, among read-token rows
    gt_contrast_threshold: float = 0.3
    gt_min_rows: int = 10  # positive and negative read-token rows it needs
    attribution_sample: int = 16  # latents ablated: this many top by |attribution| + random
    gt_rows: int = 65536  # held-out store rows for ground-truth latents
    probe_rows: int = 65536
    targeted_k: int = 5
    n_random: int = 32  # random directions of the same norm: the null of every effect
    kl_windows: int = 8  # held-out windows for the equal-KL search
    equal_kl_at: float = 1.0  # equal-KL target: the raw vector's KL at this multiplier
    n_generations: int = 3
    max_new_tokens: int = 10
    generation_multiplier: float = 4.0
    seed: int = 0

    def __post_init__(self) -> None:
        finite = {float(m) for m in self.multipliers if math.isfinite(m)}
        if len(finite) < 2 or len(finite) != len(set(map(float, self.multipliers))):
            raise ValueError(f"ConceptConfig: multipliers = {list(self.multipliers)}, expected "
                             "at least two distinct finite values (steerability is a slope)")  # fmt: skip
        if self.n_random < 2:
            raise ValueError(f"ConceptConfig: n_random = {self.n_random}, expected ≥ 2")
        for key in (
            "kl_multiplier",
            "kl_budget",
            "generation_multiplier",
            "gt_f1_threshold",
            "equal_kl_at",
        ):
            if not math.isfinite(getattr(self, key)):
                raise ValueError(f"ConceptConfig: {key} = {getattr(self, key)}, expected a "
                                 "finite number")  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ConceptResult:
    name: str
    model: str
    vectors: dict[str, Tensor]
    meta: dict[str, Any]
    sweep: LayerSweep
    evaluation: dict[str, Any] = field(default_factory=dict)  # beyond the sweep
    decomposition: dict[str, Any] = field(default_factory=dict)

    def evaluation_dict(self) -> dict[str, Any]:
        return {"concept": self.name, "model": self.model, "sweep": self.sweep.to_dict(),
                **self.evaluation}  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {"meta": self.meta, "evaluation": self.evaluation_dict(),
                "decomposition": self.decomposition}  # fmt: skip


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, Tensor):
        return _jsonable(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def run_concept(
    model: HookedTransformer,
    s: SteeringSet,
    hooks: list[str],
    saes: dict[str, Any],
    store=None,
    cfg: ConceptConfig | None = None,
    *,
    model_name: str = "",
    neutral_tokens: Tensor | None = None,
    ground_truth: dict[str, list[int]] | None = None,
    input_hashes: dict[str, str] | None = None,
) -> ConceptResult:
    """Vectors at each hook, layer sweep, SAE decomposition at the chosen hook (or the best
    hook with an SAE), downstream effects, probes, targeted-vs-raw, generations.

    `store` (an ActivationStore) supplies held-out windows (unless `neutral_tokens`),
    concept labels for ground-truth latents and probes; without it those parts are
    skipped. `ground_truth` (hook -> latent ids) overrides the latents found from labels.
    """
    cfg = cfg or ConceptConfig()
    t0 = time.perf_counter()
    check_hooks(model, hooks, "steering.hooks")
    check_hooks(model, list(saes), "steering.saes")
    if not s.train_pairs:
        raise ValueError(f"steering set '{s.name}': no training pairs")
    if not s.eval_prompts:
        raise ValueError(f"steering set '{s.name}': no eval prompts")
    if neutral_tokens is None:
        if store is None:
            raise ValueError("run_concept: give a store or neutral_tokens for side effects")
        neutral_tokens = store.windows("heldout", max_windows=cfg.n_windows)
    tokens = neutral_tokens[: cfg.n_windows]
    bs = cfg.batch_size

    vectors = compute_vectors(model, s.train_pairs, hooks, cfg.method, batch_size=bs)
    meta = {
        "concept": s.name, "model": model_name, "method": cfg.method,
        "read_position": sorted({str(p.read_position) for p in s.train_pairs}),
        "n_pairs": len(s.train_pairs),
        "normalised": False,
        "multiplier_scale": "raw mean difference: multiplier 1 = the natural contrast",
        "input_hashes": {"set": s.content_hash(), "pairs": pairs_hash(s.train_pairs),
                         **(input_hashes or {})},
    }  # fmt: skip
    sweep = layer_sweep(model, s, vectors, tokens, multipliers=cfg.multipliers,
                        kl_multiplier=cfg.kl_multiplier, kl_budget=cfg.kl_budget,
                        positions=cfg.positions, side_positions=cfg.side_positions,
                        batch_size=bs)  # fmt: skip
    best = sweep.best_hook
    ev: dict[str, Any] = {"config": cfg.to_dict(), "set": s.to_dict()}
    with_sae = [h for h in hooks if h in saes]
    dh = (best if best in saes else max(with_sae, key=lambda h: sweep.steerability[h].slope)
          ) if with_sae else None  # fmt: skip

    def controls(h: str, named: dict[str, Tensor], kl: bool = True) -> dict[str, Any]:
        return controlled_effects(model, s, h, named, cfg.multipliers,
                                  tokens[: cfg.kl_windows] if kl else None,
                                  n_random=cfg.n_random, seed=cfg.seed,
                                  equal_kl_at=cfg.equal_kl_at, positions=cfg.positions,
                                  side_positions=cfg.side_positions, batch_size=bs)  # fmt: skip

    # every hook's raw vector against random directions (the decomposition hook's below,
    # with the targeted variants)
    # with, the decomposition hook's below with the targeted variants and at equal KL)
    ev["controls"] = {h: controls(h, {"raw": vectors[h]}, kl=False) for h in hooks if h != dh}
    # do held-out pairs give the same vector?
    if s.heldout_pairs:
        vh = compute_vectors(model, s.heldout_pairs, hooks, cfg.method, batch_size=bs,
                             allow_heldout=True)  # fmt: skip
        ev["heldout_pair_cosine"] = {
            h: float(torch.nn.functional.cosine_similarity(vectors[h], vh[h], dim=0)) for h in hooks
        }
    m = cfg.generation_multiplier
    prompts = [e.prompt for e in s.eval_prompts[: cfg.n_generations]]
    ev["generations"] = {
        "hook": best,
        "prompts": prompts,
        "by_multiplier": {str(mult): generate_steered(
            model, prompts, best, vectors[best], mult, positions=cfg.positions,
            max_new_tokens=cfg.max_new_tokens) for mult in (-m, 0.0, m)},
    }  # fmt: skip
    result = ConceptResult(s.name, model_name, vectors, meta, sweep, ev)

    # ---- probes (every hook the store caches)
    if store is not None and s.concept and s.concept in store.concept_names:
        probes = {}
        for h in hooks:
            if h in store.hooks:
                p = concept_probe(store, h, s.concept, s.negative_concept, cfg.probe_rows,
                                  cfg.seed)  # fmt: skip
                probes[h] = p
        ev["probes"] = {h: p.to_dict() for h, p in probes.items()}
    else:
        probes = {}

    # ---- decomposition at the chosen hook, or the best-steering hook that has an SAE
    if dh is None:
        log.info("steering %s: no SAE at %s; decomposition skipped", s.name, hooks)
        result.decomposition = {"skipped": "no SAE at any steering hook"}
        ev["seconds"] = time.perf_counter() - t0
        return result
    sae, v = saes[dh], vectors[dh]
    W = sae.W_dec.detach()
    x_eval = read_activations(model, [e.prompt for e in s.eval_prompts], [dh], -1, bs)[dh]
    enc_v = D.encode_vector(sae, v)
    shift = D.encode_shift(sae, x_eval, v, 1.0)
    dec = D.nn_decompose(v, W, cfg.max_features, cfg.n_candidates)
    rankings = {
        "nnls": dec.top(len(dec.features)),
        "cosine": D.top_by_cosine(v, W, max(cfg.ks + (cfg.top_n,)))[0],
        "encode": D.top_by_value(enc_v, max(cfg.ks + (cfg.top_n,)))[0],
        "encode_shift": D.top_by_value(shift, max(cfg.ks + (cfg.top_n,)))[0],
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
        if dh in probes:
            dirs["probe"] = probes[dh].weight.float()
        dd["cosines"] = cosine_table(dirs)
    # ---- downstream: steer at each hook, read every later hook with an SAE
    dd["downstream"] = {h: downstream_effects(model, h, vectors[h], cfg.kl_multiplier, tokens,
                                              saes, positions=cfg.side_positions,
                                              top_n=cfg.top_n).to_dict()
                        for h in hooks}  # fmt: skip
    # ---- targeted vs raw vs random
    tv = targeted_vectors(v, W, dec, cfg.targeted_k, cfg.seed, 1)
    dd["targeted"] = {"hook": dh, "k": cfg.targeted_k,
                      "vectors": compare_vectors(model, s, dh, tv, cfg.multipliers, tokens,
                                                 cfg.kl_multiplier, positions=cfg.positions,
                                                 side_positions=cfg.side_positions,
                                                 batch_size=bs)}  # fmt: skip
    # the raw vector and every variant against the same random directions, at equal norm
    # and at equal KL
    ev["controls"][dh] = dd["controls"] = controls(dh, {k: x for k, x in tv.items()
                                                         if k != "random"})  # fmt: skip
    # which latents carry the behaviour: attribution patching against true ablation
    dd["attribution"] = attribution_vs_ablation(model, s, dh, sae, cfg.attribution_sample,
                                                cfg.attribution_sample, cfg.seed)  # fmt: skip
    result.decomposition = dd
    ev["seconds"] = time.perf_counter() - t0
    return result


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


def write_concept(result: ConceptResult, steering_dir: Path, decomposition_dir: Path) -> Path:
    """Write `<steering_dir>/<concept>/` and `<decomposition_dir>/<concept>/`; returns the
    steering folder."""
    # the set's name was checked when read (stages.layout.safe_name); `inside` and
    # `within` refuse a folder outside these roots anyway
    out = inside(steering_dir, safe_name(result.name, "steering set name"))
    with atomic_dir(out, within=steering_dir) as tmp:
        save_vector(tmp, result.vectors, result.meta)
        # wall time stays out of the file (same inputs => same bytes); it is in `evaluation`
        ev = {k: v for k, v in result.evaluation_dict().items() if k != "seconds"}
        write_json(tmp / "evaluation.json", _jsonable(ev))
    with atomic_dir(inside(decomposition_dir, result.name), within=decomposition_dir) as tmp:
        write_json(tmp / "decomposition.json",
                   _jsonable({"concept": result.name, "model": result.model,
                              **result.decomposition}))  # fmt: skip
    log.info("steering %s: wrote %s", result.name, out)
    return out


def figures(result: ConceptResult) -> dict[str, Figure]:
    """Steerability curves, layer sweep, decomposition bars + error curve, downstream
    heatmap, targeted vs raw. Each redrawable from the JSON (same keys)."""
    return figures_from_dict(_jsonable(result.to_dict()))


def figures_from_dict(d: dict[str, Any]) -> dict[str, Figure]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev, dd = d["evaluation"], d.get("decomposition", {})
    name = ev["concept"]
    figs: dict[str, Figure] = {}
    sw = ev["sweep"]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for h, st in sw["steerability"].items():
        ax.plot(st["multipliers"], st["mean_metric"], marker="o",
                label=f"{h} (slope {st['slope']:.2f})")  # fmt: skip
    ax.axvline(0, color="grey", lw=0.5)
    ax.set(xlabel="multiplier (× raw mean difference)", ylabel="log-odds positive vs negative",
           title=f"{name}: steerability")  # fmt: skip
    ax.legend(fontsize=7)
    fig.tight_layout()
    figs["steerability"] = fig

    hs = list(sw["steerability"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(range(len(hs)), [sw["steerability"][h]["slope"] for h in hs], color="C0")
    ax2 = ax.twinx()
    ax2.plot(range(len(hs)), [sw["side_effects"][h]["kl"] for h in hs], "o-", color="C3")
    ax2.axhline(sw["kl_budget"], color="C3", ls="--", lw=0.8)
    ax.set_xticks(range(len(hs)), hs, rotation=20, fontsize=7)
    ax.set(ylabel="steerability (slope)", title=f"{name}: layer sweep (best {sw['best_hook']})")
    ax2.set_ylabel(f"KL at ×{sw['kl_multiplier']:g}", color="C3")
    fig.tight_layout()
    figs["layer_sweep"] = fig

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


def concept_headline(ev: dict, dd: dict) -> dict[str, float]:
    """The numbers a reader compares across experiments (DVC metrics / MLflow)."""
    sweep = ev["sweep"]
    best = sweep["best_hook"]
    st, se = sweep["steerability"][best], sweep["side_effects"][best]
    out = {"steerability": st["slope"], "wrong_way_fraction": st["wrong_way_fraction"],
           "kl": se["kl"], "ce_rise": se["ce_rise"],
           "within_kl_budget": float(sweep["within_budget"])}  # fmt: skip
    probes = ev.get("probes", {})
    if best in probes:
        out["probe_heldout_accuracy"] = probes[best]["heldout_accuracy"]
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
    for ranking, at in dd.get("precision_at_k_read_position", {}).items():
        if "5" in at:
            out[f"precision_at_5_{ranking}_read_position"] = at["5"]
    for kind, r in dd.get("targeted", {}).get("vectors", {}).items():
        out[f"targeted.{kind}.steerability"] = r["slope"]
        out[f"targeted.{kind}.kl"] = r["kl"]
    # the raw vector at the best hook; the targeted variants (and the equal-KL test) at
    # the decomposition hook, the same hook by default
    out.update(control_headline(ev.get("controls", {}).get(best), raw=True))
    out.update(control_headline(dd.get("controls"), raw=False))
    # an undefined number (no null spread, a KL target never reached) is left out: the
    # metrics file stays strict JSON and an absent key reads as "not measured"
    return {k: round(float(v), 6) for k, v in out.items()
            if v is not None and math.isfinite(float(v))}  # fmt: skip


def control_headline(c: dict | None, raw: bool = True) -> dict[str, float]:
    """Flat metrics of one hook's `controls.controlled_effects`. With `raw`: the raw
    vector's steerability against random directions of its norm (`steerability_z`,
    `steerability_p`, `_null_mean`, `_null_sd`, `_ci95_lo/hi`). Without: each targeted
    variant rescaled to the raw norm (`targeted.<kind>.equal_norm.*`) and every vector at
    the equal-KL multiplier (`targeted.<kind>.equal_kl.*`, `equal_kl.raw.*`)."""
    if not c:
        return {}
    out: dict[str, float] = {"random.n": c["n_random"], "random.p_floor": c["p_floor"]}
    for kind, r in c["vectors"].items():
        own, eq = r["own_norm"], r["equal_norm"]
        if raw and kind == "raw":
            out["steerability_ci95_lo"], out["steerability_ci95_hi"] = own["ci95"]
            for key in ("z", "p", "null_mean", "null_sd"):
                out[f"steerability_{key}"] = eq[key]
        if raw:
            continue
        pre = f"targeted.{kind}"
        if kind != "raw":
            out[f"{pre}.norm"] = r["norm"]
            out[f"{pre}.ci95_lo"], out[f"{pre}.ci95_hi"] = own["ci95"]
            out[f"{pre}.equal_norm.steerability"] = eq["steerability"]
            for key in ("z", "p", "null_mean", "null_sd"):
                out[f"{pre}.equal_norm.{key}"] = eq[key]
        kl = r.get("equal_kl")
        if kl:
            p2 = "equal_kl.raw" if kind == "raw" else f"{pre}.equal_kl"
            for key in ("effect", "multiplier", "z", "p", "null_mean", "null_sd"):
                out[f"{p2}.{key}"] = kl[key]
            out[f"{p2}.ci95_lo"], out[f"{p2}.ci95_hi"] = kl["ci95"]
    if "equal_kl" in c and not raw:
        out["equal_kl.target_kl"] = c["equal_kl"]["target_kl"]
    return out
