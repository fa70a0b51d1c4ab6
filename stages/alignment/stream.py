"""Align two models' features: one call from two activation stores and their SAEs.

(Over 500 lines: the one pass over the tokens feeds every accumulator chunk by chunk;
its steps are kept in order in one file so the single read of each chunk is visible.)

`align_pair(store_a, store_b, saes_a, saes_b, cfg)` does everything the `align` stage
reports, reading each aligned chunk of tokens once:

1. pair the two stores' rows (`tokens.align_tokens`) and pick the tokens to use
   (`cfg.split`, at most `cfg.max_tokens`; held-out rows only unless `cfg.top_up`);
2. stream chunks of paired rows (chunk-aligned zarr reads; B's rows may be scattered
   for a different tokenizer, so B's covering chunks are read and indexed in memory)
   and feed, per chunk:
   - exact linear CKA moments of the raw activations, every hook of A × every hook of B;
   - a seeded subsample of rows (raw activations and latents) for the O(n²) measures;
   - per SAE pair: the latent correlation matrix, `cfg.n_null` shuffled-token nulls
     (chunk i of A against rows of a different chunk σ(i) of B, re-read and encoded),
     each latent's top-k distinct vocabulary ids by max activation (`TopTokens`),
     concept-label counts, and A's self-correlation over the
     first `cfg.self_check_tokens` tokens;
3. match and score: max matches both ways, Hungarian, null comparison, top-token
   Jaccard over vocabulary ids (matched pairs, and all pairs as the chance level),
   permutation p-values with their floor, normal tail and Holm correction (`scores`),
   decoder cosines after an orthogonal Procrustes map fitted on the paired raw
   activations (the cross co-moment of step 2), CKA of the matched latents, agreement of
   the concepts' best latents (ground truth), the self-match sanity check, and feature
   splitting between SAEs of different widths on one hook.

Memory is O(m_A·m_B) per SAE pair plus one chunk: never the dense activations of all
tokens. `write_alignment` / `figures` (in `outputs.py`) turn the result into files.

Length (~760 lines): the one pass and the accumulators it feeds are read together;
the measures themselves live in `similarity.py`, `correlation.py` and `matching.py`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from stages.alignment.config import AlignConfig
from stages.alignment.controls import check_control_metrics, control_scores, untrained_controls
from stages.alignment.correlation import CorrelationAccumulator, TopTokens, random_derangement
from stages.alignment.matching import (
    Matches,
    NullComparison,
    compare_to_null,
    decoder_cosine,
    feature_splitting,
    ground_truth_agreement,
    hungarian_matches,
    max_matches,
    mean_jaccard_all_pairs,
    orthogonal_procrustes_map,
    shared_vocabulary,
    top_token_jaccard,
)
from stages.alignment.moments import CentredMoments
from stages.alignment.pvalues import holm, holm_caps, holm_dict, p_floor
from stages.alignment.similarity import (
    GRID_METRICS,
    PAIR_METRICS,
    LayerSimilarity,
    PermutationTest,
    RowSample,
    cka_from_products,
    pair_name,
    permutation_test,
    shared_per_representation,
)
from stages.alignment.tokens import RowStore, TokenAlignment, align_tokens, select_rows
from stages.compute import CPU, Device, on_device
from stages.sae.base import BaseSAE
from stages.sae.metrics import binary_f1_counts

log = logging.getLogger(__name__)

# hook -> SAE name -> SAE, and hook -> SAE name -> concept -> best latent
SAEs = Mapping[str, Mapping[str, BaseSAE]]
BestLatents = Mapping[str, Mapping[str, Mapping[str, int]]]


@dataclass
class SAEPairResult:
    """Everything measured for one SAE of A against one SAE of B."""

    hook_a: str
    hook_b: str
    name_a: str
    name_b: str
    correlation: np.ndarray  # [m_a, m_b] Pearson r over the aligned tokens
    hungarian: Matches
    max_ab: Matches
    max_ba: Matches  # B's latents → their best A latent (a_index = the A partner)
    null_hungarian: Matches  # the nulls' matched scores, concatenated
    null_max: Matches
    null_comparison: NullComparison
    table: pa.Table  # one row per match and method (see outputs.py)
    ground_truth: dict[str, dict[str, object]]  # concept -> best latents, matched?
    scores: dict[str, float]

    @property
    def key(self) -> str:
        return sae_pair_key(self.hook_a, self.hook_b, self.name_a, self.name_b)


def sae_pair_key(hook_a: str, hook_b: str, name_a: str, name_b: str) -> str:
    """`<hook>/<name>` of an SAE pair (`a~b` where the two sides differ)."""
    return f"{pair_name(hook_a, hook_b)}/{pair_name(name_a, name_b)}"


# The family of tests the align stage corrects for multiple comparisons (Holm), per model
# pair: named here once, written to meta.json and shown by the report.
HOLM_FAMILY = (
    "every permutation test of one model pair in scores.json: each similarity measure "
    "(linear CKA, mutual kNN, unbiased CKA, SVCCA, RSA) of each compared hook pair, and the "
    "subspace CKA of each SAE pair (all matched latents, and those above the threshold)"
)
# The family's order for the permutation caps (`pvalues.holm_caps`: the first tests get
# the largest): cheapest per permutation first. Measured at n_samples 2048 on this
# machine (ms per permutation, benchmarks/alignment_pvalues.py): mutual kNN 0.3, unbiased
# CKA 0.5, SVCCA 0.6 and linear CKA 0.6 (feature space), subspace CKA and RSA (n² Gram
# gathers) several.
CAP_ORDER = ("mutual_knn", "unbiased_cka", "svcca", "linear_cka", "subspace_cka", "rsa")


def family_caps(hook_pairs: Sequence[tuple[str, str]], sae_pairs: Sequence[tuple[str, str, str]],
                cfg: AlignConfig) -> dict[str, int]:  # fmt: skip
    """Each Holm-family test's raw p key (as in `AlignmentResult.scores`) -> its permutation
    cap, planned before any data is seen (`pvalues.holm_caps` over the family in
    CAP_ORDER); {} when `cfg.family_alpha` is None (every test draws n_permutations)."""
    if cfg.family_alpha is None:
        return {}
    missing = set(GRID_METRICS + PAIR_METRICS) - set(CAP_ORDER)
    if missing:
        raise ValueError(f"CAP_ORDER lacks {sorted(missing)}: every measure needs a place")
    names = [pair_name(ha, hb) for ha, hb in hook_pairs]
    keys: list[str] = []
    for metric in CAP_ORDER:
        if metric == "subspace_cka":
            keys += [f"{sae_pair_key(ha, hb, n, n)}/subspace_cka{tag}_p"
                     for ha, hb, n in sae_pairs for tag in ("", "_above_threshold")]  # fmt: skip
        else:
            keys += [f"{metric}_p/{name}" for name in names]
    caps = holm_caps(len(keys), cfg.family_alpha, at_least=cfg.n_permutations)
    return dict(zip(keys, caps, strict=True))


def _family_test(x, y, metric: str, key: str, caps: Mapping[str, int], cfg: AlignConfig,
                 **kw) -> PermutationTest:  # fmt: skip
    """A Holm-family test: sequential up to its cap when `caps` has it, else fixed."""
    cap = caps.get(key)
    return permutation_test(
        x, y, metric, n_permutations=cfg.n_permutations if cap is None else cap,
        seed=cfg.seed, stop_after=None if cap is None else cfg.stop_after, **kw,
    )  # fmt: skip


@dataclass
class AlignmentResult:
    """What `align_pair` returns; `scores` is the flat dict written as DVC metrics."""

    model_a: str
    model_b: str
    n_tokens: int
    n_heldout_tokens: int  # of n_tokens, those in A's held-out split (all, unless top_up)
    token_rule: str
    grid: dict[str, LayerSimilarity]  # metric -> A hooks × B hooks
    hook_pairs: dict[str, dict[str, PermutationTest]]  # "ha~hb" or "h" -> metric -> test
    pairs: list[SAEPairResult]
    splitting: dict[str, dict[str, float]]  # "a/<hook>/<narrow>><wide>" -> summary
    timings: dict[str, float] = field(default_factory=dict)
    config: AlignConfig | None = None
    # what top-token Jaccard compared: "token ids" (one tokenizer), "decoded token
    # strings" (two tokenizers, strings given) or "none" (two tokenizers, no strings)
    jaccard_vocabulary: str = "token ids"
    # the dense measures' untrained-model controls (controls.py): hook pair -> metric ->
    # {"untrained", "trained_vs_untrained": PermutationTest, "trained_subsample": float}
    controls: dict[str, dict[str, dict[str, object]]] = field(default_factory=dict)
    # model name -> trained? (False: an untrained control model, train.tokens 0); set by
    # the align flow from params, written to meta.json: the report aggregates pairs by it
    trained: dict[str, bool] = field(default_factory=dict)

    @property
    def scores(self) -> dict[str, float]:
        """Headline numbers. Every permutation test appears as its statistic, `_p` (exact
        permutation p, floor `p_floor` = 1/(1 + n_permutations)), `_z` and `_p_normal`
        (normal approximation of the permutation null), and `_p_holm` /
        `_p_normal_holm`: Holm-adjusted over HOLM_FAMILY (`pvalues.holm`)."""
        out: dict[str, float] = {"n_tokens": float(self.n_tokens),
                                 "n_heldout_tokens": float(self.n_heldout_tokens)}  # fmt: skip
        exact, normal = {}, {}  # raw p key -> its Holm key, one family each
        floor_of = {}  # raw p key -> its floor key
        for name, tests in self.hook_pairs.items():
            for metric, test in tests.items():
                out[f"{metric}/{name}"] = test.statistic
                out[f"{metric}_p/{name}"] = test.p_value
                out[f"{metric}_p_floor/{name}"] = test.p_floor
                out[f"{metric}_z/{name}"] = test.z
                out[f"{metric}_p_normal/{name}"] = test.p_normal
                exact[f"{metric}_p/{name}"] = f"{metric}_p_holm/{name}"
                floor_of[f"{metric}_p/{name}"] = f"{metric}_p_floor/{name}"
                normal[f"{metric}_p_normal/{name}"] = f"{metric}_p_normal_holm/{name}"
        for pair in self.pairs:
            out.update({f"{pair.key}/{k}": v for k, v in pair.scores.items()})
            for tag in ("", "_above_threshold"):
                k = f"{pair.key}/subspace_cka{tag}"
                exact[f"{k}_p"], normal[f"{k}_p_normal"] = f"{k}_p_holm", f"{k}_p_normal_holm"
                floor_of[f"{k}_p"] = f"{k}_p_floor"
        for family in (exact, normal):
            adjusted = holm_dict({k: out[k] for k in family if k in out})
            out.update({family[k]: v for k, v in adjusted.items()})
        n_perm = self.config.n_permutations if self.config else None
        out["p_floor"] = p_floor(n_perm) if n_perm is not None else float("nan")
        # the Holm family's own floor: the largest adjusted p when every test sits at its
        # floor, i.e. what a family of strong effects reads
        floors = [out[floor_of[k]] for k in exact if out.get(k) == out.get(k) and k in out]
        if floors:
            out["holm_floor"] = float(holm(floors).max())
        out["holm_family_size"] = float(sum(out[k] == out[k] for k in exact if k in out))
        # the controls stay out of the Holm family: they are references, not findings
        out.update(control_scores(self.controls))
        for name, summary in self.splitting.items():
            out.update({f"splitting/{name}/{k}": v for k, v in summary.items()})
        return out  # timings stay out (they would make every metrics diff noisy): meta.json


# ------------------------------------------------------------------------ reading rows


def gather_rows(store: RowStore, name: str, rows: np.ndarray) -> np.ndarray:
    """`store.array(name)[rows]` for scattered `rows`, reading whole zarr chunks in runs
    of consecutive chunks through the store's checked reader (a corrupt chunk is named by
    its shard file, as every other reader of the store names it).

    Zarr reads single rows slowly; the rows of a chunk of aligned tokens sit in a few
    neighbouring chunks (contiguous for the same tokenizer), so read those and index.
    """
    from stages.activations import read_rows

    array = store.array(name)
    c = int(array.chunks[0])
    ids = np.unique(rows // c)
    runs = np.split(ids, np.flatnonzero(np.diff(ids) > 1) + 1)
    blocks = [np.asarray(read_rows(array, r[0] * c, (r[-1] + 1) * c, store.path)) for r in runs]
    buf = blocks[0] if len(blocks) == 1 else np.concatenate(blocks)
    return buf[np.searchsorted(ids, rows // c) * c + rows % c]


def _chunk_bounds(rows_a: np.ndarray, chunk_rows: int, zarr_rows: int) -> list[tuple[int, int]]:
    """Split the pairs where A's row crosses a multiple of chunk_rows (rounded up to the
    zarr chunking), so each step reads whole chunks of A."""
    size = max(1, -(-chunk_rows // zarr_rows)) * zarr_rows
    cuts = np.flatnonzero(np.diff(rows_a // size)) + 1
    edges = [0, *cuts.tolist(), len(rows_a)]
    return list(itertools.pairwise(edges))


def _acts(store: RowStore, hook: str, rows: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(gather_rows(store, hook, rows).astype(np.float32))


# --------------------------------------------------------------------- per SAE pair


class _ConceptCounts:
    """Per concept, the best single latent by F1 (the rule of sae.evaluate_ground_truth)."""

    def __init__(self, n_concepts: int, m: int, device: torch.device | str = "cpu") -> None:
        f64 = dict(dtype=torch.float64, device=device)
        self.tp = torch.zeros(n_concepts, m, **f64)
        self.fires = torch.zeros(m, **f64)
        self.pos = torch.zeros(n_concepts, **f64)

    def to(self, device: torch.device | str) -> _ConceptCounts:
        self.tp, self.fires, self.pos = (t.to(device) for t in (self.tp, self.fires, self.pos))
        return self

    def update(self, latents: torch.Tensor, labels: torch.Tensor) -> None:
        # float32 counts are exact per chunk (< 2^24 rows); the totals are float64.
        fired = (latents > 0).to(torch.float32)
        lab = labels.to(torch.float32)
        self.tp += lab.T @ fired
        self.fires += fired.sum(0)
        self.pos += lab.sum(0)

    def merge(self, other: _ConceptCounts) -> None:
        self.tp += other.tp
        self.fires += other.fires
        self.pos += other.pos

    def best(self, names: Sequence[str]) -> dict[str, int]:
        f1 = binary_f1_counts(self.tp, self.fires[None, :] - self.tp, self.pos[:, None] - self.tp)
        best = f1.argmax(dim=1)
        return {n: int(best[j]) for j, n in enumerate(names) if self.pos[j] > 0}


class _PairState:
    """Streaming accumulators of one SAE pair."""

    def __init__(self, hook_a, hook_b, name_a, name_b, sae_a, sae_b, cfg, n_concepts,
                 device: torch.device | str = "cpu") -> None:  # fmt: skip
        self.hook_a, self.hook_b, self.name_a, self.name_b = hook_a, hook_b, name_a, name_b
        self.sae_a, self.sae_b = sae_a, sae_b
        m_a, m_b, on = sae_a.d_sae, sae_b.d_sae, dict(device=device)
        self.corr = CorrelationAccumulator(m_a, m_b, **on)
        self.nulls = [CorrelationAccumulator(m_a, m_b, **on) for _ in range(cfg.n_null)]
        self.self_corr = CorrelationAccumulator(m_a, m_a, **on)
        self.self_tokens = cfg.self_check_tokens
        self.top_a = TopTokens(m_a, cfg.top_k, **on)  # top-k distinct vocabulary ids
        self.top_b = TopTokens(m_b, cfg.top_k, **on)
        self.concepts_a = _ConceptCounts(n_concepts, m_a, **on) if n_concepts else None
        self.concepts_b = _ConceptCounts(n_concepts, m_b, **on) if n_concepts else None

    def to(self, device: torch.device | str) -> _PairState:
        """Move the accumulators (not the SAEs) to `device`, in place."""
        for acc in (self.corr, *self.nulls, self.self_corr, self.top_a, self.top_b,
                    self.concepts_a, self.concepts_b):  # fmt: skip
            if acc is not None:
                acc.to(device)
        return self

    def update(self, fa, fb, token_ids_a, token_ids_b, labels_a, labels_b) -> None:
        self.corr.update(fa, fb)
        self.top_a.update(fa, token_ids_a)  # each model's own vocabulary ids
        self.top_b.update(fb, token_ids_b)
        need = self.self_tokens - self.self_corr.n_tokens
        if need > 0:
            self.self_corr.update(fa[:need], fa[:need])
        if self.concepts_a is not None:
            self.concepts_a.update(fa, labels_a)
            self.concepts_b.update(fb, labels_b)

    def merge(self, other: _PairState) -> None:
        """Absorb the same pair's accumulators over a later range of tokens."""
        self.corr.merge(other.corr)
        for mine, theirs in zip(self.nulls, other.nulls, strict=True):
            mine.merge(theirs)
        if self.self_corr.n_tokens < self.self_tokens:  # the self-check's tokens come
            self.self_corr.merge(other.self_corr)  # from the first parts
        self.top_a.merge(other.top_a)
        self.top_b.merge(other.top_b)
        if self.concepts_a is not None:
            self.concepts_a.merge(other.concepts_a)
            self.concepts_b.merge(other.concepts_b)


