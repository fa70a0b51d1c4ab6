"""Contrastive sets: (positive, negative) pairs, held-out eval prompts and target words.

One set = one JSONL file (schema in `data/prompts/README.md`). Every line is an object
with a `kind` (default `"pair"`):

    {"kind": "header", "name": "sentiment", "positive_targets": ["love"],
     "negative_targets": ["hate"], "target_prefix": " ", "description": "..."}
    {"positive": "Love", "negative": "Hate", "read_position": -1, "split": "train"}
    {"kind": "eval", "prompt": "I think you are", "positive_targets": [...]}   # optional override

`read_position` indexes the tokenised prompt *including* the BOS token at 0: -1 (the
default) is the last token, 3 is the fourth token, "mean" averages every non-BOS
token. Pairs with `"split": "heldout"` are never used to build a vector.

Targets are words; their token ids are the first token of `target_prefix + word`
(prefix " " by default: byte-level BPE tokenises " happy" and "happy" differently).

For the embedded toy corpus, `toy_sets(seed, n_train, n_heldout)` builds sets from the
corpus grammar's own vocabulary lists (`stages/corpus.py`), so they stay in sync.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from stages.corpus import ANIMALS, COLOURS, MOVES, NAMES, NEGATIVE, POSITIVE, WEATHER, WEEKDAYS
from stages.layout import safe_name

ReadPosition = int | str  # an index (BOS = 0, -1 = last token) or "mean"


@dataclass(frozen=True)
class ContrastivePair:
    positive: str
    negative: str
    read_position: ReadPosition = -1
    split: str = "train"  # "train" | "heldout"


@dataclass(frozen=True)
class EvalPrompt:
    """A held-out prompt; the metric is read at its last token. Empty target lists mean
    "use the set's targets"."""

    prompt: str
    positive_targets: tuple[str, ...] = ()
    negative_targets: tuple[str, ...] = ()


@dataclass
class SteeringSet:
    name: str
    pairs: list[ContrastivePair]
    eval_prompts: list[EvalPrompt] = field(default_factory=list)
    positive_targets: list[str] = field(default_factory=list)
    negative_targets: list[str] = field(default_factory=list)
    target_prefix: str = " "
    description: str = ""
    # the corpus concept the positive side stands for (probe labels, ground-truth latents)
    concept: str | None = None
    negative_concept: str | None = None

    @property
    def train_pairs(self) -> list[ContrastivePair]:
        return [p for p in self.pairs if p.split == "train"]

    @property
    def heldout_pairs(self) -> list[ContrastivePair]:
        return [p for p in self.pairs if p.split == "heldout"]

    def targets_for(self, ep: EvalPrompt) -> tuple[list[str], list[str]]:
        return (list(ep.positive_targets) or self.positive_targets,
                list(ep.negative_targets) or self.negative_targets)  # fmt: skip

    def content_hash(self) -> str:
        """sha256 of the set's canonical JSONL text (what `write_set` writes)."""
        return hashlib.sha256(to_jsonl(self).encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "n_train_pairs": len(self.train_pairs),
            "n_heldout_pairs": len(self.heldout_pairs),
            "n_eval_prompts": len(self.eval_prompts),
            "positive_targets": self.positive_targets,
            "negative_targets": self.negative_targets,
            "target_prefix": self.target_prefix,
            "concept": self.concept,
            "negative_concept": self.negative_concept,
            "hash": self.content_hash(),
        }


# ---------------------------------------------------------------------------- JSONL


def _header(s: SteeringSet) -> dict[str, Any]:
    return {"kind": "header", "name": s.name, "positive_targets": s.positive_targets,
            "negative_targets": s.negative_targets, "target_prefix": s.target_prefix,
            "description": s.description, "concept": s.concept,
            "negative_concept": s.negative_concept}  # fmt: skip


def to_jsonl(s: SteeringSet) -> str:
    lines = [_header(s)]
    lines += [{"kind": "pair", **asdict(p)} for p in s.pairs]
    for e in s.eval_prompts:
        d: dict[str, Any] = {"kind": "eval", "prompt": e.prompt}
        if e.positive_targets:
            d["positive_targets"] = list(e.positive_targets)
        if e.negative_targets:
            d["negative_targets"] = list(e.negative_targets)
        lines.append(d)
    return "".join(json.dumps(d, sort_keys=True) + "\n" for d in lines)


