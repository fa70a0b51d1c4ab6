"""Safe defaults: servers on 127.0.0.1 only, no telemetry, weights never unpickled.

(That a whole run reaches no other host is checked end to end in test_kill_e2e.py.)
"""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# variables under which MLflow / Prefect / DVC mute telemetry: a fresh user shell has none
MUTING = ("PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "DVC_TEST", "DVC_NO_ANALYTICS",
          "DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY")  # fmt: skip


def _fresh_python(code: str, tmp_path: Path) -> str:
    base = {k: v for k, v in os.environ.items() if k not in MUTING and not k.startswith(
        ("PREFECT_", "MLFLOW_"))}  # fmt: skip
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       env={**base, "PYTHONPATH": str(REPO), "PREFECT_HOME": str(tmp_path)},
                       timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout


def test_atlas_ui_servers_listen_on_loopback_only_and_mlflow_sends_no_telemetry(tmp_path):
    """What `atlas ui prefect|mlflow` would start, captured in a fresh process."""
    code = (
        "import json, flows.cli as cli\n"
        "seen = []\n"
        "cli.serve = lambda cmd, env: seen.append([cmd, env.get("
        "'MLFLOW_DISABLE_TELEMETRY')]) or 0\n"
        "for which in ('prefect', 'mlflow'):\n"
        "    cli.main(['ui', which, '--port', '45678'])\n"
        "print(json.dumps(seen))\n"
    )
    out = _fresh_python(code, tmp_path)
    (prefect, _), (mlflow, telemetry) = json.loads(out.splitlines()[-1])
    for cmd in (prefect, mlflow):
        assert cmd[cmd.index("--host") + 1] == "127.0.0.1", cmd
        assert cmd[cmd.index("--port") + 1] == "45678"
    assert prefect[1:4] == ["-m", "prefect", "server"] and mlflow[1:4] == ["-m", "mlflow", "ui"]
    # the MLflow UI server (and the page it serves) fetch no telemetry config
    assert telemetry == "true"


def test_the_prefect_server_atlas_run_starts_listens_on_loopback_only(monkeypatch, tmp_path):
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    import flows.pipeline as pipeline

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    started = []

    class FakeServer:
        def __init__(self, cmd, **kw):
            started.append(cmd)

        def poll(self):
            return None

        def terminate(self):
            pass

        def wait(self, timeout=None):
            return 0

        def kill(self):
            pass

    monkeypatch.setattr(pipeline.subprocess, "Popen", FakeServer)
    monkeypatch.setattr(pipeline, "health_ok", lambda url: True)
    with pipeline.prefect_server(port=45679) as url:
        assert url == "http://127.0.0.1:45679/api"
    (cmd,) = started
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1" and "0.0.0.0" not in cmd


def test_stage_processes_run_mlflow_without_telemetry(tmp_path):
    """MLflow 3 starts a telemetry client at import (it fetches its config from
    mlflow-telemetry.io) unless disabled; importing stages.tracking first disables it."""
    code = (
        "import stages.tracking, mlflow\n"
        "from mlflow.telemetry.client import get_telemetry_client\n"
        "print(get_telemetry_client() is None)\n"
    )
    assert _fresh_python(code, tmp_path).splitlines()[-1] == "True"


class _Payload:
    """Unpickling this creates a file: proof that a loader ran pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("loader", ["load_safetensors", "load_vector", "load_sae"])
def test_weights_files_holding_pickle_are_refused_never_unpickled(tmp_path, loader):
    """A pickle (what torch.save writes) under a weights file name is refused with the
    file named, and its payload never runs."""
    import torch

    from stages.io import CorruptArtifactError

    marker = tmp_path / "payload-ran"
    folder = tmp_path / "artifact"
    folder.mkdir()
    if loader == "load_safetensors":
        from stages.io import load_safetensors as load

        path = folder / "model.safetensors"
        torch.save({"W": _Payload(marker)}, path)
        call = lambda: load(path)  # noqa: E731
    elif loader == "load_vector":
        from stages.steering import load_vector as load

        path = folder / "vector.safetensors"
        path.write_bytes(pickle.dumps({"blocks.0.hook_resid_post": _Payload(marker)}))
        (folder / "meta.json").write_text("{}")
        call = lambda: load(folder)  # noqa: E731
    else:
        from stages.sae import build_sae, load_sae, save_sae

        sae = build_sae({"architecture": "topk", "d_in": 4, "d_sae": 8, "k": 2,
                         "n_training_tokens": 4096})  # fmt: skip
        save_sae(folder, sae, hook_name="h")
        path = folder / "sae_weights.safetensors"
        torch.save({"W_enc": _Payload(marker)}, path)
        call = lambda: load_sae(folder)  # noqa: E731
    with pytest.raises(CorruptArtifactError, match=rf"^{path}: not a readable safetensors"):
        call()
    assert not marker.exists(), "a loader unpickled the file"
    # unpickled, the same bytes do run their payload: the check above can fail
    if path.read_bytes()[:2] == b"PK":  # torch.save's zip (a stream: torch.load reads a
        torch.load(io.BytesIO(path.read_bytes()), weights_only=False)  # *.safetensors name as one)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()
