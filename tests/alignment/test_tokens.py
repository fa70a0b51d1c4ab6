"""Token alignment: same tokenizer row by row, different tokenisations on shared offsets."""

from __future__ import annotations

import numpy as np
import pytest

from stages.alignment.tokens import align_offsets, align_tokens, select_rows
from tests.alignment._stores import write_store


def _char_and_word_level(texts: list[str]) -> tuple[dict, dict]:
    """(doc_ids, char_end) rows of a character-level and a word-level tokenisation of
    the same documents, each document opened by a separator row (char_end 0)."""
    char = {"doc_ids": [], "char_end": []}
    word = {"doc_ids": [], "char_end": []}
    for d, text in enumerate(texts):
        char["doc_ids"] += [d] * (len(text) + 1)
        char["char_end"] += [0, *range(1, len(text) + 1)]
        ends = [0]
        pos = 0
        for w in text.split(" "):
            pos = text.index(w, pos) + len(w)
            ends.append(pos)
        word["doc_ids"] += [d] * len(ends)
        word["char_end"] += ends
    return {k: np.array(v) for k, v in char.items()}, {k: np.array(v) for k, v in word.items()}


def _acts(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    return {"h": np.random.default_rng(seed).standard_normal((n, 4))}


def test_same_tokenizer_aligns_row_by_row(tmp_path):
    doc = np.repeat(np.arange(10), 20)
    end = np.tile(np.arange(20) * 3, 10)
    a = write_store(tmp_path / "a", _acts(200, 0), doc_ids=doc, char_end=end)
    b = write_store(tmp_path / "b", _acts(200, 1), doc_ids=doc, char_end=end)
    al = align_tokens(a, b)
    assert al.rule == "identical"
    np.testing.assert_array_equal(al.rows_a, np.arange(200))
    np.testing.assert_array_equal(al.rows_b, np.arange(200))


def test_character_vs_word_level_pairs_the_tokens_ending_shared_spans(tmp_path):
    char, word = _char_and_word_level(["the cat sat", "a dog"])
    # char rows: doc 0 = [sep, t,h,e,' ',c,a,t,' ',s,a,t] (rows 0..11), doc 1 = rows 12..17
    # word rows: doc 0 = [sep, the, cat, sat] (rows 0..3), doc 1 = [sep, a, dog] (4..6)
    a = write_store(tmp_path / "a", _acts(len(char["doc_ids"])), **char)
    b = write_store(tmp_path / "b", _acts(len(word["doc_ids"])), **word)
    al = align_tokens(a, b)
    assert al.rule == "char_end"
    np.testing.assert_array_equal(al.rows_a, [0, 3, 7, 11, 12, 13, 17])
    np.testing.assert_array_equal(al.rows_b, [0, 1, 2, 3, 4, 5, 6])
    # Symmetric: aligning B to A gives the same pairs, sorted by B's rows.
    back = align_tokens(b, a)
    np.testing.assert_array_equal(back.rows_a, al.rows_b)
    np.testing.assert_array_equal(back.rows_b, al.rows_a)


def test_offsets_inside_the_other_models_tokens_have_no_partner_and_duplicates_keep_first():
    # A: "abcd" as [ab][cd]; B: [a][bcd] plus a repeated span (two byte pieces ending at 4).
    rows_a, rows_b = align_offsets(
        np.array([0, 0, 0]), np.array([0, 2, 4]), np.array([0, 0, 0, 0]), np.array([0, 1, 4, 4])
    )
    np.testing.assert_array_equal(rows_a, [0, 2])
    np.testing.assert_array_equal(rows_b, [0, 2])  # row 2, the first of the two ending at 4


def test_alignment_is_sorted_by_row_of_a_when_documents_are_interleaved():
    # Held-out rows form the tail in A but B stores the documents in another order.
    doc_a, end_a = np.array([0, 0, 1, 1, 2, 2]), np.array([1, 2, 1, 2, 1, 2])
    doc_b, end_b = np.array([2, 2, 0, 0, 1, 1]), np.array([1, 2, 1, 2, 1, 2])
    rows_a, rows_b = align_offsets(doc_a, end_a, doc_b, end_b)
    np.testing.assert_array_equal(rows_a, np.arange(6))
    np.testing.assert_array_equal(rows_b, [2, 3, 4, 5, 0, 1])


def test_different_corpora_are_refused_naming_both_hashes_and_paths(tmp_path):
    doc, end = np.zeros(10, int), np.arange(10)
    a = write_store(tmp_path / "a", _acts(10), doc_ids=doc, char_end=end, corpus_hash="abc123")
    b = write_store(tmp_path / "b", _acts(10), doc_ids=doc, char_end=end, corpus_hash="def456")
    with pytest.raises(ValueError) as e:
        align_tokens(a, b)
    msg = str(e.value)
    for part in ("abc123", "def456", str(tmp_path / "a"), str(tmp_path / "b")):
        assert part in msg


def test_no_shared_tokens_is_a_clear_error(tmp_path):
    a = write_store(tmp_path / "a", _acts(5), doc_ids=np.zeros(5, int), char_end=np.arange(1, 6))
    b = write_store(tmp_path / "b", _acts(5), doc_ids=np.ones(5, int), char_end=np.arange(1, 6))
    with pytest.raises(ValueError, match="no shared tokens"):
        align_tokens(a, b)


def test_heldout_selection_is_topped_up_with_the_nearest_training_rows(tmp_path):
    doc, end = np.repeat(np.arange(10), 10), np.tile(np.arange(10), 10)
    a = write_store(tmp_path / "a", _acts(100), doc_ids=doc, char_end=end, heldout_start=90)
    al = align_tokens(a, a)
    np.testing.assert_array_equal(
        select_rows(al, a, "heldout", 25, top_up=True).rows_a, np.arange(75, 100)
    )
    # without top_up: the held-out rows only, however many max_tokens allows
    np.testing.assert_array_equal(select_rows(al, a, "heldout", 25).rows_a, np.arange(90, 100))
    np.testing.assert_array_equal(select_rows(al, a, "heldout", 5).rows_a, np.arange(90, 95))
    np.testing.assert_array_equal(select_rows(al, a, "train", 1000).rows_a, np.arange(90))