def _max_ba(corr: np.ndarray) -> Matches:
    m = max_matches(corr.T)  # rows are B's latents here
    return Matches(m.b_index, m.a_index, m.score, corr.shape[0], corr.shape[1], "max_ba")


def _concat(matches: list[Matches], method: str) -> Matches:
    first = matches[0]
    return Matches(
        np.concatenate([m.a_index for m in matches]),
        np.concatenate([m.b_index for m in matches]),
        np.concatenate([m.score for m in matches]),
        first.n_a,
        first.n_b,
        method,
    )


def _self_check(acc: CorrelationAccumulator) -> dict[str, float]:
    """A matched with itself: Hungarian on its live latents must give the identity, r = 1.

    Live = fires on the self-check tokens. Two latents with identical activations there
    (e.g. both fire once, on the same token) are a tie the solver may swap, so the
    identity fraction can fall a hair below 1 while the mean correlation stays 1.
    """
    live = np.flatnonzero(~acc.dead_a)
    if live.size == 0:
        return {"self_match_identity_fraction": float("nan"), "self_match_mean_corr": float("nan")}
    m = hungarian_matches(acc.correlation()[np.ix_(live, live)])
    return {
        "self_match_identity_fraction": float(np.mean(m.a_index == m.b_index)),
        "self_match_mean_corr": float(m.score.mean()),
        "self_match_live_latents": float(live.size),
    }


