"""The corpus stage: documents plus character-span concept labels.

The embedded default is a seeded generator of simple English stories in which every
mention of a planted concept carries a label, so every later stage has ground truth:
an animal hierarchy (animal → mammal / bird / fish → species), colours, emotions with
polarity, places, weather, counting and weekday / month sequences (successor
structure), past vs present tense and singular vs plural.

Any HF `datasets` source works too (a hub dataset, streamed, or local text / json /
parquet files); such a corpus simply has no labels.

On disk (`data/corpus/`, one DVC output):
    documents.parquet  doc_id:int64, split:str ('train' | 'heldout'), text:str
    labels.parquet     doc_id:int64, char_start:int32, char_end:int32, concept:str
    concepts.json      [{name, parent, group, description}] in a fixed order
    meta.json          source, params, counts and the corpus content hash
"""

from __future__ import annotations

import glob
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stages.config import CorpusParams, HFCorpus
from stages.io import atomic_dir, write_json

# ---------------------------------------------------------------------------- vocabulary

ANIMALS: dict[str, dict[str, tuple[str, str]]] = {
    # class -> species -> (singular, plural)
    "mammal": {
        "dog": ("dog", "dogs"),
        "cat": ("cat", "cats"),
        "horse": ("horse", "horses"),
        "rabbit": ("rabbit", "rabbits"),
    },
    "bird": {
        "owl": ("owl", "owls"),
        "robin": ("robin", "robins"),
        "eagle": ("eagle", "eagles"),
        "duck": ("duck", "ducks"),
    },
    "fish": {
        "salmon": ("salmon", "salmon"),
        "trout": ("trout", "trout"),
        "shark": ("shark", "sharks"),
        "carp": ("carp", "carp"),
    },
}
# How each class moves: (base, 3rd-person-singular present, past). Grammar, not noise:
# the verb is predictable from the animal's class, which a model can learn.
MOVES = {
    "mammal": [("run", "runs", "ran"), ("walk", "walks", "walked"), ("jump", "jumps", "jumped")],
    "bird": [("fly", "flies", "flew"), ("sing", "sings", "sang"), ("hop", "hops", "hopped")],
    "fish": [
        ("swim", "swims", "swam"),
        ("dive", "dives", "dived"),
        ("splash", "splashes", "splashed"),
    ],
}
MOVE_PREP = {"mammal": "to", "bird": "over", "fish": "in"}
COLOURS = ["red", "blue", "green", "yellow", "brown", "white", "black", "grey"]
POSITIVE = ["happy", "glad", "joyful", "cheerful", "calm", "proud"]
NEGATIVE = ["sad", "angry", "afraid", "upset", "lonely", "worried"]
PLACES = [
    "park",
    "forest",
    "river",
    "garden",
    "school",
    "market",
    "beach",
    "farm",
    "lake",
    "village",
]
WATER_PLACES = ["river", "lake", "beach"]
WEATHER = {
    "sunny": 0.85,
    "warm": 0.8,
    "rainy": 0.25,
    "windy": 0.4,
    "cloudy": 0.45,
    "stormy": 0.1,
    "foggy": 0.3,
}
NUMBERS = [
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]  # fmt: skip
NAMES = ["Tom", "Anna", "Ben", "Mia", "Sam", "Lily", "Max", "Emma", "Leo", "Zoe"]
# Verbs for people: (base, 3rd-person-singular present, past)
SEE = ("see", "sees", "saw")
FEEL = ("feel", "feels", "felt")
COUNT = ("count", "counts", "counted")
LIKE = ("like", "likes", "liked")
COME = ("come", "comes", "came")
FEED = ("feed", "feeds", "fed")


@dataclass(frozen=True)
class Concept:
    name: str
    parent: str | None
    group: str
    description: str


def _concepts() -> list[Concept]:
    out = [Concept("animal", None, "animal", "any animal noun")]
    for cls, species in ANIMALS.items():
        out.append(Concept(cls, "animal", "animal", f"any {cls} noun"))
        out += [Concept(s, cls, "animal", f"the noun '{s}' (singular or plural)") for s in species]
    out += [
        Concept("colour", None, "colour", "a colour adjective"),
        Concept("emotion", None, "emotion", "an emotion adjective"),
        Concept("positive_emotion", "emotion", "emotion", "an emotion of positive polarity"),
        Concept("negative_emotion", "emotion", "emotion", "an emotion of negative polarity"),
        Concept("place", None, "place", "a place noun"),
        Concept("weather", None, "weather", "a weather adjective"),
        Concept("number", None, "sequence", "a number word (counting sequences)"),
        Concept("weekday", None, "sequence", "a weekday name"),
        Concept("month", None, "sequence", "a month name"),
        Concept("past_tense", None, "tense", "a verb in the past tense"),
        Concept("present_tense", None, "tense", "a verb in the present tense"),
        Concept("singular", None, "number_agreement", "a singular animal noun"),
        Concept("plural", None, "number_agreement", "a plural animal noun"),
    ]
    return out


