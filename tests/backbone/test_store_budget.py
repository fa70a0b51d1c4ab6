"""The activation store's budget (stages/activations/budget.py): the estimate against the
bytes a real tiny store writes, and refusals with the numbers when disk or memory is short
(the free-space probes overridden by their environment variables, the filesystem real)."""

from __future__ import annotations

import re

import pytest
import torch

from stages.activations import BudgetError, cache_activations, check_budget, store_budget
from stages.activations.budget import ENV_DISK, ENV_MEMORY, array_bytes
from stages.config import StoreParams
from tests.backbone import _cache_script

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
# 112 windows x 15 rows = 1680 rows: 13 full shards of 128 + one of 16 rows (an edge
# chunk padded to 64), so the estimate's rounding is exercised
PARAMS = StoreParams(seq_len=16, batch_size=8, shard_rows=128, chunk_rows=64)


def _budget(model, inputs, params=PARAMS):
    return store_budget(model, "tiny", HOOKS, inputs, params)


def test_estimate_equals_the_bytes_the_store_writes(tmp_path):
    torch.set_num_threads(1)
    out = tmp_path / "store"
    _cache_script.run(out)
    model, inputs = _cache_script.tiny_setup()
    b = _budget(model, inputs)
    files = {p.relative_to(out).as_posix(): p.stat().st_size for p in out.rglob("*") if p.is_file()}
    json_b = sum(n for f, n in files.items() if f.endswith(".json"))
    acts = sum(n for f, n in files.items() if f.split("/")[0] in HOOKS and not f.endswith(".json"))
    meta = sum(files.values()) - json_b - acts
    assert b.n_rows == 1680
    # activations: exact, to the byte: 2 hooks x (13 full shards x (2 chunks x (64 x 16 x 2
    # + 4) + index 2 x 16 + 4) + last shard (1 padded chunk + index))
    assert acts == b.activation_bytes == 2 * (13 * (2 * 2052 + 36) + 2052 + 36) == 111_816
    # metadata: compressed on disk, counted uncompressed: an upper bound, and a tight one
    # is not expected (token ids of a 50-word vocab compress well)
    assert 0 < meta <= b.metadata_bytes
    assert json_b <= b.json_bytes
    assert acts <= sum(files.values()) <= b.disk_bytes
    # the slack this bound allows, here: everything that is not activations
    assert b.disk_bytes - acts == b.metadata_bytes + b.json_bytes


def test_array_bytes_closed_form():
    # one shard, one chunk: 10 rows padded to 64, + CRC32C, + index of 1 slot + its CRC32C
    assert array_bytes(10, 3, 2, 64, 64) == 64 * 3 * 2 + 4 + 16 + 4
    # exactly two full shards of two chunks each
    assert array_bytes(256, 1, 4, 128, 64) == 2 * (2 * (64 * 4 + 4) + 2 * 16 + 4)
    assert array_bytes(0, 8, 2, 128, 64) == 0


def test_refuses_a_store_the_disk_cannot_hold_before_writing(tmp_path, monkeypatch):
    model, inputs = _cache_script.tiny_setup()
    need = _budget(model, inputs).disk_bytes
    monkeypatch.setenv(ENV_DISK, str(need - 1))
    out = tmp_path / "store"
    with pytest.raises(BudgetError) as e:
        cache_activations(model, "tiny", HOOKS, inputs, PARAMS, out)
    msg = str(e.value)
    assert "\n" not in msg
    assert re.fullmatch(
        rf"activations@tiny: the store needs \d+\.\d MiB at {re.escape(str(out))}, "
        r"\d+\.\d MiB free \(rows 1\.7 k × hooks 2 × d 16 × 2 B\); lower "
        r"activations\.store\.max_train_tokens or free space",
        msg,
    ), msg
    assert not out.exists() and not (tmp_path / "store.partial").exists()
    monkeypatch.setenv(ENV_DISK, str(need))  # exactly enough: caches
    cache_activations(model, "tiny", HOOKS, inputs, PARAMS, out)
    assert out.is_dir()


def test_refuses_when_memory_is_short_and_names_the_knob(tmp_path, monkeypatch):
    model, inputs = _cache_script.tiny_setup()
    b = _budget(model, inputs)
    monkeypatch.setenv(ENV_MEMORY, str(b.memory_bytes - 1))
    with pytest.raises(BudgetError, match=r"caching needs .* of memory, .* available .* "
                       r"lower activations\.store\.batch_size or shard_rows"):  # fmt: skip
        cache_activations(model, "tiny", HOOKS, inputs, PARAMS, tmp_path / "store")
    # a bigger batch needs more: the forward term grows with batch_size x seq_len
    bigger = _budget(model, inputs, PARAMS.model_copy(update={"batch_size": 64}))
    assert bigger.forward_bytes == 8 * b.forward_bytes


def test_object_storage_is_not_checked_but_said(tmp_path, monkeypatch):
    model, inputs = _cache_script.tiny_setup()
    monkeypatch.setenv(ENV_DISK, "0")
    line = check_budget(_budget(model, inputs), tmp_path / "out", None, "s3://bucket/acts")
    assert (
        "s3://bucket/acts (object storage: free space cannot be checked here; proceeding)" in line
    )
    assert line.startswith("activations@tiny: plan rows 1.7 k × hooks 2 × d 16 × 2 B = ")
