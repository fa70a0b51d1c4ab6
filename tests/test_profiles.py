"""Every profile in profiles/ (and the default params.yaml) runs under `dvc repro` as
documented (`cp profiles/<x>.yaml params.yaml && atlas run`): DVC refuses a stage whose
`params:` key is missing from params.yaml ("Parameters 'compute.precision' are missing"),
even where the schema has a default, so each profile must spell out every key a stage it
runs depends on."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROFILES = [REPO / "params.yaml", *sorted((REPO / "profiles").glob("*.yaml"))]


def _get(tree: dict, dotted: str):
    for k in dotted.split("."):
        if not isinstance(tree, dict) or k not in tree:
            raise KeyError(dotted)
        tree = tree[k]
    return tree


def stage_params(dvc: dict, params: dict) -> list[tuple[str, str]]:
    """(stage@item, params key) for every stage dvc.yaml would run with `params`,
    `foreach` expanded over the params' own entries as DVC does."""
    out = []
    for name, stage in dvc["stages"].items():
        if "foreach" not in stage:
            out += [(name, k) for k in stage.get("params", [])]
            continue
        over = _get(params, stage["foreach"].strip("${}"))
        items = over.items() if isinstance(over, dict) else ((x, x) for x in over)
        for key, item in items:
            for k in stage["do"].get("params", []):
                k = k.replace("${key}", key)
                k = re.sub(r"\$\{item\.(\w+)\}", lambda m, it=item: str(it[m[1]]), k)
                out.append((f"{name}@{key}", k))
    return out


@pytest.mark.parametrize("profile", PROFILES, ids=[p.stem for p in PROFILES])
def test_a_profile_has_every_param_its_stages_depend_on(profile):
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    params = yaml.safe_load(profile.read_text())
    needed = stage_params(dvc, params)
    assert any(s.startswith("transfer@") for s, _ in needed)  # every stage was expanded
    missing = []
    for stage, key in needed:
        try:
            _get(params, key)
        except KeyError:
            missing.append(f"{stage}: {key}")
    assert not missing, f"{profile.name} lacks DVC params: {missing}"
