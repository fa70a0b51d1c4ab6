"""What the dense concept probes cost, and how far a capped LBFGS run stops from their
optimum (`stages/concept_probes.py`).

On a cached store (default: the default run's `data/activations/toy-a`), for each hook,
on the rows and concepts `probe_concepts` fits (32,768 training rows, concepts with at
least 20 positives): the probes' solver, Newton's method to convergence (`fit_probes`),
against LBFGS on the very same objective capped at `--lbfgs-iters` iterations (150: the
solver before 2026-12-06). Printed per hook: seconds of each, the largest gradient of the
objective at each solution, and how far above Newton's optimum LBFGS stopped, per column
(min / max). Both run on this machine's torch threads (2 here).

    python benchmarks/concept_probes.py [--store data/activations/toy-a] [--lbfgs-iters 150]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stages.activations import ActivationStore  # noqa: E402
from stages.concept_probes import _probe_loss, _split_rows, fit_probes, probe_problem  # noqa: E402


def objective(x: torch.Tensor, y: torch.Tensor, w_raw: torch.Tensor, b: torch.Tensor,
              l2: float, grad: bool = False) -> tuple[torch.Tensor, float]:  # fmt: skip
    """Per-column objective of raw-space probes (W [d, C], b [C]), in the standardised
    coordinates `fit_probes` solves in; and the largest |gradient| when `grad`."""
    za, c, _, ny, mu, sd = probe_problem(x, y)
    w = torch.cat([w_raw * sd[:, None], (b + (w_raw * mu[:, None]).sum(0))[None]], 0)
    w = w.detach().requires_grad_(grad)
    with torch.set_grad_enabled(grad):
        loss, _ = _probe_loss(za, w, c, ny, l2)
        if not grad:
            return loss.detach(), float("nan")
        loss.sum().backward()
    return loss.detach(), float(w.grad.abs().max())


def lbfgs(x: torch.Tensor, y: torch.Tensor, l2: float, iters: int):
    """The same objective by torch's LBFGS (strong Wolfe), every column at once, as the
    probes were fitted before; returns raw-space (W, b)."""
    za, c, _, ny, mu, sd = probe_problem(x, y)
    w = torch.zeros(za.shape[1], y.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1, max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        total = _probe_loss(za, w, c, ny, l2)[0].sum()
        total.backward()
        return total

    opt.step(closure)
    w = w.detach()
    w_raw = w[:-1] / sd[:, None]
    return w_raw, w[-1] - (w[:-1] * (mu / sd)[:, None]).sum(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--store", default="data/activations/toy-a")
    ap.add_argument("--rows", type=int, default=32768)
    ap.add_argument("--lbfgs-iters", type=int, default=150)
    ap.add_argument("--l2", type=float, default=1e-4)
    args = ap.parse_args()
    store = ActivationStore(Path(args.store))
    labels = _split_rows(store, "concept_labels", "train", args.rows).astype(bool)
    keep = [j for j in range(labels.shape[1]) if labels[:, j].sum() >= 20]
    y = torch.from_numpy(labels[:, keep].astype(np.float64))
    print(f"{args.store}: {len(y):,} rows x {len(keep)} concepts, torch threads "
          f"{torch.get_num_threads()}")  # fmt: skip
    for hook in store.hooks:
        x = torch.from_numpy(_split_rows(store, hook, "train", args.rows).astype(np.float32))
        t = time.perf_counter()
        w, b = fit_probes(x, y, l2=args.l2)
        t_newton = time.perf_counter() - t
        t = time.perf_counter()
        w2, b2 = lbfgs(x, y, args.l2, args.lbfgs_iters)
        t_lbfgs = time.perf_counter() - t
        f_newton, g_newton = objective(x, y, w, b, args.l2, grad=True)
        f_lbfgs, g_lbfgs = objective(x, y, w2, b2, args.l2, grad=True)
        gap = f_lbfgs - f_newton
        print(f"{hook}: Newton {t_newton:.1f} s (max |grad| {g_newton:.1e}); LBFGS "
              f"{args.lbfgs_iters} iterations {t_lbfgs:.1f} s (max |grad| {g_lbfgs:.1e}), "
              f"above the optimum by {float(gap.min()):.1e} to {float(gap.max()):.1e} "
              f"(columns below it: {int((gap < -1e-12).sum())})")  # fmt: skip


if __name__ == "__main__":
    main()
