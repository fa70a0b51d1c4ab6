"""`build_report`: the whole report from the pipeline's outputs, in one call.

Order of work: find the SAEs; ask the steering and alignment sections which latents
they want dashboards for (steering components, aligned pairs); compute every
dashboard from the cache; write the dashboards (partners link across models); draw the
sections; write `index.html`. Written into a temporary folder and renamed into place.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.io import atomic_dir
from stages.report import alignment as alignment_section
from stages.report import geometry as geometry_section
from stages.report import ground_truth as ground_truth_section
from stages.report import steering as steering_section
from stages.report import world as world_section
from stages.report.dashboards import (
    DATA_FILENAME,
    DashboardConfig,
    Partner,
    SAEDashboardData,
    compute_dashboard_data,
    feature_page_path,
    sae_dir,
    vocab_strings,
    write_dashboards,
)
from stages.report.html import ReportContext, ReportFigure, Section, e, page, relpath, table
from stages.report.provenance import Provenance
from stages.report.sweep import SAERef, concept_table_section, discover_saes, sweep_section

log = logging.getLogger(__name__)

# (SAE key "model/hook/sae", feature, SAE key, feature, score or None)
PartnerPair = tuple[str, int, str, int, float | None]


@dataclass(frozen=True)
class ReportPaths:
    """Where the pipeline's outputs live (the standard layout under `data/`)."""

    saes: Path
    activations: Path
    models: Path
    steering: Path
    decomposition: Path
    alignment: Path
    transfer: Path
    corpus: Path | None = None
    probes: Path | None = None  # metrics/activations: the activations stage's probe tables
    geometry: Path | None = None  # data/geometry: the geometry stage's outputs

    @classmethod
    def under(cls, data: str | Path = "data") -> ReportPaths:
        d = Path(data)
        return cls(d / "saes", d / "activations", d / "models", d / "steering",
                   d / "decomposition", d / "alignment", d / "transfer", d / "corpus",
                   d.parent / "metrics" / "activations", d / "geometry")  # fmt: skip

    @classmethod
    def coerce(cls, value: ReportPaths | str | Path) -> ReportPaths:
        return value if isinstance(value, ReportPaths) else cls.under(value)


@dataclass
class Report:
    """What `build_report` wrote: the caller logs `figures` to its MLflow run."""

    index: Path
    figures: list[ReportFigure]
    dashboards: dict[str, Path]  # SAE key -> its dashboards' index.html
    dashboard_data: dict[str, Path]  # SAE key -> dashboard_data.json
    feature_pages: dict[str, dict[int, Path]]  # SAE key -> feature -> page
    sections: dict[str, bool]  # section id -> whether its inputs existed
    seconds: dict[str, float] = field(default_factory=dict)

    def log_to(self, run: Any, subdir: str = "figures") -> None:
        """Log every figure PNG to an MLflow run (anything with `.artifact(path, subdir)`,
        e.g. `stages.tracking.StageRun`), under `subdir/<section>/`."""
        for f in self.figures:
            sub = Path(f.name).parent.relative_to("figures").as_posix()
            run.artifact(f.path, f"{subdir}/{sub}" if sub != "." else subdir)


def default_dashboard_saes(saes: list[SAERef]) -> list[SAERef]:
    """One SAE per (model, hook): of the architectures marked `dashboard_default` (TopK),
    the SAE with the smallest k (the sweep's first TopK in the default params), else the
    SAE with the lowest L0. The choice depends on the names and configs only, so both
    models of a pair get the same SAE."""
    import json

    from stages.sae.registry import ARCHITECTURES

    preferred = {name for name, cls in ARCHITECTURES.items() if cls.dashboard_default}
    groups: dict[tuple[str, str], list[SAERef]] = defaultdict(list)
    for s in saes:
        groups[(s.model, s.hook)].append(s)
    out = []
    for group in groups.values():
        first_choice = [s for s in group if s.architecture in preferred]
        if first_choice:

            def k_of(s: SAERef) -> tuple:
                return (json.loads((s.path / "cfg.json").read_text()).get("k", 0), s.name)

            out.append(min(first_choice, key=k_of))
        else:
            out.append(min(group, key=lambda s: (s.metrics.get("l0", float("inf")), s.name)))
    return out


