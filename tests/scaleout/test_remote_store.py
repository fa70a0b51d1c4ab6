"""Activation stores written straight to object storage (`activations.store.url`), on a
local S3 server (moto): the remote bytes equal a local store's, DVC sees a small pointer,
readers follow it, an interrupted cache resumes, and a bad URL fails before any work.

The library tests use the tiny model of tests/backbone/_cache_script.py; the stage test
runs the real `activations@tiny` flow (both runners, a 2-worker Dask cluster) in a
scratch project.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import fsspec
import numpy as np
import pytest
import s3fs
import torch

from stages.activations import (
    ActivationStore,
    CorruptStoreError,
    StoreURLError,
    cache_activations,
    cache_shards,
    prepare_cache,
    shard_runs,
)
from stages.config import ParamsError, StoreParams, parse_params
from tests._servers import free_port
from tests.backbone import _cache_script

REPO = Path(__file__).resolve().parents[2]
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
META = ["token_ids", "doc_ids", "positions", "char_start", "char_end", "split"]
HOOKS_1 = ["blocks.0.hook_resid_post", "blocks.0.hook_mlp_out"]  # the 1-layer stage test
SMALL = {"seq_len": 16, "batch_size": 8, "shard_rows": 128, "chunk_rows": 64}  # 14 shards


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test here on one torch thread (tests/conftest.py)."""


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The tiny store written locally (activations.store.url: null)."""
    out = tmp_path_factory.mktemp("ref") / "store"
    torch.set_num_threads(1)
    _cache_script.run(out)
    return out


def _cache(out: Path, url: str | None, model_inputs=None) -> dict:
    model, inputs = model_inputs or _cache_script.tiny_setup()
    return cache_activations(model, "tiny", HOOKS, inputs, StoreParams(**SMALL, url=url), out)


def _remote(fs, url: str) -> dict[str, bytes]:
    root = url.removeprefix("s3://").rstrip("/")
    fs.invalidate_cache()
    return {p[len(root) + 1 :]: fs.cat(p) for p in fs.find(root)}


def _local(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in folder.rglob("*") if p.is_file()}  # fmt: skip


def _same_rows(a: ActivationStore, b: ActivationStore, names: list[str]) -> None:
    assert a.n_rows == b.n_rows and a.hooks == b.hooks and a.attrs == b.attrs
    for name in names:
        x, y = a.read(name), b.read(name)
        assert x.dtype == y.dtype and np.array_equal(x, y), name


def test_cache_to_s3_leaves_a_pointer_and_the_bytes_of_a_local_store(s3_env, tmp_path, reference):
    url = s3_env.url("atlas/activations")
    out = tmp_path / "data" / "activations" / "tiny"
    res = _cache(out, url)
    # DVC's output is one small file; nothing else is left locally
    assert [p.name for p in out.iterdir()] == ["remote.json"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["tiny"]
    pointer = json.loads((out / "remote.json").read_text())
    assert (out / "remote.json").stat().st_size < 8_000
    store_url = pointer["url"]
    assert store_url == f"{url}/tiny/{pointer['fingerprint'][:16]}" == res["url"]
    assert pointer["n_rows"] == (96 + 16) * 15 and pointer["hooks"] == HOOKS

    # the remote objects are the local store's files, byte for byte, plus complete.json
    fs = fsspec.filesystem("s3", **s3_env.storage_options)
    remote = _remote(fs, store_url)
    assert json.loads(remote["complete.json"]) == {"fingerprint": pointer["fingerprint"]}
    assert remote == {**_local(reference), "complete.json": remote["complete.json"]}
    assert set(pointer["files"]) == set(remote) | {"complete.json"}
    assert all(len(f["etag"]) == 32 for f in pointer["files"].values())  # S3's MD5 ETag

    # every consumer opens data/activations/<model> and gets the remote rows
    store = ActivationStore(out)
    assert str(store.path) == store_url and store.pointer == store.descriptor == out / "remote.json"
    assert ActivationStore(reference).descriptor == reference / "zarr.json"  # (flows/saes.py)
    _same_rows(ActivationStore(reference), store, [*HOOKS, *META])
    assert np.array_equal(store.source(HOOKS[1], "heldout").read(3, 70),
                          ActivationStore(reference).source(HOOKS[1], "heldout").read(3, 70))  # fmt: skip

    # same inputs, same URL: the re-run finds the store complete and computes nothing
    before = (out / "remote.json").read_bytes()
    model, inputs = _cache_script.tiny_setup()
    model.blocks[0].hook_resid_post.add_hook(lambda act, hook: pytest.fail("a forward pass"))
    assert _cache(out, url, (model, inputs))["rows_computed"] == 0
    assert _remote(fs, store_url) == remote and (out / "remote.json").read_bytes() == before


def test_an_interrupted_remote_cache_resumes_and_matches(s3_env, tmp_path, reference):
    url = s3_env.url("acts")
    out = tmp_path / "tiny"
    model, inputs = _cache_script.tiny_setup()
    plan = prepare_cache(model, "tiny", HOOKS, inputs, StoreParams(**SMALL, url=url), out)
    first = shard_runs(plan.todo(), 3)[0]
    cache_shards(model, plan, first, progress=False)  # ... and then the run dies
    assert plan.done() == set(first) and not out.exists()
    with pytest.raises(FileNotFoundError, match="still being written"):
        ActivationStore(plan.url)

    res = _cache(out, url, (model, inputs))
    assert res["resumed_from_shard"] == first[-1] + 1
    assert res["rows_computed"] == plan.n_rows - len(first) * SMALL["shard_rows"]
    remote = _remote(fsspec.filesystem("s3", **s3_env.storage_options), plan.url)
    remote.pop("complete.json")
    assert remote == _local(reference)  # no marker or progress file is left
    _same_rows(ActivationStore(reference), ActivationStore(out), [*HOOKS, *META])


def test_a_pointer_to_a_changed_incomplete_or_missing_store_is_refused(s3_env, tmp_path):
    out = tmp_path / "tiny"
    _cache(out, s3_env.url("acts"))
    ptr = out / "remote.json"
    url = json.loads(ptr.read_text())["url"]
    fs = fsspec.filesystem("s3", **s3_env.storage_options)
    with pytest.MonkeyPatch.context() as mp:  # the endpoint is down
        mp.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
        mp.setenv("AWS_MAX_ATTEMPTS", "1")
        s3fs.S3FileSystem.clear_instance_cache()
        with pytest.raises(ConnectionError, match=f"^{ptr}: cannot read .* it points to, {url} "):
            ActivationStore(out)
    s3fs.S3FileSystem.clear_instance_cache()

    shard = f"{url}/{HOOKS[0]}/c/3/0"
    data = bytearray(fs.cat(shard))
    data[100] ^= 0xFF  # same size: only the ETag tells
    fs.pipe(shard, bytes(data))
    with pytest.raises(CorruptStoreError, match=f"^{ptr}: {shard} is .*the pointer lists"):
        ActivationStore(out)
    fs.rm(f"{url}/complete.json")
    with pytest.raises(FileNotFoundError, match=f"^{ptr}: .* it points to, {url}, is incomplete"):
        ActivationStore(out)
    fs.rm(url, recursive=True)
    with pytest.raises(FileNotFoundError, match=f"^{ptr}: .* it points to, {url}, is missing"):
        ActivationStore(out)


def test_a_bad_url_fails_before_any_forward_pass_and_leaves_nothing(s3_env, tmp_path,
                                                                     monkeypatch):  # fmt: skip
    raw = {"models": {"m": {"source": "toy"}},
           "activations": {"store": {"url": "foo://x"}, "hooks": {"m": HOOKS}}}  # fmt: skip
    with pytest.raises(ParamsError, match=r"^params.yaml: activations.store.url = 'foo://x', "
                       r"expected an fsspec URL .*\(protocol 'foo' is unknown to fsspec\)$"):  # fmt: skip
        parse_params(raw)

    model, inputs = _cache_script.tiny_setup()
    forwards = []
    model.blocks[0].hook_resid_post.add_hook(lambda act, hook: forwards.append(1))
    out = tmp_path / "data" / "tiny"
    bucket = f"no-such-{uuid.uuid4().hex[:8]}"
    with pytest.raises(StoreURLError, match=rf"^params.yaml: activations.store.url = 's3://"
                       rf"{bucket}/acts': cannot write there \(.*bucket does not exist"):  # fmt: skip
        _cache(out, f"s3://{bucket}/acts", (model, inputs))

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")  # nobody there
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    with pytest.raises(StoreURLError, match=r"activations.store.url = .*Could not connect"):
        _cache(out, s3_env.url("acts"), (model, inputs))
    assert forwards == [] and not (tmp_path / "data").exists()


def test_a_shared_filesystem_url_works_the_same(tmp_path, reference):
    out = tmp_path / "tiny"
    _cache(out, f"file://{tmp_path}/shared")
    pointer = json.loads((out / "remote.json").read_text())
    assert pointer["url"].startswith(f"file://{tmp_path}/shared/tiny/")
    assert all(set(f) == {"size"} for f in pointer["files"].values())  # no ETag on a disk
    _same_rows(ActivationStore(reference), ActivationStore(out), [*HOOKS, *META])


# ---------------------------------------------------------------------------- the stage


def _scratch_project(root: Path) -> None:
    """data/corpus and data/models/tiny as the corpus and lm stages write them (an
    untrained toy model: caching does not care), and the params with `url: __URL__`."""
    from stages.config import CorpusParams, ToyModel
    from stages.corpus import build_toy_corpus, write_corpus
    from stages.models import build_toy_model, save_toy_model, train_tokenizer

    cp = CorpusParams.model_validate({"heldout_fraction": 0.2, "toy": {"n_docs": 40, "seed": 1}})
    corpus = build_toy_corpus(cp)
    write_corpus(corpus, root / "data/corpus", cp)
    toy = {"source": "toy", "tokenizer": {"vocab_size": 400}, "train": {"seq_len": 32},
           "arch": {"n_layers": 1, "d_model": 16, "n_heads": 2, "d_mlp": 32, "n_ctx": 32}}  # fmt: skip
    m = ToyModel.model_validate(toy)
    (root / "tok").mkdir()
    tok = train_tokenizer(corpus.texts, 400, root / "tok")
    (root / "data/models/tiny").mkdir(parents=True)
    save_toy_model(build_toy_model(m, tok).eval(), m, root / "tok", root / "data/models/tiny")
    store = {"seq_len": 32, "batch_size": 16, "shard_rows": 1024, "chunk_rows": 256,
             "url": "__URL__"}  # fmt: skip
    params = {"corpus": cp.model_dump(mode="json"), "models": {"tiny": toy},
              "activations": {"store": store, "hooks": {"tiny": HOOKS_1}}}  # fmt: skip
    text = json.dumps(params, indent=1).replace('"__URL__"', "__URL__")  # JSON is YAML
    (root / "params.template.yaml").write_text(text)


@pytest.mark.slow  # ~45 s: a Prefect server, the stage 5 times, a 2-worker Dask cluster
def test_the_stage_caches_to_s3_on_both_runners_with_the_same_bytes(s3_env, tmp_path,
                                                                    prefect_server):  # fmt: skip
    root = tmp_path / "project"
    _scratch_project(root)
    bucket = s3_env.url().rstrip("/")
    missing = f"s3://no-such-{uuid.uuid4().hex[:8]}/acts"
    steps = [
        {"url": "foo://x", "runner": "local"},
        {"url": missing, "runner": "local"},
        {"url": None, "runner": "local", "move_to": "../local-store"},
        {"url": f"{bucket}/local", "runner": "local", "move_to": "../pointer-local"},
        {"url": f"{bucket}/dask", "runner": "dask", "move_to": "../pointer-dask"},
    ]
    (tmp_path / "steps.json").write_text(json.dumps(steps))
    # What a researcher sets: credentials and endpoint in the environment, nothing in params
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PREFECT_", "ATLAS_")) and k != "AWS_ENDPOINT_URL_S3"}  # fmt: skip
    # one Prefect server for the stage process and the Dask workers (without it each
    # worker would start a temporary one)
    env |= {"AWS_ENDPOINT_URL": s3_env.endpoint_url, "PYTHONPATH": str(REPO),
            "PREFECT_API_URL": prefect_server["url"], "PREFECT_HOME": str(tmp_path / "prefect"),
            "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}", "ATLAS_DASK_WORKERS": "2"}  # fmt: skip
    p = subprocess.run([sys.executable, "-m", "tests.scaleout._activation_flows",
                        str(tmp_path / "steps.json"), str(tmp_path / "results.json")],
                       cwd=root, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert p.returncode == 0, p.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    log = p.stdout + p.stderr

    # a bad url: one line naming the key, before any work (nothing under data/activations)
    assert [r["rc"] for r in results] == [2, 1, 0, 0, 0], log[-4000:]
    assert ("error: params.yaml: activations.store.url = 'foo://x', expected an fsspec URL "
            "such as 's3://bucket/atlas/activations' (protocol 'foo' is unknown to fsspec)") in log  # fmt: skip
    assert (f"error: activations@tiny: params.yaml: activations.store.url = '{missing}': "
            "cannot write there (FileNotFoundError: The specified bucket does not exist") in log  # fmt: skip
    assert results[0]["left"] == results[1]["left"] == []
    assert "shards in 2 runs on Dask workers" in log

    ref, ptrs = tmp_path / "local-store", [tmp_path / "pointer-local", tmp_path / "pointer-dask"]
    pointers = [json.loads((d / "remote.json").read_text()) for d in ptrs]
    for d in ptrs:
        assert [f.name for f in d.iterdir()] == ["remote.json"]
    # the same store, at two URLs; the metric counts the remote files
    assert pointers[0].pop("url") == f"{bucket}/local/tiny/{pointers[0]['fingerprint'][:16]}"
    assert pointers[1].pop("url") == f"{bucket}/dask/tiny/{pointers[1]['fingerprint'][:16]}"
    assert pointers[0] == pointers[1] and len(pointers[0]["files"]) >= 10
    assert results[3]["metrics"] == results[4]["metrics"]
    assert results[3]["metrics"]["n_files"] == results[2]["metrics"]["n_files"] + 1

    fs = fsspec.filesystem("s3", **s3_env.storage_options)
    by_local_runner = _remote(fs, f"{bucket}/local/tiny/{pointers[0]['fingerprint'][:16]}")
    by_dask = _remote(fs, f"{bucket}/dask/tiny/{pointers[1]['fingerprint'][:16]}")
    assert by_local_runner == by_dask
    by_dask.pop("complete.json")
    assert by_dask == _local(ref)

    store = ActivationStore(ref)
    names = [*store.hooks, *META, "concept_labels"]
    for d in ptrs:
        _same_rows(store, ActivationStore(d), names)
