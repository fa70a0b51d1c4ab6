"""The steering section (placeholder until the steering stage's outputs are settled)."""

from __future__ import annotations

from pathlib import Path

from stages.report.html import ReportContext, Section


def wanted_features(decomposition_dir: Path) -> dict[str, dict[int, list[str]]]:
    """SAE key -> {latent: [reason]} for the steering components to dashboard."""
    return {}


def section(
    ctx: ReportContext, steering_dir: Path, decomposition_dir: Path, pages: dict
) -> Section | None:
    """None when the steering outputs are absent (the report says 'not run')."""
    return None
