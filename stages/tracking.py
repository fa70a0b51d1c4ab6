"""MLflow tracking and provenance: every stage run says exactly what produced it.

One experiment (`feature-atlas`). A parent run per pipeline invocation; a child run per
stage execution carrying flattened params, metrics, artifacts, the git commit, the DVC
stage name and the content hash of every input.

How a stage finds its parent run:
- `FEATURE_ATLAS_PARENT_RUN_ID` when set (flows/pipeline.py sets it);
- otherwise the `dvc repro` process that launched the stage is the invocation: its pid
  and start time key a parent run that the first stage creates and later stages reuse;
- run outside DVC, a stage's run has no parent.

Run ids never go into DVC outputs (they would break byte-identical reruns); they live
in MLflow, which links each run to its inputs' hashes.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stages.io import content_hash, uninterrupted

# MLflow 3 sends usage telemetry from every process that imports it (and fetches its
# telemetry config from mlflow-telemetry.io first) unless told not to. Nothing here
# reaches the network unless params name a hub model or dataset, so it is off by
# default; set MLFLOW_DISABLE_TELEMETRY=false to allow it. Must precede `import mlflow`.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

EXPERIMENT = "feature-atlas"
PARENT_ENV = "FEATURE_ATLAS_PARENT_RUN_ID"
INVOCATION_TAG = "atlas.invocation"
# MLflow 3's UI opens an experiment on the view its kind names: without it, the GenAI
# "Overview" (traces, token usage: all empty here); this kind opens the runs table.
EXPERIMENT_TAGS = {"mlflow.experimentKind": "custom_model_development"}


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set (a shared `mlflow server`, another database), else
    `./mlflow.db` in the working directory."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


class TrackingStoreError(RuntimeError):
    """The local MLflow database is unreadable; the message says which file and what to do."""


def check_tracking_store(uri: str | None = None) -> None:
    """Raise TrackingStoreError when the sqlite store `uri` (default: tracking_uri()) is
    there but broken. Checked before a stage removes or writes anything: MLflow itself
    fails on first use, tracebacks deep and without the file's name."""
    uri = uri or tracking_uri()
    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    if not db.is_file():
        return  # MLflow creates it
    import sqlite3

    problem = None
    try:
        with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True,
                                                timeout=60)) as con:  # fmt: skip
            found = [str(r[0]) for r in con.execute("PRAGMA quick_check(1)")]
            if found != ["ok"]:
                problem = " ".join(found).replace("*** in database main ***", "").strip()
    except sqlite3.OperationalError as e:
        if "locked" not in str(e):  # another stage writing is not a fault
            problem = str(e)
    except sqlite3.DatabaseError as e:  # "file is not a database", "disk image is malformed"
        problem = str(e)
    if problem is None:
        return
    cause = " ".join(problem.split())[:200]
    restore = (" (then `dvc checkout` restores any output DVC removed before this stage)"
               if _dvc_invocation() else "")  # fmt: skip
    raise TrackingStoreError(
        f"{db}: the MLflow tracking database is broken ({cause}); restore it from a backup, "
        f"or move it aside to start a new one (`mv {db} {db}.broken`; its runs stay in that "
        f"file) and run again{restore}"
    )


def is_tracking_server(uri: str) -> bool:
    """True for an `mlflow server` (http[s]://...), which stores artifacts itself."""
    return uri.startswith(("http://", "https://"))


@functools.cache
def mlflow_configured():
    """The `mlflow` module, pointed at this project's tracking store (checked first) with
    the `feature-atlas` experiment in place; once per process."""
    uri = tracking_uri()
    check_tracking_store(uri)
    with uninterrupted():  # Ctrl-C amid MLflow's migrations would leave a broken store
        return _setup_mlflow(uri)


def _setup_mlflow(uri: str):
    import mlflow

    mlflow.set_tracking_uri(uri)
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        # A tracking server chooses where artifacts go (with --serve-artifacts they are
        # uploaded through it, so no client needs the server's disk). A local store keeps
        # them beside the database, in ./mlruns, wherever the command runs from.
        local = None if is_tracking_server(uri) else (Path.cwd() / "mlruns").as_uri()
        with contextlib.suppress(Exception):  # another stage may create it concurrently
            mlflow.create_experiment(EXPERIMENT, artifact_location=local, tags=EXPERIMENT_TAGS)
    exp = mlflow.set_experiment(EXPERIMENT)
    for key, value in EXPERIMENT_TAGS.items():  # experiments created before the tags had none
        if exp.tags.get(key) != value:
            mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, key, value)
    return mlflow


