"""Writing a store, resumably (over 500 lines: planning, the shard runs and finishing
share one resume rule and one crash-safe layout, and split apart each would re-derive
them): plan it (`prepare_cache`), fill runs of shards
(`cache_shards`, on Dask workers or one after another), finish it (`finish_cache`);
`cache_activations` does all three in one process. See the package docstring for the
layout and the resume rule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import queue
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm
from upath import UPath
from zarr.codecs import Crc32cCodec, ZstdCodec

from stages.activations.budget import StoreBudget, check_budget, plan_store
from stages.activations.config import StoreParams
from stages.activations.hook_names import hook_width
from stages.activations.hooks import stop_layer
from stages.activations.labels import token_concept_labels
from stages.activations.storage import (
    COMPLETE,
    DONE,
    META_ARRAYS,
    POINTER,
    PROGRESS,
    check_store_url,
    forget_listings,
    get_json,
    is_local,
    open_group,
    put_json,
    remote_manifest,
    write_manifest,
)
from stages.compute import CPU, Device, on_device, to_numpy
from stages.io import atomic_dir, replace_dir, write_json
from stages.tokens import Windows

if TYPE_CHECKING:
    import pyarrow as pa
    from transformer_lens import HookedTransformer

log = logging.getLogger(__name__)


@dataclass
class CacheInputs:
    """Everything to cache for one model: packed train + held-out windows and labels."""

    train: Windows
    heldout: Windows
    labels: pa.Table | None
    concept_names: list[str]
    corpus_hash: str


def cache_inputs(corpus_dir: Path, tokenizer, params: StoreParams) -> CacheInputs:
    """What to cache from the corpus at `corpus_dir`: both splits' windows of
    `params.seq_len` tokens (training capped at `params.max_train_tokens`) and the labels."""
    from stages.corpus import read_corpus
    from stages.models import corpus_windows

    c = read_corpus(corpus_dir)
    seq = params.seq_len
    return CacheInputs(
        corpus_windows(c, tokenizer, seq, "train", params.max_train_tokens),
        corpus_windows(c, tokenizer, seq, "heldout"),
        c.labels if c.labels.num_rows else None,
        [k.name for k in c.concepts],
        c.meta["corpus_hash"],
    )


def _rows(w: Windows) -> dict[str, np.ndarray]:
    return {
        "token_ids": w.tokens[:, 1:].reshape(-1).astype(np.int32),
        "doc_ids": w.doc_ids[:, 1:].reshape(-1).astype(np.int32),
        "positions": np.tile(np.arange(1, w.tokens.shape[1], dtype=np.int16), w.n),
        "char_start": w.char_start[:, 1:].reshape(-1),
        "char_end": w.char_end[:, 1:].reshape(-1),
    }


def store_budget(model: HookedTransformer, model_name: str, hooks: list[str],
                 inputs: CacheInputs, params: StoreParams) -> StoreBudget:  # fmt: skip
    """The disk and memory `prepare_cache` + `cache_shards` will need for this store
    (`stages/activations/budget.py`), from the arrays `prepare_cache` creates."""
    widths = {h: hook_width(h, model.cfg.d_model, model.cfg.d_mlp) for h in hooks}
    span = inputs.train.char_start.dtype.itemsize  # `_rows`, then the split
    meta = {"token_ids": 4, "doc_ids": 4, "positions": 2, "char_start": span, "char_end": span,
            "split": 1}  # fmt: skip
    labelled = inputs.labels is not None and bool(inputs.concept_names)
    attrs = len(json.dumps([hooks, inputs.concept_names, _what_is_stored(params)]))
    return plan_store(model, model_name, widths, inputs, params, meta,
                      len(inputs.concept_names) if labelled else 0, attrs)  # fmt: skip


def _what_is_stored(params: StoreParams) -> dict:
    """The store params that shape its bytes: all but `url`, which says only where it goes
    (so a store in object storage is the same bytes as a local one, and the same inputs
    give the same fingerprint wherever they are written)."""
    return params.model_dump(mode="json", exclude={"url"})


def _fingerprint(model_name: str, hooks: list[str], params: StoreParams,
                 inputs: CacheInputs, model_hash: str) -> str:  # fmt: skip
    h = hashlib.sha256()
    h.update(json.dumps([model_name, hooks, _what_is_stored(params), inputs.corpus_hash,
                         model_hash, inputs.train.n, inputs.heldout.n]).encode())  # fmt: skip
    h.update(inputs.train.tokens.tobytes())
    h.update(inputs.heldout.tokens.tobytes())
    return h.hexdigest()


def _create(group: zarr.Group, name: str, shape: tuple, dtype, p: StoreParams, compress: bool):
    rest = shape[1:]
    # Row metadata is small once compressed: one shard file for the whole array.
    shard_rows = p.shard_rows if not compress else -(-shape[0] // p.chunk_rows) * p.chunk_rows
    return group.create_array(
        name,
        shape=shape,
        chunks=(p.chunk_rows, *rest),
        shards=(max(shard_rows, p.chunk_rows), *rest),
        dtype=dtype,
        # Activations barely compress; row metadata compresses very well. Every chunk
        # gets a CRC32C so corruption is detected on read.
        compressors=[ZstdCodec(level=3), Crc32cCodec()] if compress else [Crc32cCodec()],
        fill_value=0,
        overwrite=True,
    )


@dataclass
class CachePlan:
    """A store being written: where, its row geometry, and which shards are still to do.

    Everything a worker needs to fill some of the shards (picklable: send it to Dask).
    `partial` is where the store is written until complete: `<out>.partial/`, or with
    `activations.store.url` the store's own folder in object storage (`url`), since
    nothing is renamed there; `out` is the local output (the store, or its pointer).
    """

    partial: Path | UPath
    out: Path
    hooks: list[str]
    dtype: str
    tokens: np.ndarray  # [n_windows, seq_len] train then held-out windows, BOS first
    n_rows: int
    n_train_rows: int
    shard_rows: int
    batch_size: int
    fingerprint: str
    model_name: str
    url: str | None = None  # the store in object storage; None: a local store
    precision: str = "fp32"  # compute.precision of the forward (its rows differ under bf16)
    window0: int = 0  # the store's window index of tokens[0] (a `part` holds a slice)

    @property
    def body(self) -> int:
        return self.tokens.shape[1] - 1

    def windows(self, shards: list[int]) -> tuple[int, int]:
        """The windows `cache_shards(shards)` runs forward: whole batches, aligned to
        multiples of `batch_size` from the store's first window (see there)."""
        first_row = shards[0] * self.shard_rows
        end_row = min((shards[-1] + 1) * self.shard_rows, self.n_rows)
        start = (first_row // self.body) // self.batch_size * self.batch_size
        last = (-(-end_row // self.body) - 1) // self.batch_size * self.batch_size
        return start, min(last + self.batch_size, self.n_rows // self.body)

    def part(self, shards: list[int]) -> CachePlan:
        """This plan holding only the token windows that `cache_shards(shards)` reads:
        what one Dask task is sent (the whole array is 4 bytes a token, 400 MB at 100M
        tokens, and would otherwise travel to every task)."""
        w0, w1 = self.windows(shards)
        tokens = self.tokens[w0 - self.window0 : w1 - self.window0].copy()
        return dataclasses.replace(self, tokens=tokens, window0=w0)

    @property
    def n_shards(self) -> int:
        return -(-self.n_rows // self.shard_rows)

    def done(self) -> set[int]:
        """Shards complete on disk (a marker file per shard, written after its data)."""
        d = self.partial / DONE
        if self.url is not None:
            forget_listings(d)  # other processes (Dask workers) add markers
            if (self.partial / COMPLETE).exists():  # its markers are gone by now
                return set(range(self.n_shards))
        return {int(f.name) for f in d.iterdir()} if d.exists() else set()

    def todo(self) -> list[int]:
        done = self.done()
        return [i for i in range(self.n_shards) if i not in done]


def shard_runs(shards: list[int], n_parts: int) -> list[list[int]]:
    """Split shard ids into at most `n_parts` contiguous runs of similar size (document
    ranges: windows are in corpus order), never joining ids that are not adjacent."""
    runs: list[list[int]] = []
    for i in sorted(shards):
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    parts = max(n_parts, len(runs))
    out: list[list[int]] = []
    for r in runs:  # cut each run into pieces proportional to its length
        k = max(1, round(parts * len(r) / max(1, len(shards))))
        step = -(-len(r) // k)
        out.extend(r[j : j + step] for j in range(0, len(r), step))
    return out


def prepare_cache(
    model: HookedTransformer,
    model_name: str,
    hooks: list[str],
    inputs: CacheInputs,
    params: StoreParams,
    out: Path,
    model_hash: str = "",
    extra_attrs: dict | None = None,
    precision: str = "fp32",
    cuda: bool = False,
) -> CachePlan:
    """Create (or find, to resume) `<out>.partial/` with every array and row metadata
    written; activations are then filled shard by shard by `cache_shards`.

    First the budget (`stages/activations/budget.py`): the disk and memory the store
    needs, refused with the numbers (BudgetError) when this machine has less, and the
    plan printed. With `params.url` the store goes to
    `<url>/<model_name>/<fingerprint[:16]>/` instead (checked writable first); a complete
    store found there is used as it is."""
    out = Path(out)
    dtype = np.dtype(params.dtype)
    seq_len = inputs.train.tokens.shape[1]
    for split, w in (("train", inputs.train), ("heldout", inputs.heldout)):
        if w.tokens.shape[1] != params.seq_len:  # the store's attrs would disagree with its rows
            raise ValueError(
                f"{split} windows have {w.tokens.shape[1]} tokens, expected "
                f"activations.store.seq_len = {params.seq_len} (make them with that seq_len)"
            )
    body = seq_len - 1
    n_train_rows = inputs.train.n * body
    n_rows = n_train_rows + inputs.heldout.n * body
    fp = _fingerprint(model_name, hooks, params, inputs, model_hash)
    if precision != "fp32":  # other rows; fp32 keeps the fingerprints stores already have
        fp = hashlib.sha256(f"{fp}/{precision}".encode()).hexdigest()
        extra_attrs = {**(extra_attrs or {}), "precision": precision}
    if params.url:
        check_store_url(params.url)
        partial = UPath(params.url) / model_name / fp[:16]
    else:
        partial = out.with_name(out.name + ".partial")
    budget = store_budget(model, model_name, hooks, inputs, params)
    print(check_budget(budget, out, None if params.url else partial, params.url, cuda))
    plan = CachePlan(partial, out, list(hooks), params.dtype,
                     np.concatenate([inputs.train.tokens, inputs.heldout.tokens]), n_rows,
                     n_train_rows, params.shard_rows, params.batch_size, fp, model_name,
                     str(partial) if params.url else None, precision)  # fmt: skip

    forget_listings(partial)
    progress = get_json(partial / PROGRESS)
    if plan.url is not None:
        complete = get_json(partial / COMPLETE)
        for marker in (complete, progress):  # content-addressed: never written over
            if marker is not None and marker.get("fingerprint") != fp:
                raise RuntimeError(f"{partial}: holds a store of other inputs (fingerprint "
                                   f"{marker.get('fingerprint')}, expected {fp})")  # fmt: skip
        if complete is not None:
            log.info("activation store already complete at %s", partial)
            return plan
    if progress is not None and progress.get("fingerprint") == fp:
        log.info("resuming activation cache: %d/%d shards done", len(plan.done()), plan.n_shards)
        return plan
    if plan.url is None and partial.exists():
        log.info("discarding stale partial cache %s", partial)
        shutil.rmtree(partial)
    # (in object storage, mode "w" clears what an interrupted start of this store left)
    group = open_group(partial, "w")
    rows = {k: np.concatenate([a, b]) for (k, a), b in
            zip(_rows(inputs.train).items(), _rows(inputs.heldout).values(), strict=True)}  # fmt: skip
    rows["split"] = np.concatenate(
        [np.zeros(n_train_rows, np.uint8), np.ones(n_rows - n_train_rows, np.uint8)]
    )
    for name in META_ARRAYS:
        _create(group, name, (n_rows,), rows[name].dtype, params, compress=True)[:] = rows[name]
    if inputs.labels is not None and inputs.concept_names:  # a corpus without labels has none
        labels = token_concept_labels(rows["doc_ids"], rows["char_start"], rows["char_end"],
                                      inputs.labels, inputs.concept_names)  # fmt: skip
        _create(group, "concept_labels", labels.shape, np.uint8, params, True)[:] = labels
    d_of = {}
    for h in hooks:
        d_of[h] = hook_width(h, model.cfg.d_model, model.cfg.d_mlp)
        _create(group, h, (n_rows, d_of[h]), dtype, params, compress=False)
    group.attrs.update(
        {
            "format": "feature-atlas/activations/1",
            "model": model_name,
            "hooks": hooks,
            "d": d_of,
            "d_model": model.cfg.d_model,
            "dtype": params.dtype,
            "corpus_hash": inputs.corpus_hash,
            "model_hash": model_hash,
            "params": _what_is_stored(params),
            "n_rows": n_rows,
            "heldout_start": n_train_rows,
            "seq_len": seq_len,
            "bos_excluded": True,
            "concept_names": inputs.concept_names,
            "bos_id": int(model.tokenizer.bos_token_id),
            **(extra_attrs or {}),
        }
    )
    if is_local(partial):  # object storage has no folders: the markers make their own
        (partial / DONE).mkdir()
    put_json(partial / PROGRESS, {"fingerprint": fp})
    return plan


def cache_shards(model: HookedTransformer, plan: CachePlan, shards: list[int],
                 progress: bool = True, device: Device = CPU) -> dict:  # fmt: skip
    """Compute and write the given contiguous run of shards (any process may do any run),
    the forward on `device` (`stages.compute`; bf16 matmuls when its precision says so).

    Forward batches start at multiples of `batch_size` windows from the first window of
    the store, whoever computes them, so every row is bit-for-bit what a single
    uninterrupted pass computes; a batch that straddles two runs is computed by both,
    each keeping its own rows. Each shard gets its marker once its data is on disk.
    """
    if not shards:
        return {"rows_computed": 0, "forward_s": 0.0, "enqueue_wait_s": 0.0}
    if list(shards) != list(range(shards[0], shards[0] + len(shards))):
        raise ValueError(f"cache_shards: shards {shards} are not one contiguous run")
    if device.precision != plan.precision:
        raise ValueError(f"cache_shards: a {device.precision} forward for a store prepared "
                         f"as {plan.precision} (compute.precision)")  # fmt: skip
    hooks, body, shard, bs = plan.hooks, plan.body, plan.shard_rows, plan.batch_size
    dtype = np.dtype(plan.dtype)
    first_row = shards[0] * shard
    end_row = min((shards[-1] + 1) * shard, plan.n_rows)
    start_window, end_window = plan.windows(shards)
    have = (plan.window0, plan.window0 + len(plan.tokens))
    if start_window < have[0] or end_window > have[1]:
        raise ValueError(f"cache_shards: shards {shards[0]}..{shards[-1]} need windows "
                         f"{start_window}..{end_window}, the plan holds {have[0]}..{have[1]}")  # fmt: skip
    group = open_group(plan.partial, "r+")
    arrays = {h: group[h] for h in hooks}

    q: queue.Queue = queue.Queue(maxsize=4)
    err: list[BaseException] = []

    def writer() -> None:
        """Fill one shard-sized buffer per hook; write a shard when full, then mark it."""
        try:
            cur = shards[0]
            lo = cur * shard
            bufs = {h: np.empty((min(shard, plan.n_rows - lo), a.shape[1]), dtype)
                    for h, a in arrays.items()}  # fmt: skip
            fill = 0
            while True:
                item = q.get()
                if item is None:
                    break
                if lo >= end_row:
                    continue
                row0, raw = item
                acts = {h: a[:, 1:].reshape(-1, a.shape[-1]) for h, a in raw.items()}
                n = next(iter(acts.values())).shape[0]
                pos = max(0, lo + fill - row0)  # rows before the shard we are filling
                while pos < n and lo < end_row:
                    take = min(n - pos, len(bufs[hooks[0]]) - fill)
                    for h in hooks:
                        bufs[h][fill : fill + take] = acts[h][pos : pos + take]
                    fill += take
                    pos += take
                    if fill == len(bufs[hooks[0]]):
                        for h in hooks:
                            arrays[h][lo : lo + fill] = bufs[h]
                        (plan.partial / DONE / str(cur)).touch()
                        cur += 1
                        lo, fill = cur * shard, 0
                        if lo < end_row:
                            bufs = {h: np.empty((min(shard, plan.n_rows - lo), a.shape[1]),
                                                dtype) for h, a in arrays.items()}  # fmt: skip
        except BaseException as e:  # surfaced in the main thread
            err.append(e)
            while q.get() is not None:
                pass

    thread = threading.Thread(target=writer, name="zarr-writer", daemon=True)
    thread.start()

    stop = stop_layer(model, hooks)
    captured: dict[str, torch.Tensor] = {}

    def grab(act: torch.Tensor, hook) -> None:
        captured[hook.name] = act

    fwd_hooks = [(h, grab) for h in hooks]
    t_forward = t_put = 0.0
    bar = tqdm(total=end_row - first_row, desc=f"cache {plan.model_name} shards "
               f"{shards[0]}..{shards[-1]}", unit="tok", unit_scale=True, disable=not progress)  # fmt: skip
    on = device.torch
    with torch.inference_mode(), on_device(model, device), device.autocast():
        for w0 in range(start_window, end_window, bs):
            if err:
                break
            w1 = min(w0 + bs, end_window)
            rows = plan.tokens[w0 - plan.window0 : w1 - plan.window0]
            batch = torch.from_numpy(rows.astype(np.int64)).to(on)
            t0 = time.perf_counter()
            model.run_with_hooks(batch, fwd_hooks=fwd_hooks, stop_at_layer=stop)
            # Hand over the raw [batch, seq, d] tensors: dropping BOS and the float16
            # conversion happen in the writer thread, overlapping the next forward (on
            # a GPU the copy to host memory waits for the forward: it is the sync point).
            acts = {h: to_numpy(captured[h]) for h in hooks}
            t1 = time.perf_counter()
            q.put((w0 * body, acts))
            t_forward += t1 - t0
            t_put += time.perf_counter() - t1
            bar.update(max(0, min(w1 * body, end_row) - max(first_row, w0 * body)))
    q.put(None)
    thread.join()
    bar.close()
    if err:
        raise err[0]
    missing = sorted(set(shards) - plan.done())
    if missing:
        raise RuntimeError(f"{plan.partial}: shards {missing} were not written")
    return {"rows_computed": end_row - first_row, "forward_s": t_forward,
            "enqueue_wait_s": t_put}  # fmt: skip


def finish_cache(plan: CachePlan) -> None:
    """Check every shard is marked, then move the store into place in one rename.

    In object storage: record completion (`complete.json`) first, so an interruption
    from here on loses nothing, then remove the markers, then write the pointer folder
    at `out` (atomically) listing every remote file."""
    missing = plan.todo()
    if missing:
        raise RuntimeError(f"{plan.partial}: {len(missing)}/{plan.n_shards} shards missing "
                           f"(first {missing[0]})")  # fmt: skip
    if plan.url is None:
        shutil.rmtree(plan.partial / DONE)
        (plan.partial / PROGRESS).unlink()
        write_manifest(plan.partial)
        replace_dir(plan.partial, plan.out)
        return
    where = plan.partial
    if not (where / COMPLETE).exists():
        write_manifest(where)
        put_json(where / COMPLETE, {"fingerprint": plan.fingerprint})
    for leftover in (where / DONE, where / PROGRESS):
        with contextlib.suppress(FileNotFoundError):
            where.fs.rm(leftover.path, recursive=True)
    pointer = {"format": "feature-atlas/activations-pointer/1", "url": plan.url,
               "fingerprint": plan.fingerprint, "model": plan.model_name, "hooks": plan.hooks,
               "n_rows": plan.n_rows, "files": remote_manifest(where)}  # fmt: skip
    with atomic_dir(plan.out) as tmp:
        write_json(tmp / POINTER, pointer)


def cache_activations(
    model: HookedTransformer,
    model_name: str,
    hooks: list[str],
    inputs: CacheInputs,
    params: StoreParams,
    out: Path,
    model_hash: str = "",
    extra_attrs: dict | None = None,
    device: Device = CPU,
) -> dict:
    """Run the model over all windows and write the store at `out` (resumable, atomic);
    with `params.url`, write it in object storage and a pointer to it at `out`.

    One process, all shards still to do; `flows/activations.py` spreads the same
    `cache_shards` calls over Dask workers instead. Returns a summary dict (rows,
    throughput, seconds in forward vs waiting on writes).
    """
    plan = prepare_cache(model, model_name, hooks, inputs, params, out, model_hash, extra_attrs,
                         device.precision, device.is_cuda)  # fmt: skip
    todo = plan.todo()
    stats = [cache_shards(model, plan, run, device=device) for run in shard_runs(todo, 1)]
    finish_cache(plan)
    return summarize_cache(plan, stats, todo)


def summarize_cache(plan: CachePlan, stats: list[dict], todo: list[int]) -> dict:
    """The summary of a cache run: `stats` from `cache_shards`, `todo` the shards that
    were still to do when it started (a resumed run starts after shard 0)."""
    done_rows = sum(s["rows_computed"] for s in stats)
    t_forward = sum(s["forward_s"] for s in stats)
    return {
        "n_rows": plan.n_rows,
        "heldout_start": plan.n_train_rows,
        "rows_computed": done_rows,
        "forward_s": t_forward,
        "enqueue_wait_s": sum(s["enqueue_wait_s"] for s in stats),
        "tokens_per_s_forward": done_rows / max(t_forward, 1e-9),
        "resumed_from_shard": todo[0] if todo else 0,
        "url": plan.url,  # where the store is, when in object storage
    }
