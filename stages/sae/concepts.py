"""Ground truth for SAEs on the world's labelled concepts, SAEBench-style: k-sparse
probing, feature absorption on the planted hierarchy, precision and recall.

All of it runs on the SAE's held-out rows, split by document (seeded) into a probe-train
half and a test half; every score is measured on the test half at the concept's natural
prevalence, with a bootstrap 95 % interval over test rows (the same resamples for every
method, so differences are paired).

- **k-sparse probing** (Gao et al. 2024, "Scaling and evaluating sparse autoencoders",
  §4.5; latent choice as in SAEBench, Karvonen et al. 2025, and Kantamneni et al. 2025):
  per concept, rank latents by mean activation on positive minus negative train rows,
  keep the top k, fit an L2-regularised logistic regression on those k latents, cut at
  the threshold with the best train F1, report test F1. k = 1, 2, 5, 20.
  Controls on the very same split: a **dense probe** on the raw activations (the same
  logistic fit on all d_model dimensions) and the **lexical baseline** (the best token-id
  lookup of `stages/lexical.py`, chosen on the train half, applied to the test half).
- **Absorption** (Chanin et al. 2024, "A is for Absorption", with SAEBench's full-absorption
  rule): for a parent concept (`animal`, a class, `emotion`) the parent direction is the
  unit weight vector ω of its dense probe; the parent's main latents are its k-sparse
  latents with k grown 1 → 2 → 5 while train F1 gains more than 0.03 (SAEBench's
  feature-splitting rule). On test tokens of the parent that the dense probe gets right,
  a token is *absorbed* when every main latent is 0 while the latent with the largest
  projection a_j (d_j·ω) is not a main latent, has cos(d_j, ω) ≥ 0.025, and carries at
  least 40 % of the token's own projection (x − b_dec)·ω. Reported per parent with a
  Wilson 95 % interval, per child concept (which species absorb `mammal`), beside the
  main latents' miss rate and a control: the same rule with ω replaced by a random unit
  direction (seeded).
- **Precision and recall** per concept for the best single latent (fires = act > 0)
  and for the k-sparse probes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

KS = (1, 2, 5, 20)
N_BOOT = 1000
SPLIT_GAIN = 0.03  # SAEBench's feature-splitting threshold on F1 gain (tau_fs)
COS_MIN = 0.025  # SAEBench full absorption: cos(absorbing decoder, probe) at least this
PROJ_SHARE = 0.4  # ... and at least this share of the token's probe projection


# --------------------------------------------------------------------------- pieces


def split_by_group(groups: np.ndarray, seed: int = 0, frac: float = 0.5) -> np.ndarray:
    """Boolean train mask: a seeded `frac` of the distinct groups (documents) go to train,
    so no document has rows on both sides."""
    groups = np.asarray(groups).ravel()
    uniq = np.unique(groups)
    rng = np.random.default_rng(seed)
    train_groups = uniq[rng.permutation(len(uniq))[: max(1, int(round(frac * len(uniq))))]]
    return np.isin(groups, train_groups)


def fit_logistic(x: Tensor, y: Tensor, l2: float = 1e-2, iters: int = 12) -> tuple[Tensor, Tensor]:
    """Class-balanced L2 logistic regressions, one per concept, by Newton's method.

    x: [C, m, p] each concept's own rows and features; y: [C, m] 0/1. Features are
    standardised per concept; positives weighted by #neg / #pos; the penalty l2·‖w‖²
    (bias free, standardised units) keeps separable concepts finite. Returns the score
    function's parameters (w [C, p], b [C]) acting on raw x."""
    x, y = x.float(), y.float()
    mu = x.mean(1, keepdim=True)
    sd = (x - mu).pow(2).mean(1, keepdim=True).sqrt().clamp_min(1e-6)
    z = torch.cat([(x - mu) / sd, torch.ones_like(x[..., :1])], -1)  # [C, m, p + 1]
    c, m, q = z.shape
    pos = y.sum(1, keepdim=True)
    s = torch.where(y > 0, ((m - pos) / pos.clamp_min(1)).clamp_min(1e-3), torch.ones_like(y))
    s = s / s.mean(1, keepdim=True) / m
    reg = 2 * l2 * torch.eye(q, dtype=torch.float64)
    reg[-1, -1] = 1e-8
    beta = torch.zeros(c, q, dtype=torch.float64)
    for _ in range(iters):  # float32 sums, float64 solve
        prob = torch.sigmoid(torch.bmm(z, beta.float()[..., None])[..., 0])
        grad = torch.bmm((s * (prob - y))[:, None], z)[:, 0].double() + beta @ reg
        h = s * prob * (1 - prob)
        hess = torch.bmm((z * h[..., None]).transpose(1, 2), z).double() + reg
        step = torch.linalg.solve(hess, grad)
        beta = beta - step
        if float(step.abs().max()) < 1e-4:
            break
    w = beta[:, :-1] / sd.squeeze(1).double()
    return w, beta[:, -1] - (w * mu.squeeze(1).double()).sum(1)


