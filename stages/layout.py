"""Names that become paths, and paths that must stay inside their root.

Model, hook, SAE, concept, prompt-set and pair names end up as folder names
(`data/saes/<model>/<hook>/<sae>/`, `data/steering/<model>/<concept>/`). A name read from
params.yaml or a prompt-set file is checked with `safe_name` when it is read, and every
artifact path built from names goes through `inside`, which refuses a result outside its
root. Two checks, because either alone can be bypassed by a caller that forgot it:

    safe_name("topk-1024-k16", "saes.sweep.toy-a[0].saes[0].name")   # -> the name
    inside(Path("data/saes"), "toy-a", hook, name)                  # -> the joined path

The check is lexical (after `..` is folded and a relative root made absolute), so a folder
a user symlinked elsewhere on purpose (`data/activations` -> a big disk) still works.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

# letters, digits, '_', '-', '.', '+'; not starting with '.' or '-' (no '..', no hidden
# folders, no option-like names), no separator, at most 128 characters
SAFE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,127}")
SAFE_NAME_EXPECTED = (
    "expected a name of letters, digits, '_', '-', '.' or '+', not starting with '.' or '-', "
    "at most 128 characters (it becomes a folder name)"
)


class UnsafePathError(ValueError):
    """A name that would make a path, or a path that would land outside its root."""


def why_unsafe(value: object) -> str | None:
    """Why `value` cannot be a folder name (SAFE_NAME_EXPECTED), or None when it can."""
    if isinstance(value, str) and SAFE_NAME.fullmatch(value):
        return None
    return SAFE_NAME_EXPECTED


def safe_name(value: object, what: str) -> str:
    """`value` when it is a safe folder name; else UnsafePathError naming `what` (the
    params key or `file: line N: 'name'` it was read from)."""
    if why_unsafe(value) is not None:
        raise UnsafePathError(f"{what} = {value!r}, {SAFE_NAME_EXPECTED}")
    return value  # type: ignore[return-value]


def _abs(p: str | os.PathLike) -> str:
    return os.path.normpath(os.path.abspath(p))


def is_inside(root: str | os.PathLike, path: str | os.PathLike) -> bool:
    """Whether `path` lies strictly below `root` (lexically, `..` folded)."""
    r, p = _abs(root), _abs(path)
    return os.path.commonpath([r, p]) == r and p != r


def inside(root: str | os.PathLike, *parts: str | os.PathLike) -> Path:
    """`root / part / ...`, refused (UnsafePathError) when it resolves outside `root`, or
    to `root` itself: an absolute part, a `..` that climbs out, an empty result."""
    path = Path(root).joinpath(*parts)
    if parts and not is_inside(root, path):
        raise UnsafePathError(
            f"{path}: resolves to {_abs(path)}, outside {_abs(root)}; expected a path inside "
            f"{root} (a name with '/', '..' or an absolute path?)"
        )
    return path


def check_target(final: str | os.PathLike, within: str | os.PathLike | None) -> None:
    """The guard of `stages.io.atomic_dir` / `replace_dir` before they replace `final`:
    inside `within` when given; in any case never the working folder, one of its
    ancestors, the home folder or a `.git` folder, and never a path with a `..` part."""
    final = Path(final)
    if within is not None and not is_inside(within, final):
        raise UnsafePathError(
            f"{final}: refusing to replace a folder outside {within} (resolves to "
            f"{_abs(final)}); expected a path inside the stage's output folder"
        )
    target = _abs(final)
    cwd = _abs(os.getcwd())
    bad = (
        ".." in final.parts
        or final.name == ".git"
        or target in (_abs(Path.home()), os.path.abspath(os.sep))
        or os.path.commonpath([target, cwd]) == target
    )
    if bad:
        raise UnsafePathError(
            f"{final}: refusing to replace it (resolves to {target}); expected an output "
            "folder below the working folder's data, without '..'"
        )


class Layout:
    """Where every artifact of a project lives: the one place that knows the layout.

        lay = Layout()                       # the project in the working folder
        lay.sae("toy-a", "blocks.1.hook_resid_post", "topk-1024-k16")
        # -> data/saes/toy-a/blocks.1.hook_resid_post/topk-1024-k16

    Every path is built with `inside`, so a name with '/', '..' or an absolute path is
    refused even where a caller forgot `safe_name`. DVC outputs are under `data/`; DVC
    metrics under `metrics/`, plots under `plots/`, the report under `reports/` (the same
    paths `dvc.yaml` declares, relative to the project root).
    """

    def __init__(self, root: str | os.PathLike = ".") -> None:
        self.root = Path(root)
        self.data = self.root / "data"

    def _under(self, base: str, *names: str) -> Path:
        return inside(self.data / base, *names) if names else self.data / base

    # ---- DVC outputs, one folder per stage and name -----------------------------------
    @property
    def corpus(self) -> Path:
        return self.data / "corpus"

    @property
    def prompts(self) -> Path:
        """Hand-written contrastive sets (in git, not a stage output)."""
        return self.data / "prompts"

    def model(self, model: str = "") -> Path:
        return self._under("models", *[model] if model else [])

    def activations(self, model: str = "") -> Path:
        return self._under("activations", *[model] if model else [])

    def saes(self, model: str = "") -> Path:
        return self._under("saes", *[model] if model else [])

    def sae(self, model: str, hook: str, name: str) -> Path:
        return self._under("saes", model, hook, name)

    def partial(self, output: Path) -> Path:
        """Where a resumable stage keeps its work on `output` between runs."""
        return output.with_name(f"{output.name}.partial")

    def steering(self, model: str = "") -> Path:
        return self._under("steering", *[model] if model else [])

    def decomposition(self, model: str = "") -> Path:
        return self._under("decomposition", *[model] if model else [])

    def alignment(self, pair: str = "") -> Path:
        return self._under("alignment", *[pair] if pair else [])

    def transfer(self, pair: str = "") -> Path:
        return self._under("transfer", *[pair] if pair else [])

    def geometry(self, model: str = "") -> Path:
        return self._under("geometry", *[model] if model else [])

    # ---- DVC metrics, plots and the report -------------------------------------------
    def metrics(self, stage: str, name: str | None = None) -> Path:
        """`metrics/<stage>.json`, or `metrics/<stage>/<name>.json` for a foreach stage."""
        if name is None:
            return inside(self.root / "metrics", f"{stage}.json")
        return inside(self.root / "metrics", stage, f"{name}.json")

    def plot(self, stage: str, name: str) -> Path:
        return inside(self.root / "plots", stage, f"{name}.json")

    @property
    def reports(self) -> Path:
        return self.root / "reports"
