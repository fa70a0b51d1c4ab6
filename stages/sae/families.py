"""Latent families across SAE widths, matched to the world's planted hierarchy.

Given SAEs of increasing width on one hook (w_0 < w_1 < …, typically doubling) and
held-out rows with concept labels:

- **Parent links** (feature splitting, Bricken et al. 2023, "Towards Monosemanticity",
  §"Feature Splitting"): the parent of latent ℓ at width w_{i+1} is the latent p at
  width w_i maximising ½ (cos(d_ℓ, d_p) + ρ(a_ℓ, a_p)), the mean of the decoder cosine
  and the Pearson correlation of the two latents' activations over the held-out rows
  (a dead latent correlates 0 with everything). The decoder-cosine-only parent
  (`stages.alignment.matching.feature_splitting` without co-activation) is kept as the
  reported control. Ancestors at width w_i of a latent at width w_j (j > i) follow the
  links down.
- **Best latent per concept and width** (as `stages/sae/evaluate.py`): fires = act > 0,
  the latent with the best F1 at the concept's natural prevalence. It is chosen on the
  probe-train half of the rows (split by document, `concepts.split_by_group`) and its F1
  reported on the test half with a document-bootstrap 95 % interval
  (`concepts.f1_with_interval`).
- **Hierarchy match**: for each parent concept P of the hierarchy (animal → mammal /
  bird / fish → species; emotion → polarity), each width w_i and each gap g (w_{i+g} =
  2^g w_i), each child concept c of P: does the best latent of c at w_{i+g} descend from
  the best latent of P at w_i? The reported fraction is over all (P, c, i, g) with both
  concepts scored. Null: the same fraction with the parent links shuffled (each layer's
  parent array permuted over the wide latents, which keeps every parent's number of
  children), `n_draws` seeded draws → the null mean, its 95 % interval and the empirical
  p = (1 + #{null ≥ observed}) / (1 + n_draws). That null only says the links carry
  information. The second, stricter one keeps the links and puts an unrelated concept in
  the parent's place: per (parent, child, width, gap), a concept of the hierarchy drawn at
  random among those that are neither the child nor its ancestor or descendant (for
  `dog`: bird, fish, their species, the emotions) → `unrelated_null_mean / lo / hi` and
  `unrelated_p`: does the child's latent descend from its parent concept's latent more
  often than from an unrelated concept's? "Splitting follows the hierarchy" is claimed
  only where the observed fraction beats both.

Feature absorption (Chanin et al. 2024, "A is for Absorption") is the failure this
measures from the other side: a child latent that absorbs its parent's direction has the
parent's decoder direction, so it is linked to the parent latent by cosine even where the
two never co-fire; the co-activation term separates splitting (a parent that fires with
its children) from absorption (a parent silent where the child fires).

Pure functions on arrays; `codes_of` encodes rows with loaded SAEs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from stages.alignment.matching import feature_splitting
from stages.sae.concepts import Bootstrap, f1_with_interval, split_by_group, wilson

N_DRAWS = 1000
GAPS = (1, 2)


def codes_of(sae, x: torch.Tensor, batch_size: int = 4096) -> sp.csr_matrix:
    """The SAE's latent activations on rows x [n, d_in] as a sparse [n, d_sae] matrix."""
    parts = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            f = sae.encode(x[i : i + batch_size].float()).float().cpu().numpy()
            parts.append(sp.csr_matrix(np.where(f > 0, f, 0.0)))
    return sp.vstack(parts).tocsr() if parts else sp.csr_matrix((0, sae.d_sae))


