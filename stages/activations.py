"""The activation store: one sharded zarr group per model.

Layout of `data/activations/<model>/` (the one source of truth for it; read it with
`ActivationStore`):

    <hook>            float16 [n_rows, d]   one array per hook, e.g. blocks.1.hook_resid_post
    token_ids         int32   [n_rows]
    doc_ids           int32   [n_rows]      corpus document id
    positions         int16   [n_rows]      position in the context window (1 .. seq_len-1)
    char_start        int32   [n_rows]      character span of the token in its document
    char_end          int32   [n_rows]      (empty span for the separator opening a document)
    split             uint8   [n_rows]      0 = train, 1 = held-out (held-out rows form the tail)
    concept_labels    uint8   [n_rows, n_concepts]   1 where the token overlaps a labelled span
                                            (absent when the corpus has no labels)

Rows are windows of `seq_len` tokens packed by the rule in `stages/tokens.py`, minus
the BOS at position 0. Group attributes hold the model, hooks, dtype, corpus hash,
params, `heldout_start`, `seq_len`, `bos_id` and `concept_names`.

Arrays are sharded (`shard_rows` rows per file) so a store has tens of files, and
every chunk carries a CRC32C checksum so a flipped byte is detected on read. zarr reads
a shard file that is not there as zeros (fill_value), so the finished store lists every
file it wrote with its size in `manifest.json`, and `ActivationStore` refuses a store
whose listed files are missing, empty or of another size, naming the file.

Caching is resumable: rows are written shard by shard into `<out>.partial/`, a
marker file per shard (`done/<i>`) records the shards that are complete, and a re-run
after `kill -9` continues from there. Shards are independent, so Dask workers can fill
disjoint runs of them at once (`prepare_cache` → `cache_shards` per run → `finish_cache`).
Forward batches are aligned to the same window boundaries on resume, so the result is
identical, array for array, to an uninterrupted run. The folder is renamed into place
only when complete.

In object storage (`activations.store.url`, e.g. `s3://bucket/atlas/activations`)
nothing is renamed: the store is written in place at `<url>/<model>/<fingerprint[:16]>/`,
content-addressed by its inputs, with the same markers beside it. When every shard is
marked, `complete.json` is written there (then the markers are removed), and `<out>/`
becomes a small pointer folder, `remote.json` (URL, fingerprint, rows, hooks and every
remote file's size and ETag), which is what DVC tracks. `ActivationStore(<out>)` follows
the pointer, refusing a remote store that is gone, incomplete or differs from the
pointer's manifest. Same inputs ⇒ same URL, so a re-run resumes or finds it complete;
an old store is never overwritten or deleted. The remote bytes equal a local store's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import logging
import queue
import shutil
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import zarr
from tqdm.auto import tqdm
from upath import UPath
from zarr.codecs import Crc32cCodec, ZstdCodec

from stages.activations_config import StoreParams
from stages.compute import CPU, Device, on_device, to_numpy
from stages.hooks import hook_layer, hook_width
from stages.io import atomic_dir, read_json, replace_dir, write_json
from stages.tokens import Windows

if TYPE_CHECKING:
    import pyarrow as pa
    from transformer_lens import HookedTransformer

log = logging.getLogger(__name__)

META_ARRAYS = ("token_ids", "doc_ids", "positions", "char_start", "char_end", "split")
PROGRESS = "progress.json"
DONE = "done"  # one empty marker file per complete shard
COMPLETE = "complete.json"  # a store in object storage is complete once this is there
POINTER = "remote.json"  # the local output of a store in object storage
MANIFEST = "manifest.json"  # every file of a finished store and its size (see check_files)


# ---------------------------------------------------------------------------- labels


def token_concept_labels(
    doc_ids: np.ndarray,
    char_start: np.ndarray,
    char_end: np.ndarray,
    labels: pa.Table,
    concept_names: list[str],
) -> np.ndarray:
    """uint8 [n_rows, n_concepts]: 1 where a token's span overlaps a labelled span.

    Vectorised: rows and label spans are mapped into one global character axis
    (document d occupies [d * stride, d * stride + len)), where rows are sorted, so each
    span's rows are found with two searchsorted calls and marked with a difference array.
    """
    n, k = len(doc_ids), len(concept_names)
    out = np.zeros((n, k), np.uint8)
    if n == 0 or k == 0 or labels.num_rows == 0:
        return out
    stride = np.int64(max(int(char_end.max()), int(labels.column("char_end").to_numpy().max())) + 2)
    # The separator row opening a document has an empty span: it must match nothing.
    empty = char_end <= char_start
    g_start = doc_ids.astype(np.int64) * stride + char_start
    g_end = doc_ids.astype(np.int64) * stride + char_end
    g_end[empty] = g_start[empty]
    # Held-out rows follow the training rows, so sort (stably) onto the global axis.
    order = np.argsort(g_start, kind="stable")
    g_start, g_end = g_start[order], g_end[order]
    if np.any(np.diff(g_end) < 0):
        raise ValueError("token spans overlap out of order; cannot map labels to tokens")
    col = {c: i for i, c in enumerate(concept_names)}
    l_doc = labels.column("doc_id").to_numpy().astype(np.int64)
    l_s = l_doc * stride + labels.column("char_start").to_numpy()
    l_e = l_doc * stride + labels.column("char_end").to_numpy()
    l_c = np.array([col.get(c, -1) for c in labels.column("concept").to_pylist()])
    keep = l_c >= 0
    l_s, l_e, l_c = l_s[keep], l_e[keep], l_c[keep]
    # Rows overlapping [s, e) are those with g_end > s and g_start < e: a contiguous
    # range, since both g_start and g_end are non-decreasing. Empty rows are cleared after.
    i0 = np.searchsorted(g_end, l_s, side="right")
    i1 = np.searchsorted(g_start, l_e, side="left")
    valid = i1 > i0
    diff = np.zeros((n + 1, k), np.int32)
    np.add.at(diff, (i0[valid], l_c[valid]), 1)
    np.add.at(diff, (i1[valid], l_c[valid]), -1)
    out[order] = np.cumsum(diff[:-1], axis=0) > 0
    out[empty] = 0
    return out


# ---------------------------------------------------------------------------- where stores live


class StoreURLError(ValueError):
    """`activations.store.url` cannot be written: caught before any forward pass."""


def _is_local(where: Path | UPath) -> bool:
    return getattr(where, "protocol", "") in ("", "file", "local")


def _open_group(where: Path | UPath, mode: str) -> zarr.Group:
    if _is_local(where):
        return zarr.open_group(Path(where), mode=mode)
    return zarr.open_group(str(where), mode=mode, storage_options=where.storage_options)


def _forget_listings(where: Path | UPath) -> None:
    """Drop fsspec's cached listings of `where` and its parents: another process may have
    written there since (a Dask worker, another run)."""
    if not _is_local(where):
        where.fs.invalidate_cache(where.path)


def _put_json(where: Path | UPath, obj: dict) -> None:
    if _is_local(where):
        write_json(Path(where), obj)  # atomic (tmp + rename)
    else:  # one PUT: an object is there whole or not at all
        where.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _unfinished(where: Path | UPath) -> bool:
    return (where / PROGRESS).exists() and not (where / COMPLETE).exists()


def _get_json(where: Path | UPath) -> dict | None:
    try:
        return json.loads(where.read_text())
    except FileNotFoundError:
        return None


def check_store_url(url: str) -> None:
    """Fail before any work when `activations.store.url` cannot be written there: a
    protocol without its package, an unreachable endpoint, a missing bucket, missing
    credentials. Writes and removes one empty object under `url`."""
    where = f"params.yaml: activations.store.url = {url!r}"
    try:
        root = UPath(url)
        if _is_local(root):  # a shared filesystem; never mkdir on object storage (it
            root.mkdir(parents=True, exist_ok=True)  # would create a missing bucket)
        probe = root / f".write-check-{uuid.uuid4().hex[:12]}"
        probe.write_bytes(b"")
        probe.unlink()
    except Exception as e:  # botocore, aiohttp, ImportError for a missing fsspec backend, ...
        raise StoreURLError(
            f"{where}: cannot write there ({type(e).__name__}: {e}); expected an existing "
            "bucket or folder this machine can write to, with credentials and (for an "
            "S3-compatible store) the endpoint in the environment: AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL"
        ) from None


def remote_manifest(where: UPath) -> dict[str, dict]:
    """Every file of a store in object storage (relative path -> size, and the ETag or MD5
    where the listing carries one, as S3's and GCS's do): one listing, no reads."""
    fs, root = where.fs, where.path.rstrip("/")
    fs.invalidate_cache(root)
    files = {}
    for name, info in fs.find(root, detail=True).items():
        rel = name[len(root) + 1 :]
        if rel == PROGRESS or rel.startswith(f"{DONE}/"):
            continue  # bookkeeping of a run, not part of the store
        entry = {"size": int(info["size"])}
        tag = next((info[k] for k in ("ETag", "etag", "md5Hash") if info.get(k)), None)
        if tag:
            entry["etag"] = str(tag).strip('"')
        files[rel] = entry
    return dict(sorted(files.items()))


def _files(where: Path | UPath) -> dict[str, int]:
    """Relative path -> size of every file of a store (no reads; one listing remotely),
    leaving out a run's bookkeeping and the manifest and completion marker themselves."""
    if _is_local(where):
        root = Path(where)
        sizes = {p.relative_to(root).as_posix(): p.stat().st_size
                 for p in root.rglob("*") if p.is_file()}  # fmt: skip
    else:
        sizes = {rel: e["size"] for rel, e in remote_manifest(where).items()}
    skip = (PROGRESS, MANIFEST, COMPLETE)
    return {rel: n for rel, n in sorted(sizes.items())
            if rel not in skip and not rel.startswith(f"{DONE}/")}  # fmt: skip


