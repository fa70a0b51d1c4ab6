"""Feature dashboards (in the spirit of sae_vis / Neuronpedia), from the activation cache.

(Over 500 lines: the one streaming pass and the pages it feeds share their per-latent
records; split, each half would need the other to be read.)

For one SAE, one streaming pass over the cached held-out rows (`sae.encode` in chunks;
the model is never re-run) collects, for **every** latent: how often it fires, its
running top-k activations (row indices), and how often it fires on each concept's
tokens; and for the **selected** latents (most active, concept features, anything the
caller asks for: steering components, aligned partners) their activation on every row,
from which come contexts with per-token highlighting, samples across activation
quantiles and the activation histogram. The logit lens (W_dec[f] · W_U) needs only the
model's unembedding.

Three outputs per SAE, under `<report>/dashboards/<model>/<hook>/<sae>/`:
- `index.html`: the dashboarded latents with one-line descriptions;
- `feature-<id>.html`: one static page per selected latent;
- `dashboard_data.json`: the short description of every live latent (density, top
  tokens, best concept, top logit-lens tokens) and the full records of the selected ones;
  `features_of_text` reads it.

Memory: O(d_sae · k) for the running top-k plus rows × selected latents (float32), with
rows capped by `DashboardConfig.max_rows`.

Length (~700 lines): one dashboard is gathered (one pass over a store), summarised and
rendered here end to end; the HTML primitives are in `html.py`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stages.io import write_json
from stages.report.html import e, fmt, page, relpath, table

DATA_FILENAME = "dashboard_data.json"
DASHBOARD_FORMAT = "feature-atlas/dashboard/1"


@dataclass(frozen=True)
class DashboardConfig:
    """Knobs of the dashboards (the report params may mirror these)."""

    n_most_active: int = 12  # latents picked by density, per SAE
    concept_features: bool = True  # add each concept's ground-truth best latent
    n_contexts: int = 12  # top-activating contexts per page
    n_quantiles: int = 4  # activation-quantile intervals with samples
    samples_per_quantile: int = 3
    context_left: int = 12  # tokens shown before / after the activating token
    context_right: int = 4
    n_logit_tokens: int = 10  # top ± logit-lens tokens
    n_top_tokens: int = 5  # tokens in a one-line description
    top_k_all: int = 10  # running top-k kept for every latent (descriptions)
    hist_bins: int = 30
    split: str = "heldout"
    max_rows: int | None = 200_000  # cap on rows streamed (None: the whole split)
    batch_rows: int = 8192
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("n_contexts", "top_k_all", "hist_bins", "batch_rows", "n_quantiles"):
            if getattr(self, name) < 1:
                raise ValueError(f"dashboards.{name} = {getattr(self, name)}, expected ≥ 1")


# ---------------------------------------------------------------------------- the pass


@dataclass
class FeatureStats:
    """What one pass over the rows leaves: per-latent counts and top-k, selected latents'
    activations on every row."""

    n_rows: int
    fire_counts: np.ndarray  # int64 [d_sae]
    max_act: np.ndarray  # float32 [d_sae]
    top_vals: np.ndarray  # float32 [k, d_sae], descending per column (0 where fewer fired)
    top_rows: np.ndarray  # int64 [k, d_sae], row index of each top value
    concept_tp: np.ndarray | None  # float64 [n_concepts, d_sae]: fired ∧ labelled
    concept_pos: np.ndarray | None  # float64 [n_concepts]: labelled tokens per concept
    selected: np.ndarray  # int64 [n_sel] latent ids
    selected_acts: np.ndarray  # float32 [n_rows, n_sel]

    @property
    def density(self) -> np.ndarray:
        return self.fire_counts / max(self.n_rows, 1)

    def concept_f1(self) -> np.ndarray | None:
        """F1 [n_concepts, d_sae] of 'latent fires' as a detector of each concept."""
        if self.concept_tp is None:
            return None
        denom = self.fire_counts[None, :] + self.concept_pos[:, None]
        return np.where(denom > 0, 2 * self.concept_tp / np.maximum(denom, 1), 0.0)


@torch.no_grad()
def collect_feature_stats(
    sae,
    source,
    selected: Sequence[int],
    *,
    labels: np.ndarray | None = None,
    k: int = 10,
    batch_rows: int = 8192,
    n_rows: int | None = None,
) -> FeatureStats:
    """Stream `source.read(start, stop)` rows through `sae.encode` once.

    `source` is any object with `n_rows` and `read(start, stop) -> [rows, d_in]` (an
    `ActivationSource`); `labels` are the rows' concept labels [n_rows, n_concepts].
    """
    n = source.n_rows if n_rows is None else min(n_rows, source.n_rows)
    d_sae = sae.d_sae
    sel = torch.as_tensor(np.asarray(selected, dtype=np.int64))
    k = max(1, min(k, n)) if n else 1
    counts = torch.zeros(d_sae, dtype=torch.int64)
    top_vals = torch.zeros(k, d_sae)  # descending per latent; 0 = empty slot
    top_rows = torch.zeros(k, d_sae, dtype=torch.int64)
    sel_acts = np.zeros((n, len(sel)), np.float32)
    tp = pos = None
    if labels is not None:
        if len(labels) < n:
            raise ValueError(f"concept labels: {len(labels)} rows, expected ≥ {n}")
        tp = torch.zeros(labels.shape[1], d_sae, dtype=torch.float64)
        pos = torch.zeros(labels.shape[1], dtype=torch.float64)
    for start in range(0, n, batch_rows):
        stop = min(start + batch_rows, n)
        x = torch.from_numpy(np.asarray(source.read(start, stop), dtype=np.float32))
        f = sae.encode(x).float()
        if len(sel):
            sel_acts[start:stop] = f[:, sel].numpy()
        fired = f > 0
        rows, cols = torch.nonzero(fired, as_tuple=True)
        counts += torch.bincount(cols, minlength=d_sae)
        if tp is not None:  # float32 is exact for counts within a chunk
            lab = torch.from_numpy(np.asarray(labels[start:stop], dtype=np.float32))
            tp += (lab.T @ fired.float()).double()
            pos += lab.sum(0).double()
        # running top-k: only activations above a latent's current k-th best can enter
        vals = f[rows, cols]
        enter = vals > top_vals[k - 1, cols]
        if enter.any():
            _merge_top_k(top_vals, top_rows, cols[enter], vals[enter], rows[enter] + start)
    return FeatureStats(
        n_rows=n,
        fire_counts=counts.numpy(),
        max_act=top_vals[0].numpy(),
        top_vals=top_vals.numpy(),
        top_rows=top_rows.numpy(),
        concept_tp=None if tp is None else tp.numpy(),
        concept_pos=None if pos is None else pos.numpy(),
        selected=sel.numpy(),
        selected_acts=sel_acts,
    )


def _merge_top_k(top_vals, top_rows, cols, vals, rows) -> None:
    """Merge new (latent, value, row) triples into the dense top-k [k, d_sae] in place;
    order per latent: value descending, then row ascending (as a stable sort of rows)."""
    k = top_vals.shape[0]
    touched = torch.unique(cols)
    old_v, old_r = top_vals[:, touched], top_rows[:, touched]
    c = np.concatenate([touched.expand(k, -1).reshape(-1).numpy(), cols.numpy()])
    v = np.concatenate([old_v.reshape(-1).numpy(), vals.numpy()])
    r = np.concatenate([old_r.reshape(-1).numpy(), rows.numpy()])
    live = v > 0
    c, v, r = c[live], v[live], r[live]
    order = np.lexsort((r, -v, c))
    c, v, r = c[order], v[order], r[order]
    first = np.searchsorted(c, c, side="left")  # start of each latent's run
    rank = np.arange(len(c)) - first
    keep = rank < k
    top_vals[:, touched] = 0
    top_rows[:, touched] = 0
    top_vals[rank[keep], c[keep]] = torch.from_numpy(v[keep])
    top_rows[rank[keep], c[keep]] = torch.from_numpy(r[keep])


def top_activations(acts: np.ndarray, k: int) -> list[tuple[int, float]]:
    """(row, activation) of the k largest positive activations, descending."""
    if len(acts) == 0:
        return []
    k = min(k, len(acts))
    idx = np.argpartition(-acts, k - 1)[:k]
    idx = idx[np.lexsort((idx, -acts[idx]))]  # by activation desc, then row asc
    return [(int(i), float(acts[i])) for i in idx if acts[i] > 0]


def quantile_samples(
    acts: np.ndarray, n_quantiles: int, per_quantile: int, seed: int = 0
) -> list[dict[str, Any]]:
    """Rows sampled uniformly within equal-mass intervals of the non-zero activations.

    Interval q covers activations in [lo, hi] (lo exclusive except for the first);
    returns [{"lo", "hi", "n", "rows": [(row, act), ...]}] from the highest interval down.
    """
    nz = np.flatnonzero(acts > 0)
    if len(nz) == 0:
        return []
    vals = acts[nz]
    edges = np.quantile(vals, np.linspace(0, 1, n_quantiles + 1))
    rng = np.random.default_rng(seed)
    out = []
    for q in range(n_quantiles):
        lo, hi = float(edges[q]), float(edges[q + 1])
        inside = (vals >= lo) & (vals <= hi) if q == 0 else (vals > lo) & (vals <= hi)
        rows = nz[inside]
        pick = (
            rng.choice(rows, size=min(per_quantile, len(rows)), replace=False) if len(rows) else []
        )
        pick = sorted(pick, key=lambda r: -acts[r])
        out.append({"lo": lo, "hi": hi, "n": int(len(rows)),
                    "rows": [(int(r), float(acts[r])) for r in pick]})  # fmt: skip
    return out[::-1]


def logit_lens(W_dec: torch.Tensor, W_U: torch.Tensor, features: Sequence[int], n: int):
    """Top-n positive and negative entries of W_dec[f] @ W_U for each latent f.

    Returns (pos_ids, pos_vals, neg_ids, neg_vals), each [len(features), n]; negative
    values ascending (most negative first)."""
    with torch.no_grad():
        idx = torch.as_tensor(np.asarray(features, dtype=np.int64))
        n = min(n, W_U.shape[1])
        pos_ids, pos_vals, neg_ids, neg_vals = [], [], [], []
        for i in range(0, len(idx), 256):  # bounded memory for large vocabularies
            logits = W_dec[idx[i : i + 256]].float() @ W_U.float()
            pv, pi = torch.topk(logits, n, dim=1)
            nv, ni = torch.topk(-logits, n, dim=1)
            pos_ids.append(pi), pos_vals.append(pv), neg_ids.append(ni), neg_vals.append(-nv)
        if not pos_ids:
            z = np.zeros((0, n))
            return z.astype(np.int64), z, z.astype(np.int64), z
        return tuple(torch.cat(t).numpy() for t in (pos_ids, pos_vals, neg_ids, neg_vals))


# ---------------------------------------------------------------------------- records


@dataclass
class RowMeta:
    """Row-aligned token metadata of the streamed rows (for context strings)."""

    token_ids: np.ndarray
    doc_ids: np.ndarray
    positions: np.ndarray

    @classmethod
    def from_store(cls, store, split: str, n: int) -> RowMeta:
        lo, _ = store.split_range(split)
        return cls(*(np.asarray(store.array(a)[lo : lo + n]) for a in ("token_ids", "doc_ids",
                                                                        "positions")))  # fmt: skip


def context_rows(meta: RowMeta, row: int, left: int, right: int) -> range:
    """Rows around `row` in the same context window and the same document."""
    pos = int(meta.positions[row])
    win_lo = row - (pos - 1)  # rows of one window have positions 1 .. seq_len-1
    lo = max(row - left, win_lo, 0)
    hi = min(row + right + 1, len(meta.token_ids))
    doc = meta.doc_ids[row]
    while lo < row and (meta.doc_ids[lo] != doc or meta.positions[lo] > pos):
        lo += 1
    end = row + 1
    while end < hi and meta.doc_ids[end] == doc and meta.positions[end] > meta.positions[end - 1]:
        end += 1
    return range(lo, end)


def make_context(meta: RowMeta, acts: np.ndarray, row: int, vocab: Sequence[str], cfg) -> dict:
    rows = context_rows(meta, row, cfg.context_left, cfg.context_right)
    return {
        "row": int(row),
        "act": float(acts[row]),
        "doc": int(meta.doc_ids[row]),
        "tokens": [vocab[int(meta.token_ids[r])] for r in rows],
        "acts": [round(float(acts[r]), 4) for r in rows],
        "at": int(row - rows.start),
    }


@dataclass
class SAEDashboardData:
    """All a dashboard set needs, JSON-serialisable via `to_json`."""

    model: str
    hook: str
    sae: str
    sae_path: str
    architecture: str
    d_sae: int
    n_rows: int
    split: str
    reasons: dict[int, list[str]]  # selected latent -> why it was picked
    descriptions: dict[int, dict[str, Any]]  # every live latent: short description
    records: dict[int, dict[str, Any]]  # selected latents: full dashboard record
    inputs: list[str] = field(default_factory=list)  # input paths (provenance)
    # a published SAE's source (`saes.pretrained`): "release/sae_id" or "folder <path>"
    pretrained: str | None = None

    @property
    def key(self) -> str:
        return f"{self.model}/{self.hook}/{self.sae}"

    def to_json(self) -> dict[str, Any]:
        return {
            "format": DASHBOARD_FORMAT,
            "model": self.model,
            "hook": self.hook,
            "sae": self.sae,
            "sae_path": self.sae_path,
            "architecture": self.architecture,
            "d_sae": self.d_sae,
            "n_rows": self.n_rows,
            "split": self.split,
            "selected": {str(f): r for f, r in sorted(self.reasons.items())},
            "features": {str(f): d for f, d in sorted(self.descriptions.items())},
            "records": {str(f): r for f, r in sorted(self.records.items())},
            **({"pretrained": self.pretrained} if self.pretrained else {}),
        }


def describe(desc: Mapping[str, Any]) -> str:
    """One line for a latent from its dashboard description (features_of_text uses it)."""
    parts = []
    if desc.get("top_tokens"):
        parts.append("tokens " + " ".join(repr(t) for t in desc["top_tokens"][:4]))
    c = desc.get("concept")
    if c and c.get("f1", 0) >= 0.05:
        parts.append(f"concept {c['name']} (F1 {c['f1']:.2f})")
    if desc.get("logit_pos"):
        parts.append("promotes " + " ".join(repr(t) for t in desc["logit_pos"][:3]))
    return "; ".join(parts) or "no description"


def select_features(
    log10_density: np.ndarray | None,
    ground_truth: Mapping[str, Any] | None,
    extra: Mapping[int, Sequence[str]] | None,
    cfg: DashboardConfig,
    d_sae: int,
) -> dict[int, list[str]]:
    """The latents to dashboard, each with the reasons it was picked (in page order)."""
    reasons: dict[int, list[str]] = {}
    if log10_density is not None and cfg.n_most_active > 0:
        order = np.argsort(-np.asarray(log10_density), kind="stable")[: cfg.n_most_active]
        for rank, f in enumerate(order):
            if log10_density[f] > -9.5:  # never-fired latents are not "active"
                reasons.setdefault(int(f), []).append(f"most active #{rank + 1}")
    if cfg.concept_features and ground_truth:
        for name, v in (ground_truth.get("concepts") or {}).items():
            if v.get("n_positive", 1) > 0 and v.get("best_latent") is not None:
                reasons.setdefault(int(v["best_latent"]), []).append(
                    f"concept {name} (F1 {v.get('f1', float('nan')):.2f})"
                )
    for f, why in (extra or {}).items():
        if not 0 <= int(f) < d_sae:
            raise ValueError(f"dashboard feature {f}: out of range for an SAE with {d_sae} latents")
        reasons.setdefault(int(f), []).extend(why)
    return reasons


def plan_features(
    sae_path: Path, cfg: DashboardConfig, extra: Mapping[int, Sequence[str]] | None = None
) -> dict[int, list[str]]:
    """The latents `compute_dashboard_data` would pick for an SAE folder, from its cached
    density and ground truth alone (no pass over the data); empty-density SAEs get the
    concept and extra latents only."""
    import json

    from stages.sae.io import load_log_feature_density

    sae_path = Path(sae_path)
    cfg_json = json.loads((sae_path / "cfg.json").read_text())
    mpath = sae_path / "metrics.json"
    metrics = json.loads(mpath.read_text()) if mpath.exists() else {}
    dens = load_log_feature_density(sae_path)
    dens = None if dens is None else dens.float().numpy()
    return select_features(dens, metrics.get("ground_truth"), extra, cfg, int(cfg_json["d_sae"]))


def compute_dashboard_data(
    *,
    model_name: str,
    hook: str,
    sae_path: Path,
    store,
    model,
    cfg: DashboardConfig = DashboardConfig(),  # noqa: B008 (frozen dataclass)
    extra: Mapping[int, Sequence[str]] | None = None,
    vocab: Sequence[str] | None = None,
    inputs: Sequence[str | Path] = (),
    reasons: Mapping[int, Sequence[str]] | None = None,
) -> SAEDashboardData:
    """Dashboard data for one SAE folder from the cache (`store`), never re-running the
    model; `model` supplies the unembedding (logit lens) and the tokenizer.

    The latents dashboarded are `select_features(...)` (most active, concept latents,
    `extra`), or exactly `reasons` when given (see `plan_features`)."""
    from stages.sae.io import load_log_feature_density, load_sae, read_metrics

    sae_path = Path(sae_path)
    sae = load_sae(sae_path)
    metrics = read_metrics(sae_path) if (sae_path / "metrics.json").exists() else {}
    dens = load_log_feature_density(sae_path)
    source = store.source(hook, cfg.split)
    n = source.n_rows if cfg.max_rows is None else min(cfg.max_rows, source.n_rows)
    if dens is None:  # no cached density: one counting pass first
        counts = collect_feature_stats(sae, source, [], k=1, batch_rows=cfg.batch_rows, n_rows=n)
        dens = np.log10(counts.density + 1e-10)
    else:
        dens = dens.float().numpy()
    if reasons is None:
        reasons = select_features(dens, metrics.get("ground_truth"), extra, cfg, sae.d_sae)
    reasons = {int(f): list(w) for f, w in reasons.items()}
    selected = list(reasons)
    labels = None
    if store.concept_names and "concept_labels" in store.group:
        lo, _ = store.split_range(cfg.split)
        labels = np.asarray(store.array("concept_labels")[lo : lo + n])
    stats = collect_feature_stats(sae, source, selected, labels=labels, k=cfg.top_k_all,
                                  batch_rows=cfg.batch_rows, n_rows=n)  # fmt: skip
    meta = RowMeta.from_store(store, cfg.split, n)
    vocab = list(vocab) if vocab is not None else vocab_strings(model.tokenizer, model.cfg.d_vocab)
    W_U = model.W_U.detach()
    concept_names = list(store.concept_names)
    f1 = stats.concept_f1()

    # short descriptions of every live latent
    live = np.flatnonzero(stats.fire_counts > 0)
    n_lt = max(cfg.n_logit_tokens, 3)
    pos_ids, pos_vals, neg_ids, neg_vals = logit_lens(sae.W_dec.detach(), W_U, live, n_lt)
    descriptions: dict[int, dict[str, Any]] = {}
    for i, f in enumerate(live):
        f = int(f)
        rows = [int(r) for r, v in zip(stats.top_rows[:, f], stats.top_vals[:, f], strict=True)
                if v > 0]  # fmt: skip
        toks = Counter(vocab[int(meta.token_ids[r])] for r in rows)
        d: dict[str, Any] = {
            "density": float(stats.density[f]),
            "max_act": float(stats.max_act[f]),
            "top_tokens": [t for t, _ in toks.most_common(cfg.n_top_tokens)],
            "logit_pos": [vocab[int(t)] for t in pos_ids[i, :3]],
        }
        if f1 is not None and len(concept_names):
            c = int(np.argmax(f1[:, f]))
            d["concept"] = {"name": concept_names[c], "f1": round(float(f1[c, f]), 4)}
        descriptions[f] = d

    # full records of the selected latents
    records: dict[int, dict[str, Any]] = {}
    sel_lens = logit_lens(sae.W_dec.detach(), W_U, selected, cfg.n_logit_tokens)
    for j, f in enumerate(selected):
        acts = stats.selected_acts[:, j]
        nz = acts[acts > 0]
        hist, edges = (np.histogram(nz, bins=cfg.hist_bins) if len(nz)
                       else (np.zeros(0, np.int64), np.zeros(0)))  # fmt: skip
        rec: dict[str, Any] = {
            "feature": f,
            "reasons": reasons[f],
            "density": float(len(nz) / max(n, 1)),
            "log10_density_cached": float(dens[f]),
            "max_act": float(nz.max()) if len(nz) else 0.0,
            "mean_act": float(nz.mean()) if len(nz) else 0.0,
            "top_contexts": [
                make_context(meta, acts, r, vocab, cfg)
                for r, _ in top_activations(acts, cfg.n_contexts)
            ],  # fmt: skip
            "quantiles": [
                {
                    **{k: q[k] for k in ("lo", "hi", "n")},
                    "contexts": [make_context(meta, acts, r, vocab, cfg) for r, _ in q["rows"]],
                }
                for q in quantile_samples(
                    acts, cfg.n_quantiles, cfg.samples_per_quantile, seed=cfg.seed + f
                )
            ],  # fmt: skip
            "histogram": {"counts": hist.tolist(), "edges": [float(x) for x in edges]},
            "logit_pos": [
                [vocab[int(t)], float(v)]
                for t, v in zip(sel_lens[0][j], sel_lens[1][j], strict=True)
            ],  # fmt: skip
            "logit_neg": [
                [vocab[int(t)], float(v)]
                for t, v in zip(sel_lens[2][j], sel_lens[3][j], strict=True)
            ],  # fmt: skip
        }
        if f1 is not None and len(concept_names):
            order = np.argsort(-f1[:, f])[:3]
            rec["concepts"] = [
                {"name": concept_names[c], "f1": float(f1[c, f]),
                 "precision": float(stats.concept_tp[c, f] / max(stats.fire_counts[f], 1)),
                 "recall": float(stats.concept_tp[c, f] / max(stats.concept_pos[c], 1))}
                for c in order
            ]  # fmt: skip
        records[f] = rec
        descriptions.setdefault(f, {"density": 0.0, "max_act": 0.0, "top_tokens": [],
                                    "logit_pos": [t for t, _ in rec["logit_pos"][:3]]})  # fmt: skip
    return SAEDashboardData(
        model=model_name, hook=hook, sae=sae_path.name, sae_path=sae_path.as_posix(),
        architecture=(sae.metadata.get("training_architecture") or sae.architecture),
        d_sae=sae.d_sae, n_rows=n, split=cfg.split, reasons=reasons,
        descriptions=descriptions, records=records,
        inputs=[Path(p).as_posix() for p in inputs], pretrained=pretrained_source(sae),
    )  # fmt: skip


def pretrained_source(sae) -> str | None:
    """`release/sae_id` or `folder <path>` of an SAE `saes.pretrained` named (what
    `stages.sae.io.resolve_pretrained_sae` recorded in its cfg), else None."""
    from stages.sae.config import PretrainedSAE

    entry = (sae.metadata or {}).get("pretrained")
    return PretrainedSAE.model_validate(entry).source() if isinstance(entry, dict) else None


def vocab_strings(tokenizer, d_vocab: int) -> list[str]:
    """Display string of every token id (decoded one by one; ids past the tokenizer are
    shown as <id>)."""
    n = min(len(tokenizer), d_vocab) if tokenizer is not None else 0
    out = tokenizer.batch_decode([[i] for i in range(n)]) if n else []
    if "\ufffd" in "".join(out):  # a lone byte of a multi-byte character: show the raw token
        raw = tokenizer.convert_ids_to_tokens(list(range(n)))
        out = [f"⟨{r}⟩" if "\ufffd" in s else s for s, r in zip(out, raw, strict=True)]
    return out + [f"<{i}>" for i in range(len(out), d_vocab)]


# ---------------------------------------------------------------------------- HTML


@dataclass(frozen=True)
class Partner:
    """A latent's matched partner in another model (from alignment)."""

    model: str
    hook: str
    sae: str
    feature: int
    score: float | None = None
    measure: str = "correlation"


