"""Input checks and conversions shared by the alignment modules.

Every public function in `stages.alignment` accepts numpy arrays (what zarr returns)
and torch tensors alike. The checks here turn a wrong shape into one message that
names the argument and both shapes, instead of a broadcasting error three calls deep.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import TypeAlias

import numpy as np
import torch

Array: TypeAlias = np.ndarray | torch.Tensor


def as_tensor_2d(x: Array, name: str) -> torch.Tensor:
    """A 2-D torch view of `x` (no copy for numpy input); float dtypes only."""
    t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a numpy array or torch tensor, got {type(x).__name__}")
    if t.ndim != 2:
        raise ValueError(
            f"{name}: expected a 2-D array [n_tokens, dim], got shape {tuple(t.shape)}"
        )
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point array, got dtype {t.dtype}")
    return t.detach().cpu()


def as_numpy_2d(x: Array, name: str) -> np.ndarray:
    """`x` as a 2-D float64 numpy array (a copy only when the dtype differs)."""
    return as_tensor_2d(x, name).to(torch.float64).numpy()


def check_finite(x: torch.Tensor | np.ndarray, name: str) -> None:
    """Refuse NaN/inf early: one NaN token would silently turn every statistic into NaN.

    Checked through the column sums (any NaN or inf makes its column's sum non-finite):
    one cheap reduction instead of a full boolean mask per chunk.
    """
    if isinstance(x, torch.Tensor):
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        ok = bool(torch.isfinite(x.sum(0, dtype=acc)).all()) if x.numel() else True
    else:
        ok = bool(np.isfinite(x).all())
    if not ok:
        raise ValueError(
            f"{name}: contains NaN or inf values (or values too large to sum); "
            f"expected finite activations"
        )


def check_paired(
    x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, x_name: str, y_name: str
) -> None:
    """Paired representations must hold the same tokens, row for row."""
    if x.shape[0] != y.shape[0]:
        raise ValueError(
            f"{x_name} has shape {tuple(x.shape)} and {y_name} has shape {tuple(y.shape)}: "
            f"expected the same number of rows (one per shared token)"
        )


def check_width(x: torch.Tensor | np.ndarray, expected: int, name: str) -> None:
    if x.shape[1] != expected:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}: expected {expected} columns, as at construction"
        )


def lockstep(streams: Mapping[str, Iterable[Array]]) -> Iterator[dict[str, torch.Tensor]]:
    """Iterate several row-aligned chunk streams together, one dict of chunks per step.

    All streams must yield chunks of the same number of rows and end together; the error
    names the stream that ran out early or disagreed, since a misaligned stream would
    pair different tokens without any other symptom.
    """
    iterators = {key: iter(stream) for key, stream in streams.items()}
    step = 0
    while True:
        chunks: dict[str, torch.Tensor] = {}
        finished: list[str] = []
        for key, it in iterators.items():
            try:
                chunks[key] = as_tensor_2d(next(it), f"chunk {step} of stream {key!r}")
            except StopIteration:
                finished.append(key)
        if finished:
            if len(finished) != len(iterators):
                raise ValueError(
                    f"streams {sorted(finished)} ended after {step} chunks while "
                    f"{sorted(chunks)} continued: expected row-aligned streams of equal length"
                )
            return
        rows = {key: c.shape[0] for key, c in chunks.items()}
        if len(set(rows.values())) > 1:
            raise ValueError(
                f"chunk {step} has different row counts per stream {rows}: expected "
                f"row-aligned chunks (the same tokens in every stream)"
            )
        yield chunks
        step += 1


class RowChunks:
    """Fixed-size row windows of a 2-D array (numpy, torch or zarr), indexable and iterable.

    Reading chunk-aligned windows is the fast way through a sharded zarr cache; being
    indexable lets the shuffled-token null pair chunk i of A with a random chunk of B.
    `RowChunks(store.array("blocks.1.hook_resid_post"), 8192)` yields [≤8192, d] numpy
    arrays (float16 as cached: `torch.from_numpy(x).float()` before `sae.encode`).
    """

    def __init__(self, array: Array, chunk_rows: int) -> None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows = {chunk_rows}: expected an integer >= 1")
        if len(array.shape) != 2:
            raise ValueError(f"array has shape {tuple(array.shape)}: expected [n_tokens, dim]")
        self.array = array
        self.chunk_rows = int(chunk_rows)

    def __len__(self) -> int:
        return -(-int(self.array.shape[0]) // self.chunk_rows)

    def __getitem__(self, i: int) -> Array:
        if not -len(self) <= i < len(self):
            raise IndexError(f"chunk {i} out of range for {len(self)} chunks")
        i %= len(self)
        return self.array[i * self.chunk_rows : (i + 1) * self.chunk_rows]

    def __iter__(self) -> Iterator[Array]:
        return (self[i] for i in range(len(self)))