def write_manifest(where: Path | UPath) -> dict[str, int]:
    """Record every file of a finished store and its size in `manifest.json` (what
    `check_files` holds the store to). Anyone writing a store by hand calls this last."""
    files = _files(where)
    _put_json(where / MANIFEST, {"format": "feature-atlas/activations-manifest/1",
                                 "files": files})  # fmt: skip
    return files


def check_files(where: Path | UPath) -> None:
    """Refuse a store whose files differ from its manifest: a missing or emptied shard
    would otherwise read as zeros. A store without a manifest (written by hand, or
    before manifests existed) cannot be checked: a warning says so."""
    manifest = _get_json(where / MANIFEST)
    redo = "restore it (`dvc checkout`) or re-run the activations stage"
    if manifest is None:
        log.warning("%s: no %s (a store written before manifests, or by hand): missing shard "
                    "files cannot be detected and would read as zeros; %s", where, MANIFEST, redo)  # fmt: skip
        return
    have = _files(where)
    for rel, size in manifest["files"].items():
        got = have.get(rel)
        if got == size:
            continue
        state = "is missing" if got is None else "is empty" if got == 0 else f"has {got} bytes"
        raise CorruptStoreError(f"{str(where).rstrip('/')}/{rel}: {state}, the store's {MANIFEST} "
                                f"lists {size} bytes (zarr would read it as zeros): {redo}")  # fmt: skip


