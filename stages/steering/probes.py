"""Linear probes beside steering vectors.

`train_probe(x, y)`: L2-regularised logistic regression fitted with torch LBFGS on
standardised features (no sklearn); the direction is mapped back to raw activation
space, so it can be compared with a steering vector by cosine.

`concept_probe(store, hook, concept, negative_concept)`: trains on the store's train
split and tests on its held-out split, on tokens labelled with the concept against
tokens labelled with `negative_concept` (or against every other token when None),
class-balanced by subsampling.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor


@dataclass
class Probe:
    weight: Tensor  # [d] in raw activation space
    bias: float
    train_accuracy: float
    heldout_accuracy: float = float("nan")
    n_train: int = 0
    n_heldout: int = 0

    def logits(self, x: Tensor) -> Tensor:
        return x.double() @ self.weight.double() + self.bias

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        return float(((self.logits(x) > 0) == y.bool()).double().mean())

    def to_dict(self) -> dict[str, Any]:
        return {"train_accuracy": self.train_accuracy, "heldout_accuracy": self.heldout_accuracy,
                "n_train": self.n_train, "n_heldout": self.n_heldout, "bias": self.bias,
                "weight_norm": float(self.weight.norm())}  # fmt: skip


def train_probe(x: Tensor, y: Tensor, l2: float = 1e-3, max_iter: int = 200) -> Probe:
    """Logistic regression on x [n, d], y [n] in {0, 1}."""
    x, y = x.double(), y.double()
    if len(x) == 0 or y.min() == y.max():
        raise ValueError(f"train_probe: need both classes, got {len(x)} rows with labels "
                         f"{sorted(set(y.tolist()))}")  # fmt: skip
    mu, sd = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mu) / sd
    w = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ w + b, y)
        loss = loss + l2 * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    w_raw = (w / sd).detach()
    b_raw = float(b.detach() - (w.detach() * mu / sd).sum())
    p = Probe(w_raw, b_raw, float("nan"), n_train=len(x))
    p.train_accuracy = p.accuracy(x, y)
    return p


def _rows(store, hook: str, split: str, concept: str, negative: str | None,
          max_rows: int, seed: int) -> tuple[Tensor, Tensor]:  # fmt: skip
    names = list(store.concept_names)
    for c in (concept, negative):
        if c is not None and c not in names:
            raise KeyError(f"{store.path}: concept {c!r} not labelled (have {names})")
    lo, hi = store.split_range(split)
    hi = min(hi, lo + max_rows)
    labels = np.asarray(store.array("concept_labels")[lo:hi])
    pos = labels[:, names.index(concept)].astype(bool)
    neg = labels[:, names.index(negative)].astype(bool) if negative else ~pos
    pos, neg = pos & ~neg, neg & ~pos
    rng = np.random.default_rng(seed)
    ip, ineg = np.flatnonzero(pos), np.flatnonzero(neg)
    m = min(len(ip), len(ineg))
    if m == 0:
        raise ValueError(f"{store.path} [{split}]: no rows labelled {concept!r} "
                         f"vs {negative or 'rest'!r} in the first {hi - lo} rows")  # fmt: skip
    idx = np.sort(np.concatenate([rng.choice(ip, m, replace=False),
                                  rng.choice(ineg, m, replace=False)]))  # fmt: skip
    x = torch.from_numpy(np.asarray(store.array(hook)[lo:hi])[idx].astype(np.float32))
    return x, torch.from_numpy(pos[idx].astype(np.float64))


def concept_probe(store, hook: str, concept: str, negative_concept: str | None = None,
                  max_rows: int = 65536, seed: int = 0) -> Probe:  # fmt: skip
    """Probe trained on the store's train split, evaluated on its held-out split."""
    xt, yt = _rows(store, hook, "train", concept, negative_concept, max_rows, seed)
    xh, yh = _rows(store, hook, "heldout", concept, negative_concept, max_rows, seed)
    p = train_probe(xt, yt)
    p.heldout_accuracy, p.n_heldout = p.accuracy(xh, yh), len(xh)
    return p


def cosine_table(vectors: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """Pairwise cosines between named directions (probe, steering vector, decoder rows)."""
    unit = {k: v.double() / v.double().norm().clamp_min(1e-12) for k, v in vectors.items()}
    return {a: {b: float(ua @ ub) for b, ub in unit.items()} for a, ua in unit.items()}
