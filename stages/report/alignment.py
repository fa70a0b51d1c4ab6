"""The alignment section (placeholder until the align stage's outputs are settled)."""

from __future__ import annotations

from pathlib import Path

from stages.report.html import ReportContext, Section


def partner_pairs(alignment_dir: Path) -> list[tuple[str, int, str, int, float | None]]:
    """Matched latent pairs across models, for dashboard partner links."""
    return []


def section(ctx: ReportContext, alignment_dir: Path, pages: dict) -> Section | None:
    """None when the alignment outputs are absent (the report says 'not run')."""
    return None
