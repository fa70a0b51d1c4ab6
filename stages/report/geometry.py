"""Report section "Concept geometry": what `geometry@M` measured (`data/geometry/<M>/`,
stages/geometry/), per model and space (the whitened unembedding and each cached hook).

Tables: hierarchical orthogonality against its two nulls, the mammal / bird / fish
simplex, the weekday / month circles and the purity of SAE decoder clusters, each with
the null's mean ± sd, z, the empirical p (floor 1/(n+1)) and Holm's correction over the
table's rows; the cross-model comparison of the concept cosine matrices (Mantel test).
Figures: the cosine heatmap across the hierarchy, the simplex projection, the circles.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from stages.alignment.pvalues import HOLM, holm
from stages.report.html import ReportContext, Section, e, fmt, table

UNEMBED = "unembed"


def _models(folder: Path) -> dict[str, dict]:
    out = {}
    if folder.exists():
        for d in sorted(folder.iterdir()):
            f = d / "geometry.json"
            if d.is_dir() and not d.name.startswith(".") and f.exists():
                out[d.name] = {**json.loads(f.read_text()), "_folder": str(d)}
    return out


def _layer(space: str) -> tuple[int, str]:
    """Sort key: hooks by block index, then name; the unembedding last."""
    parts = space.split(".")
    if space == UNEMBED:
        return (10**9, space)
    return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else -1, space)


def _spaces(g: dict) -> list[tuple[str, dict]]:
    """A model's spaces in layer order, the unembedding last."""
    return sorted(g.get("spaces", {}).items(), key=lambda kv: _layer(kv[0]))


def _short(space: str) -> str:
    return space.replace("blocks.", "L").replace(".hook_resid_post", " resid")


def _null_cells(s: dict | None) -> list[str]:
    if not s or "statistic" not in s:
        return ["–"] * 4
    return [f"<b>{fmt(s['statistic'])}</b>", f"{fmt(s['null_mean'])} ± {fmt(s['null_sd'])}",
            fmt(s["z"], 2), f"{fmt(s['p'], 3)} (floor {fmt(s['p_floor'], 3)})"]  # fmt: skip


def _with_holm(rows: list[list[str]], ps: list[float]) -> list[list[str]]:
    adj = holm(np.asarray(ps, np.float64)) if ps else []
    return [r + [fmt(float(a), 3)] for r, a in zip(rows, adj, strict=True)]


def _p(s: dict | None) -> float:
    return float(s["p"]) if s and "p" in s else float("nan")


def section(ctx: ReportContext, folder: Path) -> Section | None:
    """The section, or None when no model has geometry outputs."""
    models = _models(folder)
    if not models:
        return None
    # a stage that skipped as a whole (e.g. a corpus with no concept labels) says why
    whole = {m: g["skipped"] for m, g in models.items() if isinstance(g.get("skipped"), str)}
    models = {m: g for m, g in models.items() if m not in whole}
    why = "; ".join(f"geometry@{m} skipped: {r}" for m, r in whole.items())
    if not models:
        return Section("geometry", "Concept geometry",
                       f'<p class="note"><b>Not run.</b> {e(why)}.</p>')  # fmt: skip
    inputs = {m: [folder / m] for m in models}
    parts = [
        '<p>Concept vectors by the LDA-style estimator of Park et al. 2024 ("The Geometry of '
        'Categorical and Hierarchical Concepts in Large Language Models") under the causal '
        "inner product: the unembedding whitened by its covariance over the vocabulary, "
        "g(y) = Cov(γ)<sup>-1/2</sup>(γ(y) − E[γ]). At each cached hook the same estimator "
        "runs on whitened per-token mean residuals (stages/geometry/vectors.py). A concept's "
        "tokens are those labelled with it on ≥ 90 % of their occurrences; a concept with "
        "fewer than 3 tokens gets no vector (with 2, the Ledoit–Wolf shrinkage is 0 in closed "
        "form and the estimate is decided by rounding), so the toy species "
        "(singular + plural form, or one form) are skipped and the hierarchy tested is "
        "animal → mammal / bird / fish and emotion → positive / negative. Every p is "
        "(1 + #null at least as extreme) / (1 + n) with its floor 1/(1 + n); the last column "
        f"is each table's {e(HOLM)} correction over its rows.</p>"
    ]
    if whole:
        parts.append(f'<p class="muted">{e(why)}.</p>')
    skipped = sorted({c for g in models.values() for c in g.get("skipped", {})})
    if skipped:
        parts.append(f'<p class="muted">Concepts without a vector (too few tokens): '
                     f"{e(', '.join(skipped))}.</p>")  # fmt: skip
    parts += _orthogonality(ctx, models, inputs)
    parts += _simplex(ctx, models, inputs)
    parts += _simplex_steering(models)
    parts += _circles(ctx, models, inputs)
    parts += _clusters(models)
    parts += _cross_model(models, folder)
    return Section("geometry", "Concept geometry", "".join(parts))


