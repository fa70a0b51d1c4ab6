"""The alignment section, drawn from the align stage's files (`data/alignment/<A>__<B>/`,
layout in `stages/alignment/outputs.py`): matched-correlation histograms against the
shuffled-token null, linear-CKA and mutual-kNN layer-by-layer heatmaps, headline scores,
the concept ground-truth table (does each concept's best latent in A match the
concept's best latent in B?) and the steering-vector transfer test (transfer.json).
Also the matched pairs, for dashboard partner links.

`section(...)` returns None when no pair has been aligned (the report says "not run").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stages.alignment.similarity import metric_title
from stages.report.html import ReportContext, Section, e, fmt, table


@dataclass
class AlignedPair:
    """One model pair's alignment folder."""

    path: Path
    model_a: str
    model_b: str
    meta: dict[str, Any]

    def read(self, name: str) -> Any:
        p = self.path / name
        return json.loads(p.read_text()) if p.exists() else None


def aligned_pairs(alignment_dir: Path) -> list[AlignedPair]:
    """Every complete `<A>__<B>/` folder (with meta.json) under `alignment_dir`."""
    out = []
    root = Path(alignment_dir)
    if not root.is_dir():
        return out
    for d in sorted(p for p in root.iterdir() if p.is_dir() and "__" in p.name):
        if not (d / "meta.json").exists() or d.name.startswith("."):
            continue
        meta = json.loads((d / "meta.json").read_text())
        out.append(AlignedPair(d, meta.get("model_a", d.name.split("__")[0]),
                               meta.get("model_b", d.name.split("__")[1]), meta))  # fmt: skip
    return out


def split_pair_key(key: str) -> tuple[str, str, str, str]:
    """'<hook>/<sae>' or '<ha>~<hb>/<na>~<nb>' -> (hook_a, hook_b, sae_a, sae_b)."""
    hooks, names = key.split("/", 1)
    ha, _, hb = hooks.partition("~")
    na, _, nb = names.partition("~")
    return ha, hb or ha, na, nb or na


def aligned_sae_keys(alignment_dir: Path) -> list[str]:
    """SAE keys (model/hook/sae) of every SAE that has been aligned, on either side."""
    keys: list[str] = []
    for pair in aligned_pairs(alignment_dir):
        for key in pair.meta.get("sae_pairs", []):
            ha, hb, na, nb = split_pair_key(key)
            for k in (f"{pair.model_a}/{ha}/{na}", f"{pair.model_b}/{hb}/{nb}"):
                if k not in keys:
                    keys.append(k)
    return keys


def hungarian_matches(pair: AlignedPair, key: str) -> list[dict[str, Any]]:
    """Rows of the pair's Hungarian matching for one SAE pair, from its parquet table."""
    import pyarrow.parquet as pq

    path = pair.path / "matches" / f"{key.replace('/', '__')}.parquet"
    if not path.exists():
        return []
    t = pq.read_table(path).to_pydict()
    return [
        {k: t[k][i] for k in t} for i in range(len(t["latent_a"])) if t["method"][i] == "hungarian"
    ]


def partner_pairs(
    alignment_dir: Path, *, n_top: int = 5
) -> tuple[
    list[tuple[str, int, str, int, float | None]], list[tuple[str, int, str, int, float | None]]
]:
    """(all Hungarian matches, the n_top best-correlated per SAE pair) as
    (SAE key A, latent A, SAE key B, latent B, correlation); SAE key = model/hook/sae."""
    every, top = [], []
    for pair in aligned_pairs(alignment_dir):
        for key in pair.meta.get("sae_pairs", []):
            ha, hb, na, nb = split_pair_key(key)
            ka, kb = f"{pair.model_a}/{ha}/{na}", f"{pair.model_b}/{hb}/{nb}"
            rows = [r for r in hungarian_matches(pair, key)
                    if r["correlation"] is not None and math.isfinite(r["correlation"])]  # fmt: skip
            these = [(ka, int(r["latent_a"]), kb, int(r["latent_b"]), float(r["correlation"]))
                     for r in rows]  # fmt: skip
            every += these
            top += sorted(these, key=lambda t: -t[4])[:n_top]
    return every, top


