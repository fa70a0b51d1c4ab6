"""What a run records about the checkout it came from, on real git + DVC projects and a
real MLflow store: the commit is '-dirty' only for changes outside the pipeline's own
outputs, the files that made it dirty are tagged, and the experiment has its kind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DVC_YAML = """\
stages:
  train:
    foreach: [a, b]
    do:
      cmd: python code.py ${item}
      deps:
        - code.py
      outs:
        - data/${item}
      metrics:
        - metrics/${item}.json:
            cache: false
      plots:
        - plots/${item}.json:
            cache: false
"""


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=root,
                   check=True, capture_output=True)  # fmt: skip


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A committed git + DVC project whose outputs a run has written and locked."""
    root = tmp_path / "p"
    (root / "sub").mkdir(parents=True)
    _git(root, "init", "-q")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    (root / "dvc.yaml").write_text(DVC_YAML)
    (root / "params.yaml").write_text("lr: 0.1\n")
    (root / "code.py").write_text("print('train')\n")
    for item in "ab":
        for d in ("metrics", "plots"):
            (root / d).mkdir(exist_ok=True)
            (root / d / f"{item}.json").write_text('{"loss": 1.0}\n')
    (root / "dvc.lock").write_text("schema: '2.0'\nstages: {}\n")
    (root / "data").mkdir()
    (root / "data/.gitignore").write_text("/a\n/b\n")
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "outputs")
    monkeypatch.chdir(root)
    return root


def test_changed_outputs_leave_the_commit_clean_and_code_changes_are_named(project):
    from stages.tracking import git_state, git_tags

    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True,
                         text=True, check=True).stdout.strip()  # fmt: skip
    assert git_state() == (sha, [])
    # what a run rewrites: the lock, DVC's uncached metrics and plots, its .gitignore files
    for f in ("dvc.lock", "metrics/a.json", "plots/b.json", "data/.gitignore"):
        (project / f).write_text((project / f).read_text() + "\n")
    (project / "notes.txt").write_text("untracked\n")
    assert git_state() == (sha, [])
    assert git_tags() == {"git.commit": sha}
    # what a person changes: code and params
    (project / "code.py").write_text("print('train harder')\n")
    (project / "params.yaml").write_text("lr: 0.2\n")
    assert git_state() == (f"{sha}-dirty", ["code.py", "params.yaml"])
    assert git_tags() == {"git.commit": f"{sha}-dirty", "git.dirty_files": "code.py params.yaml"}


def test_a_stage_run_records_why_it_is_dirty_and_the_experiment_its_kind(project, monkeypatch):
    from stages import tracking

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{project / 'mlflow.db'}")
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    (project / "metrics/a.json").write_text('{"loss": 0.5}\n')
    (project / "code.py").write_text("print('changed')\n")
    (project / "sub/x.py").write_text("")  # untracked
    tracking.mlflow_configured.cache_clear()
    try:
        with tracking.stage_run("train@a", {"lr": 0.1}, {}) as run:
            pass
        ml = tracking.mlflow_configured()
        tags = ml.MlflowClient().get_run(run.run_id).data.tags
        exp = ml.get_experiment_by_name(tracking.EXPERIMENT)
    finally:
        tracking.mlflow_configured.cache_clear()
    assert tags["git.commit"].endswith("-dirty") and tags["git.dirty_files"] == "code.py"
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"


def test_a_later_stage_of_a_run_sees_a_clean_commit(tmp_path):
    """The case of a clean clone: `dvc repro` where one stage rewrites a tracked metrics
    file before the next stage records the commit (inside the running repro, which holds
    DVC's lock)."""
    root = tmp_path / "r"
    root.mkdir()
    _git(root, "init", "-q")
    env = {**os.environ, "PYTHONPATH": str(REPO),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # fmt: skip
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True, env=env)
    (root / "metrics").mkdir()
    (root / "metrics/m.json").write_text('{"loss": 1.0}\n')
    (root / "one.py").write_text('open("metrics/m.json", "w").write(\'{"loss": 0.5}\\n\')\n')
    (root / "two.py").write_text(
        "import json\nfrom stages.tracking import git_commit\n"
        'json.dump(git_commit(), open("state.json", "w"))\n'
    )
    (root / "dvc.yaml").write_text(
        "stages:\n  one:\n    cmd: python one.py\n    metrics:\n      - metrics/m.json:\n"
        "          cache: false\n  two:\n    cmd: python two.py\n    deps:\n"
        "      - metrics/m.json\n    outs:\n      - state.json\n"
    )
    _git(root, "add", "-A")
    _git(root, "commit", "-qm", "pipeline")
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                         text=True, check=True).stdout.strip()  # fmt: skip
    p = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=root, env=env,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    assert json.loads((root / "state.json").read_text()) == sha  # not sha-dirty