def write_set(s: SteeringSet, path: Path) -> None:
    Path(path).write_text(to_jsonl(s))


_PAIR_KEYS = {"kind", "positive", "negative", "read_position", "split"}
_EVAL_KEYS = {"kind", "prompt", "positive_targets", "negative_targets"}
_HEADER_KEYS = {"kind", "name", "positive_targets", "negative_targets", "target_prefix",
                "description", "concept", "negative_concept"}  # fmt: skip


def _fail(path: Path, line: int, msg: str) -> ValueError:
    return ValueError(f"{path}: line {line}: {msg}")


def _words(path: Path, i: int, d: dict, key: str) -> list[str]:
    v = d.get(key, [])
    if not isinstance(v, list) or not all(isinstance(w, str) and w for w in v):
        raise _fail(path, i, f"'{key}' must be a list of non-empty strings, got {v!r}")
    return v


def read_set(path: Path, name: str | None = None) -> SteeringSet:
    """Parse one set file; every malformed line raises ValueError naming file and line."""
    path = Path(path)
    if not path.is_file():
        what = "a folder" if path.is_dir() else "missing"
        raise FileNotFoundError(f"{path}: {what}; expected a contrastive set (a JSONL file)")
    s = SteeringSet(name or path.stem, [])
    header_line = None
    eval_lines: list[int] = []
    # utf-8-sig: a file saved by an editor that writes a byte-order mark reads the same
    for i, raw in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            d = json.loads(raw)
        except json.JSONDecodeError as e:
            raise _fail(path, i, f"not valid JSON ({e.msg}); expected an object like "
                        '{"positive": "...", "negative": "..."}') from None  # fmt: skip
        if not isinstance(d, dict):
            raise _fail(path, i, f"expected a JSON object, got {type(d).__name__}")
        kind = d.get("kind", "pair")
        allowed = {"pair": _PAIR_KEYS, "eval": _EVAL_KEYS, "header": _HEADER_KEYS}.get(kind)
        if allowed is None:
            raise _fail(path, i, f"kind = {kind!r}, expected 'pair', 'eval' or 'header'")
        if extra := sorted(set(d) - allowed):
            raise _fail(path, i, f"unknown key(s) {extra} for kind '{kind}' "
                        f"(allowed: {sorted(allowed)})")  # fmt: skip
        if kind == "header":
            if header_line is not None:
                raise _fail(path, i, f"a second header (the first is on line {header_line})")
            if s.pairs or s.eval_prompts:
                raise _fail(path, i, "the header must come before pairs and eval prompts")
            header_line = i
            for key in ("name", "target_prefix", "description"):
                if key in d and not isinstance(d[key], str):
                    raise _fail(path, i, f"'{key}' must be a string, got {d[key]!r}")
            for key in ("concept", "negative_concept"):
                if d.get(key) is not None and not isinstance(d[key], str):
                    raise _fail(path, i, f"'{key}' must be a concept name or null, got "
                                f"{d[key]!r}")  # fmt: skip
            if d.get("name"):  # it names the output folders data/steering/<model>/<name>/
                s.name = safe_name(d["name"], f"{path}: line {i}: 'name'")
            s.positive_targets = _words(path, i, d, "positive_targets")
            s.negative_targets = _words(path, i, d, "negative_targets")
            s.target_prefix = d.get("target_prefix", " ")
            s.description = d.get("description", "")
            s.concept, s.negative_concept = d.get("concept"), d.get("negative_concept")
        elif kind == "pair":
            for key in ("positive", "negative"):
                if not isinstance(d.get(key), str) or not d[key]:
                    raise _fail(path, i, f"'{key}' must be a non-empty string, got "
                                f"{d.get(key)!r}")  # fmt: skip
            rp = d.get("read_position", -1)
            if not (rp == "mean" or (isinstance(rp, int) and not isinstance(rp, bool))):
                raise _fail(path, i, f"read_position = {rp!r}, expected an integer token "
                            "index (BOS = 0, -1 = last token) or 'mean'")  # fmt: skip
            split = d.get("split", "train")
            if split not in ("train", "heldout"):
                raise _fail(path, i, f"split = {split!r}, expected 'train' or 'heldout'")
            s.pairs.append(ContrastivePair(d["positive"], d["negative"], rp, split))
        else:
            if not isinstance(d.get("prompt"), str) or not d["prompt"]:
                raise _fail(path, i, f"'prompt' must be a non-empty string, got "
                            f"{d.get('prompt')!r}")  # fmt: skip
            s.eval_prompts.append(EvalPrompt(
                d["prompt"], tuple(_words(path, i, d, "positive_targets")),
                tuple(_words(path, i, d, "negative_targets"))))  # fmt: skip
            eval_lines.append(i)
    # without a header 'name' the set is named after its file (it names output folders)
    safe_name(s.name, f"{path}: the set's name (from the file name: no header 'name')")
    if not s.train_pairs:
        raise ValueError(f"{path}: no training pairs; expected at least one line "
                         '{"positive": "...", "negative": "..."}')  # fmt: skip
    if not s.eval_prompts:
        raise ValueError(f"{path}: no eval prompts (the behaviour metric is read on them); "
                         'expected at least one line {"kind": "eval", "prompt": "..."}')  # fmt: skip
    for i, ep in zip(eval_lines, s.eval_prompts, strict=True):
        pos, neg = s.targets_for(ep)
        if not pos or not neg:
            side = "positive" if not pos else "negative"
            raise _fail(path, i, f"no {side} target words for this prompt; expected "
                        f"'{side}_targets' on it or in the header")  # fmt: skip
    return s