def _null_figure(pair: AlignedPair, key: str, rec: dict[str, Any], threshold: float | None):
    from matplotlib.figure import Figure

    edges = np.asarray(rec.get("edges") or np.linspace(-1, 1, 101))
    fig = Figure(figsize=(6.2, 3.4), layout="constrained")
    ax = fig.add_subplot()
    h = rec["hungarian"]
    centres = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    for name, counts, colour in (("matched (Hungarian)", h["observed"], "#1f77b4"),
                                 ("shuffled-token null", h["null"], "#ff7f0e")):  # fmt: skip
        c = np.asarray(counts, float)
        dens = c / max(c.sum() * width, 1e-12)
        ax.bar(centres, dens, width=width, alpha=0.6, color=colour, label=name)
    lo = edges[np.argmax((np.asarray(h["observed"]) + np.asarray(h["null"])) > 0)]
    ax.set_xlim(min(lo, 0) - 0.02, 1.0)
    if rec.get("null_threshold") is not None:
        ax.axvline(rec["null_threshold"], color="k", ls=":", lw=1,
                   label=f"null q{rec.get('null_quantile', 0.99):g}")  # fmt: skip
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax.set_xlabel("correlation of matched latents")
    ax.set_ylabel("density")
    ax.set_title(f"{pair.model_a} vs {pair.model_b}: {key}", fontsize=9)
    ax.legend(fontsize=7)
    return fig


def _heatmap(g: dict[str, Any], title: str, a: str, b: str):
    from matplotlib.figure import Figure

    values = np.asarray(g["values"], dtype=float)
    rows, cols = g["hooks_a"], g["hooks_b"]
    fig = Figure(figsize=(2.4 + 1.3 * len(cols), 1.6 + 0.75 * len(rows)), layout="constrained")
    ax = fig.add_subplot()
    im = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="viridis")
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, "–" if not np.isfinite(v) else f"{v:.2f}", ha="center", va="center",
                color="w" if (np.isfinite(v) and v < 0.6) else "k", fontsize=8)  # fmt: skip
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_xlabel(b)
    ax.set_ylabel(a)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    return fig


SCORE_COLUMNS = (
    ("fraction_with_partner", "with partner (max)"),
    ("mean_matched_corr_hungarian", "mean matched r"),
    ("null_threshold", "null q"),
    ("fraction_above_null_hungarian", "above null"),
    ("mean_jaccard_hungarian", "Jaccard, matched"),
    ("mean_jaccard_hungarian_above_threshold", "Jaccard, matched ≥ threshold"),
    ("mean_jaccard_all_pairs", "Jaccard, all pairs (chance)"),
    ("mean_decoder_cosine_hungarian", "decoder cos (Procrustes)"),
    ("ground_truth_fraction_hungarian", "concepts matched"),
)


def fmt_p(p: Any) -> str:
    """A p-value cell: 3 significant digits; an underflowed normal tail reads < 1e-300."""
    if isinstance(p, float | int) and not isinstance(p, bool) and p == 0:
        return "&lt; 1e-300"
    return fmt(p)


def _jaccard_note(pair: AlignedPair) -> str:
    vocab = pair.meta.get("jaccard_vocabulary", "token ids")
    k = (pair.meta.get("config") or {}).get("top_k")
    over = {"token ids": "vocabulary ids",
            "decoded token strings": "decoded token strings (two tokenizers)"}.get(vocab)  # fmt: skip
    if over is None:
        return ("<p class='muted'>Top-token Jaccard: not computed (two tokenizers, and no "
                "decoded strings to compare their vocabularies).</p>")  # fmt: skip
    return (
        f"<p class='muted'>Top-token Jaccard over {over}: each latent's top {e(k)} distinct "
        "tokens by maximum activation, |T_a ∩ T_b| / |T_a ∪ T_b| per Hungarian-matched pair; "
        "'all pairs (chance)' is the mean over every latent pair, what a random matching "
        "scores.</p>"
    )