def coactivation(acts_wide, acts_narrow) -> np.ndarray:
    """Pearson correlation [m_wide, m_narrow] between every wide and every narrow latent's
    activation over the same rows (dense or scipy-sparse [n, m]); 0 where a latent is
    constant (dead)."""
    a, b = sp.csc_matrix(acts_wide, dtype=np.float64), sp.csc_matrix(acts_narrow, dtype=np.float64)
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"coactivation: acts_wide has {a.shape[0]} rows and acts_narrow {b.shape[0]}: "
            f"expected the same rows"
        )
    n = a.shape[0]
    ma, mb = np.asarray(a.mean(0)).ravel(), np.asarray(b.mean(0)).ravel()
    sa = np.sqrt(np.maximum(np.asarray(a.multiply(a).mean(0)).ravel() - ma**2, 0.0))
    sb = np.sqrt(np.maximum(np.asarray(b.multiply(b).mean(0)).ravel() - mb**2, 0.0))
    cov = (a.T @ b).toarray() / n - np.outer(ma, mb)
    den = np.outer(sa, sb)
    ok = den > 1e-12 * max(1.0, float(den.max(initial=0.0)))
    return np.where(ok, cov / np.where(ok, den, 1.0), 0.0).clip(-1.0, 1.0)


def best_latents(acts, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per concept column of labels [n, C] the latent (fires = act > 0) with the best F1,
    and that F1: (best [C], f1 [C]). Ties: the lowest index."""
    fired = sp.csr_matrix(acts, dtype=np.float64)
    fired.data = (fired.data > 0).astype(np.float64)
    lab = sp.csc_matrix(np.asarray(labels, dtype=np.float64))
    tp = (lab.T @ fired).toarray()  # [C, m]
    fires = np.asarray(fired.sum(0)).ravel()[None]
    pos = np.asarray(lab.sum(0)).ravel()[:, None]
    den = fires + pos
    f1 = np.where(den > 0, 2 * tp / np.where(den > 0, den, 1.0), 0.0)
    best = f1.argmax(1)
    return best, f1[np.arange(len(best)), best]


def ancestors(parents: Sequence[np.ndarray], i: int, j: int, latents: np.ndarray) -> np.ndarray:
    """Ancestors at width index i of `latents` at width index j ≥ i; parents[k] maps width
    k + 1's latents to width k's."""
    out = np.asarray(latents)
    for k in range(j - 1, i - 1, -1):
        out = parents[k][out]
    return out


def hierarchy_match(
    best: np.ndarray,
    parents: Sequence[np.ndarray],
    names: Sequence[str],
    hierarchy: Mapping[str, Sequence[str]],
    *,
    gaps: Sequence[int] = GAPS,
    n_draws: int = N_DRAWS,
    seed: int = 0,
) -> dict:
    """The hierarchy-match fraction (module docstring) and its shuffled-links null.

    best [W, C]: each concept's best latent at each width; parents: W − 1 parent arrays.
    Returns {"fraction", "k", "n", "wilson", "null_mean", "null_lo", "null_hi", "p",
    "unrelated_null_mean", "unrelated_null_lo", "unrelated_null_hi", "unrelated_p",
    "k_unsplit" (matches whose child still shares the parent's best latent at the wider
    width: the parent latent persisting, not splitting), "split_fraction" (the matches
    that are splits) with its unrelated-concept null ("split_unrelated_null_mean / hi",
    "split_unrelated_p"),
    "by_gap": {g: same}, "pairs": [one row per (parent, child, width, gap)]}."""
    best = np.asarray(best)
    if best.shape != (len(parents) + 1, len(names)):
        raise ValueError(
            f"best has shape {best.shape}: expected [{len(parents) + 1} widths, "
            f"{len(names)} concepts]"
        )
    col = {n: j for j, n in enumerate(names)}
    tuples = [(p, c, i, g) for p, children in hierarchy.items() if p in col
              for c in children if c in col for g in gaps
              for i in range(len(best) - g)]  # fmt: skip
    if not tuples:
        return {"n": 0, "pairs": []}
    pj = np.array([col[p] for p, _, _, _ in tuples])
    cj = np.array([col[c] for _, c, _, _ in tuples])
    ii = np.array([t[2] for t in tuples])
    gg = np.array([t[3] for t in tuples])

    def hits(links: Sequence[np.ndarray]) -> np.ndarray:
        out = np.empty(len(tuples), dtype=bool)
        for t in range(len(tuples)):
            anc = ancestors(links, ii[t], ii[t] + gg[t], best[ii[t] + gg[t], cj[t]])
            out[t] = anc == best[ii[t], pj[t]]
        return out

    observed = hits(parents)
    # a match where child and parent concept still share their best latent at the wider
    # width is persistence, not splitting: counted apart as `k_unsplit`
    unsplit = best[ii + gg, cj] == best[ii + gg, pj]
    rng = np.random.default_rng(seed)
    null = np.empty((n_draws, len(tuples)), dtype=bool)
    for d in range(n_draws):
        null[d] = hits([p[rng.permutation(len(p))] for p in parents])
    # second null: the true links, an unrelated concept in the parent's place (any scored
    # hierarchy concept that is neither the child nor one of its ancestors or descendants)
    anc = np.array([ancestors(parents, ii[t], ii[t] + gg[t], best[ii[t] + gg[t], cj[t]])
                    for t in range(len(tuples))])  # fmt: skip
    related = _relatives(hierarchy)
    in_tree = sorted({x for p, ch in hierarchy.items() for x in (p, *ch) if x in col})
    cands = [np.array([col[x] for x in in_tree if x != c and x not in related.get(c, ())])
             for _, c, _, _ in tuples]  # fmt: skip
    unull = np.zeros((n_draws, len(tuples)), dtype=bool)
    usplit = np.zeros((n_draws, len(tuples)), dtype=bool)  # ... and a split from it
    for t, cand in enumerate(cands):
        if len(cand):
            pick = cand[rng.integers(0, len(cand), n_draws)]
            unull[:, t] = anc[t] == best[ii[t], pick]
            usplit[:, t] = unull[:, t] & (best[ii[t] + gg[t], cj[t]] != best[ii[t] + gg[t], pick])

    def stats(mask: np.ndarray) -> dict:
        k, n = int(observed[mask].sum()), int(mask.sum())
        frac = k / n if n else math.nan
        out = {"fraction": frac, "k": k, "n": n, "wilson": list(wilson(k, n)),
               "k_unsplit": int((observed & unsplit)[mask].sum())}  # fmt: skip
        ks = int((observed & ~unsplit)[mask].sum())
        out["split_fraction"] = ks / n if n else math.nan
        sf = usplit[:, mask].mean(1) if n else np.full(n_draws, math.nan)
        out.update({"split_unrelated_null_mean": float(sf.mean()),
                    "split_unrelated_null_hi": float(np.quantile(sf, 0.975)),
                    "split_unrelated_p": float((1 + np.sum(sf >= out["split_fraction"]))
                                               / (1 + n_draws))})  # fmt: skip
        for tag, ptag, draws in (("null_", "p", null), ("unrelated_null_", "unrelated_p", unull)):
            nf = draws[:, mask].mean(1) if n else np.full(n_draws, math.nan)
            out.update({f"{tag}mean": float(nf.mean()), f"{tag}lo": float(np.quantile(nf, 0.025)),
                        f"{tag}hi": float(np.quantile(nf, 0.975)),
                        ptag: float((1 + np.sum(nf >= frac)) / (1 + n_draws))})  # fmt: skip
        return out

    out = stats(np.ones(len(tuples), dtype=bool))
    out["by_gap"] = {int(g): stats(gg == g) for g in gaps if (gg == g).any()}
    out["pairs"] = [{"parent": p, "child": c, "width_index": i, "gap": g, "match": bool(m),
                     "unsplit": bool(u)}
                    for (p, c, i, g), m, u in zip(tuples, observed, unsplit, strict=True)]  # fmt: skip
    return out


@dataclass
class WidthInputs:
    """One SAE of the ladder: its decoder [d_sae, d_in] and its codes on the rows."""

    name: str
    w_dec: np.ndarray
    acts: sp.csr_matrix


def families(
    ladder: Sequence[WidthInputs],
    labels: np.ndarray,
    concept_names: Sequence[str],
    groups: np.ndarray,
    hierarchy: Mapping[str, Sequence[str]],
    *,
    min_positives: int = 10,
    n_draws: int = N_DRAWS,
    seed: int = 0,
) -> dict:
    """The family table (JSON-ready): per width the best latent and test F1 of every
    hierarchy concept, the parent links' summaries, and the hierarchy match under the
    combined rule and under the decoder-cosine control. `ladder` in increasing width;
    labels [n, len(concept_names)] and groups [n] (document ids) row-aligned with the codes."""
    widths = [int(s.w_dec.shape[0]) for s in ladder]
    if len(ladder) < 2 or any(b <= a for a, b in zip(widths, widths[1:], strict=False)):
        raise ValueError(f"families: widths {widths}, expected ≥ 2 SAEs of increasing width")
    lab = np.asarray(labels).astype(bool)
    n = ladder[0].acts.shape[0]
    if lab.shape != (n, len(concept_names)) or any(s.acts.shape[0] != n for s in ladder):
        raise ValueError(
            f"families: labels {lab.shape}, codes {[s.acts.shape for s in ladder]}: expected "
            f"[{n} rows, {len(concept_names)} concepts] and every SAE's codes on those rows"
        )
    wanted = {p for p in hierarchy} | {c for ch in hierarchy.values() for c in ch}
    train = split_by_group(groups, seed)
    cols = [j for j, c in enumerate(concept_names) if c in wanted
            and lab[train, j].sum() >= min_positives and lab[~train, j].sum() >= min_positives]  # fmt: skip
    names = [concept_names[j] for j in cols]
    y = lab[:, cols]
    boot = Bootstrap.of(np.asarray(groups).ravel()[~train], seed=seed)
    best, per_width = [], []
    for s in ladder:
        b, train_f1 = best_latents(s.acts[train], y[train])
        fired = s.acts[~train][:, b].toarray() > 0
        r = f1_with_interval(torch.from_numpy(fired), torch.from_numpy(y[~train]), boot)
        best.append(b)
        per_width.append({
            "name": s.name, "d_sae": int(s.w_dec.shape[0]),
            "concepts": {c: {"latent": int(b[k]), "f1": float(r["f1"][k]),
                             "lo": float(r["lo"][k]), "hi": float(r["hi"][k]),
                             "train_f1": float(train_f1[k])} for k, c in enumerate(names)},
            "distinct_animal_latents": None,
        })  # fmt: skip
    best = np.stack(best)
    links = {"combined": [], "cosine": []}
    link_summary = []
    for narrow, wide in zip(ladder, ladder[1:], strict=False):
        rho = coactivation(wide.acts, narrow.acts)
        comb = feature_splitting(narrow.w_dec, wide.w_dec, coactivation=rho)
        cos = feature_splitting(narrow.w_dec, wide.w_dec)
        links["combined"].append(comb.parent)
        links["cosine"].append(cos.parent)
        link_summary.append({
            "narrow": narrow.name, "wide": wide.name,
            "agreement_with_cosine": float(np.mean(comb.parent == cos.parent)),
            "combined": comb.summary(), "cosine": cos.summary(),
        })  # fmt: skip
    hier = {p: [c for c in ch if c in names] for p, ch in hierarchy.items() if p in names}
    hier = {p: ch for p, ch in hier.items() if ch}
    subtree = _subtree(hier, "animal")
    for w, row in enumerate(per_width):
        row["distinct_animal_latents"] = len({int(best[w, names.index(c)]) for c in subtree})
    match = {rule: hierarchy_match(best, links[rule], names, hier, n_draws=n_draws, seed=seed)
             for rule in ("combined", "cosine")}  # fmt: skip
    tree = _tree(best, links["combined"], names, subtree)
    return {
        "widths": widths, "concepts": names, "hierarchy": hier,
        "rule": "parent = argmax over the narrower SAE's latents of ½ (decoder cosine + "
                "activation correlation); control: decoder cosine only",
        "n_rows": int(n), "n_test_rows": int((~train).sum()), "n_draws": n_draws,
        "seed": seed, "per_width": per_width, "links": link_summary,
        "hierarchy_match": match, "animal_tree": tree,
    }  # fmt: skip


def _relatives(hier: Mapping[str, Sequence[str]]) -> dict[str, set[str]]:
    """Each concept's ancestors and descendants in the hierarchy."""
    up: dict[str, str] = {c: p for p, ch in hier.items() for c in ch}
    out: dict[str, set[str]] = {}
    for c in {*up, *hier}:
        a = c
        while a in up:
            a = up[a]
            out.setdefault(c, set()).add(a)
            out.setdefault(a, set()).add(c)
    return out


def _subtree(hier: Mapping[str, Sequence[str]], root: str) -> list[str]:
    out, todo = [], [root]
    while todo:
        c = todo.pop(0)
        if c in out:
            continue
        out.append(c)
        todo += list(hier.get(c, []))
    return out if root in hier else []


def _tree(best: np.ndarray, parents: Sequence[np.ndarray], names: Sequence[str],
          concepts: Sequence[str]) -> list[dict]:  # fmt: skip
    """Per concept and width: its best latent and that latent's parent at the previous
    width (the family tree's edges)."""
    out = []
    for c in concepts:
        j = names.index(c)
        for w in range(len(best)):
            lat = int(best[w, j])
            out.append({"concept": c, "width_index": w, "latent": lat,
                        "parent_latent": int(parents[w - 1][lat]) if w else None})  # fmt: skip
    return out


# --------------------------------------------------------------------------- on disk


def planted_hierarchy(names: Sequence[str]) -> dict[str, list[str]]:
    """Parent -> children of the world's concepts (stages/corpus.py) among `names`."""
    from stages.corpus import CONCEPTS

    have = set(names)
    out: dict[str, list[str]] = {}
    for c in CONCEPTS:
        if c.parent in have and c.name in have:
            out.setdefault(c.parent, []).append(c.name)
    return out


def ladders(sae_dirs: Sequence[str | Path]) -> dict[str, list[Path]]:
    """SAE folders grouped into width ladders: the same training config but for the width
    (architecture, sparsity, seed, tokens, batch size, learning rate; read from cfg.json's
    training config), at least two widths, in increasing width. Key: `<arch>-k<k>-s<seed>`
    (`l0t<target>` for calibrated SAEs, plus tokens and lr where a hook has several)."""
    import json

    groups: dict[tuple, dict[int, Path]] = {}
    for d in sorted(map(Path, sae_dirs)):
        cfg = json.loads((d / "cfg.json").read_text())
        tc = ((cfg.get("metadata") or {}).get("feature_atlas") or {}).get("training_config") or {}
        tc = {**cfg, **tc}
        sparsity = f"k{tc['k']:g}" if tc.get("k") else f"l0t{tc.get('target_l0')}"
        key = (tc.get("architecture"), sparsity, tc.get("seed", 0), tc.get("n_training_tokens"),
               tc.get("batch_size"), tc.get("lr"))  # fmt: skip
        groups.setdefault(key, {}).setdefault(int(cfg["d_sae"]), d)  # first name wins a tie
    found = {k: v for k, v in groups.items() if len(v) >= 2}
    settings = {k[3:] for k in found}
    return {
        f"{k[0]}-{k[1]}-s{k[2]}" + (f"-t{k[3]}-lr{k[5]}" if len(settings) > 1 else ""):
        [v[w] for w in sorted(v)]
        for k, v in sorted(found.items(), key=lambda kv: str(kv[0]))
    }  # fmt: skip


def family_study(sae_dirs: Sequence[str | Path], store, hook: str, *, max_rows: int = 40_000,
                 n_draws: int = N_DRAWS, seed: int = 0) -> dict:  # fmt: skip
    """Families for every width ladder among `sae_dirs` (all on `hook` of the activation
    store `store`), on the store's first `max_rows` held-out rows. {} when no ladder."""
    from stages.sae.io import load_sae

    found = ladders(sae_dirs)
    if not found:
        return {}
    if not store.concept_names:
        raise ValueError(f"{store.path}: the activation store has no concept labels")
    src = store.source(hook, "heldout")
    n = min(src.n_rows, max_rows)
    x = torch.from_numpy(src.read(0, n)).float()
    labels = store.read("concept_labels", "heldout")[:n]
    groups = store.read("doc_ids", "heldout")[:n]
    names = list(store.concept_names)
    hier = planted_hierarchy(names)
    out = {}
    for key, dirs in found.items():
        lad = []
        for d in dirs:
            sae = load_sae(d)
            sae.eval()
            lad.append(WidthInputs(d.name, sae.W_dec.detach().double().numpy(), codes_of(sae, x)))
        out[key] = families(lad, labels, names, groups, hier, n_draws=n_draws, seed=seed)
    return {"hook": hook, "store": str(store.path), "ladders": out}


def seed_summary(study: dict) -> dict:
    """Across ladders (seeds): the pooled hierarchy-match fraction per rule and gap, and
    per width and concept the mean best-latent F1 and its range over seeds."""
    lads = list(study.get("ladders", {}).values())
    if not lads:
        return {}
    pooled = {}
    for rule in ("combined", "cosine"):
        ms = [lad["hierarchy_match"][rule] for lad in lads]
        k, n = sum(m["k"] for m in ms), sum(m["n"] for m in ms)
        pooled[rule] = {"k": k, "n": n, "fraction": k / n if n else math.nan,
                        "null_mean": float(np.mean([m["null_mean"] for m in ms])),
                        "p_per_ladder": [m["p"] for m in ms],
                        "unrelated_null_mean": float(np.mean([m["unrelated_null_mean"] for m in ms])),
                        "unrelated_p_per_ladder": [m["unrelated_p"] for m in ms]}  # fmt: skip
    f1 = {}
    widths = lads[0]["widths"]
    if all(lad["widths"] == widths for lad in lads):
        for c in lads[0]["concepts"]:
            if all(c in lad["concepts"] for lad in lads):
                v = np.array([[w["concepts"][c]["f1"] for w in lad["per_width"]] for lad in lads])
                f1[c] = {"mean": v.mean(0).tolist(), "min": v.min(0).tolist(),
                         "max": v.max(0).tolist()}  # fmt: skip
    return {"n_ladders": len(lads), "widths": widths, "hierarchy_match": pooled, "f1": f1}


def families_figure(result: dict, title: str = ""):
    """Two panels for one ladder: best-latent test F1 by width, parent concepts against
    leaves (species; mean and range); the animal family tree, each concept's best latent
    per width, an edge to its hierarchy parent at the previous width, solid where the
    latent descends from the parent's best latent, dotted where not."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5), layout="tight")
    ax, tx = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.4]})
    widths = result["widths"]
    hier = result["hierarchy"]
    parents = [c for c in hier if c in _subtree(hier, "animal")]
    leaves = [c for c in _subtree(hier, "animal") if c not in hier]
    f1 = {c: [w["concepts"][c]["f1"] for w in result["per_width"]] for c in result["concepts"]}
    for c in parents:
        ax.plot(widths, f1[c], marker="o", lw=2, label=c)
    if leaves:
        leaf = np.array([f1[c] for c in leaves])
        ax.fill_between(widths, leaf.min(0), leaf.max(0), color="0.6", alpha=0.3, lw=0)
        ax.plot(widths, leaf.mean(0), color="0.3", ls="--", marker="s",
                label=f"species (mean, range of {len(leaves)})")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set_xlabel("SAE width (d_sae)")
    ax.set_ylabel("best single latent, test F1")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8)
    ax.set_title("concept F1 by width: parents vs leaves")
    order = _subtree(hier, "animal")
    ypos = {c: -i for i, c in enumerate(order)}
    tree = {(t["concept"], t["width_index"]): t for t in result["animal_tree"]}
    parent_of = {c: p for p, ch in hier.items() for c in ch}
    for (c, w), t in tree.items():
        tx.scatter(w, ypos[c], s=30, color="C0" if c in hier else "C2", zorder=3)
        tx.annotate(str(t["latent"]), (w, ypos[c]), xytext=(4, 3), textcoords="offset points",
                    fontsize=7)  # fmt: skip
        p = parent_of.get(c)
        if w and p in ypos:
            ok = t["parent_latent"] == tree[(p, w - 1)]["latent"]
            tx.plot([w - 1, w], [ypos[p], ypos[c]], color="C2" if ok else "C3",
                    ls="-" if ok else ":", lw=1.5 if ok else 0.8, zorder=2)  # fmt: skip
    tx.set_yticks([ypos[c] for c in order], order, fontsize=8)
    tx.set_xticks(range(len(widths)), [str(w) for w in widths])
    tx.set_xlabel("SAE width; label: the concept's best latent")
    tx.set_title("animal family tree: green = child's latent descends from parent's")
    if title:
        fig.suptitle(title, fontsize=9)
    return fig


def match_rows(result: dict) -> tuple[list[str], list[list[str]]]:
    """HTML-table rows of one ladder: per width the best-latent F1 of the parent concepts
    and the species' mean, the distinct best latents of the animal concepts, and per rule
    and gap the hierarchy match against its null."""
    hier = result["hierarchy"]
    sub = _subtree(hier, "animal")
    parents = [c for c in sub if c in hier]
    leaves = [c for c in sub if c not in hier]
    head = ["row", *[str(w) for w in result["widths"]]]
    rows = []
    for c in parents:
        rows.append([f"F1 {c}", *(f"{w['concepts'][c]['f1']:.2f} [{w['concepts'][c]['lo']:.2f}, "
                                   f"{w['concepts'][c]['hi']:.2f}]" for w in result["per_width"])])  # fmt: skip
    if leaves:
        rows.append([f"F1 species (mean of {len(leaves)})",
                     *(f"{np.mean([w['concepts'][c]['f1'] for c in leaves]):.2f}"
                       for w in result["per_width"])])  # fmt: skip
    rows.append(["distinct best latents (animal subtree)",
                 *(str(w["distinct_animal_latents"]) for w in result["per_width"])])  # fmt: skip
    for rule, m in result["hierarchy_match"].items():
        if not m.get("n"):
            continue
        cells = [f"gap {g} (×{2**int(g)}): {b['k']}/{b['n']} = {b['fraction']:.2f} "
                 f"({b['k_unsplit']} unsplit); shuffled "
                 f"links {b['null_mean']:.3f} [{b['null_lo']:.3f}, {b['null_hi']:.3f}], p "
                 f"{b['p']:.3f}; unrelated concept {b['unrelated_null_mean']:.2f} "
                 f"[{b['unrelated_null_lo']:.2f}, {b['unrelated_null_hi']:.2f}], p "
                 f"{b['unrelated_p']:.3f}; splits only {b['split_fraction']:.2f} vs "
                 f"{b['split_unrelated_null_mean']:.2f}, p {b['split_unrelated_p']:.3f}"
                 for g, b in m["by_gap"].items()]  # fmt: skip
        rows.append([f"hierarchy match, {rule}", "; ".join(cells),
                     *([""] * (len(head) - 2))])  # fmt: skip
    return head, rows