def _finish_pair(
    st: _PairState,
    cfg: AlignConfig,
    rotation: np.ndarray,
    sample: Mapping[str, np.ndarray],
    concept_names: Sequence[str],
    best_a: Mapping[str, int] | None,
    best_b: Mapping[str, int] | None,
    vocabulary: tuple[Sequence[str], Sequence[str]] | bool,
    caps: Mapping[str, int],
) -> SAEPairResult:
    corr = st.corr.correlation()
    hung, max_ab, max_ba = hungarian_matches(corr), max_matches(corr), _max_ba(corr)
    null_corrs = [n.correlation() for n in st.nulls]
    null_hung = _concat([hungarian_matches(c) for c in null_corrs], "null_hungarian")
    null_max = _concat([max_matches(c) for c in null_corrs], "null_max")
    versus_null = compare_to_null(hung, null_hung, cfg.null_quantile)
    top_a, top_b = st.top_a.token_sets(), st.top_b.token_sets()
    if vocabulary is True:  # one tokenizer: the ids are one vocabulary already
        jaccard = functools.partial(top_token_jaccard, top_a, top_b)
    elif vocabulary:  # two tokenizers: their decoded strings are the shared vocabulary
        top_a, top_b = shared_vocabulary(top_a, top_b, *vocabulary)
        jaccard = functools.partial(top_token_jaccard, top_a, top_b)
    else:  # two tokenizers and no strings: ids of two vocabularies do not compare
        top_a = top_b = None

        def jaccard(m: Matches) -> np.ndarray:
            return np.full(len(m.score), np.nan)

    dec_cos = decoder_cosine(
        st.sae_a.W_dec.detach().double(), st.sae_b.W_dec.detach().double(), rotation
    )

    rows = []
    for m in (hung, max_ab, max_ba):
        rows.append(
            {
                "latent_a": m.a_index,
                "latent_b": m.b_index,
                "correlation": m.score,
                "method": np.full(len(m.score), "max_ab" if m.method == "max" else m.method),
                "jaccard": jaccard(m),
                "decoder_cosine_procrustes": dec_cos[m.a_index, m.b_index],
                "above_threshold": m.score >= cfg.threshold,
                "above_null": m.score > versus_null.threshold,
            }
        )
    table = pa.table({k: np.concatenate([r[k] for r in rows]) for k in rows[0]})

    dead_a, dead_b = st.corr.dead_a, st.corr.dead_b
    above = hung.score >= cfg.threshold
    jac_h = rows[0]["jaccard"]
    dec_h = hungarian_matches(dec_cos)
    scores: dict[str, float] = {
        "m_a": float(hung.n_a),
        "m_b": float(hung.n_b),
        "dead_a": float(dead_a.sum()),
        "dead_b": float(dead_b.sum()),
        "fraction_with_partner": max_ab.fraction_with_partner(cfg.threshold),
        "fraction_with_partner_ba": float(np.mean(max_ba.score >= cfg.threshold)),
        "fraction_with_partner_hungarian": hung.fraction_with_partner(cfg.threshold),
        "fraction_with_partner_live": float(np.mean(max_ab.score[~dead_a] >= cfg.threshold))
        if (~dead_a).any()
        else float("nan"),
        "mean_max_corr_ab": float(max_ab.score.mean()),
        "mean_max_corr_ba": float(max_ba.score.mean()),
        "mean_matched_corr_hungarian": float(hung.score.mean()),
        "median_matched_corr_hungarian": float(np.median(hung.score)),
        "null_mean_hungarian": float(null_hung.score.mean()),
        "null_p95_hungarian": float(np.quantile(null_hung.score, 0.95)),
        "null_mean_max": float(null_max.score.mean()),
        "null_p95_max": float(np.quantile(null_max.score, 0.95)),
        "null_threshold": versus_null.threshold,
        "fraction_above_null_hungarian": versus_null.fraction_above_null,
        # top-token Jaccard over vocabulary ids, matched pairs against all pairs (chance)
        "mean_jaccard_hungarian": float(jac_h.mean()),
        "mean_jaccard_hungarian_above_threshold": float(jac_h[above].mean())
        if above.any()
        else float("nan"),
        "mean_jaccard_hungarian_below_threshold": float(jac_h[~above].mean())
        if (~above).any()
        else float("nan"),
        "mean_jaccard_all_pairs": mean_jaccard_all_pairs(top_a, top_b)
        if top_a is not None
        else float("nan"),
        "mean_decoder_cosine_hungarian": float(dec_cos[hung.a_index, hung.b_index].mean()),
        "decoder_hungarian_mean_cosine": float(dec_h.score.mean()),
        # Both matchings pair every A latent when m_a <= m_b (rows come sorted by A).
        "decoder_activation_agreement": float(np.mean(dec_h.b_index == hung.b_index))
        if hung.n_a <= hung.n_b
        else float("nan"),
    }
    scores.update(_subspace_scores(st, hung, above, sample, cfg, caps))
    self_check = _self_check(st.self_corr)
    scores.update(self_check)

    gt: dict[str, dict[str, object]] = {}
    if best_a is None and st.concepts_a is not None:
        best_a = st.concepts_a.best(concept_names)
    if best_b is None and st.concepts_b is not None:
        best_b = st.concepts_b.best(concept_names)
    if best_a and best_b and set(best_a) & set(best_b):
        by_h = ground_truth_agreement(best_a, best_b, hung)
        by_max = ground_truth_agreement(best_a, best_b, max_ab)
        for c in by_h:
            a, b = int(best_a[c]), int(best_b[c])
            gt[c] = {"best_a": a, "best_b": b, "correlation": float(corr[a, b]),
                     "hungarian": by_h[c], "max": by_max[c]}  # fmt: skip
        scores["ground_truth_fraction_hungarian"] = float(np.mean(list(by_h.values())))
        scores["ground_truth_fraction_max"] = float(np.mean(list(by_max.values())))
        scores["ground_truth_concepts"] = float(len(gt))
    return SAEPairResult(
        st.hook_a, st.hook_b, st.name_a, st.name_b, corr, hung, max_ab, max_ba,
        null_hung, null_max, versus_null, table, gt, scores,
    )  # fmt: skip