def count_files(out: Path) -> int:
    """Files of the store at `out`: a local store's own, or those its pointer lists."""
    out = Path(out)
    if (out / POINTER).is_file():
        return len(read_json(out / POINTER)["files"])
    return sum(1 for p in out.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------- writing


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


def stop_layer(model: HookedTransformer, hooks: list[str]) -> int | None:
    """The `stop_at_layer` that runs just far enough to reach every hook."""
    layers = [hook_layer(h) for h in hooks]
    if any(h.startswith("ln_final") for h in hooks):
        return None
    if any(layer is None for layer in layers):  # hook_embed / hook_pos_embed only
        return 0 if all(h in ("hook_embed", "hook_pos_embed") for h in hooks) else None
    # stop_at_layer = n_layers still skips ln_final and the unembedding
    return max(layers) + 1  # type: ignore[type-var]


def check_hooks(model: HookedTransformer, hooks: list[str], where: str) -> None:
    """Every hook is one of the model's; `where` names the list in the error (callers
    reading params pass 'params.yaml: <key>')."""
    for i, h in enumerate(hooks):
        if h not in model.hook_dict:
            near = difflib.get_close_matches(h, list(model.hook_dict), n=3, cutoff=0.6)
            raise ValueError(
                f"{where}[{i}] = {h!r}, expected a hook of this model"
                + (f" (did you mean {', '.join(near)}?)" if near else " (see model.hook_dict)")
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
            _forget_listings(d)  # other processes (Dask workers) add markers
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
) -> CachePlan:
    """Create (or find, to resume) `<out>.partial/` with every array and row metadata
    written; activations are then filled shard by shard by `cache_shards`.

    With `params.url` the store goes to `<url>/<model_name>/<fingerprint[:16]>/` instead
    (checked writable first); a complete store found there is used as it is."""
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
    plan = CachePlan(partial, out, list(hooks), params.dtype,
                     np.concatenate([inputs.train.tokens, inputs.heldout.tokens]), n_rows,
                     n_train_rows, params.shard_rows, params.batch_size, fp, model_name,
                     str(partial) if params.url else None, precision)  # fmt: skip

    _forget_listings(partial)
    progress = _get_json(partial / PROGRESS)
    if plan.url is not None:
        complete = _get_json(partial / COMPLETE)
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
    group = _open_group(partial, "w")
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
    if _is_local(partial):  # object storage has no folders: the markers make their own
        (partial / DONE).mkdir()
    _put_json(partial / PROGRESS, {"fingerprint": fp})
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
    group = _open_group(plan.partial, "r+")
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
        _put_json(where / COMPLETE, {"fingerprint": plan.fingerprint})
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
                         device.precision)  # fmt: skip
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