def _orthogonality(ctx: ReportContext, models: dict, inputs: dict) -> list[str]:
    rows, ps = [], []
    for m, g in models.items():
        for space, r in _spaces(g):
            o = r.get("orthogonality", {})
            if "mean_abs_cos" not in o:
                continue
            rows.append([e(m), e(_short(space)), str(len(o["pairs"])),
                         *_null_cells(o["null_nested_sets"]),
                         *_null_cells(o["null_random_parent"])[1:]])  # fmt: skip
            ps.append(_p(o["null_nested_sets"]))
    parts = [
        "<h3>Hierarchical orthogonality</h3><p>Statistic: the mean over (parent, child) "
        "pairs of |cos(ℓ̄<sub>parent</sub>, ℓ̄<sub>child</sub> − ℓ̄<sub>parent</sub>)| "
        "(0: orthogonal, as the paper predicts). Nulls: <i>random nested sets</i> — per pair "
        "a random token set of the parent's size and a random subset of the child's size, "
        "estimated the same way (nesting alone pushes this towards 0: for mean vectors of "
        "isotropic tokens the expected inner product is exactly 0); and the paper's "
        "<i>random parent</i> — each child against a random other concept. One-sided: "
        "smaller than the null. Holm over the nested-set p's.</p>"
    ]
    if rows:
        parts.append(table(["model", "space", "pairs", "mean |cos|", "nested null", "z",
                            "p (nested)", "random-parent null", "z", "p (random parent)",
                            "Holm p (nested)"], _with_holm(rows, ps), left=2))  # fmt: skip
    fig = _heatmaps(models)
    if fig is not None:
        block, _ = ctx.figure(fig, "geometry/cosine_heatmap",
                              title="Cosine of concept vectors across the hierarchy",
                              description="cos(ℓ̄_w, ℓ̄_z) between every estimated concept "
                              "vector, in the whitened unembedding (left) and at the last "
                              "cached hook (right), per model (rows). Concepts in the "
                              "corpus's order: the animal hierarchy first.",
                              inputs=[p for v in inputs.values() for p in v])  # fmt: skip
        parts.append(block)
    return parts


def _load_cos(folder: Path, space: str) -> tuple[list[str], np.ndarray] | None:
    f = folder / "vectors.npz"
    if not f.exists():
        return None
    with np.load(f, allow_pickle=False) as z:
        if f"{space}/cosine" not in z.files:
            return None
        return [str(c) for c in z[f"{space}/concepts"]], z[f"{space}/cosine"]


