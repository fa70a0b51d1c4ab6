"""What every stage flow shares: environment, Prefect API choice, one-line errors.

Prefect without a server starts a temporary one in every process (8-15 s here). So a
stage uses, in order: `PREFECT_API_URL` if set; this checkout's own server (`atlas ui
prefect`, or the one `flows.pipeline` starts for a whole run), on the checkout's port and
answering with this checkout's `.prefect/` as its home; otherwise Prefect's temporary
server. All of them share one database under `.prefect/`, so every flow run shows in the
Prefect UI afterwards. Another checkout's server, or any other, is used only when
`PREFECT_API_URL` names it: a server on 4200 used to take every checkout's runs.

Commands work on the project they are run in (`project_root()`), not on the checkout
this code was installed from: one virtual environment serves every clone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

# The checkout this code is in (tests run from it). Not the project a command works on:
# with an editable install that is always the first clone. See project_root().
ROOT = Path(__file__).resolve().parent.parent
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FloatingPointError, IndexError)


class NotAProjectError(FileNotFoundError):
    """The command runs outside a Feature Atlas project (no dvc.yaml found)."""


def project_root(start: Path | None = None) -> Path:
    """The Feature Atlas project a command works on: the nearest folder at or above
    `start` (default: the working directory) that has a dvc.yaml, as `dvc` finds it."""
    start = (start or Path.cwd()).resolve()
    for folder in (start, *start.parents):
        if (folder / "dvc.yaml").is_file():
            return folder
    raise NotAProjectError(
        f"{start}: no dvc.yaml there or in any folder above it; atlas must run inside a "
        "Feature Atlas checkout (the folder with dvc.yaml and params.yaml, or below it)"
    )


def setup_env() -> None:
    """Environment for Prefect and MLflow; must run before either is imported."""
    try:
        home = project_root() / ".prefect"
    except NotAProjectError:  # the command that needs a project says so
        home = Path.cwd() / ".prefect"
    os.environ.setdefault("PREFECT_HOME", str(home))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "false")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # Prefect gives its temporary server 20 s to answer. The first one in a new
    # PREFECT_HOME creates and migrates the database first: 19.8 s on this idle 2-core
    # machine, so under any load a stage of a fresh checkout failed with "Timed out while
    # attempting to connect to ephemeral Prefect API server".
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if "PREFECT_API_URL" not in os.environ:
        url = own_prefect_url(Path(os.environ["PREFECT_HOME"]))
        if url is not None:
            os.environ["PREFECT_API_URL"] = url


def checkout_port(home: Path) -> int:
    """The port of a checkout's own Prefect server, 4201-4999, from its PREFECT_HOME's
    path: two checkouts on one machine get different ones (and neither gets Prefect's
    4200, which any stock `prefect server start` takes)."""
    digest = hashlib.sha256(str(Path(home).resolve()).encode()).digest()
    return 4201 + int.from_bytes(digest[:4], "big") % 799


def server_home(api_url: str, timeout: float = 2.0) -> Path | None:
    """The PREFECT_HOME of the Prefect server at `api_url` (it says so at
    /admin/settings), or None when none answers there, or it is not a Prefect server."""
    try:
        with urllib.request.urlopen(f"{api_url}/admin/settings", timeout=timeout) as r:
            home = json.loads(r.read()).get("home")
    except (OSError, ValueError, AttributeError):
        return None
    return Path(home).resolve() if isinstance(home, str) else None


def own_prefect_url(home: Path) -> str | None:
    """The API URL of this checkout's own server when it runs: on checkout_port(home),
    with `home` as its PREFECT_HOME. A server of another checkout there is not it."""
    url = f"http://127.0.0.1:{checkout_port(home)}/api"
    if not health_ok(url, timeout=ONE_SHOT_TIMEOUT):
        return None
    return url if server_home(url) == Path(home).resolve() else None


# a decision taken on one health check waits this long: a busy server (a stage's import
# storm on a 2-core machine) can take seconds to answer, and a slow answer read as "not
# running" would start a second server on its port; polls keep health_ok's short default
ONE_SHOT_TIMEOUT = 3.0


def health_ok(api_url: str, timeout: float = 0.3) -> bool:
    """True when `<api_url>/health` answers 200. Both servers have that route: a Prefect
    API (`.../api`) and an `mlflow server` (its root URL)."""
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


def with_runner(flow_obj, compute=None):
    """The flow with the task runner that params' `compute` section (plus the ATLAS_*
    environment overrides) asks for: Prefect's default thread pool, or a Dask cluster
    through prefect-dask (a local cluster on 127.0.0.1, or an existing scheduler)."""
    if compute is None:
        from stages.config import load_params

        compute = load_params().compute.with_env()
    if compute.runner != "dask":
        return flow_obj
    from prefect_dask import DaskTaskRunner

    flow_obj = importable(flow_obj)

    d = compute.dask
    if d.address:
        return flow_obj.with_options(task_runner=DaskTaskRunner(address=d.address))
    dask_flow = flow_obj.with_options(task_runner=DaskTaskRunner(cluster_kwargs={
        "n_workers": d.n_workers, "threads_per_worker": d.threads_per_worker,
        "processes": True, "host": "127.0.0.1", "dashboard_address": None}))  # fmt: skip

    def run(*args, **kwargs):
        from prefect.settings import PREFECT_API_URL, temporary_settings

        # the workers run their tasks in the flow's settings, so the flow gets the URL too
        with temporary_settings(updates={PREFECT_API_URL: share_temporary_server()}):
            return dask_flow(*args, **kwargs)

    return run


def importable(flow_obj):
    """The flow as its module's importable name defines it, when it was defined in
    `__main__` (a stage runs as `python -m flows.<stage>`).

    Dask pickles a task's function from `__main__` by value, but what that function
    calls from module scope (the workers' cached model loaders) by reference, as
    `__main__.<name>`. On the workers of an existing cluster `__main__` is `dask worker`,
    so every task failed there ("Can't get attribute '_worker_model' on <module
    '__main__'>"); a local cluster's workers re-run the main module, which hid it. From
    `flows.<stage>` every reference resolves on any worker that has this checkout."""
    fn = getattr(flow_obj, "fn", None)
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    if fn is None or fn.__module__ != "__main__" or spec is None:
        return flow_obj
    import importlib

    return getattr(importlib.import_module(spec.name), fn.__name__)


def share_temporary_server() -> str:
    """The Prefect API a flow and its local Dask workers report to: Prefect's
    `PREFECT_API_URL` setting when set (the variable, or the active Prefect profile's
    `prefect config set`), otherwise this process's temporary server, started now.
    Without it each worker process starts a temporary server of its own (~8 s each here,
    all on one database) for the task runs it executes."""
    from prefect.settings import PREFECT_API_URL

    if url := PREFECT_API_URL.value():
        return url
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the one this process's flow runs would start
    server.start()  # within PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS (setup_env)
    return server.api_url


def _device_key() -> str:
    """How an error names the device setting: the variable when it came from there."""
    return "ATLAS_DEVICE" if os.environ.get("ATLAS_DEVICE") else "params.yaml: compute.device"


def transient_only(task, task_run, state) -> bool:
    """Retry condition: retry I/O-ish failures, never bad input (it would fail again)."""
    try:
        state.result()
    except USER_ERRORS:
        return False
    except Exception:
        return True
    return False


class _QuietUserErrors(logging.Filter):
    """Drops the traceback Prefect logs with a failed flow or task run whose exception
    is a user error: main() ends those with one `error:` line, which a 20-70 line
    traceback above it only buries. Other exceptions are bugs and keep theirs."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], USER_ERRORS):
            record.exc_info = record.exc_text = None
        return True


def quiet_user_errors() -> None:
    """Install _QuietUserErrors where Prefect logs failed runs (once per process)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietUserErrors) for f in logger.filters):
            logger.addFilter(_QuietUserErrors())


def stop_on_ctrl_c(stage: str) -> None:
    """Ctrl-C stops the stage at once with one line and exit code 130.

    Python's KeyboardInterrupt reached Prefect, which reported the crash to its
    temporary server, killed by the same Ctrl-C: the stage went on for a minute of
    retries, then failed with three tracebacks. Instead the stage stops here, once no
    output is half-way through its rename: its temporary folders removed, its MLflow
    runs ended KILLED, its temporary Prefect server stopped. What it had already put in
    place is complete; resumable state (`<out>.partial/`) stays for the next run."""
    import signal

    def stop() -> None:
        from stages.io import TEMPORARIES
        from stages.tracking import end_live_runs

        print(f"interrupted: {stage} stopped by Ctrl-C; no half-written output left",
              file=sys.stderr, flush=True)  # fmt: skip
        for tmp in list(TEMPORARIES):
            shutil.rmtree(tmp, ignore_errors=True)
        end_live_runs("KILLED")
        with contextlib.suppress(Exception):
            from prefect.server.api.server import SubprocessASGIServer

            for server in list(SubprocessASGIServer._instances.values()):
                server.stop()
        os._exit(130)

    def handler(signum, frame) -> None:
        from stages.io import stop_when_consistent

        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C changes nothing
        stop_when_consistent(stop)

    signal.signal(signal.SIGINT, handler)


def main(run: Callable[[], object], stage: str) -> None:
    """Entry point of `python -m flows.<stage>`: validated params, then the flow.

    Bad params stop the stage with one line and exit code 2 before any work; other
    user-facing errors end with one `error:` line and exit code 1.
    """
    stop_on_ctrl_c(stage)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "alembic", "mlflow", "prefect", "distributed"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for ours in ("stages", "flows"):  # Prefect sets the root logger to WARNING in flows
        logging.getLogger(ours).setLevel(logging.INFO)
    from stages.compute import DeviceError, resolve_device
    from stages.config import ParamsError, load_params

    try:
        resolve_device(load_params().compute.with_env().device, _device_key())
    except (ParamsError, DeviceError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    from stages.tracking import TrackingStoreError, check_tracking_store

    try:  # before the stage writes anything: MLflow would fail only after its work
        check_tracking_store()
    except TrackingStoreError as e:
        print(f"error: {stage}: {e}", file=sys.stderr)
        sys.exit(1)
    setup_env()
    quiet_user_errors()
    t0 = time.perf_counter()
    try:
        run()
    except ParamsError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (*USER_ERRORS, RuntimeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {stage}: {msg}", file=sys.stderr)
        sys.exit(1)
    logging.getLogger("flows").info("%s finished in %.1f s", stage, time.perf_counter() - t0)
