"""The activation store: exact values, layout, labels, resume after kill -9."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from stages.activations import ActivationStore, token_concept_labels
from stages.tokens import Tokenised, pack_windows
from tests.backbone import _cache_script

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]


def test_pack_windows_rule():
    tok = Tokenised(
        ids=[np.array([5, 6, 7], np.int32), np.array([8, 9], np.int32)],
        starts=[np.array([0, 2, 4], np.int32), np.array([0, 3], np.int32)],
        ends=[np.array([1, 3, 5], np.int32), np.array([2, 4], np.int32)],
    )
    w = pack_windows(tok, [10, 11], seq_len=4, bos_id=0, sep_id=1)
    # stream: 1 5 6 7 1 8 9 -> windows of BOS + 3
    assert w.tokens.tolist() == [[0, 1, 5, 6], [0, 7, 1, 8]]
    assert w.doc_ids.tolist() == [[-1, 10, 10, 10], [-1, 10, 11, 11]]
    assert w.char_start[1].tolist() == [0, 4, 0, 0] and w.char_end[1].tolist() == [0, 5, 0, 2]


def test_token_concept_labels_overlap_rule():
    doc = np.array([0, 0, 0, 1, 1], np.int32)
    cs = np.array([0, 0, 4, 0, 3], np.int32)  # row 1 is an empty separator span
    ce = np.array([0, 3, 8, 2, 9], np.int32)
    labels = pa.table(
        {
            "doc_id": [0, 0, 1],
            "char_start": [4, 1, 5],
            "char_end": [8, 2, 7],
            "concept": ["dog", "colour", "dog"],
        }
    )
    out = token_concept_labels(doc, cs, ce, labels, ["dog", "colour"])
    assert out.tolist() == [[0, 0], [0, 1], [1, 0], [0, 0], [1, 0]]


def test_cached_values_equal_a_plain_forward(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "store"
    _cache_script.run(out)
    model, inputs = _cache_script.tiny_setup()
    store = ActivationStore(out)
    assert store.hooks == HOOKS and store.seq_len == 16
    assert store.n_rows == (96 + 16) * 15 and store.heldout_start == 96 * 15
    tokens = torch.from_numpy(
        np.concatenate([inputs.train.tokens, inputs.heldout.tokens]).astype(np.int64)
    )
    _, cache = model.run_with_cache(tokens, names_filter=HOOKS)
    for h in HOOKS:
        want = cache[h][:, 1:].reshape(-1, 16).to(torch.float16).numpy()
        got = store.read(h)
        assert got.dtype == np.float16 and np.array_equal(got, want)
    assert np.array_equal(store.read("split"), np.r_[np.zeros(96 * 15), np.ones(16 * 15)])
    assert store.read("positions")[:15].tolist() == list(range(1, 16))
    # BOS re-inserted windows are exactly what the model saw
    assert torch.equal(store.windows("heldout"), tokens[96:])
    src = store.source("blocks.1.hook_mlp_out", "heldout")
    assert src.n_rows == 16 * 15 and src.d_in == 16
    assert np.array_equal(
        src.read(0, 10), store.read("blocks.1.hook_mlp_out")[96 * 15 : 96 * 15 + 10]
    )
    n_files = sum(1 for p in out.rglob("*") if p.is_file())
    # one file per shard per hook (14 shards of 128 rows), one per metadata array,
    # plus the zarr.json of the group and of each array, plus manifest.json: never one
    # file per chunk
    assert n_files == len(HOOKS) * 14 + 6 + (1 + len(HOOKS) + 6) + 1
    assert not (tmp_path / "store.partial").exists()


def test_kill_9_then_rerun_resumes_and_matches(tmp_path):
    ref = tmp_path / "ref"
    _cache_script.run(ref)
    out = tmp_path / "killed"
    partial = tmp_path / "killed.partial"
    env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.backbone._cache_script", str(out), "0.05"], env=env
    )
    deadline = time.time() + 120
    markers = partial / "done"  # one marker file per complete shard
    while time.time() < deadline:
        if markers.exists() and any(markers.iterdir()):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "a killed run must not leave a final-looking output"
    done = sorted(int(f.name) for f in markers.iterdir())
    assert 1 <= len(done) < 14 and done == list(range(len(done)))
    _cache_script.run(out)  # re-run resumes
    a, b = ActivationStore(ref), ActivationStore(out)
    for name in [*HOOKS, "token_ids", "doc_ids", "positions", "char_start", "char_end", "split"]:
        assert np.array_equal(a.read(name), b.read(name)), name
    assert not partial.exists()


def test_missing_store_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="no activation store here"):
        ActivationStore(tmp_path / "nothing")


def test_flipped_byte_in_a_shard_names_the_file(tmp_path):
    out = tmp_path / "store"
    _cache_script.run(out)
    shard = out / "blocks.0.hook_resid_post" / "c" / "1" / "0"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    from stages.activations import CorruptStoreError

    store = ActivationStore(out)
    with pytest.raises(CorruptStoreError, match=rf"^{re.escape(str(shard))}: stored data fails"):
        store.read("blocks.0.hook_resid_post")
    src = store.source("blocks.0.hook_resid_post", "train")
    assert src.read(0, 128).shape == (128, 16)  # shard 0 is intact
    with pytest.raises(CorruptStoreError, match=re.escape(str(shard))):
        src.read(0, 256)


def test_missing_or_empty_shard_files_are_refused_not_read_as_zeros(tmp_path):
    """Issue 20 item 3: zarr reads a shard file that is not there as fill_value zeros."""
    from stages.activations import CorruptStoreError

    ref = tmp_path / "ref"
    _cache_script.run(ref)
    manifest = json.loads((ref / "manifest.json").read_text())["files"]
    assert manifest["token_ids/c/0"] > 0 and manifest["blocks.1.hook_mlp_out/c/13/0"] > 0
    for rel, how in (("blocks.1.hook_mlp_out/c/13/0", "missing"), ("token_ids/c/0", "empty"),
                     ("concept_labels/c/0/0", "missing")):  # fmt: skip
        out = tmp_path / how / rel.replace("/", "_")
        shutil.copytree(ref, out)
        if not (out / rel).exists():
            continue  # (a corpus without labels has no concept_labels)
        if how == "missing":
            (out / rel).unlink()
        else:
            (out / rel).write_bytes(b"")
        with pytest.raises(CorruptStoreError) as e:
            ActivationStore(out)
        msg = str(e.value)
        assert "\n" not in msg and msg.startswith(
            f"{out / rel}: is {how}, the store's manifest.json"
        )
        # ... and the same store opened by URL
        with pytest.raises(CorruptStoreError, match=re.escape(f"{rel}: is {how}")):
            ActivationStore(f"file://{out}")


def test_a_corrupt_1d_chunk_names_its_real_file(tmp_path):
    from stages.activations import CorruptStoreError

    out = tmp_path / "store"
    _cache_script.run(out)
    chunk = out / "token_ids" / "c" / "0"  # a 1-D array: c/<i>, not c/<i>/0
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(CorruptStoreError, match=rf"^{re.escape(str(chunk))}: stored data fails"):
        ActivationStore(out).read("token_ids")


def test_shard_runs_are_contiguous_and_cover_everything():
    from stages.activations import shard_runs

    assert shard_runs(list(range(14)), 1) == [list(range(14))]
    assert shard_runs(list(range(14)), 2) == [list(range(7)), list(range(7, 14))]
    runs = shard_runs([0, 1, 5, 6, 7, 8, 9, 10], 3)
    assert sorted(i for r in runs for i in r) == [0, 1, 5, 6, 7, 8, 9, 10]
    assert all(r == list(range(r[0], r[-1] + 1)) for r in runs) and len(runs) == 3


def test_shards_filled_out_of_order_by_separate_runs_match_one_pass(tmp_path):
    """What Dask workers do: disjoint shard runs, in any order, each batch-aligned to the
    store's start; batches that straddle two runs are computed twice. Same bytes."""
    from stages.activations import cache_shards, finish_cache, prepare_cache, shard_runs
    from stages.config import StoreParams

    ref = tmp_path / "ref"
    _cache_script.run(ref)
    model, inputs = _cache_script.tiny_setup()
    params = StoreParams(seq_len=16, batch_size=8, shard_rows=128, chunk_rows=64)
    out = tmp_path / "split"
    plan = prepare_cache(model, "tiny", HOOKS, inputs, params, out)
    runs = shard_runs(plan.todo(), 3)
    assert len(runs) == 3 and plan.n_shards == 14
    # 128-row shards of 15-row windows: every run boundary falls inside a batch. Each
    # run gets the part of the plan a Dask task is sent: only its own token windows.
    sent = []
    for run in reversed(runs):
        part = plan.part(run)
        sent.append(len(part.tokens))
        cache_shards(model, part, run, progress=False)
    finish_cache(plan)
    # 112 windows (1680 rows) in batches of 8: the runs of shards 0-4, 5-9 and 10-13
    # (rows 0-639, 640-1279, 1280-1679) read windows 0-47, 40-87 and 80-111; a batch
    # that straddles two runs goes to both. Sent in reverse order:
    assert len(plan.tokens) == 112 and sent == [32, 48, 48]
    assert np.array_equal(plan.part(runs[1]).tokens, plan.tokens[40:88])
    with pytest.raises(ValueError, match=r"need windows 80\.\.112, the plan holds 40\.\.88"):
        cache_shards(model, plan.part(runs[1]), runs[2])
    a, b = ActivationStore(ref), ActivationStore(out)
    for name in [*HOOKS, "token_ids", "positions"]:
        assert np.array_equal(a.read(name), b.read(name)), name
    with pytest.raises(ValueError, match="not one contiguous run"):
        cache_shards(model, plan, [0, 2])