def _pick(saes: list[SAERef], wanted: Sequence[str] | None, used: Sequence[str]) -> list[SAERef]:
    if wanted is None:  # the default SAEs, and every SAE another stage used
        out = default_dashboard_saes(saes)
        return out + [s for s in saes if s.key in used and s not in out]
    out = []
    for w in wanted:
        hits = [s for s in saes if w in (s.key, s.name)]
        if not hits:
            raise ValueError(
                f"dashboard SAE {w!r}: no such SAE; expected 'model/hook/sae' or an SAE name "
                f"(have e.g. {[s.key for s in saes[:3]]})"
            )
        out += [s for s in hits if s not in out]
    return out


def build_report(
    out: str | Path = "reports",
    *,
    data: ReportPaths | str | Path = "data",
    models: Sequence[str] | None = None,
    provenance: Provenance | Mapping[str, Any] | None = None,
    dashboard_saes: Sequence[str] | None = None,
    dashboards: DashboardConfig | Mapping[str, Any] | None = None,
    extra_features: Mapping[str, Mapping[int, Sequence[str] | str]] | None = None,
    partners: Iterable[PartnerPair] | None = None,
    dpi: int = 100,
) -> Report:
    """Write the report to `out` (index.html, figures/, dashboards/) and return what it
    wrote. See the package docstring (`stages.report`) for the arguments."""
    t_all = time.perf_counter()
    seconds: dict[str, float] = {}
    paths = ReportPaths.coerce(data)
    prov = Provenance.coerce(provenance)
    cfg = (
        dashboards
        if isinstance(dashboards, DashboardConfig)
        else DashboardConfig(**(dashboards or {}))
    )
    out = Path(out)

    saes = discover_saes(paths.saes, list(models) if models is not None else None)
    resolve = steering_section.sae_resolver([(s.model, s.hook, s.name, s.path) for s in saes])
    # by default, dashboards also for every SAE the steering and align stages used, so
    # that their latents link to pages
    used = alignment_section.aligned_sae_keys(paths.alignment) + (
        steering_section.decomposed_sae_keys(paths.steering, paths.decomposition, resolve)
    )
    chosen = _pick(saes, dashboard_saes, used)

    plans, links = _plan_features(chosen, cfg, paths, extra_features, partners, resolve)

    with atomic_dir(out) as tmp:
        ctx = ReportContext(tmp, prov, dpi=dpi)
        # dashboards: compute all, then write (partner links need every page's path)
        t0 = time.perf_counter()
        computed: list[SAEDashboardData] = []
        notes: list[str] = []
        by_model: dict[str, list[SAERef]] = defaultdict(list)
        for s in chosen:
            by_model[s.model].append(s)
        for model_name, group in by_model.items():
            model_dir, store_dir = paths.models / model_name, paths.activations / model_name
            missing = [p for p in (model_dir, store_dir) if not p.exists()]
            if missing:
                notes.append(f"{model_name}: no dashboards, missing {', '.join(map(str, missing))}")
                continue
            from stages.activations import ActivationStore
            from stages.models import load_model

            model = load_model(model_dir)
            store = ActivationStore(store_dir)
            vocab = vocab_strings(model.tokenizer, model.cfg.d_vocab)
            for s in group:
                if s.hook not in store.hooks:
                    notes.append(f"{s.key}: no dashboards, hook not cached in {store_dir}")
                    continue
                computed.append(compute_dashboard_data(
                    model_name=s.model, hook=s.hook, sae_path=s.path, store=store, model=model,
                    cfg=cfg, reasons=plans[s.key], vocab=vocab,
                    inputs=[paths.saes / s.model, store_dir, model_dir],
                ))  # fmt: skip
        seconds["dashboards_compute"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        page_of = {(d.key, f): feature_page_path(tmp, d, f) for d in computed for f in d.records}
        feature_pages, dash_index, dash_data = {}, {}, {}
        for d in computed:
            feature_pages[d.key] = write_dashboards(d, tmp, provenance=prov,
                                                    partners=links.get(d.key), partner_pages=page_of)  # fmt: skip
            dash_index[d.key] = sae_dir(tmp, d) / "index.html"
            dash_data[d.key] = sae_dir(tmp, d) / DATA_FILENAME
        seconds["dashboards_write"] = time.perf_counter() - t0

        # sections
        t0 = time.perf_counter()
        rel_index = {k: relpath(p, tmp) for k, p in dash_index.items()}
        rel_pages = {k: relpath(p, tmp) for k, p in page_of.items()}
        sections: list[Section] = []
        world = (
            world_section.section(paths.corpus, paths.models, paths.probes)
            if paths.corpus
            else None
        )
        if world is not None:
            sections.append(world)
        sections.append(sweep_section(ctx, saes, paths.saes, rel_index))
        seconds["section_sweep"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        sections.append(concept_table_section(saes, rel_pages))
        gt = ground_truth_section.section(saes, ctx)
        if gt is not None:
            sections.append(gt)
        fam = ground_truth_section.families_section(saes, ctx, paths.activations)
        if fam is not None:  # only when a hook's SAEs form a width ladder
            sections.append(fam)
        steer = steering_section.section(
            ctx, paths.steering, paths.decomposition, rel_pages, resolve
        )
        sections.append(steer or _not_run("steering", "Steering", paths.steering))
        seconds["section_steering"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        align = alignment_section.section(ctx, paths.alignment, rel_pages, paths.transfer)
        sections.append(align or _not_run("alignment", "Alignment across models", paths.alignment))
        seconds["section_alignment"] = time.perf_counter() - t0
        if paths.geometry is not None:
            t0 = time.perf_counter()
            geo = geometry_section.section(ctx, paths.geometry)
            sections.append(geo or _not_run("geometry", "Concept geometry", paths.geometry))
            seconds["section_geometry"] = time.perf_counter() - t0
        sections.append(_dashboards_section(computed, rel_index, notes))
        ran = {s.id: not s.body.startswith('<p class="note"><b>Not run') for s in sections}
        (tmp / "index.html").write_text(_index_html(sections, prov))

    figures = [
        ReportFigure(f.name, out / f.name, f.title, f.caption, f.inputs) for f in ctx.figures
    ]
    remap = {k: out / p.relative_to(tmp) for k, p in dash_index.items()}
    seconds["total"] = time.perf_counter() - t_all
    report = Report(
        index=out / "index.html",
        figures=figures,
        dashboards=remap,
        dashboard_data={k: out / p.relative_to(tmp) for k, p in dash_data.items()},
        feature_pages={
            k: {f: out / p.relative_to(tmp) for f, p in v.items()} for k, v in feature_pages.items()
        },  # fmt: skip
        sections=ran,
        seconds=seconds,
    )
    log.info("report: %s (%d figures, %d dashboard sets) in %.1f s", report.index,
             len(figures), len(computed), seconds["total"])  # fmt: skip
    return report


def _plan_features(
    chosen: list[SAERef],
    cfg: DashboardConfig,
    paths: ReportPaths,
    extra_features: Mapping[str, Mapping[int, Sequence[str] | str]] | None,
    partners: Iterable[PartnerPair] | None,
    resolve: steering_section.Resolver,
) -> tuple[dict[str, dict[int, list[str]]], dict[str, dict[int, list[Partner]]]]:
    """Which latents of each chosen SAE get a dashboard, and why; and every latent's
    matched partners.

    Picked: the most active and the concept latents (`plan_features`), what the caller
    and the steering section ask for, the best-matched aligned pairs, then one hop: the
    matched partner of every latent picked so far, so that each partner link has a page.
    """
    from stages.report.dashboards import plan_features

    extras: dict[str, dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))

    def want(key: str, f: int, why: str) -> None:
        if why not in extras[key][int(f)]:
            extras[key][int(f)].append(why)

    for key, feats in (extra_features or {}).items():
        for f, why in feats.items():
            for w in [why] if isinstance(why, str) else why:
                want(key, f, w)
    steering = steering_section.wanted_features(paths.steering, paths.decomposition, resolve)
    for key, feats in steering.items():
        for f, why in feats.items():
            for w in why:
                want(key, f, w)
    every, top = alignment_section.partner_pairs(paths.alignment)
    given = list(partners or [])
    links: dict[str, dict[int, list[Partner]]] = defaultdict(lambda: defaultdict(list))
    partner_of: dict[tuple[str, int], list[tuple[str, int]]] = defaultdict(list)
    for ka, fa, kb, fb, score in every + given:
        ma, ha, sa = ka.split("/", 2)
        mb, hb, sb = kb.split("/", 2)
        links[ka][int(fa)].append(Partner(mb, hb, sb, int(fb), score))
        links[kb][int(fb)].append(Partner(ma, ha, sa, int(fa), score))
        partner_of[(ka, int(fa))].append((kb, int(fb)))
        partner_of[(kb, int(fb))].append((ka, int(fa)))
    for ka, fa, kb, fb, score in top + given:
        r = f" (r = {score:.2f})" if score is not None else ""
        want(ka, fa, f"aligned with {kb} #{fb}{r}")
        want(kb, fb, f"aligned with {ka} #{fa}{r}")
    plans = {s.key: plan_features(s.path, cfg, extras.get(s.key)) for s in chosen}
    picked = [(key, f) for key, plan in plans.items() for f in plan]  # before the hop
    for key, f in picked:
        for pk, pf in partner_of.get((key, f), []):
            if pk in plans and pf not in plans[pk]:
                plans[pk][pf] = [f"matched partner of {key} #{f}"]
    return plans, links


def _not_run(id_: str, title: str, path: Path) -> Section:
    from stages.report.html import not_run

    return Section(id_, title, not_run(title, str(path)))


def _dashboards_section(computed: list[SAEDashboardData], index: dict[str, str],
                        notes: list[str]) -> Section:  # fmt: skip
    rows = [
        [f'<a href="{e(index[d.key])}">{e(d.key)}</a>', e(d.architecture), str(len(d.records)),
         str(len(d.descriptions)), str(d.d_sae), str(d.n_rows)]
        for d in computed
    ]  # fmt: skip
    body = (
        "<p>Static pages per SAE for its most active latents, its concept latents, steering "
        "components and aligned partners: top-activating contexts with per-token shading, "
        "samples across activation quantiles, activation histogram, density, logit-lens "
        "tokens, best concept and matched partner. Computed from the activation cache "
        "(the model is not re-run).</p>"
    )
    if not rows:
        body = '<p class="note"><b>Not run.</b> No SAE to build dashboards for.</p>'
    else:
        body += table(["SAE", "architecture", "dashboards", "live latents", "d_sae",
                       "tokens streamed"], rows, left=2)  # fmt: skip
    body += "".join(f'<p class="note">{e(n)}</p>' for n in notes)
    return Section("dashboards", "Feature dashboards", body)


def _index_html(sections: list[Section], prov: Provenance) -> str:
    toc = " ".join(f'<a href="#{e(s.id)}">{e(s.title)}</a>' for s in sections)
    header = f'<h1>Feature Atlas report</h1><nav class="toc">{toc}</nav>{prov.caption_html([])}'
    body = "".join(f'<section id="{e(s.id)}"><h2>{e(s.title)}</h2>{s.body}</section>'
                   for s in sections)  # fmt: skip
    return page("Feature Atlas report", body, header=header)