def _tok_html(tok: str, act: float, max_act: float, is_max: bool) -> str:
    a = 0.0 if max_act <= 0 else max(0.0, min(1.0, act / max_act))
    shown = tok.replace("\n", "↵")
    style = f"background:rgba(255,110,0,{a:.2f})" if a > 0 else ""
    cls = "tok max" if is_max else "tok"
    return f'<span class="{cls}" style="{style}" title="{act:.3f}">{e(shown)}</span>'


def context_html(ctx: Mapping[str, Any], max_act: float) -> str:
    toks = "".join(
        _tok_html(t, a, max_act, i == ctx["at"])
        for i, (t, a) in enumerate(zip(ctx["tokens"], ctx["acts"], strict=True))
    )
    return f'<div class="ctx"><span class="v">{ctx["act"]:.3f}</span> {toks}</div>'


def histogram_svg(hist: Mapping[str, Any], width: int = 420, height: int = 150) -> str:
    """Bars of the non-zero activation histogram as inline SVG (no image file needed)."""
    counts, edges = hist["counts"], hist["edges"]
    if not counts:
        return '<p class="muted">never fires on these rows</p>'
    pad_l, pad_b = 40, 22
    w, h = width - pad_l - 6, height - pad_b - 6
    top = max(counts)
    bw = w / len(counts)
    bars = "".join(
        f'<rect x="{pad_l + i * bw:.1f}" y="{6 + h - h * c / top:.1f}" width="{max(bw - 1, 1):.1f}" '
        f'height="{h * c / top:.1f}" fill="#e8700a"><title>{edges[i]:.3g}–{edges[i + 1]:.3g}: '
        f"{c}</title></rect>"
        for i, c in enumerate(counts)
    )
    axis = (
        f'<line x1="{pad_l}" y1="{6 + h}" x2="{pad_l + w}" y2="{6 + h}" stroke="#555"/>'
        f'<text x="{pad_l}" y="{height - 6}" font-size="10">{edges[0]:.3g}</text>'
        f'<text x="{pad_l + w}" y="{height - 6}" font-size="10" text-anchor="end">'
        f"{edges[-1]:.3g}</text>"
        f'<text x="{pad_l + w / 2}" y="{height - 6}" font-size="10" text-anchor="middle">'
        "activation</text>"
        f'<text x="{pad_l - 4}" y="14" font-size="10" text-anchor="end">{top}</text>'
        f'<text x="{pad_l - 4}" y="{6 + h}" font-size="10" text-anchor="end">0</text>'
    )
    return (
        f'<svg role="img" aria-label="activation histogram" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">{bars}{axis}</svg>'
    )