CONCEPTS: list[Concept] = _concepts()
CONCEPT_NAMES: list[str] = [c.name for c in CONCEPTS]


# ---------------------------------------------------------------------------- generator


@dataclass
class _Doc:
    """Accumulates text while recording the character span of each labelled piece."""

    parts: list[str] = field(default_factory=list)
    n: int = 0
    spans: list[tuple[int, int, str]] = field(default_factory=list)

    def add(self, text: str, *concepts: str) -> None:
        for c in concepts:
            self.spans.append((self.n, self.n + len(text), c))
        self.parts.append(text)
        self.n += len(text)

    @property
    def text(self) -> str:
        return "".join(self.parts)


class _Story:
    """One document: a tense chosen once, then 4-9 sentences from a small grammar."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.past = rng.random() < 0.5
        self.doc = _Doc()

    # -- pieces --------------------------------------------------------------------
    def verb(self, forms: tuple[str, str, str], plural_subject: bool) -> None:
        base, third, past = forms
        if self.past:
            self.doc.add(past, "past_tense")
        else:
            self.doc.add(base if plural_subject else third, "present_tense")

    def be(self, plural_subject: bool) -> None:
        if self.past:
            self.doc.add("were" if plural_subject else "was", "past_tense")
        else:
            self.doc.add("are" if plural_subject else "is", "present_tense")

    def animal(self, cls: str | None = None, plural: bool | None = None) -> tuple[str, bool]:
        r = self.rng
        cls = cls or r.choice(list(ANIMALS))
        species = r.choice(list(ANIMALS[cls]))
        plural = r.random() < 0.5 if plural is None else plural
        word = ANIMALS[cls][species][1 if plural else 0]
        self.doc.add(word, "animal", cls, species, "plural" if plural else "singular")
        return cls, plural

    def emotion(self, p_positive: float = 0.5) -> None:
        if self.rng.random() < p_positive:
            self.doc.add(self.rng.choice(POSITIVE), "emotion", "positive_emotion")
        else:
            self.doc.add(self.rng.choice(NEGATIVE), "emotion", "negative_emotion")

    def determiner(self, plural: bool, capital: bool) -> None:
        r = self.rng
        if plural:
            if r.random() < 0.5:
                word = r.choice(NUMBERS[1:6])
                self.doc.add(word.capitalize() if capital else word, "number")
                return
            word = r.choice(["the", "some", "many"])
        else:
            word = r.choice(["the", "a"])
        self.doc.add(word.capitalize() if capital else word)

    def w(self, text: str) -> None:
        self.doc.add(text)

    # -- sentences -----------------------------------------------------------------
    def s_motion(self) -> None:
        r = self.rng
        plural = r.random() < 0.5
        self.determiner(plural, capital=True)
        self.w(" ")
        if r.random() < 0.6:
            self.doc.add(r.choice(COLOURS), "colour")
            self.w(" ")
        cls = r.choice(list(ANIMALS))
        self.animal(cls, plural)
        self.w(" ")
        self.verb(r.choice(MOVES[cls]), plural)
        place = r.choice(WATER_PLACES if cls == "fish" else PLACES)
        self.w(f" {MOVE_PREP[cls]} the ")
        self.doc.add(place, "place")
        self.w(".")

    def s_weather(self) -> None:
        r = self.rng
        self.w("On ")
        self.doc.add(r.choice(WEEKDAYS), "weekday")
        self.w(" the weather ")
        self.be(False)
        self.w(" ")
        weather = r.choice(list(WEATHER))
        self.doc.add(weather, "weather")
        self.w(", so ")
        self.w(r.choice(NAMES))
        self.w(" ")
        self.verb(FEEL, False)
        self.w(" ")
        self.emotion(WEATHER[weather])
        self.w(".")

    def s_meet(self) -> None:
        r = self.rng
        self.w(r.choice(NAMES) + " ")
        self.verb(SEE, False)
        plural = r.random() < 0.5
        self.w(" ")
        self.determiner(plural, capital=False)
        self.w(" ")
        cls, _ = self.animal(plural=plural)
        self.w(" in the ")
        self.doc.add(r.choice(WATER_PLACES if cls == "fish" else PLACES), "place")
        self.w(" and ")
        self.be(False)
        self.w(" ")
        self.emotion()
        self.w(".")

    def s_count(self) -> None:
        r = self.rng
        self.w(r.choice(NAMES) + " ")
        self.verb(COUNT, False)
        self.w(" the ")
        self.animal(plural=True)
        self.w(": ")
        start = r.randrange(0, len(NUMBERS) - 3)
        length = r.randint(3, min(6, len(NUMBERS) - start))
        for i in range(length):
            if i:
                self.w(", ")
            self.doc.add(NUMBERS[start + i], "number")
        self.w(".")

    def s_sequence(self) -> None:
        r = self.rng
        names, concept = (WEEKDAYS, "weekday") if r.random() < 0.5 else (MONTHS, "month")
        i = r.randrange(len(names))
        self.w("After ")
        self.doc.add(names[i], concept)
        self.w(" ")
        self.verb(COME, False)
        self.w(" ")
        self.doc.add(names[(i + 1) % len(names)], concept)
        self.w(".")

    def s_month(self) -> None:
        r = self.rng
        self.w("In ")
        self.doc.add(r.choice(MONTHS), "month")
        self.w(" the ")
        self.animal(plural=True)
        self.w(" ")
        self.be(True)
        self.w(" ")
        self.emotion()
        self.w(".")

    def s_like(self) -> None:
        r = self.rng
        self.w(r.choice(NAMES) + " ")
        positive = r.random() < 0.5
        if positive:
            self.verb(LIKE, False)
        else:
            self.verb(FEED, False)
        self.w(" the ")
        self.doc.add(r.choice(COLOURS), "colour")
        self.w(" ")
        self.animal(plural=False)
        self.w(" because it ")
        self.be(False)
        self.w(" ")
        self.emotion(0.8 if positive else 0.5)
        self.w(".")

    def generate(self) -> _Doc:
        sentences = [
            self.s_motion, self.s_weather, self.s_meet, self.s_count,
            self.s_sequence, self.s_month, self.s_like,
        ]  # fmt: skip
        weights = [3, 2, 3, 1, 1, 1, 2]
        for i in range(self.rng.randint(4, 9)):
            if i:
                self.w(" ")
            self.rng.choices(sentences, weights)[0]()
        return self.doc


def generate_story(seed: int, index: int) -> tuple[str, list[tuple[int, int, str]]]:
    """Document `index` of the corpus with `seed`: its text and (start, end, concept) spans.

    Each document has its own RNG, so any document can be regenerated on its own.
    """
    rng = random.Random(f"feature-atlas/{seed}/{index}")
    doc = _Story(rng).generate()
    return doc.text, doc.spans


# ---------------------------------------------------------------------------- building


@dataclass
class Corpus:
    doc_ids: list[int]
    splits: list[str]
    texts: list[str]
    labels: list[tuple[int, int, int, str]]  # doc_id, start, end, concept
    concepts: list[Concept]
    source: str


def _split_of(doc_id: int, heldout_fraction: float, seed: int) -> str:
    # A hash, not an RNG stream: the split of a document does not depend on the others.
    h = hashlib.sha256(f"split/{seed}/{doc_id}".encode()).digest()
    return "heldout" if int.from_bytes(h[:8], "little") / 2**64 < heldout_fraction else "train"


def build_toy_corpus(params: CorpusParams) -> Corpus:
    texts, labels, splits = [], [], []
    for i in range(params.toy.n_docs):
        text, spans = generate_story(params.toy.seed, i)
        texts.append(text)
        labels += [(i, s, e, c) for s, e, c in spans]
        splits.append(_split_of(i, params.heldout_fraction, params.toy.seed))
    return Corpus(list(range(len(texts))), splits, texts, labels, CONCEPTS, "toy")


def build_hf_corpus(params: CorpusParams) -> Corpus:
    """Load documents with HF `datasets` (local builder files or a hub dataset)."""
    import datasets

    hf: HFCorpus = params.hf  # type: ignore[assignment]
    local_builder = hf.path in ("text", "json", "parquet", "csv")
    if local_builder:
        if not hf.data_files:
            raise ValueError(f"corpus.hf.data_files: builder '{hf.path}' needs local files")
        missing = [f for f in hf.data_files if not glob.glob(f)]
        if missing:
            raise FileNotFoundError(f"corpus.hf.data_files: no file matches {missing[0]!r}")
    try:
        ds = datasets.load_dataset(
            hf.path,
            name=hf.name,
            data_files=hf.data_files or None,
            split=hf.split,
            streaming=hf.streaming,
        )
    except Exception as e:  # datasets raises many types; the user needs what and why
        need = "" if local_builder else " (a hub dataset needs the HF hub or a filled HF cache)"
        raise RuntimeError(f"corpus.hf: could not load dataset {hf.path!r}{need}: {e}") from e
    texts: list[str] = []
    for row in ds:
        if hf.text_field not in row:
            raise KeyError(
                f"corpus.hf.text_field = {hf.text_field!r}: not a column of {hf.path!r} "
                f"(columns: {sorted(row)})"
            )
        text = row[hf.text_field]
        if isinstance(text, str) and text.strip():
            texts.append(text)
        if hf.max_docs and len(texts) >= hf.max_docs:
            break
    if not texts:
        raise ValueError(f"corpus.hf: dataset {hf.path!r} gave no non-empty documents")
    splits = [_split_of(i, params.heldout_fraction, 0) for i in range(len(texts))]
    return Corpus(list(range(len(texts))), splits, texts, [], [], f"hf:{hf.path}")


def build_corpus(params: CorpusParams) -> Corpus:
    corpus = build_toy_corpus(params) if params.source == "toy" else build_hf_corpus(params)
    if "train" not in corpus.splits or "heldout" not in corpus.splits:
        raise ValueError(
            f"corpus: {len(corpus.texts)} documents with heldout_fraction = "
            f"{params.heldout_fraction} leave a split empty; expected both train and held-out"
        )
    return corpus


def write_corpus(corpus: Corpus, out: Path, params: CorpusParams) -> dict:
    """Write the corpus atomically to `out`; return its meta (with the content hash)."""
    with atomic_dir(out) as tmp:
        docs = pa.table(
            {
                "doc_id": pa.array(corpus.doc_ids, pa.int64()),
                "split": pa.array(corpus.splits, pa.string()),
                "text": pa.array(corpus.texts, pa.large_string()),
            }
        )
        cols = list(zip(*corpus.labels, strict=True)) if corpus.labels else [[], [], [], []]
        labels = pa.table(
            {
                "doc_id": pa.array(cols[0], pa.int64()),
                "char_start": pa.array(cols[1], pa.int32()),
                "char_end": pa.array(cols[2], pa.int32()),
                "concept": pa.array(cols[3], pa.string()),
            }
        )
        pq.write_table(docs, tmp / "documents.parquet", compression="zstd")
        pq.write_table(labels, tmp / "labels.parquet", compression="zstd")
        write_json(tmp / "concepts.json", [c.__dict__ for c in corpus.concepts])
        h = hashlib.sha256()
        for text in corpus.texts:
            h.update(text.encode())
            h.update(b"\0")
        for row in corpus.labels:
            h.update(repr(row).encode())
        meta = {
            "source": corpus.source,
            "params": params.model_dump(mode="json"),
            "n_docs": len(corpus.texts),
            "n_train_docs": corpus.splits.count("train"),
            "n_heldout_docs": corpus.splits.count("heldout"),
            "n_chars": sum(map(len, corpus.texts)),
            "n_labels": len(corpus.labels),
            "concepts": [c.name for c in corpus.concepts],
            "corpus_hash": h.hexdigest(),
        }
        write_json(tmp / "meta.json", meta)
    return meta


# ---------------------------------------------------------------------------- reading


@dataclass
class CorpusData:
    doc_ids: list[int]
    splits: list[str]
    texts: list[str]
    labels: pa.Table
    concepts: list[Concept]
    meta: dict


def read_corpus(path: Path) -> CorpusData:
    path = Path(path)
    for name in ("documents.parquet", "labels.parquet", "concepts.json", "meta.json"):
        if not (path / name).exists():
            raise FileNotFoundError(
                f"{path / name}: missing; expected the corpus stage's output (run `dvc repro corpus`)"
            )
    docs = pq.read_table(path / "documents.parquet")
    meta = json.loads((path / "meta.json").read_text())
    concepts = [Concept(**c) for c in json.loads((path / "concepts.json").read_text())]
    return CorpusData(
        docs.column("doc_id").to_pylist(),
        docs.column("split").to_pylist(),
        docs.column("text").to_pylist(),
        pq.read_table(path / "labels.parquet"),
        concepts,
        meta,
    )
