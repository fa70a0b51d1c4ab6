"""What Prefect and MLflow cost per stage process, measured in fresh processes.

    python benchmarks/orchestration_overhead.py

Each figure is the wall time of a new Python process doing only that step, so it is
what every `python -m flows.<stage>` pays on top of its real work:
- import prefect / import mlflow;
- opening + closing one MLflow child run with params and an input hash (sqlite store);
- one Prefect flow with one task, against a running server and with Prefect's
  temporary per-process server (what plain `dvc repro` pays when no server is up).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

FLOW = """
import time; t0 = time.perf_counter()
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
@task(cache_policy=NO_CACHE)
def step(x): return x + 1
@flow(name="overhead-probe")
def probe(): return step(1)
probe()
print(time.perf_counter() - t0)
"""

TRACK = """
import time; t0 = time.perf_counter()
from pathlib import Path
from stages.tracking import stage_run
with stage_run("overhead-probe", {"a": 1, "b": "x"}, {"params": Path("params.yaml")}) as r:
    r.metrics({"m": 1.0})
print(time.perf_counter() - t0)
"""


def timed(code: str, env: dict, cwd: Path) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, check=True,
                   capture_output=True)  # fmt: skip
    return time.perf_counter() - t0


def best(code: str, env: dict, cwd: Path, n: int = 3) -> float:
    return min(timed(code, env, cwd) for _ in range(n))


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-orch-"))
    shutil.copy(ROOT / "params.yaml", work / "params.yaml")
    base = {**os.environ, "PYTHONPATH": str(ROOT), "PREFECT_HOME": str(work / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"}  # fmt: skip
    base.pop("PREFECT_API_URL", None)
    rows = [
        ("python -c pass", best("pass", base, work)),
        ("import prefect", best("import prefect", base, work)),
        ("import mlflow", best("import mlflow", base, work)),
        ("import transformer_lens", best("import transformer_lens", base, work)),
    ]
    timed(TRACK, base, work)  # creates the sqlite schema once
    rows.append(("MLflow child run (sqlite), whole process", best(TRACK, base, work)))
    rows.append(("Prefect flow, temporary server", best(FLOW, base, work, n=2)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
         "--port", str(port)], env=base, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        sys.path.insert(0, str(ROOT))
        from flows.common import health_ok

        url = f"http://127.0.0.1:{port}/api"
        t0 = time.perf_counter()
        while not health_ok(url):
            time.sleep(0.1)
        rows.append(("prefect server start (once per atlas run)", time.perf_counter() - t0))
        rows.append(
            ("Prefect flow, running server", best(FLOW, {**base, "PREFECT_API_URL": url}, work))
        )
    finally:
        server.terminate()
        server.wait()
        shutil.rmtree(work, ignore_errors=True)
    print(f"machine: {os.cpu_count()} cores; each figure: best wall time of a fresh process")
    for name, s in rows:
        print(f"  {name:45s} {s:6.2f} s")


if __name__ == "__main__":
    main()
