"""The corpus stage: documents plus character-span concept labels.

(Over 500 lines: the toy world's vocabulary, exact probabilities, generator and its
causal reader must agree word for word, so they stay in one file read top to bottom.)

The embedded default is a seeded generator of simple English stories in which every
mention of a planted concept carries a label, so every later stage has ground truth:
an animal hierarchy (animal → mammal / bird / fish → species), colours, emotions with
polarity, places, weather, counting and weekday / month sequences (successor
structure), past vs present tense and singular vs plural. These *lexical* concepts are
readable from the labelled token itself.

It also plants *contextual* concepts, whose value cannot be read from the current
token: document properties (the document's tense, the day's weather announced in the
opening sentence), the animal a sentence is about (carried to every later word of the
sentence), and "what comes next" at the word that predicts it (an emotion will follow,
and with which polarity the generator will draw it; a number will follow; at an adverb
between an animal and its verb, which class's verb; at "the" before the place of a
fish's sentence, a water place). They are
computed by `contextual_spans(text)`, a left-to-right reader of the text itself, so they
are causal by construction: the label of word t is a function of words <= t (a span
starts at the last character of the word that determines it, so it lands on that word's
final token and on later tokens only).

Four dependencies are planted with exact probabilities (`TRUTH`, exported as
`truth.json`): the sentence's weather -> the emotion after "feels"; the day's weather
(opening sentence) -> the polarity of emotions later in the document; the animal's class
-> its verb; the previous number of a count -> the next one.

Any HF `datasets` source works too (a hub dataset, streamed, or local text / json /
parquet files); such a corpus simply has no labels.

On disk (`data/corpus/`, one DVC output):
    documents.parquet  doc_id:int64, split:str ('train' | 'heldout'), text:str
    labels.parquet     doc_id:int64, char_start:int32, char_end:int32, concept:str
    concepts.json      [{name, parent, group, description, kind}] in a fixed order
                       (kind: lexical | contextual)
    truth.json         per planted dependency, the generator's exact conditional
                       probabilities (see `TRUTH`)
    lexical_baseline.json  per concept, the best F1 of any word lookup (see below)
    meta.json          source, params, counts, entropy estimate and the content hash

`documents.parquet` also holds `entropy_nats`: minus the log-probability of all the
generator's draws for the document. It upper-bounds the document's entropy, tightly:
the text determines the draws except the number of salmon, trout and carp ("the salmon
swam"). The `lm` stage divides it by its tokenizer's token count to compare held-out
loss with it.

The lexical baseline is computed on *words* (letters runs and single punctuation
marks), not tokens, because the tokenizer is trained per model in the `lm` stage, after
this one. `stages.lexical.lexical_baseline` computes the same on token ids (the
activation store has both), so later stages can report lift over lexical at token level.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from stages.corpus_config import CorpusParams, HFCorpus
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
# How each class moves: (base, 3rd-person-singular present, past). A planted dependency:
# an animal moves like its class with probability P_OWN_MOVE, else like one of the other
# two classes (a finite log-odds, so a model's capture of it can be scored).
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
# An adverb may sit between an animal and its verb ("The cat often runs"), so that a model
# must carry the animal's class past a word that does not name it to predict the verb.
ADVERBS = ["often", "slowly", "quickly", "always", "then"]
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

# ---------------------------------------------------------------------------- the world's truth
# The generator draws with exactly these probabilities; `TRUTH` exports them.
P_OWN_MOVE = 0.85  # an animal's verb comes from its own class; else from another, uniformly
P_MISCOUNT = 0.1  # a count's next number is drawn uniformly from NUMBERS instead
P_ADVERB = 0.5  # an adverb between a motion sentence's animal and its verb
P_LIKED_POSITIVE = 0.8  # "likes the <animal> because it is <emotion>"
PLEASANT_DAYS = ("sunny", "warm")  # the day's weather makes emotions likely positive
GLOOMY_DAYS = ("rainy", "stormy", "foggy")  # ... likely negative (windy, cloudy: neither)


def p_positive_after_weather(weather: str) -> float:
    """P(positive emotion) after "the weather is <weather>, so <name> feels"."""
    return WEATHER[weather]


def p_positive_on_day(day: str | None) -> float:
    """P(positive emotion) of any other emotion of a document whose day is `day`."""
    return WEATHER[day] if day is not None else 0.5


def p_next_number(prev: int, nxt: int) -> float:
    """P(next number = NUMBERS[nxt] | previous = NUMBERS[prev]) inside a count."""
    uniform = P_MISCOUNT / len(NUMBERS) if prev + 1 < len(NUMBERS) else 1 / len(NUMBERS)
    return uniform + (1 - P_MISCOUNT) * (nxt == prev + 1 and prev + 1 < len(NUMBERS))


def p_move_class(animal_class: str, verb_class: str) -> float:
    """P(the verb after an animal of `animal_class` is a verb of `verb_class`)."""
    other = (1 - P_OWN_MOVE) / (len(MOVES) - 1)
    return P_OWN_MOVE if verb_class == animal_class else other


def _truth() -> dict:
    cls_of = {s: c for c, sp in ANIMALS.items() for s in sp}
    return {
        "weather_emotion": {
            "cue": "weather word of the sentence 'the weather is <w>, so <name> feels'",
            "outcome": "the next word is a positive (vs negative) emotion",
            "p_outcome": {w: p_positive_after_weather(w) for w in WEATHER},
        },
        "day_emotion": {
            "cue": "the day's weather in the opening sentence 'It is a <w> day.'",
            "outcome": "an emotion after 'and is', 'the <animals> are' or 'feeds the <animal> "
            "because it is' anywhere later in the document is positive (vs negative)",
            "p_outcome": {w: p_positive_on_day(w) for w in WEATHER},
        },
        "class_verb": {
            "cue": "the animal noun before the verb in '<det> <animal> [<adverb>] <verb>'",
            "outcome": "the verb is one of the animal's own class' verbs (vs the others')",
            "p_outcome": {s: p_move_class(c, c) for s, c in cls_of.items()},
            "p_verb_class": {c: {v: p_move_class(c, v) for v in MOVES} for c in MOVES},
        },
        "count_next": {
            "cue": "the previous number of a count ': one, two, three'",
            "outcome": "the next number (vs any other number word)",
            "p_next": {
                a: {b: p_next_number(i, j) for j, b in enumerate(NUMBERS)}
                for i, a in enumerate(NUMBERS)
            },  # fmt: skip
        },
    }


TRUTH: dict = _truth()


@dataclass(frozen=True)
class Concept:
    name: str
    parent: str | None
    group: str
    description: str
    kind: str = "lexical"  # lexical: readable from the token | contextual: it is not


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
    ctx = [
        ("doc_past", "document", "the document is in the past tense (from its first verb on)"),
        ("doc_present", "document", "the document is in the present tense (from its first verb on)"),
        ("pleasant_day", "document", "the day announced in the opening sentence is sunny or warm"),
        ("gloomy_day", "document", "the day announced in the opening sentence is rainy, stormy or foggy"),
        ("about_mammal", "sentence", "the sentence so far is about a mammal (from the noun to the '.')"),
        ("about_bird", "sentence", "the sentence so far is about a bird (from the noun to the '.')"),
        ("about_fish", "sentence", "the sentence so far is about a fish (from the noun to the '.')"),
        ("next_is_emotion", "next", "the next word is an emotion (at the word before it)"),
        ("expect_positive", "next", "the next word is an emotion, positive with probability > 0.5"),
        ("expect_negative", "next", "the next word is an emotion, positive with probability < 0.5"),
        ("next_is_number", "next", "the next word is a number of a count (at ':' and ',')"),
        ("expect_mammal_move", "next", "the next word is a motion verb, most likely a mammal's (at an adverb after a mammal)"),
        ("expect_bird_move", "next", "the next word is a motion verb, most likely a bird's (at an adverb after a bird)"),
        ("expect_fish_move", "next", "the next word is a motion verb, most likely a fish's (at an adverb after a fish)"),
        ("expect_water_place", "next", "the next word is a place, most likely a river, lake or beach (at 'the' before the place of a sentence about a fish)"),
    ]  # fmt: skip
    out += [Concept(n, None, g, d, "contextual") for n, g, d in ctx]
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
    """One document: a tense and a day drawn once, then 4-9 sentences from a small grammar.

    Every random draw goes through `flip` / `pick` / `randint`, which add its
    log-probability to `logp`: minus that is the document's `entropy_nats`.
    """

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.logp = 0.0
        self.doc = _Doc()
        self.past = self.flip(0.5)
        self.day: str | None = None

    # -- draws (each one's log-probability is recorded) ----------------------------
    def flip(self, p: float) -> bool:
        out = self.rng.random() < p
        self.logp += math.log(p if out else 1 - p)
        return out

    def pick(self, seq, weights=None):
        if weights is None:
            self.logp -= math.log(len(seq))
            return self.rng.choice(seq)
        i = self.rng.choices(range(len(seq)), weights)[0]
        self.logp += math.log(weights[i] / sum(weights))
        return seq[i]

    def randint(self, a: int, b: int) -> int:
        self.logp -= math.log(b - a + 1)
        return self.rng.randint(a, b)

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
        cls = cls or self.pick(list(ANIMALS))
        species = self.pick(list(ANIMALS[cls]))
        plural = self.flip(0.5) if plural is None else plural
        word = ANIMALS[cls][species][1 if plural else 0]
        self.doc.add(word, "animal", cls, species, "plural" if plural else "singular")
        return cls, plural

    def emotion(self, p_positive: float = 0.5) -> None:
        if self.flip(p_positive):
            self.doc.add(self.pick(POSITIVE), "emotion", "positive_emotion")
        else:
            self.doc.add(self.pick(NEGATIVE), "emotion", "negative_emotion")

    def determiner(self, plural: bool, capital: bool) -> None:
        if plural:
            if self.flip(0.5):
                word = self.pick(NUMBERS[1:6])
                self.doc.add(word.capitalize() if capital else word, "number")
                return
            word = self.pick(["the", "some", "many"])
        else:
            word = self.pick(["the", "a"])
        self.doc.add(word.capitalize() if capital else word)

    def w(self, text: str) -> None:
        self.doc.add(text)

    # -- sentences -----------------------------------------------------------------
    def s_day(self) -> None:
        """The opening sentence: the day's weather, which colours later emotions."""
        self.w("It ")
        self.be(False)
        self.w(" a ")
        self.day = self.pick(list(WEATHER))
        self.doc.add(self.day, "weather")
        self.w(" day.")

    def s_motion(self) -> None:
        plural = self.flip(0.5)
        self.determiner(plural, capital=True)
        self.w(" ")
        if self.flip(0.6):
            self.doc.add(self.pick(COLOURS), "colour")
            self.w(" ")
        cls = self.pick(list(ANIMALS))
        self.animal(cls, plural)
        self.w(" ")
        if self.flip(P_ADVERB):
            self.w(self.pick(ADVERBS) + " ")
        if self.flip(P_OWN_MOVE):
            verb_cls = cls
        else:
            verb_cls = self.pick([c for c in MOVES if c != cls])
        self.verb(self.pick(MOVES[verb_cls]), plural)
        place = self.pick(WATER_PLACES if cls == "fish" else PLACES)
        self.w(f" {MOVE_PREP[verb_cls]} the ")
        self.doc.add(place, "place")
        self.w(".")

    def s_weather(self) -> None:
        self.w("On ")
        self.doc.add(self.pick(WEEKDAYS), "weekday")
        self.w(" the weather ")
        self.be(False)
        self.w(" ")
        weather = self.pick(list(WEATHER))
        self.doc.add(weather, "weather")
        self.w(", so ")
        self.w(self.pick(NAMES))
        self.w(" ")
        self.verb(FEEL, False)
        self.w(" ")
        self.emotion(p_positive_after_weather(weather))
        self.w(".")

    def s_meet(self) -> None:
        self.w(self.pick(NAMES) + " ")
        self.verb(SEE, False)
        plural = self.flip(0.5)
        self.w(" ")
        self.determiner(plural, capital=False)
        self.w(" ")
        cls, _ = self.animal(plural=plural)
        self.w(" in the ")
        self.doc.add(self.pick(WATER_PLACES if cls == "fish" else PLACES), "place")
        self.w(" and ")
        self.be(False)
        self.w(" ")
        self.emotion(p_positive_on_day(self.day))
        self.w(".")

    def s_count(self) -> None:
        self.w(self.pick(NAMES) + " ")
        self.verb(COUNT, False)
        self.w(" the ")
        self.animal(plural=True)
        self.w(": ")
        i = self.pick(range(len(NUMBERS) - 3))
        length = self.randint(3, min(6, len(NUMBERS) - i))
        self.doc.add(NUMBERS[i], "number")
        for _ in range(length - 1):
            self.w(", ")
            # the successor, except for a planted miscount (p_next_number)
            if i + 1 < len(NUMBERS) and not self.flip(P_MISCOUNT):
                i += 1
            else:
                i = self.pick(range(len(NUMBERS)))
            self.doc.add(NUMBERS[i], "number")
        self.w(".")

    def s_sequence(self) -> None:
        names, concept = (WEEKDAYS, "weekday") if self.flip(0.5) else (MONTHS, "month")
        i = self.pick(range(len(names)))
        self.w("After ")
        self.doc.add(names[i], concept)
        self.w(" ")
        self.verb(COME, False)
        self.w(" ")
        self.doc.add(names[(i + 1) % len(names)], concept)
        self.w(".")

    def s_month(self) -> None:
        self.w("In ")
        self.doc.add(self.pick(MONTHS), "month")
        self.w(" the ")
        self.animal(plural=True)
        self.w(" ")
        self.be(True)
        self.w(" ")
        self.emotion(p_positive_on_day(self.day))
        self.w(".")

    def s_like(self) -> None:
        self.w(self.pick(NAMES) + " ")
        positive = self.flip(0.5)
        if positive:
            self.verb(LIKE, False)
        else:
            self.verb(FEED, False)
        self.w(" the ")
        self.doc.add(self.pick(COLOURS), "colour")
        self.w(" ")
        self.animal(plural=False)
        self.w(" because it ")
        self.be(False)
        self.w(" ")
        self.emotion(P_LIKED_POSITIVE if positive else p_positive_on_day(self.day))
        self.w(".")

    def generate(self) -> _Doc:
        sentences = [
            self.s_motion, self.s_weather, self.s_meet, self.s_count,
            self.s_sequence, self.s_month, self.s_like,
        ]  # fmt: skip
        weights = [3, 2, 3, 1, 1, 1, 2]
        self.s_day()
        for _ in range(self.randint(4, 9)):
            self.w(" ")
            self.pick(sentences, weights)()
        return self.doc


