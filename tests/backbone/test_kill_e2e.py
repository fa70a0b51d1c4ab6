"""kill -9 part-way through `lm@M`, `steering@M` and `align@A__B`, then `dvc repro` again.

The reference is the session's uninterrupted run of the tiny pipeline (`tiny_pipeline`
in conftest.py, shared with test_pipeline_e2e.py). Each test copies it, starts `dvc repro -f -s <stage>`, waits until the stage has demonstrably begun its
real work, SIGKILLs dvc and every process under it, and checks

- while killed: none of the stage's output folders exists, and a later stage's loader
  refuses what is there (only temporaries: `.<name>.tmp-<pid>`, `<name>.partial`);
- then `dvc repro`, what a user types next: the stage's dvc.lock entry still matches, so
  DVC restores its last outputs from the cache; nothing runs, not even the report,
  whose dependencies (all of data/models, data/steering, ...) would change if the
  killed run's temporaries counted (.dvcignore);
- then `dvc repro -f -s <stage>`, the stage really run again (`lm@M` resumes from its
  last checkpoint, and says so; `steering@M` and `align@A__B` have none and start over): every DVC
  output's md5 in dvc.lock equals the uninterrupted run's, `dvc status` finds the whole
  pipeline up to date, and no temporary is left.

The reference run doubles as the check that a run reaches no other host: every Python
process of it (dvc and each stage) records any attempt to (_netaudit/sitecustomize.py).
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.backbone.conftest import copy_project, out_md5s
from tests.backbone.conftest import run as _run

# one xdist worker runs this module and the other that reads the session's tiny
# pipeline, so it is built once (tests/conftest.py, SHARED_PIPELINE)
pytestmark = pytest.mark.slow


def _attempts(net_log: Path) -> list[str]:
    return net_log.read_text().splitlines() if net_log.exists() else []


def _ran(out: str) -> list[str]:
    return [ln.split("'")[1] for ln in out.splitlines() if ln.startswith("Running stage")]


@pytest.fixture(scope="module")
def reference(tiny_pipeline):
    return tiny_pipeline


@pytest.fixture
def copy_of(reference, tmp_path):
    """A copy of the reference project (without its MLflow store), and its env."""
    root = tmp_path / "p"
    return root, copy_project(reference, root, tmp_path / "net.log", mlflow=False)


def _kill_part_way(root: Path, env: dict, stage: str, started: Callable[[str], bool],
                   log_path: Path, timeout: float = 600) -> None:  # fmt: skip
    """`dvc repro -f -s <stage>`; once `started(log text)` holds, SIGKILL dvc and every
    process under it (the stage's `python -m flows.<x>`)."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(["dvc", "repro", "-f", "-s", stage], cwd=root, env=env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline:
        if started(log_path.read_text(errors="replace")):
            break
        time.sleep(0.02)
    tail = log_path.read_text(errors="replace")[-3000:]
    assert proc.poll() is None, f"{stage} ended before it could be killed:\n{tail}"
    import psutil

    victims = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    module = "flows." + stage.split("@")[0]
    assert any(module in " ".join(v.cmdline()) for v in victims), [v.cmdline() for v in victims]
    for v in victims:
        with contextlib.suppress(psutil.NoSuchProcess):
            v.send_signal(signal.SIGKILL)
    proc.wait()
    psutil.wait_procs(victims, timeout=10)


def _check_killed_state(root: Path, lock: dict, stage: str) -> list[Path]:
    """None of the stage's output folders exists; returns what lies beside them."""
    beside = []
    for o in lock["stages"][stage]["outs"]:
        out = root / o["path"]
        if o["md5"].endswith(".dir"):
            assert not out.exists(), f"{out} exists after the stage was killed part-way"
        beside += [p for p in out.parent.iterdir() if p.name.startswith((f".{out.name}.",
                                                                          f"{out.name}."))]  # fmt: skip
    for p in beside:  # only temporaries, named as such
        assert re.fullmatch(r"\..+\.tmp-\d+|.+\.partial", p.name), p
    return beside


def _same_outputs_as(root: Path, reference: dict) -> None:
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    want = out_md5s(reference["lock"])
    differ = {k: (want.get(k), v) for k, v in out_md5s(lock).items() if want.get(k) != v}
    assert not differ, f"outputs differ from the uninterrupted run: {differ}"


def _restore_then_rerun(root: Path, env: dict, reference: dict, stage: str) -> str:
    """`dvc repro` (restores from the cache), then the stage forced to run again."""
    p = _run(["dvc", "repro"], root, env)
    assert _ran(p.stdout) == [], p.stdout[-3000:]
    assert f"Stage '{stage}' is cached - skipping run, checking out outputs" in p.stdout
    _same_outputs_as(root, reference)

    p = _run(["dvc", "repro", "-f", "-s", stage], root, env)
    assert _ran(p.stdout) == [stage]
    _same_outputs_as(root, reference)
    status = _run(["dvc", "status"], root, env).stdout
    assert "Data and pipelines are up to date" in status, status
    left = [p for p in (root / "data").rglob("*") if re.fullmatch(r"\..+\.(tmp|old)-\d+|.+\.partial", p.name)]  # fmt: skip
    assert not left, f"temporaries left behind: {left}"
    return p.stdout + p.stderr


def test_a_run_reaches_no_other_host(reference, tmp_path):
    """No process of a whole `dvc repro` (dvc, every stage) tried to reach a host other
    than this machine: no telemetry, no downloads (params name no hub source)."""
    assert not _attempts(reference["net_log"]), "\n".join(_attempts(reference["net_log"])[:20])
    # the recorder works: a lookup of another host from a process with this env is seen
    probe = tmp_path / "probe.log"
    code = "import socket, contextlib\nwith contextlib.suppress(OSError): socket.getaddrinfo('example.invalid', 80)"  # fmt: skip
    _run([sys.executable, "-c", code], reference["root"],
         {**reference["env"], "ATLAS_NET_LOG": str(probe)})  # fmt: skip
    assert "socket.getaddrinfo example.invalid" in probe.read_text()


def test_lm_killed_mid_training_resumes_and_matches(reference, copy_of, tmp_path):
    root, env = copy_of
    state = root / "data/models/tiny-a.partial/ckpt/state.json"

    def training_checkpointed(_log: str) -> bool:
        with contextlib.suppress(OSError, ValueError, KeyError):
            return json.loads(state.read_text())["step"] >= 50
        return False

    _kill_part_way(root, env, "lm@tiny-a", training_checkpointed, tmp_path / "killed.log")
    killed_at = json.loads(state.read_text())["step"]
    assert 50 <= killed_at < 151  # 75 000 tokens / (16 x 31 per step) = 151 steps
    beside = _check_killed_state(root, reference["lock"], "lm@tiny-a")
    assert root / "data/models/tiny-a.partial" in beside
    from stages.models import load_model

    with pytest.raises(FileNotFoundError):  # what activations@tiny-a would load
        load_model(root / "data/models/tiny-a")

    out = _restore_then_rerun(root, env, reference, "lm@tiny-a")
    # resumed: the log says so, and the progress bar starts at the checkpoint's step
    assert f"resuming LM training from step {killed_at}" in out, out[-3000:]
    shown = [int(n) for n in re.findall(r"lm train:\s+\d+%\|[^|]*\| (\d+)/151 ", out)]
    assert shown and shown[0] == killed_at and shown[-1] == 151, shown[:5]
    assert not _attempts(tmp_path / "net.log")


def test_steering_killed_mid_run_restarts_and_matches(reference, copy_of, tmp_path):
    root, env = copy_of
    parent = root / "data/steering"

    def concept_underway(_log: str) -> bool:
        # the output's temporary folder exists: model and cache are loaded and the
        # first concept's vectors, sweep and controls are being computed
        return any(parent.glob(".tiny-a.tmp-*"))

    _kill_part_way(root, env, "steering@tiny-a", concept_underway, tmp_path / "killed.log")
    beside = _check_killed_state(root, reference["lock"], "steering@tiny-a")
    assert any(p.name.startswith(".tiny-a.tmp-") for p in beside)
    from stages.steering import load_vector

    with pytest.raises(FileNotFoundError):  # what decompose@ and transfer@ would load
        load_vector(parent / "tiny-a/past_vs_present")

    # the forced re-run also removes the killed run's temporary folder
    _restore_then_rerun(root, env, reference, "steering@tiny-a")
    assert not _attempts(tmp_path / "net.log")


def test_align_killed_mid_run_restarts_and_matches(reference, copy_of, tmp_path):
    root, env = copy_of

    def correlating(log: str) -> bool:
        # the streamed pass over both caches has begun (its progress bar)
        return re.search(r"(^|[\r\n])align:\s+\d+%", log) is not None

    _kill_part_way(root, env, "align@tiny-a__tiny-b", correlating, tmp_path / "killed.log")
    _check_killed_state(root, reference["lock"], "align@tiny-a__tiny-b")
    assert not (root / "data/alignment/tiny-a__tiny-b/scores.json").exists()

    _restore_then_rerun(root, env, reference, "align@tiny-a__tiny-b")
    assert not _attempts(tmp_path / "net.log")
