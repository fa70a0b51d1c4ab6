"""Files and figures of one model pair's alignment (`data/alignment/<A>__<B>/`).

Layout written by `write_alignment` (atomically: a temporary folder renamed into place):

    scores.json        flat {name: number} headline scores — the DVC metrics file; every
                       permutation test as `<m>`, `<m>_p` (exact, floor `p_floor`),
                       `<m>_z`, `<m>_p_normal` (normal approx. of the permutation null)
                       and `<m>_p_holm`, `<m>_p_normal_holm` (Holm over the pair's tests)
    similarity.json    layer-by-layer matrices (hooks of A × hooks of B) per measure
                       (value, p, floor, z, p_normal), and every measure of the compared
                       hook pairs with p, floor, z, p_normal and both Holm-adjusted p;
                       `controls`: the same measures for (untrained A, untrained B) and
                       (trained A, untrained B) on the subsample (controls.py), also in
                       scores.json as `<m>_untrained`, `<m>_trained_vs_untrained` (+ `_p`,
                       `_z`) and `linear_cka_subsample` (the trained pair on those rows)
    null.json          per SAE pair: histograms of matched vs shuffled-null correlations
    ground_truth.json  per SAE pair and concept: best latents, their correlation, matched?
    matches/<hook>__<sae>.parquet   one row per match: latent_a, latent_b, correlation,
                       method (hungarian | max_ab | max_ba), jaccard (top-k distinct
                       token ids by max activation, matched latents; NaN for two
                       tokenizers without decoded strings),
                       decoder_cosine_procrustes, above_threshold, above_null
    meta.json          models, tokens used, token-alignment rule, Jaccard vocabulary,
                       the Holm family, config (timings: the
                       result's `timings`, logged to MLflow, not written: same bytes every run)

`figures(result)` returns the plots (matched correlations vs the null, CKA and mutual
kNN layer heatmaps, ground truth) as matplotlib Figures; the caller saves or logs them.
Figures are built with `matplotlib.figure.Figure`, never pyplot, so no global state.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from matplotlib.figure import Figure

from stages.alignment.pvalues import HOLM, SEQUENTIAL
from stages.alignment.similarity import PermutationTest, metric_title
from stages.alignment.stream import HOLM_FAMILY, AlignmentResult, SAEPairResult
from stages.io import atomic_dir, write_json

log = logging.getLogger(__name__)

HIST_EDGES = np.linspace(-1.0, 1.0, 101)  # fixed bins: histograms compare across runs


def _safe(obj: Any) -> Any:
    """JSON-ready: numpy scalars to Python, NaN / inf to None (strict JSON has neither)."""
    if isinstance(obj, dict):
        return {str(k): _safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_safe(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _safe(obj.tolist())
    if isinstance(obj, np.bool_ | bool):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    return obj


def _file_key(pair: SAEPairResult) -> str:
    return pair.key.replace("/", "__")


def similarity_record(result: AlignmentResult) -> dict[str, Any]:
    """Grids (p-values descriptive: not in the Holm family) and the compared hook pairs'
    tests with their Holm-adjusted p (the family: `stream.HOLM_FAMILY`)."""
    scores = result.scores
    return {
        "grid": {
            m: {
                "hooks_a": g.hooks_a,
                "hooks_b": g.hooks_b,
                "values": g.values,
                "p_values": g.p_values,
                "p_floor": g.p_floor,
                "z": g.z,
                "p_normal": g.p_normal,
                "n_permutations": g.n_permutations,
                "n_samples": g.n_samples,
            }  # fmt: skip
            for m, g in result.grid.items()
        },
        "hook_pairs": {
            name: {
                m: {
                    "value": t.statistic,
                    "p_value": t.p_value,
                    "p_floor": t.p_floor,
                    "z": t.z,
                    "p_normal": t.p_normal,
                    "p_holm": scores.get(f"{m}_p_holm/{name}"),
                    "p_normal_holm": scores.get(f"{m}_p_normal_holm/{name}"),
                    "n_permutations": t.n_permutations,
                    "max_permutations": t.max_permutations,  # sequential: its cap
                    "stop_after": t.stop_after,  # sequential: exceedances that stop it
                    "n_samples": t.n_samples,
                }
                for m, t in tests.items()
            }  # fmt: skip
            for name, tests in result.hook_pairs.items()
        },
        "correction": {
            "method": HOLM,
            "family": HOLM_FAMILY,
            "family_size": scores.get("holm_family_size"),
            # the largest Holm-adjusted p of a family whose tests all sit at their floors
            "holm_floor": scores.get("holm_floor"),
            "family_alpha": (alpha := result.config.family_alpha if result.config else None),
            "sequential": SEQUENTIAL if alpha is not None else None,
        },  # fmt: skip
        # the untrained-model controls (controls.py); empty when not run (a pretrained
        # model, or control_metrics = []); not in the Holm family
        "controls": {
            name: {
                m: {
                    c: (
                        {
                            "value": t.statistic,
                            "p_value": t.p_value,
                            "p_floor": t.p_floor,
                            "z": t.z,
                            "n_permutations": t.n_permutations,
                            "n_samples": t.n_samples,
                        }
                        if isinstance(t, PermutationTest)
                        else t
                    )
                    for c, t in tests.items()
                }  # fmt: skip
                for m, tests in cells.items()
            }
            for name, cells in result.controls.items()
        },
    }


def null_record(result: AlignmentResult) -> dict[str, Any]:
    out: dict[str, Any] = {"edges": HIST_EDGES}
    for p in result.pairs:
        out[p.key] = {
            "hungarian": {"observed": np.histogram(p.hungarian.score, HIST_EDGES)[0],
                          "null": np.histogram(p.null_hungarian.score, HIST_EDGES)[0]},
            "max": {"observed": np.histogram(p.max_ab.score, HIST_EDGES)[0],
                    "null": np.histogram(p.null_max.score, HIST_EDGES)[0]},
            "null_threshold": p.null_comparison.threshold,
            "null_quantile": p.null_comparison.quantile,
        }  # fmt: skip
    return out


def write_alignment(result: AlignmentResult, out_dir: Path) -> Path:
    """Write the alignment of one model pair into `out_dir` (replaced atomically)."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        (tmp / "matches").mkdir()
        for p in result.pairs:
            pq.write_table(p.table, tmp / "matches" / f"{_file_key(p)}.parquet")
        write_json(tmp / "scores.json", _safe(result.scores))
        write_json(tmp / "similarity.json", _safe(similarity_record(result)))
        write_json(tmp / "null.json", _safe(null_record(result)))
        write_json(tmp / "ground_truth.json", _safe({p.key: p.ground_truth for p in result.pairs}))
        meta = {
            "model_a": result.model_a,
            "model_b": result.model_b,
            "n_tokens": result.n_tokens,
            "n_heldout_tokens": result.n_heldout_tokens,
            "token_rule": result.token_rule,
            "jaccard_vocabulary": result.jaccard_vocabulary,
            "correction": {"method": HOLM, "family": HOLM_FAMILY},
            "config": dataclasses.asdict(result.config) if result.config else None,
            "sae_pairs": [p.key for p in result.pairs],
            "trained": result.trained,
        }
        write_json(tmp / "meta.json", _safe(meta))
    log.info("alignment %s vs %s written to %s", result.model_a, result.model_b, out_dir)
    return out_dir