def _tests_table(pair: AlignedPair, scores: dict[str, Any]) -> str:
    """Every permutation test of the pair with its floor, normal tail and Holm p."""
    sim = pair.read("similarity.json") or {}
    config = pair.meta.get("config") or {}
    rows = []
    for name, tests in (sim.get("hook_pairs") or {}).items():
        for metric, t in tests.items():
            rows.append([f"<code>{e(name)}</code>", e(metric_title(metric, config)),
                         fmt(t.get("value")), fmt(t.get("z"), 2), fmt_p(t.get("p_value")),
                         _draws(t.get("n_permutations"), t.get("max_permutations"),
                                t.get("p_floor")),
                         fmt_p(t.get("p_holm")), fmt_p(t.get("p_normal")),
                         fmt_p(t.get("p_normal_holm"))])  # fmt: skip
    for key in pair.meta.get("sae_pairs", []):
        for tag, label in (("", "subspace CKA, matched latents"),
                           ("_above_threshold", "subspace CKA, matched ≥ threshold")):  # fmt: skip
            k = f"{key}/subspace_cka{tag}"
            if scores.get(f"{k}_p") is None:
                continue
            rows.append([f"<code>{e(key)}</code>", label, fmt(scores.get(k)),
                         fmt(scores.get(f"{k}_z"), 2), fmt_p(scores.get(f"{k}_p")),
                         _draws(None, None, scores.get(f"{k}_p_floor")),
                         fmt_p(scores.get(f"{k}_p_holm")), fmt_p(scores.get(f"{k}_p_normal")),
                         fmt_p(scores.get(f"{k}_p_normal_holm"))])  # fmt: skip
    if not rows:
        return ""
    corr = sim.get("correction") or (pair.meta.get("correction") or {})
    size = corr.get("family_size")
    n_tests = int(size) if isinstance(size, int | float) else len(rows)
    n_perm = config.get("n_permutations")
    alpha, h = config.get("family_alpha"), config.get("stop_after")
    how = (
        f"p: permutation p-value over shuffled pairings of the tokens, drawn sequentially "
        f"(Besag &amp; Clifford 1991): a test stops once {e(h)} shuffles reach its statistic "
        f"(p = {e(h)} / draws) or at its cap (p = (1 + #null ≥ observed) / (1 + cap)); the "
        f"caps were planned before the data, largest for the measures cheapest per shuffle, "
        f"so that a family of strong effects still reads a Holm-adjusted p ≤ {fmt(alpha)} "
        f"(the family's floor here: {fmt_p(scores.get('holm_floor'))}). Draws: made / cap, "
        "and the test's floor 1 / (1 + cap)"
        if alpha is not None
        else f"p: permutation p-value over {e(n_perm)} shuffled pairings of the tokens, "
        f"(1 + #null ≥ observed) / (1 + n), floor {fmt_p(scores.get('p_floor'))}"
    )
    head = (
        f"<h4>Similarity tests ({e(pair.model_a)} vs {e(pair.model_b)})</h4>"
        f"<p class='muted'>{how}; z: "
        "the statistic against the permutation null's mean and sd; p (normal): 1 − Φ(z), "
        "the normal approximation of the permutation null, which resolves below the floor "
        "(but trusts the null's normal shape). Multiple comparisons: "
        f"{e(corr.get('method', 'Holm (1979)'))}, over {e(corr.get('family', 'the pair’s tests'))}"
        f" ({n_tests} tests); Holm columns are the adjusted "
        "p-values.</p>"
    )
    return head + table(["hook pair / SAE pair", "measure", "value", "z", "p", "draws (floor)",
                         "p (Holm)", "p (normal)", "p (normal, Holm)"], rows, left=2)  # fmt: skip


def _draws(made: Any, cap: Any, floor: Any) -> str:
    """The draws cell: "made / cap (floor)" of a sequential test, "made (floor)" of a
    fixed one, or the floor alone (the subspace tests' scores carry only that)."""
    if made is None:
        return f"floor {fmt_p(floor)}"
    drawn = f"{int(made)} / {int(cap)}" if cap is not None else f"{int(made)}"
    return f"{drawn} ({fmt_p(floor)})"