def _heatmaps(models: dict):
    import matplotlib.pyplot as plt

    panels = []
    for m, g in models.items():
        spaces = list(g.get("spaces", {}))
        if not spaces:
            continue
        folder = Path(g["_folder"]) if "_folder" in g else None
        hooks = sorted((s for s in spaces if s != UNEMBED), key=_layer)
        for space in [s for s in (UNEMBED, hooks[-1] if hooks else None) if s in spaces]:
            loaded = _load_cos(folder, space) if folder else None
            if loaded and len(loaded[0]):
                panels.append((m, space, *loaded))
    if not panels:
        return None
    ncol = 2
    nrow = (len(panels) + 1) // 2
    fig, axes = plt.subplots(nrow, ncol, figsize=(6.2 * ncol, 5.4 * nrow), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.axis("off")
    for ax, (m, space, names, c) in zip(axes.flat, panels, strict=False):
        im = ax.imshow(c, cmap="seismic", vmin=-1, vmax=1)
        ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set_title(f"{m}: {_short(space)}", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def _simplex(ctx: ReportContext, models: dict, inputs: dict) -> list[str]:
    rows, ps = [], []
    for m, g in models.items():
        for space, r in _spaces(g):
            s = r.get("simplex", {})
            if "roundness" not in s:
                continue
            rows.append([e(m), e(_short(space)), e("/".join(map(str, s["sizes"]))),
                         *_null_cells(s["roundness"]), *_null_cells(s["loo_accuracy"])])  # fmt: skip
            ps.append(_p(s["loo_accuracy"]))
    parts = [
        "<h3>The mammal / bird / fish simplex</h3><p>Roundness of the triangle of the three "
        "class vectors, 4√3·area / (a² + b² + c²) (1 equilateral, 0 degenerate), and the "
        "leave-one-out accuracy of assigning each class token to the class vector (estimated "
        "without it) it projects onto best, g·ℓ̄<sub>c</sub> / ‖ℓ̄<sub>c</sub>‖² (chance 1/3). "
        "Null: random disjoint token sets of the same sizes. In 64 dimensions any three "
        "random vectors of similar norm make a near-equilateral triangle, so roundness "
        "cannot tell a planted simplex from chance; the separation can. Holm over the "
        "accuracy p's.</p>"
    ]
    if rows:
        parts.append(table(["model", "space", "tokens", "roundness", "null", "z", "p",
                            "LOO accuracy", "null", "z", "p", "Holm p (accuracy)"],
                           _with_holm(rows, ps), left=2))  # fmt: skip
    fig = _simplex_figure(models)
    if fig is not None:
        block, _ = ctx.figure(fig, "geometry/simplex",
                              title="Class tokens projected on the plane of the mammal, bird "
                              "and fish vectors",
                              description="Whitened token vectors g(y) of each class, "
                              "projected on the plane through the tips of the three class "
                              "vectors (triangle); the animal vector's projection as a star. "
                              "Unembedding and last cached hook, per model.",
                              inputs=[p for v in inputs.values() for p in v])  # fmt: skip
        parts.append(block)
    return parts


def _simplex_steering(models: dict) -> list[str]:
    rows, ps = [], []
    for m, g in models.items():
        for hook, r in (g.get("simplex_steering") or {}).items():
            if not isinstance(r, dict) or "effect" not in r:
                continue
            lo, hi = r["effect_ci95"]
            rows.append([e(m), e(_short(hook)), fmt(r["n_sentences"]), fmt(r["edge_norm"]),
                         f"<b>{fmt(r['effect'])}</b> [{fmt(lo)}, {fmt(hi)}]",
                         f"{fmt(r['null_mean'])} ± {fmt(r['null_sd'])}", fmt(r["z"], 2),
                         f"{fmt(r['p'], 3)} (floor {fmt(r['p_floor'], 3)})",
                         fmt(r["flip_rate"]), fmt(r["random_flip_rate"])])  # fmt: skip
            ps.append(float(r["p"]))
    if not rows:
        return []
    return [
        "<h3>Steering along the simplex</h3><p>In held-out sentences about a mammal "
        "(<i>The cat [often] runs</i>), the residual stream at the hook is moved at the "
        "noun's tokens only by the mammal → bird edge of the simplex (the difference of the "
        "two classes' centroids of per-token mean residuals); at the verb slot the model's "
        "log-odds of a bird verb against a mammal verb change by the effect (95 % interval "
        "over sentences). Control: random directions of the edge's norm. Flip: the bird "
        "verbs become more likely than the mammal verbs (stages/geometry/steer.py). Holm "
        "over the rows.</p>",
        table(["model", "hook", "sentences", "edge norm", "effect on log-odds", "random",
               "z", "p", "flip rate", "random flip rate", "Holm p"],
              _with_holm(rows, ps), left=2),
    ]  # fmt: skip


def _simplex_figure(models: dict):
    import matplotlib.pyplot as plt

    panels = []
    for m, g in models.items():
        spaces = [s for s, r in g.get("spaces", {}).items() if "projection" in r.get("simplex", {})]
        hooks = sorted((s for s in spaces if s != UNEMBED), key=_layer)
        for space in [s for s in (UNEMBED, hooks[-1] if hooks else None) if s in spaces]:
            panels.append((m, space, g["spaces"][space]["simplex"]["projection"]))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    colours = {"mammal": "tab:orange", "bird": "tab:blue", "fish": "tab:green"}
    for ax, (m, space, proj) in zip(axes[0], panels, strict=True):
        tips = np.asarray(proj["tips"])
        ax.fill(tips[:, 0], tips[:, 1], alpha=0.12, color="grey")
        for (c, pts), tip in zip(proj["tokens"].items(), tips, strict=True):
            p = np.asarray(pts)
            ax.scatter(p[:, 0], p[:, 1], s=18, color=colours.get(c), label=c)
            ax.scatter([tip[0]], [tip[1]], marker="^", s=80, color=colours.get(c), edgecolor="k")
        if "animal_vector" in proj:
            a = proj["animal_vector"]
            ax.scatter([a[0]], [a[1]], marker="*", s=140, color="k", label="animal")
        ax.set_title(f"{m}: {_short(space)}", fontsize=10)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _circles(ctx: ReportContext, models: dict, inputs: dict) -> list[str]:
    rows, ps = [], []
    for m, g in models.items():
        for space, r in _spaces(g):
            for name, c in sorted(r.get("circles", {}).items(), key=lambda kv: kv[0] != "weekday"):
                if "cyclic_order_R" not in c:
                    rows.append([e(m), e(_short(space)), e(name), "–",
                                 e(c.get("skipped", "")), *["–"] * 6])  # fmt: skip
                    ps.append(float("nan"))
                    continue
                rows.append([e(m), e(_short(space)), e(name), str(c["n_items"]),
                             fmt(c["pc2_variance_fraction"]), *_null_cells(c["cyclic_order_R"]),
                             *_null_cells(c["circle_residual"])[::3]])  # fmt: skip
                ps.append(_p(c["cyclic_order_R"]))
    parts = [
        '<h3>Circles: weekdays and months</h3><p>After Engels et al. 2024 ("Not All '
        "Language Model Features Are Linear\"): each item's mean vector (mean residual of its "
        "tokens; raw unembedding rows in the unembedding), PCA to 2-D. <i>Cyclic order</i> "
        "R = max over direction |mean<sub>k</sub> exp(i(θ<sub>k</sub> ∓ 2πk/n))|: 1 when "
        "the angles follow the week / year in order at even spacing; null: shuffled item "
        "labels. <i>Circle residual</i>: sd / mean of the radii about the fitted centre "
        "(0 on a circle); its null, random tokens of the same number, is in geometry.json "
        "(its p here). Counting (one … twelve) is a line in the world, not a cycle: not "
        "tested. Holm over the R p's.</p>"
    ]
    if rows:
        parts.append(table(["model", "space", "concept", "items", "top-2 PC variance",
                            "R", "null", "z", "p", "residual", "p (residual)",
                            "Holm p (R)"], _with_holm(rows, ps), left=3))  # fmt: skip
    fig = _circle_figure(models)
    if fig is not None:
        block, _ = ctx.figure(fig, "geometry/circles",
                              title="Weekday and month items in their top-2 principal "
                              "components", description="Per model, at the space where the "
                              "weekday items' cyclic order R is highest, and the same for "
                              "months; points labelled by item, joined in calendar order.",
                              inputs=[p for v in inputs.values() for p in v])  # fmt: skip
        parts.append(block)
    return parts


def _circle_figure(models: dict):
    import matplotlib.pyplot as plt

    panels = []
    for m, g in models.items():
        for name in ("weekday", "month"):
            best = None
            for space, r in _spaces(g):
                c = r.get("circles", {}).get(name, {})
                if "cyclic_order_R" in c and (best is None or c["cyclic_order_R"]["statistic"]
                                              > best[1]["cyclic_order_R"]["statistic"]):  # fmt: skip
                    best = (space, c)
            if best:
                panels.append((m, name, *best))
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(3.8 * len(panels), 3.8), squeeze=False)
    for ax, (m, name, space, c) in zip(axes[0], panels, strict=True):
        p = np.asarray(c["pc2"])
        loop = np.vstack([p, p[:1]])
        ax.plot(loop[:, 0], loop[:, 1], color="grey", lw=0.8)
        ax.scatter(p[:, 0], p[:, 1], c=np.arange(len(p)), cmap="twilight", s=40)
        for (x, y), item in zip(p, c["items"], strict=True):
            ax.annotate(item[:3], (x, y), fontsize=7)
        ax.set_title(f"{m} {name}: {_short(space)}\nR {c['cyclic_order_R']['statistic']:.2f}, "
                     f"p {c['cyclic_order_R']['p']:.3f}", fontsize=9)  # fmt: skip
        ax.set_aspect("equal", adjustable="datalim")
    fig.tight_layout()
    return fig


def _clusters(models: dict) -> list[str]:
    rows, ps = [], []
    for m, g in models.items():
        for key, c in g.get("clusters", {}).items():
            hook, sae = key.rsplit("/", 1)
            rows.append([e(m), e(_short(hook)), e(sae), str(c["k"]),
                         f"{c['n_labelled']} / {c['n_latents']}", str(c["n_concepts_present"]),
                         *_null_cells(c["kmeans"]),
                         *_null_cells(c.get("kmeans_vs_permuted_labels"))[1:],
                         *_null_cells(c["agglomerative"])])  # fmt: skip
            ps.append(_p(c.get("kmeans_vs_permuted_labels")))
    if not rows:
        return []
    return [
        "<h3>Clusters of SAE decoder directions</h3><p>Each latent's concept comes from its "
        "activations, not from geometry: the concept of the flat partition (species, colour, "
        "polarity, place, weather, number, weekday, month, tense) that receives ≥ 50 % of its "
        "activation mass on held-out rows; other latents are unlabelled and left out. The "
        "normalised decoder rows are clustered into k = (number of partition concepts) "
        "clusters by k-means and by agglomerative clustering on cosine distance (average "
        "linkage), both scipy. Purity = Σ<sub>clusters</sub> max<sub>c</sub> #c / #labelled. "
        "Nulls: the same labels on random Gaussian directions, clustered the same way; and "
        "the observed clusters with the labels permuted among the labelled latents (1000 "
        "permutations; it keeps the observed cluster sizes, on which chance purity depends). "
        "Holm over the k-means permutation p's.</p>",
        table(
            [
                "model",
                "hook",
                "SAE",
                "k",
                "labelled latents",
                "concepts",
                "k-means purity",
                "random-direction null",
                "z",
                "p",
                "permuted-label null",
                "z",
                "p",
                "agglomerative",
                "random-direction null",
                "z",
                "p",
                "Holm p (k-means, permuted)",
            ],
            _with_holm(rows, ps),
            left=3,
        ),  # fmt: skip
    ]


def _cross_model(models: dict, folder: Path) -> list[str]:
    """Mantel test of every model pair's concept cosine matrices, per common space."""
    from stages.geometry.claims import mantel

    names = list(models)
    rows, ps = [], []
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            for space in models[a].get("spaces", {}):
                la, lb = _load_cos(folder / a, space), _load_cos(folder / b, space)
                if not la or not lb:
                    continue
                common = [c for c in la[0] if c in lb[0]]
                if len(common) < 4:
                    continue
                ia, ib = [la[0].index(c) for c in common], [lb[0].index(c) for c in common]
                res = mantel(la[1][np.ix_(ia, ia)], lb[1][np.ix_(ib, ib)], 999, 0)
                rows.append([e(f"{a} vs {b}"), e(_short(space)), str(len(common)),
                             *_null_cells(res)])  # fmt: skip
                ps.append(res["p"])
    if not rows:
        return []
    return [
        "<h3>Do the two models share the geometry?</h3><p>Pearson correlation of the upper "
        "triangles of the two models' concept cosine matrices (same concepts, same space), "
        "against 999 permutations of one model's concepts (Mantel test). Holm over the "
        "rows.</p>",
        table(
            ["models", "space", "concepts", "r", "permutation null", "z", "p", "Holm p"],
            _with_holm(rows, ps),
            left=2,
        ),  # fmt: skip
    ]