# ---------------------------------------------------------------------------- reading


class CorruptStoreError(ValueError):
    """A chunk of the store fails its CRC32C checksum (a flipped byte, a bad copy)."""


def read_rows(array: zarr.Array, lo: int, hi: int, root: Path | str) -> np.ndarray:
    """`array[lo:hi]`, with a checksum failure reported as the shard file that holds it."""
    try:
        return array[lo:hi]
    except ValueError as err:
        if "checksum" not in str(err):
            raise
        step = int((array.shards or array.chunks)[0])
        for start in range(lo - lo % step, hi, step):
            try:
                array[max(start, lo) : min(start + step, hi)]
            except ValueError:
                # the shard's file: c/<i> for a 1-D array, c/<i>/0 for a 2-D one
                tail = "/0" * (array.ndim - 1)
                shard = f"{str(root).rstrip('/')}/{array.path}/c/{start // step}{tail}"
                raise CorruptStoreError(
                    f"{shard}: stored data fails its CRC32C checksum (rows {start}.."
                    f"{start + step - 1} of '{array.path}'); the file is corrupt: restore it "
                    "(`dvc checkout`) or re-run the activations stage"
                ) from None
        raise


class ActivationSource:
    """One hook's rows over a contiguous row range, read chunk-aligned (trainer protocol).

    `read(start, stop)` is relative to the range; reads aligned to `chunk_rows` touch
    one chunk each.
    """

    def __init__(self, array: zarr.Array, lo: int, hi: int, name: str, root: Path = Path(".")):
        self.array, self.lo, self.hi, self.name, self.root = array, lo, hi, name, root
        self.n_rows = hi - lo
        self.d_in = int(array.shape[1])
        self.chunk_rows = int(array.chunks[0])

    def read(self, start: int, stop: int) -> np.ndarray:
        if not 0 <= start <= stop <= self.n_rows:
            raise IndexError(f"{self.name}: rows [{start}, {stop}) outside [0, {self.n_rows})")
        return read_rows(self.array, self.lo + start, self.lo + stop, self.root)

    def __repr__(self) -> str:
        return f"ActivationSource({self.name}, rows {self.lo}:{self.hi}, d_in={self.d_in})"


