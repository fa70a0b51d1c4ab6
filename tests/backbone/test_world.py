"""The planted world: causal contextual labels, exact probabilities, lexical baselines and
the dependency-capture score (stages/corpus.py, stages/lexical.py, stages/capture.py)."""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter, defaultdict

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stages import capture as K
from stages import corpus as C
from stages.config import CorpusParams, ToyCorpus
from stages.lexical import lexical_baseline, lexical_baseline_one


def _clip(spans, p):
    return sorted((s, min(e, p), c) for s, e, c in spans if s < p and min(e, p) > s)


@settings(max_examples=60, deadline=None)
@given(doc=st.integers(0, 10_000), seed=st.integers(0, 3), cut=st.floats(0, 1))
def test_contextual_labels_are_causal(doc, seed, cut):
    """Relabelling the document cut after any word gives the same labels on the prefix."""
    text, _ = C.generate_story(seed, doc)
    ends = [m.end() for m in C.WORD.finditer(text)]
    p = ends[min(int(cut * len(ends)), len(ends) - 1)]
    full = C.contextual_spans(text)
    assert _clip(C.contextual_spans(text[:p]), p) == _clip(full, p)


def test_every_document_has_contextual_labels_of_each_kind():
    seen = Counter()
    for i in range(300):
        _, spans = C.generate_story(0, i)
        seen.update({c for _, _, c in spans})
    ctx = [c.name for c in C.CONCEPTS if c.kind == "contextual"]
    assert len(ctx) >= 6 and all(seen[c] > 0 for c in ctx)
    assert seen["doc_past"] + seen["doc_present"] == 300  # every document has a tense


def _next_word(text: str, site: C.Site) -> str:
    return C.WORD.match(text, site.prefix_end + 1).group()


def test_exported_probabilities_match_frequencies_in_a_large_sample():
    hits: dict = defaultdict(lambda: [0, 0])  # (dependency, key) -> [outcome count, n]
    for i in range(6000):
        text, _ = C.generate_story(11, i)
        for site in C.read_context(text)[1]:
            nxt = _next_word(text, site)
            assert nxt in site.outcome + site.alternatives
            if site.dependency == "class_verb":  # P(own class) is the same for every species
                key = C._CLASS_OF_WORD[site.cue]
            else:
                key = site.cue
            h = hits[site.dependency, key]
            h[0] += nxt in site.outcome
            h[1] += 1
    truth = json.loads(json.dumps(C.TRUTH))  # what truth.json holds
    checked = 0
    for (dep, key), (k, n) in hits.items():
        if dep in ("weather_emotion", "day_emotion"):
            p = truth[dep]["p_outcome"][key]
        elif dep == "class_verb":
            p = truth[dep]["p_verb_class"][key][key]
        else:  # count_next: the successor of the previous number
            p = truth[dep]["p_next"][key][C.NUMBERS[C.NUMBERS.index(key) + 1]]
        if n < 100:
            continue
        checked += 1
        assert abs(k / n - p) < 4.5 * math.sqrt(p * (1 - p) / n) + 1e-9, (dep, key, k / n, p)
    assert checked >= 7 + 7 + 3 + 5  # every weather twice, each class, most numbers


def test_truth_and_baselines_are_written_with_the_corpus(tmp_path):
    p = CorpusParams(toy=ToyCorpus(n_docs=400, seed=2), heldout_fraction=0.2)
    C.write_corpus(C.build_corpus(p), tmp_path / "c", p)
    assert json.loads((tmp_path / "c" / "truth.json").read_text()) == json.loads(
        json.dumps(C.TRUTH)
    )
    base = json.loads((tmp_path / "c" / "lexical_baseline.json").read_text())["concepts"]
    assert set(base) == set(C.CONCEPT_NAMES)
    assert base["dog"]["f1"] == 1.0 and base["colour"]["f1"] == 1.0
    low = [n for n, v in base.items() if v["kind"] == "contextual" and v["f1"] <= 0.6]
    assert len(low) >= 6, base
    back = C.read_corpus(tmp_path / "c")
    meta = back.meta["entropy"]
    assert back.entropy_nats is not None and meta["nats_per_doc"] == pytest.approx(
        np.mean(back.entropy_nats), abs=1e-5
    )
    assert 0.1 < meta["nats_per_char"] < 1.0


def test_lexical_baseline_on_a_constructed_case():
    ids = np.array([0, 0, 0, 0, 1, 1, 2, 2])
    lab = np.array([1, 1, 1, 0, 1, 0, 0, 0])
    # {0}: 2*3/(4+4) = 0.75; {0, 1}: 2*4/(6+4) = 0.8; {0, 1, 2}: 8/12
    f1, s = lexical_baseline_one(ids, lab)
    assert f1 == pytest.approx(0.8) and sorted(s) == [0, 1]
    assert lexical_baseline_one(ids, np.zeros(8))[0] == 0.0
    table = lexical_baseline(ids, np.stack([lab, ids == 2], 1), ["a", "is_two"])
    assert table["is_two"]["f1"] == 1.0 and table["a"]["prevalence"] == 0.5