# --------------------------------------------------------------------------- figures


def _null_figure(p: SAEPairResult, threshold: float | None) -> Figure:
    fig = Figure(figsize=(6, 3.5), layout="constrained")
    ax = fig.add_subplot()
    lo = min(0.0, float(p.null_hungarian.score.min()), float(p.hungarian.score.min()))
    edges = HIST_EDGES[HIST_EDGES >= np.floor(lo * 50) / 50 - 1e-9]
    ax.hist(p.hungarian.score, edges, density=True, alpha=0.7, label="matched (Hungarian)")
    ax.hist(p.null_hungarian.score, edges, density=True, alpha=0.7, label="shuffled-token null")
    ax.axvline(p.null_comparison.threshold, color="k", ls=":", lw=1,
               label=f"null q{p.null_comparison.quantile:g}")  # fmt: skip
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax.set_xlabel("correlation of matched latents")
    ax.set_ylabel("density")
    ax.set_title(f"{p.key}: matched vs null", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def _heatmap(values: np.ndarray, rows: list[str], cols: list[str], title: str, a: str, b: str):
    fig = Figure(figsize=(1.6 + 1.1 * len(cols), 1.2 + 0.8 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis")
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel(b)
    ax.set_ylabel(a)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    return fig


def _ground_truth_figure(p: SAEPairResult) -> Figure:
    concepts = sorted(p.ground_truth)
    fig = Figure(figsize=(1.5 + 0.5 * len(concepts), 3.5), layout="constrained")
    ax = fig.add_subplot()
    corr = [float(p.ground_truth[c]["correlation"]) for c in concepts]  # type: ignore[arg-type]
    matched = [bool(p.ground_truth[c]["hungarian"]) for c in concepts]
    ax.bar(range(len(concepts)), corr, color=["tab:green" if m else "tab:red" for m in matched])
    ax.set_xticks(range(len(concepts)), concepts, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("corr(best latent A, best latent B)")
    frac = np.mean(matched) if matched else float("nan")
    ax.set_title(f"{p.key}: concepts matched (green) {frac:.0%}", fontsize=9)
    return fig


def figures(result: AlignmentResult) -> dict[str, Figure]:
    """name -> Figure: matched vs null per SAE pair, CKA and mutual-kNN layer heatmaps,
    ground truth per SAE pair (when the stores carry concept labels)."""
    threshold = result.config.threshold if result.config else None
    figs: dict[str, Figure] = {}
    for p in result.pairs:
        figs[f"matched_vs_null__{_file_key(p)}"] = _null_figure(p, threshold)
        if p.ground_truth:
            figs[f"ground_truth__{_file_key(p)}"] = _ground_truth_figure(p)
    short = {"linear_cka": "cka", "mutual_knn": "mutual_knn"}
    for metric, g in result.grid.items():
        figs[f"{short.get(metric, metric)}_layers"] = _heatmap(
            g.values, g.hooks_a, g.hooks_b, f"{metric_title(metric)} (n = {g.n_samples})",
            result.model_a, result.model_b,
        )  # fmt: skip
    return figs
