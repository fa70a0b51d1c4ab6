"""Tokenising documents and packing them into fixed-length context windows.

One rule, used both to train the toy models and to cache activations, so a cached
row is exactly what the model saw in training:

    stream  = for each document: <|endoftext|> + the document's tokens
    window  = [BOS] + the next (seq_len - 1) tokens of the stream

Every window starts with BOS (position 0, never stored in the activation cache). The
separator token that opens each document belongs to that document, with an empty
character span. Each stored row keeps its document id, its position in the window and
the character span [char_start, char_end) of its token in the document text.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Tokenised:
    """Per-document token ids and character offsets (offsets exclude leading spaces)."""

    ids: list[np.ndarray]
    starts: list[np.ndarray]
    ends: list[np.ndarray]


def tokenise(tokenizer, texts: list[str], batch: int = 1024) -> Tokenised:
    """Tokenise with a HF fast tokenizer, keeping character offsets. No BOS added."""
    ids, starts, ends = [], [], []
    for i in range(0, len(texts), batch):
        enc = tokenizer(texts[i : i + batch], add_special_tokens=False, return_offsets_mapping=True)
        for tok_ids, offsets in zip(enc["input_ids"], enc["offset_mapping"], strict=True):
            ids.append(np.asarray(tok_ids, dtype=np.int32))
            off = np.asarray(offsets, dtype=np.int32).reshape(-1, 2)
            starts.append(off[:, 0].copy())
            ends.append(off[:, 1].copy())
    return Tokenised(ids, starts, ends)


@dataclass
class Windows:
    """Packed windows [n, seq_len] and, per token, where it came from."""

    tokens: np.ndarray  # int32 [n, seq_len]; column 0 is BOS
    doc_ids: np.ndarray  # int64 [n, seq_len]; -1 at BOS
    char_start: np.ndarray  # int32 [n, seq_len]
    char_end: np.ndarray  # int32 [n, seq_len]

    @property
    def n(self) -> int:
        return self.tokens.shape[0]


def pack_windows(
    tok: Tokenised,
    doc_ids: list[int],
    seq_len: int,
    bos_id: int,
    sep_id: int,
    max_tokens: int | None = None,
) -> Windows:
    """Pack documents into windows by the rule in the module docstring.

    The last partial window is dropped (it would need padding); `max_tokens` caps the
    number of non-BOS tokens kept.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len = {seq_len}, expected >= 2")
    parts_ids, parts_doc, parts_s, parts_e = [], [], [], []
    for d, ids, s, e in zip(doc_ids, tok.ids, tok.starts, tok.ends, strict=True):
        n = len(ids) + 1
        parts_ids += [np.array([sep_id], np.int32), ids]
        parts_doc.append(np.full(n, d, np.int64))
        parts_s += [np.zeros(1, np.int32), s]
        parts_e += [np.zeros(1, np.int32), e]
    if not parts_ids:
        raise ValueError("pack_windows: no documents to pack")
    stream = np.concatenate(parts_ids)
    docs = np.concatenate(parts_doc)
    cs, ce = np.concatenate(parts_s), np.concatenate(parts_e)
    body = seq_len - 1
    n = len(stream) // body
    if max_tokens is not None:
        n = min(n, max_tokens // body)
    if n == 0:
        raise ValueError(f"pack_windows: {len(stream)} tokens do not fill one window of {seq_len}")
    cut = n * body

    def with_bos(a: np.ndarray, fill) -> np.ndarray:
        out = np.empty((n, seq_len), a.dtype)
        out[:, 0] = fill
        out[:, 1:] = a[:cut].reshape(n, body)
        return out

    return Windows(with_bos(stream, bos_id), with_bos(docs, -1), with_bos(cs, 0), with_bos(ce, 0))
