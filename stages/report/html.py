"""HTML building blocks: one stylesheet, a page shell, figures with provenance captions,
tables, and the `Section` / `ReportContext` types every report section uses.

Plain HTML + inline CSS, no JavaScript and no external resources, so every page works
from a `file://` URL offline. All links are relative.
"""

from __future__ import annotations

import html
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.report.provenance import Provenance

CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:0;
 color:#1d2430;background:#fafbfc;line-height:1.45}
main{max-width:1180px;margin:0 auto;padding:12px 28px 60px}
header.top{background:#1d2a3a;color:#eef2f7;padding:14px 28px}
header.top a{color:#bcd4ff}
header.top .provenance{color:#cfd8e3}
h1{font-size:1.6em;margin:.2em 0}
h2{border-bottom:2px solid #d9dee6;padding-bottom:4px;margin-top:2em}
h3{margin-top:1.4em}
nav.toc a{margin-right:14px}
figure{margin:18px 0;padding:10px;background:#fff;border:1px solid #e1e5eb;border-radius:6px}
figure img{max-width:100%;height:auto;display:block;margin:0 auto}
figcaption{font-size:.88em;color:#3c4656;margin-top:6px}
.provenance{display:block;font-size:.82em;color:#5d6878;margin-top:3px;word-break:break-all}
code{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.92em}
table{border-collapse:collapse;margin:10px 0;font-size:.88em;background:#fff}
th,td{border:1px solid #dde2e8;padding:3px 8px;text-align:right}
th{background:#eef1f5}
td.l,th.l{text-align:left}
.note{background:#fff8e1;border:1px solid #f0dc9a;padding:8px 12px;border-radius:5px}
.muted{color:#6b7583}
.grid{display:flex;flex-wrap:wrap;gap:18px}
.card{background:#fff;border:1px solid #e1e5eb;border-radius:6px;padding:10px 14px;flex:1 1 300px}
.ctx{font-family:ui-monospace,Menlo,Consolas,monospace;font-size:.86em;white-space:pre-wrap;
 padding:3px 6px;border-bottom:1px solid #f0f2f5}
.ctx .v{display:inline-block;min-width:4.2em;color:#6b7583}
.tok{border-radius:2px}
.tok.max{outline:1px solid #b3261e}
.pos{color:#0b6b2f}.neg{color:#a1261b}
"""


def e(s: Any) -> str:
    """HTML-escape anything."""
    return html.escape(str(s), quote=True)


def page(title: str, body: str, *, header: str = "") -> str:
    """A complete standalone page (inline CSS, no scripts, no external resources)."""
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>"
        f'<header class="top">{header or f"<h1>{e(title)}</h1>"}</header>'
        f"<main>{body}</main></body></html>\n"
    )


def table(
    headers: Sequence[str],
    rows: Iterable[Sequence[Any]],
    left: int = 1,
    also_left: Sequence[int] = (),
) -> str:
    """A table; the first `left` columns (and those in `also_left`) are left-aligned, the
    rest (numbers) right-aligned. Cells are already HTML."""

    def cls(i: int) -> str:
        return "l" if i < left or i in also_left else ""

    head = "".join(f'<th class="{cls(i)}">{h}</th>' for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f'<td class="{cls(i)}">{c}</td>' for i, c in enumerate(r)) + "</tr>"
        for r in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def fmt(x: Any, digits: int = 3) -> str:
    """A number for a table cell ('–' for missing / non-numeric)."""
    if isinstance(x, bool) or x is None:
        return "–"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if x != x:  # nan
            return "–"
        return (
            f"{x:.{digits}g}" if abs(x) >= 1e4 or (x != 0 and abs(x) < 1e-3) else f"{x:.{digits}f}"
        )
    return e(x)


def relpath(target: Path, start_dir: Path) -> str:
    """A relative URL from a page in `start_dir` to `target` (posix separators)."""
    return Path(os.path.relpath(target, start_dir)).as_posix()


@dataclass
class ReportFigure:
    """One figure of the report: the PNG, its caption and the inputs it was drawn from."""

    name: str  # path under the report folder, e.g. "figures/sweep/toy-a__pareto.png"
    path: Path  # the PNG on disk
    title: str
    caption: str  # plain text: description + provenance line
    inputs: dict[str, str]  # input path -> content hash


@dataclass
class Section:
    """A titled part of the index page, with the figures it drew."""

    id: str
    title: str
    body: str  # HTML
    figures: list[ReportFigure] = field(default_factory=list)


@dataclass
class ReportContext:
    """What a section needs to draw: where the report lives, provenance, a figure counter."""

    out: Path  # the report folder (reports/)
    provenance: Provenance
    dpi: int = 100
    figures: list[ReportFigure] = field(default_factory=list)

    @property
    def figure_dir(self) -> Path:
        return self.out / "figures"

    def figure(
        self,
        fig: Any,
        name: str,
        *,
        title: str,
        description: str,
        inputs: Sequence[str | Path],
        page_dir: Path | None = None,
    ) -> tuple[str, ReportFigure]:
        """Save a matplotlib figure as `figures/<name>.png`, close it, and return the HTML
        <figure> (caption = description + provenance) and its record."""
        import matplotlib.pyplot as plt

        rel = f"figures/{name}.png"
        path = self.out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=self.dpi, bbox_inches="tight", metadata={"Software": None})
        plt.close(fig)
        n = len(self.figures) + 1
        prov = self.provenance
        rec = ReportFigure(
            name=rel,
            path=path,
            title=title,
            caption=f"Figure {n}. {title}. {description} [{prov.caption_line(inputs)}]",
            inputs={Path(p).as_posix(): prov.hash_of(p) for p in inputs},
        )
        self.figures.append(rec)
        src = relpath(path, page_dir or self.out)
        block = (
            f'<figure id="fig-{n}"><img src="{e(src)}" alt="{e(title)}">'
            f"<figcaption><b>Figure {n}. {e(title)}.</b> {e(description)}"
            f"{prov.caption_html(inputs)}</figcaption></figure>"
        )
        return block, rec


def not_run(what: str, expected: str) -> str:
    return (
        f'<p class="note"><b>Not run.</b> {e(what)}: no outputs found at <code>{e(expected)}</code>.'
        " Run the stage (`dvc repro`) and rebuild the report.</p>"
    )