def _controls_table(pair: AlignedPair, scores: dict[str, Any]) -> str:
    """Each dense measure of the trained pair beside its untrained-model controls
    (stages/alignment/controls.py): what architecture alone gives."""
    sim = pair.read("similarity.json") or {}
    controls = sim.get("controls") or {}
    config = pair.meta.get("config") or {}
    trained = sim.get("hook_pairs") or {}

    def cell(t: dict | None) -> str:
        if not t:
            return "–"
        return f"{fmt(t.get('value'))} (p {fmt_p(t.get('p_value'))})"

    rows = []
    for name, cells in controls.items():
        for metric, c in cells.items():
            t = (trained.get(name) or {}).get(metric) or {}
            value = cell(t)
            if metric == "linear_cka" and "trained_subsample" in c:
                value += f"; {fmt(c['trained_subsample'])} on the subsample"
            rows.append([f"<code>{e(name)}</code>", e(metric_title(metric, config)), value,
                         cell(c.get("untrained")), cell(c.get("trained_vs_untrained"))])  # fmt: skip
    a, b = e(pair.model_a), e(pair.model_b)
    if not rows:
        return (f"<h4>Untrained-model controls ({a} vs {b})</h4><p class='muted'>Not run: "
                "both models must be toy models (a pretrained model has no seed to redo), "
                "and <code>align.config.control_metrics</code> not empty.</p>")  # fmt: skip
    head = (
        f"<h4>Untrained-model controls ({a} vs {b})</h4>"
        f"<p class='muted'>What architecture alone gives: the same measures on the same "
        f"{fmt(config.get('n_samples'))} subsample tokens for two randomly initialised models "
        f"of the same architectures, each with its own model's seed (untrained {a} vs "
        f"untrained {b}), and for trained {a} vs untrained {b}. p: permutation p-value, "
        f"floor {fmt_p(scores.get('p_floor'))}, as above (controls are references, not in "
        "the Holm family). Linear CKA of the trained pair is exact over every paired "
        "token; its value on the subsample is the one comparable with the controls. A "
        "trained pair's similarity means something only by how far it stands above the "
        "untrained pair’s. Partner fraction and the other SAE-latent measures need SAEs "
        "trained on the untrained models' activations, so their control runs beside the "
        "default as a study (<code>python -m flows.seed_study --seeds --untrained 0 1</code>; "
        "the table across pairs above shows it when present).</p>"
    )
    return head + table(["hook pair", "measure", "trained pair", f"untrained {a} vs untrained {b}",
                         f"trained {a} vs untrained {b}"], rows, left=2)  # fmt: skip


def section(
    ctx: ReportContext,
    alignment_dir: Path,
    pages: dict[tuple[str, int], str],
    transfer_dir: Path | None = None,
) -> Section | None:
    """The alignment section, or None when no model pair has been aligned.

    `pages` maps (SAE key, latent) to a dashboard page (relative to the report);
    `transfer_dir` holds the transfer stage's `<A>__<B>/transfer.json`."""
    pairs = aligned_pairs(alignment_dir)
    if not pairs:
        return None
    parts = [aggregate_html(pairs, transfer_dir)]
    for pair in pairs:
        src = [pair.path]
        scores = pair.read("scores.json") or {}
        threshold = (pair.meta.get("config") or {}).get("threshold")
        parts.append(f"<h3>{e(pair.model_a)} vs {e(pair.model_b)}</h3>")
        parts.append(
            f"<p class='muted'>{fmt(pair.meta.get('n_tokens'))} paired tokens "
            f"({e(pair.meta.get('token_rule', ''))}{_heldout_share(pair.meta)}); from "
            f"<code>{e(pair.path)}</code>.</p>"
        )
        rows = []
        for key in pair.meta.get("sae_pairs", []):
            rows.append([f"<code>{e(key)}</code>"]
                        + [fmt(scores.get(f"{key}/{s}")) for s, _ in SCORE_COLUMNS])  # fmt: skip
        if rows:
            parts.append(table(["SAE pair", *[h for _, h in SCORE_COLUMNS]], rows))
            parts.append(_jaccard_note(pair))
        parts.append(_tests_table(pair, scores))
        parts.append(_controls_table(pair, scores))
        null = pair.read("null.json") or {}
        for key in pair.meta.get("sae_pairs", []):
            if key not in null:
                continue
            rec = {**null[key], "edges": null.get("edges")}
            block, _ = ctx.figure(
                _null_figure(pair, key, rec, threshold),
                f"alignment/{pair.path.name}__{key.replace('/', '__')}__null",
                title=f"Matched-correlation histogram against its null, {pair.model_a} vs "
                f"{pair.model_b}, {key}",
                description=(
                    "Pearson correlation over paired tokens of each Hungarian-matched latent "
                    "pair, against the same matching on token-shuffled activations (B's "
                    "chunks paired with other chunks of A); dotted: the null quantile."
                ),
                inputs=src,
            )
            parts.append(block)
        sim = pair.read("similarity.json") or {}
        config = pair.meta.get("config") or {}
        for metric, g in (sim.get("grid") or {}).items():
            block, _ = ctx.figure(
                _heatmap(
                    g,
                    f"{metric_title(metric, config)} (n = {g.get('n_samples')})",
                    pair.model_a,
                    pair.model_b,
                ),  # fmt: skip
                f"alignment/{pair.path.name}__{metric}_layers",
                title=f"{metric_title(metric, config)}, layer by layer, {pair.model_a} vs "
                f"{pair.model_b}",
                description=(
                    f"{metric_title(metric, config)} between every cached hook of "
                    f"{pair.model_a} (rows) and of {pair.model_b} (columns), on paired tokens."
                ),
                inputs=src,
            )
            parts.append(block)
        gt = {k: v for k, v in (pair.read("ground_truth.json") or {}).items() if v}
        if gt:
            parts.append(_ground_truth_table(pair, gt, pages))
        transfer_file = Path(transfer_dir or "") / pair.path.name / "transfer.json"
        transfer = (
            json.loads(transfer_file.read_text()) if transfer_dir and transfer_file.exists() else {}
        )
        if transfer.get("concepts"):
            parts.append(_transfer_block(ctx, pair, transfer, transfer_file))
    return Section("alignment", "Alignment across models", "".join(parts))


