"""Results over several model pairs (issue 25; README, "The seed study"): every
universality measure as mean ± sd across pairs beside its controls, and steering
transfer over every pair and concept as one family of tests.

Pure functions on the align stage's flat scores (`data/alignment/<A>__<B>/scores.json`,
the same numbers as `metrics/alignment/<A>__<B>.json`) and the transfer stage's
`data/transfer/<A>__<B>/transfer.json`; the report's alignment section draws them.

- Across pairs: mean and sample sd (ddof 1) over the pairs that have the measure; with
  seeds as the unit, this is the spread one more seed pair would show (pairs share
  models, so they are not independent: the sd describes, it is not a standard error).
- Controls beside each measure: the untrained pair (untrained A vs untrained B, each
  model's own seed) and trained A vs untrained B (stages/alignment/controls.py), on the
  same subsample as the trained pair's `linear_cka_subsample`; for SAE-latent measures,
  the references the align stage has: the shuffled-token null of the matched
  correlation and the all-pairs (chance) Jaccard over top-token ids, and, where the
  study aligned untrained control models (`python -m flows.seed_study --untrained`:
  models with train.tokens 0 and SAEs of their own), the same measure over those
  pairs (`pair_kind`): untrained vs untrained, trained vs untrained.
- Tokenizers: trained pairs whose models tokenize differently (the align stage's
  `token_rule` "char_end": rows paired on shared character spans; the seed study's
  `--cross-tokenizer`) are their own kind, "cross_tokenizer", in a column of their own,
  so the seed-pair mean is not mixed with the tokenizer's effect. Their transfer tests
  join the one family: they are trained pairs too.
- Transfer: every (pair, concept, hook) test of "the carried vector steers more than
  random directions of its norm" in one Holm (1979) family (`pvalues.holm`), on the
  empirical p (floor 1/(n_random + 1)) and on its normal-tail approximation; the
  fraction that transfers with its Wilson (1927) score interval; the transferred
  vector's effect as a fraction of the target model's own vector's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from stages.alignment.pvalues import holm

# (key in scores.json, label, key whose controls it sits beside, or None)
DENSE_MEASURES = (
    ("linear_cka", "linear CKA (every paired token)", None),
    ("linear_cka_subsample", "linear CKA (subsample)", "linear_cka"),
    ("mutual_knn", "mutual kNN", "mutual_knn"),
    ("svcca", "SVCCA", "svcca"),
    ("rsa", "RSA", "rsa"),
)
# (statistic of an SAE pair, label, its reference statistic, the reference's label)
SAE_MEASURES = (
    ("fraction_with_partner", "partner fraction (max corr ≥ threshold)", None, None),
    ("mean_matched_corr_hungarian", "mean matched correlation (Hungarian)",
     "null_mean_hungarian", "shuffled-token null"),
    ("mean_jaccard_hungarian", "top-token Jaccard over ids, matched",
     "mean_jaccard_all_pairs", "all latent pairs (chance)"),
)  # fmt: skip


@dataclass(frozen=True)
class Summary:
    """Mean and sample sd (ddof 1; NaN below 2 values) of the finite values, and n."""

    mean: float
    sd: float
    n: int


def summarise(values: Sequence[float | None]) -> Summary:
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], np.float64)
    if x.size == 0:
        return Summary(math.nan, math.nan, 0)
    return Summary(float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else math.nan, x.size)


@dataclass(frozen=True)
class AggregateRow:
    measure: str  # label
    key: str  # scores.json statistic
    where: str  # hook (dense measures) or SAE pair key `<hook>/<sae>`
    trained: Summary  # trained pairs of one tokenizer
    untrained: Summary | None = None  # untrained A vs untrained B
    trained_vs_untrained: Summary | None = None
    cross_tokenizer: Summary | None = None  # trained pairs of different tokenizers
    reference: Summary | None = None  # the SAE measure's null / chance level
    reference_label: str | None = None


PAIR_KINDS = ("trained", "untrained", "trained_vs_untrained", "cross_tokenizer")
TRAINED_KINDS = ("trained", "cross_tokenizer")  # pairs of trained models


def pair_kind(trained: Mapping[str, bool] | None, token_rule: str | None = None) -> str:
    """A pair's kind from its meta.json `trained` (model -> trained?) and `token_rule`:
    "trained" when both are trained (or nothing is recorded) and share a tokenization,
    "cross_tokenizer" when both are trained and their rows pair on character spans
    (`token_rule` "char_end"), "untrained" when neither is, else "trained_vs_untrained"."""
    flags = list((trained or {}).values())
    if all(flags):
        return "cross_tokenizer" if token_rule == "char_end" else "trained"
    return "untrained" if not any(flags) else "trained_vs_untrained"


def universality_rows(
    scores: Mapping[str, Mapping[str, Any]], kinds: Mapping[str, str] | None = None
) -> list[AggregateRow]:
    """`scores`: pair name -> its flat scores; `kinds`: pair name -> `PAIR_KINDS` entry
    (default: every pair trained). One row per measure and hook (or SAE pair) that a
    trained pair (of either tokenization) has, in the order of DENSE_MEASURES then
    SAE_MEASURES; SAE measures of control pairs fill the untrained columns, and the
    cross-tokenizer pairs' values their own column."""
    kinds = kinds or {}
    by_kind = {k: {n: s for n, s in scores.items() if kinds.get(n, "trained") == k}
               for k in PAIR_KINDS}  # fmt: skip
    keys = [k for kind in TRAINED_KINDS for s in by_kind[kind].values() for k in s]
    keys = list(dict.fromkeys(keys))  # first-seen order, no repeats

    def over(key: str, kind: str = "trained") -> Summary:
        return summarise([_num(s.get(key)) for s in by_kind[kind].values()])

    rows = []
    for stat, label, control in DENSE_MEASURES:
        for hook in [k[len(stat) + 1 :] for k in keys if k.startswith(f"{stat}/")]:
            ctl = {}
            if control is not None:
                for side in ("untrained", "trained_vs_untrained"):
                    s = over(f"{control}_{side}/{hook}")
                    ctl[side] = s if s.n else None
            cross = over(f"{stat}/{hook}", "cross_tokenizer")
            rows.append(AggregateRow(label, stat, hook, over(f"{stat}/{hook}"), **ctl,
                                     cross_tokenizer=cross if cross.n else None))  # fmt: skip
    sae_keys = [k.rsplit("/", 1) for k in keys if k.count("/") >= 2]
    for stat, label, ref, ref_label in SAE_MEASURES:
        for where in dict.fromkeys(w for w, s in sae_keys if s == stat):
            r = over(f"{where}/{ref}") if ref else None
            ctl = {c: over(f"{where}/{stat}", c) for c in PAIR_KINDS[1:]}
            rows.append(AggregateRow(label, stat, where, over(f"{where}/{stat}"),
                                     **{c: s if s.n else None for c, s in ctl.items()},
                                     reference=r if r and r.n else None,
                                     reference_label=ref_label if r and r.n else None))  # fmt: skip
    return rows


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


