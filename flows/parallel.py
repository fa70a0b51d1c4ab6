"""`atlas run -j N`: the stale stages of the DVC pipeline, N at a time, each through DVC.

DVC's `repro` runs one stage after another. On a small machine much of a stage is
single-threaded (imports, hashing, plotting, the optimiser's many small ops), so two
stages side by side, each on half the cores, finish sooner than the same two in a row:
two LM trainings at one thread each train 17 % more tokens a second together than one at
two threads (2-core machine, 2026-12-05). This module keeps DVC as the one authority on
what runs and what it wrote:

1. `plan`: DVC's own status names the stages whose deps, params, code or outputs
   changed; every stage downstream of one of them runs too (in DVC's graph). Nothing else.
2. `run_plan`: each stage runs as `dvc --wait-for-lock repro --single-item <stage>`, a
   Prefect task, once every stage it depends on has finished; ready stages start in the
   order of how much of the pipeline waits on them (the LMs first). DVC releases its
   repository lock while a stage's command runs and takes it again to save the outputs
   and write dvc.lock, so N stages run together and dvc.lock is written one stage at a
   time (`--wait-for-lock`: a process that finds the lock held waits for it).
3. Each stage process gets `threads` torch threads (OMP_NUM_THREADS): `cores // N` by
   default, fixed per run, so the same command on the same machine gives the same bytes
   (the thread count splits some full reductions, e.g. an SAE's input-scale estimate;
   see flows/saes.py). A failed stage stops new starts; the running ones finish.

Output: each stage's finished lines, prefixed with its name; every `heartbeat_s`, the
last state of each running stage's progress bar.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from concurrent.futures import TimeoutError as FuturesTimeout
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Plan:
    """The stages to run, in a topological order, with what each waits for."""

    order: list[str]
    needs: dict[str, set[str]]  # stage -> the planned stages it depends on directly
    weight: dict[str, int] = field(default_factory=dict)  # stages downstream of each

    def ready(self, done: set[str], started: set[str]) -> list[str]:
        """Stages not started whose needs are all done, the heaviest first."""
        free = [s for s in self.order if s not in started and self.needs[s] <= done]
        return sorted(free, key=lambda s: -self.weight.get(s, 0))  # stable: topological ties


def plan(root: Path, force: bool = False) -> Plan:
    """The stale stages of the project at `root` and everything downstream of them, as DVC
    sees them (`dvc status`; the stage graph of dvc.yaml); every stage with `force`."""
    import networkx as nx
    from dvc.repo import Repo

    # a stage's name (`addressing`) is relative to the working directory: the project's
    with contextlib.chdir(root), Repo(str(root)) as repo:
        graph = repo.index.graph  # edges run from a stage to the stages it depends on
        by_name = {s.addressing: s for s in graph.nodes}
        changed = set(by_name) if force else set(repo.status())
    unknown = changed - set(by_name)
    if unknown:  # e.g. an imported .dvc file: not ours to schedule
        raise ValueError(f"dvc status names {sorted(unknown)}, which are not pipeline stages")
    stale = set(changed)
    for name in changed:
        stale |= {s.addressing for s in nx.ancestors(graph, by_name[name])}
    topo = [s.addressing for s in reversed(list(nx.topological_sort(graph)))]
    order = [s for s in topo if s in stale]
    needs = {s: {d.addressing for d in graph.successors(by_name[s])} & stale for s in order}
    weight = {s: len(nx.ancestors(graph, by_name[s])) for s in order}
    return Plan(order, needs, weight)


def default_jobs(cores: int | None = None) -> int:
    """Two stages at a time on a machine with two cores or more, else one."""
    return 2 if (cores or os.cpu_count() or 1) >= 2 else 1


def threads_per_job(jobs: int, cores: int | None = None) -> int:
    return max(1, (cores or os.cpu_count() or 1) // jobs)


def last_state(raw: bytes) -> str | None:
    """A finished line as it last looked: a progress bar redrawn with carriage returns is
    its final redraw; None for a blank line."""
    states = [s for s in raw.decode(errors="replace").split("\r") if s.strip()]
    return states[-1].rstrip() if states else None


class Relay:
    """Each stage's output to stdout, line by line with its name in front, and to a
    logger; the unfinished line (a progress bar's redraws) kept for the heartbeat."""

    def __init__(self, logger=None):
        self.logger = logger
        self.partial: dict[str, str] = {}
        self.lock = threading.Lock()

    def emit(self, name: str, line: str) -> None:
        text = f"[{name}] {line}"
        with self.lock:
            print(text, flush=True)
        if self.logger is not None:
            self.logger.info(text)

    def follow(self, name: str, fd: int) -> None:
        pending = b""
        while chunk := os.read(fd, 65536):
            *lines, pending = (pending + chunk).split(b"\n")
            for raw in lines:
                self._line(name, raw)
            pending = pending[max(pending.rfind(b"\r"), 0) :]
            self.partial[name] = pending.decode(errors="replace").strip("\r").strip()
        self._line(name, pending)
        self.partial.pop(name, None)

    def _line(self, name: str, raw: bytes) -> None:
        if (line := last_state(raw)) is not None:
            self.emit(name, line)

    def heartbeat(self, running: list[str]) -> None:
        for name in running:
            if self.partial.get(name):
                self.emit(name, self.partial[name])


def stage_command(name: str, force: bool = False) -> list[str]:
    return [sys.executable, "-m", "dvc", "--wait-for-lock", "repro", "--single-item",
            *(["--force"] if force else []), name]  # fmt: skip


def run_stage(name: str, env: dict, relay: Relay, force: bool = False) -> int:
    """One stage through DVC; its exit code."""
    proc = subprocess.Popen(stage_command(name, force), env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)  # fmt: skip
    assert proc.stdout is not None
    try:
        relay.follow(name, proc.stdout.fileno())
        return proc.wait()
    except BaseException:
        proc.terminate()
        raise


def run_plan(p: Plan, submit, env: dict, threads: int, jobs: int, relay: Relay,
             heartbeat_s: float = 60.0) -> list[str]:  # fmt: skip
    """Run `p` `jobs` stages at a time; `submit(name, env)` starts one (a Prefect task's
    `.submit`) and returns a future whose result is the stage's exit code. Returns the
    stages that failed ([] when all ran)."""
    from prefect.futures import as_completed

    env = {**env, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done: set[str] = set()
    started: set[str] = set()
    failed: list[str] = []
    running: dict = {}  # future -> stage
    while True:
        if not failed:
            for name in p.ready(done, started)[: jobs - len(running)]:
                started.add(name)
                running[submit(name, env)] = name
        if not running:
            break
        try:
            future = next(iter(as_completed(list(running), timeout=heartbeat_s)))
        except FuturesTimeout:
            relay.heartbeat(list(running.values()))
            continue
        name = running.pop(future)
        future.wait()
        code = future.result(raise_on_failure=False) if future.state.is_completed() else None
        if code == 0:
            done.add(name)
        else:
            failed.append(name)
            why = f"exit code {code}" if isinstance(code, int) else future.state.name
            relay.emit(name, f"failed ({why}); no new stage starts")
    skipped = [s for s in p.order if s not in started]
    if failed and skipped:
        relay.emit("atlas run", f"not started: {', '.join(skipped)}")
    return failed
