"""Run the whole DVC pipeline from Prefect, so a run started here still goes through DVC.

    python -m flows.pipeline                 # dvc repro (everything that changed)
    python -m flows.pipeline lm@toy-a -f     # targets and `dvc repro` flags pass through
    python -m flows.pipeline serve           # a deployment the Prefect UI can trigger

It runs `dvc repro` in the project the command is started in (the nearest folder with a
dvc.yaml at or above the working directory), and says which.

What it adds to a plain `dvc repro`:
- one Prefect server for the whole run (started on 127.0.0.1 if none answers, stopped
  afterwards), so each stage's flow costs ~1 s instead of ~10 s of server start-up;
- one MLflow parent run, passed to every stage through FEATURE_ATLAS_PARENT_RUN_ID;
- the `dvc repro` output streamed into the Prefect flow run's logs;
- with no targets, two stages at a time on a machine with two cores or more
  (`-j N` sets how many, `-j 1` is one plain `dvc repro`): the stale stages, each a
  Prefect task running `dvc repro --single-item` once what it depends on has finished
  (flows/parallel.py), on `cores // N` torch threads each (`--threads T` to choose).
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from flows.common import ONE_SHOT_TIMEOUT, checkout_port, health_ok, project_root, setup_env

setup_env()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402
from prefect.exceptions import FailedRun  # noqa: E402
from prefect.states import Failed, State  # noqa: E402
from prefect.task_runners import ThreadPoolTaskRunner  # noqa: E402

from flows.parallel import (  # noqa: E402
    Relay,
    default_jobs,
    last_state,
    plan,
    run_plan,
    run_stage,
    threads_per_job,
)

_RELAY: Relay | None = None  # the parallel run's output relay (one run per process)

USAGE = """usage: atlas run [-j N] [--threads T] [dvc repro args]
       (or: python -m flows.pipeline ...)

`dvc repro` of this project through Prefect, with one MLflow parent run. Targets and
flags pass to `dvc repro` unchanged (e.g. `atlas run lm@toy-a -f`, `atlas run --dry`);
see `dvc repro --help` for them. With none, the stale stages run N at a time (default 2
on a machine with two cores or more; `-j 1`: one `dvc repro`), each on T torch threads
(default cores // N). `atlas run serve`: a deployment the Prefect UI can trigger (needs
`atlas ui prefect` running)."""


@contextlib.contextmanager
def prefect_server(port: int | None = None) -> Iterator[str]:
    """Yield an API URL: the configured server or this checkout's own running one
    (setup_env found it), or one started for the run: on the checkout's port, or on a
    free one when something else holds that."""
    if os.environ.get("PREFECT_API_URL"):
        yield os.environ["PREFECT_API_URL"]
        return
    if port is None:
        port = checkout_port(Path(os.environ["PREFECT_HOME"]))
        # something answers on the checkout's port, yet setup_env found no server of ours
        if health_ok(f"http://127.0.0.1:{port}/api", timeout=ONE_SHOT_TIMEOUT):
            port = _free_port()
    url = f"http://127.0.0.1:{port}/api"
    log = Path(os.environ["PREFECT_HOME"]) / "server.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
             "--port", str(port)],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            # its UI finds its API on this port (`--port` alone leaves it at Prefect's 4200)
            env={"PREFECT_UI_API_URL": url, **os.environ},
            preexec_fn=_die_with_parent(),
        )  # fmt: skip
    try:
        deadline = time.time() + 60
        while not health_ok(url):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"Prefect server did not start; see {log}")
            time.sleep(0.25)
        os.environ["PREFECT_API_URL"] = url
        yield url
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        if proc.poll() is None:
            proc.kill()


def _die_with_parent():
    """A preexec_fn (Linux) that has the server sent SIGTERM when `atlas run` dies. A
    SIGTERM to `atlas run` ends it inside Prefect's own handler, and a kill -9 ends it at
    once: neither runs the `finally` that stops the server, which stayed behind. libc is
    loaded here, in the parent: the child runs only the call (nothing that takes a lock)."""
    import ctypes
    import signal

    try:
        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux / glibc: the finally alone, as before
        return None
    return lambda: prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@task(name="stage", task_run_name="{name}", cache_policy=NO_CACHE)
def stage(name: str, env: dict, force: bool = False) -> int:
    """One stage through `dvc repro --single-item` (flows/parallel.py); its exit code."""
    return run_stage(name, env, _RELAY, force)


@flow(name="pipeline")
def pipeline(args: list[str] | None = None, jobs: int = 1, threads: int | None = None,
             force: bool = False) -> int | State:  # fmt: skip
    """`dvc repro <args>` in the working directory, with a parent MLflow run, or with
    `jobs` > 1 (and no args) the stale stages (all of them with `force`) `jobs` at a
    time; returns 0, or a Failed state naming DVC's exit code or the failed stages."""
    # stages.tracking first: it configures MLflow (telemetry off) before its import
    from stages.tracking import (
        EXPERIMENT,
        close_stale_runs,
        git_tags,
        mlflow_configured,
        process_tags,
    )

    logger = get_run_logger()
    ml = mlflow_configured()
    close_stale_runs(ml)
    exp = ml.get_experiment_by_name(EXPERIMENT)
    parent = ml.MlflowClient().create_run(
        exp.experiment_id,
        run_name=f"pipeline {time.strftime('%Y-%m-%d %H:%M:%S')}",
        tags={
            "atlas.kind": "pipeline",
            **git_tags(),
            "dvc.args": " ".join(args or []),
            **process_tags(),
        },  # fmt: skip
    )
    run_id = parent.info.run_id
    # Stage commands say `python -m flows.x`: make that this environment's python even
    # when the venv is not activated (e.g. `.venv/bin/atlas run`).
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    env = {**os.environ, "FEATURE_ATLAS_PARENT_RUN_ID": run_id, "PATH": path}
    if threads and jobs == 1:
        env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    if jobs > 1:
        code, message = _parallel(logger, ml, run_id, env, jobs, threads, force)
    else:
        code, message = _sequential(logger, ml, run_id, env, args or []), None
    status = "FINISHED" if code == 0 else "FAILED"
    client = ml.MlflowClient()
    client.log_metric(run_id, "wall_s", time.perf_counter() - t0)
    client.set_terminated(run_id, status)
    if code:
        # DVC has printed why. A failed state rather than an exception: the run still
        # shows as failed in Prefect, without a traceback that buries DVC's message.
        return Failed(message=message or f"dvc repro exited with {code}")
    return code


