"""`atlas run -j N` (flows/parallel.py): which stages it plans, in what order, and what a
run two at a time does, on real DVC projects whose stages are small shell commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from flows.parallel import Plan, plan, stage_command
from flows.pipeline import parse_jobs
from tests.backbone.conftest import TINY

REPO = Path(__file__).resolve().parents[2]

# a -> b, a -> c, (b, c) -> d; e alone. Each stage records when it started and ended.
STAGE = "python -c \"import sys,time; t=time.time(); time.sleep({sleep}); open('{out}','w').write(f'{{t}} {{time.time()}}'); sys.exit({code})\""
DVC_YAML = {
    "stages": {
        "a": {"cmd": STAGE.format(sleep=0, out="a.txt", code=0), "deps": ["in.txt"], "outs": ["a.txt"]},
        "b": {"cmd": STAGE.format(sleep=2, out="b.txt", code=0), "deps": ["a.txt"], "outs": ["b.txt"]},
        "c": {"cmd": STAGE.format(sleep=2, out="c.txt", code=0), "deps": ["a.txt", "c.in"],
              "outs": ["c.txt"]},
        "d": {"cmd": STAGE.format(sleep=0, out="d.txt", code=0), "deps": ["b.txt", "c.txt"],
              "outs": ["d.txt"]},
        "e": {"cmd": STAGE.format(sleep=0, out="e.txt", code=0), "deps": ["e.in"], "outs": ["e.txt"]},
    }
}  # fmt: skip


def _project(root: Path, env: dict | None = None) -> Path:
    root.mkdir(parents=True)
    (root / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    (root / "params.yaml").write_text(yaml.safe_dump(TINY, sort_keys=False))
    for f in ("in.txt", "c.in", "e.in"):
        (root / f).write_text("1\n")
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=root, env=env,
                   check=True)  # fmt: skip
    return root


def test_parse_jobs_defaults_flags_and_errors():
    from flows.parallel import default_jobs

    assert parse_jobs([]) == (default_jobs(), None, False, [])
    assert parse_jobs(["-j", "3", "--threads=1", "-f"]) == (3, 1, True, [])
    assert parse_jobs(["--jobs=1", "-f"]) == (1, None, False, ["--force"])
    # dvc repro targets or flags: one plain dvc repro, -f handed on
    assert parse_jobs(["lm@toy-a", "-f", "--dry"]) == (1, None, False, ["lm@toy-a", "--dry",
                                                                         "--force"])  # fmt: skip
    with pytest.raises(ValueError, match=r"atlas run -j 'two': expected an integer >= 1"):
        parse_jobs(["-j", "two"])
    with pytest.raises(ValueError, match=r"atlas run --threads '0': expected an integer >= 1"):
        parse_jobs(["--threads", "0"])
    with pytest.raises(ValueError, match=r"-j 2 runs the whole pipeline.*\(lm@toy-a\) use -j 1"):
        parse_jobs(["-j", "2", "lm@toy-a"])
    assert default_jobs(1) == 1 and default_jobs(2) == 2 and default_jobs(16) == 2


def test_ready_stages_wait_for_their_needs_and_the_heaviest_go_first():
    p = Plan(order=["a", "e", "b", "c", "d"], needs={"a": set(), "e": set(), "b": {"a"},
             "c": {"a"}, "d": {"b", "c"}}, weight={"a": 3, "e": 0, "b": 1, "c": 1, "d": 0})  # fmt: skip
    assert p.ready(set(), set()) == ["a", "e"]
    assert p.ready(set(), {"a"}) == ["e"]
    assert p.ready({"a"}, {"a", "e"}) == ["b", "c"]  # ties keep the topological order
    assert p.ready({"a", "b"}, {"a", "e", "b", "c"}) == []  # d waits for c
    assert stage_command("b", force=True)[-4:] == ["repro", "--single-item", "--force", "b"]


def test_plan_is_what_dvc_finds_stale_and_everything_downstream(tmp_path):
    root = _project(tmp_path / "p")
    p = plan(root)
    assert p.order[0] == "a" and set(p.order) == {"a", "b", "c", "d", "e"}
    assert p.needs["d"] == {"b", "c"} and p.needs["a"] == set()
    assert p.weight["a"] == 3 and p.weight["e"] == 0
    subprocess.run([sys.executable, "-m", "dvc", "repro", "-q"], cwd=root, check=True)
    assert plan(root).order == []
    (root / "c.in").write_text("2\n")  # c changes, and d reads c
    p = plan(root)
    assert p.order == ["c", "d"] and p.needs == {"c": set(), "d": {"c"}}
    assert plan(root, force=True).order[0] == "a" and len(plan(root, force=True).order) == 5


@pytest.mark.slow
def test_atlas_run_two_at_a_time_overlaps_writes_every_stage_and_stops_on_failure(
    prefect_api, tmp_path
):
    """Real DVC, Prefect and MLflow: b and c (2 s each) run side by side, dvc.lock holds
    all five stages and DVC finds nothing to do after; a failing stage fails the run with
    its name, and what depends on it does not start."""
    from tests.backbone.test_cli import scratch_project_env

    root = tmp_path / "p"
    env = scratch_project_env(root, prefect_api)
    _project(root, env)

    def atlas(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "flows.cli", "run", *args], cwd=root,
                              env=env, capture_output=True, text=True, timeout=300)  # fmt: skip

    r = atlas("-j", "2")
    said = r.stdout + r.stderr
    assert r.returncode == 0, said[-3000:]
    (b0, b1), (c0, c1) = (map(float, (root / f).read_text().split()) for f in ("b.txt", "c.txt"))
    assert b0 < c1 and c0 < b1, said[-3000:]  # the two overlapped
    assert "[b] Running stage 'b':" in said and "2 at a time, 1 torch thread(s) each" in said
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == {"a", "b", "c", "d", "e"}
    st = subprocess.run([sys.executable, "-m", "dvc", "status"], cwd=root, env=env,
                        capture_output=True, text=True)  # fmt: skip
    assert "Data and pipelines are up to date" in st.stdout, st.stdout
    assert "Data and pipelines are up to date." in atlas().stdout  # nothing stale: no stage

    spec = yaml.safe_load((root / "dvc.yaml").read_text())
    spec["stages"]["c"]["cmd"] = STAGE.format(sleep=0, out="c.txt", code=3)
    (root / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    r = atlas("-j", "2")
    said = r.stdout + r.stderr
    assert r.returncode == 1, said[-3000:]
    assert "exited with 3" in said and "[c] failed (exit code " in said, said[-3000:]
    assert "[atlas run] not started: d" in said, said[-3000:]
    assert r.stderr.strip().splitlines()[-1] == "error: stage(s) failed: c", r.stderr[-3000:]


@pytest.mark.slow
def test_atlas_runs_prefect_server_goes_when_atlas_run_is_killed(tmp_path):
    """kill -9 to `atlas run` itself (not its stages): the Prefect server it started for
    the run stops too (PR_SET_PDEATHSIG), instead of staying behind on its port."""
    import os
    import signal
    import time

    from flows.common import checkout_port, health_ok
    from tests.backbone.test_cli import scratch_project_env

    root = tmp_path / "p"
    env = scratch_project_env(root, {"home": str(tmp_path / "prefect"), "url": ""})
    env.pop("PREFECT_API_URL")  # atlas run starts its own server
    spec = yaml.safe_load(yaml.safe_dump(DVC_YAML))
    spec["stages"]["a"]["cmd"] = STAGE.format(sleep=120, out="a.txt", code=0)
    _project(root, env)
    (root / "dvc.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    url = f"http://127.0.0.1:{checkout_port(tmp_path / 'prefect')}/api"
    log = open(tmp_path / "run.log", "w")
    p = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "-j", "2"], cwd=root, env=env,
                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 180
        while "Running stage 'a'" not in (tmp_path / "run.log").read_text():
            assert p.poll() is None and time.time() < deadline, (tmp_path / "run.log").read_text()
            time.sleep(0.5)
        assert health_ok(url)
        p.kill()
        deadline = time.time() + 20
        while health_ok(url) and time.time() < deadline:
            time.sleep(0.5)
        assert not health_ok(url), "the Prefect server outlived atlas run"
    finally:
        os.killpg(p.pid, signal.SIGKILL)  # the stage it left running
