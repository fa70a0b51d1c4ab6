"""Real shared servers, as README "Scaling out / shared servers" starts them: an MLflow
tracking server (sqlite backend, artifacts served through it) and a Prefect server,
each on a free 127.0.0.1 port with its state in a temporary folder."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator

import pytest

from tests._servers import free_port, server


@pytest.fixture(scope="module")  # stopped once its tests are done
def mlflow_server(tmp_path_factory) -> Iterator[dict]:
    """`mlflow server` with a sqlite database; clients upload artifacts through it."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "mlflow", "server",
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
           "--serve-artifacts", "--artifacts-destination", str(root / "artifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    with server(cmd, f"{url}/health", root / "server.log"):
        yield {"url": url, "artifacts": root / "artifacts"}


@pytest.fixture(scope="module")  # stopped once its tests are done
def prefect_server(tmp_path_factory) -> Iterator[dict]:
    """`prefect server start` with its own PREFECT_HOME (database and settings)."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
           "--port", str(port)]  # fmt: skip
    with server(cmd, f"{url}/health", home / "server.log", env=env):
        yield {"url": url, "home": str(home)}