def _subspace_scores(st, hung, above, sample, cfg, caps) -> dict[str, float]:
    """Linear CKA of the matched latents (all Hungarian pairs, and those above the
    threshold) on the row subsample, with a permutation p-value (sequential up to its cap
    in `caps`, the Holm family's plan)."""
    za, zb = sample[_latent_key("a", st)], sample[_latent_key("b", st)]
    out: dict[str, float] = {}
    for tag, keep in (("", np.ones_like(above)), ("_above_threshold", above)):
        a_idx, b_idx = hung.a_index[keep], hung.b_index[keep]
        x, y = za[:, a_idx], zb[:, b_idx]
        ok = a_idx.size > 0 and x.std(0).max(initial=0) > 0 and y.std(0).max(initial=0) > 0
        key = f"{sae_pair_key(st.hook_a, st.hook_b, st.name_a, st.name_b)}/subspace_cka{tag}_p"
        test = _family_test(x, y, "linear_cka", key, caps, cfg) if ok else None
        nan = float("nan")
        out[f"subspace_cka{tag}"] = test.statistic if test else nan
        out[f"subspace_cka{tag}_p"] = test.p_value if test else nan
        out[f"subspace_cka{tag}_p_floor"] = test.p_floor if test else nan
        out[f"subspace_cka{tag}_z"] = test.z if test else nan
        out[f"subspace_cka{tag}_p_normal"] = test.p_normal if test else nan
    return out


