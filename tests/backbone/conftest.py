"""Shared fixtures for the backbone tests: a tiny params mapping, a Prefect server,
scratch projects that run the real flows."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

TINY = {
    "corpus": {"source": "toy", "heldout_fraction": 0.1, "toy": {"n_docs": 240, "seed": 3}},
    # two toy models differing only in seed, like the default pair
    "models": {
        name: {
            "source": "toy",
            "seed": seed,
            "arch": {"n_layers": 2, "d_model": 32, "n_heads": 2, "d_mlp": 64, "n_ctx": 32},
            "tokenizer": {"vocab_size": 400},
            "train": {
                "tokens": 24000,
                "batch_size": 16,
                "seq_len": 32,
                "lr": 0.01,
                "warmup_steps": 5,
                "eval_tokens": 2048,
            },  # fmt: skip
        }
        for seed, name in enumerate(("tiny-a", "tiny-b"))
    },
    "activations": {
        "store": {"seq_len": 32, "batch_size": 16, "shard_rows": 4096, "chunk_rows": 1024},
        "hooks": {
            "tiny-a": ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"],
            "tiny-b": ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"],
        },
    },
    "saes": {
        "eval": {"max_rows": 2048, "ce_windows": 8},
        "checkpoint_every": 20,
        "pretrained": {},  # a DVC param of saes@M: it must exist, even empty
        "sweep": {
            m: {
                "hooks": ["blocks.0.hook_resid_post"],
                "saes": [
                    {
                        "architecture": "topk",
                        "expansion_factor": 4,
                        "k": 4,
                        "n_training_tokens": 40960,
                        "batch_size": 512,
                        "lr": 0.003,
                    },
                    {
                        "architecture": "relu",
                        "expansion_factor": 4,
                        "n_training_tokens": 40960,
                        "batch_size": 512,
                        "lr": 0.003,
                    },
                ],
            }
            for m in ("tiny-a", "tiny-b")
        },
    },
    # concept geometry: small nulls, the tiny TopK SAE's decoder clustered
    "geometry": {
        "n_null": 50,
        "n_null_clusters": 5,
        "sae_names": ["topk-128-k4"],
        "min_token_count": 3,
    },  # fmt: skip
    "steering": {
        "toy_sets": {"seed": 0, "n_train": 16, "n_heldout": 8},
        "config": {
            "multipliers": [-4, -2, 0, 2, 4],
            "n_windows": 8,
            "max_features": 8,
            "targeted_k": 3,
            "n_generations": 1,
            "max_new_tokens": 4,
        },  # fmt: skip
        "models": {
            m: {
                "sets": ["past_vs_present"],
                "hooks": ["blocks.0.hook_resid_post"],
                "saes": {"blocks.0.hook_resid_post": "topk-128-k4"},
            }
            for m in ("tiny-a", "tiny-b")
        },
    },
    "align": {
        "pairs": {"tiny-a__tiny-b": {"a": "tiny-a", "b": "tiny-b"}},
        "config": {
            "sae_names": ["topk-128-k4"],
            "max_tokens": 4000,
            "top_up": True,  # the tiny corpus's held-out split is too small on its own
            "n_permutations": 10,
            "n_samples": 256,
            "self_check_tokens": 1024,
        },  # fmt: skip
        "transfer": {"method": "nnls", "k": None},
    },
    "report": {"dashboards": {"n_most_active": 3, "n_contexts": 4, "max_rows": 4000}},
    "compute": {"precision": "fp32"},  # a DVC dependency of activations and saes
}
# tiny-a trains 151 LM steps instead of 48 so that it writes checkpoints (every 50 steps):
# the kill tests interrupt it between two
TINY["models"]["tiny-a"]["train"]["tokens"] = 75_000

NETAUDIT = Path(__file__).parent / "_netaudit"
# variables under which MLflow, Prefect and DVC mute their telemetry ("in CI / a test"):
# a stage must keep quiet without them
MUTING = ("PYTEST_CURRENT_TEST", "CI", "GITHUB_ACTIONS", "DVC_TEST", "DVC_NO_ANALYTICS",
          "DO_NOT_TRACK", "MLFLOW_DISABLE_TELEMETRY")  # fmt: skip


@pytest.fixture
def tiny() -> dict:
    return copy.deepcopy(TINY)


@pytest.fixture
def toy_windows(tmp_path):
    """(tokenizer, train windows, held-out windows) of a 200-document toy corpus, 64-token
    windows, a 1,000-token BPE vocabulary: what the LM training tests train on."""
    from stages.config import CorpusParams
    from stages.corpus import build_toy_corpus
    from stages.models import train_tokenizer, windows_for

    corpus = build_toy_corpus(CorpusParams.model_validate({"toy": {"n_docs": 200, "seed": 0}}))
    (tmp_path / "tok").mkdir()
    tok = train_tokenizer(corpus.texts, 1000, tmp_path / "tok")
    split = np.array(corpus.splits)
    texts, ids = np.array(corpus.texts, dtype=object), np.array(corpus.doc_ids)
    train, held = (windows_for(tok, list(texts[split == s]), list(ids[split == s]), 64)
                   for s in ("train", "heldout"))  # fmt: skip
    return tok, train, held


def run(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and p.returncode:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        )
    return p


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """One real Prefect server for the session, on a free loopback port."""
    from tests._servers import free_port, server

    home = tmp_path_factory.mktemp("prefect-home")
    url = f"http://127.0.0.1:{(port := free_port())}/api"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
           "--port", str(port)]  # fmt: skip
    with server(cmd, f"{url}/health", home / "server.log", env=env, timeout=90):
        yield {"url": url, "home": str(home)}


def out_md5s(lock: dict) -> dict[str, str]:
    """Every output's md5 in a parsed dvc.lock, by path."""
    return {o["path"]: o["md5"] for st in lock["stages"].values() for o in st.get("outs", [])}