def _mean_sd(s: Any) -> str:
    if s is None or not s.n:
        return "–"
    sd = f" ± {fmt(s.sd)}" if s.n > 1 else ""
    return f"{fmt(s.mean)}{sd} <span class='muted'>(n {s.n})</span>"


def aggregate_html(pairs: list[AlignedPair], transfer_dir: Path | None = None) -> str:
    """The aggregate tables over every aligned pair: each universality measure as mean ±
    sd across pairs beside its controls (two pairs or more), and transfer over every pair,
    concept and hook in one Holm family (with one pair only its summary: how many vectors
    transfer, with the Wilson interval, and the fraction of the target's own effect; the
    pair's own table lists the tests)."""
    from stages.alignment.aggregate import TRAINED_KINDS, transfer_aggregate

    if not pairs:
        return ""
    trained = [p for p in pairs if _kind(p) in TRAINED_KINDS]
    single = len(trained) <= 1 and len(pairs) == 1
    out = [] if single else _universality_html(pairs)
    transfers = {}  # the control pairs (an untrained model) stay out of the family
    for p in trained:
        f = Path(transfer_dir or "") / p.path.name / "transfer.json"
        if transfer_dir and f.exists():
            transfers[p.path.name] = json.loads(f.read_text())
    agg = transfer_aggregate(transfers) if transfers else None
    if agg is None or not agg.m:
        return "".join(out)
    return "".join(out) + _transfer_summary_html(agg, len(transfers), with_tests=not single)


def _kind(pair: AlignedPair) -> str:
    from stages.alignment.aggregate import pair_kind

    return pair_kind(pair.meta.get("trained"), pair.meta.get("token_rule"))


def _universality_html(pairs: list[AlignedPair]) -> list[str]:
    from stages.alignment.aggregate import universality_rows

    kinds = {p.path.name: _kind(p) for p in pairs}
    names = [f"{p.model_a} vs {p.model_b}" for p in pairs if kinds[p.path.name] == "trained"]
    cross = [f"{p.model_a} vs {p.model_b}" for p in pairs
             if kinds[p.path.name] == "cross_tokenizer"]  # fmt: skip
    controls = [f"{p.model_a} vs {p.model_b}" for p in pairs
                if kinds[p.path.name] in ("untrained", "trained_vs_untrained")]  # fmt: skip
    rows = []
    scores = {p.path.name: p.read("scores.json") or {} for p in pairs}
    for r in universality_rows(scores, kinds):
        ref = f"{_mean_sd(r.reference)} <span class='muted'>{e(r.reference_label)}</span>" \
            if r.reference else "–"  # fmt: skip
        rows.append([e(r.measure), f"<code>{e(r.where)}</code>", _mean_sd(r.trained),
                     *([_mean_sd(r.cross_tokenizer)] if cross else []),
                     _mean_sd(r.untrained), _mean_sd(r.trained_vs_untrained), ref])  # fmt: skip
    thresholds = {(p.meta.get("config") or {}).get("threshold") for p in pairs}
    out = [
        f"<h3>Across {len(names)} model pair{'' if len(names) == 1 else 's'}"
        + (f", {len(cross)} across tokenizers" if cross else "")
        + (
            f" and {len(controls)} control pair{'' if len(controls) == 1 else 's'}"
            if controls
            else ""
        )
        + "</h3>",  # fmt: skip
        f"<p class='muted'>Pairs: {e(', '.join(names))}"
        + (
            f"; across tokenizers (rows paired on shared character spans, their own "
            f"column, so that the seed pairs' mean does not mix in the tokenizer's "
            f"effect): {e(', '.join(cross))}"
            if cross
            else ""
        )
        + ". Mean ± sample sd across the pairs "
        "(n: pairs with the measure); the pairs share models, so the sd describes the "
        "spread between pairs, it is not a standard error. Controls, per pair and then "
        "averaged the same way: untrained A vs untrained B and trained A vs untrained B "
        "(randomly initialised models of the same architecture, each with its model's "
        "seed), on the same subsample as 'linear CKA (subsample)' — the exact linear CKA "
        "over every paired token has no control of its own. SAE-latent measures sit beside "
        "the align stage's references: the shuffled-token null of the matched correlation "
        "and the chance level of top-token Jaccard over vocabulary ids (every latent pair)"
        + (
            f"; and the same SAE measures over the control pairs, whose untrained models "
            f"(train.tokens 0) have SAEs of their own, trained as the others': "
            f"{e(', '.join(controls))}"
            if controls
            else "; partner fraction has no control here: that needs untrained models "
            "with SAEs of their own (python -m flows.seed_study --untrained 0 1)"
        )
        + f". Partner threshold {e(', '.join(fmt(t, 2) for t in thresholds))}.</p>",
        table(
            [
                "measure",
                "hook / SAE pair",
                "trained pairs" + (", one tokenizer" if cross else ""),
                *(["trained, different tokenizers"] if cross else []),
                "untrained vs untrained",
                "trained vs untrained",
                "null / chance",
            ],
            rows,
            left=2,
        ),  # fmt: skip
    ]
    return out