class ActivationStore:
    """Read side of the store. Every reader goes through this class.

    `path` is a local folder or any fsspec URL (`s3://bucket/acts/toy-a`, `gs://...`),
    with `storage_options` for the filesystem (endpoint, credentials); e.g. SAEs trained
    on a cluster straight from a store in object storage (`dvc push` puts it there).
    A local folder holding a pointer (`remote.json`, written when `activations.store.url`
    is set) opens the store it points to, once that is complete and matches the pointer's
    manifest; `path` is then the remote URL and `pointer` the local file.
    """

    def __init__(self, path: str | Path, storage_options: dict | None = None):
        self.path = UPath(path, **(storage_options or {}))
        self.pointer: Path | None = None
        if _is_local(self.path) and (self.path / POINTER).is_file():
            self.pointer = Path(self.path) / POINTER
            self.path = _follow_pointer(self.pointer, storage_options)
        if not (self.path / "zarr.json").exists():
            raise FileNotFoundError(
                f"{self.path}: no activation store here; expected the activations stage's "
                "output (run `dvc repro activations`)"
            )
        if self.pointer is None and _unfinished(self.path):  # (a pointer's is checked above)
            raise FileNotFoundError(
                f"{self.path}: an activation store still being written ({PROGRESS}, no "
                f"{COMPLETE}); expected a complete store: re-run the activations stage"
            )
        check_files(self.path)  # a missing shard would read as zeros
        self.group = _open_group(self.path, "r")
        self.attrs = dict(self.group.attrs)
        self.hooks: list[str] = list(self.attrs["hooks"])
        self.n_rows: int = int(self.attrs["n_rows"])
        self.heldout_start: int = int(self.attrs["heldout_start"])
        self.seq_len: int = int(self.attrs["seq_len"])
        self.concept_names: list[str] = list(self.attrs.get("concept_names", []))
        self.corpus_hash: str = self.attrs["corpus_hash"]

    @property
    def descriptor(self) -> Path:
        """The local file that identifies this store (hash it to key work derived from
        it): its `zarr.json`, or the pointer of a store in object storage."""
        return self.pointer or Path(self.path) / "zarr.json"

    def array(self, name: str) -> zarr.Array:
        try:
            return self.group[name]
        except KeyError:
            raise KeyError(f"{self.path}: no array {name!r}; hooks cached: {self.hooks}") from None

    def d(self, hook: str) -> int:
        return int(self.array(hook).shape[1])

    def source(self, hook: str, split: str = "train") -> ActivationSource:
        lo, hi = self.split_range(split)
        return ActivationSource(self.array(hook), lo, hi, f"{self.path}/{hook}[{split}]", self.path)

    def split_range(self, split: str) -> tuple[int, int]:
        if split == "train":
            return 0, self.heldout_start
        if split == "heldout":
            return self.heldout_start, self.n_rows
        if split == "all":
            return 0, self.n_rows
        raise ValueError(f"split = {split!r}, expected 'train', 'heldout' or 'all'")

    def read(self, name: str, split: str = "all") -> np.ndarray:
        lo, hi = self.split_range(split)
        return read_rows(self.array(name), lo, hi, self.path)

    def windows(self, split: str = "heldout", max_windows: int | None = None) -> torch.Tensor:
        """Token windows [n, seq_len] with BOS re-inserted: what the model saw."""
        lo, hi = self.split_range(split)
        body = self.seq_len - 1
        n = (hi - lo) // body
        if max_windows is not None:
            n = min(n, max_windows)
        toks = read_rows(self.array("token_ids"), lo, lo + n * body, self.path).reshape(n, body)
        bos = np.full((n, 1), int(self.attrs["bos_id"]), np.int32)
        return torch.from_numpy(np.concatenate([bos, toks], axis=1).astype(np.int64))


def _follow_pointer(pointer: Path, storage_options: dict | None) -> UPath:
    """The remote store a pointer names, once checked: complete (`complete.json`, of the
    pointer's fingerprint) and every file the pointer lists there with its size and ETag.
    (Each chunk's CRC32C is checked again on every read.)"""
    meta = read_json(pointer, "the pointer the activations stage writes")
    url = meta["url"]
    where = UPath(url, **(storage_options or {}))
    redo = f"restore it, or re-run `dvc repro -f activations@{meta['model']}`"
    _forget_listings(where)
    try:
        done = _get_json(where / COMPLETE)
    except Exception as e:  # an unreachable endpoint, refused credentials: maybe transient
        raise ConnectionError(f"{pointer}: cannot read the activation store it points to, "
                              f"{url} ({type(e).__name__}: {e}); expected it reachable with "
                              "the credentials and endpoint in the environment (AWS_*)") from e  # fmt: skip
    if done is None:
        state = ("incomplete (still being written, or interrupted)"
                 if (where / PROGRESS).exists() or (where / "zarr.json").exists() else
                 "missing (nothing there, or not reachable with the credentials and endpoint "
                 "in the environment)")  # fmt: skip
        raise FileNotFoundError(f"{pointer}: the activation store it points to, {url}, is "
                                f"{state}; expected a complete store ({COMPLETE}): {redo}")  # fmt: skip
    if done.get("fingerprint") != meta["fingerprint"]:
        raise CorruptStoreError(f"{pointer}: {url} holds a store of fingerprint "
                                f"{done.get('fingerprint')}, expected {meta['fingerprint']}: {redo}")  # fmt: skip
    have = remote_manifest(where)
    for rel, want in meta["files"].items():
        got = have.get(rel)
        if got != want:  # size, and the ETag where the filesystem lists one
            found = "is missing" if got is None else f"is {got}, the pointer lists {want}"
            raise CorruptStoreError(f"{pointer}: {url}/{rel} {found}; the remote store changed "
                                    f"after it was written: {redo}")  # fmt: skip
    return where
