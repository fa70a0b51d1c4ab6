"""The steering section, drawn from the files of the steering and decompose stages
(layouts in `stages/steering/run.py` and `stages/steering/decompose_run.py`):

    data/steering/<model>/<concept>/evaluation.json        layer sweep, generations, probes
    data/decomposition/<model>/<concept>/decomposition.json SAE decomposition, downstream,
                                                            targeted vs raw

Figures are the steering package's own (`stages.steering.figures_from_dict`: steerability
curves, layer sweep; `decompose_run.decomposition_figures`: decomposition bars + error
curve, downstream-effect heatmap, targeted vs raw), redrawn from the JSON and captioned here with provenance, plus a
summary table per model whose decomposition latents link to their dashboards.

`wanted_features` names the decomposition's top latents, so they get dashboards.
`section(...)` returns None when no concept has been steered (the report says "not run").
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stages.report.html import ReportContext, Section, e, fmt, table
from stages.report.steering_programme import programme_tables

log = logging.getLogger(__name__)

# a steered concept -> SAE key "model/hook/sae" of the SAE its decomposition used, or
# None when it cannot be told (see `sae_resolver`)
Resolver = Callable[["SteeredConcept"], str | None]

TITLES = {
    "steerability": ("Steerability curves", "Mean behaviour metric (log-odds of the positive "
                     "targets against the negative ones, at each held-out prompt's last token) "
                     "against the steering multiplier, one curve per hook; slope = steerability."),
    "layer_sweep": ("Layer sweep", "Steerability (bars) and KL(clean ‖ steered) on neutral "
                    "held-out text (line) per hook; dashed: the KL budget; the best hook is the "
                    "most steerable within budget."),
    "decomposition": ("Decomposition into SAE features", "Non-negative decomposition of the "
                      "steering vector over SAE decoder rows (NN-OMP with NNLS refits): the "
                      "largest coefficients, and the relative error against features used."),
    "downstream": ("Downstream-effect heatmap", "Steering at one hook, the change in mean "
                   "activation of the most affected SAE latents at later hooks (latent id in "
                   "each cell)."),
    "downstream_null": ("Downstream effects against random directions", "Steering at the "
                        "decomposition hook: how many later SAE latents the vector moves up "
                        "(red) or down (blue) beyond random directions of its norm, "
                        "Benjamini–Hochberg q < 0.05, beside held-out random directions put "
                        "through the same test (grey: mean and range, the test's false "
                        "positives). Left: SAM statistic against the null pooled over "
                        "latents (conservative: it holds the rare large pushes a random "
                        "direction gives some latent). Right: each latent's own normal "
                        "tail (more power; trust it as far as the grey counts allow)."),
    "ablation": ("Directional ablation and ablate+add per hook", "Left: the held-out pairs' "
                 "contrast (metric on the positive side minus the negative side) kept after "
                 "projecting the steering vector out at every position but BOS (1 = untouched, "
                 "0 = both sides read alike), 95 % t interval over pairs, beside random "
                 "directions (mean ± sd). Right: the slope of the metric when the component "
                 "along the vector is set to m × its norm (Arditi et al. 2024), against random "
                 "directions of the same norm."),
    "clamp": ("Clamping SAE latents vs adding the vector", "Left: mean change of the "
              "behaviour metric when the decomposition's top latents are clamped (error term "
              "kept) at each eval prompt's last token to a multiple of their largest "
              "activation on the positive prompts, beside as many random active latents "
              "clamped the same way (grey) and adding the raw vector at the equal-KL "
              "multiplier (dashed). Right: KL(clean ‖ clamped) on held-out text, clamp at "
              "every position; dashed: the equal-KL target."),
    "targeted": ("Targeted vs raw vs random", "Steerability and KL of the raw vector, a "
                 "vector rebuilt from its top SAE features, and random controls."),
}  # fmt: skip


@dataclass
class SteeredConcept:
    model: str
    concept: str
    evaluation: dict[str, Any]
    decomposition: dict[str, Any]
    steering_path: Path
    decomposition_path: Path | None


def steered_concepts(steering_dir: Path, decomposition_dir: Path) -> list[SteeredConcept]:
    """Every `<model>/<concept>/evaluation.json` under `steering_dir`, with its
    decomposition when there is one."""
    out: list[SteeredConcept] = []
    root = Path(steering_dir)
    if not root.is_dir():
        return out
    for ev_path in sorted(root.glob("*/*/evaluation.json")):
        if any(p.startswith(".") for p in ev_path.relative_to(root).parts):
            continue  # a stage's temporary folder
        model, concept = ev_path.parent.parent.name, ev_path.parent.name
        try:
            ev = json.loads(ev_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            log.warning("steering: skipping unreadable %s (%s)", ev_path, err)
            continue
        dpath = Path(decomposition_dir) / model / concept / "decomposition.json"
        dd = json.loads(dpath.read_text()) if dpath.exists() else {}
        out.append(SteeredConcept(model, concept, ev, dd, ev_path.parent,
                                  dpath.parent if dpath.exists() else None))  # fmt: skip
    return out


def _sae_key(c: SteeredConcept, resolve: Resolver | None) -> str | None:
    dd = c.decomposition
    if "hook" not in dd:
        return None
    name = dd.get("sae") or dd.get("sae_name")
    if resolve is None:
        return f"{c.model}/{dd['hook']}/{name}" if name else None
    return resolve(c)


def sae_resolver(candidates: Sequence[tuple[str, str, str, Path]]) -> Resolver:
    """A resolver over the trained SAEs, given as (model, hook, name, folder).

    decomposition.json names the hook and the width, not the SAE, and a hook often has
    several SAEs of one width. The SAE is the one whose decoder rows have exactly the
    cosines with the steering vector (`vector.safetensors`) that the decomposition
    recorded for its top latents (`top_features.cosine`); a name in the file wins."""
    from stages.sae.io import load_sae
    from stages.steering.vectors import load_vector

    w_dec: dict[Path, Any] = {}
    found: dict[tuple[str, str], str | None] = {}

    def resolve(c: SteeredConcept) -> str | None:
        dd = c.decomposition
        hook, name = dd.get("hook"), dd.get("sae") or dd.get("sae_name")
        if name:
            return f"{c.model}/{hook}/{name}"
        if (c.model, c.concept) in found:
            return found[(c.model, c.concept)]
        recorded = [(int(r["latent"]), float(r["cosine"]))
                    for r in (dd.get("top_features") or {}).get("cosine", [])]  # fmt: skip
        key = None
        try:
            v = load_vector(c.steering_path)[0].get(hook)
        except (FileNotFoundError, ValueError):
            v = None
        if v is not None and recorded:
            for model, h, n, folder in candidates:
                if (model, h) != (c.model, hook):
                    continue
                if folder not in w_dec:
                    w_dec[folder] = load_sae(folder).W_dec.detach().double()
                W = w_dec[folder]
                if dd.get("sae_d") not in (None, W.shape[0]) or max(f for f, _ in recorded) >= len(
                    W
                ):
                    continue
                rows = W[[f for f, _ in recorded]]
                cos = (rows @ v.double()) / (rows.norm(dim=1) * v.double().norm()).clamp_min(1e-12)
                if all(abs(float(a) - b) < 1e-4 for a, (_, b) in zip(cos, recorded, strict=True)):
                    key = f"{model}/{h}/{n}"
                    break
        if key is None:
            log.warning("steering %s/%s: cannot tell which SAE at %s was used; its latents "
                        "are not linked to dashboards", c.model, c.concept, hook)  # fmt: skip
        found[(c.model, c.concept)] = key
        return key

    return resolve


def decomposed_sae_keys(
    steering_dir: Path, decomposition_dir: Path, resolve: Resolver
) -> list[str]:
    """SAE keys of the SAEs the steering decompositions used."""
    keys: list[str] = []
    for c in steered_concepts(steering_dir, decomposition_dir):
        k = _sae_key(c, resolve)
        if k and k not in keys:
            keys.append(k)
    return keys


def top_latents(dd: dict[str, Any], k: int = 5) -> list[tuple[int, float]]:
    """The decomposition's k largest-coefficient latents, (latent, coefficient)."""
    nd = dd.get("nn_decomposition") or {}
    pairs = list(zip(nd.get("features", []), nd.get("coefficients", []), strict=False))
    return sorted(((int(f), float(c)) for f, c in pairs), key=lambda t: -t[1])[:k]