def _latent_key(side: str, st: _PairState) -> str:
    hook, name = (st.hook_a, st.name_a) if side == "a" else (st.hook_b, st.name_b)
    return f"z{side}:{hook}:{name}:{st.hook_a}~{st.hook_b}:{st.name_a}~{st.name_b}"


# ------------------------------------------------------------------------- the pass


def _hook_pairs(cfg: AlignConfig, store_a: RowStore, store_b: RowStore) -> list[tuple[str, str]]:
    if cfg.hook_pairs is None:
        pairs = [(h, h) for h in store_a.hooks if h in store_b.hooks]
        if not pairs:
            raise ValueError(
                f"no hook cached by both models ({store_a.path}: {store_a.hooks}; "
                f"{store_b.path}: {store_b.hooks}); set align hook_pairs explicitly"
            )
        return pairs
    for ha, hb in cfg.hook_pairs:
        for store, h in ((store_a, ha), (store_b, hb)):
            if h not in store.hooks:
                raise ValueError(
                    f"align hook_pairs: {h!r} is not cached in {store.path} (hooks: {store.hooks})"
                )
    return [tuple(p) for p in cfg.hook_pairs]  # type: ignore[misc]


def _sae_pairs(
    hook_pairs: list[tuple[str, str]],
    saes_a: SAEs,
    saes_b: SAEs,
    names: Sequence[str] | str | None,
) -> list[tuple[str, str, str]]:
    """(hook_a, hook_b, name) for every compared hook pair and SAE name both models have.

    SAEs are paired by name: A's SAE "x" on hook_a with B's SAE "x" on hook_b. A hook
    pair where only one side (or neither) has SAEs is compared on raw activations only;
    one where both sides have SAEs but no name in common is an error, not zero pairs
    (with `names` given, every name must be on both sides, as below).
    """
    out = []
    for ha, hb in hook_pairs:
        have_a, have_b = sorted(saes_a.get(ha, {})), sorted(saes_b.get(hb, {}))
        shared = sorted(set(have_a) & set(have_b))
        if names is None or names == "all":
            if have_a and have_b and not shared:
                where = ha if ha == hb else f"{ha} (A) ~ {hb} (B)"
                raise ValueError(
                    f"SAEs on {where}: model A has {have_a}, model B has {have_b}, no name "
                    "in common; SAEs are paired by name, so give the two you want compared "
                    "the same key in saes_a and saes_b"
                )
            out += [(ha, hb, n) for n in (shared if names == "all" else shared[:1])]
            continue
        chosen = [n for n in names if n in shared]
        if len(chosen) < len(names) and (ha in saes_a or hb in saes_b):
            missing = sorted(set(names) - set(chosen))
            raise ValueError(
                f"align sae_names: {missing} not trained on both {ha} (model A has "
                f"{sorted(saes_a.get(ha, {}))}) and {hb} (model B has {sorted(saes_b.get(hb, {}))}); "
                "SAEs are paired by name"
            )
        out += [(ha, hb, n) for n in chosen]
    return out


