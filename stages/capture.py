"""Dependency capture: how much of a planted dependency a language model has learned.

For each occurrence (`stages.corpus.Site`) of a planted dependency in held-out text, the
cue word is replaced by each value the slot can take (every weather, every species,
every number), and the log-odds of the outcome against its alternatives are read twice:

    true   L_t(cue) = logit P(outcome | prefix with cue)      the generator's probability
    model  L_m(cue) = log sum_{w in outcome} P_m(w) - log sum_{w in alternatives} P_m(w)

The capture of one context is the least-squares slope of L_m on L_t across cue values:
model log-odds contrast / true log-odds contrast (for two cue values exactly their
ratio; with more, every pair weighted by its true contrast). A model that ignores the
cue scores 0, one that reads the generator's probabilities scores 1. A dependency's
capture is the mean over held-out contexts, with a 95 % interval (normal, over
contexts).

    sites = heldout_sites(texts)                       # {dependency: [(text, Site)]}
    fn = lm_log_odds_fn(model)                         # or any (prefixes, outcome, alts) -> L
    table = dependency_capture(fn, sites)              # {dependency: {capture, ci95, ...}}
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import numpy as np

from stages.corpus import Site, p_next_word_in, read_context

LogOddsFn = Callable[[list[str], Sequence[str], Sequence[str]], np.ndarray]


def heldout_sites(
    texts: list[str], max_per_dependency: int = 200, seed: int = 0
) -> dict[str, list[tuple[str, Site]]]:
    """Up to `max_per_dependency` occurrences of each planted dependency in `texts`
    (a seeded sample, in a stable order)."""
    found: dict[str, list[tuple[str, Site]]] = {}
    for text in texts:
        for site in read_context(text)[1]:
            found.setdefault(site.dependency, []).append((text, site))
    rng = random.Random(seed)
    out = {}
    for dep in sorted(found):
        items = found[dep]
        if len(items) > max_per_dependency:
            keep = sorted(rng.sample(range(len(items)), max_per_dependency))
            items = [items[i] for i in keep]
        out[dep] = items
    return out


def prefixes_of(text: str, site: Site) -> list[str]:
    """The text a model conditions on, once per cue value (the cue word substituted)."""
    head, tail = text[: site.cue_start], text[site.cue_end : site.prefix_end]
    return [head + cue + tail for cue in site.cues]


def _logit(p: float) -> float:
    return math.log(p) - math.log1p(-p)


def capture_of_site(model_lo: np.ndarray, p_outcome: Sequence[float]) -> tuple[float, float, float]:
    """(slope of model on true log-odds, true contrast max-min, model contrast at those cues)."""
    lt = np.array([_logit(p) for p in p_outcome])
    lm = np.asarray(model_lo, dtype=np.float64)
    dt = lt - lt.mean()
    var = float((dt**2).sum())
    if var == 0:
        raise ValueError("capture_of_site: the cue values all give the same true probability")
    hi, lo = int(np.argmax(lt)), int(np.argmin(lt))
    slope = float((dt * (lm - lm.mean())).sum() / var)
    return slope, float(lt[hi] - lt[lo]), float(lm[hi] - lm[lo])


def dependency_capture(fn: LogOddsFn, sites: dict[str, list[tuple[str, Site]]]) -> dict:
    """Per dependency: mean capture over contexts with a 95 % interval, and the mean true
    and model contrasts (log-odds, nats) between the cue values of highest and lowest
    true probability."""
    out = {}
    for dep, items in sites.items():
        if not items:
            continue
        slopes, true_c, model_c = [], [], []
        for text, site in items:
            lo = fn(prefixes_of(text, site), site.outcome, site.alternatives)
            s, t, m = capture_of_site(lo, site.p_outcome)
            slopes.append(s)
            true_c.append(t)
            model_c.append(m)
        x = np.asarray(slopes)
        half = 1.96 * x.std(ddof=1) / math.sqrt(len(x)) if len(x) > 1 else None
        ci = [round(float(x.mean() + h), 6) for h in (-half, half)] if half is not None else None
        out[dep] = {
            "capture": round(float(x.mean()), 6),
            "ci95": ci,  # None with a single context
            "n_contexts": len(x),
            "true_contrast": round(float(np.mean(true_c)), 6),
            "model_contrast": round(float(np.mean(model_c)), 6),
        }
    return out


def lm_log_odds_fn(model, batch: int = 64) -> LogOddsFn:
    """A LogOddsFn reading a HookedTransformer's next-word probabilities.

    A word's probability is that of its tokens (' ' + word, as byte-level BPE writes a
    word after a space) following the prefix; words of one token need no extra pass.
    Prefixes start with BOS, as a document does in training, and are cut on the left to
    fit the context.
    """
    import torch

    tok = model.tokenizer
    n_ctx = model.cfg.n_ctx
    bos = tok.bos_token_id

    def ids(s: str) -> list[int]:
        return tok(s, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def seq_logprobs(seqs: list[list[int]], n_last: list[int]) -> np.ndarray:
        """Sum of log P(token) over the last n_last[i] tokens of each sequence."""
        out = np.zeros(len(seqs))
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        for b in range(0, len(order), batch):
            idx = order[b : b + batch]
            width = max(len(seqs[i]) for i in idx)
            x = torch.full((len(idx), width), bos, dtype=torch.long)
            for r, i in enumerate(idx):
                x[r, : len(seqs[i])] = torch.tensor(seqs[i])
            logp = torch.log_softmax(model(x).float(), dim=-1)
            for r, i in enumerate(idx):
                n = len(seqs[i])
                pos = torch.arange(n - n_last[i] - 1, n - 1)
                out[i] = logp[r, pos, x[r, pos + 1]].sum().item()
        return out

    def fn(prefixes: list[str], outcome: Sequence[str], alternatives: Sequence[str]) -> np.ndarray:
        words = list(outcome) + list(alternatives)
        wids = [ids(" " + w) for w in words]
        room = n_ctx - max(map(len, wids)) - 1
        pre = [[bos] + ids(p)[-room:] for p in prefixes]
        lp = np.zeros((len(prefixes), len(words)))
        one = [j for j, w in enumerate(wids) if len(w) == 1]
        if one:  # one pass: the last position's distribution gives every one-token word
            first = [w[0] for w in wids]
            with torch.no_grad():
                for b in range(0, len(pre), batch):
                    chunk = pre[b : b + batch]
                    width = max(map(len, chunk))
                    x = torch.full((len(chunk), width), bos, dtype=torch.long)
                    for r, s in enumerate(chunk):
                        x[r, : len(s)] = torch.tensor(s)
                    logits = model(x).float()
                    last = torch.tensor([len(s) - 1 for s in chunk])
                    logp = torch.log_softmax(logits[torch.arange(len(chunk)), last], dim=-1)
                    lp[b : b + len(chunk), one] = logp[:, [first[j] for j in one]].numpy()
        for j, w in enumerate(wids):
            if len(w) > 1:
                lp[:, j] = seq_logprobs([p + w for p in pre], [len(w)] * len(pre))
        k = len(outcome)
        return _lse(lp[:, :k]) - _lse(lp[:, k:])

    return fn


def _lse(a: np.ndarray) -> np.ndarray:
    m = a.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(a - m).sum(axis=1, keepdims=True)))[:, 0]


def oracle_log_odds(prefixes: list[str], outcome: Sequence[str], alternatives: Sequence[str]):
    """The generator's own log-odds: re-read each prefix (plus an outcome word, so the
    slot is seen) with `read_context`, and ask the generator's next-word distribution
    there (`p_next_word_in`) for the outcome and its alternatives."""
    out = []
    for p in prefixes:
        site = read_context(p + " " + outcome[0])[1][-1]
        out.append(
            math.log(p_next_word_in(site, outcome)) - math.log(p_next_word_in(site, alternatives))
        )
    return np.asarray(out)


def entropy_per_token(tokenizer, texts: list[str], entropy_nats: list[float]) -> float:
    """The corpus' entropy estimate in nats per token of `tokenizer`: the documents'
    generator entropy over their tokens, plus one separator token per document (the
    stream a model is trained and scored on, `stages.tokens`)."""
    n = sum(len(x) + 1 for x in tokenizer(texts, add_special_tokens=False)["input_ids"])
    return float(sum(entropy_nats)) / n


def world_metrics(model, texts: list[str], entropy_nats: list[float] | None,
                  max_per_dependency: int = 64) -> dict:  # fmt: skip
    """What the `lm` stage reports about the world: per planted dependency the capture
    (over held-out `texts`), and the corpus entropy per token of the model's tokenizer."""
    out: dict = {"capture": dependency_capture(lm_log_odds_fn(model),
                                               heldout_sites(texts, max_per_dependency))}  # fmt: skip
    if entropy_nats is not None:
        out["corpus_entropy_per_token"] = round(
            entropy_per_token(model.tokenizer, texts, entropy_nats), 6
        )
    return out