def wanted_features(
    steering_dir: Path, decomposition_dir: Path, resolve: Resolver | None = None, k: int = 5
) -> dict[str, dict[int, list[str]]]:
    """SAE key -> {latent: [reason]}: each concept's top decomposition latents."""
    out: dict[str, dict[int, list[str]]] = {}
    for c in steered_concepts(steering_dir, decomposition_dir):
        key = _sae_key(c, resolve)
        if key is None:
            continue
        for rank, (f, coef) in enumerate(top_latents(c.decomposition, k)):
            out.setdefault(key, {}).setdefault(f, []).append(
                f"steering component #{rank + 1} of {c.concept} (coef {coef:.2f})"
            )
    return out


def section(
    ctx: ReportContext,
    steering_dir: Path,
    decomposition_dir: Path,
    pages: dict[tuple[str, int], str],
    resolve: Resolver | None = None,
) -> Section | None:
    """The steering section, or None when no concept has been steered."""
    from stages.steering import figures_from_dict
    from stages.steering.decompose_run import decomposition_figures

    concepts = steered_concepts(steering_dir, decomposition_dir)
    if not concepts:
        return None
    parts = []
    for model in sorted({c.model for c in concepts}):
        mine = [c for c in concepts if c.model == model]
        parts.append(f"<h3>{e(model)}</h3>")
        parts.append(_summary_table(mine, pages, resolve))
        parts.append(_controls_table(mine))
        parts.append(_circuit_table(mine))
        parts.append(programme_tables(mine))
        parts.append(_interventions_table(mine))
        for c in mine:
            inputs = [Path(steering_dir) / model]
            if c.decomposition_path is not None:
                inputs.append(Path(decomposition_dir) / model)
            try:
                figs = {
                    **figures_from_dict({"evaluation": c.evaluation}),
                    **decomposition_figures(c.decomposition, c.concept),
                }
            except (KeyError, TypeError, ValueError, IndexError) as err:
                parts.append(f'<p class="note">{e(model)} {e(c.concept)}: figures could not be '
                             f"drawn from {e(c.steering_path)} ({e(type(err).__name__)}: "
                             f"{e(err)}).</p>")  # fmt: skip
                continue
            parts.append(f"<h4>{e(model)} · {e(c.concept)}</h4>")
            for name, fig in figs.items():
                title, desc = TITLES.get(name, (name.replace("_", " ").capitalize(), ""))
                block, _ = ctx.figure(
                    fig,
                    f"steering/{model}__{c.concept}__{name}",
                    title=f"{title}, {model}, {c.concept}",
                    description=desc,
                    inputs=inputs,
                )
                parts.append(block)
            parts.append(_generations(c))
    return Section("steering", "Steering", "".join(parts))


