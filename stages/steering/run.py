"""The steering analysis of one concept (the `steering@<model>` stage), its files and figures.

    result = run_concept(model, steering_set, hooks, store, ConceptConfig())
    write_concept(result, Path("data/steering/toy-a"))
    figs = figures(result)          # name -> matplotlib Figure

No SAE is read here: the vectors' decomposition into SAE features, downstream effects,
targeted variants and attribution are `decompose_run.py` (the `decompose@<model>` stage),
which reads these files, so changing the SAE sweep does not re-run the vectors.

Files (the folder written atomically):

    <steering_dir>/<concept>/vector.safetensors   one float32 tensor per hook (key = hook)
    <steering_dir>/<concept>/probe.safetensors    the concept probe's direction per hook
    <steering_dir>/<concept>/meta.json            model, hooks, method, read position(s),
                                                  n pairs, input hashes, norm per hook
    <steering_dir>/<concept>/evaluation.json      layer sweep (steerability curves, KL, CE
                                                  rise), best hook, random-direction
                                                  controls per hook, directional ablation
                                                  and ablate+add per hook, generations,
                                                  probes
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
from safetensors.torch import save_file
from torch import Tensor

from stages.activations import check_hooks
from stages.io import atomic_dir, load_safetensors, write_json
from stages.layout import inside, safe_name
from stages.steering.apply import generate_steered
from stages.steering.controls import controlled_effects
from stages.steering.evaluate import DEFAULT_MULTIPLIERS, LayerSweep, layer_sweep
from stages.steering.interventions import directional_ablation
from stages.steering.multilayer import multilayer_headline, multilayer_steering
from stages.steering.probes import concept_probe
from stages.steering.prompts import SteeringSet
from stages.steering.stability import stability_headline, vector_stability
from stages.steering.vectors import (
    compute_vectors,
    pairs_hash,
    save_vector,
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
    multilayer: bool = True  # every steering hook at once (multilayer.py)
    stability_splits: int = 20  # random halves of the pairs; 0: no stability (stability.py)
    stability_effect_splits: int = 1  # splits whose two half vectors also steer
    similarity_draws: int = 1000  # bootstrap / permutation draws (similarity.py)
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
    ablation_random: int = 8  # directional ablation / ablate+add: random directions
    ablate_add_multipliers: tuple[float, ...] = (-1.0, 0.0, 1.0)
    clamp_multiples: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)  # × max on positives
    clamp_at: float = 1.0  # the tested clamp (the grid is for the figure)
    clamp_random: int = 32  # random active-latent sets clamped the same way
    clamp_kl_random: int = 4  # of those, how many also get their KL measured
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
    probes: dict[str, Tensor] = field(default_factory=dict)  # hook -> probe direction

    def evaluation_dict(self) -> dict[str, Any]:
        return {"concept": self.name, "model": self.model, "sweep": self.sweep.to_dict(),
                **self.evaluation}  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        return {"meta": self.meta, "evaluation": self.evaluation_dict()}


def jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [jsonable(v) for v in x]
    if isinstance(x, Tensor):
        return jsonable(x.tolist())
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, float) and not np.isfinite(x):
        return None
    return x


def run_concept(
    model: HookedTransformer,
    s: SteeringSet,
    hooks: list[str],
    store=None,
    cfg: ConceptConfig | None = None,
    *,
    model_name: str = "",
    neutral_tokens: Tensor | None = None,
    input_hashes: dict[str, str] | None = None,
) -> ConceptResult:
    """Vectors at each hook, layer sweep, every hook's vector against random directions
    of its norm, held-out pair agreement, concept probes, generations.

    `store` (an ActivationStore) supplies held-out windows (unless `neutral_tokens`) and
    the concept labels for the probes; without it the probes are skipped.
    """
    cfg = cfg or ConceptConfig()
    t0 = time.perf_counter()
    check_hooks(model, hooks, "steering.hooks")
    if not s.train_pairs:
        raise ValueError(f"steering set '{s.name}': no training pairs")
    if not s.eval_prompts:
        raise ValueError(f"steering set '{s.name}': no eval prompts")
    tokens = neutral_windows(store, neutral_tokens, cfg.n_windows, "run_concept")
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

    # every hook's raw vector against random directions of its norm (the decomposition
    # stage adds the targeted variants and the equal-KL test at its hook)
    ev["controls"] = {
        h: controlled_effects(model, s, h, {"raw": vectors[h]}, cfg.multipliers, None,
                              n_random=cfg.n_random, seed=cfg.seed,
                              equal_kl_at=cfg.equal_kl_at, positions=cfg.positions,
                              side_positions=cfg.side_positions, batch_size=bs)
        for h in hooks
    }  # fmt: skip
    # the rest of the seeds' programme: every hook at once, and the vector's stability
    # over halves of its pairs and over read positions
    if cfg.multilayer:
        ev["multilayer"] = multilayer_steering(model, s, vectors, best, cfg.multipliers,
                                               n_random=cfg.n_random, seed=cfg.seed)  # fmt: skip
    if cfg.stability_splits and len(s.train_pairs) >= 4:
        ev["stability"] = vector_stability(
            model, s, vectors, best, cfg.multipliers,
            ev["controls"][best]["null_equal_norm_slopes"], n_splits=cfg.stability_splits,
            n_effect_splits=cfg.stability_effect_splits, seed=cfg.seed, batch_size=bs)  # fmt: skip
    # directional ablation (does the pairs' contrast vanish?) and ablate+add, every hook,
    # against random directions of the vector's norm (stages/steering/interventions.py)
    # A set whose targets live on its eval prompts only (CAA A/B: each question has its
    # own answer letters) gives its pairs no targets to read a contrast at: not measured.
    if s.positive_targets and s.negative_targets:
        ev["directional_ablation"] = {
            h: directional_ablation(model, s, h, vectors[h],
                                    multipliers=tuple(cfg.ablate_add_multipliers),
                                    n_random=cfg.ablation_random, seed=cfg.seed, batch_size=bs)
            for h in hooks
        }  # fmt: skip
    else:
        ev["directional_ablation_skipped"] = (
            "the set's targets are per eval prompt, so its pairs have no targets to read the "
            "contrast at"
        )
        print(
            f"steering: {s.name}: directional ablation not measured "
            f"({ev['directional_ablation_skipped']})"
        )
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

    ev["seconds"] = time.perf_counter() - t0
    result.probes = {h: p.weight.detach().float() for h, p in probes.items()}
    return result


def neutral_windows(store, neutral_tokens: Tensor | None, n_windows: int, who: str) -> Tensor:
    """The first `n_windows` of `neutral_tokens`, or of the store's held-out windows:
    the neutral text side effects and downstream effects are measured on."""
    if neutral_tokens is None:
        if store is None:
            raise ValueError(f"{who}: give a store or neutral_tokens for side effects")
        neutral_tokens = store.windows("heldout", max_windows=n_windows)
    return neutral_tokens[:n_windows]


def write_concept(result: ConceptResult, steering_dir: Path) -> Path:
    """Write `<steering_dir>/<concept>/`; returns the folder."""
    # the set's name was checked when read (stages.layout.safe_name); `inside` and
    # `within` refuse a folder outside this root anyway
    out = inside(steering_dir, safe_name(result.name, "steering set name"))
    with atomic_dir(out, within=steering_dir) as tmp:
        save_vector(tmp, result.vectors, result.meta)
        if result.probes:
            save_file({h: w.contiguous() for h, w in result.probes.items()},
                      tmp / "probe.safetensors")  # fmt: skip
        # wall time stays out of the file (same inputs => same bytes); it is in `evaluation`
        ev = {k: v for k, v in result.evaluation_dict().items() if k != "seconds"}
        write_json(tmp / "evaluation.json", jsonable(ev))
    log.info("steering %s: wrote %s", result.name, out)
    return out


def load_probes(folder: Path) -> dict[str, Tensor]:
    """hook -> the concept probe's direction (raw activation space) that `write_concept`
    saved beside the vectors; empty when the concept had no probe."""
    path = Path(folder) / "probe.safetensors"
    return load_safetensors(path, "concept probes") if path.exists() else {}


def figures(result: ConceptResult) -> dict[str, Figure]:
    """Steerability curves and the layer sweep, redrawable from the JSON (same keys)."""
    return figures_from_dict(jsonable(result.to_dict()))


def figures_from_dict(d: dict[str, Any]) -> dict[str, Figure]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ev = d["evaluation"]
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

    da = ev.get("directional_ablation") or {}
    if da:
        hs = list(da)
        x = np.arange(len(hs))
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.5))
        for ax, key, get_v, get_null, ylab in (
            (a1, "ablate", lambda r: r["ablate"]["retained"],
             lambda r: r["ablate"]["null_retained"], "contrast retained (1 = untouched)"),
            (a2, "ablate_add", lambda r: r["ablate_add"]["steerability"],
             lambda r: r["ablate_add"]["null_slopes"], "ablate+add steerability"),
        ):  # fmt: skip
            vals = [np.nan if get_v(da[h]) is None else get_v(da[h]) for h in hs]
            ci = [[np.nan if u is None else u for u in (da[h]["ablate"]["retained_ci95"]
                   if key == "ablate" else da[h]["ablate_add"]["ci95"])] for h in hs]  # fmt: skip
            err = np.nan_to_num([[v - c[0] for v, c in zip(vals, ci, strict=True)],
                                 [c[1] - v for v, c in zip(vals, ci, strict=True)]])  # fmt: skip
            ax.bar(x - 0.2, vals, 0.4, yerr=err, color="C0", label="concept vector (95 % CI)")
            nulls = [np.asarray([u for u in get_null(da[h]) if u is not None], float) for h in hs]
            ax.errorbar(x + 0.2, [n.mean() if n.size else np.nan for n in nulls],
                        yerr=[n.std(ddof=1) if n.size > 1 else 0 for n in nulls], fmt="s",
                        color="grey", label="random directions (mean ± sd)")  # fmt: skip
            ax.axhline(1.0 if key == "ablate" else 0.0, color="black", lw=0.5)
            ax.set_xticks(x, hs, rotation=20, fontsize=7)
            ax.set(ylabel=ylab)
        a1.set_title("directional ablation", fontsize=9)
        a2.set_title("ablate + add", fontsize=9)
        a1.legend(fontsize=7)
        fig.suptitle(f"{name}: projecting the vector out, per hook", fontsize=9)
        fig.tight_layout()
        figs["ablation"] = fig
    return figs


def concept_headline(ev: dict) -> dict[str, float]:
    """The steering numbers a reader compares across experiments (DVC metrics / MLflow):
    the best hook's steerability, wrong-way fraction and side effects, its probe, and its
    raw vector against the random directions (`decompose_run.decomposition_headline` has
    the decomposition's)."""
    sweep = ev["sweep"]
    best = sweep["best_hook"]
    st, se = sweep["steerability"][best], sweep["side_effects"][best]
    out = {"steerability": st["slope"], "wrong_way_fraction": st["wrong_way_fraction"],
           "kl": se["kl"], "ce_rise": se["ce_rise"],
           "within_kl_budget": float(sweep["within_budget"])}  # fmt: skip
    probes = ev.get("probes", {})
    if best in probes:
        out["probe_heldout_accuracy"] = probes[best]["heldout_accuracy"]
    out.update(control_headline(ev.get("controls", {}).get(best), raw=True))
    out.update(multilayer_headline(ev.get("multilayer")))
    out.update(stability_headline(ev.get("stability"), best))
    out.update(ablation_headline((ev.get("directional_ablation") or {}).get(best)))
    return finite_rounded(out)


def ablation_headline(r: dict | None) -> dict[str, float]:
    """Flat metrics of one hook's `interventions.directional_ablation`: the pairs' contrast
    kept after projecting the vector out (`ablation.retained`, 1 = nothing removed, 0 =
    the neutral baseline) with its interval, the drop's z / p against random directions,
    and the ablate+add steerability against the same directions (`ablate_add.*`)."""
    if not r:
        return {}
    a, aa = r["ablate"], r["ablate_add"]
    out = {"ablation.clean_contrast": r["clean_contrast"], "ablation.retained": a["retained"],
           "ablation.random.n": r["n_random"], "ablation.random.p_floor": r["p_floor"],
           "ablate_add.steerability": aa["steerability"]}  # fmt: skip
    out["ablation.retained_ci95_lo"], out["ablation.retained_ci95_hi"] = a["retained_ci95"]
    out["ablate_add.ci95_lo"], out["ablate_add.ci95_hi"] = aa["ci95"]
    for key in ("z", "p", "null_mean", "null_sd"):
        out[f"ablation.drop_{key}"] = a[key]
        out[f"ablate_add.{key}"] = aa[key]
    return out


def finite_rounded(out: dict[str, Any]) -> dict[str, float]:
    """Rounded to 6 decimals; an undefined number (no null spread, a KL target never
    reached) is left out: the metrics file stays strict JSON, and an absent key reads as
    "not measured"."""
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