def test_bf16_cache_is_close_marked_and_never_mixed_with_fp32(tmp_path):
    """compute.precision bf16: rows near the fp32 ones (bf16 matmuls), a store that says
    so, a fingerprint of its own (a partial fp32 store is not resumed in bf16), and a
    forward of the wrong precision refused."""
    from stages.activations import cache_activations, cache_shards, prepare_cache
    from stages.compute import Device
    from stages.config import StoreParams

    torch.set_num_threads(1)
    model, inputs = _cache_script.tiny_setup()
    params = StoreParams(seq_len=16, batch_size=8, shard_rows=128, chunk_rows=64)
    cache_activations(model, "tiny", HOOKS, inputs, params, tmp_path / "fp32",
                      device=Device("cpu"))  # fmt: skip
    cache_activations(model, "tiny", HOOKS, inputs, params, tmp_path / "bf16",
                      device=Device("cpu", "bf16"))  # fmt: skip
    a, b = ActivationStore(tmp_path / "fp32"), ActivationStore(tmp_path / "bf16")
    assert "precision" not in a.attrs and b.attrs["precision"] == "bf16"
    for h in HOOKS:
        x, y = a.read(h).astype(np.float32), b.read(h).astype(np.float32)
        rel = np.linalg.norm(x - y) / np.linalg.norm(x)
        assert 0 < rel < 0.02, (h, rel)  # measured: 0.005 and 0.007 (8-bit mantissa)
    assert np.array_equal(a.read("token_ids"), b.read("token_ids"))
    p32 = prepare_cache(model, "tiny", HOOKS, inputs, params, tmp_path / "x")
    cache_shards(model, p32, [0, 1], progress=False)
    assert p32.done() == {0, 1}
    p16 = prepare_cache(model, "tiny", HOOKS, inputs, params, tmp_path / "x", precision="bf16")
    assert p32.fingerprint != p16.fingerprint and p16.precision == "bf16"
    assert p16.todo() == list(range(p16.n_shards))  # the fp32 partial was not resumed
    with pytest.raises(ValueError, match="a fp32 forward for a store prepared as bf16"):
        cache_shards(model, p16, [0], device=Device("cpu"))


def test_windows_of_another_length_and_unknown_hooks_are_refused(tmp_path):
    from stages.activations import check_hooks, prepare_cache
    from stages.config import StoreParams

    model, inputs = _cache_script.tiny_setup()  # 16-token windows
    with pytest.raises(ValueError, match=r"train windows have 16 tokens, expected "
                       r"activations\.store\.seq_len = 32"):  # fmt: skip
        prepare_cache(model, "tiny", HOOKS, inputs, StoreParams(seq_len=32), tmp_path / "x")
    assert not list(tmp_path.iterdir())  # refused before anything was written
    with pytest.raises(ValueError, match=r"^steering\.hooks\[1\] = 'blocks\.1\.resid_post', "
                       r"expected a hook of this model \(did you mean blocks\.1\.hook_resid_post"):  # fmt: skip
        check_hooks(model, [HOOKS[0], "blocks.1.resid_post"], "steering.hooks")
