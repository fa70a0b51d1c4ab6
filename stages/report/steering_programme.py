"""The steering section's tables for the rest of the seeds' programme, drawn from
evaluation.json (`multilayer`, `stability`) and decomposition.json
(`similarity_vs_effect`): multi-layer steering against the best single hook and random
directions at the same hooks; the vector's split-half stability against a shuffled-label
null and at earlier read positions; decoder similarity against ablation effect.

    html = programme_tables(concepts)   # concepts: stages.report.steering.SteeredConcept
"""

from __future__ import annotations

from typing import Any

from stages.report.html import e, fmt, table


def _ci(lo_hi: Any, digits: int = 3) -> str:
    lo, hi = lo_hi or (None, None)
    return f"[{fmt(lo, digits)}, {fmt(hi, digits)}]"


def _z_p(r: dict) -> str:
    if not r or r.get("z") is None:
        return "–"
    return f"{fmt(r.get('z'), 2)} ({fmt(r.get('p'), 3)})"


def multilayer_table(concepts: list) -> str:
    rows, n, floor = [], None, None
    for c in concepts:
        ml = c.evaluation.get("multilayer") or {}
        if "multi" not in ml:
            continue
        n, floor = ml.get("n_random"), ml.get("p_floor")
        m, s, d = ml["multi"], ml["single"], ml["multi_minus_single"]
        rows.append([
            e(c.concept), e(", ".join(ml["hooks"])), f"<code>{e(ml['best_hook'])}</code>",
            fmt(ml.get("total_norm"), 2), fmt(m.get("steerability")), _ci(m.get("ci95")),
            f"{fmt(m.get('null_mean'))} ± {fmt(m.get('null_sd'))}", _z_p(m),
            fmt(s.get("steerability")), fmt(d.get("mean")), _ci(d.get("ci95")),
        ])  # fmt: skip
    if not rows:
        return ""
    note = ("<p class='muted'><b>Multi-layer steering</b> (stages/steering/multilayer.py): each "
            "steering hook adds its own vector at the last token, scaled so the norms added "
            "sum to the best single hook's (‖v_best‖ / |H| per hook); steerability = slope of "
            f"the behaviour metric over the multipliers. Null: {e(n)} draws of independent "
            "random directions at the same hooks and norms; p one-sided, floor "
            f"{fmt(floor, 4)}. Single: the best hook's own vector, same pass; multi − single "
            "paired per prompt. Intervals: 95 % t over prompts.</p>")  # fmt: skip
    return note + table(
        ["concept", "hooks", "best hook", "total norm", "multi slope", "95 % CI", "null",
         "z (p)", "single slope", "multi − single", "95 % CI"], rows, left=3)  # fmt: skip


def stability_table(concepts: list) -> str:
    rows, floor = [], None
    for c in concepts:
        st = c.evaluation.get("stability") or {}
        best = (c.evaluation.get("sweep") or {}).get("best_hook")
        sh = (st.get("split_half") or {}).get(best)
        if not sh:
            continue
        floor = sh.get("p_floor")
        eff = st.get("effects") or {}
        halves = ", ".join(f"{fmt(h.get('steerability'))} (z {fmt(h.get('z'), 2)})"
                           for h in eff.get("halves", []))  # fmt: skip
        pos = []
        for off, r in (st.get("positions") or {}).items():
            if "cosine" not in r:
                pos.append(f"−{e(off)}: {e(r.get('skipped', '–'))}")
            elif best in r.get("same_text", []):
                pos.append(f"−{e(off)}: same text (no vector)")
            else:
                pe = eff.get(f"position_minus_{off}") or {}
                pos.append(f"−{e(off)}: cos {fmt(r['cosine'].get(best), 2)}, slope "
                           f"{fmt(pe.get('steerability'))}, z {fmt(pe.get('z'), 2)}")  # fmt: skip
        rows.append([
            e(c.concept), f"<code>{e(best)}</code>", fmt(sh.get("cosine_mean"), 3),
            _ci(sh.get("cosine_range95")), fmt(sh.get("null_mean"), 3),
            _ci(sh.get("null_range95")), fmt(sh.get("p"), 3),
            fmt((eff.get("full") or {}).get("steerability")), halves or "–",
            "<br>".join(pos) or "–",
        ])  # fmt: skip
    if not rows:
        return ""
    note = ("<p class='muted'><b>Vector stability</b> (stages/steering/stability.py): the "
            "training pairs split into random halves; cosine between the halves' mean-"
            "difference vectors (mean, 2.5–97.5 % over splits) against the same with the "
            "positive / negative labels shuffled within each half (the null); p = (1 + #null "
            f"≥ mean) / (1 + n), floor {fmt(floor, 4)}. Half vectors steer the eval prompts "
            "(held out from both halves), z against the stage's random directions at the full "
            "vector's norm. Earlier positions: the vector read 1, 2 tokens before each pair's "
            "read position: cosine to the vector, steerability (own norm), z (at the full "
            "norm).</p>")  # fmt: skip
    return note + table(
        ["concept", "hook", "split-half cos", "range", "null cos", "null range", "p",
         "full slope", "half slopes (z)", "earlier positions"], rows, left=2,
        also_left=(8, 9))  # fmt: skip


def similarity_table(concepts: list) -> str:
    rows = []
    for c in concepts:
        sv = c.decomposition.get("similarity_vs_effect") or {}
        for src in ("ablation", "attribution"):
            for kind in ("signed", "absolute"):
                r = (sv.get(src) or {}).get(kind)
                if not r:
                    continue
                rows.append([
                    e(c.concept), f"<code>{e(sv.get('hook', '–'))}</code>", e(src), e(kind),
                    fmt(r.get("n"), 0), fmt(r.get("spearman"), 3), _ci(r.get("ci95")),
                    f"{fmt(r.get('null_mean'), 3)} {_ci(r.get('null_range95'))}",
                    fmt(r.get("p"), 3),
                ])  # fmt: skip
    if not rows:
        return ""
    note = ("<p class='muted'><b>Does feature similarity predict output effect?</b> "
            "(stages/steering/similarity.py) Per SAE latent at the decomposition hook: "
            "decoder cosine with the steering vector against the behaviour metric's change "
            "when the latent is zero-ablated (error term kept): true ablation on the "
            "attribution sample, attribution patching on every active latent. Spearman ρ, "
            "bootstrap 95 % interval over latents, null = cosines shuffled across latents "
            "(mean, 2.5–97.5 %), p two-sided. <i>signed</i>: ρ &lt; 0 means latents along the "
            "vector lose metric when ablated; <i>absolute</i>: |cos| vs |effect|.</p>")  # fmt: skip
    return note + table(["concept", "hook", "effect", "kind", "latents", "ρ", "95 % CI",
                         "null", "p"], rows, left=4)  # fmt: skip


def programme_tables(concepts: list) -> str:
    """All three tables (empty strings where the files lack the records)."""
    return multilayer_table(concepts) + stability_table(concepts) + similarity_table(concepts)