def _floors(agg) -> str:
    """The tests' p floors: 1/(n_random + 1), and 1/(extend_to + 1) where a test drew on
    (its first n_random random directions all below the carried vector)."""
    floors = sorted({t.p_floor for t in agg.tests if math.isfinite(t.p_floor)}, reverse=True)
    if len(floors) <= 1:
        return fmt(floors[0]) if floors else "–"
    return f"{fmt(floors[0])} ({', '.join(fmt(f) for f in floors[1:])} where the draws went on)"


def _transfer_summary_html(agg, n_pairs: int, with_tests: bool) -> str:
    lo, hi = agg.interval
    nlo, nhi = agg.interval_normal
    own = agg.fraction_of_own_steering
    out = [
        f"<h4>Steering transfer over {n_pairs} pair{'s' if n_pairs > 1 else ''}</h4>",
        f"<p class='muted'>Every concept × hook of every pair (A's vector carried into B, "
        f"for each pair A__B) is one test in a single Holm (1979) family of {agg.m}: the "
        f"carried vector's steerability against random directions of its norm. A vector "
        f"transfers when its Holm-adjusted p ≤ {fmt(agg.alpha, 2)}; interval: Wilson 95 %. "
        f"The empirical p has floor {_floors(agg)}, so over {agg.m} tests no "
        f"Holm p can fall below {fmt(agg.best_possible_holm)}: "
        + (
            "the empirical column cannot reject anything at this family size, and the "
            "normal-tail approximation of the random-direction null is the one that can "
            "resolve (it trusts the null's normal shape). "
            if agg.best_possible_holm > agg.alpha
            else ""
        )
        + "'Of own': transferred slope / the target's own vector's slope, over every test and "
        "over the tests where the own vector steers (its 95 % interval above 0); where it "
        "does not, the ratio is not meaningful.</p>",
        table(
            ["", "transfer (of tests)", "fraction", "95 % interval (Wilson)"],
            [
                [
                    "empirical p, Holm",
                    f"{agg.transfers}/{agg.m}",
                    fmt(agg.transfers / agg.m),
                    f"[{fmt(lo)}, {fmt(hi)}]",
                ],
                [
                    "normal-tail p, Holm",
                    f"{agg.transfers_normal}/{agg.n_normal}",
                    fmt(agg.transfers_normal / agg.n_normal) if agg.n_normal else "–",
                    f"[{fmt(nlo)}, {fmt(nhi)}]",
                ],
            ],
        ),  # fmt: skip
        table(
            ["fraction of the target's own effect", "mean ± sd (n)"],
            [["every test", _mean_sd(agg.fraction_of_own)], ["own vector steers", _mean_sd(own)]],
        ),  # fmt: skip
    ]
    if not with_tests:
        return "".join(out)
    out += [
        table(
            [
                "pair",
                "concept",
                "hook",
                "p",
                "p (Holm, all pairs)",
                "p (normal)",
                "p (normal, Holm, all pairs)",
                "of own",
                "own steers",
            ],
            [
                [
                    e(t.pair),
                    e(t.concept),
                    f"<code>{e(t.hook)}</code>",
                    fmt_p(t.p),
                    fmt_p(t.p_holm),
                    fmt_p(t.p_normal),
                    fmt_p(t.p_normal_holm),
                    fmt(t.fraction_of_own, 2),
                    "yes" if t.own_steers else "no",
                ]
                for t in agg.tests
            ],
            left=3,
        ),  # fmt: skip
    ]
    return "".join(out)