def git_commit() -> str:
    """HEAD's commit, with '-dirty' when tracked files outside the pipeline's own outputs
    differ from it (see git_state)."""
    return git_state()[0]


def git_tags() -> dict[str, str]:
    """The MLflow tags of the checkout a run comes from: `git.commit`, and for a dirty
    one `git.dirty_files`, the changed files that make it dirty."""
    commit, dirty = git_state()
    return {"git.commit": commit, **({"git.dirty_files": _clip(" ".join(dirty))} if dirty else {})}


def git_state() -> tuple[str, list[str]]:
    """HEAD's commit ('-dirty' appended when the checkout is) and the tracked files that
    differ from it outside the pipeline's own outputs, relative to the repository root.

    A run rewrites tracked outputs itself (dvc.lock, the uncached metrics/ and plots/
    files DVC declares, the .gitignore files DVC keeps beside its outputs) before later
    stages record the commit; those say nothing about the code, so they do not count.
    Untracked files do not count either."""
    try:
        top = Path(_git("rev-parse", "--show-toplevel"))
        sha = _git("rev-parse", "HEAD")
        fields = _git("status", "--porcelain", "-z", "--untracked-files=no", cwd=top).split("\0")
    except (subprocess.CalledProcessError, FileNotFoundError):
        return "unknown", []
    changed, i = [], 0
    while i < len(fields):
        entry = fields[i]
        if len(entry) > 3:
            changed.append(entry[3:])
            i += 2 if "R" in entry[:2] or "C" in entry[:2] else 1  # then its source
        else:
            i += 1
    if not changed:
        return sha, []
    owned = _pipeline_outputs()
    dirty = [f for f in changed if not _owned(top / f, owned)]
    return sha + ("-dirty" if dirty else ""), dirty


def _git(*args: str, cwd: Path | None = None) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True,
                          cwd=cwd).stdout.strip("\n")  # fmt: skip


def _pipeline_outputs() -> tuple[set[Path], set[Path]]:
    """(outputs, .gitignore files DVC writes) of the DVC project in the working directory:
    every stage's outs, metrics and plots as DVC resolves them (foreach / matrix
    included), its dvc.lock files. Only dvc.lock when DVC cannot read the project."""
    try:
        from dvc.repo import Repo

        with Repo() as repo:  # the project the working directory is in
            outs = {Path(o.fs_path) for st in repo.index.stages for o in st.outs}
            locks = {Path(repo.root_dir) / "dvc.lock"}
            locks |= {Path(st.path).with_name("dvc.lock") for st in repo.index.stages
                      if getattr(st, "path", None)}  # fmt: skip
    except Exception:  # not a DVC project, or one DVC cannot read: the lock file only
        return {Path.cwd() / "dvc.lock"}, set()
    return outs | locks, {o.parent / ".gitignore" for o in outs}


def _owned(path: Path, owned: tuple[set[Path], set[Path]]) -> bool:
    outs, ignores = owned
    return path in ignores or any(path == o or o in path.parents for o in outs)


def _dvc_invocation() -> str | None:
    """'<pid>-<start time>' of the `dvc` process above this one, if any."""
    try:
        import psutil
    except ImportError:
        return None
    with contextlib.suppress(psutil.Error):
        proc = psutil.Process().parent()
        while proc is not None:
            cmd = " ".join(proc.cmdline()[:3])
            if "dvc" in Path(proc.cmdline()[0]).name or " -m dvc" in cmd or "/dvc " in cmd:
                return f"{proc.pid}-{int(proc.create_time())}"
            proc = proc.parent()
    return None


def _parent_run_id(mlflow) -> str | None:
    if os.environ.get(PARENT_ENV):
        return os.environ[PARENT_ENV]
    key = _dvc_invocation()
    if key is None:
        return None
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    found = mlflow.search_runs(
        [exp.experiment_id], filter_string=f"tags.`{INVOCATION_TAG}` = '{key}'",
        max_results=1, output_format="list",
    )  # fmt: skip
    if found:
        return found[0].info.run_id
    run = mlflow.MlflowClient().create_run(
        exp.experiment_id,
        run_name=f"dvc repro {time.strftime('%Y-%m-%d %H:%M:%S')}",
        tags={INVOCATION_TAG: key, "atlas.kind": "pipeline", **git_tags(), **process_tags(key)},
    )
    _close_when_gone(run.info.run_id, key)
    return run.info.run_id


