"""DVC stage `report`: `reports/index.html`, its figures and the feature dashboards.

    python -m flows.report

Reads every stage's outputs under data/ (whichever exist: a section whose stage did not
run says so), writes `reports/` atomically (static HTML + PNGs, no external files, opens
from a file URL) and logs every figure to the stage's MLflow run. Each figure's caption
names that run id, the git commit, the hash of the report params and the content hash of
every input it was drawn from. See stages/report/.
"""

from __future__ import annotations

import hashlib
import json
import sys

from prefect import flow, task
from prefect.cache_policies import NO_CACHE

from flows.common import main
from stages.config import flatten, load_params
from stages.layout import Layout
from stages.tracking import stage_run

LAYOUT = Layout()
OUT = LAYOUT.reports


@task(cache_policy=NO_CACHE)
def build(provenance, dashboard_saes, dashboards):
    from stages.report import build_report

    return build_report(OUT, data=LAYOUT.data, provenance=provenance,
                        dashboard_saes=dashboard_saes, dashboards=dashboards)  # fmt: skip


@flow(name="report")
def report_flow() -> dict:
    from stages.report.provenance import Provenance

    params = load_params()
    rp = params.report
    logged = flatten(rp, "report.")
    params_hash = hashlib.md5(json.dumps(logged, sort_keys=True).encode()).hexdigest()[:12]
    where = {
        "models": LAYOUT.model,
        "activations": LAYOUT.activations,
        "saes": LAYOUT.saes,
        "steering": LAYOUT.steering,
        "decomposition": LAYOUT.decomposition,
        "geometry": LAYOUT.geometry,
    }
    inputs = {f"{kind}.{m}": at(m) for kind, at in where.items()
              for m in params.models if at(m).exists()}  # fmt: skip
    # (not a killed run's hidden `.A__B.tmp-<pid>` folder: the report skips those too)
    inputs.update({f"{kind}.{p.name}": p for kind in ("alignment", "transfer")
                   for p in sorted(getattr(LAYOUT, kind)().glob("*__*"))
                   if p.is_dir() and not p.name.startswith(".")})  # fmt: skip
    with stage_run("report", logged, inputs, {"report.params_hash": params_hash}) as run:
        prov = Provenance.from_run(run.run_id, params_hash)
        report = build(prov, rp.dashboard_saes, rp.dashboards.model_dump())
        report.log_to(run)
        run.artifact(report.index)
        summary = {"figures": len(report.figures), "feature_pages": sum(len(p) for p in report.feature_pages.values()),
                   "dashboard_saes": len(report.dashboards),
                   "seconds": report.seconds["total"]}  # fmt: skip
        run.metrics({**summary, **{f"seconds.{k}": v for k, v in report.seconds.items()}})
        ran = ", ".join(k for k, v in report.sections.items() if v)
        skipped = ", ".join(k for k, v in report.sections.items() if not v) or "none"
        print(f"report: {summary['figures']} figures, {summary['feature_pages']} feature pages "
              f"in {summary['seconds']:.1f} s -> {report.index} (sections: {ran}; not run: "
              f"{skipped})")  # fmt: skip
    return summary


if __name__ == "__main__":
    if len(sys.argv) != 1:
        sys.exit("usage: python -m flows.report")
    main(report_flow, "report")
