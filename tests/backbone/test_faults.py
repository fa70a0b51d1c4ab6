"""Faults found by trying to break the pipeline (issue 20, items 8-11): runs stay in
their own checkout, nothing is left RUNNING, Ctrl-C and a broken MLflow database end in
one line. Real processes, a real Prefect server and real MLflow stores throughout."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.backbone.conftest import TINY

REPO = Path(__file__).resolve().parents[2]


def project(root: Path, **env: str) -> dict:
    """A project folder (this checkout's code on PYTHONPATH, tiny params, no outputs) and
    the environment of a process run in it: no Prefect or MLflow settings of the caller."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "params.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("PREFECT_", "MLFLOW_", "FEATURE_ATLAS_"))}  # fmt: skip
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**base, "PYTHONPATH": str(REPO), "PATH": path, **env}


def py(code_or_args: str | list[str], cwd: Path, env: dict, timeout: float = 300,
       **kw) -> subprocess.CompletedProcess:  # fmt: skip
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, **kw)  # fmt: skip


# ------------------------------------------------------------ 11: a broken mlflow.db


def broken_store(root: Path, env: dict) -> Path:
    """The project's real MLflow store (created by MLflow, one run logged), with one of
    its pages overwritten."""
    code = ("from stages.tracking import stage_run\n"
            "with stage_run('probe', {'a': 1}, {}) as r: r.metrics({'m': 1.0})\n")  # fmt: skip
    p = py(code, root, env)
    assert p.returncode == 0, p.stderr[-3000:]
    db = root / "mlflow.db"
    data = bytearray(db.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    assert len(data) > 4 * page
    data[3 * page : 3 * page + 64] = b"\xff" * 64
    db.write_bytes(bytes(data))
    return db


@pytest.mark.slow
def test_a_broken_mlflow_db_is_named_before_any_work(tmp_path):
    root = tmp_path / "p"
    env = project(root, PREFECT_API_URL="http://127.0.0.1:9/api",
                  PREFECT_HOME=str(tmp_path / "prefect"))  # fmt: skip
    db = broken_store(root, env)
    (root / "data/corpus").mkdir(parents=True)
    (root / "data/corpus/old.txt").write_text("the previous output")
    how = (f"; restore it from a backup, or move it aside to start a new one (`mv {db} "
           f"{db}.broken`; its runs stay in that file) and run again")  # fmt: skip

    p = py(["-m", "flows.cli", "provenance", "0123abcd"], root, env)
    assert p.returncode == 1
    [line] = p.stderr.strip().splitlines()
    assert line.startswith(f"error: {db}: the MLflow tracking database is broken (")
    assert line.endswith(how)

    p = py(["-m", "flows.corpus"], root, env)
    assert p.returncode == 1, p.stderr[-3000:]
    [line] = p.stderr.strip().splitlines()
    assert line.startswith(f"error: corpus: {db}: the MLflow tracking database is broken (")
    # nothing removed or written: the old output, and no new one beside it
    assert sorted(p.name for p in (root / "data").rglob("*")) == ["corpus", "old.txt"]
    assert not (root / "metrics").exists()

    # atlas run checks before dvc repro, which would remove the stages' outputs first
    p = py(["-m", "flows.cli", "run"], root, env)
    assert p.returncode == 1
    assert p.stderr.strip().splitlines() == [line.replace("error: corpus: ", "error: ")]
    assert "dvc repro in" not in p.stdout


# ------------------------------------------------------------ 9: runs left RUNNING


def runs(root: Path, env: dict) -> dict[str, tuple[str, str | None]]:
    """run name -> (status, parent run name) of every run in the project's store."""
    code = ("import json, mlflow\n"
            "from stages.tracking import EXPERIMENT, mlflow_configured\n"
            "ml = mlflow_configured(); exp = ml.get_experiment_by_name(EXPERIMENT)\n"
            "rs = ml.MlflowClient().search_runs([exp.experiment_id])\n"
            "names = {r.info.run_id: r.info.run_name for r in rs}\n"
            "print(json.dumps({r.info.run_name: [r.info.status, names.get("
            "r.data.tags.get('mlflow.parentRunId'))] for r in rs}))\n")  # fmt: skip
    p = py(code, root, env)
    assert p.returncode == 0, p.stderr[-3000:]
    return {k: tuple(v) for k, v in json.loads(p.stdout.strip().splitlines()[-1]).items()}


@pytest.mark.slow
def test_a_stage_run_whose_process_is_gone_is_marked_killed_by_the_next(tmp_path):
    root = tmp_path / "p"
    env = project(root)
    victim = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom stages.tracking import stage_run\n"
         "with stage_run('victim', {}, {}):\n    print('ready', flush=True); time.sleep(600)\n"],
        cwd=root, env=env, stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert victim.stdout.readline().strip() == "ready"
    finally:
        victim.kill()  # SIGKILL: nothing of it runs again
        victim.wait()
    assert runs(root, env) == {"victim": ("RUNNING", None)}
    p = py("from stages.tracking import stage_run\nwith stage_run('next', {}, {}): pass\n",
           root, env)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert runs(root, env) == {"victim": ("KILLED", None), "next": ("FINISHED", None)}


