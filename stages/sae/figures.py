"""Figures of an SAE sweep, as matplotlib Figures (the caller saves or logs them).

- `pareto_figure(rows, model)`: L0 against FVU and against CE loss recovered, one line
  per architecture (rows as `plots/saes/<model>.json` holds them), each SAE's intended
  L0 (k, or the `target_l0` it was calibrated to) marked with its ±10 % band
  (`mark_targets`), so SAEs are compared at matched L0;
- `density_figure(log10_density, title)`: histogram of a dictionary's log10 feature
  densities (dead latents, at -10, left out).

Built with `matplotlib.figure.Figure`, never pyplot: no global state, nothing to close.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure


MATCH_TOLERANCE = 0.10  # an SAE is "at" its target L0 within ±10 %


def mark_targets(ax, targets) -> None:
    """Dotted line at each intended L0 (k or target_l0) and its ±10 % band."""
    for t in sorted({float(t) for t in targets if t}):
        ax.axvspan(t * (1 - MATCH_TOLERANCE), t * (1 + MATCH_TOLERANCE), color="0.5",
                   alpha=0.12, lw=0, zorder=0)  # fmt: skip
        ax.axvline(t, color="0.4", ls=":", lw=0.8, zorder=1)


def pareto_figure(rows: list[dict], model: str) -> Figure:
    from matplotlib.figure import Figure

    from stages.sae.registry import plot_style

    fig = Figure(figsize=(10, 4), layout="tight")
    axes = fig.subplots(1, 2)
    for ax, key, label in ((axes[0], "fvu", "FVU (lower is better)"),
                           (axes[1], "ce_loss_recovered", "CE loss recovered")):  # fmt: skip
        mark_targets(ax, [r.get("target_l0") for r in rows])
        for arch in sorted({r["architecture"] for r in rows}):
            pts = sorted((r["l0"], r[key]) for r in rows if r["architecture"] == arch and key in r)
            if pts:
                colour, marker = plot_style(arch)
                ax.plot(*zip(*pts, strict=True), ls="-", marker=marker, color=colour, label=arch)
        ax.set_xscale("log")
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(
        f"SAE sweep on {model}: sparsity vs quality (held-out); grey: each SAE's target L0 ±10 %"
    )
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
