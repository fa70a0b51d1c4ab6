"""Scaling: the caching and SAE stages, locally and on 1 and 2 Dask workers.

    .venv/bin/python benchmarks/dask_scaling.py [--model toy-a] [--steps 300] [--saes 4]

Runs the real stage flows (`python -m flows.activations`, `python -m flows.saes`) in a
scratch copy of the project that reuses this checkout's corpus and model, with
`ATLAS_RUNNER=local`, then `dask` with `ATLAS_DASK_WORKERS=1` and `2` (a local cluster,
one thread per worker). The SAE sweep is cut to `--saes` TopK SAEs of `--steps` steps on
one hook so a run takes minutes. Every run starts from an empty store and no
checkpoints. Prints wall seconds per stage and the speed-up of 2 workers over 1, and
checks that every configuration wrote the same bytes.

What to expect on a 2-core machine: a worker per core at most doubles the work rate,
and the local path already uses both cores for its GEMMs (torch threads = 2), so the
Dask gain here is in overlapping the non-GEMM work (Python, zarr writes, evaluation),
not in more FLOPs. The per-token figures also feed the GPT-2 estimate in the README.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def tree_md5(root: Path) -> str:
    h = hashlib.md5()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def project(root: Path, model: str, n_saes: int, steps: int) -> None:
    for d in ("stages", "flows"):
        shutil.copytree(REPO / d, root / d, ignore=shutil.ignore_patterns("__pycache__"))
    for d in ("data/corpus", f"data/models/{model}"):
        shutil.copytree(REPO / d, root / d)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    hook = params["activations"]["hooks"][model][-2]
    saes = [{"architecture": "topk", "expansion_factor": 8, "k": 8 * (i + 1), "lr": 0.001,
             "n_training_tokens": 4096 * steps, "batch_size": 4096, "seed": 0}
            for i in range(n_saes)]  # fmt: skip
    params["saes"]["sweep"] = {m: [{"hooks": [hook], "saes": saes}] for m in params["models"]}
    for key in ("steering", "align"):
        params.pop(key, None)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def stage(root: Path, module: str, model: str, env: dict) -> float:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", module, model], cwd=root, env=env,
                       capture_output=True, text=True)  # fmt: skip
    if p.returncode:
        sys.exit(f"{module} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="toy-a")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--saes", type=int, default=4)
    a = ap.parse_args()
    if not (REPO / "data/models" / a.model).exists():
        sys.exit(f"data/models/{a.model} is missing: run `dvc repro lm@{a.model}` first")
    sys.path.insert(0, str(REPO))
    from flows.common import setup_env
    from flows.pipeline import prefect_server

    setup_env()
    print(f"# {platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; "
          f"{a.saes} TopK SAEs x {a.steps} steps on one hook of {a.model}")  # fmt: skip
    runs = [("local", {}), ("dask x1", {"ATLAS_DASK_WORKERS": "1"}),
            ("dask x2", {"ATLAS_DASK_WORKERS": "2"})]  # fmt: skip
    times, digests = {}, {}
    with prefect_server(4291) as url, tempfile.TemporaryDirectory() as tmp:
        for label, extra in runs:
            root = Path(tmp) / label.replace(" ", "")
            project(root, a.model, a.saes, a.steps)
            env = {**os.environ, "PYTHONPATH": str(root), "PREFECT_API_URL": url,
                   "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
                   "ATLAS_RUNNER": "dask" if extra else "local", **extra}  # fmt: skip
            t_cache = stage(root, "flows.activations", a.model, env)
            t_saes = stage(root, "flows.saes", a.model, env)
            times[label] = (t_cache, t_saes)
            digests[label] = (tree_md5(root / "data/activations" / a.model),
                              tree_md5(root / "data/saes" / a.model))  # fmt: skip
            print(f"{label:8s}  activations {t_cache:6.1f} s   saes {t_saes:6.1f} s")
    for i, st in enumerate(("activations", "saes")):
        one, two = times["dask x1"][i], times["dask x2"][i]
        print(f"speed-up of 2 workers over 1, {st}: {one / two:.2f}x "
              f"(local {times['local'][i]:.1f} s)")  # fmt: skip
    same = len(set(digests.values())) == 1
    print(f"same bytes from every configuration: {same}")
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