# ---------------------------------------------------------------------------- transfer


@dataclass(frozen=True)
class TransferTest:
    pair: str
    concept: str
    hook: str
    p: float  # empirical p against the random directions
    p_holm: float  # Holm over every test of every pair
    p_normal: float  # normal-tail approximation of the random-direction null
    p_normal_holm: float
    fraction_of_own: float  # transferred slope / own slope
    own_steers: bool  # the target's own vector's 95 % interval lies above 0
    p_floor: float


@dataclass(frozen=True)
class TransferAggregate:
    tests: list[TransferTest]
    alpha: float
    transfers: int  # Holm p (empirical) <= alpha
    transfers_normal: int  # Holm p (normal tail) <= alpha
    interval: tuple[float, float]  # Wilson 95 % of transfers / m
    interval_normal: tuple[float, float]
    n_normal: int  # tests with a normal-tail p
    fraction_of_own: Summary  # over every test
    fraction_of_own_steering: Summary  # over the tests whose own vector steers
    best_possible_holm: float  # m × the smallest floor: no Holm p (empirical) goes below it

    @property
    def m(self) -> int:
        return len(self.tests)


def transfer_aggregate(
    transfers: Mapping[str, Mapping[str, Any]], alpha: float = 0.05
) -> TransferAggregate:
    """`transfers`: pair name -> its transfer.json. One Holm family over every pair,
    concept and hook (the per-pair `_holm` fields are not reused: their family is one pair)."""
    from stages.sae.concepts import wilson

    raw = []
    for pair, t in transfers.items():
        for concept, hooks in sorted((t.get("concepts") or {}).items()):
            for hook, r in sorted(hooks.items()):
                lo = ((r.get("own") or {}).get("ci95") or [None])[0]
                raw.append((pair, concept, hook, float(r["p_vs_random"]),
                            _nan(r.get("p_normal_vs_random")), _nan(r.get("fraction_of_own")),
                            lo is not None and lo > 0, _nan(r.get("p_floor"))))  # fmt: skip
    p = holm([r[3] for r in raw]) if raw else np.zeros(0)
    pn = holm([r[4] for r in raw]) if raw else np.zeros(0)
    tests = [TransferTest(a, c, h, pv, float(ph), pnv, float(pnh), f, own, fl)
             for (a, c, h, pv, pnv, f, own, fl), ph, pnh in zip(raw, p, pn, strict=True)]  # fmt: skip
    k = sum(t.p_holm <= alpha for t in tests)
    n_normal = sum(math.isfinite(t.p_normal) for t in tests)
    k_normal = sum(t.p_normal_holm <= alpha for t in tests if math.isfinite(t.p_normal_holm))
    floors = [t.p_floor for t in tests if math.isfinite(t.p_floor)]
    return TransferAggregate(
        tests=tests,
        alpha=alpha,
        transfers=k,
        transfers_normal=k_normal,
        interval=wilson(k, len(tests)),
        interval_normal=wilson(k_normal, n_normal),
        n_normal=n_normal,
        fraction_of_own=summarise([t.fraction_of_own for t in tests]),
        fraction_of_own_steering=summarise([t.fraction_of_own for t in tests if t.own_steers]),
        best_possible_holm=min(1.0, len(tests) * min(floors)) if floors else math.nan,
    )


def _nan(v: Any) -> float:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else math.nan
