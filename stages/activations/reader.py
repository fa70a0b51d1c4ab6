"""Reading a store: `ActivationStore` (local, or followed through its pointer to object
storage), `ActivationSource` (one hook's rows of one split) and `read_rows`, which
reports a chunk failing its checksum as the shard file that holds it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import zarr
from upath import UPath

from stages.activations.storage import (
    COMPLETE,
    POINTER,
    PROGRESS,
    CorruptStoreError,
    check_files,
    forget_listings,
    get_json,
    is_local,
    is_unfinished,
    open_group,
    remote_manifest,
)
from stages.io import read_json


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
        if is_local(self.path) and (self.path / POINTER).is_file():
            self.pointer = Path(self.path) / POINTER
            self.path = _follow_pointer(self.pointer, storage_options)
        if not (self.path / "zarr.json").exists():
            raise FileNotFoundError(
                f"{self.path}: no activation store here; expected the activations stage's "
                "output (run `dvc repro activations`)"
            )
        if self.pointer is None and is_unfinished(self.path):  # (a pointer's is checked above)
            raise FileNotFoundError(
                f"{self.path}: an activation store still being written ({PROGRESS}, no "
                f"{COMPLETE}); expected a complete store: re-run the activations stage"
            )
        check_files(self.path)  # a missing shard would read as zeros
        self.group = open_group(self.path, "r")
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
    forget_listings(where)
    try:
        done = get_json(where / COMPLETE)
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