def _splitting(side: str, saes: SAEs) -> dict[str, dict[str, float]]:
    """Feature splitting for every pair of SAEs of different widths on one hook."""
    out = {}
    for hook, by_name in saes.items():
        for (n1, s1), (n2, s2) in itertools.combinations(sorted(by_name.items()), 2):
            if s1.d_sae == s2.d_sae or s1.d_in != s2.d_in:
                continue
            (nn, narrow), (nw, wide) = sorted([(n1, s1), (n2, s2)], key=lambda t: t[1].d_sae)
            fs = feature_splitting(narrow.W_dec.detach().double(), wide.W_dec.detach().double())
            out[f"{side}/{hook}/{nn}>{nw}"] = fs.summary()
    return out


def _concept_names(store_a: RowStore, store_b: RowStore) -> list[str]:
    """Concepts labelled in both stores (ground truth needs the labels on both sides)."""
    names = []
    for s in (store_a, store_b):
        try:
            s.array("concept_labels")
        except KeyError:
            return []
        names.append(list(s.concept_names))
    if names[0] != names[1]:
        raise ValueError(
            f"concept names differ: {store_a.path} has {names[0]}, {store_b.path} has "
            f"{names[1]}; expected stores of the same corpus"
        )
    return names[0]


@dataclass
class PassPlan:
    """Everything a part of the pass needs; picklable, so a Dask worker can run a part."""

    store_a: RowStore
    store_b: RowStore
    rows_a: np.ndarray
    rows_b: np.ndarray
    bounds: list[tuple[int, int]]  # chunks: [lo, hi) positions in the aligned rows
    sigmas: list[np.ndarray]  # the null passes' chunk derangements
    pairs: list[tuple]  # (hook_a, hook_b, name_a, name_b, sae_a, sae_b)
    grid_a: list[str]
    grid_b: list[str]
    ka: dict[str, str]
    kb: dict[str, str]
    dims: dict[str, int]
    n_concepts: int
    cfg: AlignConfig
    device: Device = CPU  # where each part runs (resolved there: `auto` is a worker's GPU)

    def parts(self) -> list[tuple[int, int]]:
        """`cfg.n_parts` contiguous ranges of chunk indices (fewer if there are few chunks)."""
        edges = np.linspace(0, len(self.bounds), min(self.cfg.n_parts, len(self.bounds)) + 1)
        edges = np.unique(edges.round().astype(int))
        return list(itertools.pairwise(edges.tolist()))


@dataclass
class PassState:
    """A part's accumulators; `merge` absorbs the next part's."""

    moments: CentredMoments
    states: list[_PairState]
    sampler: RowSample

    def to(self, device: torch.device | str) -> PassState:
        self.moments.to(device)
        for st in self.states:
            st.to(device)
        return self

    def merge(self, other: PassState) -> None:
        self.moments.merge(other.moments)
        for mine, theirs in zip(self.states, other.states, strict=True):
            mine.merge(theirs)
        self.sampler.merge(other.sampler)


@torch.inference_mode()
def run_part(plan: PassPlan, c0: int, c1: int) -> PassState:
    """Stream chunks c0..c1-1 of the aligned tokens through every accumulator, on
    `plan.device` (SAEs and sums there for the part; the state comes back on the CPU)."""
    with contextlib.ExitStack() as stack:
        for sae in {id(s): s for p in plan.pairs for s in p[4:6]}.values():
            stack.enter_context(on_device(sae, plan.device))
        return _run_part(plan, c0, c1, plan.device.torch).to("cpu")


def _run_part(plan: PassPlan, c0: int, c1: int, on: torch.device) -> PassState:
    cfg, ka, kb = plan.cfg, plan.ka, plan.kb
    store_a, store_b, grid_a, grid_b = plan.store_a, plan.store_b, plan.grid_a, plan.grid_b
    states = [_PairState(*p, cfg, plan.n_concepts, device=on) for p in plan.pairs]
    products = [(k, k) for k in plan.dims] + [(ka[a], kb[b]) for a in grid_a for b in grid_b]
    # float32 block products into float64 sums: the activations are float16 on disk, and
    # moments.py measures ~1e-6 error for this scheme, far below the sampling error.
    moments = CentredMoments(plan.dims, products, matmul_dtype=torch.float32, block_rows=4096,
                             device=on)  # fmt: skip
    sampler = RowSample(
        [*plan.dims, *(_latent_key(s, st) for st in states for s in "ab")], cfg.n_samples,
        cfg.seed,
    )  # fmt: skip
    null_hooks = sorted({st.hook_b for st in states})

    def labels(store: RowStore, rows: np.ndarray) -> torch.Tensor | None:
        if not plan.n_concepts:
            return None
        return torch.from_numpy(gather_rows(store, "concept_labels", rows)).to(on)

    for i in range(c0, c1):
        lo, hi = plan.bounds[i]
        ra, rb = plan.rows_a[lo:hi], plan.rows_b[lo:hi]
        xa = {h: _acts(store_a, h, ra).to(on) for h in grid_a}
        xb = {h: _acts(store_b, h, rb).to(on) for h in grid_b}
        chunk = {ka[h]: x for h, x in xa.items()} | {kb[h]: x for h, x in xb.items()}
        moments.update(chunk)
        lab_a, lab_b = labels(store_a, ra), labels(store_b, rb)
        tok_a = torch.from_numpy(gather_rows(store_a, "token_ids", ra).astype(np.int64)).to(on)
        tok_b = torch.from_numpy(gather_rows(store_b, "token_ids", rb).astype(np.int64)).to(on)
        nulls_b = []
        for k, sigma in enumerate(plan.sigmas):
            jlo, jhi = plan.bounds[int(sigma[i])]
            rows = plan.rows_b[jlo:jhi]
            rows = rows[np.random.default_rng([cfg.seed, k, i]).permutation(len(rows))]
            nulls_b.append({h: _acts(store_b, h, rows[: hi - lo]).to(on) for h in null_hooks})
        for st in states:
            fa, fb = st.sae_a.encode(xa[st.hook_a]), st.sae_b.encode(xb[st.hook_b])
            st.update(fa, fb, tok_a, tok_b, lab_a, lab_b)
            chunk[_latent_key("a", st)], chunk[_latent_key("b", st)] = fa, fb
            for acc, xn in zip(st.nulls, nulls_b, strict=True):
                fn = st.sae_b.encode(xn[st.hook_b])
                acc.update(fa[: len(fn)], fn)
        sampler.update(chunk, chunk_id=i, row0=lo)
    return PassState(moments, states, sampler)