# ---------------------------------------------------------------------------- contextual labels

WORD = re.compile(r"[A-Za-z]+|[^\sA-Za-z]")
_CLASS_OF_WORD = {f: c for c, sp in ANIMALS.items() for forms in sp.values() for f in forms}
_SPECIES_OF_WORD = {f: s for sp in ANIMALS.values() for s, forms in sp.items() for f in forms}
_PAST = {v[2] for vs in MOVES.values() for v in vs} | {
    v[2] for v in (SEE, FEEL, COUNT, LIKE, COME, FEED)} | {"was", "were"}  # fmt: skip
_PRESENT = {f for vs in MOVES.values() for v in vs for f in v[:2]} | {
    f for v in (SEE, FEEL, COUNT, LIKE, COME, FEED) for f in v[:2]} | {"is", "are"}  # fmt: skip
_VERB_CLASS = {f: c for c, vs in MOVES.items() for v in vs for f in v}
_NUMBER_INDEX = {n: i for i, n in enumerate(NUMBERS)}


@dataclass(frozen=True)
class Site:
    """One occurrence of a planted dependency: where its cue is, where its outcome is.

    `prefix_end` is where the text a model conditions on ends (before the space that
    precedes the outcome word); `outcome` / `alternatives` are the words the outcome is
    scored over (the event and its complement among the words the slot can hold).
    """

    dependency: str
    cue_start: int
    cue_end: int
    cue: str
    prefix_end: int
    outcome: tuple[str, ...]
    alternatives: tuple[str, ...]
    cues: tuple[str, ...]  # the values the cue slot can take, grammatical in this context
    p_outcome: tuple[float, ...]  # the generator's P(outcome | prefix with that cue)


