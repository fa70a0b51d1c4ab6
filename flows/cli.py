"""`atlas`: the command line around the pipeline.

atlas run [dvc repro args]   the whole pipeline through Prefect + DVC (flows/pipeline.py)
atlas provenance RUN_ID      which data, code and params produced an MLflow run
atlas features TEXT --model M --hook H [--sae S] [--k 5]
                             which SAE features fire on each token of TEXT
atlas ui prefect             Prefect UI on http://127.0.0.1:<port> (runs, tasks, retries);
                             each checkout has its own port, 4201-4999, from its path
atlas ui mlflow              MLflow UI on http://127.0.0.1:5000 (params, metrics, figures)
                             (or, when PREFECT_API_URL / MLFLOW_TRACKING_URI point at a
                             running server, where that server's UI is)

Each works on the project it is run in: the nearest folder at or above the working
directory that has a dvc.yaml. `atlas run --help`, `atlas features --help`: their options.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from flows.common import (
    ONE_SHOT_TIMEOUT,
    NotAProjectError,
    checkout_port,
    health_ok,
    project_root,
    setup_env,
)


def _shared_server(which: str) -> tuple[str, str] | None:
    """(variable, UI address) of a shared server the environment points at, if any."""
    if which == "prefect":
        url = os.environ.get("PREFECT_API_URL", "").rstrip("/")
        return ("PREFECT_API_URL", url.removesuffix("/api")) if url else None
    from stages.tracking import is_tracking_server, tracking_uri

    url = tracking_uri().rstrip("/")
    return ("MLFLOW_TRACKING_URI", url) if is_tracking_server(url) else None


def _ui(which: str, port: int | None) -> int:
    explicit = "PREFECT_API_URL" in os.environ  # setup_env sets it for our own server
    setup_env()
    shared = None if port else _shared_server(which)
    if shared and which == "prefect" and not explicit:
        print(f"prefect UI on {shared[1]} (this checkout's server, already running)")
        return 0
    if shared:  # the environment names a running server: its UI is the one to open
        var, url = shared
        # one try, not a poll: 3 s, as for MLFLOW_TRACKING_URI below (a loaded machine's
        # server can take longer than health_ok's default 0.3 s, a polling interval, to answer)
        if not health_ok(url + ("/api" if which == "prefect" else ""), timeout=ONE_SHOT_TIMEOUT):
            print(f"error: {var} points at {url}, which does not answer; start that "
                  f"server or unset {var}", file=sys.stderr)  # fmt: skip
            return 1
        print(f"{which} UI on {url} (the server {var} points at)")
        return 0
    # a local server keeps its state in the project: .prefect/ (setup_env), ./mlflow.db
    os.chdir(project_root())
    from stages.tracking import tracking_uri  # (its import turns MLflow's telemetry off)

    env = dict(os.environ)
    if which == "prefect":
        port = port or checkout_port(Path(os.environ["PREFECT_HOME"]))
        cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
               "--port", str(port)]  # fmt: skip
        # The UI asks the server where its API is; `--port` alone leaves that answer at
        # Prefect's default port, so on any other port the UI could not reach its API.
        env.setdefault("PREFECT_UI_API_URL", f"http://127.0.0.1:{port}/api")
        where = f"http://127.0.0.1:{port}"
    else:
        port = port or 5000
        cmd = [sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", tracking_uri()]  # fmt: skip
        where = f"http://127.0.0.1:{port}/{_runs_page()}"
    print(f"{which} UI on {where} (Ctrl-C to stop)", flush=True)
    return serve(cmd, env)


def _runs_page() -> str:
    """The URL fragment of the experiment's runs table. MLflow 3's UI opens an experiment
    on its GenAI overview unless the link asks for the model-training view; opening the
    store also tags an older experiment with its kind (stages.tracking.EXPERIMENT_TAGS)."""
    from stages.tracking import EXPERIMENT, mlflow_configured, tracking_uri

    uri = tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).exists():
        return "#/experiments?workflowType=machine_learning"  # no runs yet; not made here
    exp = mlflow_configured().get_experiment_by_name(EXPERIMENT)
    return f"#/experiments/{exp.experiment_id}?workflowType=machine_learning"


def serve(cmd: list[str], env: dict[str, str], grace_s: float = 30) -> int:
    """Run a UI server until it exits, and stop it when this process is told to stop.

    The server runs in a process group of its own, which gets every SIGTERM, SIGINT
    (Ctrl-C) or SIGHUP this process gets, so its workers stop with it and free the port;
    what is still running `grace_s` after the first signal is killed."""
    proc = subprocess.Popen(cmd, env=env, process_group=0)
    stop_at: list[float] = []

    def forward(signum, _frame) -> None:
        stop_at.append(time.monotonic() + grace_s)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    stops = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    previous = {s: signal.signal(s, forward) for s in stops}
    try:
        while True:
            try:
                code = proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                if stop_at and time.monotonic() > stop_at[0]:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                continue
            # stopped when asked: a normal end; otherwise the server's own exit status
            return 0 if stop_at else (128 - code if code < 0 else code)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        with contextlib.suppress(ProcessLookupError):  # workers the server left behind
            os.killpg(proc.pid, signal.SIGTERM)


def _provenance(run_id: str) -> int:
    from stages.tracking import (
        TrackingStoreError,
        check_tracking_store,
        is_tracking_server,
        provenance,
        tracking_uri,
    )

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        os.chdir(project_root())  # the project's ./mlflow.db, where its stages log
    uri = tracking_uri()
    # Checked first because MLflow itself retries an absent server for over a minute,
    # silently, and creates a missing sqlite store (12 s) just to find no run in it.
    if is_tracking_server(uri) and not health_ok(uri.rstrip("/"), timeout=ONE_SHOT_TIMEOUT):
        print(f"error: MLFLOW_TRACKING_URI points at {uri}, which does not answer; start "
              "that server or unset MLFLOW_TRACKING_URI", file=sys.stderr)  # fmt: skip
        return 1
    db = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    if db is not None and not db.exists():
        print(f"error: no MLflow runs yet: {db} does not exist (`atlas run` creates it)",
              file=sys.stderr)  # fmt: skip
        return 1
    try:
        check_tracking_store(uri)
    except TrackingStoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        print(json.dumps(provenance(run_id), indent=2))
    except Exception as e:  # MLflow raises its own exception types
        msg = str(e)
        if getattr(e, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
            msg = (f"no such run in {uri}; run ids are in the MLflow UI (`atlas ui mlflow`: "
                   "each run's Overview, or the Run ID column)")  # fmt: skip
        print(f"error: run {run_id!r}: {msg}", file=sys.stderr)
        return 1
    return 0


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="atlas", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = ap.add_subparsers(dest="cmd", metavar="COMMAND")
    # run and features parse their own arguments (main hands them over): listed here only
    sub.add_parser("run", help="dvc repro through Prefect, with an MLflow parent run")
    sub.add_parser("features", help="which SAE features fire on each token of a text")
    p = sub.add_parser("provenance", help="which data, code and params produced an MLflow run")
    p.add_argument("run_id", help="an MLflow run id (`atlas ui mlflow` lists them)")
    u = sub.add_parser("ui", help="start the Prefect or MLflow UI on 127.0.0.1")
    u.add_argument("which", choices=["prefect", "mlflow"], help="which UI")
    u.add_argument(
        "--port", type=int, help="port (default: the checkout's own, for prefect; 5000, for mlflow)"
    )
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # `run` passes dvc repro's flags (-f, --dry) and `features` takes options before its
    # text: both get everything after their name, unseen by the parser here.
    if argv[:1] == ["run"]:
        from flows.pipeline import main as run_pipeline

        return run_pipeline(argv[1:])
    if argv[:1] == ["features"]:
        from flows.features import main as features

        return features(argv[1:], prog="atlas features")
    ap = _parser()
    a = ap.parse_args(argv)
    try:
        if a.cmd == "ui":
            return _ui(a.which, a.port)
        if a.cmd == "provenance":
            return _provenance(a.run_id)
    except NotAProjectError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    ap.print_help(sys.stderr)  # bare `atlas`
    return 2


if __name__ == "__main__":
    sys.exit(main())