def _sequential(logger, ml, run_id: str, env: dict, args: list[str]) -> int:
    cmd = [sys.executable, "-m", "dvc", "repro", *args]
    logger.info("running %s (MLflow parent run %s)", " ".join(cmd), run_id)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert proc.stdout is not None
    try:
        relay(proc.stdout.fileno(), _api_only(logger))
        return proc.wait()
    except KeyboardInterrupt:  # Ctrl-C reached dvc and its stage too: let them stop
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        ml.MlflowClient().set_terminated(run_id, "KILLED")
        raise


def _parallel(logger, ml, run_id: str, env: dict, jobs: int, threads: int | None,
              force: bool) -> tuple[int, str | None]:  # fmt: skip
    global _RELAY
    from dvc.exceptions import DvcException

    try:
        p = plan(Path.cwd(), force=force)
    except (DvcException, ValueError) as e:  # e.g. not a DVC repository, a broken dvc.yaml
        print(f"ERROR: {e}", flush=True)
        return 1, f"dvc status: {e}"
    if not p.order:
        print("Data and pipelines are up to date.", flush=True)
        return 0, None
    threads = threads or threads_per_job(jobs)
    logger.info("running %d stages %d at a time, %d torch thread(s) each (MLflow "
                "parent run %s): %s", len(p.order), jobs, threads, run_id,
                ", ".join(p.order))  # fmt: skip
    _RELAY = Relay(_api_only(logger))
    try:
        failed = run_plan(p, lambda name, e: stage.submit(name, e, force), env, threads, jobs,
                          _RELAY)  # fmt: skip
    except KeyboardInterrupt:
        ml.MlflowClient().set_terminated(run_id, "KILLED")
        raise
    if failed:
        return 1, f"stage(s) failed: {', '.join(failed)}"
    return 0, None


def _api_only(run_logger):
    """`run_logger` (the flow run's) writing to the Prefect API only. The console already
    shows `dvc repro`'s output as it streams; the run logger also prints to it, which
    printed every line twice."""
    from prefect.logging.handlers import APILogHandler
    from prefect.logging.loggers import PrefectLogAdapter

    logger = logging.getLogger("flows.pipeline.dvc_output")
    logger.setLevel(logging.INFO)
    logger.propagate = False  # not to the root logger, where Prefect's console handler is
    if not any(isinstance(h, APILogHandler) for h in logger.handlers):
        logger.addHandler(APILogHandler())
    return PrefectLogAdapter(logger, extra=dict(run_logger.extra))


