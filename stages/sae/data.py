"""Activation sources and the chunk-aligned shuffling loader the trainer reads through.

A *source* is anything with `n_rows`, `d_in`, `chunk_rows` (the read granularity, e.g. a
zarr chunk) and `read(start, stop) -> np.ndarray [stop - start, d_in]` (float16/32); an
optional `name` is used in error messages. The activation store provides one per hook;
`ArraySource` and `ZarrSource` here cover in-memory arrays and plain zarr arrays; the
public entry points (`train_saes`, `evaluate_*`) also take a bare 2-D numpy array or torch
tensor, which `as_source` wraps in an `ArraySource`.

`ShuffleLoader` never reads single rows: each epoch visits the chunks in a seeded random
order, reads `buffer_chunks` whole chunks at a time into memory, shuffles those rows and
cuts batches. Batch i is a pure function of (seed, i), so a resumed run sees exactly the
batches an uninterrupted one would. Reading happens in a background thread.
"""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class ActivationSource(Protocol):
    n_rows: int
    d_in: int
    chunk_rows: int

    def read(self, start: int, stop: int) -> np.ndarray: ...


# what the public entry points accept: a source, or a bare [n_rows, d_in] array / tensor
SourceLike = ActivationSource | np.ndarray | torch.Tensor


def source_name(source: ActivationSource) -> str:
    return str(getattr(source, "name", None) or type(source).__name__)


def as_source(data: SourceLike, what: str = "source") -> ActivationSource:
    """`data` as a source: a source as it is, a 2-D numpy array or torch tensor wrapped in
    an `ArraySource`; anything else is a TypeError naming `what` was expected."""
    if isinstance(data, torch.Tensor):
        t = data.detach().cpu()
        data = (t.float() if t.dtype == torch.bfloat16 else t).numpy()  # numpy has no bf16
    if isinstance(data, np.ndarray):
        return ArraySource(data)
    if isinstance(data, ActivationSource):
        return data
    raise TypeError(
        f"{what}: got {type(data).__name__}, expected an ActivationSource (n_rows, d_in, "
        "chunk_rows, read(start, stop)), e.g. ArraySource(x), or a 2-D array / tensor"
    )


def data_fingerprint(source: ActivationSource, n: int = 64) -> dict[str, object]:
    """What a checkpoint records of the data it was trained on: the source's name, shape
    and a SHA-256 of its first and last `n` rows as float32 (what training sees), so that
    re-cached activations, another hook or another array are told apart by two reads."""
    import hashlib

    h = hashlib.sha256()
    n = min(n, source.n_rows)
    for start in (0, source.n_rows - n):
        block = read_checked(source, start, start + n)
        h.update(np.ascontiguousarray(block, dtype=np.float32).tobytes())
    return {
        "name": source_name(source),
        "n_rows": int(source.n_rows),
        "d_in": int(source.d_in),
        "rows_sha256": h.hexdigest(),
    }


class NonFiniteActivationsError(ValueError):
    """A source holds NaN or inf values."""


def check_finite(block: np.ndarray, source: ActivationSource, first_row: int) -> None:
    """Raise naming the array and the first row (global index) holding NaN/inf."""
    ok = np.isfinite(block)
    if ok.all():
        return
    bad_rows = np.flatnonzero(~ok.all(axis=1))
    row = int(bad_rows[0])
    col = int(np.flatnonzero(~ok[row])[0])
    raise NonFiniteActivationsError(
        f"activation array '{source_name(source)}': row {first_row + row} holds a non-finite "
        f"value ({block[row, col]} at column {col}); expected finite activations "
        f"({len(bad_rows)} bad row(s) in rows {first_row}..{first_row + len(block) - 1})"
    )


class ArraySource:
    """An in-memory [n_rows, d_in] array as a source (tests, benchmarks, small data)."""

    def __init__(self, array: np.ndarray, chunk_rows: int = 4096, name: str = "array") -> None:
        if array.ndim != 2:
            raise ValueError(f"{name}: expected a 2-D [n_rows, d_in] array, got {array.shape}")
        self.array = array
        self.n_rows, self.d_in = array.shape
        self.chunk_rows = int(chunk_rows)
        self.name = name

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.array[start:stop]


