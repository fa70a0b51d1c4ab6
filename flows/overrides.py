"""Values for `dvc exp run -S key=value`, written in Hydra's override grammar.

DVC parses every `-S` with Hydra's override parser (dvc/utils/hydra.py) and applies it to
params.yaml in OmegaConf's struct mode: `key=value` changes a key that exists (a dict value
is merged into it, and may not add keys), `+key=value` adds a key that does not, `++key=value`
does either (https://hydra.cc/docs/advanced/override_grammar/basic/). JSON is *not* that
grammar: a dict key may not be quoted (`{"a": 1}` fails to parse; `{a: 1}` parses), so
`hydra_value` writes dicts with bare keys and every string quoted (an unquoted `1e-3` or
`true` would turn into a number or a bool).

`run_dvc` prints such commands as a user would type them and runs them with this
interpreter's DVC and this interpreter's folder first on PATH (as `atlas run` does), so
that a study started as `.venv/bin/python -m flows.sae_study` works without the virtual
environment activated: the stages' `python -m flows.<stage>` is then this interpreter.
"""

from __future__ import annotations

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

# characters a bare dict key may hold in Hydra's grammar (ID, INT, FLOAT, '.', '-', ...)
_BARE_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


def hydra_value(v: object) -> str:
    """`v` (plain data: dict, list, str, int, float, bool, None) as a Hydra override value."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            raise ValueError(f"hydra_value: {v} is not finite, expected a finite number")
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # double-quoted; Hydra reads \" and \\ inside quotes
    if isinstance(v, list | tuple):
        return "[" + ", ".join(hydra_value(x) for x in v) + "]"
    if isinstance(v, dict):
        parts = []
        for k, x in v.items():
            if not isinstance(k, str) or not _BARE_KEY.match(k):
                raise ValueError(f"hydra_value: dict key {k!r} cannot be written bare in a "
                                 "Hydra override, expected letters, digits, '_', '.', '-'")  # fmt: skip
            parts.append(f"{k}: {hydra_value(x)}")
        return "{" + ", ".join(parts) + "}"
    raise ValueError(f"hydra_value: {type(v).__name__} value {v!r}, expected plain data")


def run_dvc(cmds: list[list[str]], dry_run: bool = False) -> None:
    """Print each `dvc ...` command and, unless `dry_run`, run it as `python -m dvc ...`
    with this interpreter, its folder first on PATH for the stages' commands (the `dvc`
    and `python` on PATH may be another environment's, or none). A command that fails
    stops the rest with one line naming it and its exit code."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    for cmd in cmds:
        if cmd[:1] != ["dvc"]:
            raise ValueError(f"run_dvc: {shlex.join(cmd)!r} is not a dvc command")
        print(shlex.join(cmd), flush=True)
        if dry_run:
            continue
        rc = subprocess.run(
            [sys.executable, "-m", *cmd], env={**os.environ, "PATH": path}
        ).returncode
        if rc:
            raise SystemExit(f"error: `{shlex.join(cmd[:4])} ...` exited with {rc} "
                             "(its output is above); the commands after it did not run")  # fmt: skip