# ---------------------------------------------------------------- runs left RUNNING
# Every run records the process that owns it (`atlas.host`, `atlas.pid` = '<pid>-<start
# time>'): the stage's own process, or for a `dvc repro` parent run the dvc process. A run
# whose process is gone can never end by itself: the next stage on the host marks it
# KILLED (a parent: closed by its children's states), and a `dvc repro` parent is closed
# by a small watcher as soon as dvc exits.
HOST_TAG, PID_TAG = "atlas.host", "atlas.pid"
LIVE_RUNS: set[str] = set()  # run ids this process has open (stage runs and their children)


def _host() -> str:
    import socket

    return socket.gethostname()


def process_tags(key: str | None = None) -> dict[str, str]:
    """The tags naming the process that owns a run: this one, or `key` ('<pid>-<start>')."""
    if key is None:
        import psutil

        key = f"{os.getpid()}-{int(psutil.Process().create_time())}"
    return {HOST_TAG: _host(), PID_TAG: key}


def _alive(key: str) -> bool:
    """Whether the process '<pid>-<start time>' still runs (a reused pid is another)."""
    import psutil

    pid, _, start = key.partition("-")
    try:
        return int(psutil.Process(int(pid)).create_time()) == int(start)
    except (ValueError, psutil.NoSuchProcess):
        return False
    except psutil.Error:  # exists, but not ours to inspect
        return True


def _close_parent(client, run) -> str:
    """End a parent run by its children: KILLED if one was, FAILED if one failed, else
    FINISHED. Returns the status set."""
    children = client.search_runs(
        [run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}'"
    )
    states = {c.info.status for c in children}
    status = next((s for s in ("KILLED", "FAILED", "RUNNING") if s in states), "FINISHED")
    status = "KILLED" if status == "RUNNING" else status  # a child of a gone process
    client.set_terminated(run.info.run_id, status)
    return status


def close_stale_runs(mlflow=None) -> list[tuple[str, str]]:
    """Mark this host's RUNNING runs whose process is gone: stage runs KILLED, then parent
    runs closed by their children. Returns (run id, status) of each run it ended."""
    mlflow = mlflow or mlflow_configured()
    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name(EXPERIMENT)
    running = client.search_runs(
        [exp.experiment_id],
        f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{_host()}'",
        max_results=1000,
    )
    gone = [r for r in running if not _alive(r.data.tags.get(PID_TAG, ""))]
    ended = []
    for r in sorted(gone, key=lambda r: r.data.tags.get("atlas.kind") == "pipeline"):
        if r.data.tags.get("atlas.kind") == "pipeline":
            ended.append((r.info.run_id, _close_parent(client, r)))
        else:
            client.set_terminated(r.info.run_id, "KILLED")
            ended.append((r.info.run_id, "KILLED"))
    return ended