def read_sets(folder: Path) -> dict[str, SteeringSet]:
    """Every `*.jsonl` set in a folder (e.g. `data/prompts/`), keyed by set name."""
    return {s.name: s for s in (read_set(p) for p in sorted(Path(folder).glob("*.jsonl")))}


def target_ids(tokenizer, words: list[str], prefix: str = " ") -> list[int]:
    """Token id of the first token of `prefix + word`, deduplicated, in order."""
    out: list[int] = []
    for w in words:
        ids = tokenizer.encode(prefix + w, add_special_tokens=False)
        if not ids:
            raise ValueError(f"target word {w!r} tokenises to nothing")
        if ids[0] not in out:
            out.append(ids[0])
    return out


# ---------------------------------------------------------------------------- toy sets

_SPECIES = {cls: [forms for forms in ANIMALS[cls].values()] for cls in ("mammal", "bird")}


def _too_few(what: str, n_train: int, n_heldout: int, gives: str) -> ValueError:
    """The error for a toy set asked for more pairs than its grammar has."""
    return ValueError(
        f"toy set '{what}': steering.toy_sets.n_train = {n_train} + n_heldout = {n_heldout} "
        f"requested, but the grammar gives {gives}: expected fewer"
    )


def _split(items: list, n_train: int, n_heldout: int, rng: random.Random, what: str):
    items = list(items)
    rng.shuffle(items)
    if n_train + n_heldout > len(items):
        raise _too_few(what, n_train, n_heldout, f"{len(items)} distinct contexts")
    return items[:n_train], items[n_train : n_train + n_heldout]