def _transfer_rows(transfer: dict) -> list[tuple[str, str, dict]]:
    return [(c, h, r) for c, rows in sorted(transfer["concepts"].items())
            for h, r in sorted(rows.items())]  # fmt: skip


def _transfer_block(ctx: ReportContext, pair: AlignedPair, transfer: dict, source: Path) -> str:
    """Steering-vector transfer A → B: per concept and hook, B's own vector, A's vector
    carried through the Hungarian matches, and the random-direction null, all at the
    own vector's norm; a table and a strip plot."""
    a, b = pair.model_a, pair.model_b
    rows, items = [], _transfer_rows(transfer)

    def ci(r: dict) -> str:
        lo, hi = r.get("ci95") or (None, None)
        return f"{fmt(r['steerability'])} <span class='muted'>[{fmt(lo, 2)}, {fmt(hi, 2)}]</span>"

    for concept, hook, r in items:
        rnd, p = r["random"], r["p_vs_random"]
        # the verdict reads the Holm-corrected p (raw p in transfer.json written before
        # the correction existed)
        p_adj = r.get("p_vs_random_holm", p)
        if 1 / (rnd["n"] + 1) > 0.05:
            verdict = f"<span class='muted'>{rnd['n']} random: too few for p ≤ 0.05</span>"
        elif p_adj <= 0.05:
            verdict = '<span class="pos">beats random</span>'
        else:
            verdict = '<span class="neg">not above random</span>'
        rows.append([e(concept), f"<code>{e(hook)}</code>", ci(r["own"]), ci(r["transferred"]),
                     f"{fmt(rnd['steerability'])} ± {fmt(rnd['sd'])}", fmt(p),
                     fmt_p(r.get("p_vs_random_holm")), fmt(r.get("z_vs_random"), 2),
                     fmt_p(r.get("p_normal_vs_random_holm")),
                     fmt(r["fraction_of_own"], 2), fmt(r["cosine_transferred_own"], 2),
                     verdict])  # fmt: skip
    n, floor = transfer.get("n_random"), transfer.get("min_correlation")
    corr = transfer.get("correction") or {}
    which = "the Hungarian matches" + (
        f" that correlate ≥ {fmt(floor, 2)}" if floor is not None else ""
    )
    head = (
        f"<h4>Steering-vector transfer ({e(a)} → {e(b)})</h4>"
        f"<p class='muted'>Each of {e(a)}'s steering vectors is decomposed into {e(a)}'s SAE "
        f"features ({e(transfer.get('method'))}), carried along {which} and "
        f"rebuilt from {e(b)}'s decoder, then rescaled to the norm of {e(b)}'s own vector. "
        f"Steerability (slope of the behaviour metric against the multiplier, on {e(b)}'s "
        "held-out prompts, with a 95 % interval over prompts) of the own vector, the "
        f"transferred one and {e(n)} random directions of the same norm; p is the one-sided "
        f"empirical p of the transferred slope against the random ones (floor "
        f"{fmt(1 / (n + 1)) if isinstance(n, int) else '1/(n+1)'}); z: the transferred slope "
        "against the random slopes' mean and sd, whose normal tail 1 − Φ(z) is the normal "
        "approximation of the random-direction null; 'of own' is transferred / own. "
        f"Multiple comparisons: {e(corr.get('method', 'Holm (1979)'))} over "
        f"{e(corr.get('family', 'every concept × hook of the pair'))} "
        f"({e(corr.get('family_size', len(items)))} tests); the verdict reads the Holm p.</p>"
    )
    table_html = table(["concept", "hook", f"own ({e(b)})", "transferred",
                        "random (mean ± sd)", "p", "p (Holm)", "z", "p (normal, Holm)",
                        "of own", "cos(transferred, own)", ""], rows, left=2)  # fmt: skip
    block, _ = ctx.figure(
        _transfer_figure(items, a, b),
        f"alignment/{pair.path.name}__transfer",
        title=f"Steering-vector transfer, {a} → {b}",
        description=(f"Steerability in {b} of its own vector (diamond), of {a}'s vector carried "
                     "through the matched features (circle; bars: 95 % interval over "
                     "prompts) and of random directions of the same norm (grey)."),
        inputs=[source],
    )  # fmt: skip
    return head + table_html + block