def _summary_table(concepts: list[SteeredConcept], pages: dict, resolve: Resolver | None) -> str:
    rows = []
    for c in concepts:
        sw = c.evaluation.get("sweep") or {}
        best = sw.get("best_hook")
        st = (sw.get("steerability") or {}).get(best) or {}
        se = (sw.get("side_effects") or {}).get(best) or {}
        dd = c.decomposition
        key = _sae_key(c, resolve)
        feats = []
        for f, coef in top_latents(dd, 5):
            url = pages.get((key, f)) if key else None
            label = f"#{f}"
            feats.append((f'<a href="{e(url)}">{label}</a>' if url else label) + f" ({coef:.2f})")
        pk = (dd.get("precision_at_k") or {}).get("nnls") or {}
        pk_rp = (dd.get("precision_at_k_read_position") or {}).get("nnls") or {}
        raw = (((c.evaluation.get("controls") or {}).get(best) or {}).get("vectors") or {}).get(
            "raw", {}).get("equal_norm", {})  # fmt: skip
        curve = (dd.get("nn_decomposition") or {}).get("curve") or []
        at = dd.get("attribution") or {}
        rows.append([
            e(c.concept), f"<code>{e(best or '–')}</code>", fmt(st.get("slope")),
            _z_p(raw), fmt(st.get("wrong_way_fraction"), 2), fmt(se.get("kl")),
            "yes" if sw.get("within_budget") else "no",
            f"<code>{e(dd.get('hook', '–'))}</code>", fmt(pk.get("5"), 2), fmt(pk_rp.get("5"), 2),
            f"{fmt(at.get('pearson'), 2)} / {fmt(at.get('spearman'), 2)}" if at else "–",
            fmt(curve[min(4, len(curve) - 1)] if curve else None, 2), " ".join(feats) or "–",
        ])  # fmt: skip
    return table(
        ["concept", "best hook", "steerability", "z (p) vs random", "wrong-way", "KL",
         "in budget", "SAE hook", "P@5 (NNLS)", "P@5 at read position",
         "attribution vs ablation r / ρ", "error @5",
         "top SAE features (coef)"],
        rows, left=2, also_left=(7, 12),
    )  # fmt: skip


def _z_p(r: dict) -> str:
    """'z (p)' of one test against the random directions ('–' when absent)."""
    if not r or r.get("z") is None:
        return "–"
    return f"{fmt(r.get('z'), 2)} ({fmt(r.get('p'), 3)})"


