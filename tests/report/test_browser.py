"""A real browser loads the report and a dashboard from file:// URLs: no console errors,
every image renders, every internal link resolves, and a screenshot is taken.

Chromium comes from Debian (`make browser`, part of `make install` when run as root);
Playwright drives it through `executable_path` (no `playwright install` download).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def _chromium() -> str | None:
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    return next((p for p in map(shutil.which, CANDIDATES) if p), None)


def _ids(page: Path) -> set[str]:
    return set(re.findall(r'\bid="([^"]+)"', page.read_text()))


def broken_links(page: Path, hrefs: list[str]) -> list[str]:
    """Internal hrefs of `page` whose file (or #anchor in it) does not exist."""
    bad = []
    for href in hrefs:
        u = urlparse(href)
        if u.scheme in ("http", "https", "mailto", "data"):
            continue
        target = page if not u.path else (page.parent / unquote(u.path)).resolve()
        if not target.is_file():
            bad.append(f"{href} (no file {target})")
        elif u.fragment and u.fragment not in _ids(target):
            bad.append(f"{href} (no id {u.fragment!r} in {target.name})")
    return bad


@pytest.fixture(scope="module")
def browser():
    exe = _chromium()
    if exe is None:
        pytest.skip(
            "chromium is not installed (Debian package `chromium`: run `make browser` as root)"
        )
    sync_api = pytest.importorskip(
        "playwright.sync_api",
        reason="the `playwright` package is not installed (pip install -e '.[test]')",
    )
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


def _visit(browser, path: Path, shot: Path) -> dict:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    errors: list[str] = []
    page.on(
        "console",
        lambda m: (
            errors.append(f"console.{m.type}: {m.text}") if m.type in ("error", "warning") else None
        ),
    )
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    page.on("requestfailed", lambda r: errors.append(f"request failed: {r.url}"))
    page.goto(path.as_uri(), wait_until="load")
    images = page.evaluate(
        "Array.from(document.images).map(i => ({src: i.getAttribute('src'), ok: i.complete, w: i.naturalWidth}))"
    )
    hrefs = page.evaluate(
        "Array.from(document.querySelectorAll('a[href]')).map(a => a.getAttribute('href'))"
    )
    page.screenshot(path=str(shot), full_page=True)
    page.close()
    return {"errors": errors, "images": images, "hrefs": hrefs}


@pytest.mark.slow
def test_report_and_dashboard_in_chromium(browser, tiny_report, tmp_path):
    report, key_a, _ = tiny_report
    dashboard = report.feature_pages[key_a][3]  # has a cross-model partner link
    for path, min_images in ((report.index, 4), (report.dashboards[key_a], 0), (dashboard, 0)):
        shot = tmp_path / f"{path.parent.name}-{path.stem}.png"
        seen = _visit(browser, path, shot)
        assert seen["errors"] == [], f"{path}: {seen['errors']}"
        assert len(seen["images"]) >= min_images
        bad = [i for i in seen["images"] if not (i["ok"] and i["w"] > 0)]
        assert not bad, f"{path}: images that did not render: {bad}"
        assert seen["hrefs"], f"{path}: no links at all"
        assert broken_links(path, seen["hrefs"]) == []
        assert shot.stat().st_size > 10_000
    if os.environ.get("REPORT_SCREENSHOTS"):  # keep them to look at
        for p in tmp_path.glob("*.png"):
            shutil.copy(p, Path(os.environ["REPORT_SCREENSHOTS"]) / p.name)


def test_every_internal_link_of_every_page_resolves(tiny_report):
    """The same link check without a browser, over every HTML page of the report."""
    report, _, _ = tiny_report
    pages = sorted(report.index.parent.rglob("*.html"))
    assert len(pages) > 10
    for page in pages:
        hrefs = re.findall(r'<a [^>]*href="([^"]+)"', page.read_text())
        assert broken_links(page, [h.replace("&amp;", "&") for h in hrefs]) == [], page
        srcs = re.findall(r'<img [^>]*src="([^"]+)"', page.read_text())
        assert all((page.parent / s).is_file() for s in srcs), page
