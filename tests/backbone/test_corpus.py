"""The embedded corpus: deterministic, and every label span really is its concept."""

from __future__ import annotations

import json

import pytest

from stages import corpus as C
from stages.config import CorpusParams, HFCorpus, ToyCorpus


def test_generation_is_deterministic_and_seed_dependent():
    assert C.generate_story(0, 5) == C.generate_story(0, 5)
    assert C.generate_story(0, 5) != C.generate_story(1, 5)


def test_every_label_span_is_a_word_of_its_concept():
    species = {s: cls for cls, sp in C.ANIMALS.items() for s in sp}
    forms = {s: set(f) for sp in C.ANIMALS.values() for s, f in sp.items()}
    vocab = {
        "colour": set(C.COLOURS),
        "place": set(C.PLACES),
        "weather": set(C.WEATHER),
        "positive_emotion": set(C.POSITIVE),
        "negative_emotion": set(C.NEGATIVE),
        "weekday": set(C.WEEKDAYS),
        "month": set(C.MONTHS),
        "number": set(C.NUMBERS) | {n.capitalize() for n in C.NUMBERS},
    }
    seen = set()
    for i in range(200):
        text, spans = C.generate_story(0, i)
        by_span: dict = {}
        for s, e, c in spans:
            by_span.setdefault((s, e), set()).add(c)
            seen.add(c)
            word = text[s:e]
            if c in vocab:
                assert word in vocab[c], (c, word)
            if c in species:
                assert word in forms[c]
        for cs in by_span.values():
            sp = cs & set(species)
            if sp:  # hierarchy: species -> class -> animal, and exactly one number
                (name,) = sp
                assert {"animal", species[name]} <= cs
                assert len(cs & {"singular", "plural"}) == 1
    assert seen == set(C.CONCEPT_NAMES)  # every planted concept occurs


def test_tense_is_consistent_within_a_document():
    for i in range(100):
        _, spans = C.generate_story(7, i)
        tenses = {c for _, _, c in spans if c.endswith("_tense")}
        assert len(tenses) == 1


def test_successor_structure_of_counting_sequences():
    """Counts go up by one, except for the planted miscounts (P_MISCOUNT, uniform)."""
    import re

    steps = succ = 0
    for i in range(400):
        text, _ = C.generate_story(0, i)
        for seq in re.findall(r": ((?:\w+, )+\w+)\.", text):
            idx = [C.NUMBERS.index(w) for w in seq.split(", ")]
            for a, b in zip(idx, idx[1:], strict=False):
                if a + 1 < len(C.NUMBERS):
                    steps += 1
                    succ += b == a + 1
    p = C.p_next_number(0, 1)  # 0.9 + 0.1 / 12
    assert steps > 500 and abs(succ / steps - p) < 4 * (p * (1 - p) / steps) ** 0.5


def test_write_and_read_roundtrip(tmp_path):
    p = CorpusParams(toy=ToyCorpus(n_docs=60, seed=1), heldout_fraction=0.2)
    corpus = C.build_corpus(p)
    meta = C.write_corpus(corpus, tmp_path / "corpus", p)
    back = C.read_corpus(tmp_path / "corpus")
    assert back.texts == corpus.texts and back.labels.num_rows == len(corpus.labels)
    assert meta["n_docs"] == 60 and 0 < meta["n_heldout_docs"] < 60
    assert (
        json.loads((tmp_path / "corpus" / "meta.json").read_text())["corpus_hash"]
        == meta["corpus_hash"]
    )
    # same params, same bytes
    C.write_corpus(C.build_corpus(p), tmp_path / "again", p)
    for f in ("documents.parquet", "labels.parquet", "meta.json"):
        assert (tmp_path / "corpus" / f).read_bytes() == (tmp_path / "again" / f).read_bytes()


@pytest.mark.parametrize("fmt", ["text", "json", "parquet"])
def test_hf_datasets_local_files(tmp_path, fmt):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"Document number {i} talks about the sea." for i in range(40)]
    if fmt == "text":
        (tmp_path / "a.txt").write_text("\n".join(docs))
        files = [str(tmp_path / "a.txt")]
    elif fmt == "json":
        (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs))
        files = [str(tmp_path / "a.jsonl")]
    else:
        pq.write_table(pa.table({"body": docs}), tmp_path / "a.parquet")
        files = [str(tmp_path / "a.parquet")]
    field = "text" if fmt == "text" else "body"
    p = CorpusParams(
        source="hf",
        heldout_fraction=0.25,
        hf=HFCorpus(path=fmt, data_files=files, text_field=field, max_docs=30),
    )
    corpus = C.build_corpus(p)
    assert corpus.texts == docs[:30] and corpus.labels == []
    assert "heldout" in corpus.splits and "train" in corpus.splits


def test_hf_wrong_text_field_names_the_columns(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"body": "hello there"}\n')
    p = CorpusParams(source="hf", hf=HFCorpus(path="json", data_files=[str(tmp_path / "a.jsonl")]))
    with pytest.raises(KeyError, match=r"text_field = 'text'.*columns: \['body'\]"):
        C.build_corpus(p)


def test_hf_missing_file_is_named(tmp_path):
    p = CorpusParams(source="hf", hf=HFCorpus(path="text", data_files=[str(tmp_path / "nope.txt")]))
    with pytest.raises(FileNotFoundError, match="nope.txt"):
        C.build_corpus(p)


def test_empty_split_is_refused():
    p = CorpusParams(toy=ToyCorpus(n_docs=2), heldout_fraction=0.01)
    with pytest.raises(ValueError, match="leave a split empty"):
        C.build_corpus(p)


def test_empty_corpus_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    p = CorpusParams(
        source="hf", hf=HFCorpus(path="text", data_files=[str(tmp_path / "empty.txt")])
    )
    with pytest.raises(ValueError, match="corpus.hf: dataset 'text' gave no non-empty documents"):
        C.build_corpus(p)
