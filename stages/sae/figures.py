"""Figures of an SAE sweep, as matplotlib Figures (the caller saves or logs them).

- `pareto_figure(rows, model)`: L0 against FVU and against CE loss recovered, one line
  per architecture (rows as `plots/saes/<model>.json` holds them);
- `density_figure(log10_density, title)`: histogram of a dictionary's log10 feature
  densities (dead latents, at -10, left out).

Built with `matplotlib.figure.Figure`, never pyplot: no global state, nothing to close.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def pareto_figure(rows: list[dict], model: str) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), layout="tight")
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], "fvu", "FVU (lower is better)"),
                           (axes[1], "ce_loss_recovered", "CE loss recovered")):  # fmt: skip
        for arch in sorted({r["architecture"] for r in rows}):
            pts = sorted((r["l0"], r[key]) for r in rows if r["architecture"] == arch and key in r)
            if pts:
                ax.plot(*zip(*pts, strict=True), "o-", label=arch)
        ax.set_xscale("log")
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"SAE sweep on {model}: sparsity vs quality (held-out)")
    return fig


def density_figure(log10_density: torch.Tensor, title: str) -> Figure:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3), layout="tight")
    ax = fig.subplots()
    dens = log10_density.float().numpy()
    ax.hist(dens[dens > -10], bins=50)
    ax.set_xlabel("log10 feature density (held-out)")
    ax.set_ylabel("latents")
    ax.set_title(title)
    return fig
