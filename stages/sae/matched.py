"""The matched-L0 study's table (`python -m flows.sae_study --summary`; README, "The SAE
study"): the study's SAEs, named `<arch>-l0t<target>-s<seed>`, grouped by architecture
and L0 target over seeds. An SAE is "at" its target when its held-out L0 is within
±10 % (`stages.sae.figures.MATCH_TOLERANCE`), the band the Pareto figures draw.

Pure: reads the metrics the SAE folders already hold (`stages.report.sweep.SAERef`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

from stages.sae.figures import MATCH_TOLERANCE


def matched_table(saes: list, order: Sequence[str] = ()) -> list[dict]:
    """One row per (architecture, L0 target) of the study's SAEs (`SAERef`s named
    `<arch>-l0t<target>-s<seed>`): held-out L0 of each seed, its largest deviation from
    the target, whether every seed is inside the ±10 % band, and mean ± sd over seeds of
    FVU, ΔCE, KL, dead fraction and k-sparse probing F1 (k = 1, 20). Rows by `order` of
    architectures (others last), then target."""
    name = re.compile(r"^(?P<arch>[a-z]+)-l0t(?P<t>[0-9.]+)-s(?P<seed>[0-9]+)$")
    groups: dict[tuple[str, float], list] = {}
    for s in saes:
        if (m := name.match(s.name)) and m["arch"] == s.architecture:
            groups.setdefault((m["arch"], float(m["t"])), []).append((int(m["seed"]), s))

    def stat(vals: list) -> dict:
        v = np.array([x for x in vals if isinstance(x, int | float) and np.isfinite(x)])
        if not v.size:
            return {"mean": None, "sd": None, "n": 0}
        return {"mean": float(v.mean()), "sd": float(v.std(ddof=1)) if v.size > 1 else None,
                "n": int(v.size)}  # fmt: skip

    rows = []
    rank = {a: i for i, a in enumerate(order)}
    for (arch, target), members in sorted(
        groups.items(), key=lambda kv: (rank.get(kv[0][0], len(rank)), kv[0][1])
    ):
        members.sort(key=lambda m: m[0])
        l0 = [s.metrics.get("l0") for _, s in members]
        signed = [x / target - 1 for x in l0 if isinstance(x, int | float)]
        dev = [abs(d) for d in signed]
        probe = [(s.metrics.get("ground_truth") or {}).get("sparse_probing") or {}
                 for _, s in members]  # fmt: skip

        def f1(k: str, probe: list = probe) -> list:
            return [((p.get("summary") or {}).get(f"{k}_f1") or {}).get("mean") for p in probe]

        down = [s.metrics.get("downstream") or {} for _, s in members]
        rows.append({
            "architecture": arch, "target_l0": target, "seeds": [sd for sd, _ in members],
            "l0": l0, "max_deviation": max(dev) if dev else None,
            "worst_deviation": max(signed, key=abs) if signed else None,  # with its sign
            "within_band": bool(dev) and max(dev) <= MATCH_TOLERANCE + 1e-12,
            "fvu": stat([s.metrics.get("fvu") for _, s in members]),
            "ce_delta_sae": stat([d.get("ce_delta_sae") for d in down]),
            "kl_sae": stat([d.get("kl_sae") for d in down]),
            "dead_fraction": stat([s.metrics.get("dead_fraction") for _, s in members]),
            "probe_k1_f1": stat(f1("k1")), "probe_k20_f1": stat(f1("k20")),
        })  # fmt: skip
    return rows