def _map_in_order(plan: PassPlan, parts: list[tuple[int, int]]) -> list[PassState]:
    return [run_part(plan, c0, c1) for c0, c1 in tqdm(parts, desc="align", unit="part")]


@torch.inference_mode()
def align_pair(
    store_a: RowStore,
    store_b: RowStore,
    saes_a: SAEs,
    saes_b: SAEs,
    cfg: AlignConfig | None = None,
    *,
    best_latents_a: BestLatents | None = None,
    best_latents_b: BestLatents | None = None,
    progress: bool = True,
    map_parts: Callable[[PassPlan, list[tuple[int, int]]], list[PassState]] | None = None,
    device: Device = CPU,
    token_strings: tuple[Sequence[str], Sequence[str]] | None = None,
    untrained: tuple[object, object] | None = None,
) -> AlignmentResult:
    """Align model A's features with model B's (see the module docstring).

    `saes_a` / `saes_b`: hook -> SAE name -> SAE (e.g. from `stages.sae.io.load_model_saes`). Ground truth
    uses `best_latents_*` (hook -> name -> concept -> latent, from the SAEs'
    metrics.json) when given, else each concept's best latent by F1 on the aligned
    tokens, from the stores' concept labels.

    `map_parts(plan, parts)` runs `run_part(plan, lo, hi)` for every part and returns
    the results in order (default: one after another here; `flows/align.py` hands the
    parts to Dask workers). `device` is where the token pass runs (the SAE encodes and
    the co-moment products, float32 into float64 sums on any device; `precision` is not
    used: bf16 products would cost the correlations digits). Matching and similarity
    scores run on the CPU afterwards.

    Top-token Jaccard compares vocabulary ids. When the paired rows hold the same token
    ids (one tokenizer) they are compared as they are; for two tokenizers, give
    `token_strings` = (A's, B's decoded string of every token id) and the ids are
    compared through their strings (`matching.shared_vocabulary`); without them the
    Jaccard scores are NaN (`AlignmentResult.jaccard_vocabulary` says which).

    `untrained` = (A's, B's architecture and seed before training, HookedTransformers):
    the dense measures' untrained-model controls (`controls.py`), run on the very rows of
    the subsample, computed on the fly from each store's token windows.
    """
    cfg = cfg or AlignConfig()
    _ = progress  # per-part progress bars would interleave; the flow logs parts instead
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    alignment: TokenAlignment = align_tokens(store_a, store_b)
    chosen = select_rows(alignment, store_a, cfg.split, cfg.max_tokens, cfg.top_up)
    lo, hi = store_a.split_range("heldout")
    n_heldout = int(((chosen.rows_a >= lo) & (chosen.rows_a < hi)).sum())
    ids_a = np.asarray(store_a.array("token_ids")[:])[chosen.rows_a]
    ids_b = np.asarray(store_b.array("token_ids")[:])[chosen.rows_b]
    vocabulary: tuple[Sequence[str], Sequence[str]] | bool = (
        True if np.array_equal(ids_a, ids_b) else (token_strings or False)
    )
    jaccard_vocabulary = ("token ids" if vocabulary is True else
                          "decoded token strings" if vocabulary else "none")  # fmt: skip
    timings["align_tokens"] = time.perf_counter() - t0

    hook_pairs = _hook_pairs(cfg, store_a, store_b)
    if untrained is not None:
        check_control_metrics(cfg.control_metrics)  # before the pass, not after it
    grid_a, grid_b = list(store_a.hooks), list(store_b.hooks)
    sae_pairs = _sae_pairs(hook_pairs, saes_a, saes_b, cfg.sae_names)
    caps = family_caps(hook_pairs, sae_pairs, cfg)  # planned before any data is seen
    concepts = _concept_names(store_a, store_b)
    # (hook_a, hook_b, name_a, name_b, sae_a, sae_b): each part builds its accumulators
    specs = [(ha, hb, n, n, saes_a[ha][n], saes_b[hb][n]) for ha, hb, n in sae_pairs]
    for ha, hb, name, _, sae_a, sae_b in specs:
        for side, hook, sae, store in (("A", ha, sae_a, store_a), ("B", hb, sae_b, store_b)):
            if sae.d_in != store.d(hook):
                raise ValueError(
                    f"SAE {name!r} of model {side} has d_in = {sae.d_in} but {store.path} "
                    f"caches {hook} with width {store.d(hook)}"
                )

    ka = {h: f"a:{h}" for h in grid_a}
    kb = {h: f"b:{h}" for h in grid_b}
    dims = {ka[h]: store_a.d(h) for h in grid_a} | {kb[h]: store_b.d(h) for h in grid_b}
    bounds = _chunk_bounds(chosen.rows_a, cfg.chunk_rows, int(store_a.array(grid_a[0]).chunks[0]))
    rng = np.random.default_rng(cfg.seed)
    plan = PassPlan(
        store_a, store_b, chosen.rows_a, chosen.rows_b, bounds,
        [random_derangement(len(bounds), rng) for _ in range(cfg.n_null)],
        specs, grid_a, grid_b, ka, kb, dims, len(concepts), cfg, device,
    )  # fmt: skip
    parts = plan.parts()
    results = (map_parts or _map_in_order)(plan, parts)
    acc = results[0]
    for other in results[1:]:
        acc.merge(other)
    moments, states, sampler = acc.moments, acc.states, acc.sampler
    timings["pass"] = time.perf_counter() - t0 - timings["align_tokens"]

    with _single_threaded_blas():
        t1 = time.perf_counter()
        sample = sampler.result()
        with shared_per_representation():  # each hook's Gram matrix etc. once, not per pair
            grid, by_pair = _similarity(moments, sample, grid_a, grid_b, ka, kb, hook_pairs,
                                        cfg, caps)  # fmt: skip
        timings["similarity"] = time.perf_counter() - t1
        controls = {}
        if untrained is not None and cfg.control_metrics:
            t1 = time.perf_counter()
            controls = _untrained_controls(untrained, sampler.positions(), chosen, store_a,
                                           store_b, sample, ka, kb, hook_pairs, cfg)  # fmt: skip
            timings["untrained_controls"] = time.perf_counter() - t1

        t1 = time.perf_counter()
        pairs = []
        for st in states:
            comoment = moments.comoment[(ka[st.hook_a], kb[st.hook_b])]
            rotation = orthogonal_procrustes_map(comoment)
            best_a = (best_latents_a or {}).get(st.hook_a, {}).get(st.name_a)
            best_b = (best_latents_b or {}).get(st.hook_b, {}).get(st.name_b)
            pairs.append(_finish_pair(st, cfg, rotation, sample, concepts, best_a, best_b,
                                      vocabulary, caps))  # fmt: skip
        splitting = _splitting("a", saes_a) | _splitting("b", saes_b)
        timings["matching"] = time.perf_counter() - t1
    timings["total"] = time.perf_counter() - t0
    result = AlignmentResult(
        str(store_a.attrs.get("model", store_a.path.name)),
        str(store_b.attrs.get("model", store_b.path.name)),
        len(chosen), n_heldout, chosen.rule, grid, by_pair, pairs, splitting, timings, cfg,
        jaccard_vocabulary, controls,
    )  # fmt: skip
    log.info("aligned %s vs %s on %d tokens (%d held out) in %.1f s", result.model_a,
             result.model_b, len(chosen), n_heldout, timings["total"])  # fmt: skip
    return result


