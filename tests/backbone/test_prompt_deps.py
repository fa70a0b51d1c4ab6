"""Issue 20 item 7: a prompt set that params name must be a DVC dependency of the
steering stage, so that editing it makes `dvc status` report the stage stale. The stage
depends on data/prompts/ (dvc.yaml); params refuse a set anywhere else."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.config import ParamsError, parse_params

DVC = str(Path(sys.executable).parent / "dvc")
SET = "data/prompts/sentiment_actadd.jsonl"


def test_a_prompt_set_outside_data_prompts_is_refused(tmp_path):
    outside = tmp_path / "mine.jsonl"
    shutil.copy(SET, outside)  # an existing, valid set: only its place is wrong
    raw = yaml.safe_load(Path("params.yaml").read_text())
    for path in (str(outside), "data/prompts/../../mine.jsonl"):
        raw["steering"]["models"]["toy-a"]["sets"] = ["emotion_polarity", path]
        with pytest.raises(ParamsError) as e:
            parse_params(raw)
        assert str(e.value) == (
            f"params.yaml: steering.models.toy-a.sets[1] = {path!r}, expected a JSONL file under "
            "data/prompts/, the steering stage's DVC dependency (copy it there, so that "
            "`dvc status` sees it change)"
        )


def _dvc(cwd: Path, *args: str) -> str:
    # a scratch repo has no .dvc/config with analytics off: without this, `dvc init` and
    # `dvc commit` start DVC's analytics daemon, which tries to reach the network
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    r = subprocess.run([DVC, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                       env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_dvc_status_sees_an_edit_of_a_set_that_params_name(tmp_path):
    """Real DVC on this repository's dvc.yaml: commit the steering stage over stand-in
    inputs and outputs, edit the set file, and `dvc status` names data/prompts."""
    raw = yaml.safe_load(Path("params.yaml").read_text())
    raw["steering"]["models"]["toy-a"]["sets"] = ["emotion_polarity", SET]
    parse_params(raw)  # a set under data/prompts/ is accepted
    shutil.copy("dvc.yaml", tmp_path / "dvc.yaml")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "data" / "prompts").mkdir(parents=True)
    shutil.copy(SET, tmp_path / SET)
    stage = yaml.safe_load(Path("dvc.yaml").read_text())["stages"]["steering"]["do"]
    deps = [d.replace("${key}", "toy-a") for d in stage["deps"] if d != "data/prompts"]
    for d in deps:  # the project code it runs as it is; stand-ins for the data
        if d.split("/")[0] in ("stages", "flows"):
            (tmp_path / d).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(d, tmp_path / d)
        else:
            (tmp_path / d).mkdir(parents=True)
            (tmp_path / d / "x").write_text(d)
    for d in ("data/steering/toy-a", "data/decomposition/toy-a"):
        (tmp_path / d).mkdir(parents=True)
        (tmp_path / d / "x").write_text(d)
    (tmp_path / "metrics" / "steering").mkdir(parents=True)
    (tmp_path / "metrics" / "steering" / "toy-a.json").write_text("{}")
    _dvc(tmp_path, "init", "--no-scm", "-q")
    _dvc(tmp_path, "commit", "-f", "-q", "steering@toy-a")
    assert "up to date" in _dvc(tmp_path, "status", "steering@toy-a")
    with open(tmp_path / SET, "a") as f:
        f.write('{"positive": "Joy", "negative": "Grief"}\n')
    status = _dvc(tmp_path, "status", "steering@toy-a")
    assert "steering@toy-a" in status and "modified:" in status and "data/prompts" in status
