"""The SAE ground-truth section, SAEBench-style: k-sparse probing against a dense probe
and the lexical lookup, feature absorption on the planted hierarchy, precision / recall
per contextual concept, and Gurnee's random-perturbation null (several draws, a
norm-rescaled SAE, the KL gap by token frequency).

Reads each SAE folder's `metrics.json` only (`ground_truth.sparse_probing`,
`downstream`); the definitions are in `stages/sae/concepts.py` and
`stages/sae/evaluate.py` and the README ("SAE ground truth").
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from stages.report.html import ReportContext, Section, e, fmt, table
from stages.report.sweep import SAERef

KS = ("k1", "k2", "k5", "k20")


def _ci(v: dict | None, digits: int = 2) -> str:
    if not v:
        return "–"
    return (f"{fmt(v.get('mean', v.get('f1')), digits)} "
            f"<span class='muted'>[{fmt(v.get('lo'), digits)}, {fmt(v.get('hi'), digits)}]</span>")  # fmt: skip


def _sp(s: SAERef) -> dict:
    return (s.metrics.get("ground_truth") or {}).get("sparse_probing") or {}


def section(saes: list[SAERef], ctx: ReportContext | None = None) -> Section | None:
    """None when no SAE has the SAEBench-style scores (an unlabelled corpus, or
    `saes.eval.sparse_probing: false`). With `ctx`, a hook with several SAEs also gets
    the quality-against-downstream figure (`quality_figure`)."""
    with_sp = [s for s in saes if _sp(s).get("summary")]
    with_g = [s for s in saes if "sae_to_random_kl_ratio" in (s.metrics.get("downstream") or {})]
    if not with_sp and not with_g:
        return None
    groups: dict[tuple[str, str], list[SAERef]] = defaultdict(list)
    for s in saes:
        groups[(s.model, s.hook)].append(s)
    parts = [
        "<p>SAEBench-style scores on the world's labelled concepts, on held-out rows split by "
        "document (seeded) into a probe-train and a test half; every F1 is on the test half "
        "at the concept's prevalence, with a 95 % interval from resampling test documents. "
        "<b>k-sparse probing</b> (Gao et al. 2024; latents ranked by mean difference as in "
        "SAEBench): a logistic probe on each concept's top-k latents. Controls on the same "
        "rows: a dense probe on the raw activations, and the lexical lookup (the best "
        "token-id set chosen on the train half). <b>Absorption</b> (Chanin et al. 2024, "
        "SAEBench's full-absorption rule): on test tokens of a parent concept that its dense "
        "probe reads, the share where the parent's main latents are silent while another "
        "latent, aligned with the probe (cos ≥ 0.025), carries ≥ 40 % of the token's "
        "projection on it; control: the same rule with a random direction.</p>"
    ]
    for (model, hook), group in groups.items():
        sp_group = [s for s in group if _sp(s).get("summary")]
        g_group = [s for s in group if s in with_g]
        if not sp_group and not g_group:
            continue
        parts.append(f"<h3>{e(model)} · <code>{e(hook)}</code></h3>")
        if sp_group:
            parts.append(_probing_table(sp_group))
            if ctx is not None and len(sp_group) >= 3:
                parts.append(_quality_block(ctx, model, hook, sp_group))
            parts.append(_absorption_table(sp_group))
            parts.append(_precision_recall_table(sp_group))
        if g_group:
            parts.append(_gurnee_table(g_group))
        parts.append(_seeds_table(group))
    return Section("ground-truth", "SAE ground truth: sparse probing, absorption, Gurnee's null",
                   "".join(parts))  # fmt: skip


def _probing_table(group: list[SAERef]) -> str:
    rows = []
    for s in group:
        summ = _sp(s)["summary"]
        rows.append([e(s.name), e(s.architecture), fmt(s.metrics.get("l0"), 1),
                     *(_ci(summ.get(f"{k}_f1")) for k in KS),
                     fmt(summ.get("k5_f1_contextual"), 2)])  # fmt: skip
    summ = _sp(group[0])["summary"]
    for tag, label in (("dense", "dense probe (d_model dims)"), ("lexical", "lexical lookup")):
        if summ.get(f"{tag}_f1"):
            cell = _ci(summ[f"{tag}_f1"])
            rows.append([f"<i>{label}</i>", "control", "–", cell, cell, cell, cell,
                         fmt(summ.get(f"{tag}_f1_contextual"), 2)])  # fmt: skip
    n = _sp(group[0])
    caption = (f"<p class='muted'>Mean test F1 over {len(n.get('concepts', {}))} concepts "
               f"({n.get('n_train_rows')} train / {n.get('n_test_rows')} test rows); last "
               "column: k = 5 (controls: their own F1) over the contextual concepts only.</p>")  # fmt: skip
    return "<h4>k-sparse probing</h4>" + table(
        ["SAE", "architecture", "L0", "k = 1", "k = 2", "k = 5", "k = 20", "contextual"],
        rows, left=2,
    ) + caption  # fmt: skip


def _absorption_table(group: list[SAERef]) -> str:
    rows = []
    for s in group:
        for parent, a in (_sp(s).get("absorption") or {}).items():
            children = a.get("children") or {}
            worst = max(children.items(), key=lambda kv: kv[1].get("rate") or 0.0, default=None)
            worst_s = f"{e(worst[0])} {fmt(worst[1].get('rate'), 2)}" if worst else "–"
            rows.append([e(s.name), e(parent), str(a.get("n_tokens")),
                         ", ".join(f"#{i}" for i in a.get("main_latents", [])),
                         fmt(a.get("main_miss_rate"), 3),
                         f"{fmt(a.get('rate'), 3)} <span class='muted'>[{fmt(a.get('lo'), 3)}, "
                         f"{fmt(a.get('hi'), 3)}]</span>",
                         fmt(a.get("random_direction_rate"), 3), worst_s])  # fmt: skip
    if not rows:
        return "<p class='muted'>No parent concept of the planted hierarchy has enough tokens.</p>"
    return "<h4>Feature absorption</h4>" + table(
        ["SAE", "parent", "tokens", "main latents", "main silent", "absorbed [95 % CI]",
         "random direction", "most absorbed child"], rows, left=4,
    ) + ("<p class='muted'>main silent: share of the parent's tokens where its main latents "
         "do not fire (absorbed or simply missed); absorbed: Wilson interval.</p>")  # fmt: skip


def _precision_recall_table(group: list[SAERef]) -> str:
    first = _sp(group[0]).get("concepts") or {}
    ctx = [c for c, v in first.items() if v.get("kind") == "contextual"]
    if not ctx:
        return ""
    rows = []
    for c in ctx:
        base = first[c]
        row = [e(c), fmt((base.get("lexical") or {}).get("f1"), 2),
               fmt((base.get("dense") or {}).get("f1"), 2)]  # fmt: skip
        for s in group:
            v = (_sp(s).get("concepts") or {}).get(c) or {}
            b, k5 = v.get("best_latent") or {}, v.get("k5") or {}
            row.append(f"{fmt(b.get('precision'), 2)} / {fmt(b.get('recall'), 2)} "
                       f"<span class='muted'>k5 {fmt(k5.get('precision'), 2)} / "
                       f"{fmt(k5.get('recall'), 2)}</span>")  # fmt: skip
        rows.append(row)
    return "<h4>Contextual concepts: precision / recall</h4>" + table(
        ["concept", "lexical F1", "dense F1", *[e(s.name) for s in group]], rows, left=1,
    ) + ("<p class='muted'>Per SAE: precision / recall of the best single latent (fires = "
         "activation > 0, all held-out rows), then of the k = 5 probe (test half).</p>")  # fmt: skip


def _gurnee_table(group: list[SAERef]) -> str:
    rows = []
    for s in group:
        d = s.metrics["downstream"]
        rows.append([
            e(s.name), fmt(d.get("kl_sae"), 3),
            f"{fmt(d.get('kl_random'), 3)} ± {fmt(d.get('kl_random_sd_draws'), 2)}",
            f"{fmt(d.get('sae_to_random_kl_ratio'), 3)} <span class='muted'>"
            f"[{fmt(d.get('sae_to_random_kl_ratio_lo'), 3)}, "
            f"{fmt(d.get('sae_to_random_kl_ratio_hi'), 3)}]</span>",
            f"{fmt(d.get('sae_to_random_kl_ratio_rare'), 2)} / "
            f"{fmt(d.get('sae_to_random_kl_ratio_common'), 2)}",
            fmt(d.get("kl_gap_freq_spearman"), 2), fmt(d.get("kl_sae_rescaled"), 3),
            fmt(d.get("ce_delta_sae_rescaled"), 3),
            "yes" if d.get("ce_loss_recovered_saturated") else "no",
        ])  # fmt: skip
    d0 = group[0].metrics["downstream"]
    return "<h4>Gurnee's null</h4>" + table(
        ["SAE", "KL SAE", "KL random ± sd (draws)", "SAE / random [95 % CI]",
         "ratio rare / common tokens", "Spearman (log freq, gap)", "KL rescaled SAE",
         "ΔCE rescaled", "CE rec. saturated"], rows, left=1,
    ) + (f"<p class='muted'>Gurnee (2024): the SAE's error replaced by a random direction of "
         f"the same norm per token, {d0.get('random_draws')} draws on "
         f"{d0.get('random_windows')} windows (the SAE's KL paired on the same windows; interval "
         "from resampling windows). Rare / common: the lowest and highest fifth of predictions "
         "by the training frequency of the current token. Rescaled: x̂·‖x‖/‖x̂‖. Saturated: "
         "the zero-ablated CE exceeds the unigram entropy.</p>")  # fmt: skip


def quality_vs_probing(group: list[SAERef], k: str = "k1") -> dict[str, float]:
    """Does a better reconstruction come with a better downstream score? Spearman's ρ
    between each SAE's held-out FVU and its k-sparse probing F1 (mean over concepts)
    across the SAEs of one hook, with its two-sided permutation p-value over the
    pairings (scipy.stats.permutation_test: exact, all n! pairings, for n ≤ 8; 9,999
    random ones beyond, floor 1/10,000). ρ < 0: lower FVU, higher F1. NaN with fewer
    than 3 SAEs."""
    import numpy as np
    from scipy import stats

    pts = [(s.metrics.get("fvu"), _sp(s)["summary"].get(f"{k}_f1", {}).get("mean"))
           for s in group]  # fmt: skip
    pts = [(x, y) for x, y in pts if _finite(x) and _finite(y)]
    n = len(pts)
    if n < 3:
        return {"n": float(n), "rho": math.nan, "p": math.nan}
    x, y = np.array(pts, dtype=float).T
    ry = stats.rankdata(y)
    ry -= ry.mean()

    def rho(a: np.ndarray, axis: int = -1) -> np.ndarray:
        # Spearman's ρ = Pearson's r of the (average) ranks, for a batch of pairings at
        # once (all 7! = 5,040 of the default hook's 7 SAEs in one call; scipy.stats.spearmanr
        # per pairing took ~3 s a hook)
        ra = stats.rankdata(a, axis=axis)
        ra -= ra.mean(axis=axis, keepdims=True)
        return (ra * ry).sum(axis) / np.sqrt((ra * ra).sum(axis) * (ry @ ry))

    res = stats.permutation_test((x,), rho, permutation_type="pairings", vectorized=True,
                                 n_resamples=9999 if n > 8 else np.inf, random_state=0)  # fmt: skip
    return {"n": float(n), "rho": float(res.statistic), "p": float(res.pvalue)}


def _finite(v: object) -> bool:
    return isinstance(v, int | float) and math.isfinite(v)


def quality_figure(group: list[SAERef], title: str):
    """SAE quality against a downstream task, one point per SAE: held-out FVU (left) and
    L0 (right) against k-sparse probing F1 at k = 1 (filled) and k = 20 (open), with the
    F1 interval over test documents; dashed: the dense probe, dotted: the lexical lookup
    (the same rows, so the same for every SAE of the hook)."""
    import matplotlib.pyplot as plt

    from stages.sae.registry import plot_style

    fig, axes = plt.subplots(1, 2, figsize=(10.5, 3.8), sharey=True)
    summ0 = _sp(group[0])["summary"]
    for ax, key, label in ((axes[0], "fvu", "FVU (held-out, lower is better)"),
                           (axes[1], "l0", "L0 (held-out)")):  # fmt: skip
        for s in group:
            colour, marker = plot_style(s.architecture)
            summ = _sp(s)["summary"]
            for k, fill in (("k1", colour), ("k20", "none")):
                v = summ.get(f"{k}_f1") or {}
                if not (_finite(s.metrics.get(key)) and _finite(v.get("mean"))):
                    continue
                ax.errorbar([s.metrics[key]], [v["mean"]],
                            yerr=[[v["mean"] - v.get("lo", v["mean"])],
                                  [v.get("hi", v["mean"]) - v["mean"]]],
                            color=colour, marker=marker, mfc=fill, ms=7, lw=0.8, capsize=2)  # fmt: skip
        for tag, style in (("dense", "--"), ("lexical", ":")):
            if _finite((summ0.get(f"{tag}_f1") or {}).get("mean")):
                ax.axhline(summ0[f"{tag}_f1"]["mean"], color="0.4", ls=style, lw=1,
                           label=f"{tag} probe" if tag == "dense" else "lexical lookup")  # fmt: skip
        ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("k-sparse probing F1 (mean over concepts)")
    handles = [plt.Line2D([], [], color=plot_style(a)[0], marker=plot_style(a)[1], ls="",
                          label=a) for a in sorted({s.architecture for s in group})]  # fmt: skip
    handles += [plt.Line2D([], [], color="0.3", marker="o", ls="", label="k = 1"),
                plt.Line2D([], [], color="0.3", marker="o", mfc="none", ls="", label="k = 20")]  # fmt: skip
    h2, _ = axes[0].get_legend_handles_labels()
    axes[1].legend(handles=handles + h2, fontsize=7, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _quality_block(ctx: ReportContext, model: str, hook: str, group: list[SAERef]) -> str:
    block, _ = ctx.figure(
        quality_figure(group, f"{model} {hook}: SAE quality against k-sparse probing"),
        f"ground_truth/{model}__{hook}__quality",
        title=f"SAE quality against a downstream task, {model} {hook}",
        description=(
            "Each SAE of the hook: reconstruction (FVU, L0) against k-sparse probing F1 on "
            "the world's concepts (k = 1 filled, k = 20 open; 95 % interval over test "
            "documents), beside the dense probe and the lexical lookup on the same rows."
        ),
        inputs=sorted({str(Path(s.path).parent) for s in group}),
    )
    rows = []
    for k in ("k1", "k20"):
        q = quality_vs_probing(group, k)
        rows.append([f"k = {k[1:]}", fmt(q["n"], 0), fmt(q["rho"], 2), fmt(q["p"], 3)])
    return block + table(["probe", "SAEs", "Spearman ρ (FVU, F1)", "permutation p"], rows,
                         left=1) + (
        "<p class='muted'>ρ < 0: the SAEs that reconstruct better also probe better. "
        "Permutation p over the pairings of FVU and F1 (exact for up to 8 SAEs); with this "
        "few SAEs only a strong rank agreement can reach p < 0.05.</p>")  # fmt: skip


SEED_KEYS = (("fvu", "FVU", 4), ("l0", "L0", 1), ("ce_delta_sae", "ΔCE (nats)", 3),
             ("probe_k1_f1", "k = 1 F1", 2), ("probe_k20_f1", "k = 20 F1", 2))  # fmt: skip


def _seeds_table(group: list[SAERef]) -> str:
    """The seed groups of this hook (`data/saes/<M>/seeds.json`, written when SAEs differ
    only in seed: `stages/sae/seeds.py`); "" when there are none."""
    import json

    path = Path(group[0].path).parent.parent / "seeds.json"
    if not path.exists():
        return ""
    groups = json.loads(path.read_text()).get(group[0].hook) or {}
    if not groups:
        return ""

    def msd(v: dict, digits: int) -> str:
        return (f"{fmt(v.get('mean'), digits)} ± {fmt(v.get('sd'), digits)} <span class='muted'>"
                f"[{fmt(v.get('lo'), digits)}, {fmt(v.get('hi'), digits)}]</span>")  # fmt: skip

    rows = []
    for first, g in groups.items():
        m, o = g["metrics"], g["overlap"]
        rows.append([e(first), str(len(g["seeds"])),
                     *(msd(m[k], d) if k in m else "–" for k, _, d in SEED_KEYS),
                     msd(o["fraction_with_partner_hungarian"], 3),
                     fmt(o["null_fraction_with_partner_hungarian"].get("mean"), 3)])  # fmt: skip
    return "<h4>Seeds</h4>" + table(
        ["SAE (first seed)", "seeds", *(label for _, label, _ in SEED_KEYS),
         "seed-to-seed partners", "shuffled-row null"], rows, left=1,
    ) + ("<p class='muted'>SAEs whose configs differ only in their seed: mean ± sd over "
         "seeds [95 % t interval]. Seed-to-seed partners: the share of latents whose "
         "Hungarian match in another seed's SAE correlates ≥ 0.5 over held-out rows (mean "
         "± sd over seed pairs), the same measure as the cross-model "
         "<code>fraction_with_partner_hungarian</code> in the alignment section.</p>")  # fmt: skip


def families_section(saes: list[SAERef], ctx: ReportContext, activations: Path) -> Section | None:
    """Feature splitting across widths (`stages/sae/families.py`), for every hook whose
    SAEs form a width ladder (the widths study, `python -m flows.sae_study --widths`);
    None otherwise, after reading only each SAE's cfg.json."""
    from stages.sae.families import families_figure, family_study, ladders, match_rows

    groups: dict[tuple[str, str], list[SAERef]] = defaultdict(list)
    for s in saes:
        groups[(s.model, s.hook)].append(s)
    parts = []
    for (model, hook), group in groups.items():
        dirs = [Path(s.path) for s in group]
        store_dir = Path(activations) / model
        if not ladders(dirs) or not store_dir.exists():
            continue
        from stages.activations import ActivationStore

        study = family_study(dirs, ActivationStore(store_dir), hook)
        parts.append(f"<h3>{e(model)} · <code>{e(hook)}</code></h3>")
        for key, lad in study["ladders"].items():
            block, _ = ctx.figure(
                families_figure(lad, f"{model} {hook} {key}"),
                f"ground_truth/{model}__{hook}__families_{key}",
                title=f"Feature splitting across widths, {model} {hook} {key}",
                description=("Left: test F1 of each concept's best single latent by SAE width, "
                             "parent concepts against species (95 % intervals in the table). "
                             "Right: the animal concepts' best latents per width; an edge to "
                             "the hierarchy parent at the previous width, solid where the "
                             "child's latent descends from the parent's best latent."),
                inputs=[str(Path(group[0].path).parent), str(store_dir)],
            )  # fmt: skip
            head, rows = match_rows(lad)
            parts.append(f"<h4>{e(key)}</h4>" + block + table(head, rows, left=1))
    if not parts:
        return None
    intro = ("<p>Latent families across SAE widths on one hook (Bricken et al. 2023): each "
             "latent's parent at the next narrower width maximises ½ (decoder cosine + "
             "activation correlation on held-out rows); control: decoder cosine only. Hierarchy "
             "match: the share of (parent concept, child concept, width, gap) where the child's "
             "best latent at the wider SAE descends from the parent's best latent, against "
             "two nulls (1000 draws each: mean, 95 % interval, empirical p): the parent links "
             "shuffled, and an unrelated concept of the hierarchy in the parent's place.</p>")  # fmt: skip
    return Section("families", "SAE widths: feature splitting against the planted hierarchy",
                   intro + "".join(parts))  # fmt: skip
