"""Dense linear probes for every labelled concept at every cached hook: does the model
represent a concept, and beyond token identity?

Per hook, one L2-regularised logistic regression per concept (Alain & Bengio 2016,
"Understanding intermediate layers using linear classifier probes"), each solved to its
optimum by Newton's method on standardised activations, positives weighted to balance
the classes. Each probe's threshold is the one that maximises F1 on its training rows;
its F1 is then measured on held-out rows at the concept's natural prevalence: the rows,
labels and F1 of the lexical baseline (`stages/lexical.py`, the best token-id lookup on
the same held-out rows). So `lift = probe F1 - lexical F1`: what the residual stream
says about the concept that the current token does not.

Controls: the same fit on training labels shuffled across rows (one permutation per
hook) gives the F1 a probe reaches by chance at that prevalence (`null_f1`); and
`probe_untrained` fits the same probes on the residuals of the same architecture and seed
before training, on the very same tokens (`untrained_f1`): what the architecture alone
(embeddings plus random attention mixing earlier tokens) lets a probe read.

    table = probe_concepts(store, hooks)   # {concept: {lexical_f1, probe_f1: {hook: f1}, ...}}
"""

from __future__ import annotations

import numpy as np
import torch

from stages.lexical import store_lexical_baseline


def _standardise(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    return (x - mu) / sd, mu, sd


def _probe_loss(za: torch.Tensor, w: torch.Tensor, c: torch.Tensor, ny: torch.Tensor,
                l2: float) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Per column: Σ_rows [c·softplus(−s) + (1 − y)·s] / n + l2·‖w‖² (bias unpenalised),
    with s = za @ w; and s. This is `binary_cross_entropy_with_logits(s, y, pos_weight)`
    averaged over rows, written with c = pos_weight·y + 1 − y."""
    s = za @ w
    loss = ((c * torch.nn.functional.softplus(-s)).sum(0) + (ny * s).sum(0)) / len(s)
    return loss + l2 * (w[:-1] ** 2).sum(0), s


def probe_problem(x: torch.Tensor, y: torch.Tensor):
    """The probes' problem in float64: standardised rows with a bias column `za`, the
    loss weights c = pos_weight·y + 1 − y, e = pos_weight·y and 1 − y (positives weighted
    by #neg / #pos per column), and the standardisation (mu, sd)."""
    y = y.double()
    z, mu, sd = _standardise(x.double())
    n = len(z)
    za = torch.cat([z, torch.ones(n, 1, dtype=z.dtype)], 1)
    pos = y.sum(0)
    e = y * ((n - pos) / pos.clamp_min(1)).clamp_min(1e-3)
    return za, e + (1 - y), e, 1 - y, mu, sd


def fit_probes(x: torch.Tensor, y: torch.Tensor, l2: float = 1e-4, max_iter: int = 50,
               tol: float = 1e-12) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Logistic regressions of every column of y [n, C] (0/1) on x [n, d] standardised,
    each minimising the positive-weighted cross-entropy (positives weighted by #neg / #pos)
    plus l2·‖w‖². Returns (W [d, C], b [C]) acting on raw x.

    Solved by Newton's method (IRLS) with backtracking, every column at once, to
    convergence (half the Newton decrement below `tol`, typically 10–13 steps): the
    objective is strictly convex, so the probe is its unique optimum whatever the solver.
    (LBFGS capped at 150 iterations, used before, stopped 4e-5 to 3e-3 above it in every
    column of the default run, and a 1e-7 change of its path moved held-out F1 by up to
    0.025.) Gradients and the loss are float64; each column's Hessian is accumulated in
    float32, which only changes the step, not the optimum."""
    za, c, e, ny, mu, sd = probe_problem(x, y)
    n, d = za.shape[0], za.shape[1] - 1
    za32, zt = za.float(), za.T.contiguous()
    reg = torch.full((d + 1, 1), 2 * l2, dtype=torch.float64)
    reg[-1] = 0.0
    w = torch.zeros(d + 1, y.shape[1], dtype=torch.float64)
    loss, s = _probe_loss(za, w, c, ny, l2)
    live = torch.ones(y.shape[1], dtype=torch.bool)
    for _ in range(max_iter):
        sig = torch.sigmoid(s)
        g = zt @ (c * sig - e) / n + reg * w
        r = (c * sig * (1 - sig)).float()
        # a converged column keeps its w (its step is zeroed below): no Hessian for it
        h = torch.eye(d + 1).repeat(r.shape[1], 1, 1)
        for j in live.nonzero().flatten().tolist():
            h[j] = za32.T @ (za32 * r[:, j : j + 1])
        h = h.double() / n + torch.diag_embed(reg[:, 0].expand(len(h), -1))
        step = torch.linalg.solve(h + 1e-12 * torch.eye(d + 1, dtype=h.dtype), g.T).T
        decrement = (g * step).sum(0)
        live &= decrement / 2 >= tol
        if not live.any():
            break
        step[:, ~live] = 0.0
        t = torch.ones(y.shape[1], dtype=torch.float64)
        for _ in range(40):  # Armijo backtracking, column by column
            new_loss, new_s = _probe_loss(za, w - t * step, c, ny, l2)
            short = live & (new_loss > loss - 0.25 * t * decrement)
            if not short.any():
                break
            t[short] *= 0.5
        else:  # no descent along the step (rounding at the optimum): the column stays
            t[short] = 0.0
            new_loss, new_s = _probe_loss(za, w - t * step, c, ny, l2)
        w, loss, s = w - t * step, new_loss, new_s
    w_raw = w[:-1] / sd[:, None]
    return w_raw, w[-1] - (w[:-1] * (mu / sd)[:, None]).sum(0)


def best_threshold(scores: np.ndarray, label: np.ndarray) -> tuple[float, float]:
    """(threshold, F1) of the cut `score > threshold` with the best F1 on these rows."""
    label = label.astype(bool)
    n_pos = int(label.sum())
    if n_pos == 0:
        return float("inf"), 0.0
    order = np.argsort(-scores, kind="stable")
    s, tp = scores[order], np.cumsum(label[order])
    f1 = 2 * tp / (np.arange(1, len(s) + 1) + n_pos)
    # cuts only between distinct scores
    valid = np.append(s[1:] < s[:-1], True)
    f1 = np.where(valid, f1, -1.0)
    k = int(np.argmax(f1))
    thr = (s[k] + s[k + 1]) / 2 if k + 1 < len(s) else s[k] - 1.0
    return float(thr), float(f1[k])


def f1_score(pred: np.ndarray, label: np.ndarray) -> float:
    """F1 of boolean predictions (0 when there are no positives and no predictions)."""
    pred, label = pred.astype(bool), label.astype(bool)
    tp = int((pred & label).sum())
    denom = int(pred.sum()) + int(label.sum())
    return 2 * tp / denom if denom else 0.0


def _split_rows(store, name: str, split: str, max_rows: int) -> np.ndarray:
    lo, hi = store.split_range(split)
    return np.asarray(store.array(name)[lo : min(hi, lo + max_rows)])


def probe_hook(x_tr: np.ndarray, y_tr: np.ndarray, x_he: np.ndarray, y_he: np.ndarray,
               seed: int = 0, null: bool = True) -> tuple[np.ndarray, np.ndarray | None]:  # fmt: skip
    """Held-out F1 per concept column of a probe fitted on the training rows, and of the
    shuffled-label control (None when `null` is False)."""
    xt = torch.from_numpy(x_tr.astype(np.float32))
    xh = torch.from_numpy(x_he.astype(np.float32)).double()
    out = []
    fits = [y_tr, y_tr[np.random.default_rng(seed).permutation(len(y_tr))]][: 2 if null else 1]
    for labels in fits:
        w, b = fit_probes(xt, torch.from_numpy(labels.astype(np.float64)))
        s_tr = (xt.double() @ w + b).numpy()
        s_he = (xh @ w + b).numpy()
        f1 = []
        for j in range(labels.shape[1]):
            thr, _ = best_threshold(s_tr[:, j], labels[:, j])
            f1.append(f1_score(s_he[:, j] > thr, y_he[:, j]))
        out.append(np.array(f1))
    return out[0], (out[1] if null else None)


def probe_concepts(store, hooks: list[str] | None = None, max_rows: int = 32768,
                   min_positives: int = 20, seed: int = 0,
                   lexical: dict | None = None) -> dict:  # fmt: skip
    """Per concept of an activation store: its held-out prevalence, lexical baseline F1,
    and at each hook the held-out F1 of a dense probe and of the shuffled-label control.
    Concepts with fewer than `min_positives` positive rows in either split are skipped
    (listed under "skipped"). `lexical`: the store's held-out lexical baseline
    (`store_lexical_baseline(store, "heldout")`) when the caller has it already."""
    if not store.concept_names:
        raise ValueError(f"{store.path}: the store has no concept labels (an unlabelled corpus)")
    names = list(store.concept_names)
    hooks = list(store.hooks if hooks is None else hooks)
    y_tr = _split_rows(store, "concept_labels", "train", max_rows).astype(bool)
    y_he = _split_rows(store, "concept_labels", "heldout", max_rows).astype(bool)
    keep = [j for j in range(len(names))
            if y_tr[:, j].sum() >= min_positives and y_he[:, j].sum() >= min_positives]  # fmt: skip
    lexical = lexical if lexical is not None else store_lexical_baseline(store, "heldout")
    kinds = _kinds()
    table = {names[j]: {"kind": kinds.get(names[j], "unknown"),
                        "prevalence": round(float(y_he[:, j].mean()), 6),
                        "lexical_f1": lexical[names[j]]["f1"], "probe_f1": {}, "null_f1": {}}
             for j in keep}  # fmt: skip
    for hook in hooks if keep else []:
        f1, null = probe_hook(_split_rows(store, hook, "train", max_rows), y_tr[:, keep],
                              _split_rows(store, hook, "heldout", max_rows), y_he[:, keep],
                              seed)  # fmt: skip
        for i, j in enumerate(keep):
            table[names[j]]["probe_f1"][hook] = round(float(f1[i]), 6)
            table[names[j]]["null_f1"][hook] = round(float(null[i]), 6)
    for row in table.values():
        best = max(row["probe_f1"], key=row["probe_f1"].get)
        row["best_hook"], row["best_f1"] = best, row["probe_f1"][best]
        row["lift"] = round(row["best_f1"] - row["lexical_f1"], 6)
    return {"n_train_rows": len(y_tr), "n_heldout_rows": len(y_he), "hooks": hooks,
            "concepts": table, "skipped": [names[j] for j in range(len(names)) if j not in keep]}  # fmt: skip


def model_rows(model, store, split: str, hooks: list[str], max_rows: int,
               batch_size: int = 64) -> dict[str, np.ndarray]:  # fmt: skip
    """What `model` computes at `hooks` for the first `max_rows` rows of `split` of
    `store` (the rows `probe_concepts` reads), from the store's own token windows
    (`ActivationStore.windows`: row r of the split is window r // (seq_len - 1), position
    1 + r % (seq_len - 1), BOS first). Another model's view of the very same tokens."""
    lo, hi = store.split_range(split)
    n = min(hi - lo, max_rows)
    body = store.seq_len - 1
    toks = store.windows(split, -(-n // body))
    outs: dict[str, list[torch.Tensor]] = {h: [] for h in hooks}
    with torch.no_grad():
        for i in range(0, len(toks), batch_size):
            _, cache = model.run_with_cache(toks[i : i + batch_size], names_filter=hooks)
            for h in hooks:
                outs[h].append(cache[h][:, 1:].reshape(-1, cache[h].shape[-1]).float())
    # in the store's precision, so both probes see rows rounded alike
    return {h: torch.cat(v)[:n].numpy().astype(store.array(h).dtype) for h, v in outs.items()}


def probe_untrained(table: dict, store, untrained, max_rows: int = 32768) -> dict:
    """Add the untrained-model control to a `probe_concepts` table, in place: per concept,
    `untrained_f1` per hook and `untrained_best_f1`, the same probes fitted on the
    residuals of `untrained` (the model's architecture and seed before training) at the
    same rows. A concept a trained model represents should beat it; one the untrained model
    reads as well is read off the architecture (token embeddings mixed by attention)."""
    names = list(store.concept_names)
    concepts = [c for c in names if c in table["concepts"]]
    cols = [names.index(c) for c in concepts]
    y_tr = _split_rows(store, "concept_labels", "train", max_rows).astype(bool)[:, cols]
    y_he = _split_rows(store, "concept_labels", "heldout", max_rows).astype(bool)[:, cols]
    hooks = table["hooks"]
    x_tr = model_rows(untrained, store, "train", hooks, max_rows)
    x_he = model_rows(untrained, store, "heldout", hooks, max_rows)
    for hook in hooks if concepts else []:
        f1, _ = probe_hook(x_tr[hook], y_tr, x_he[hook], y_he, null=False)
        for i, c in enumerate(concepts):
            table["concepts"][c].setdefault("untrained_f1", {})[hook] = round(float(f1[i]), 6)
    for c in concepts:
        row = table["concepts"][c]
        row["untrained_best_f1"] = max(row.get("untrained_f1", {}).values(), default=float("nan"))
    return table


def contextual_wins(table: dict, max_lexical: float = 0.6, min_probe: float = 0.9) -> list[str]:
    """Contextual concepts a token lookup cannot read (lexical F1 <= max_lexical) that a
    probe reads (F1 >= min_probe at some hook)."""
    return sorted(c for c, r in table["concepts"].items()
                  if r["kind"] == "contextual" and r["lexical_f1"] <= max_lexical
                  and r["best_f1"] >= min_probe)  # fmt: skip


def _kinds() -> dict[str, str]:
    from stages.corpus import CONCEPTS

    return {c.name: c.kind for c in CONCEPTS}
