"""Small I/O helpers shared by every stage: atomic outputs, JSON, content hashes.

A stage never writes into its final output path directly. It writes into a sibling
temporary folder and renames it into place when complete, so a killed stage never
leaves a half-written artifact that a later stage would read as finished; the
temporary folder a killed writer leaves behind is removed by the next writer of the
same output.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from stages.layout import check_target

# Where an interrupted process stands (flows.common's Ctrl-C handler reads these): the
# temporary folders being written, and how many steps that must not be cut in half
# (an output's rename into place, MLflow creating its database) are under way.
TEMPORARIES: set[Path] = set()
_uninterrupted = [0]
_pending: list = []  # a stop requested during such a step, run when it is done


def stop_when_consistent(stop) -> None:
    """Call `stop()` now, or as soon as no `uninterrupted()` step is under way."""
    if _uninterrupted[0]:
        _pending.append(stop)
    else:
        stop()


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """A step that Ctrl-C must not cut in half: the stop waits until it is done."""
    _uninterrupted[0] += 1
    try:
        yield
    finally:
        _uninterrupted[0] -= 1
        if not _uninterrupted[0] and _pending:
            _pending.pop()()


@contextlib.contextmanager
def atomic_dir(final: Path, within: Path | None = None) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces `final` in one rename.

    On error the temporary folder is removed (nothing half-written is left) and
    whatever was already at `final` is untouched. `final` must lie inside `within` (the
    stage's output folder, or the repository's `data/`) when given, and is never the
    working folder, an ancestor of it, a `.git` folder or a path with `..`
    (`stages.layout.check_target`): a name from params or a prompt file that slipped
    past its check cannot make this replace a folder elsewhere.
    """
    final = Path(final)
    check_target(final, within)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    TEMPORARIES.add(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        TEMPORARIES.discard(tmp)
    replace_dir(tmp, final, within)


def replace_dir(src: Path, final: Path, within: Path | None = None) -> None:
    """Move folder `src` to `final`, replacing what was there with (nearly) one rename;
    `final` is checked as in `atomic_dir` (inside `within` when given)."""
    final = Path(final)
    check_target(final, within)
    with uninterrupted():
        if final.exists() or final.is_symlink():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(src, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(src, final)
        _fsync_dir(final.parent)


def remove_stale_temporaries(final: Path) -> list[Path]:
    """Remove what a killed writer of `final` left beside it, and return those paths.

    `atomic_dir` and `replace_dir` name their temporaries `.<name>.tmp-<pid>` and
    `.<name>.old-<pid>`. A process killed with SIGKILL cannot clean up, so its
    temporary stays in the parent folder, where code that globs the whole parent could
    take it for a finished output (pathlib's `*` matches hidden names). Only
    temporaries of processes that are no longer running are removed; a live writer
    keeps its own. (.dvcignore keeps them out of DVC's hashes meanwhile.)
    """
    final = Path(final)
    removed = []
    if not final.parent.is_dir():
        return removed
    for p in final.parent.iterdir():
        kind, _, pid = p.name.removeprefix(f".{final.name}.").rpartition("-")
        if not p.name.startswith(f".{final.name}.") or kind not in ("tmp", "old"):
            continue
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class CorruptArtifactError(ValueError):
    """A stored artifact cannot be read back (truncated, overwritten, bad copy)."""


def load_safetensors(path: Path, what: str = "weights") -> dict:
    """Tensors of a safetensors file (never pickle), with a damaged file named in the error."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; expected the {what}")
    try:
        return load_file(path)
    except Exception as e:  # safetensors raises its own error types for a bad header / size
        raise CorruptArtifactError(
            f"{path}: not a readable safetensors file ({e}); the {what} are truncated or "
            "corrupt: restore them (`dvc checkout`) or re-run the stage that wrote them"
        ) from None


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (tmp + rename), stable key order for reproducible bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_json(path: Path, what: str = "") -> Any:
    path = Path(path)
    if not path.exists():
        hint = f"; expected {what}" if what else ""
        raise FileNotFoundError(f"{path}: missing{hint}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None


def file_md5(path: Path, bufsize: int = 1 << 22) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
    return h.hexdigest()


def made_by(path: Path) -> str:
    """ "; expected the output of stage S (run `dvc repro S`)" when a stage of the DVC
    project in the working folder writes `path` (or a folder holding it), else "".
    For error messages only: reading dvc.yaml through DVC costs about a second."""
    try:
        from dvc.repo import Repo

        target = Path(path).resolve()
        with Repo() as repo:
            for stage in repo.index.stages:
                for out in stage.outs:
                    made = Path(out.fs_path)
                    if target == made or made in target.parents:
                        name = stage.addressing
                        return f"; expected the output of stage {name} (run `dvc repro {name}`)"
    except Exception:  # no DVC project here (library use) or an unreadable dvc.yaml: no hint
        pass
    return ""


def content_hash(path: Path) -> str:
    """md5 of a file, or of a folder's (relative path, file md5) list, as DVC does.

    For a folder the value equals DVC's `.dir` hash only in spirit, not bytes: it is
    our own stable fingerprint used in provenance records.
    """
    path = Path(path)
    if path.is_file():
        return file_md5(path)
    if not path.is_dir():
        hint = made_by(path) or "; cannot hash an input that does not exist"
        raise FileNotFoundError(f"{path}: missing{hint}")
    entries = [
        {"relpath": p.relative_to(path).as_posix(), "md5": file_md5(p)}
        for p in sorted(path.rglob("*"))
        if p.is_file()
    ]
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def resume_or_reset(partial: Path, fingerprint: dict) -> bool:
    """Make `partial` (a resumable stage's work folder) hold work for `fingerprint` only.

    Work left there by an interrupted run is kept when its `fingerprint.json` equals
    `fingerprint` (the same inputs and config), and removed otherwise: checkpoints of
    other data or settings are never trusted. Returns True when earlier work is kept.
    Used by the LM, SAE and (through its store fingerprint) caching stages."""
    partial = Path(partial)
    mark = partial / "fingerprint.json"
    if partial.exists() and (not mark.exists() or read_json(mark) != fingerprint):
        shutil.rmtree(partial)
    resumed = partial.exists()
    partial.mkdir(parents=True, exist_ok=True)
    write_json(mark, fingerprint)
    return resumed