_SINGULAR = {f[0] for sp in ANIMALS.values() for f in sp.values()}
_PLURAL = {f[1] for sp in ANIMALS.values() for f in sp.values()}


def _plural_subject(determiner: str, noun: str, verb_form: int) -> bool:
    """Whether '<determiner> <noun> <verb>' has a plural subject (for a grammatical cue)."""
    d = determiner.lower()
    if d in NUMBERS or d in ("some", "many"):
        return True
    if d == "a" or noun not in _PLURAL:
        return False
    if noun not in _SINGULAR:
        return True
    return verb_form == 0  # salmon / trout / carp: 'swim' is plural, 'swims' / 'swam' taken as not


def _words(text: str) -> list[tuple[str, int, int]]:
    return [(m.group(), m.start(), m.end()) for m in WORD.finditer(text)]


def read_context(text: str) -> tuple[list[tuple[int, int, str]], list[Site]]:
    """Contextual label spans and dependency sites of `text`, reading left to right.

    Causal: whatever is decided at word t uses words <= t only, and its span starts at
    the last character of word t. So reading a prefix of the text (cut after any word)
    gives the same labels on that prefix.
    """
    words = _words(text)
    n = len(text)
    spans: list[tuple[int, int, str]] = []
    sites: list[Site] = []
    tense_set = False
    day: str | None = None
    sent: list[str] = []  # words of the current sentence so far
    sent_cue: tuple[int, int, str] | None = None  # weather / animal word of the sentence
    about_start, about_cls = -1, ""
    counting, liked = False, False

    def close_about(end: int) -> None:
        nonlocal about_start
        if about_start >= 0:
            spans.append((about_start, end, f"about_{about_cls}"))
        about_start = -1

    for t, (wd, s, e) in enumerate(words):
        last = e - 1  # a span decided at this word starts on its last character
        if not tense_set and (wd in _PAST or wd in _PRESENT):
            tense_set = True
            spans.append((last, n, "doc_past" if wd in _PAST else "doc_present"))
        if t == 3 and [w for w, *_ in words[:3]] in (["It", "is", "a"], ["It", "was", "a"]):
            if wd in WEATHER:
                day = wd
                if wd in PLEASANT_DAYS:
                    spans.append((last, n, "pleasant_day"))
                elif wd in GLOOMY_DAYS:
                    spans.append((last, n, "gloomy_day"))
        if wd in _CLASS_OF_WORD:
            close_about(s)
            about_start, about_cls = last, _CLASS_OF_WORD[wd]
            sent_cue = (s, e, wd)
        elif (
            wd in WEATHER
            and len(sent) >= 2
            and sent[-2:] in (["weather", "is"], ["weather", "was"])
        ):
            sent_cue = (s, e, wd)

        # what comes next, decided at this word
        p_pos: float | None = None
        if wd in FEEL and "weather" in sent and sent_cue is not None:
            p_pos = p_positive_after_weather(sent_cue[2])
            _site = ("weather_emotion", sent_cue)
        elif wd in ("is", "was") and sent and sent[-1] == "and" and sent_cue is not None:
            p_pos, _site = p_positive_on_day(day), ("day_emotion", None)
        elif wd in ("are", "were") and sent[:1] == ["In"] and sent and sent[-1] in _CLASS_OF_WORD:
            p_pos, _site = p_positive_on_day(day), ("day_emotion", None)
        elif wd in ("is", "was") and sent[-2:] == ["because", "it"]:
            p_pos = P_LIKED_POSITIVE if liked else p_positive_on_day(day)
            _site = ("day_emotion", None) if not liked else ("", None)
        if p_pos is not None:
            spans.append((last, e, "next_is_emotion"))
            if p_pos > 0.5:
                spans.append((last, e, "expect_positive"))
            elif p_pos < 0.5:
                spans.append((last, e, "expect_negative"))
            dep, cue = _site
            p_of = p_positive_after_weather
            if dep == "day_emotion" and day is not None:
                ds, de = words[3][1], words[3][2]
                cue, p_of = (ds, de, day), p_positive_on_day
            if dep and cue is not None and t + 1 < len(words):
                cues = tuple(WEATHER)
                sites.append(Site(dep, cue[0], cue[1], cue[2], e, tuple(POSITIVE), tuple(NEGATIVE),
                                  cues, tuple(p_of(c) for c in cues)))  # fmt: skip
        if wd in ("count", "counts", "counted"):
            counting = False
        if wd == ":" and sent and sent[0] in NAMES and any(w.startswith("count") for w in sent):
            counting = True
        if counting and wd in (":", ","):
            spans.append((last, e, "next_is_number"))
        if counting and wd == "," and sent and sent[-1] in _NUMBER_INDEX and t + 1 < len(words):
            prev = words[t - 1]
            nxt = words[t + 1][0]
            if _NUMBER_INDEX[prev[0]] + 1 < len(NUMBERS) and nxt in _NUMBER_INDEX:
                target = NUMBERS[_NUMBER_INDEX[prev[0]] + 1]
                others = tuple(x for x in NUMBERS if x != target)
                tix = NUMBERS.index(target)
                # cue values: the numbers that have a successor (twelve ends the counts)
                p = tuple(p_next_number(i, tix) for i in range(len(NUMBERS) - 1))
                sites.append(Site("count_next", prev[1], prev[2], prev[0], e, (target,), others,
                                  tuple(NUMBERS[:-1]), p))  # fmt: skip
        # the motion sentence's animal, right before this word or before an adverb
        noun = sent[-1] if sent and sent[-1] in _CLASS_OF_WORD else None
        if noun is None and sent[-1:] and sent[-1] in ADVERBS and sent[-2:-1]:
            noun = sent[-2] if sent[-2] in _CLASS_OF_WORD else None
        motion = noun is not None and sent[0] not in NAMES and sent[0] != "In"
        if wd in ADVERBS and motion and noun == sent[-1]:
            # the verb follows, its class the animal's with P_OWN_MOVE > 0.5
            spans.append((last, e, f"expect_{_CLASS_OF_WORD[noun]}_move"))
        if wd == "the" and sent[-1:] in (["to"], ["over"], ["in"]) and about_cls == "fish":
            if about_start >= 0:  # a fish's place is a water place (else 3 in 11 are)
                spans.append((last, e, "expect_water_place"))
        if wd in _VERB_CLASS and motion and sent_cue is not None:
            # '<det> [<colour>] <animal> [<adverb>] <verb>': the verb slot after the animal
            form = next(i for v in MOVES[_VERB_CLASS[wd]] for i, f in enumerate(v) if f == wd)
            own = _CLASS_OF_WORD[noun]
            outcome = tuple(v[form] for v in MOVES[own])
            alts = tuple(v[form] for c in MOVES if c != own for v in MOVES[c])
            plural = _plural_subject(sent[0], noun, form)
            cues = tuple(f[1 if plural else 0] for sp in ANIMALS.values() for f in sp.values())
            p = tuple(p_move_class(_CLASS_OF_WORD[c], own) for c in cues)
            sites.append(Site("class_verb", sent_cue[0], sent_cue[1], sent_cue[2], s - 1,
                              outcome, alts, cues, p))  # fmt: skip
        if wd in ("likes", "liked"):
            liked = True
        elif wd in ("feeds", "fed"):
            liked = False
        if wd == ".":
            close_about(e)
            sent, sent_cue, counting, liked = [], None, False, False
        else:
            sent.append(wd)
    close_about(n)
    return spans, sites


