"""`report` in params.yaml: which SAEs get feature dashboards, and how many features and
contexts each shows (`stages/report/dashboards.py`).

Its own module, pydantic only, so that every stage's params check (stages/config.py)
reads it without importing the report machinery (matplotlib, torch).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from stages.layout import SAFE_NAME_EXPECTED, why_unsafe
from stages.params_messages import KeyProblem
from stages.params_types import NonNegInt, PosInt, StrictModel

if TYPE_CHECKING:
    from stages.config import Params


class ReportDashboards(StrictModel):
    """Feature dashboards (`stages.report.DashboardConfig`)."""

    n_most_active: NonNegInt = 12  # latents per SAE picked by density
    concept_features: bool = True  # plus each concept's best latent
    n_contexts: PosInt = 12  # top-activating contexts per page
    n_quantiles: PosInt = 4  # activation-quantile intervals with samples
    max_rows: PosInt | None = 200_000  # held-out rows streamed per SAE (None: all)


class ReportParams(StrictModel):
    # SAEs to build dashboards for ("model/hook/sae" or SAE names); None: one TopK per
    # (model, hook) plus every SAE the steering and align stages used
    dashboard_saes: list[str] | None = None
    dashboards: ReportDashboards = ReportDashboards()

    def check(self, p: Params) -> None:
        """`dashboard_saes`: each an SAE name or 'model/hook/name' (the report's `_pick`
        rule), where params tell the folder names."""
        if self.dashboard_saes is None:
            return
        keys: set[str] = set()
        unknown: set[str] = set()  # models whose SAE folder names need the loaded model
        for model in p.models:
            for hook, names in p.sae_folders(model).items():
                if names is None:
                    unknown.add(model)
                    continue
                keys.update(f"{model}/{hook}/{n}" for n in names)
        names = sorted({k.rsplit("/", 1)[1] for k in keys})
        for i, w in enumerate(self.dashboard_saes):
            if w in keys or w in names:
                continue
            parts = w.split("/")
            if len(parts) not in (1, 3) or any(why_unsafe(part) for part in parts):
                raise KeyProblem(("report", "dashboard_saes", i), w, "expected an SAE name or "
                                f"'model/hook/name', each part a folder name ({SAFE_NAME_EXPECTED})")  # fmt: skip
            if w.split("/")[0] in unknown if "/" in w else unknown:
                continue  # known only once the model is loaded: checked by the stage
            raise KeyProblem(("report", "dashboard_saes", i), w,
                            f"expected an SAE of saes.sweep, by name ({', '.join(names) or 'none'}) "
                            "or as 'model/hook/name'")  # fmt: skip