@pytest.mark.slow
def test_the_dvc_repro_parent_run_is_closed_when_dvc_ends(tmp_path):
    root = tmp_path / "p"
    env = project(root)
    (root / "probe.py").write_text(
        "import sys\nfrom pathlib import Path\nfrom stages.tracking import stage_run\n"
        "with stage_run(sys.argv[1], {}, {}):\n    Path(sys.argv[1] + '.txt').write_text('x')\n"
    )
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": {
        "one": {"cmd": "python probe.py one", "outs": ["one.txt"]},
        "two": {"cmd": "python probe.py two", "deps": ["one.txt"], "outs": ["two.txt"]}}}))  # fmt: skip
    assert py(["-m", "dvc", "init", "--no-scm", "-q"], root, env).returncode == 0
    p = subprocess.run(["dvc", "repro"], cwd=root, env=env, capture_output=True, text=True,
                       timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    deadline = time.time() + 120
    while (seen := runs(root, env)) and any(s == "RUNNING" for s, _ in seen.values()):
        if time.time() > deadline:
            break
        time.sleep(2)
    [parent] = [n for n in seen if n.startswith("dvc repro ")]
    assert seen == {parent: ("FINISHED", None), "one": ("FINISHED", parent),
                    "two": ("FINISHED", parent)}  # fmt: skip


# ------------------------------------------------------------ 10: Ctrl-C


def running(db: Path) -> bool:
    """Whether the MLflow store `db` holds a RUNNING run (read-only; False until MLflow
    has created it)."""
    import sqlite3

    if not db.exists():
        return False
    try:
        with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True)) as con:
            return bool(con.execute("select 1 from runs where status = 'RUNNING'").fetchall())
    except sqlite3.Error:
        return False


@pytest.mark.slow
def test_ctrl_c_stops_a_stage_at_once_with_one_line(tmp_path):
    """SIGINT to the stage's process group, as a terminal's Ctrl-C sends it (Prefect's
    temporary server, the stage's child, gets it too): the stage stopped only after a
    minute of retries against the dead server, with three tracebacks."""
    import signal

    root = tmp_path / "p"
    env = project(root, PREFECT_HOME=str(tmp_path / "prefect"))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["corpus"]["toy"]["n_docs"] = 200_000  # over a minute of work on this machine
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stage = subprocess.Popen([sys.executable, "-m", "flows.corpus"], cwd=root, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 240
        while not running(root / "mlflow.db") and time.time() < deadline:
            time.sleep(0.5)  # until the stage's MLflow run is open: the corpus is being built
        assert stage.poll() is None, stage.stdout.read()[-3000:]
        time.sleep(2)
        t0 = time.perf_counter()
        os.killpg(stage.pid, signal.SIGINT)
        out = stage.stdout.read()
        stage.wait(timeout=60)
        took = time.perf_counter() - t0
    finally:
        if stage.poll() is None:
            os.killpg(stage.pid, signal.SIGKILL)
            stage.wait()
    lines = [ln for ln in out.strip().splitlines() if " mlflow.store.db.utils: " not in ln]
    assert lines == ["interrupted: corpus stopped by Ctrl-C; no half-written output left"], out
    assert stage.returncode == 130
    assert took < 10
    assert not (root / "data").exists() or not any((root / "data").rglob("*"))
    assert runs(root, env) == {"corpus": ("KILLED", None)}


# ------------------------------------------------------------ 8: a checkout's own server


@pytest.mark.slow
def test_a_checkout_uses_its_own_prefect_server_and_no_other(tmp_path):
    """Another checkout's `atlas ui prefect` took every checkout's flow runs: a stage
    adopted any server answering on 4200. Now a checkout's server has a port of its own,
    and a server there counts only when its PREFECT_HOME is this checkout's .prefect/."""
    import sqlite3
    import urllib.request

    from flows.common import checkout_port
    from tests._servers import server

    b = tmp_path / "b"
    env = project(b)  # no PREFECT_* variables: the checkout decides
    port = checkout_port(b / ".prefect")
    assert 4201 <= port <= 4999 and port != checkout_port(tmp_path / "a/.prefect")
    url = f"http://127.0.0.1:{port}/api"
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
           "--port", str(port)]  # fmt: skip
    probe = ("import os\nfrom flows.common import setup_env\nsetup_env()\n"
             "print(os.environ.get('PREFECT_API_URL'))\n")  # fmt: skip
    a_env = {**env, "PREFECT_HOME": str(tmp_path / "a/.prefect")}
    (tmp_path / "a/.prefect").mkdir(parents=True)
    with server(cmd, f"{url}/health", tmp_path / "a.log", env=a_env):
        # another checkout's server on this checkout's port: not this checkout's
        p = py(probe, b, env)
        assert p.stdout.strip() == "None", p.stderr[-2000:]
        flow = probe + "from prefect import flow\nflow(name='probe')(lambda: 1)()\n"
        p = py(flow, b, env)
        assert p.returncode == 0, p.stderr[-3000:]
        req = urllib.request.Request(f"{url}/flow_runs/count", data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=10) as r:
            assert json.loads(r.read()) == 0  # none of b's runs went there
    with sqlite3.connect(b / ".prefect/prefect.db") as db:
        assert db.execute("select count(*) from flow_run").fetchone() == (1,)
    # this checkout's own server (`atlas ui prefect` here): used
    with server(cmd, f"{url}/health", tmp_path / "b.log", env={**env,
                "PREFECT_HOME": str(b / ".prefect")}):  # fmt: skip
        assert py(probe, b, env).stdout.strip() == url
        # and one PREFECT_API_URL names is used whatever it is
        other = {**env, "PREFECT_API_URL": "http://127.0.0.1:9/api"}
        assert py(probe, b, other).stdout.strip() == "http://127.0.0.1:9/api"
