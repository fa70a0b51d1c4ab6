"""`atlas`: which project it works on, how it hands arguments over, and how it fails.

The fast tests call `flows.cli.main` in this process, inside scratch projects (a folder
with dvc.yaml and params.yaml); the slow one runs the real commands against a Prefect
server.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.backbone.conftest import TINY, scratch_project

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _env(tmp_path, monkeypatch):
    # In this process, setup_env would adopt the checkout's own Prefect server (a user's
    # `atlas ui prefect`); an API URL of its own keeps these tests away from it.
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "unset")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A project folder (dvc.yaml, params.yaml, no outputs); the tests run in its sub/."""
    root = tmp_path / "p"
    (root / "sub").mkdir(parents=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "params.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    monkeypatch.chdir(root / "sub")
    return root


def atlas(*args: str) -> int:
    from flows.cli import main

    return main(list(args))


def test_project_root_is_the_nearest_folder_with_a_dvc_yaml(project, tmp_path):
    from flows.common import NotAProjectError, project_root

    assert project_root() == project  # from project/sub
    assert project_root(project / "sub") == project
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(NotAProjectError, match="elsewhere: no dvc.yaml.*Feature Atlas checkout"):
        project_root(tmp_path / "elsewhere")


def test_run_hands_dvc_repro_flags_over_and_runs_in_the_project(project, monkeypatch, capsys):
    import flows.pipeline

    seen = []
    monkeypatch.setattr(flows.pipeline, "pipeline",
                        lambda a, **kw: seen.append((Path.cwd(), a, kw)))  # fmt: skip
    assert atlas("run", "lm@tiny-a", "-f", "--dry") == 0
    one = {"jobs": 1, "threads": None, "force": False}  # targets: one plain dvc repro
    assert seen == [(project, ["lm@tiny-a", "--dry", "--force"], one)]
    assert f"atlas run: dvc repro in {project}" in capsys.readouterr().out
    assert atlas("run", "--help") == 0 and len(seen) == 1  # help starts nothing
    assert "usage: atlas run [-j N] [--threads T] [dvc repro args]" in capsys.readouterr().out
    assert atlas("run", "-j", "0") == 2 and len(seen) == 1
    assert "error: atlas run -j '0': expected an integer >= 1" in capsys.readouterr().err


def test_commands_outside_a_project_say_so(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    for cmd in (["run"], ["provenance", "abc"], ["features", "hi", "--model", "m", "--hook", "h"]):
        assert atlas(*cmd) == 2, cmd
        err = capsys.readouterr().err.strip()
        assert err == (
            f"error: {tmp_path}: no dvc.yaml there or in any folder above it; atlas must run "
            "inside a Feature Atlas checkout (the folder with dvc.yaml and params.yaml, or "
            "below it)"
        ), cmd


def test_ui_starts_its_server_in_the_project(project, monkeypatch):
    import flows.cli

    monkeypatch.delenv("PREFECT_HOME")  # setup_env's default is the one under test
    seen = []
    monkeypatch.setattr(flows.cli, "serve", lambda cmd, env: seen.append(
        (Path.cwd(), env["PREFECT_HOME"], cmd)) or 0)  # fmt: skip
    assert atlas("ui", "prefect", "--port", "45678") == 0
    assert atlas("ui", "mlflow", "--port", "45679") == 0
    (cwd, home, _), (_, _, mlflow) = seen
    assert (cwd, home) == (project, str(project / ".prefect"))
    assert mlflow[-1] == f"sqlite:///{project / 'mlflow.db'}"


def test_bare_atlas_prints_the_help(capsys):
    assert atlas() == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: atlas") and "provenance" in err and "required" not in err


def test_subcommand_help(project, capsys):
    with pytest.raises(SystemExit) as e:
        atlas("features", "--help")
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: atlas features")
    assert "--model MODEL" in out and "default: the project's data/" in out
    with pytest.raises(SystemExit):
        atlas("provenance", "--help")
    assert "an MLflow run id (`atlas ui mlflow` lists them)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        atlas("ui", "--help")
    assert "port (default: the checkout's own, for prefect; 5000, for mlflow)" in " ".join(
        capsys.readouterr().out.split()
    )


def test_features_names_the_models_params_define(project, capsys):
    # options before the text, as argparse allows in features' own parser
    assert atlas("features", "--model", "nosuch", "--hook", "blocks.0.hook_resid_post", "hi") == 2
    assert capsys.readouterr().err.strip() == (
        f"error: model 'nosuch' is not in {project / 'params.yaml'} (models there: tiny-a, "
        f"tiny-b); --model must name one of them ({project / 'data/models/nosuch'}: missing)"
    )
    assert atlas("features", "hi", "--model", "tiny-a", "--hook", "blocks.0.hook_resid_post") == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {project / 'data/models/tiny-a'}: missing; expected the lm stage's output for "
        "model 'tiny-a' (run `dvc repro saes@tiny-a`: this command needs the model's SAEs too)"
    )


def test_features_with_text_that_is_not_utf8_is_one_line(project):
    # bytes as a shell passes them (latin-1 'café'); the tokenizer raised a TypeError
    p = subprocess.run(
        [sys.executable, "-m", "flows.features", b"caf\xe9 au lait", "--model", "tiny-a",
         "--hook", "blocks.0.hook_resid_post"],
        cwd=project / "sub", capture_output=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert p.returncode == 2
    assert p.stderr.decode().strip() == (
        "error: the text is not valid UTF-8 (byte 0xe9 at character 3); expected UTF-8 text "
        "(e.g. `iconv -f latin1 -t utf-8`)"
    )


def test_provenance_fails_fast_when_the_tracking_server_does_not_answer(
    project, monkeypatch, capsys
):
    from tests._servers import free_port

    url = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    t0 = time.perf_counter()
    assert atlas("provenance", "abc") == 1
    assert time.perf_counter() - t0 < 5  # MLflow alone retried for over a minute
    assert capsys.readouterr().err.strip() == (
        f"error: MLFLOW_TRACKING_URI points at {url}, which does not answer; start that "
        "server or unset MLFLOW_TRACKING_URI"
    )


def test_provenance_without_a_store_creates_none(project, capsys):
    assert atlas("provenance", "abc") == 1
    db = project / "mlflow.db"
    assert capsys.readouterr().err.strip() == (
        f"error: no MLflow runs yet: {db} does not exist (`atlas run` creates it)"
    )
    assert not db.exists() and not (project / "sub/mlflow.db").exists()


@pytest.mark.slow
def test_failures_end_in_one_line_and_bugs_keep_their_traceback(prefect_api, tmp_path):
    """Real processes and a real Prefect server: `atlas run` where dvc repro fails, a user
    error in a stage's task, a bug in one, and provenance of an unknown run."""
    root = tmp_path / "p"
    env = scratch_project(root, TINY, prefect_api)
    env.pop("MLFLOW_TRACKING_URI")  # the project's ./mlflow.db, wherever atlas starts
    (sub := root / "data").mkdir(exist_ok=True)

    def run(*cmd: str, cwd: Path = sub) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, *cmd], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip

    # not a DVC repository (no `dvc init`): dvc repro fails and says why
    p = run("-m", "flows.cli", "run", "--dry")
    assert p.returncode == 1, p.stderr[-3000:]
    assert f"atlas run: dvc repro in {root}" in p.stdout
    assert "not inside of a DVC repository" in p.stdout
    assert p.stderr.strip().splitlines()[-1].startswith("error: dvc repro exited with ")
    assert "Traceback" not in p.stdout + p.stderr, p.stderr[-3000:]
    # the parent run went to the project's store
    assert (root / "mlflow.db").exists() and not (sub / "mlflow.db").exists()

    p = run("-m", "flows.cli", "provenance", "0123abcd")
    assert p.returncode == 1 and p.stderr.strip() == (
        f"error: run '0123abcd': no such run in sqlite:///{root / 'mlflow.db'}; run ids are in "
        "the MLflow UI (`atlas ui mlflow`: each run's Overview, or the Run ID column)"
    ), p.stderr[-3000:]

    stage = (
        "import sys\n"
        "from prefect import flow, task\n"
        "from flows.common import main\n"
        "@task\n"
        "def step():\n"
        "    raise {}\n"
        "@flow\n"
        "def stage():\n"
        "    step()\n"
        "main(stage, 'demo@tiny-a')\n"
    )
    p = run("-c", stage.format("FileNotFoundError('data/corpus: missing')"), cwd=root)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1] == "error: demo@tiny-a: data/corpus: missing"
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert "Task run failed with exception: FileNotFoundError" in p.stderr  # the log stays
    # a bug (main reports RuntimeError in one line too): Prefect's log keeps its traceback,
    # from the task run and again from the flow run
    p = run("-c", stage.format("RuntimeError('a bug')"), cwd=root)
    assert p.returncode == 1 and p.stderr.strip().endswith("error: demo@tiny-a: a bug")
    assert p.stderr.count("Traceback (most recent call last)") == 2, p.stderr[-3000:]
    assert "RuntimeError: a bug" in p.stderr