def p_next_word_in(site: Site, words: Sequence[str]) -> float:
    """The generator's P(next word in `words`) at `site`, given its own cue `site.cue`:
    the exact next-word distribution of the slot, independent of `site.outcome`."""
    if site.dependency in ("weather_emotion", "day_emotion"):
        p = site.p_outcome[site.cues.index(site.cue)]
        return sum(p / len(POSITIVE) if w in POSITIVE else
                   (1 - p) / len(NEGATIVE) if w in NEGATIVE else 0.0 for w in words)  # fmt: skip
    if site.dependency == "class_verb":
        cls = _CLASS_OF_WORD[site.cue]
        return sum(p_move_class(cls, _VERB_CLASS[w]) / len(MOVES[_VERB_CLASS[w]])
                   for w in words if w in _VERB_CLASS)  # fmt: skip
    if site.dependency == "count_next":
        i = _NUMBER_INDEX[site.cue]
        return sum(p_next_number(i, _NUMBER_INDEX[w]) for w in words if w in _NUMBER_INDEX)
    raise KeyError(f"p_next_word_in: unknown dependency {site.dependency!r}")


def contextual_spans(text: str) -> list[tuple[int, int, str]]:
    """(start, end, concept) spans of the contextual concepts of `text` (see read_context)."""
    return read_context(text)[0]


