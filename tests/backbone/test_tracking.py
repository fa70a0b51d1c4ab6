"""What a run records about the checkout it came from, on real git + DVC projects and a
real MLflow store: the commit is '-dirty' only for changes outside the pipeline's own
outputs, the files that made it dirty are tagged, and the experiment has its kind."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

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
    tracking._mlflow.cache_clear()
    try:
        with tracking.stage_run("train@a", {"lr": 0.1}, {}) as run:
            pass
        ml = tracking._mlflow()
        tags = ml.MlflowClient().get_run(run.run_id).data.tags
        exp = ml.get_experiment_by_name(tracking.EXPERIMENT)
    finally:
        tracking._mlflow.cache_clear()
    assert tags["git.commit"].endswith("-dirty") and tags["git.dirty_files"] == "code.py"
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