def _ci(r: dict) -> str:
    lo, hi = (r or {}).get("ci95") or (None, None)
    return f"[{fmt(lo, 3)}, {fmt(hi, 3)}]"


def _controls_table(concepts: list[SteeredConcept]) -> str:
    """Every vector at the decomposition hook against the same random directions: at its
    own norm, rescaled to the raw vector's norm, and at the multiplier giving the raw
    vector's KL at the equal-KL multiplier (stages/steering/controls.py)."""
    rows, n, floor, windows = [], None, None, None
    for c in concepts:
        ctl = c.decomposition.get("controls") or {}
        if not ctl:
            continue
        n, floor = ctl.get("n_random"), ctl.get("p_floor")
        kl = ctl.get("equal_kl") or {}
        windows = kl.get("kl_windows", windows)
        for kind, r in (ctl.get("vectors") or {}).items():
            own, eq, ek = r.get("own_norm", {}), r.get("equal_norm", {}), r.get("equal_kl", {})
            rows.append([
                e(c.concept), e(kind), f"<code>{e(ctl.get('hook', '–'))}</code>",
                fmt(r.get("norm"), 2), fmt(own.get("steerability")), _ci(own),
                fmt(eq.get("steerability")), f"{fmt(eq.get('null_mean'))} ± {fmt(eq.get('null_sd'))}",
                _z_p(eq), fmt(kl.get("target_kl")), fmt(ek.get("multiplier"), 2),
                fmt(ek.get("effect")), _ci(ek),
                f"{fmt(ek.get('null_mean'))} ± {fmt(ek.get('null_sd'))}", _z_p(ek),
            ])  # fmt: skip
    if not rows:
        return ""
    note = (f"<p class='muted'>Steering effects against {e(n)} random directions (seeded "
            "Gaussian, uniform on the sphere). <b>Equal norm</b>: every vector rescaled to the "
            "raw vector's norm, effect = steerability (slope of the behaviour metric over the "
            "multipliers), beside the null's mean ± sd. <b>Equal KL</b>: the multiplier (× the "
            "raw norm) at which KL(clean ‖ steered) on "
            f"{e(windows)} held-out windows reaches the target (the raw vector's KL at ×1), "
            "effect = mean change of the metric there against ×0, each random direction at "
            "its own such multiplier. z against the null's mean and sd; p = (1 + #null ≥ "
            f"effect) / (1 + n), one-sided, floor {fmt(floor, 4)}; not corrected across rows. "
            "Intervals: 95 % t over prompts. Own norm: the variant as built, untested.</p>")  # fmt: skip
    return note + table(
        ["concept", "vector", "hook", "norm", "slope (own norm)", "95 % CI", "slope (equal norm)",
         "null", "z (p)", "target KL", "multiplier", "effect (equal KL)", "95 % CI", "null",
         "z (p)"],
        rows, left=3,
    )  # fmt: skip


def _circuit_table(concepts: list[SteeredConcept]) -> str:
    """Each concept's sparse feature circuit (stages/steering/circuit.py): its nodes per
    hook, its strongest edges, and the two random-latent controls."""
    rows = []
    for c in concepts:
        circ = c.decomposition.get("circuit") or {}
        if not circ.get("nodes"):
            continue
        nodes = "<br>".join(
            f"<code>{e(h)}</code>: " + ", ".join(f"{n['latent']} ({fmt(n['attribution'], 3)})"
                                                 for n in ns)
            for h, ns in circ["nodes"].items())  # fmt: skip
        top = sorted(circ.get("edges", []), key=lambda x: -abs(x["weight"]))[:5]
        edges = "<br>".join(f"{x['from']} → {x['to']} ({fmt(x['weight'], 4)})" for x in top)
        ec, ab = circ.get("edge_control") or {}, circ.get("ablation") or {}
        rows.append([
            e(c.concept), nodes, edges or "–",
            f"{fmt(ec.get('circuit_mean_abs'), 4)} vs {fmt(ec.get('random_mean_abs'), 4)}; "
            f"{fmt(ec.get('frac_circuit_above_random_p95'), 2)} above random p95",
            f"{fmt(ab.get('circuit_delta'), 3)} vs {fmt(ab.get('random_delta_mean'), 3)} ± "
            f"{fmt(ab.get('random_delta_sd'), 3)} (z {fmt(ab.get('z'), 2)})",
        ])  # fmt: skip
    if not rows:
        return ""
    note = (
        "<p class='muted'>Sparse feature circuits (Marks et al. 2024), every SAE spliced "
        "in with its error term kept: nodes = the latents with the largest attribution "
        "(attribution patching of zero-ablation on the behaviour metric, in brackets) at "
        "each hook from the decomposition hook on; edges = the first-order effect of "
        "ablating the upstream latent on the downstream latent's contribution (strongest "
        "five). Controls: the same edge weights from random active upstream latents into "
        "the same nodes, and the metric's change when the whole circuit is zero-ablated "
        "against as many random active latents per hook (mean ± sd over draws).</p>"
    )
    return note + table(["concept", "nodes (attribution)", "top edges (weight)",
                         "|edge|: circuit vs random", "ablation Δm: circuit vs random"],
                        rows, left=3)  # fmt: skip