def generate_story(seed: int, index: int) -> tuple[str, list[tuple[int, int, str]]]:
    """Document `index` of the corpus with `seed`: its text and (start, end, concept) spans,
    lexical (from the generator) then contextual (from `contextual_spans`).

    Each document has its own RNG, so any document can be regenerated on its own.
    """
    text, spans, _ = generate_story_with_entropy(seed, index)
    return text, spans


def generate_story_with_entropy(seed: int, index: int) -> tuple[str, list, float]:
    """`generate_story` plus the document's entropy_nats (minus the log-prob of its draws)."""
    rng = random.Random(f"feature-atlas/{seed}/{index}")
    story = _Story(rng)
    doc = story.generate()
    return doc.text, doc.spans + contextual_spans(doc.text), -story.logp


# ---------------------------------------------------------------------------- building


@dataclass
class Corpus:
    doc_ids: list[int]
    splits: list[str]
    texts: list[str]
    labels: list[tuple[int, int, int, str]]  # doc_id, start, end, concept
    concepts: list[Concept]
    source: str
    entropy_nats: list[float] | None = None  # per document, toy corpus only


def _split_of(doc_id: int, heldout_fraction: float, seed: int) -> str:
    # A hash, not an RNG stream: the split of a document does not depend on the others.
    h = hashlib.sha256(f"split/{seed}/{doc_id}".encode()).digest()
    return "heldout" if int.from_bytes(h[:8], "little") / 2**64 < heldout_fraction else "train"


