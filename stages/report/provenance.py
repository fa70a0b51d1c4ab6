"""Provenance for report figures: who drew a figure, from which code, params and data.

Every figure in the report carries a caption line naming the MLflow run that logged it,
the git commit, the params hash, and the content hash of each input it was drawn from.
The report stage knows the first three and usually the input hashes (its `stage_run`
has computed them); any input hash it does not pass is computed here with
`stages.io.content_hash`, once per path.
"""

from __future__ import annotations

import html
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from stages.io import content_hash


@dataclass
class Provenance:
    """What produced the report: run id, commit, params hash, input hashes by path."""

    run_id: str = "not logged"
    git_commit: str = "unknown"
    params_hash: str = "none"
    # input path (as the caller names it, e.g. "data/saes/toy-a") -> content hash
    inputs: dict[str, str] = field(default_factory=dict)

    @classmethod
    def coerce(cls, value: Provenance | Mapping[str, Any] | None) -> Provenance:
        """A `Provenance` from itself, None (git commit looked up) or a plain dict with
        keys `run_id`, `git_commit`, `params_hash`, `inputs` ({path: hash})."""
        if isinstance(value, Provenance):
            return value
        if value is None:
            from stages.tracking import git_commit

            return cls(git_commit=git_commit())
        unknown = set(value) - {"run_id", "git_commit", "params_hash", "inputs"}
        if unknown:
            raise ValueError(
                f"provenance: unknown keys {sorted(unknown)}, expected run_id, git_commit, "
                "params_hash, inputs"
            )
        return cls(
            run_id=str(value.get("run_id") or "not logged"),
            git_commit=str(value.get("git_commit") or "unknown"),
            params_hash=str(value.get("params_hash") or "none"),
            inputs={_key(k): str(v) for k, v in (value.get("inputs") or {}).items()},
        )

    @classmethod
    def from_run(cls, run_id: str, params_hash: str = "none") -> Provenance:
        """Provenance of a live MLflow stage run (`stages.tracking.stage_run`): its id,
        git commit and the input hashes it logged (`input.<name>` / `input_path.<name>`),
        so the report does not hash its inputs a second time."""
        from stages.tracking import provenance

        p = provenance(run_id)
        inputs = {v["path"]: v["hash"] for v in p["inputs"].values() if v.get("path")}
        return cls(run_id, p.get("git_commit") or "unknown", params_hash, inputs)

    def hash_of(self, path: str | Path) -> str:
        """Content hash of an input: the caller's value if given, else computed (memoised)."""
        key = _key(path)
        if key not in self.inputs:
            for k, v in self.inputs.items():  # the caller may name it absolute or relative
                if Path(k).resolve() == Path(path).resolve():
                    self.inputs[key] = v
                    break
            else:
                self.inputs[key] = content_hash(Path(path)) if Path(path).exists() else "missing"
        return self.inputs[key]

    def caption_line(self, inputs: Iterable[str | Path]) -> str:
        """Plain-text provenance line for a figure drawn from `inputs`."""
        ins = ", ".join(f"{_key(p)} ({self.hash_of(p)})" for p in inputs)
        return f"MLflow run {self.run_id} · git {self.git_commit} · params {self.params_hash}" + (
            f" · inputs: {ins}" if ins else ""
        )

    def caption_html(self, inputs: Iterable[str | Path]) -> str:
        """The same line as HTML, each item in its own <span> so tests can find it."""
        parts = [
            f'<span class="prov-run">MLflow run <code>{_e(self.run_id)}</code></span>',
            f'<span class="prov-commit">git <code>{_e(self.git_commit)}</code></span>',
            f'<span class="prov-params">params <code>{_e(self.params_hash)}</code></span>',
        ]
        ins = [
            f'<span class="prov-input"><code>{_e(_key(p))}</code> '
            f"<code>{_e(self.hash_of(p))}</code></span>"
            for p in inputs
        ]
        if ins:
            parts.append("inputs: " + ", ".join(ins))
        return '<span class="provenance">' + " · ".join(parts) + "</span>"


def _key(path: str | Path) -> str:
    return Path(path).as_posix()


def _e(s: Any) -> str:
    return html.escape(str(s))
