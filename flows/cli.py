"""`atlas`: the command line around the pipeline.

atlas run [dvc repro args]   the whole pipeline through Prefect + DVC (flows/pipeline.py)
atlas provenance RUN_ID      which data, code and params produced an MLflow run
atlas features TEXT --model M --hook H [--sae S] [--k 5]
                             which SAE features fire on each token of TEXT
atlas ui prefect             Prefect UI on http://127.0.0.1:4200 (runs, tasks, retries)
atlas ui mlflow              MLflow UI on http://127.0.0.1:5000 (params, metrics, figures)
                             (or, when PREFECT_API_URL / MLFLOW_TRACKING_URI point at a
                             running server, where that server's UI is)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from flows.common import DEFAULT_PREFECT_PORT, ROOT, prefect_server_up, setup_env


def _shared_server(which: str) -> tuple[str, str] | None:
    """(variable, UI address) of a shared server the environment points at, if any."""
    if which == "prefect":
        url = os.environ.get("PREFECT_API_URL", "").rstrip("/")
        return ("PREFECT_API_URL", url.removesuffix("/api")) if url else None
    from stages.tracking import is_tracking_server, tracking_uri

    url = tracking_uri().rstrip("/")
    return ("MLFLOW_TRACKING_URI", url) if is_tracking_server(url) else None


def _ui(which: str, port: int | None) -> int:
    setup_env()
    shared = None if port else _shared_server(which)
    if shared:  # the environment names a running server: its UI is the one to open
        var, url = shared
        if not prefect_server_up(url + ("/api" if which == "prefect" else "")):
            print(f"error: {var} points at {url}, which does not answer; start that "
                  f"server or unset {var}", file=sys.stderr)  # fmt: skip
            return 1
        print(f"{which} UI on {url} (the server {var} points at)")
        return 0
    if which == "prefect":
        port = port or DEFAULT_PREFECT_PORT
        cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
               "--port", str(port)]  # fmt: skip
    else:
        from stages.tracking import tracking_uri

        port = port or 5000
        cmd = [sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", tracking_uri()]  # fmt: skip
    print(f"{which} UI on http://127.0.0.1:{port} (Ctrl-C to stop)")
    return subprocess.call(cmd, cwd=ROOT, env=os.environ)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="atlas", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="dvc repro through Prefect, with an MLflow parent run")
    r.add_argument("args", nargs=argparse.REMAINDER)
    p = sub.add_parser("provenance", help="what produced an MLflow run")
    p.add_argument("run_id")
    u = sub.add_parser("ui", help="start the Prefect or MLflow UI on 127.0.0.1")
    u.add_argument("which", choices=["prefect", "mlflow"])
    u.add_argument("--port", type=int)
    f = sub.add_parser("features", help="which SAE features fire on each token of a text",
                       add_help=False)  # fmt: skip
    f.add_argument("args", nargs=argparse.REMAINDER)
    a = ap.parse_args(argv)
    if a.cmd == "features":
        from flows.features import main as features

        return features(a.args)
    if a.cmd == "run":
        from flows.pipeline import main as run_pipeline

        return run_pipeline(a.args)
    if a.cmd == "ui":
        return _ui(a.which, a.port)
    from stages.tracking import provenance

    try:
        print(json.dumps(provenance(a.run_id), indent=2))
    except Exception as e:  # MLflow raises its own exception types
        print(f"error: run {a.run_id!r}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
