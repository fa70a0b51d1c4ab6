"""Report section "The world and what the models learned".

Reads what the corpus stage exported (`data/corpus/truth.json`, `lexical_baseline.json`,
`meta.json`) and what the lm stage measured per toy model (`data/models/<M>/world.json`,
stages/capture.py): per planted dependency and model, the true log-odds contrast, the
model's, and the fraction captured with its 95 % interval; held-out loss against the
corpus entropy; and per concept its lexical baseline, so every ground-truth score later
in the report can be read as lift over token identity.
"""

from __future__ import annotations

import json
from pathlib import Path

from stages.report.html import Section, e, fmt, table


def _read(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def _ci(c: dict) -> str:
    lo, hi = c.get("ci95") or [None, None]
    return f"[{fmt(lo)}, {fmt(hi)}]"


def section(corpus: Path, models: Path, probes: Path | None = None) -> Section | None:
    """The section, or None when the corpus exported no truth (an HF corpus)."""
    truth = _read(corpus / "truth.json")
    base = _read(corpus / "lexical_baseline.json")
    if truth is None or base is None:
        return None
    meta = _read(corpus / "meta.json") or {}
    worlds = {}
    if models.exists():
        for d in sorted(models.iterdir()):
            w = _read(d / "world.json")
            if w is not None:
                worlds[d.name] = w
    parts = [
        "<p>The corpus generator plants dependencies with known probabilities. For each, "
        "on held-out contexts, the cue word is swapped through every value it can take and "
        "the model's log-odds of the outcome are regressed on the generator's: capture = "
        "model log-odds contrast / true log-odds contrast (1: the model has the world's "
        "probabilities; 0: it ignores the cue). Interval: 95 % over contexts. Control: the "
        "same architecture and seed, untrained.</p>"
    ]
    rows = []
    for dep, spec in truth.items():
        for name, w in worlds.items():
            c = w.get("capture", {}).get(dep)
            if c is None:
                continue
            u = (w.get("untrained_capture") or {}).get(dep)
            rows.append([
                e(dep), e(name), fmt(w.get("seed")), fmt(c["true_contrast"], 2),
                fmt(c["model_contrast"], 2), f"<b>{fmt(c['capture'])}</b> {_ci(c)}",
                f"{fmt(u['capture'])} {_ci(u)}" if u else "–",
                fmt(c["n_contexts"]), e(spec["cue"]) + " &rarr; " + e(spec["outcome"]),
            ])  # fmt: skip
    if rows:
        parts.append(table(["dependency", "model", "seed", "true contrast (nats)",
                            "model contrast", "capture [95 %]", "untrained model [95 %]",
                            "contexts", "cue → outcome"], rows, left=2, also_left=(8,)))  # fmt: skip
    else:
        parts.append('<p class="note">No toy model has a world.json (run the lm stage).</p>')
    loss_rows = [
        [e(n), fmt(w.get("heldout_loss")), fmt(w.get("corpus_entropy_per_token"))]
        for n, w in worlds.items()
    ]
    if loss_rows:
        parts.append(
            "<p>Held-out loss against the corpus entropy per token (the generator's draws per "
            "document over the model's tokens: an upper bound, see stages/corpus.py). A model "
            "that had learned the world exactly would sit at the entropy, plus the cost of "
            "window starts that cut documents.</p>"
        )
        parts.append(table(["model", "held-out loss (nats/token)", "corpus entropy"], loss_rows))
    ent = meta.get("entropy")
    if ent:
        parts.append(f"<p>Corpus entropy: {fmt(ent['nats_per_doc'], 4)} nats per document, "
                     f"{fmt(ent['nats_per_word'])} per word.</p>")  # fmt: skip
    parts.append(
        "<p>Lexical baseline per concept: the best F1 of any lookup on the current "
        f"{e(base['unit'].split(' ')[0])} ({e(base['unit'])}). Contextual concepts are the "
        "ones a token lookup cannot read; a probe or latent is worth reporting by its lift "
        "over this figure.</p>"
    )
    crow = [
        [e(n), e(v["kind"]), fmt(v["prevalence"]), f"<b>{fmt(v['f1'])}</b>"]
        for n, v in sorted(base["concepts"].items(), key=lambda kv: (kv[1]["kind"], kv[1]["f1"]))
    ]
    parts.append(table(["concept", "kind", "prevalence", "lexical F1"], crow, left=2))
    if probes is not None:
        parts += _probes(probes)
    return Section("world", "The world and what the models learned", "".join(parts))


def _probes(folder: Path) -> list[str]:
    """Per model (`metrics/activations/<M>.json`, key "probes"), each contextual concept's
    lexical F1 against a dense probe's (the best cached hook), the shuffled-label control
    and the untrained-model control (stages/concept_probes.py)."""
    from stages.concept_probes import contextual_wins

    parts = []
    for f in sorted(folder.glob("*.json")) if folder.exists() else []:
        probes = (_read(f) or {}).get("probes")
        if not probes:
            continue
        name = f.stem
        rows = [
            [e(c), fmt(r["prevalence"]), fmt(r["lexical_f1"]), f"<b>{fmt(r['best_f1'])}</b>",
             e(r["best_hook"]), fmt(r["lift"]), fmt(max(r["null_f1"].values())),
             fmt(r["untrained_best_f1"]) if "untrained_best_f1" in r else "–"]
            for c, r in sorted(probes["concepts"].items()) if r["kind"] == "contextual"
        ]  # fmt: skip
        if not rows:
            continue
        wins = contextual_wins(probes)
        parts.append(
            f"<h3>Contextual concepts in {e(name)}'s residual stream</h3><p>A logistic probe "
            f"per concept and cached hook, trained on {fmt(probes['n_train_rows'])} training "
            f"rows (threshold chosen for F1 there), scored by F1 on {fmt(probes['n_heldout_rows'])} "
            "held-out rows at the concept's prevalence, as the lexical baseline is. Control: "
            "the same probe on shuffled training labels, and on the untrained model (same "
            "architecture and seed, same tokens), each at its best hook. "
            f"<b>{len(wins)}</b> contextual concepts that a token lookup reads at F1 &le; 0.6 "
            f"reach F1 &ge; 0.9 with a probe{': ' + e(', '.join(wins)) if wins else ''}.</p>"
        )
        parts.append(table(["concept", "prevalence", "lexical F1", "probe F1", "at hook",
                            "lift", "shuffled-label F1", "untrained-model F1"], rows, left=1,
                           also_left=(4,)))  # fmt: skip
    return parts