def _generations(c: SteeredConcept) -> str:
    g = c.evaluation.get("generations") or {}
    by = g.get("by_multiplier") or {}
    if not by:
        return ""
    mults = sorted(by, key=float)
    rows = []
    for i, prompt in enumerate(g.get("prompts", [])):
        rows.append([f"<code>{e(prompt)}</code>"]
                    + [f"<code>{e(by[m][i] if i < len(by[m]) else '')}</code>" for m in mults])  # fmt: skip
    return (
        f"<p class='muted'>Greedy generations steered at <code>{e(g.get('hook', ''))}</code>:</p>"
        + table(["prompt", *[f"×{float(m):g}" for m in mults]], rows, left=len(mults) + 1)
    )


def _interventions_table(concepts: list[SteeredConcept]) -> str:
    """Directional ablation and ablate+add per hook (steering@M), and clamping the
    decomposition's top latents against adding the vector at equal KL (decompose@M);
    stages/steering/interventions.py."""
    rows, n_abl, n_cl = [], None, None
    for c in concepts:
        for h, r in (c.evaluation.get("directional_ablation") or {}).items():
            n_abl = r.get("n_random")
            a, aa = r.get("ablate") or {}, r.get("ablate_add") or {}
            lo, hi = a.get("retained_ci95") or (None, None)
            rows.append([
                e(c.concept), "ablate / ablate+add", f"<code>{e(h)}</code>",
                f"{fmt(r.get('clean_contrast'), 2)} → {fmt(a.get('contrast'), 2)}",
                f"{fmt(a.get('retained'), 2)} [{fmt(lo, 2)}, {fmt(hi, 2)}]",
                _z_p(a), f"{fmt(aa.get('steerability'))} {_ci(aa)}", _z_p(aa),
            ])  # fmt: skip
        cl = c.decomposition.get("clamp") or {}
        if cl:
            n_cl = (cl.get("random") or {}).get("n")
            add, diff = cl.get("add_equal_kl") or {}, cl.get("clamp_minus_add") or {}
            rows.append([
                e(c.concept), f"clamp {e(cl.get('latents'))} at ×{fmt(cl.get('clamp_at'), 2)}, "
                f"KL {fmt(cl.get('kl'))}; add at ×{fmt(add.get('multiplier'), 2)}",
                f"<code>{e(cl.get('hook', '–'))}</code>",
                f"add {fmt(add.get('effect'))} {_ci(add)}",
                f"clamp {fmt(cl.get('effect'))} {_ci(cl)}", _z_p(cl),
                f"clamp − add {fmt(diff.get('effect'))} {_ci(diff)}", "–",
            ])  # fmt: skip
    if not rows:
        return ""
    note = ("<p class='muted'><b>Ablate</b>: the steering vector's direction projected out at "
            "every position but BOS (Arditi et al. 2024); the held-out pairs' contrast (metric "
            "on the positive minus the negative prompt) before → after, and the fraction "
            "retained with its 95 % t interval over pairs (1 = untouched, 0 = the neutral "
            f"baseline); z (p) of the drop against {e(n_abl)} random directions. "
            "<b>Ablate+add</b>: the component along the vector set to m × its norm; slope over "
            "m of the metric on both sides of the pairs, against random directions of the "
            "vector's norm. <b>Clamp</b>: the decomposition's top latents clamped (SAE error "
            "term kept) at the eval prompts' last token to a multiple of their largest "
            "activation on the positive prompts; its mean change of the metric beside adding "
            "the raw vector at the multiplier whose KL on held-out text equals the clamp's "
            f"(paired difference), z (p) against {e(n_cl)} sets of as many random active "
            "latents clamped the same way. p one-sided, floor 1/(n + 1), not corrected across "
            "rows.</p>")  # fmt: skip
    return note + table(
        ["concept", "intervention", "hook", "contrast / add effect", "retained / clamp effect",
         "z (p)", "ablate+add slope / clamp − add", "z (p)"],
        rows, left=3,
    )  # fmt: skip