DEMO_STAGE = """\
import sys, time
from pathlib import Path
print("stage line {token}", flush=True)
for i in range(1, 4):  # a progress bar, as tqdm draws one on stderr
    sys.stderr.write(f"\\rbar {token} {{i}}/3")
    sys.stderr.flush()
    time.sleep(0.05)
sys.stderr.write("\\n")
Path("reports").mkdir(exist_ok=True)
Path("reports/index.html").write_text("<html>report</html>")
"""


def _flow_run_logs(api: str, flow: str, n_runs: int = 5) -> list[str]:
    """The log messages of the newest `n_runs` flow runs of `flow` on a Prefect server."""
    import json
    import urllib.request

    def post(path: str, body: dict) -> list:
        req = urllib.request.Request(f"{api}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.load(r)

    runs = post("/flow_runs/filter", {"flows": {"name": {"any_": [flow]}},
                                      "sort": "EXPECTED_START_TIME_DESC", "limit": n_runs})  # fmt: skip
    ids = [r["id"] for r in runs]
    logs = post("/logs/filter", {"logs": {"flow_run_id": {"any_": ids}}, "limit": 200})
    return [log["message"] for log in logs]


@pytest.mark.slow
def test_run_prints_each_line_once_and_ends_with_the_report(prefect_api, tmp_path):
    """`atlas run` on a one-stage project: each line of the stage's output reaches the
    console once (the Prefect flow run's log still gets it), a progress bar keeps its
    carriage returns, and the last line is the report's file:// URL."""
    import uuid

    token = uuid.uuid4().hex[:8]
    root = tmp_path / "p"
    root.mkdir()
    (root / "demo.py").write_text(DEMO_STAGE.format(token=token))
    (root / "dvc.yaml").write_text(
        "stages:\n  demo:\n    cmd: python demo.py\n    deps: [demo.py]\n    outs: [reports]\n"
    )
    (root / "params.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    env = scratch_project_env(root, prefect_api)
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, env=env,
                   check=True)  # fmt: skip
    # -j 1: one `dvc repro`, its output relayed as it comes (two at a time prefixes each
    # finished line with its stage instead: test_parallel.py)
    p = subprocess.run([sys.executable, "-m", "flows.cli", "run", "-j", "1"], cwd=root, env=env,
                       capture_output=True, text=False, timeout=300)  # fmt: skip
    out, err = p.stdout.decode(), p.stderr.decode()
    assert p.returncode == 0, (out + err)[-3000:]
    both = out + err
    assert both.count(f"stage line {token}") == 1, both[-3000:]
    assert both.count(f"bar {token} 3/3") == 1, both[-3000:]
    assert f"\rbar {token} 2/3\rbar {token} 3/3\n" in out  # redrawn in place, not 3 lines
    assert out.strip().splitlines()[-1] == f"Report: {(root / 'reports/index.html').as_uri()}"
    logged = _flow_run_logs(prefect_api["url"], "pipeline")
    assert f"stage line {token}" in logged and f"bar {token} 3/3" in logged, logged[:20]


def scratch_project_env(root: Path, prefect: dict) -> dict:
    """The environment of a project at `root` that runs this checkout's code."""
    import os

    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PREFECT_HOME": prefect["home"],
        "PREFECT_API_URL": prefect["url"],
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
