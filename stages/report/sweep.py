"""The SAE-sweep section: L0–FVU and L0–ΔCE Pareto frontiers per architecture,
log10 feature-density histograms, the sweep table, and the concept ground-truth table.

Everything here reads the SAE folders only (`metrics.json`, `sparsity.safetensors`,
`cfg.json`); no model or activations are touched.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.report.html import ReportContext, Section, e, fmt, not_run, table
from stages.sae.registry import plot_style  # a stable colour and marker per architecture


@dataclass
class SAERef:
    """One trained SAE folder `data/saes/<model>/<hook>/<name>/` and its metrics."""

    model: str
    hook: str
    name: str
    path: Path
    architecture: str
    metrics: dict[str, Any]
    d_sae: int | None = None

    @property
    def key(self) -> str:
        return f"{self.model}/{self.hook}/{self.name}"

    def flat(self) -> dict[str, float]:
        m, down = self.metrics, self.metrics.get("downstream") or {}
        gt = self.metrics.get("ground_truth") or {}
        return {
            "l0": m.get("l0"),
            "fvu": m.get("fvu"),
            "explained_variance": m.get("explained_variance"),
            "dead_fraction": m.get("dead_fraction"),
            "dense_fraction": m.get("dense_fraction"),
            "shrinkage": m.get("shrinkage"),
            "ce_loss_recovered": down.get("ce_loss_recovered"),
            "kl_sae": down.get("kl_sae"),
            "ce_delta_sae": down.get("ce_delta_sae"),
            "ce_delta_pca": down.get("ce_delta_pca"),
            "kl_sae_over_pca": down.get("kl_sae_over_pca"),
            "mean_best_f1": gt.get("mean_best_f1"),
            "target_l0": m.get("target_l0"),  # k, or the target_l0 it was calibrated to
        }


def discover_saes(saes_dir: Path, models: list[str] | None = None) -> list[SAERef]:
    """Every SAE folder under `saes_dir/<model>/<hook>/<name>/` holding a cfg.json,
    in model, hook, sweep order (the order of `metrics/saes` is alphabetical; we keep
    architecture then width then name so a sweep reads left to right)."""
    saes_dir = Path(saes_dir)
    out: list[SAERef] = []
    if not saes_dir.is_dir():
        return out
    for mdir in sorted(p for p in saes_dir.iterdir() if p.is_dir() and "." not in p.name):
        if models is not None and mdir.name not in models:
            continue
        for hdir in sorted(p for p in mdir.iterdir() if p.is_dir()):
            for sdir in sorted(p for p in hdir.iterdir() if (p / "cfg.json").exists()):
                cfg = json.loads((sdir / "cfg.json").read_text())
                meta = cfg.get("metadata") or {}
                arch = meta.get("training_architecture") or cfg.get("architecture", "?")
                mpath = sdir / "metrics.json"
                metrics = json.loads(mpath.read_text()) if mpath.exists() else {}
                out.append(SAERef(mdir.name, hdir.name, sdir.name, sdir, arch, metrics,
                                  cfg.get("d_sae")))  # fmt: skip
    return out


def pareto_front(points: list[tuple[float, float]], higher_is_better: bool) -> list[tuple]:
    """Non-dominated points (lower L0 is better; y better per `higher_is_better`), by L0."""
    pts = sorted((x, y) for x, y in points if _finite(x) and _finite(y))
    front, best = [], -math.inf
    for x, y in pts:
        score = y if higher_is_better else -y
        if score > best:
            front.append((x, y))
            best = score
    return front


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def pareto_figure(saes: list[SAERef], title: str):
    import matplotlib.pyplot as plt

    from stages.sae.figures import mark_targets

    fig, axes = plt.subplots(1, 2, figsize=(10.5, 4))
    # ΔCE, not CE loss recovered: zero-ablation costs more than the unigram entropy here,
    # so CE recovered saturates near 1 for every usable SAE (the sweep table keeps it).
    # Both axes logarithmic: an L1 SAE far off the frontier would flatten the others.
    panels = (
        (axes[0], "fvu", "FVU (lower is better)", False),
        (axes[1], "ce_delta_sae", "ΔCE, nats (lower is better)", False),
    )
    for ax, key, label, higher in panels:
        mark_targets(ax, [s.flat()["target_l0"] for s in saes])
        by_arch: dict[str, list[tuple[float, float, str]]] = defaultdict(list)
        for s in saes:
            f = s.flat()
            if _finite(f["l0"]) and _finite(f[key]):
                by_arch[s.architecture].append((f["l0"], f[key], s.name))
        for arch in sorted(by_arch):
            colour, marker = plot_style(arch)
            pts = by_arch[arch]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], color=colour, marker=marker,
                       s=38, label=arch, zorder=3)  # fmt: skip
            front = pareto_front([(p[0], p[1]) for p in pts], higher)
            if len(front) > 1:
                ax.plot(*zip(*front, strict=True), color=colour, lw=1.4, zorder=2)
        ax.set_xscale("log")
        if all(p[1] > 0 for pts in by_arch.values() for p in pts) and by_arch:
            ax.set_yscale("log")
        ax.set_xlabel("L0 (active latents per token, held-out)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        if not by_arch:
            ax.text(0.5, 0.5, f"no {key} in metrics.json", ha="center", transform=ax.transAxes)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        axes[0].legend(handles, labels, title="architecture", fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def density_figure(saes: list[SAERef], title: str, with_hook: bool = False):
    """Small multiples: log10 feature density per SAE (from `sparsity.safetensors`),
    each titled by the SAE's name (and its hook, `with_hook`)."""
    import matplotlib.pyplot as plt

    from stages.sae.io import load_log_feature_density

    n = len(saes)
    cols = min(4, n)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.1 * cols, 2.5 * rows), squeeze=False)
    bins = np.linspace(-8, 0, 41)
    for ax, s in zip(axes.flat, saes, strict=False):
        dens = load_log_feature_density(s.path)
        colour = plot_style(s.architecture)[0]
        if dens is None:
            ax.text(0.5, 0.5, "no sparsity.safetensors", ha="center", transform=ax.transAxes)
        else:
            d = dens.float().numpy()
            dead = int((d <= -9.5).sum())  # log10(0 + 1e-10) = -10: never fired
            ax.hist(np.clip(d[d > -9.5], -8, 0), bins=bins, color=colour, alpha=0.85)
            ax.axvline(-1, color="#444", ls=":", lw=1)  # dense threshold: 10 % of tokens
            ax.text(0.02, 0.95, f"dead {dead}/{len(d)}", transform=ax.transAxes, va="top",
                    fontsize=8)  # fmt: skip
        ax.set_title(f"{s.hook}\n{s.name}" if with_hook else s.name, fontsize=9)
        ax.set_xlabel("log10 density", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def sweep_section(
    ctx: ReportContext,
    saes: list[SAERef],
    saes_dir: Path,
    dashboard_links: dict[str, str] | None = None,
) -> Section:
    """Pareto frontiers, density histograms and the sweep table, per model and hook.

    `dashboard_links` maps an SAE's key (model/hook/name) to the relative URL of its
    dashboard index, for the table's link column."""
    links = dashboard_links or {}
    if not saes:
        return Section("sweep", "SAE sweep", not_run("SAE sweep", str(saes_dir)))
    parts = []
    groups: dict[tuple[str, str], list[SAERef]] = defaultdict(list)
    for s in saes:
        groups[(s.model, s.hook)].append(s)
    for model in dict.fromkeys(m for m, _ in groups):
        src = [Path(saes_dir) / model]
        hooks = {h: g for (m, h), g in groups.items() if m == model}
        for hook, group in hooks.items():
            if len(group) > 1:
                parts.append(f"<h3>{e(model)} · <code>{e(hook)}</code></h3>")
                parts.append(_pareto_block(ctx, model, hook, group, src))
                parts.append(_density_block(ctx, f"{model}__{hook}", f"{model} {hook}", group, src))
                parts.append(_sweep_table(group, links))
                parts.append(
                    '<p class="muted">Metrics from each SAE folder\'s <code>metrics.json</code> '
                    f"under <code>{e(Path(saes_dir) / model / hook)}</code>; linked names open "
                    "the SAE's feature dashboards. CE recovered is taken against "
                    "zero-ablation, which can cost more than the unigram entropy, so it "
                    "saturates; ΔCE is the rise in cross-entropy (nats) with the SAE spliced "
                    "in, beside the same for the held-out activations projected on their "
                    "top-round(L0) principal components (a dense code with as many numbers "
                    "per token); KL / PCA's below 1 means the SAE beats that baseline.</p>"
                )
        # A hook with one SAE has no frontier to draw: those hooks share one table and
        # one density figure instead of a one-dot Pareto figure each.
        single = [g[0] for g in hooks.values() if len(g) == 1]
        if single:
            parts.append(f"<h3>{e(model)} · hooks with one SAE</h3>")
            parts.append(_density_block(ctx, f"{model}__single", f"{model}, hooks with one SAE",
                                        single, src, with_hook=True))  # fmt: skip
            parts.append(_sweep_table(single, links, with_hook=True))
            parts.append(
                '<p class="muted">One SAE on each of these hooks, so no sparsity–quality '
                "frontier to draw; metrics from each SAE folder's <code>metrics.json</code> "
                f"under <code>{e(Path(saes_dir) / model)}/&lt;hook&gt;/</code>.</p>"
            )
    return Section("sweep", "SAE sweep", "".join(parts))


def _pareto_block(ctx: ReportContext, model: str, hook: str, group: list[SAERef], src) -> str:
    block, _ = ctx.figure(
        pareto_figure(group, f"{model} {hook}: sparsity vs reconstruction"),
        f"sweep/{model}__{hook}__pareto",
        title=f"L0–FVU and L0–ΔCE Pareto frontiers, {model} {hook}",
        description=(
            "Each point is one SAE of the sweep, evaluated on held-out rows; lines join "
            "each architecture's non-dominated SAEs (lower L0 and better quality). Grey "
            "bands: each SAE's intended L0 (TopK's k, or the target_l0 an L1-family SAE "
            "was calibrated to) ±10 %: SAEs inside one band are compared at matched L0. "
            "ΔCE: the rise in next-token cross-entropy (nats) with the SAE spliced in; "
            "log axes."
        ),
        inputs=src,
    )
    return block


def _density_block(ctx: ReportContext, key: str, where: str, group: list[SAERef], src,
                   with_hook: bool = False) -> str:  # fmt: skip
    block, _ = ctx.figure(
        density_figure(group, f"{where}: feature density", with_hook=with_hook),
        f"sweep/{key}__density",
        title=f"Feature-density histograms, {where}",
        description=(
            "log10 of the fraction of held-out tokens on which each latent fires "
            "(sparsity.safetensors); dotted line: the dense threshold (10 %); dead "
            "latents never fire and are counted, not drawn."
        ),
        inputs=src,
    )
    return block


def _sweep_table(group: list[SAERef], links: dict[str, str], with_hook: bool = False) -> str:
    rows = []
    for s in group:
        f = s.flat()
        link = links.get(s.key)
        name = f'<a href="{e(link)}">{e(s.name)}</a>' if link else e(s.name)
        hook = [f"<code>{e(s.hook)}</code>"] if with_hook else []
        rows.append([*hook, name, e(s.architecture), fmt(f["target_l0"], 2), fmt(f["l0"], 2),
                     fmt(f["fvu"]),
                     fmt(f["ce_loss_recovered"]), fmt(f["ce_delta_sae"]), fmt(f["ce_delta_pca"]),
                     fmt(f["kl_sae"]), fmt(f["kl_sae_over_pca"]), fmt(f["dead_fraction"]),
                     fmt(f["dense_fraction"]), fmt(f["shrinkage"]), fmt(f["mean_best_f1"])])  # fmt: skip
    headers = ["SAE", "architecture", "target L0", "L0", "FVU", "CE rec.", "ΔCE (nats)",
               "ΔCE PCA rank L0", "KL", "KL / PCA's", "dead", "dense", "γ",
               "mean best F1"]  # fmt: skip
    return table(["hook", *headers] if with_hook else headers, rows, left=3 if with_hook else 2)


def concept_table_section(
    saes: list[SAERef],
    dashboard_pages: dict[tuple[str, int], str] | None = None,
) -> Section:
    """Concept ground truth: per concept, each SAE's best single latent and its F1 / AUROC
    (from `metrics.json` → `ground_truth`). Latent ids link to their dashboard when one
    exists (`dashboard_pages` maps (sae key, feature) to a relative URL)."""
    pages = dashboard_pages or {}
    with_gt = [s for s in saes if (s.metrics.get("ground_truth") or {}).get("concepts")]
    if not with_gt:
        return Section(
            "concepts",
            "Concept ground truth",
            '<p class="note"><b>Not run.</b> No SAE has concept ground truth '
            "(<code>metrics.json → ground_truth</code>): the corpus has no concept labels.</p>",
        )
    parts = [
        "<p>For every planted concept, the single latent of each SAE whose firing best "
        "predicts the concept's tokens (F1 on held-out tokens, AUROC of its activation). "
        "Linked latents have a dashboard.</p>"
    ]
    groups: dict[tuple[str, str], list[SAERef]] = defaultdict(list)
    for s in with_gt:
        groups[(s.model, s.hook)].append(s)
    for (model, hook), group in groups.items():
        concepts = list(group[0].metrics["ground_truth"]["concepts"])
        rows = []
        for c in concepts:
            row = [e(c), str(group[0].metrics["ground_truth"]["concepts"][c].get("n_positive", ""))]
            for s in group:
                v = s.metrics["ground_truth"]["concepts"].get(c) or {}
                lat = v.get("best_latent")
                link = pages.get((s.key, int(lat))) if lat is not None else None
                lat_html = f'<a href="{e(link)}">#{lat}</a>' if link else f"#{lat}"
                row.append(f"{fmt(v.get('f1'), 2)} <span class='muted'>{lat_html}</span>")
            rows.append(row)
        mean = ["<b>mean best F1</b>", ""] + [
            f"<b>{fmt(s.metrics['ground_truth'].get('mean_best_f1'), 3)}</b>" for s in group
        ]
        rows.append(mean)
        parts.append(f"<h3>{e(model)} · <code>{e(hook)}</code></h3>")
        parts.append(table(["concept", "n tokens", *[e(s.name) for s in group]], rows, left=1))
    return Section("concepts", "Concept ground truth", "".join(parts))