def _untrained_controls(untrained, positions, chosen, store_a, store_b, sample, ka, kb,
                        hook_pairs, cfg):  # fmt: skip
    """The untrained models' activations at the subsample's rows of each store, then the
    controls of every compared hook pair (controls.py)."""
    from stages.models import model_at_rows

    model_a, model_b = untrained
    hooks_a = sorted({ha for ha, _ in hook_pairs})
    hooks_b = sorted({hb for _, hb in hook_pairs})
    ua = model_at_rows(model_a, store_a, chosen.rows_a[positions], hooks_a)
    ub = model_at_rows(model_b, store_b, chosen.rows_b[positions], hooks_b)
    return untrained_controls(
        {h: sample[ka[h]] for h in hooks_a}, ua, ub, hook_pairs,
        n_permutations=cfg.n_permutations, seed=cfg.seed, k=cfg.knn_k,
        metrics=cfg.control_metrics, trained_b={h: sample[kb[h]] for h in hooks_b},
    )  # fmt: skip


def _single_threaded_blas() -> contextlib.AbstractContextManager:
    """numpy's BLAS on one thread for the many small products after the pass: on a
    2-core machine shared with other jobs, OpenBLAS threads spin against each other
    (measured: SVCCA with 100 permutations 15 s with 2 threads, 0.4 s with 1)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: only a speed-up
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _similarity(moments, sample, grid_a, grid_b, ka, kb, hook_pairs, cfg, caps):
    """Layer grids (exact linear CKA; mutual kNN and every p-value on the subsample; grid
    p-values descriptive, n_permutations each) and every measure of the compared hook
    pairs, the Holm family's tests (sequential up to their `caps`)."""
    grid: dict[str, LayerSimilarity] = {}
    cells: dict[tuple[str, str, str], PermutationTest] = {}  # (metric, ha, hb) -> test
    n_sample = next(iter(sample.values())).shape[0]
    for metric in GRID_METRICS:
        values = np.zeros((len(grid_a), len(grid_b)))
        p_values, z, p_normal = np.ones_like(values), np.zeros_like(values), np.zeros_like(values)
        for (i, ha), (j, hb) in itertools.product(enumerate(grid_a), enumerate(grid_b)):
            test = permutation_test(
                sample[ka[ha]], sample[kb[hb]], metric, n_permutations=cfg.n_permutations,
                seed=cfg.seed, k=cfg.knn_k,
            )  # fmt: skip
            values[i, j], p_values[i, j] = test.statistic, test.p_value
            z[i, j], p_normal[i, j] = test.z, test.p_normal
            if metric == "linear_cka":
                # exact over every token; its p, z and null stay the subsample's
                c = moments.comoment
                values[i, j] = cka_from_products(
                    c[(ka[ha], kb[hb])], c[(ka[ha], ka[ha])], c[(kb[hb], kb[hb])]
                )
            cells[(metric, ha, hb)] = dataclasses.replace(
                test, statistic=float(values[i, j]), n_samples=moments.n
            ) if metric == "linear_cka" else test  # fmt: skip
        n_used = moments.n if metric == "linear_cka" else n_sample
        grid[metric] = LayerSimilarity(metric, grid_a, grid_b, values, p_values, n_used, z,
                                       p_normal, cfg.n_permutations)  # fmt: skip

    by_pair: dict[str, dict[str, PermutationTest]] = {}
    for ha, hb in hook_pairs:
        name = pair_name(ha, hb)
        tests = {}
        for m in GRID_METRICS + PAIR_METRICS:
            key = f"{m}_p/{name}"
            if m in GRID_METRICS and key not in caps:
                tests[m] = cells[(m, ha, hb)]  # the grid's own test: n_permutations
                continue
            test = _family_test(sample[ka[ha]], sample[kb[hb]], m, key, caps, cfg, k=cfg.knn_k)
            if m == "linear_cka":  # exact over every token, as in the grid
                test = dataclasses.replace(test, statistic=cells[(m, ha, hb)].statistic,
                                           n_samples=moments.n)  # fmt: skip
            tests[m] = test
        by_pair[name] = tests
    return grid, by_pair