def differing_files(a: Path, b: Path, outs: list[str]) -> list[str]:
    """The files under `outs` (paths relative to projects `a` and `b`) whose bytes differ
    or that exist in one project only, each with what differs in it (`what_differs`):
    what an assertion on whole-output md5s names, so that a failure says which file moved
    and which values, not just which stage (issue 28: a flaky difference is diagnosed by
    the one CI log it fails in)."""
    import hashlib

    def md5s(root: Path, out: str) -> dict[str, str]:
        base = root / out
        files = [base] if base.is_file() else sorted(p for p in base.rglob("*") if p.is_file())
        return {str(f.relative_to(root)): hashlib.md5(f.read_bytes()).hexdigest() for f in files}

    found = []
    for out in outs:
        fa, fb = md5s(a, out), md5s(b, out)
        for k in sorted(k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)):
            found.append(f"{k} ({what_differs(a / k, b / k)})")
    return found


def what_differs(fa: Path, fb: Path, show: int = 4) -> str:
    """One line on how two versions of a file differ: a JSON file's differing leaves
    (key: a -> b, the first `show`), a safetensors file's tensors (largest |a - b|), or
    'only in one' / 'bytes'."""
    if not (fa.is_file() and fb.is_file()):
        return "only in one"
    if fa.suffix == ".json":

        def leaves(x, pre=""):
            if isinstance(x, dict):
                for k, v in x.items():
                    yield from leaves(v, f"{pre}{k}.")
            elif isinstance(x, list):
                for i, v in enumerate(x):
                    yield from leaves(v, f"{pre}{i}.")
            else:
                yield pre.rstrip("."), x

        la, lb = dict(leaves(json.loads(fa.read_text()))), dict(leaves(json.loads(fb.read_text())))
        diff = [k for k in la.keys() | lb.keys() if la.get(k, "<absent>") != lb.get(k, "<absent>")]
        shown = "; ".join(f"{k}: {la.get(k, '<absent>')} -> {lb.get(k, '<absent>')}"
                          for k in sorted(diff)[:show])  # fmt: skip
        return f"{len(diff)} of {len(la)} JSON values differ: {shown}"
    if fa.suffix == ".safetensors":
        from safetensors.numpy import load_file

        ta, tb = load_file(fa), load_file(fb)
        parts = []
        for k in sorted(ta.keys() | tb.keys()):
            if k not in ta or k not in tb or ta[k].shape != tb[k].shape:
                parts.append(f"{k}: shape or presence")
                continue
            d = np.abs(ta[k].astype(np.float64) - tb[k].astype(np.float64))
            if d.size and d.max() > 0:
                parts.append(f"{k}: max |a - b| {d.max():.3g} in {int((d > 0).sum())} of {d.size}")
        return "; ".join(parts) or "same tensors, other bytes"
    return "bytes"


def scratch_project(root: Path, params: dict, prefect: dict, **extra_env: str) -> dict:
    """A copy of the pipeline (code, dvc.yaml) with its own params; returns its env."""
    for d in ("stages", "flows"):
        shutil.copytree(REPO / d, root / d, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(REPO / "data/prompts", root / "data/prompts")  # hand-written sets (in git)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {
        **os.environ,
        "PYTHONPATH": str(root),
        "PREFECT_HOME": prefect["home"],
        "PREFECT_API_URL": prefect["url"],
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
        # `dvc` and the stages' `python` must be this environment's, activated or not
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        **extra_env,
    }
    env.pop("FEATURE_ATLAS_PARENT_RUN_ID", None)
    return env


def audited_env(root: Path, base: dict, net_log: Path) -> dict:
    """`base` for the project at `root`, with every Python process recording any attempt
    to reach another host in `net_log` (_netaudit/sitecustomize.py) and the telemetry
    muting variables removed."""
    env = {**base, "PYTHONPATH": f"{root}{os.pathsep}{NETAUDIT}", "ATLAS_NET_LOG": str(net_log),
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}"}  # fmt: skip
    for k in MUTING:
        env.pop(k, None)
    return env


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory, prefect_api) -> dict:
    """The whole tiny pipeline, run once by `dvc repro` under the network audit, with the
    project's DVC settings (.dvc/config, .dvcignore). Shared by the e2e and kill tests:
    never changed by a test. Tests copy it (`copy_project`); a copy that keeps
    mlflow.db logs new runs' artifacts under this project's mlruns/ (MLflow's artifact
    location is absolute), which no test reads."""
    root = tmp_path_factory.mktemp("tiny-pipeline")
    net_log = root.parent / "tiny-pipeline-net.log"
    env = audited_env(root, scratch_project(root, TINY, prefect_api), net_log)
    run(["git", "init", "-q"], root, env)
    run(["dvc", "init", "-q"], root, env)
    for f in (".dvc/config", ".dvcignore"):
        shutil.copy(REPO / f, root / f)
    t0 = time.perf_counter()
    first = run(["dvc", "repro"], root, env)
    return {"root": root, "env": env, "net_log": net_log, "first": first,
            "first_s": time.perf_counter() - t0,
            "lock": yaml.safe_load((root / "dvc.lock").read_text())}  # fmt: skip


def copy_project(pipeline: dict, dst: Path, net_log: Path, mlflow: bool = True) -> dict:
    """A copy of `tiny_pipeline` at `dst` (with or without its MLflow store); its env."""
    skip = () if mlflow else ("mlflow.db", "mlruns")
    shutil.copytree(pipeline["root"], dst, ignore=shutil.ignore_patterns(*skip))
    return audited_env(dst, pipeline["env"], net_log)