def test_lexical_baseline_is_the_best_of_every_lookup():
    rng = np.random.default_rng(0)
    for _ in range(20):
        ids = rng.integers(0, 6, 60)
        lab = rng.random(60) < 0.1 + 0.15 * ids / 5
        best = 0.0
        for r in range(1, 7):
            for s in itertools.combinations(range(6), r):
                pred = np.isin(ids, s)
                tp = (pred & lab).sum()
                best = max(best, 2 * tp / (pred.sum() + lab.sum()))
        assert lexical_baseline_one(ids, lab)[0] == pytest.approx(best)


class _Bigram:
    """A real model of the corpus that ignores all context but the previous word."""

    def __init__(self, texts):
        self.c: dict = defaultdict(Counter)
        for t in texts:
            ws = [w for w, *_ in C._words(t)]
            for a, b in itertools.pairwise(ws):
                self.c[a][b] += 1

    def __call__(self, prefixes, outcome, alternatives):
        out = []
        for p in prefixes:
            cnt = self.c[C.WORD.findall(p)[-1]]
            po = sum(cnt[w] + 0.5 for w in outcome)
            pa = sum(cnt[w] + 0.5 for w in alternatives)
            out.append(math.log(po) - math.log(pa))
        return np.asarray(out)


@pytest.fixture(scope="module")
def sites():
    texts = [C.generate_story(3, i)[0] for i in range(400)]
    return K.heldout_sites(texts, max_per_dependency=80)


def test_capture_of_the_generator_itself_is_one(sites):
    assert set(sites) == {"weather_emotion", "day_emotion", "class_verb", "count_next"}
    for dep, r in K.dependency_capture(K.oracle_log_odds, sites).items():
        assert r["capture"] == pytest.approx(1.0, abs=1e-9), dep
        assert r["model_contrast"] == pytest.approx(r["true_contrast"])
        assert r["true_contrast"] > 2  # a few nats: worth learning


def test_capture_of_a_model_that_ignores_the_context_is_zero(sites):
    bigram = _Bigram([C.generate_story(4, i)[0] for i in range(3000)])
    res = K.dependency_capture(bigram, sites)
    for dep in ("weather_emotion", "day_emotion", "count_next"):  # cue is not the last word
        assert res[dep]["capture"] == pytest.approx(0.0, abs=1e-12), dep
    # the animal right before its verb: a bigram has it; after an adverb, it does not
    items = sites["class_verb"]
    adjacent = [(t, s) for t, s in items if s.prefix_end == s.cue_end]
    carried = [(t, s) for t, s in items if s.prefix_end > s.cue_end]
    assert len(adjacent) > 20 and len(carried) > 20
    near = K.dependency_capture(bigram, {"class_verb": adjacent})["class_verb"]
    far = K.dependency_capture(bigram, {"class_verb": carried})["class_verb"]
    assert 0.8 < near["capture"] < 1.2
    assert far["capture"] == pytest.approx(0.0, abs=1e-12)
    lo, hi = res["class_verb"]["ci95"]
    assert lo < res["class_verb"]["capture"] < hi < 0.8  # over both kinds of site


def test_capture_is_the_ratio_of_contrasts_for_two_cues():
    slope, t, m = K.capture_of_site(np.array([0.5, -0.5]), [0.8, 0.2])
    assert t == pytest.approx(2 * math.log(4)) and m == pytest.approx(1.0)
    assert slope == pytest.approx(1.0 / (2 * math.log(4)))


def test_report_section_shows_truth_vs_model_and_lexical_baselines(tmp_path, sites):
    from stages.io import write_json
    from stages.report.world import section

    p = CorpusParams(toy=ToyCorpus(n_docs=200, seed=2), heldout_fraction=0.2)
    C.write_corpus(C.build_corpus(p), tmp_path / "corpus", p)
    (tmp_path / "models" / "oracle").mkdir(parents=True)
    cap = K.dependency_capture(K.oracle_log_odds, sites)
    write_json(tmp_path / "models" / "oracle" / "world.json",
               {"seed": 0, "heldout_loss": 1.5, "corpus_entropy_per_token": 1.2, "capture": cap})  # fmt: skip
    s = section(tmp_path / "corpus", tmp_path / "models")
    assert s is not None and s.id == "world"
    assert s.body.count("<b>1.000</b> [1.000, 1.000]") == 4  # each dependency, all captured
    assert "expect_positive" in s.body and "about_fish" in s.body
    assert section(tmp_path / "nothing", tmp_path / "models") is None