def _transfer_figure(items: list[tuple[str, str, dict]], a: str, b: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.4, 1.2 + 0.45 * len(items)), layout="constrained")
    ax = fig.add_subplot()
    for y, (_, _, r) in enumerate(items):
        ax.scatter(r["random"]["slopes"], [y] * len(r["random"]["slopes"]), s=10,
                   color="0.6", alpha=0.7, label="random" if y == 0 else None)  # fmt: skip
        for kind, colour, marker, dy in (("own", "#1f77b4", "D", 0.18),
                                         ("transferred", "#ff7f0e", "o", -0.18)):  # fmt: skip
            v = r[kind]
            lo, hi = v["ci95"]
            ax.errorbar([v["steerability"]], [y + dy], xerr=[[v["steerability"] - lo],
                        [hi - v["steerability"]]], fmt=marker, color=colour, ms=5, capsize=2,
                        label=(f"own ({b})" if kind == "own" else f"transferred from {a}")
                        if y == 0 else None)  # fmt: skip
    ax.axvline(0, color="k", lw=0.6)
    ax.set_yticks(range(len(items)), [f"{c} @ {h}" for c, h, _ in items], fontsize=7)
    ax.set_ylim(len(items) - 0.5, -0.5)  # first row on top
    ax.set_xlabel(f"steerability in {b} (metric per unit multiplier)")
    ax.legend(fontsize=7, loc="best")
    return fig


def _ground_truth_table(pair: AlignedPair, gt: dict[str, dict], pages: dict) -> str:
    """Concepts × SAE pairs: is the concept's best latent in A matched (Hungarian) to its
    best latent in B, and how do the two correlate? Latents link to their dashboards."""
    keys = list(gt)
    concepts = sorted({c for v in gt.values() for c in v})

    def link(k: str, f: int) -> str:
        url = pages.get((k, int(f)))
        return f'<a href="{e(url)}">#{f}</a>' if url else f"#{f}"

    rows = []
    for c in concepts:
        row = [e(c)]
        for key in keys:
            v = gt[key].get(c)
            if v is None:
                row.append("–")
                continue
            ha, hb, na, nb = split_pair_key(key)
            ka, kb = f"{pair.model_a}/{ha}/{na}", f"{pair.model_b}/{hb}/{nb}"
            ok = (
                '<span class="pos">✓</span>' if v.get("hungarian") else '<span class="neg">✗</span>'
            )
            row.append(f"{ok} {fmt(v.get('correlation'), 2)} <span class='muted'>"
                       f"{link(ka, v['best_a'])}↔{link(kb, v['best_b'])}</span>")  # fmt: skip
        rows.append(row)
    total = ["<b>matched</b>"] + [
        f"<b>{sum(bool(v.get('hungarian')) for v in gt[k].values())}/{len(gt[k])}</b>" for k in keys
    ]
    rows.append(total)
    return (
        f"<h4>Concept ground truth across models ({e(pair.model_a)} ↔ {e(pair.model_b)})</h4>"
        "<p class='muted'>Per concept and SAE pair: ✓ when the concept's best latent in "
        f"{e(pair.model_a)} is Hungarian-matched to its best latent in {e(pair.model_b)}; "
        "the number is their correlation on paired tokens; latent ids link to dashboards.</p>"
        + table(["concept", *[f"<code>{e(k.split('/', 1)[1])}</code>" for k in keys]], rows)
    )


def _heldout_share(meta: dict) -> str:
    """', 18 % from the held-out split': how many of the tokens neither model nor SAE
    trained on (alignment tops a small held-out split up with training tokens)."""
    n, held = meta.get("n_tokens"), meta.get("n_heldout_tokens")
    if not n or held is None:  # outputs written before this was recorded
        return ""
    return f", {100 * held / n:.0f} % from the held-out split"
