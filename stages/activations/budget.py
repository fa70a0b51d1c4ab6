"""What a store will cost before it is cached: disk at its output and memory while caching,
checked against what this machine has (`prepare_cache` refuses, with the numbers, before
it writes anything), and a time estimate from a measured per-token rate when one is at hand.

Disk, per hook array (`writer._create`: raw values + a CRC32C per chunk, `shard_rows` rows
per shard file): every chunk that holds a row is written whole (an edge chunk padded to
`chunk_rows` rows) as `chunk_rows x d x itemsize + 4` bytes, and every shard file ends in
its index, 16 bytes per chunk slot + a 4-byte CRC32C. That part is exact (the test checks
it to the byte). The row metadata arrays (token ids, doc ids, positions, character spans,
split, concept labels) are zstd-compressed, so their on-disk size depends on the data: the
estimate counts them uncompressed (+64 bytes a chunk for zstd's frame on data that does
not compress), an upper bound. The JSON files (the group's and each array's `zarr.json`,
`manifest.json`) are allowed 8 KiB each + 160 bytes a listed file; the group's attributes
(which list the concept names) are measured. So: actual ≤ estimate, and estimate − actual
is at most the metadata's compression plus that JSON allowance.

Memory, the peak of the cache run (host memory; on a CUDA device the forward's share is
checked against the GPU's free memory instead):
- the token windows the plan holds (int32);
- while preparing: the row metadata, built whole and written once (x2 for the
  concatenation's temporaries);
- while caching: one forward batch, `batch_size x seq_len x (sum of hook widths + what one
  block of the model holds at once)` in the model's dtype: the block's residual copies and
  layer-norm outputs (8 x d_model), q/k/v/z (4 x n_heads x d_head), attention scores and
  pattern (2 x n_heads x seq_len) and the MLP's pre/post activations (2 x d_mlp); TL's
  hooks keep every one of these alive until the block ends, earlier blocks' are freed
  under inference_mode. Plus the captured batches in flight to the writer thread (its
  queue holds 4, the writer 1 more) and the writer's shard buffers (x2: zarr encodes a
  copy).
The model's weights are already loaded when this runs, so `available` excludes them.
An upper bound, not a fit: on the toy shape (2 layers, d 128, d_mlp 512, 3 hooks, 512
windows of 128) the plan said 447 MiB at batch 64 and 1215 MiB at batch 256, the process's
peak RSS grew by 397 and 738 MiB (one run each, this machine, 2026-12).

The free-space probes read the real filesystem (`shutil.disk_usage` at the output, or its
nearest existing parent) and `psutil.virtual_memory().available`. `ATLAS_FREE_DISK_BYTES`
and `ATLAS_FREE_MEMORY_BYTES` override them (a test, or a user who wants headroom). A store
in object storage (`activations.store.url`) cannot be checked for space: the plan says so
and goes on.

Time: `RATES` (`.benchmarks/activation_rates.json`, machine-local, not a DVC output) keeps
the last measured forward rate of every model cached here and of the GPT-2-shape benchmark
(`benchmarks/gpt2_estimate.py`) as FLOP/s. A model's own rate is used if recorded, else the
best FLOP/s recorded on this machine divided by the model's forward FLOPs per token; with
neither, the plan gives no minutes. The FLOP route suits models big enough to be
matmul-bound (GPT-2 small, from the GPT-2-shape benchmark: 81 % of this CPU's GEMM rate);
a tiny model is bound by per-op overhead and runs far below it, so for one the figure is a
lower bound until its own rate is recorded (after its first cache here).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

GiB = 1024**3
RATES = Path(".benchmarks/activation_rates.json")
ENV_DISK, ENV_MEMORY = "ATLAS_FREE_DISK_BYTES", "ATLAS_FREE_MEMORY_BYTES"
JSON_FILE_BYTES, MANIFEST_ENTRY_BYTES = 8192, 160
ZSTD_FRAME_BYTES = 64  # per chunk, on data that does not compress
QUEUED_BATCHES = 5  # writer queue maxsize 4, + the one the writer thread is copying


class BudgetError(ValueError):
    """The store does not fit on this disk, or caching would not fit in memory."""


def array_bytes(n_rows: int, width: int, itemsize: int, shard_rows: int, chunk_rows: int) -> int:
    """Bytes on disk of one uncompressed, CRC32C-checked, sharded [n_rows, width] array as
    `writer._create` writes it (exact; see the module docstring)."""
    chunk = chunk_rows * width * itemsize + 4
    index = (shard_rows // chunk_rows) * 16 + 4
    full, rest = divmod(n_rows, shard_rows)
    return full * ((shard_rows // chunk_rows) * chunk + index) + (
        (math.ceil(rest / chunk_rows) * chunk + index) if rest else 0
    )


def forward_flops_per_token(n_layers: int, d_model: int, d_mlp: int, seq_len: int) -> float:
    """Blocks only (caching stops after the last hooked block: no unembedding): QKV/O and
    MLP matmuls, attention scores/values at the mean causal context of a window."""
    return n_layers * (2 * (4 * d_model * d_model + 2 * d_model * d_mlp)
                       + 2 * 2 * (seq_len / 2) * d_model)  # fmt: skip


@dataclass
class StoreBudget:
    """What caching one store needs (bytes) and, when a rate is at hand, how long."""

    model_name: str
    n_rows: int
    widths: dict[str, int]
    itemsize: int
    activation_bytes: int  # exact
    metadata_bytes: int  # upper bound (uncompressed)
    json_bytes: int  # allowance
    memory_bytes: int  # host memory peak
    forward_bytes: int  # one forward batch (on the GPU when the device is one)
    flops_per_token: float
    seconds: float | None = None  # from a measured rate, when one is at hand
    rate_from: str = ""

    @property
    def disk_bytes(self) -> int:
        return self.activation_bytes + self.metadata_bytes + self.json_bytes

    def shape(self) -> str:
        """rows x hooks x d x bytes, the words of the message."""
        ws = sorted(set(self.widths.values()))
        d = f"d {ws[0]}" if len(ws) == 1 else "d " + "/".join(map(str, ws))
        return (f"rows {_count(self.n_rows)} × hooks {len(self.widths)} × {d} × "
                f"{self.itemsize} B")  # fmt: skip

    def line(self, where: str) -> str:
        """The plan, printed before every cache run."""
        t = ""
        if self.seconds is not None:
            took = f"{self.seconds / 60:.1f} min" if self.seconds >= 60 else f"{self.seconds:.0f} s"
            t = f", ~{took} of forward at {self.rate_from}"
        return (f"activations@{self.model_name}: plan {self.shape()} = {_gib(self.disk_bytes)} "
                f"at {where} (activations {_gib(self.activation_bytes)}, metadata ≤ "
                f"{_gib(self.metadata_bytes)}), memory peak {_gib(self.memory_bytes)}{t}")  # fmt: skip


def _gib(n: float) -> str:
    if n >= 0.1 * GiB:
        return f"{n / GiB:.1f} GiB"
    return f"{n / 1024**2:.1f} MiB" if n >= 0.1 * 1024**2 else f"{n / 1024:.1f} KiB"


def _count(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n / 1e3:.1f} k" if n >= 1e3 else str(n)


def plan_store(model, model_name: str, widths: dict[str, int], inputs, params,
               meta: dict[str, int], n_concepts: int, attrs_bytes: int = 0) -> StoreBudget:  # fmt: skip
    """The budget of caching `inputs` at `widths` (hook -> width) with store `params`;
    `meta` is the itemsize of every row metadata array (name -> bytes)."""
    import numpy as np

    cfg = model.cfg
    body = params.seq_len - 1
    n_windows = inputs.train.n + inputs.heldout.n
    n_rows = n_windows * body
    itemsize = np.dtype(params.dtype).itemsize
    S, C = params.shard_rows, params.chunk_rows
    acts = sum(array_bytes(n_rows, w, itemsize, S, C) for w in widths.values())
    chunks = math.ceil(n_rows / C)
    per_row = sum(meta.values()) + n_concepts
    metadata = chunks * C * per_row + (len(meta) + (n_concepts > 0)) * chunks * (
        ZSTD_FRAME_BYTES + 4
    )
    n_arrays = len(widths) + len(meta) + (n_concepts > 0)
    n_files = len(widths) * math.ceil(n_rows / S) + len(meta) + (n_concepts > 0) + n_arrays + 1
    json_b = (n_arrays + 2) * JSON_FILE_BYTES + n_files * MANIFEST_ENTRY_BYTES + attrs_bytes

    act_b = np.dtype(str(cfg.dtype).removeprefix("torch.")).itemsize
    in_model = 8 * cfg.d_model + 4 * cfg.n_heads * cfg.d_head + 2 * cfg.n_heads * params.seq_len
    in_model += 2 * (cfg.d_mlp or 0)
    sum_w = sum(widths.values())
    tokens = params.batch_size * params.seq_len
    forward = tokens * (sum_w + in_model) * act_b
    in_flight = QUEUED_BATCHES * tokens * sum_w * act_b
    buffers = 2 * min(S, n_rows) * sum_w * itemsize
    windows_b = n_windows * params.seq_len * 4
    prepare = 2 * n_rows * per_row
    budget = StoreBudget(model_name, n_rows, dict(widths), itemsize, acts, metadata, json_b,
                         windows_b + max(prepare, forward + in_flight + buffers), forward,
                         forward_flops_per_token(cfg.n_layers, cfg.d_model, cfg.d_mlp or 0,
                                                 params.seq_len))  # fmt: skip
    rate, budget.rate_from = measured_rate(model_name, budget.flops_per_token)
    if rate:
        budget.seconds = n_rows / rate
    return budget


def measured_rate(model_name: str, flops_per_token: float) -> tuple[float | None, str]:
    """Tokens/s for `model_name` from `RATES`: its own last rate, else the best FLOP/s
    recorded here over its FLOPs per token; (None, '') when nothing was measured."""
    try:
        rates = json.loads(RATES.read_text())
    except (FileNotFoundError, ValueError):
        return None, ""
    own = rates.get(model_name)
    if own and own.get("tokens_per_s"):
        return own["tokens_per_s"], f"{own['tokens_per_s']:,.0f} tok/s measured here"
    best = max((r.get("flops_per_s", 0) for r in rates.values()), default=0)
    if best and flops_per_token:
        return best / flops_per_token, f"{best / 1e9:.0f} GFLOP/s measured here"
    return None, ""


def record_rate(model_name: str, tokens_per_s: float, flops_per_token: float) -> None:
    """Keep a measured forward rate in `RATES` for the next plan (machine-local)."""
    try:
        rates = json.loads(RATES.read_text())
    except (FileNotFoundError, ValueError):
        rates = {}
    rates[model_name] = {"tokens_per_s": tokens_per_s,
                         "flops_per_s": tokens_per_s * flops_per_token}  # fmt: skip
    RATES.parent.mkdir(parents=True, exist_ok=True)
    tmp = RATES.with_suffix(".tmp")
    tmp.write_text(json.dumps(rates, indent=2, sort_keys=True) + "\n")
    tmp.replace(RATES)


def _env_bytes(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None:
        return None
    try:
        return int(float(v))
    except ValueError:
        raise BudgetError(f"{name} = {v!r}: expected a number of bytes") from None


def free_disk(where: Path) -> int:
    """Free bytes on the filesystem that will hold `where` (its nearest existing parent)."""
    env = _env_bytes(ENV_DISK)
    if env is not None:
        return env
    p = Path(where).absolute()
    while not p.exists():
        p = p.parent
    return shutil.disk_usage(p).free


def free_memory() -> int:
    env = _env_bytes(ENV_MEMORY)
    if env is not None:
        return env
    import psutil

    return psutil.virtual_memory().available


def _size(where: Path) -> int:
    if not where.exists():
        return 0
    return sum(f.stat().st_size for f in where.rglob("*") if f.is_file())


def check_budget(b: StoreBudget, out: Path, partial: Path | None, url: str | None,
                 cuda: bool = False) -> str:  # fmt: skip
    """Refuse (BudgetError, one line with the numbers) a store that will not fit; return
    the plan line. A partial store already there counts as space (resumed, its bytes are
    kept; stale, it is removed first)."""
    if url:
        where = f"{url} (object storage: free space cannot be checked here; proceeding)"
    else:
        where = str(out)
        need = b.disk_bytes - _size(partial) if partial is not None else b.disk_bytes
        free = free_disk(partial or out)
        if need > free:
            raise BudgetError(
                f"activations@{b.model_name}: the store needs {_gib(need)} at {out}, "
                f"{_gib(free)} free ({b.shape()}); lower activations.store.max_train_tokens "
                "or free space"
            )
    host = b.memory_bytes - (b.forward_bytes if cuda else 0)
    avail = free_memory()
    if host > avail:
        raise BudgetError(
            f"activations@{b.model_name}: caching needs {_gib(host)} of memory, "
            f"{_gib(avail)} available (forward batch {_gib(b.forward_bytes)}, the rest "
            "batches in flight, shard buffers and windows); lower activations.store.batch_size "
            "or shard_rows"
        )
    if cuda:
        import torch

        gpu_free = torch.cuda.mem_get_info()[0]
        if b.forward_bytes > gpu_free:
            raise BudgetError(
                f"activations@{b.model_name}: a forward batch needs {_gib(b.forward_bytes)} "
                f"on the GPU, {_gib(gpu_free)} free; lower activations.store.batch_size"
            )
    return b.line(where)
