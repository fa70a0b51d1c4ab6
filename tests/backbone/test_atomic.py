"""Atomic outputs (stages/io.py): nothing half-written at the final path, and what a
killed writer left beside it is removed by the next writer of the same output."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from stages.io import atomic_dir


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_a_failing_writer_leaves_the_previous_output_and_no_temporary(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "a").write_text("previous")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "a").write_text("half")
        raise RuntimeError("stage failed")
    assert (final / "a").read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_killed_writers_temporaries_are_removed_by_the_next_writer(tmp_path):
    dead, alive = _dead_pid(), os.getppid()
    # a killed writer's (removed), a running writer's (kept), another output's (kept),
    # a resumable stage's resume point (kept: the stage itself decides)
    left = [f".out.tmp-{dead}", f".out.old-{dead}", f".out.tmp-{alive}", f".outer.tmp-{dead}",
            "out.partial"]  # fmt: skip
    for name in left:
        (tmp_path / name).mkdir()
        (tmp_path / name / "evaluation.json").write_text("{}")
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out", f".out.tmp-{alive}", f".outer.tmp-{dead}", "out.partial"]
    )
    assert (tmp_path / "out" / "a").read_text() == "new"


def test_a_missing_input_names_the_stage_that_writes_it(tmp_path, monkeypatch):
    from stages.io import content_hash

    (tmp_path / "dvc.yaml").write_text(
        "stages:\n  make:\n    foreach: [a, b]\n    do:\n      cmd: echo\n"
        "      outs:\n        - out/${item}\n"
    )
    subprocess.run(
        [sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True
    )
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"^out/b/x: missing; expected the output of "
                       r"stage make@b \(run `dvc repro make@b`\)$"):  # fmt: skip
        content_hash("out/b/x")
    with pytest.raises(FileNotFoundError, match="elsewhere: missing; cannot hash an input"):
        content_hash("elsewhere")