def emotion_polarity(seed: int, n_train: int, n_heldout: int) -> SteeringSet:
    """'On Monday the weather is sunny, so Tom feels' vs '... is stormy, so Tom feels',
    read at the last token ('feels'), where the model predicts the emotion. In the corpus
    the weather sets the odds of a positive emotion (sunny 0.85 ... stormy 0.1), so the
    contrast is the model's own "a positive emotion comes next" state.

    (Pairs differing only in the emotion word itself, read at the word, give a vector
    that does not steer the next emotion on the toy models: nothing in the grammar
    depends on the polarity of an emotion already said, so the model never reads it.)

    Eval: the frame with a weather of middling odds (windy, cloudy, foggy) on held-out
    (weekday, name) contexts; targets = all POSITIVE vs all NEGATIVE words."""
    rng = random.Random(f"steering/emotion/{seed}")
    good = [w for w, p in WEATHER.items() if p >= 0.75]
    bad = [w for w, p in WEATHER.items() if p <= 0.25]
    middling = [w for w in WEATHER if w not in good + bad]
    # (weekday, name) contexts are split first: held-out pairs and prompts never share
    # one with a training pair
    people = list(itertools.product(WEEKDAYS, NAMES))
    rng.shuffle(people)
    cut = max(1, round(len(people) * n_train / (n_train + n_heldout)))
    train = [(*c, g, b) for c in people[:cut] for g in good for b in bad]
    held = [(*c, g, b) for c in people[cut:] for g in good for b in bad]
    rng.shuffle(train)
    rng.shuffle(held)
    if len(train) < n_train or len(held) < n_heldout:
        raise _too_few(
            "emotion_polarity",
            n_train,
            n_heldout,
            f"{len(train)} + {len(held)} pairs at "
            "that ratio (train and held-out pairs use disjoint contexts)",
        )
    train, held = train[:n_train], held[:n_heldout]

    def frame(day: str, weather: str, name: str) -> str:
        return f"On {day} the weather is {weather}, so {name} feels"

    pairs = [ContrastivePair(frame(d, g, n), frame(d, b, n), -1, split)
             for split, cs in (("train", train), ("heldout", held)) for d, n, g, b in cs]  # fmt: skip
    prompts = sorted({frame(d, middling[i % len(middling)], n)
                      for i, (d, n, _, _) in enumerate(held)})  # fmt: skip
    return SteeringSet(
        "emotion_polarity", pairs, [EvalPrompt(p) for p in prompts],
        list(POSITIVE), list(NEGATIVE),
        description="good vs bad weather before 'feels', read at 'feels'; metric = "
        "positive vs negative emotion word next",
        # contextual: at 'feels' no token names the polarity to come
        concept="expect_positive", negative_concept="expect_negative",
    )  # fmt: skip


def mammal_vs_bird(seed: int, n_train: int, n_heldout: int) -> SteeringSet:
    """'The brown dog' vs 'The brown owl' (also 'Three brown dogs' ...), read at the
    species word. Eval: noun phrases of both classes in held-out frames (determiner,
    colour); targets = the verbs the grammar lets a mammal vs a bird use next (the class
    decides them, so steering the class at the noun should flip them)."""
    rng = random.Random(f"steering/animal/{seed}")
    ms, bs = _SPECIES["mammal"], _SPECIES["bird"]
    dets = [("The", False), ("A", False), ("Three", True), ("Two", True), ("Some", True),
            ("Many", True)]  # fmt: skip
    frames = list(itertools.product(dets, COLOURS))
    rng.shuffle(frames)
    # frames, not just pairs, are disjoint between train and held-out
    cut = max(1, round(len(frames) * n_train / (n_train + n_heldout)))
    combos = list(itertools.product(range(len(ms)), range(len(bs))))
    train = [(f, c) for f in frames[:cut] for c in combos]
    held = [(f, c) for f in frames[cut:] for c in combos]
    rng.shuffle(train)
    rng.shuffle(held)
    if len(train) < n_train or len(held) < n_heldout:
        raise _too_few(
            "mammal_vs_bird",
            n_train,
            n_heldout,
            f"{len(train)} + {len(held)} pairs at "
            "that ratio (train and held-out pairs use disjoint contexts)",
        )
    train, held = train[:n_train], held[:n_heldout]

    def phrase(frame: tuple, forms: tuple[str, str]) -> str:
        (det, plural), colour = frame
        return f"{det} {colour} {forms[1 if plural else 0]}"

    pairs = [ContrastivePair(phrase(f, ms[m]), phrase(f, bs[b]), -1, split)
             for split, cs in (("train", train), ("heldout", held)) for f, (m, b) in cs]  # fmt: skip
    evals = [EvalPrompt(phrase(f, ms[m] if i % 2 == 0 else bs[b]))
             for i, (f, (m, b)) in enumerate(held)]  # fmt: skip
    verbs = {cls: [f for base, third, past in MOVES[cls] for f in (base, third, past)]
             for cls in ("mammal", "bird")}  # fmt: skip
    return SteeringSet(
        "mammal_vs_bird", pairs, evals, verbs["mammal"], verbs["bird"],
        description="mammal vs bird species noun, read at the noun; metric = mammal vs "
        "bird movement verbs next",
        concept="mammal", negative_concept="bird",
    )  # fmt: skip