def _close_when_gone(run_id: str, key: str) -> None:
    """Start the watcher that closes `run_id` once the process `key` has exited."""
    import sys

    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri()}
    subprocess.Popen(
        [sys.executable, "-m", "stages.tracking", "close-when-gone", run_id, key],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip


def _watch(run_id: str, key: str) -> None:
    while _alive(key):
        time.sleep(1)
    mlflow = mlflow_configured()
    close_stale_runs(mlflow)  # its stages, if dvc was killed with them
    run = mlflow.MlflowClient().get_run(run_id)
    if run.info.status == "RUNNING":
        _close_parent(mlflow.MlflowClient(), run)


def _clip(v: Any) -> str:
    s = v if isinstance(v, str) else json.dumps(v)
    return s if len(s) <= 6000 else s[:5997] + "..."


class StageRun:
    """A live MLflow child run; log metrics/artifacts through it."""

    # Explicit run ids throughout: MLflow's active run is thread-local, and Prefect
    # may run a task in another thread.
    def __init__(self, mlflow, run):
        self.client = mlflow.MlflowClient()
        self.run_id: str = run.info.run_id

    def metrics(self, values: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in values.items() if v is not None]
        self.client.log_batch(self.run_id, metrics=batch)

    def artifact(self, path: Path, subdir: str | None = None) -> None:
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), subdir)
        else:
            self.client.log_artifact(self.run_id, str(path), subdir)

    def text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def figure(self, fig, name: str) -> None:
        self.client.log_figure(self.run_id, fig, name)

    def tag(self, key: str, value: Any) -> None:
        self.client.set_tag(self.run_id, key, _clip(value))

    def params(self, values: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k[:250], _clip(v)) for k, v in values.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    @contextlib.contextmanager
    def child(
        self, name: str, params: dict[str, Any] | None = None, tags: dict[str, str] | None = None
    ) -> Iterator[StageRun]:
        """A run nested under this one (one per SAE, per steering concept, ...), carrying
        the stage's provenance tags so each child traces back on its own."""
        me = self.client.get_run(self.run_id)
        exp, mine = me.info.experiment_id, me.data.tags
        inherited = {k: v for k, v in mine.items()
                     if k.startswith(("input.", "input_path.", "git.", "dvc."))}  # fmt: skip
        run = self.client.create_run(exp, run_name=name, tags={
            **inherited, "mlflow.parentRunId": self.run_id, **process_tags(),
            **(tags or {})})  # fmt: skip
        child = StageRun.__new__(StageRun)
        child.client, child.run_id = self.client, run.info.run_id
        LIVE_RUNS.add(child.run_id)
        try:
            if params:
                child.params(params)
            yield child
        except BaseException as e:
            killed = isinstance(e, KeyboardInterrupt)
            self.client.set_terminated(child.run_id, status="KILLED" if killed else "FAILED")
            raise
        finally:
            LIVE_RUNS.discard(child.run_id)
        self.client.set_terminated(child.run_id)


@contextlib.contextmanager
def stage_run(
    stage: str,
    params: dict[str, Any],
    inputs: dict[str, Path],
    tags: dict[str, str] | None = None,
) -> Iterator[StageRun]:
    """Open a child MLflow run for one stage execution with full provenance.

    `params` are logged flattened; `inputs` (name -> path) are hashed and logged as
    `input.<name>` tags; the run is marked FAILED if the body raises.
    """
    mlflow = mlflow_configured()
    close_stale_runs(mlflow)
    parent = _parent_run_id(mlflow)
    hashes = {name: content_hash(p) for name, p in inputs.items()}
    run = mlflow.start_run(run_name=stage, parent_run_id=parent, nested=parent is not None,
                           tags=process_tags())  # fmt: skip
    sr = StageRun(mlflow, run)
    LIVE_RUNS.add(sr.run_id)
    try:
        sr.params(params)
        mlflow.set_tags(
            {
                "atlas.kind": "stage",
                "dvc.stage": stage,
                **git_tags(),
                "params.json": _clip(params),
                **{f"input.{k}": v for k, v in hashes.items()},
                **{f"input_path.{k}": str(p) for k, p in inputs.items()},
                **(tags or {}),
            }
        )
        yield sr
    except BaseException as e:
        mlflow.end_run(status="KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    finally:
        LIVE_RUNS.discard(sr.run_id)
    mlflow.end_run()


def end_live_runs(status: str = "KILLED") -> None:
    """End this process's open runs (a stage stopped by Ctrl-C exits without unwinding)."""
    if LIVE_RUNS:
        client = mlflow_configured().MlflowClient()
        for run_id in list(LIVE_RUNS):
            with contextlib.suppress(Exception):
                client.set_terminated(run_id, status)


def provenance(run_id: str) -> dict[str, Any]:
    """Exactly which data, code and params produced a run."""
    mlflow = mlflow_configured()
    run = mlflow.get_run(run_id)
    tags = run.data.tags
    out = {
        "run_id": run_id,
        "run_name": run.info.run_name,
        "status": run.info.status,
        "dvc_stage": tags.get("dvc.stage"),
        "git_commit": tags.get("git.commit"),
        "parent_run_id": tags.get("mlflow.parentRunId"),
        "inputs": {
            k.removeprefix("input."): {"hash": v, "path": tags.get(f"input_path.{k[6:]}")}
            for k, v in sorted(tags.items())
            if k.startswith("input.")
        },
        "params": dict(sorted(run.data.params.items())),
        "metrics": dict(sorted(run.data.metrics.items())),
    }
    return out


if __name__ == "__main__":  # python -m stages.tracking close-when-gone RUN_ID PID-START
    import sys

    if sys.argv[1:2] == ["close-when-gone"] and len(sys.argv) == 4:
        _watch(sys.argv[2], sys.argv[3])