def relay(fd: int, logger, out: BinaryIO | None = None) -> None:
    """Copy the bytes of `fd` to `out` (stdout) as they come, and log each finished line.

    Bytes, not text lines: a progress bar redraws itself with carriage returns, which a
    text-mode reader turns into one new line per redraw. A line holding redraws is logged
    as its last state (the bar when it finished)."""
    if out is None:
        sys.stdout.flush()  # what was printed before goes first
        out = sys.stdout.buffer
    pending = b""
    while chunk := os.read(fd, 65536):
        out.write(chunk)
        out.flush()
        *lines, pending = (pending + chunk).split(b"\n")
        for raw in lines:
            _log_line(logger, raw)
        pending = pending[max(pending.rfind(b"\r"), 0) :]  # a bar's last redraw is enough
    _log_line(logger, pending)


def _log_line(logger, raw: bytes) -> None:
    if (line := last_state(raw)) is not None:
        logger.info(line)


def _drain_prefect() -> None:
    """Send pending logs and events before the server stops; otherwise the process
    hangs at exit retrying against a server that is gone."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogHandler

    with contextlib.suppress(Exception):
        APILogHandler.flush()
    with contextlib.suppress(Exception):
        EventsWorker.drain_all()


def parse_jobs(argv: list[str]) -> tuple[int, int | None, bool, list[str]]:
    """(jobs, threads, force, the rest) from `-j N` / `--jobs N`, `--threads T` and
    `-f` / `--force` in `argv`. Without -j: two jobs on two cores or more when nothing
    but -f is asked for; any other dvc repro targets or flags (`lm@toy-a -f`) mean one
    plain `dvc repro` (with -f passed on)."""
    rest, jobs, threads, force = [], None, None, False
    it = iter(argv)
    for a in it:
        key, _, value = a.partition("=")
        if key in ("-j", "--jobs", "--threads"):
            value = value or next(it, "")
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"atlas run {key} {value!r}: expected an integer >= 1")
            if key == "--threads":
                threads = int(value)
            else:
                jobs = int(value)
        elif a in ("-f", "--force"):
            force = True
        else:
            rest.append(a)
    if rest and jobs not in (None, 1):
        raise ValueError(f"atlas run -j {jobs} runs the whole pipeline; with dvc repro "
                         f"arguments ({' '.join(rest)}) use -j 1")  # fmt: skip
    if jobs is None:
        jobs = 1 if rest else default_jobs()
    if force and jobs == 1:
        rest.append("--force")
    return jobs, threads, force and jobs > 1, rest


def main(argv: list[str]) -> int:
    if {"-h", "--help"} & set(argv):  # not worth a Prefect server and an MLflow run
        print(USAGE)
        return 0
    try:
        jobs, threads, force, argv = parse_jobs(argv)
        root = project_root()
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    # The project's folder for everything: dvc repro (which runs the stages there), the
    # MLflow store (./mlflow.db) and the git commit the parent run records.
    os.chdir(root)
    if argv[:1] == ["serve"]:
        if not os.environ.get("PREFECT_API_URL"):
            print("error: serve needs a running Prefect server: start `atlas ui prefect` first",
                  file=sys.stderr)  # fmt: skip
            return 2
        # Keeps running: the Prefect UI's "Run" button on deployment 'dvc-repro'
        # triggers a full `dvc repro` through this same flow.
        pipeline.serve(name="dvc-repro")
        return 0
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from stages.tracking import TrackingStoreError, check_tracking_store

    try:  # before dvc repro removes any stage's outputs
        check_tracking_store()
    except TrackingStoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"atlas run: dvc repro in {root}", flush=True)
    # Prefect read its settings at import; point this process at the server too.
    with prefect_server() as url, temporary_settings(updates={PREFECT_API_URL: url}):
        try:
            flow_run = pipeline
            if jobs > 1:
                flow_run = pipeline.with_options(task_runner=ThreadPoolTaskRunner(max_workers=jobs))
            flow_run(argv, jobs=jobs, threads=threads, force=force)
        except (FailedRun, RuntimeError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("interrupted: atlas run stopped by Ctrl-C", file=sys.stderr)
            return 130
        finally:
            _drain_prefect()
    print(
        "\nDone. Runs: `atlas ui mlflow` (MLflow) and `atlas ui prefect` (Prefect); "
        "`atlas provenance <run-id>` tells what produced a run."
    )
    report = root / "reports" / "index.html"  # the report stage's output (dvc.yaml)
    if report.is_file():
        print(f"Report: {report.as_uri()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
