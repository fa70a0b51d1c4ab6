"""`atlas ui prefect|mlflow` as a researcher meets them: the real command on a port of
its own, the page it names opened in headless Chromium (as tests/report/test_browser.py
does for the report), and SIGTERM to the command, which must stop the server and free
its port. Both servers bind 127.0.0.1 and are stopped by the tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from tests._servers import answers, free_port
from tests.backbone.conftest import TINY
from tests.report.test_browser import _chromium

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser():
    exe = _chromium()
    if exe is None:
        pytest.skip("chromium is not installed (Debian package `chromium`: run `make browser`)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def project(tmp_path) -> tuple[Path, dict]:
    """A project folder and the environment `atlas` runs in there."""
    root = tmp_path / "p"
    root.mkdir()
    (root / "dvc.yaml").write_text("stages: {}\n")
    (root / "params.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}  # fmt: skip
    for var in ("PREFECT_API_URL", "PREFECT_UI_API_URL", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    return root, env


@contextlib.contextmanager
def atlas_ui(which: str, port: int, root: Path, env: dict, health: str):
    """`atlas ui <which> --port <port>` until its server answers `health`; yields the
    process and the address it printed. Whatever it started is gone afterwards."""
    log = root / f"atlas-ui-{which}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "ui", which, "--port",
                                 str(port)], cwd=root, env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 180
        while not answers(health):
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"atlas ui {which} did not answer on {health}:\n"
                                   f"{log.read_text(errors='replace')[-3000:]}")  # fmt: skip
            time.sleep(0.25)
        line = next(x for x in log.read_text().splitlines() if x.startswith(f"{which} UI on "))
        yield proc, line.removeprefix(f"{which} UI on ").split(" ")[0]
    finally:  # atlas's process group (start_new_session) and any group its server made
        groups = {proc.pid} | {p.pid for p in _tree(proc)}
        for pgid in groups:
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGKILL)
        proc.wait()


def _tree(proc: subprocess.Popen) -> list[psutil.Process]:
    """What `proc` started, recursively, as long as `proc` runs."""
    with contextlib.suppress(psutil.Error):
        return psutil.Process(proc.pid).children(recursive=True)
    return []


def port_free(port: int) -> bool:
    """True when a server could listen on 127.0.0.1:`port` now (as uvicorn binds it)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def stop_with_sigterm(proc: subprocess.Popen, port: int) -> None:
    """SIGTERM to the atlas process alone (as `kill PID` or a supervisor sends it): it
    returns 0 once its server, everything the server started and the port are free."""
    started = _tree(proc)
    assert started, "the server runs as a child process of atlas"
    t0 = time.perf_counter()
    os.kill(proc.pid, signal.SIGTERM)
    code = proc.wait(timeout=60)
    time.sleep(0.5)  # what the server's workers still had to do on their way out
    alive = [p for p in started if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"still running after SIGTERM to atlas: {[p.cmdline()[:4] for p in alive]}"
    assert port_free(port), f"port {port} still taken after SIGTERM to atlas"
    assert code == 0  # a requested stop is a normal end
    print(f"SIGTERM: {len(started)} processes stopped, port free in "
          f"{time.perf_counter() - t0:.1f} s")  # fmt: skip


def _page_text(browser, url: str, wait_for: str) -> str:
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        page.goto(url, wait_until="load")
        with contextlib.suppress(Exception):  # the assertion below says what was there
            page.wait_for_selector(f"text={wait_for}", timeout=90_000)
        return page.inner_text("body")
    finally:
        page.close()


def test_mlflow_ui_opens_on_the_runs_table_and_stops_on_sigterm(browser, project):
    from mlflow import MlflowClient

    root, env = project
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)  # an experiment made before it had a kind
    exp_id = client.create_experiment("feature-atlas", (root / "mlruns").as_uri())
    client.set_terminated(client.create_run(exp_id, run_name="saes@tiny-a").info.run_id)
    port = free_port()
    with atlas_ui("mlflow", port, root, env, f"http://127.0.0.1:{port}/health") as (proc, url):
        tags = client.get_experiment(exp_id).tags
        assert tags.get("mlflow.experimentKind") == "custom_model_development"
        assert url.startswith(f"http://127.0.0.1:{port}/#/experiments/{exp_id}"), url
        text = _page_text(browser, url, "saes@tiny-a")
        assert "saes@tiny-a" in text and "Run Name" in text, text[:1500]
        assert "Token Usage" not in text, text[:1500]  # not the GenAI overview
        stop_with_sigterm(proc, port)
    assert not answers(f"http://127.0.0.1:{port}/health")


FLOW = """\
from prefect import flow
@flow(name="ui-check")
def ui_check():
    return 1
ui_check()
"""


def test_prefect_ui_on_its_own_port_reaches_its_api_and_stops_on_sigterm(browser, project):
    root, env = project
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    with atlas_ui("prefect", port, root, env, f"{api}/health") as (proc, url):
        assert url == f"http://127.0.0.1:{port}"
        subprocess.run([sys.executable, "-c", FLOW], cwd=root, env={**env, "PREFECT_API_URL": api},
                       check=True, capture_output=True, timeout=300)  # fmt: skip
        text = _page_text(browser, f"{url}/runs", "ui-check")
        assert "Can't connect to Server API" not in text, text[:1500]
        assert "ui-check" in text, text[:1500]
        stop_with_sigterm(proc, port)
    assert not answers(f"{api}/health")