def balanced_rows(y: Tensor, m: int = 2048, seed: int = 0) -> Tensor:
    """Row ids [C, m] per concept column of y [n, C]: up to m/2 random positives, the
    rest random negatives (SAEBench also fits its probes on class-balanced sets). The
    probe is fitted on these; its threshold is then chosen on all train rows."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for col in y.bool().T:
        pos, neg = col.nonzero().squeeze(1), (~col).nonzero().squeeze(1)
        k = min(len(pos), m // 2)
        pick = [pos[torch.randperm(len(pos), generator=g)[:k]]]
        take = min(m - k, len(neg))
        pick.append(neg[torch.randperm(len(neg), generator=g)[:take]])
        rows = torch.cat(pick)
        if len(rows) < m:  # tiny sets: repeat rows to the common shape
            rows = rows[torch.arange(m) % len(rows)]
        out.append(rows)
    return torch.stack(out)


def best_thresholds(scores: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Per column of scores [n, C] the cut `score > t` with the best F1 against y [n, C];
    returns (t [C], train F1 [C]). Cuts fall only between distinct scores."""
    scores, y = scores.double().T.contiguous(), y.bool().T  # [C, n]: sort along rows
    n = scores.shape[1]
    s, order = torch.sort(scores, dim=1, descending=True, stable=True)
    tp = torch.cumsum(y.gather(1, order).double(), 1)
    n_pos = y.sum(1).double()
    f1 = 2 * tp / (torch.arange(1, n + 1, dtype=torch.float64)[None] + n_pos[:, None])
    valid = torch.cat([s[:, 1:] < s[:, :-1], torch.ones(len(s), 1, dtype=torch.bool)], 1)
    f1 = torch.where(valid, f1, torch.full_like(f1, -1.0))
    best_f1, k = f1.max(1)
    nxt = s.gather(1, (k + 1).clamp_max(n - 1)[:, None])[:, 0]
    cur = s.gather(1, k[:, None])[:, 0]
    t = torch.where(k + 1 < n, (cur + nxt) / 2, cur - 1.0)
    t = torch.where(n_pos > 0, t, torch.full_like(t, math.inf))
    return t, torch.where(n_pos > 0, best_f1, torch.zeros_like(best_f1))


