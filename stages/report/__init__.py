"""The report: `reports/index.html`, its figures, and static feature dashboards.

Entry point for the report stage::

    from stages.report import build_report
    report = build_report("reports", data="data", provenance={
        "run_id": run.run_id, "git_commit": git_commit(), "params_hash": "...",
        "inputs": {"data/saes/toy-a": "<content hash>", ...}})
    report.log_to(run)            # every figure PNG -> the MLflow run

`build_report(out, *, data, models, provenance, dashboard_saes, dashboards,
extra_features, partners, dpi) -> Report`

- `out`: the report folder, replaced atomically (written beside it, renamed in place).
- `data`: a folder with the standard layout (`saes/`, `activations/`, `models/`,
  `steering/`, `decomposition/`, `alignment/`) or a `ReportPaths` naming each.
- `models`: restrict to these model names (default: every model under `saes/`).
- `provenance`: `Provenance` or dict with `run_id`, `git_commit`, `params_hash`,
  `inputs` ({input path: content hash}). Every figure's caption shows the first three
  and the hashes of the inputs it was drawn from (paths as `data/saes/<model>`,
  `data/activations/<model>`, `data/models/<model>`, `data/steering/<model>`, ...); a
  hash not given is computed with `stages.io.content_hash`. Default: git commit only.
  Inside `stage_run(...) as run`, `Provenance.from_run(run.run_id, params_hash)` takes
  the run id, commit and the input hashes the run already logged (no second hashing).
- `dashboard_saes`: SAE keys (`model/hook/sae`) or SAE names to build dashboards for;
  default one per (model, hook): the TopK SAE with the smallest k, plus every SAE the
  align stage matched and every SAE a steering vector was decomposed into (so partner
  links and steering components have pages to point at).
- `dashboards`: `DashboardConfig` or a dict of its fields (features per SAE, contexts,
  quantiles, rows streamed, ...).
- `extra_features`: {SAE key: {latent: reason}} to dashboard besides the most active
  and the concept latents (the steering and alignment sections add theirs).
- `partners`: extra matched pairs `(key_a, latent_a, key_b, latent_b, score)`; pairs
  found in the alignment outputs are added automatically. Partners link to each other.

Returns `Report`: `index`, `figures` (list of `ReportFigure`: `name` under `out`, PNG
`path`, `title`, `caption` with provenance, `inputs` {path: hash}), `dashboards` and
`dashboard_data` per SAE key, `feature_pages`, `sections` ({id: ran}) and `seconds`.

Layout of `out/`:

    index.html                                the report (no scripts, no external files)
    figures/<section>/<name>.png               every figure, captioned in index.html
    dashboards/<model>/<hook>/<sae>/index.html the SAE's dashboarded latents
    dashboards/<model>/<hook>/<sae>/feature-<id>.html
    dashboards/<model>/<hook>/<sae>/dashboard_data.json   short descriptions of every
                                              live latent (used by features_of_text)

Features of a text (the "which features fire here?" question)::

    from stages.report import features_of_text, format_token_features
    rows = features_of_text(text, model, hook, sae, dashboard_data, k=5)
    print(format_token_features(rows))        # or: python -m flows.features "text" --model toy-a ...

Cost: the model is never re-run for dashboards (one pass of `sae.encode` over the cached
held-out rows per dashboarded SAE; the model is loaded for W_U and the tokenizer only).
The default pipeline (2 models × 7 SAEs, 3 steered concepts per model, one aligned pair,
~190 dashboard pages, 37 figures) builds in ~28 s wall on 2 shared cores, ~2 s of it
hashing the activation stores when `provenance` does not carry their hashes.

Modules: `sweep` (Pareto frontiers, densities, concept table), `dashboards` (the
streaming pass and the pages), `features` (features of a text), `steering` and
`alignment` (pluggable sections: each returns None when its inputs are absent and the
report says "not run"), `html` (page shell, figures with captions), `provenance`.
"""

from stages.lazy import lazy_exports

# Names exported here, by the submodule defining them; each is imported on first use
# (PEP 562), so that a light submodule (`stages.report.config`, read by every stage's
# params check) does not pull in matplotlib and torch through this package.
_EXPORTS = {
    "build": "Report ReportPaths build_report default_dashboard_saes",
    "dashboards": (
        "DashboardConfig Partner SAEDashboardData collect_feature_stats compute_dashboard_data "
        "write_dashboards"
    ),
    "features": (
        "ActiveFeature TokenFeatures features_of_text format_token_features load_dashboard_data"
    ),
    "html": "ReportFigure Section",
    "provenance": "Provenance",
}
__getattr__, __dir__, __all__ = lazy_exports(__name__, _EXPORTS)