def _tokens_table(pairs: Sequence[Sequence[Any]], cls: str) -> str:
    return table(["token", "logit"], [[f"<code>{e(repr(t))}</code>",
                                       f'<span class="{cls}">{v:+.3f}</span>'] for t, v in pairs])  # fmt: skip


def sae_dir(out: Path, data: SAEDashboardData) -> Path:
    return Path(out) / "dashboards" / data.model / data.hook / data.sae


def feature_page_path(out: Path, data: SAEDashboardData, feature: int) -> Path:
    return sae_dir(out, data) / f"feature-{feature}.html"


def write_dashboards(
    data: SAEDashboardData,
    out: Path,
    *,
    provenance,
    partners: Mapping[int, Sequence[Partner]] | None = None,
    partner_pages: Mapping[tuple[str, int], Path] | None = None,
) -> dict[int, Path]:
    """Write `index.html`, one `feature-<id>.html` per selected latent and
    `dashboard_data.json` for one SAE; returns {feature: page path}.

    `partner_pages` maps (sae key, feature) to the page of every dashboarded latent, so a
    partner in another model links to its page when it has one (else it is named only).
    """
    folder = sae_dir(out, data)
    folder.mkdir(parents=True, exist_ok=True)
    partners = partners or {}
    partner_pages = partner_pages or {}
    payload = data.to_json()
    payload["partners"] = {
        str(f): [p.__dict__ for p in ps] for f, ps in sorted(partners.items()) if ps
    }
    write_json(folder / DATA_FILENAME, payload)
    home = relpath(Path(out) / "index.html", folder)
    prov_html = provenance.caption_html(data.inputs)
    title = f"{data.model} · {data.hook} · {data.sae}"
    feats = list(data.records)
    pages = {f: folder / f"feature-{f}.html" for f in feats}

    for i, f in enumerate(feats):
        rec = data.records[f]
        nav = [
            f'<a href="{e(home)}">report</a>',
            '<a href="index.html">all features of this SAE</a>',
        ]
        if i > 0:
            nav.append(f'<a href="feature-{feats[i - 1]}.html">← #{feats[i - 1]}</a>')
        if i + 1 < len(feats):
            nav.append(f'<a href="feature-{feats[i + 1]}.html">#{feats[i + 1]} →</a>')
        header = (
            f"<h1>Feature #{f} <span style='font-weight:normal'>· {e(title)}</span></h1>"
            f'<nav class="toc">{" ".join(nav)}</nav>'
        )
        body = [_summary_card(data, rec, partners.get(f, ()), partner_pages, folder),
                _logit_card(rec)]  # fmt: skip
        hist = (
            f'<figure id="histogram">{histogram_svg(rec["histogram"])}<figcaption><b>Activation '
            f"histogram</b> of feature #{f} over the {rec['density'] * data.n_rows:.0f} "
            f"{data.split} tokens where it fires (of {data.n_rows}).{prov_html}"
            "</figcaption></figure>"
        )
        top = "".join(context_html(c, rec["max_act"]) for c in rec["top_contexts"])
        quant = "".join(
            f"<h4>activations in ({q['lo']:.3g}, {q['hi']:.3g}] "
            f"<span class='muted'>({q['n']} tokens)</span></h4>"
            + "".join(context_html(c, rec["max_act"]) for c in q["contexts"])
            for q in rec["quantiles"]
        )
        html_body = (
            '<div class="grid">' + "".join(body) + "</div>" + hist
            + f'<h2 id="top">Top-activating contexts</h2>{top or "<p>none</p>"}'
            + '<p class="muted">Each line: the activation at the highlighted (outlined) token, '
              "then its context; shading ∝ this feature's activation on each token "
              "(hover for values).</p>"
            + f'<h2 id="quantiles">Samples across activation quantiles</h2>{quant or "<p>none</p>"}'
            + f'<p class="provenance">Drawn from: {prov_html}</p>'
        )  # fmt: skip
        pages[f].write_text(page(f"Feature {f} · {title}", html_body, header=header))

    # the SAE's index of dashboards
    rows = []
    for f in feats:
        d = data.descriptions.get(f, {})
        rows.append([f'<a href="feature-{f}.html">#{f}</a>', e("; ".join(data.records[f]["reasons"])),
                     fmt(data.records[f]["density"], 3), fmt(data.records[f]["max_act"], 3),
                     e(describe(d))])  # fmt: skip
    published = (f"<p>Published SAE, not trained here: <code>{e(data.pretrained)}</code> "
                 "(<code>saes.pretrained</code>).</p>" if data.pretrained else "")  # fmt: skip
    body = (
        published + f"<p>{len(feats)} dashboarded latents of {data.d_sae} "
        f"({len(data.descriptions)} fire on the {data.n_rows} {data.split} tokens streamed). "
        f"One-line descriptions of every live latent are in <code>{DATA_FILENAME}</code>.</p>"
        + table(
            ["feature", "why", "density", "max act", "description"], rows, left=2, also_left=(4,)
        )
        + f'<p class="provenance">Drawn from: {prov_html}</p>'
    )
    header = f'<h1>Feature dashboards · {e(title)}</h1><nav class="toc"><a href="{e(home)}">report</a></nav>'
    (folder / "index.html").write_text(page(f"Dashboards · {title}", body, header=header))
    return pages


