"""Where stores live: a local folder or object storage (`activations.store.url`), and
the files that say what a store holds: progress markers, `manifest.json`, the
completion marker and the pointer DVC tracks for a store in object storage.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import zarr
from upath import UPath

from stages.io import read_json, write_json

log = logging.getLogger(__name__)


META_ARRAYS = ("token_ids", "doc_ids", "positions", "char_start", "char_end", "split")
PROGRESS = "progress.json"
DONE = "done"  # one empty marker file per complete shard
COMPLETE = "complete.json"  # a store in object storage is complete once this is there
POINTER = "remote.json"  # the local output of a store in object storage
MANIFEST = "manifest.json"  # every file of a finished store and its size (see check_files)


class CorruptStoreError(ValueError):
    """A chunk of the store fails its CRC32C checksum (a flipped byte, a bad copy)."""


class StoreURLError(ValueError):
    """`activations.store.url` cannot be written: caught before any forward pass."""


def is_local(where: Path | UPath) -> bool:
    return getattr(where, "protocol", "") in ("", "file", "local")


def open_group(where: Path | UPath, mode: str) -> zarr.Group:
    if is_local(where):
        return zarr.open_group(Path(where), mode=mode)
    return zarr.open_group(str(where), mode=mode, storage_options=where.storage_options)


def forget_listings(where: Path | UPath) -> None:
    """Drop fsspec's cached listings of `where` and its parents: another process may have
    written there since (a Dask worker, another run)."""
    if not is_local(where):
        where.fs.invalidate_cache(where.path)


def put_json(where: Path | UPath, obj: dict) -> None:
    if is_local(where):
        write_json(Path(where), obj)  # atomic (tmp + rename)
    else:  # one PUT: an object is there whole or not at all
        where.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def is_unfinished(where: Path | UPath) -> bool:
    return (where / PROGRESS).exists() and not (where / COMPLETE).exists()


def get_json(where: Path | UPath) -> dict | None:
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
        if is_local(root):  # a shared filesystem; never mkdir on object storage (it
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


def store_files(where: Path | UPath) -> dict[str, int]:
    """Relative path -> size of every file of a store (no reads; one listing remotely),
    leaving out a run's bookkeeping and the manifest and completion marker themselves."""
    if is_local(where):
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
    files = store_files(where)
    put_json(where / MANIFEST, {"format": "feature-atlas/activations-manifest/1",
                                 "files": files})  # fmt: skip
    return files


def check_files(where: Path | UPath) -> None:
    """Refuse a store whose files differ from its manifest: a missing or emptied shard
    would otherwise read as zeros. A store without a manifest (written by hand, or
    before manifests existed) cannot be checked: a warning says so."""
    manifest = get_json(where / MANIFEST)
    redo = "restore it (`dvc checkout`) or re-run the activations stage"
    if manifest is None:
        log.warning("%s: no %s (a store written before manifests, or by hand): missing shard "
                    "files cannot be detected and would read as zeros; %s", where, MANIFEST, redo)  # fmt: skip
        return
    have = store_files(where)
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