class ZarrSource:
    """A 2-D zarr array [n_rows, d_in]; reads are aligned to its chunks (inner chunks of a
    sharded array), which zarr can fetch without decoding neighbours."""

    def __init__(self, array: object, name: str | None = None, chunk_rows: int | None = None):
        shape = array.shape  # type: ignore[attr-defined]
        if len(shape) != 2:
            raise ValueError(f"zarr array {name or array}: expected 2-D, got shape {shape}")
        self.array = array
        self.n_rows, self.d_in = int(shape[0]), int(shape[1])
        self.chunk_rows = int(chunk_rows or array.chunks[0])  # type: ignore[attr-defined]
        self.name = name or f"{getattr(array, 'store', '')}/{getattr(array, 'path', '')}"

    @classmethod
    def open(cls, store: str, path: str) -> ZarrSource:
        import zarr

        return cls(zarr.open_array(store, path=path, mode="r"), name=f"{store}/{path}")

    def read(self, start: int, stop: int) -> np.ndarray:
        return np.asarray(self.array[start:stop])  # type: ignore[index]


class SliceSource:
    """Rows [start, stop) of another source (e.g. the train or held-out split)."""

    def __init__(self, source: SourceLike, start: int, stop: int) -> None:
        source = as_source(source, "SliceSource")
        if not 0 <= start < stop <= source.n_rows:
            raise ValueError(
                f"{source_name(source)}: slice [{start}, {stop}) outside [0, {source.n_rows})"
            )
        self.source, self.start = source, start
        self.n_rows, self.d_in, self.chunk_rows = stop - start, source.d_in, source.chunk_rows
        self.name = f"{source_name(source)}[{start}:{stop}]"

    def read(self, start: int, stop: int) -> np.ndarray:
        return self.source.read(self.start + start, self.start + stop)


def read_checked(source: ActivationSource, start: int, stop: int) -> np.ndarray:
    block = np.asarray(source.read(start, stop))
    if block.shape != (stop - start, source.d_in):
        raise ValueError(
            f"activation array '{source_name(source)}': read({start}, {stop}) returned shape "
            f"{block.shape}, expected {(stop - start, source.d_in)}"
        )
    check_finite(block, source, start)
    return block


def iter_rows(
    source: ActivationSource, batch_size: int, max_rows: int | None = None
) -> Iterator[torch.Tensor]:
    """Sequential float32 batches (evaluation); reads whole chunks."""
    n = source.n_rows if max_rows is None else min(max_rows, source.n_rows)
    step = max(source.chunk_rows, batch_size)
    step = math.ceil(step / source.chunk_rows) * source.chunk_rows
    for s in range(0, n, step):
        block = read_checked(source, s, min(s + step, n)).astype(np.float32, copy=False)
        for b in range(0, len(block), batch_size):
            yield torch.from_numpy(np.ascontiguousarray(block[b : b + batch_size]))


def sample_rows(source: ActivationSource, n: int, seed: int) -> np.ndarray:
    """About n rows from randomly chosen whole chunks (float32, checked)."""
    n_chunks = math.ceil(source.n_rows / source.chunk_rows)
    order = np.random.default_rng([seed, 7]).permutation(n_chunks)
    parts, got = [], 0
    for c in order:
        s = int(c) * source.chunk_rows
        block = read_checked(source, s, min(s + source.chunk_rows, source.n_rows))
        parts.append(block.astype(np.float32))
        got += len(block)
        if got >= n:
            break
    return np.concatenate(parts)[:n]


