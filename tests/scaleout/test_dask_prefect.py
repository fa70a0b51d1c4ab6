"""Dask workers report to the flow's Prefect API. With no server configured, Prefect
starts a temporary one per process, so without `flows.common.share_temporary_server`
each worker started its own (~8 s each, runs split over servers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flows.common import ROOT


@pytest.mark.slow
def test_local_dask_workers_share_the_flows_temporary_server(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    p = subprocess.run([sys.executable, "-m", "tests.scaleout._dask_flow"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    result = json.loads(next(ln for ln in p.stdout.splitlines() if ln.startswith("RESULT "))[7:])
    assert result["flow"].startswith("http://127.0.0.1:")
    pids = {pid for pid, _ in result["tasks"]}
    assert os.getpid() not in pids and len(result["tasks"]) == 4
    assert {url for _, url in result["tasks"]} == {result["flow"]}
    assert out.count("Starting temporary server") == 1, out[-3000:]


def test_an_api_url_from_the_prefect_profile_is_used_not_a_temporary_server(tmp_path):
    """`prefect config set PREFECT_API_URL=...` (the active profile, no variable) is the
    server the workers report to, as it is for the flow itself."""
    profiles = tmp_path / "profiles.toml"
    url = "http://127.0.0.1:4299/api"  # nothing needs to answer: no request is made
    profiles.write_text(f'active = "shared"\n[profiles.shared]\nPREFECT_API_URL = "{url}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect"), PREFECT_PROFILES_PATH=str(profiles))
    code = "from flows.common import share_temporary_server as s; print('URL', s())"
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
    assert f"URL {url}" in p.stdout.splitlines()
    assert "Starting temporary server" not in p.stdout + p.stderr
