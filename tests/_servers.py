"""Start and stop real servers (MLflow, Prefect) on free loopback ports for tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def answers(url: str, timeout: float = 0.5) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def server(cmd: list[str], health_url: str, log: Path, env: dict | None = None,
           timeout: float = 120) -> Iterator[subprocess.Popen]:  # fmt: skip
    """Run `cmd` until `health_url` answers 200; stop it (and its workers) afterwards.

    The server gets its own process group, so the workers it forks stop with it.
    """
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + timeout
        while not answers(health_url):
            if proc.poll() is not None or time.time() > deadline:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{cmd[:4]} did not answer on {health_url}; log:\n{tail}")
            time.sleep(0.25)
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@contextlib.contextmanager
def dask_cluster(n_workers: int, cwd: Path, env: dict, log_dir: Path) -> Iterator[str]:
    """A Dask scheduler and `n_workers` one-thread worker processes started from the
    command line, as on a real cluster (`dask scheduler`, `dask worker ADDRESS`), all on
    127.0.0.1, the workers in `cwd` with `env`; yields the scheduler's address once every
    worker has joined."""
    from distributed import Client

    port, http = free_port(), free_port()
    address = f"tcp://127.0.0.1:{port}"
    scheduler = ["dask", "scheduler", "--host", "127.0.0.1", "--port", str(port),
                 "--dashboard-address", f"127.0.0.1:{http}"]  # fmt: skip
    with server(scheduler, f"http://127.0.0.1:{http}/health", log_dir / "scheduler.log",
                env=env, timeout=120):  # fmt: skip
        workers = ["dask", "worker", address, "--nworkers", str(n_workers), "--nthreads", "1",
                   "--host", "127.0.0.1", "--no-dashboard",
                   "--local-directory", str(log_dir / "dask-workers")]  # fmt: skip
        with open(log_dir / "workers.log", "ab") as out:
            proc = subprocess.Popen(workers, cwd=cwd, env=env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        try:
            with Client(address, timeout=60) as client:
                client.wait_for_workers(n_workers, timeout=180)
            yield address
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