class ShuffleLoader:
    """Endless, seeded, resumable stream of [batch_size, d_in] float32 batches.

    The stream is epochs of the source, each a concatenation of shuffled buffers; batch i
    covers stream rows [i·B, (i+1)·B). `scale` multiplies every row (normalisation).
    """

    def __init__(
        self,
        source: ActivationSource,
        batch_size: int,
        *,
        seed: int,
        buffer_rows: int | None = None,
        scale: float = 1.0,
        start_batch: int = 0,
        prefetch: bool = True,
    ) -> None:
        self.source, self.batch_size, self.seed, self.scale = source, batch_size, seed, scale
        self.n_chunks = math.ceil(source.n_rows / source.chunk_rows)
        want = buffer_rows or max(16 * batch_size, source.chunk_rows)
        self.buffer_chunks = max(1, min(self.n_chunks, math.ceil(want / source.chunk_rows)))
        self.pos = start_batch * batch_size  # position in the endless row stream
        self._buf: np.ndarray | None = None
        self._buf_key: tuple[int, int] | None = None
        self._buf_start = 0  # stream position of the buffer's first row
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if prefetch:
            self._start_thread()

    # ---- plan -----------------------------------------------------------------------
    def _chunk_len(self, c: int) -> int:
        return min(self.source.chunk_rows, self.source.n_rows - c * self.source.chunk_rows)

    def _epoch_plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """Chunk order of an epoch and the starting row offset of each buffer."""
        order = np.random.default_rng([self.seed, epoch]).permutation(self.n_chunks)
        lens = np.array([self._chunk_len(int(c)) for c in order])
        starts = np.concatenate([[0], np.cumsum(lens)])[:: self.buffer_chunks]
        return order, starts

    def _locate(self, pos: int) -> tuple[int, int, int]:
        """(epoch, buffer index, stream position of that buffer's first row)."""
        epoch, off = divmod(pos, self.source.n_rows)
        _, starts = self._epoch_plan(epoch)
        g = int(np.searchsorted(starts, off, side="right") - 1)
        return epoch, g, epoch * self.source.n_rows + int(starts[g])

    def _make_buffer(self, epoch: int, g: int) -> np.ndarray:
        order, _ = self._epoch_plan(epoch)
        chunks = order[g * self.buffer_chunks : (g + 1) * self.buffer_chunks]
        parts = []
        for c in chunks:
            s = int(c) * self.source.chunk_rows
            parts.append(read_checked(self.source, s, s + self._chunk_len(int(c))))
        block = np.concatenate(parts) if len(parts) > 1 else parts[0]
        perm = np.random.default_rng([self.seed, epoch, g, 1]).permutation(len(block))
        out = block[perm].astype(np.float32, copy=False)
        if self.scale != 1.0:
            out *= np.float32(self.scale)
        return out

    def _next_key(self, key: tuple[int, int]) -> tuple[int, int]:
        epoch, g = key
        if (g + 1) * self.buffer_chunks >= self.n_chunks:
            return epoch + 1, 0
        return epoch, g + 1

    # ---- background reading -----------------------------------------------------------
    def _start_thread(self) -> None:
        epoch, g, _ = self._locate(self.pos)
        self._queue = queue.Queue(maxsize=2)

        def work(key: tuple[int, int]) -> None:
            while not self._stop.is_set():
                try:
                    item: object = (key, self._make_buffer(*key))
                except BaseException as e:  # handed to the consumer
                    item = e
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)  # type: ignore[union-attr]
                        break
                    except queue.Full:
                        continue
                if isinstance(item, BaseException):
                    return
                key = self._next_key(key)

        self._thread = threading.Thread(target=work, args=((epoch, g),), daemon=True)
        self._thread.start()

    def _get_buffer(self, key: tuple[int, int]) -> np.ndarray:
        if self._queue is None:
            return self._make_buffer(*key)
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        got_key, buf = item
        assert got_key == key, (got_key, key)
        return buf

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> ShuffleLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        out = np.empty((self.batch_size, self.source.d_in), dtype=np.float32)
        filled = 0
        while filled < self.batch_size:
            if self._buf is None or self.pos >= self._buf_start + len(self._buf):
                if self._buf_key is None:
                    epoch, g, start = self._locate(self.pos)
                    key = (epoch, g)
                else:
                    key = self._next_key(self._buf_key)
                    start = self._buf_start + len(self._buf)  # type: ignore[arg-type]
                self._buf, self._buf_key, self._buf_start = self._get_buffer(key), key, start
            lo = self.pos - self._buf_start
            take = min(self.batch_size - filled, len(self._buf) - lo)
            out[filled : filled + take] = self._buf[lo : lo + take]
            filled += take
            self.pos += take
        return torch.from_numpy(out)