def _summary_card(data, rec, partners, partner_pages, folder: Path) -> str:
    items = [
        f"<b>why here:</b> {e('; '.join(rec['reasons']))}",
        f"<b>density:</b> {rec['density']:.4%} of {data.split} tokens "
        f"(log10 {math.log10(max(rec['density'], 1e-10)):.2f}; cached "
        f"{rec['log10_density_cached']:.2f})",
        f"<b>max activation:</b> {rec['max_act']:.3f} · <b>mean when firing:</b> "
        f"{rec['mean_act']:.3f}",
    ]
    for c in rec.get("concepts", [])[:1]:
        items.append(f"<b>best concept:</b> {e(c['name'])} (F1 {c['f1']:.3f}, precision "
                     f"{c['precision']:.3f}, recall {c['recall']:.3f})")  # fmt: skip
    if rec.get("concepts", [])[1:]:
        items.append("<b>next:</b> " + ", ".join(f"{e(c['name'])} ({c['f1']:.2f})"
                                                 for c in rec["concepts"][1:]))  # fmt: skip
    for p in partners:
        target = partner_pages.get((f"{p.model}/{p.hook}/{p.sae}", p.feature))
        label = f"{p.model} · {p.hook} · {p.sae} #{p.feature}"
        link = f'<a href="{e(relpath(target, folder))}">{e(label)}</a>' if target else e(label)
        score = f" ({p.measure} {p.score:.3f})" if p.score is not None else ""
        items.append(f"<b>matched partner:</b> {link}{e(score)}")
    if not partners:
        items.append('<b>matched partner:</b> <span class="muted">none (no alignment run, or no '
                     "match for this latent)</span>")  # fmt: skip
    return '<div class="card"><ul><li>' + "</li><li>".join(items) + "</li></ul></div>"


def _logit_card(rec) -> str:
    return (
        '<div class="card"><b>Logit lens</b> (decoder row · W_U)<div class="grid">'
        f"<div><i>promotes</i>{_tokens_table(rec['logit_pos'], 'pos')}</div>"
        f"<div><i>suppresses</i>{_tokens_table(rec['logit_neg'], 'neg')}</div></div></div>"
    )