def build_toy_corpus(params: CorpusParams) -> Corpus:
    texts, labels, splits, entropy = [], [], [], []
    for i in range(params.toy.n_docs):
        text, spans, h = generate_story_with_entropy(params.toy.seed, i)
        texts.append(text)
        entropy.append(h)
        labels += [(i, s, e, c) for s, e, c in spans]
        splits.append(_split_of(i, params.heldout_fraction, params.toy.seed))
    return Corpus(list(range(len(texts))), splits, texts, labels, CONCEPTS, "toy", entropy)


def word_units(texts: list[str], labels: list[tuple[int, int, int, str]],
               concept_names: list[str]) -> tuple[np.ndarray, np.ndarray, list[str]]:  # fmt: skip
    """Words (letter runs, single punctuation marks) of all documents as units for the
    word-level lexical baseline: (word-type ids [n], labels uint8 [n, k], the types).
    A word carries a concept when its characters overlap one of the concept's spans."""
    col = {c: j for j, c in enumerate(concept_names)}
    types: dict[str, int] = {}
    ids, starts, ends, docs = [], [], [], []
    for d, text in enumerate(texts):
        for w, s, e in _words(text):
            ids.append(types.setdefault(w, len(types)))
            starts.append(s)
            ends.append(e)
            docs.append(d)
    out = np.zeros((len(ids), len(concept_names)), np.uint8)
    kept = [row for row in labels if row[3] in col]
    if not ids or not kept:
        return np.asarray(ids, np.int64), out, list(types)
    # one global character axis (document d at d * stride), on which words are sorted
    stride = max(len(t) for t in texts) + 2
    d_arr = np.asarray(docs, np.int64) * stride
    g_s, g_e = d_arr + np.asarray(starts), d_arr + np.asarray(ends)
    l_d, l_s, l_e, l_c = (np.asarray(x) for x in zip(*kept, strict=True))
    l_s, l_e = l_d.astype(np.int64) * stride + l_s, l_d.astype(np.int64) * stride + l_e
    l_c = np.array([col[c] for c in l_c])
    i0 = np.searchsorted(g_e, l_s, side="right")  # words overlapping [s, e): end > s
    i1 = np.searchsorted(g_s, l_e, side="left")  # ... and start < e
    for j in np.unique(l_c):
        m = l_c == j
        diff = np.bincount(i0[m], minlength=len(ids) + 1) - np.bincount(
            i1[m], minlength=len(ids) + 1
        )
        out[:, j] = np.cumsum(diff[:-1]) > 0
    return np.asarray(ids, np.int64), out, list(types)


