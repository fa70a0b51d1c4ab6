"""Which project files each DVC stage runs, read from the code, for checking `dvc.yaml`.

A stage's `cmd` is `python -m flows.<x> ...`; the files it runs are the transitive
closure of project imports from that module: every `import` / `from ... import` naming a
module under `stages/` or `flows/`, anywhere in a file (imports inside functions run
too), plus the `__init__.py` of every package on the way. A package that exports names
lazily (PEP 562, `stages/lazy.py`: a module-level `_EXPORTS = {"submodule": "Name ..."}`)
contributes only the submodule that defines each imported name.

    python -m tests.dvc_deps           # each stage: the code deps dvc.yaml should list
    python -m tests.dvc_deps --write   # rewrite dvc.yaml's code deps to exactly those

`tests/test_dvc_deps.py` fails when a stage's declared deps miss a file it runs, or
declare project code it does not run.
"""

from __future__ import annotations

import ast
import re
from functools import cache
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("stages", "flows")


def module_file(module: str, root: Path = REPO) -> Path | None:
    p = root.joinpath(*module.split("."))
    if (p / "__init__.py").is_file():
        return p / "__init__.py"
    if p.with_suffix(".py").is_file():
        return p.with_suffix(".py")
    return None


@cache
def _lazy_exports(init: Path) -> dict[str, str]:
    """name -> submodule for a package exporting names lazily (empty otherwise)."""
    tree = ast.parse(init.read_text())
    for n in tree.body:
        if (
            isinstance(n, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in n.targets)
            and isinstance(n.value, ast.Dict)
        ):
            exports = ast.literal_eval(n.value)
            return {name: sub for sub, names in exports.items() for name in names.split()}
    if any(isinstance(n, ast.FunctionDef) and n.name == "__getattr__" for n in tree.body):
        raise ValueError(f"{init}: defines __getattr__ but no _EXPORTS dict literal")
    return {}


@cache
def direct_imports(path: Path, module: str) -> frozenset[str]:
    """Project modules `path` (the file of `module`) imports, anywhere in the file."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            out.add(base)
            init = module_file(base)
            lazy = _lazy_exports(init) if init and init.name == "__init__.py" else {}
            for a in node.names:
                if module_file(f"{base}.{a.name}"):  # a submodule
                    out.add(f"{base}.{a.name}")
                elif a.name in lazy:
                    out.add(f"{base}.{lazy[a.name]}")
    return frozenset(m for m in out if m.split(".")[0] in PACKAGES)


def runs(module: str) -> list[str]:
    """Every project file (relative to the repository) that running `module` may import."""
    seen: dict[str, Path] = {}
    todo = [module]
    while todo:
        parts = todo.pop().split(".")
        for i in range(1, len(parts) + 1):  # each parent package's __init__ runs first
            sub = ".".join(parts[:i])
            f = module_file(sub)
            if f is None or sub in seen:
                continue
            seen[sub] = f
            todo.extend(direct_imports(f, sub))
    return sorted(str(f.relative_to(REPO)) for f in seen.values())


def stage_modules(dvc: dict) -> dict[str, str]:
    """stage name -> the flows module its cmd runs."""
    out = {}
    for name, stage in dvc["stages"].items():
        body = stage.get("do", stage)
        m = re.search(r"python -m (flows\.\w+)", body["cmd"])
        if m is None:
            raise ValueError(f"dvc.yaml: stages.{name}.cmd = {body['cmd']!r}: no flows module")
        out[name] = m.group(1)
    return out


def declared_code(dvc: dict, stage: str) -> list[str]:
    """The project-code deps (under stages/ or flows/) a stage declares."""
    body = dvc["stages"][stage].get("do", dvc["stages"][stage])
    return [d for d in body.get("deps", []) if d.split("/")[0] in PACKAGES]


def covered(file: str, deps: list[str]) -> bool:
    return any(file == d or file.startswith(d.rstrip("/") + "/") for d in deps)


def problems(dvc: dict) -> dict[str, dict[str, list[str]]]:
    """stage -> {"missing": files it runs that no dep covers, "extra": deps covering no
    file it runs}; stages without problems are left out."""
    out = {}
    for stage, module in stage_modules(dvc).items():
        files, deps = runs(module), declared_code(dvc, stage)
        missing = [f for f in files if not covered(f, deps)]
        extra = [d for d in deps if not any(covered(f, [d]) for f in files)]
        if missing or extra:
            out[stage] = {"missing": missing, "extra": extra}
    return out


def rewrite(text: str) -> str:
    """dvc.yaml's text with each stage's code deps replaced by the files it runs (listed
    after its data deps; comments and everything else kept)."""
    dvc = yaml.safe_load(text)
    modules = stage_modules(dvc)
    out, stage, in_deps, indent = [], None, False, ""
    for line in text.splitlines():
        if m := re.match(r"^  ([\w-]+):", line):  # a stage (two-space indent)
            stage = m.group(1)
        stripped = line.strip()
        if stripped == "deps:":
            in_deps, indent = True, line[: len(line) - len(line.lstrip())] + "  "
            out.append(line)
            continue
        if in_deps:
            if stripped.startswith("- "):
                if stripped[2:].split()[0].split("/")[0] in PACKAGES:
                    continue  # a code dep: regenerated below
                out.append(line)
                continue
            out.extend(f"{indent}- {f}" for f in runs(modules[stage]))
            in_deps = False
        out.append(line)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    import sys

    path = REPO / "dvc.yaml"
    if sys.argv[1:] == ["--write"]:
        path.write_text(rewrite(path.read_text()))
        print(f"{path}: code deps rewritten")
    else:
        dvc = yaml.safe_load(path.read_text())
        for stage, module in stage_modules(dvc).items():
            print(f"{stage} ({module}):")
            for f in runs(module):
                print(f"  - {f}")