def bootstrap_weights(n: int, n_boot: int = N_BOOT, seed: int = 0) -> Tensor:
    """[n_boot, n] multinomial resample counts (row i: how often each unit is drawn)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (n_boot, n), generator=g)
    w = torch.zeros(n_boot, n, dtype=torch.float64)
    w.scatter_add_(1, idx, torch.ones(n_boot, n, dtype=torch.float64))
    return w


@dataclass
class Bootstrap:
    """A cluster bootstrap over the test rows' documents: `group` [n_test] the document
    index (0..G-1) of each test row, `weights` [B, G] the resample counts."""

    group: Tensor
    weights: Tensor

    @classmethod
    def of(cls, groups: np.ndarray, n_boot: int = N_BOOT, seed: int = 0) -> Bootstrap:
        _, inv = np.unique(np.asarray(groups), return_inverse=True)
        g = torch.from_numpy(inv.astype(np.int64))
        return cls(g, bootstrap_weights(int(g.max()) + 1 if len(g) else 0, n_boot, seed))


def f1_with_interval(pred: Tensor, y: Tensor, boot: Bootstrap) -> dict[str, Tensor]:
    """Test F1, precision and recall per column of pred / y [n, C] (bool), and the
    bootstrap 95 % interval (documents resampled) of F1 per column and of its mean."""
    pred, y = pred.bool(), y.bool()
    counts = torch.cat([(pred & y), (pred & ~y), (~pred & y)], 1).double()  # [n, 3C]
    per_doc = torch.zeros(boot.weights.shape[1], counts.shape[1], dtype=torch.float64)
    per_doc.index_add_(0, boot.group, counts)
    tp, fp, fn = counts.sum(0).split(pred.shape[1])
    f1 = _f1(tp, fp, fn)
    btp, bfp, bfn = (boot.weights @ per_doc).split(pred.shape[1], dim=1)
    bf1 = _f1(btp, bfp, bfn)  # [B, C]
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)
    lo, hi = torch.quantile(bf1, q, dim=0)
    mlo, mhi = torch.quantile(bf1.mean(1), q)
    return {
        "f1": f1,
        "lo": lo,
        "hi": hi,
        "precision": torch.where(tp + fp > 0, tp / (tp + fp).clamp_min(1), torch.zeros_like(tp)),
        "recall": torch.where(tp + fn > 0, tp / (tp + fn).clamp_min(1), torch.zeros_like(tp)),
        "mean": f1.mean(),
        "mean_lo": mlo,
        "mean_hi": mhi,
    }


def _f1(tp: Tensor, fp: Tensor, fn: Tensor) -> Tensor:
    d = 2 * tp + fp + fn
    return torch.where(d > 0, 2 * tp / d.clamp_min(1e-12), torch.zeros_like(tp))


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score 95 % interval of a proportion k / n ((nan, nan) when n = 0)."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def mean_diff_ranking(acts: Tensor, y: Tensor, k: int, rows: Tensor | None = None) -> Tensor:
    """Top-k latent ids [C, k] per concept by mean activation on positive rows minus on
    negative rows (SAEBench's k-sparse probing selection), over the rows where `rows`
    (bool [n]) is true. acts [n, d_sae], y [n, C]."""
    keep = torch.ones(len(y), dtype=torch.bool) if rows is None else rows
    yk = y.bool() & keep[:, None]
    a = acts.float()
    pos_sum = (yk.float().T @ a).double()  # [C, d_sae]
    all_sum = (keep.float() @ a).double()[None]
    n_pos = yk.sum(0).double()[:, None]
    diff = pos_sum / n_pos.clamp_min(1) - (all_sum - pos_sum) / (int(keep.sum()) - n_pos).clamp_min(
        1
    )
    return diff.topk(min(k, acts.shape[1]), dim=1).indices


# --------------------------------------------------------------------------- per hook


@dataclass
class ConceptBaselines:
    """What every SAE at one hook is compared with, computed once per hook: the split,
    the bootstrap resamples, the dense probe and the lexical lookup on the same rows."""

    names: list[str]  # concepts scored (enough positives on both sides)
    cols: list[int]  # their columns in the store's labels
    train: np.ndarray  # bool [n]
    y: Tensor  # bool [n, len(names)]
    boot: Bootstrap  # over the test rows' documents
    fit_rows: Tensor  # [C, m] class-balanced train rows each concept's probes are fitted on
    dense_w: Tensor  # [C, d] raw-space probe weights (the parent directions)
    dense_b: Tensor
    dense: dict[str, Tensor]
    lexical: dict[str, Tensor] | None
    hierarchy: dict[str, list[str]] = field(default_factory=dict)
    seed: int = 0


def concept_baselines(
    x: Tensor,
    labels: np.ndarray,
    concept_names: list[str],
    groups: np.ndarray,
    token_ids: np.ndarray | None = None,
    hierarchy: dict[str, list[str]] | None = None,
    *,
    seed: int = 0,
    min_positives: int = 10,
    n_boot: int = N_BOOT,
    fit_rows_per_concept: int = 2048,
) -> ConceptBaselines:
    """Split the rows by group, then fit the dense probe and the lexical lookup on the
    train half and score them on the test half. x: the hook's activations [n, d]."""
    from stages.lexical import lexical_baseline_one

    lab = np.asarray(labels).astype(bool)
    if lab.ndim != 2 or lab.shape != (len(x), len(concept_names)):
        raise ValueError(
            f"concept labels: shape {lab.shape}, expected [{len(x)} rows, "
            f"{len(concept_names)} concepts]"
        )
    train = split_by_group(groups, seed)
    test = ~train
    cols = [j for j in range(lab.shape[1])
            if lab[train, j].sum() >= min_positives and lab[test, j].sum() >= min_positives]  # fmt: skip
    names = [concept_names[j] for j in cols]
    y = torch.from_numpy(lab[:, cols])
    tr, te = torch.from_numpy(train), torch.from_numpy(test)
    boot = Bootstrap.of(np.asarray(groups).ravel()[test], n_boot, seed)
    if cols:
        tr_idx = torch.from_numpy(np.flatnonzero(train))
        fit_rows = tr_idx[balanced_rows(y[tr_idx], fit_rows_per_concept, seed)]  # [C, m]
        w, b = fit_logistic(x[fit_rows], _fit_labels(y, fit_rows))
        score = x.double() @ w.T + b
        t, _ = best_thresholds(score[tr], y[tr])
        dense = f1_with_interval(score[te] > t, y[te], boot)
    else:
        fit_rows = torch.zeros(0, fit_rows_per_concept, dtype=torch.long)
        w = torch.zeros(0, x.shape[1], dtype=torch.float64)
        b = torch.zeros(0, dtype=torch.float64)
        dense = {}
    lexical = None
    if token_ids is not None and cols:
        tok = np.asarray(token_ids).ravel()
        pred = np.stack([np.isin(tok[test], lexical_baseline_one(tok[train], lab[train, j])[1])
                         for j in cols], 1)  # fmt: skip
        lexical = f1_with_interval(torch.from_numpy(pred), y[te], boot)
    hier = {p: [c for c in ch if c in names] for p, ch in (hierarchy or {}).items() if p in names}
    return ConceptBaselines(names, cols, train, y, boot, fit_rows, w, b, dense, lexical,
                            {p: ch for p, ch in hier.items() if ch}, seed)  # fmt: skip


def _fit_labels(y: Tensor, fit_rows: Tensor) -> Tensor:
    """y [n, C] at each concept's own fitting rows [C, m] -> [C, m]."""
    return y[fit_rows, torch.arange(len(fit_rows))[:, None]].double()


@dataclass
class ConceptContext:
    """What the ground-truth scores need beside the labels, for one hook's held-out rows:
    document ids (the split and the bootstrap unit), token ids (the lexical lookup), the
    planted hierarchy (parent -> children) and each concept's kind. The hook's baselines
    are computed on first use and reused by every SAE evaluated with this context."""

    groups: np.ndarray
    token_ids: np.ndarray | None = None
    hierarchy: dict[str, list[str]] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    baselines: ConceptBaselines | None = None

    def baselines_for(self, x: Tensor, labels: np.ndarray, names: list[str]) -> ConceptBaselines:
        if self.baselines is None or len(self.baselines.train) != len(x):
            tok = None if self.token_ids is None else self.token_ids[: len(x)]
            self.baselines = concept_baselines(x, labels, names, self.groups[: len(x)], tok,
                                               self.hierarchy, seed=self.seed)  # fmt: skip
        return self.baselines


# --------------------------------------------------------------------------- per SAE


def ksparse_probing(acts: Tensor, base: ConceptBaselines, ks: tuple[int, ...] = KS) -> dict:
    """k-sparse probes on SAE latents acts [n, d_sae] (the same rows as `base`): per k,
    test F1 / precision / recall per concept with intervals, the latents, train F1."""
    tr, te = torch.from_numpy(base.train), torch.from_numpy(~base.train)
    y = base.y
    top = mean_diff_ranking(acts, y, max(ks), tr)  # [C, kmax]
    feats_all = acts.float().index_select(1, top.flatten()).reshape(len(acts), *top.shape)
    fit_feats = feats_all[base.fit_rows, torch.arange(len(top))[:, None]]  # [C, m, kmax]
    yf = _fit_labels(y, base.fit_rows)
    out = {}
    for k in ks:
        w, b = fit_logistic(fit_feats[:, :, :k], yf)
        score = (feats_all[:, :, :k] * w.float()).sum(-1).double() + b  # [n, C]
        t, f1_tr = best_thresholds(score[tr], y[tr])
        res = f1_with_interval(score[te] > t, y[te], base.boot)
        res["latents"], res["train_f1"] = top[:, :k], f1_tr
        out[k] = res
    return out


def main_latents(probes: dict, j: int, ks: tuple[int, ...] = (1, 2, 5)) -> list[int]:
    """The parent's main latents: k-sparse latents, k grown while train F1 gains more
    than SPLIT_GAIN (SAEBench's feature-splitting rule)."""
    k = ks[0]
    for a, b in zip(ks, ks[1:], strict=False):
        if float(probes[b]["train_f1"][j] - probes[a]["train_f1"][j]) > SPLIT_GAIN:
            k = b
        else:
            break
    return [int(i) for i in probes[k]["latents"][j]]


def absorption(acts: Tensor, x: Tensor, w_dec: Tensor, b_dec: Tensor,
               base: ConceptBaselines, probes: dict) -> dict:  # fmt: skip
    """Full absorption (module docstring) per parent of `base.hierarchy` on test rows.
    acts [n, d_sae] latents, x [n, d] activations, w_dec [d_sae, d]."""
    te = torch.from_numpy(~base.train)
    a, xt = acts[te].double(), x[te].double()
    y = base.y[te]
    w_dec, b_dec = w_dec.double(), b_dec.double()
    dec_norm = w_dec.norm(dim=1).clamp_min(1e-12)
    g = torch.Generator().manual_seed(base.seed)
    out = {}
    for parent, children in base.hierarchy.items():
        j = base.names.index(parent)
        w = base.dense_w[j].double()
        probe_pos = (xt @ w + base.dense_b[j]) > 0  # not the F1 cut: the probe's own sign
        # SAEBench counts tokens of the concept the probe gets right
        rows = y[:, j] & probe_pos
        main = main_latents(probes, j)
        res = {"main_latents": main, "n_tokens": int(rows.sum())}
        for kind, direction in (("probe", w), ("random", torch.randn(len(w), generator=g,
                                                                      dtype=torch.float64))):  # fmt: skip
            flags = _absorbed(a[rows], xt[rows], w_dec, b_dec, dec_norm, main,
                              direction / direction.norm())  # fmt: skip
            k, n = int(flags.sum()), int(rows.sum())
            rate = k / n if n else math.nan
            if kind == "probe":
                lo, hi = wilson(k, n)
                miss = float((a[rows][:, main] <= 0).all(1).double().mean()) if n else math.nan
                res.update({"rate": rate, "lo": lo, "hi": hi, "main_miss_rate": miss})
                per_child = {}
                for c in children:
                    cr = y[rows][:, base.names.index(c)]
                    nc = int(cr.sum())
                    per_child[c] = {"n_tokens": nc,
                                    "rate": int((flags & cr).sum()) / nc if nc else math.nan}  # fmt: skip
                res["children"] = per_child
            else:
                res["random_direction_rate"] = rate
        out[parent] = res
    return out


def _absorbed(a: Tensor, x: Tensor, w_dec: Tensor, b_dec: Tensor, dec_norm: Tensor,
              main: list[int], u: Tensor) -> Tensor:  # fmt: skip
    """SAEBench's full-absorption rule per row, for unit direction u."""
    if len(a) == 0:
        return torch.zeros(0, dtype=torch.bool)
    d_u = w_dec @ u  # [d_sae] decoder rows' component along u
    cos = d_u / dec_norm
    proj = a * d_u  # each latent's contribution to x̂·u
    own = (x - b_dec) @ u  # the token's projection
    top_val, top = proj.max(1)
    main_t = torch.tensor(main, dtype=torch.long)
    silent = (a[:, main_t] <= 0).all(1)
    return (silent & ~torch.isin(top, main_t) & (cos[top] >= COS_MIN) & (own > 0)
            & (top_val >= PROJ_SHARE * own))  # fmt: skip


def summarise(base: ConceptBaselines, probes: dict, absorb: dict, best: dict,
              kinds: dict[str, str] | None = None) -> dict:  # fmt: skip
    """JSON for metrics.json["ground_truth"]: per concept and summary means with intervals.
    `best`: per concept the best single latent's {precision, recall, f1} on all rows."""
    kinds = kinds or {}
    concepts = {}
    for i, name in enumerate(base.names):
        row = {"kind": kinds.get(name, "unknown"), "n_test_positive": int(base.y[~torch.from_numpy(base.train)][:, i].sum())}  # fmt: skip
        for k, r in probes.items():
            row[f"k{k}"] = {"f1": _r(r["f1"][i]), "lo": _r(r["lo"][i]), "hi": _r(r["hi"][i]),
                            "precision": _r(r["precision"][i]), "recall": _r(r["recall"][i]),
                            "latents": [int(v) for v in r["latents"][i]]}  # fmt: skip
        for tag, r in (("dense", base.dense), ("lexical", base.lexical)):
            if r:
                row[tag] = {"f1": _r(r["f1"][i]), "lo": _r(r["lo"][i]), "hi": _r(r["hi"][i])}
        if name in best:
            b = best[name]
            row["best_latent"] = {"latent": b["best_latent"], "f1": _r(b["f1"]),
                                  "precision": _r(b["precision"]), "recall": _r(b["recall"])}  # fmt: skip
        concepts[name] = row
    summary = {}
    ctx = [i for i, n in enumerate(base.names) if kinds.get(n) == "contextual"]
    for tag, r in [*((f"k{k}", v) for k, v in probes.items()),
                   ("dense", base.dense), ("lexical", base.lexical)]:  # fmt: skip
        if not r:
            continue
        summary[f"{tag}_f1"] = {"mean": _r(r["mean"]), "lo": _r(r["mean_lo"]),
                                "hi": _r(r["mean_hi"])}  # fmt: skip
        if ctx:
            summary[f"{tag}_f1_contextual"] = _r(r["f1"][ctx].mean())
    return {"n_rows": len(base.train), "n_train_rows": int(base.train.sum()),
            "n_test_rows": int((~base.train).sum()), "split": "by document, seeded",
            "seed": base.seed, "concepts": concepts, "summary": summary,
            "absorption": _round_tree(absorb)}  # fmt: skip


def _r(v) -> float:
    v = float(v)
    return round(v, 6) if math.isfinite(v) else v


def _round_tree(d):
    if isinstance(d, dict):
        return {k: _round_tree(v) for k, v in d.items()}
    if isinstance(d, list):
        return [_round_tree(v) for v in d]
    if isinstance(d, float):
        return _r(d)
    return d