def word_lexical_baseline(corpus: Corpus) -> dict:
    """Per concept: best F1 of any word-type lookup over the whole corpus (stages.lexical)."""
    from stages.lexical import lexical_baseline

    names = [c.name for c in corpus.concepts]
    ids, lab, _ = word_units(corpus.texts, corpus.labels, names)
    table = lexical_baseline(ids, lab, names)
    kinds = {c.name: c.kind for c in corpus.concepts}
    return {name: {**v, "kind": kinds[name]} for name, v in table.items()}


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
        if corpus.entropy_nats is not None:
            docs = docs.append_column("entropy_nats", pa.array(corpus.entropy_nats, pa.float64()))
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
        if corpus.source == "toy":
            write_json(tmp / "truth.json", TRUTH)
            baseline = word_lexical_baseline(corpus)
            write_json(tmp / "lexical_baseline.json", {
                "unit": "word (letter runs and single punctuation marks): the tokenizer is "
                        "trained per model after this stage; stages.lexical gives the "
                        "token-level figure from an activation store",
                "concepts": baseline})  # fmt: skip
            ent = np.asarray(corpus.entropy_nats)
            n_words = sum(len(WORD.findall(t)) for t in corpus.texts)
            meta["entropy"] = {
                "method": "minus the log-probability of the generator's draws per document: "
                "an upper bound on the text's entropy, tight except for the number of "
                "salmon / trout / carp in the past tense; per token: see metrics/lm",
                "nats_per_doc": round(float(ent.mean()), 6),
                "nats_per_char": round(float(ent.sum() / meta["n_chars"]), 6),
                "nats_per_word": round(float(ent.sum() / n_words), 6),
            }
            meta["n_contextual_low_lexical"] = sum(
                1 for v in baseline.values() if v["kind"] == "contextual" and v["f1"] <= 0.6
            )
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
    entropy_nats: list[float] | None = None  # per document (toy corpus)


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
        docs.column("entropy_nats").to_pylist() if "entropy_nats" in docs.column_names else None,
    )