def past_vs_present(seed: int, n_train: int, n_heldout: int) -> SteeringSet:
    """The same sentence in the past vs the present tense, read at its final '.'. A story
    keeps one tense throughout, so what the '.' carries predicts the next verb's tense.
    Eval: '<name>' / 'The <animal>' openers; targets = past vs present verb forms."""
    rng = random.Random(f"steering/tense/{seed}")
    contexts = list(itertools.product(NAMES, range(8), POSITIVE + NEGATIVE))
    train, held = _split(contexts, n_train, n_heldout, rng, "past_vs_present")
    species = [f for cls in ("mammal", "bird") for f in _SPECIES[cls]]

    def sentence(name: str, a: int, emotion: str, past: bool) -> str:
        see, be = ("saw", "was") if past else ("sees", "is")
        return f"{name} {see} the {species[a][0]} in the park and {be} {emotion}."

    pairs = [ContrastivePair(sentence(*c, True), sentence(*c, False), -1, split)
             for split, cs in (("train", train), ("heldout", held)) for c in cs]  # fmt: skip
    evals = [EvalPrompt(name) for name in sorted({c[0] for c in held})]
    evals += [EvalPrompt(f"The {species[a][0]}") for a in sorted({c[1] for c in held})]
    past = ["saw", "felt", "counted", "liked", "fed", "came", "was", "were"]
    present = ["sees", "feels", "counts", "likes", "feeds", "comes", "is", "are"]
    for cls in ("mammal", "bird"):
        past += [p for _, _, p in MOVES[cls]]
        present += [t for _, t, _ in MOVES[cls]]
    return SteeringSet(
        "past_vs_present", pairs, evals, past, present,
        description="past vs present tense sentence, read at its final '.'",
        # contextual: the document's tense, read at a '.' that names none
        concept="doc_past", negative_concept="doc_present",
    )  # fmt: skip


TOY_SETS = {"emotion_polarity": emotion_polarity, "mammal_vs_bird": mammal_vs_bird,
            "past_vs_present": past_vs_present}  # fmt: skip


def toy_sets(seed: int = 0, n_train: int = 64, n_heldout: int = 32,
             names: list[str] | None = None) -> dict[str, SteeringSet]:  # fmt: skip
    """The generated sets for the embedded corpus, deterministic in `seed`; train and
    held-out pairs / prompts come from disjoint contexts."""
    names = list(TOY_SETS) if names is None else names
    unknown = [n for n in names if n not in TOY_SETS]
    if unknown:
        raise ValueError(f"toy sets {unknown}: unknown, expected some of {sorted(TOY_SETS)}")
    return {n: TOY_SETS[n](seed, n_train, n_heldout) for n in names}


def load_sets(names: list[str], seed: int, n_train: int, n_heldout: int, where: str) -> dict:
    """The sets params name, by set name: generated toy sets (`toy_sets`, with these
    seed and sizes) by name, JSONL files by path. Errors name the params key `where`."""
    generated = [n for n in names if not n.endswith(".jsonl")]
    sets = toy_sets(seed, n_train, n_heldout, generated) if generated else {}
    out: dict[str, SteeringSet] = {}
    for i, n in enumerate(names):
        if n.endswith(".jsonl"):
            path = Path(n)
            if not path.exists():
                raise FileNotFoundError(f"params.yaml: {where}[{i}] = '{n}': no such file")
            s = read_set(path)
        else:
            s = sets[n]
        if s.name in out:
            raise ValueError(f"params.yaml: {where}[{i}]: set name '{s.name}' appears twice")
        out[s.name] = s
    return out
