"""Steering along the simplex: move an animal noun's representation from one class's
vertex toward another's and read what the model then predicts for its verb.

The seeds' "steering by simplices". In held-out sentences '<det> <animal> [<adverb>]
<verb>' (the class -> verb dependency of `stages.corpus`) whose animal is a `source`
(mammal), the residual stream at `hook` is shifted at the noun's tokens only by the
simplex edge Δ = c_target − c_source, where c_class is the centroid of the class's token
vertices (the mean of its nouns' per-token mean residuals, the points the geometry
stage's simplex is drawn through). At the verb slot the model's log-odds of a `target`
class verb against a `source` class verb are read before and after:

    effect     = mean over sentences of ΔL, L = log Σ_{target verbs} P − log Σ_{source verbs} P
    flip rate  = fraction of sentences where the target class's verbs become more likely
                 than the source class's (L crosses 0 from below)

Control: the same shift with `n_random` random directions of Δ's norm (seeded); z and
the empirical p (floor 1 / (n_random + 1)) of the edge's effect among them. Only the
noun is moved, so the effect is the model reading the class from that token later.
Verbs count by their first token (byte-level BPE: ' ' + word).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from stages.corpus import ANIMALS, MOVES, read_context


@dataclass
class Sentence:
    tokens: list[int]  # BOS + the previous and this sentence up to the verb slot
    noun: list[int]  # positions of the noun's tokens in `tokens`
    target: list[int]  # first token ids of the target class's verb forms here
    source: list[int]  # ... of the source class's


def sentences(tokenizer, texts: list[str], source: str, target: str, n_ctx: int,
              max_sites: int = 64) -> list[Sentence]:  # fmt: skip
    """Held-out class -> verb sites whose animal is of class `source`, tokenised."""
    cls_of = {f: c for c, sp in ANIMALS.items() for forms in sp.values() for f in forms}
    verb_cls = {f: c for c, vs in MOVES.items() for v in vs for f in v}
    bos = tokenizer.bos_token_id

    def ids(s: str) -> list[int]:
        return tokenizer(s, add_special_tokens=False)["input_ids"]

    out = []
    for text, site in ((t, x) for t in texts for x in read_context(t)[1]):
        if site.dependency != "class_verb" or cls_of.get(site.cue) != source:
            continue
        # context: the sentence and the one before it (the dependency lives in the
        # sentence; a short prefix keeps the forward passes small)
        start = text.rfind(". ", 0, text.rfind(". ", 0, site.cue_start) + 1) + 2
        # byte-level BPE writes the space before a word into the word's token
        head = ids(text[start : site.cue_start].removesuffix(" "))
        prefix, upto = ids(text[start : site.prefix_end]), ids(text[start : site.cue_end])
        if prefix[: len(upto)] != upto or upto[: len(head)] != head or len(prefix) + 1 > n_ctx:
            continue  # the noun's tokens are not a clean slice of the prefix's
        words = list(site.outcome) + list(site.alternatives)
        first = {w: ids(" " + w)[0] for w in words}
        out.append(Sentence([bos, *prefix], list(range(1 + len(head), 1 + len(upto))),
                            [first[w] for w in words if verb_cls[w] == target],
                            [first[w] for w in words if verb_cls[w] == source]))  # fmt: skip
        if len(out) >= max_sites:
            break
    return out


@torch.no_grad()
def _log_odds(model, sents: list[Sentence], hook: str, shifts: torch.Tensor) -> np.ndarray:
    """[n_shifts, n_sentences] log-odds target vs source verbs at the verb slot, with
    shifts[i] added at `hook` on each sentence's noun tokens (row 0 of `shifts` = 0 is
    the clean run)."""
    width = max(len(s.tokens) for s in sents)
    bos = sents[0].tokens[0]
    x = torch.full((len(sents), width), bos, dtype=torch.long)
    mask = torch.zeros(len(sents), width, 1)
    for r, s in enumerate(sents):
        x[r, : len(s.tokens)] = torch.tensor(s.tokens)
        mask[r, s.noun] = 1.0
    last = torch.tensor([len(s.tokens) - 1 for s in sents])
    out = np.zeros((len(shifts), len(sents)))
    for i, v in enumerate(shifts):

        def add(act, hook, v=v):
            return act + mask.to(act.dtype) * v.to(act.dtype)

        logits = model.run_with_hooks(x, fwd_hooks=[(hook, add)])
        lp = torch.log_softmax(logits[torch.arange(len(sents)), last].double(), dim=-1)
        for r, s in enumerate(sents):
            out[i, r] = float(
                torch.logsumexp(lp[r, s.target], 0) - torch.logsumexp(lp[r, s.source], 0)
            )
    return out


def simplex_steering(model, sents: list[Sentence], hook: str, centroids: dict[str, np.ndarray],
                     source: str = "mammal", target: str = "bird", n_random: int = 32,
                     seed: int = 0) -> dict:  # fmt: skip
    """The edge's effect on the verb log-odds at `hook`, its flip rate, and the
    random-direction control (module docstring), on `sentences(..., source, target)`.
    `centroids[c]`: the class's vertex in the raw residual space of `hook`."""
    if len(sents) < 4:
        return {"skipped": f"{len(sents)} held-out {source} sentences with a verb slot "
                "(need >= 4)"}  # fmt: skip
    edge = torch.from_numpy(np.asarray(centroids[target] - centroids[source], np.float32))
    gen = torch.Generator().manual_seed(seed)
    rand = torch.randn(n_random, edge.numel(), generator=gen)
    rand = rand / rand.norm(dim=1, keepdim=True) * edge.norm()
    shifts = torch.cat([torch.zeros(1, edge.numel()), edge[None], rand])
    lo = _log_odds(model, sents, hook, shifts)
    delta = lo[1:] - lo[0]  # [1 + n_random, n]
    effects = delta.mean(1)
    null = effects[1:]
    sd = float(null.std(ddof=1))
    n = delta.shape[1]
    se = float(delta[0].std(ddof=1) / np.sqrt(n))
    return {
        "hook": hook, "source": source, "target": target, "n_sentences": n,
        "edge_norm": float(edge.norm()),
        "clean_log_odds": float(lo[0].mean()),
        "effect": float(effects[0]),
        "effect_ci95": [float(effects[0] - 1.96 * se), float(effects[0] + 1.96 * se)],
        "flip_rate": float(((lo[1] > 0) & (lo[0] <= 0)).mean()),
        "random_flip_rate": float(((lo[2:] > 0) & (lo[0] <= 0)).mean()),
        "null_mean": float(null.mean()), "null_sd": sd, "n_random": n_random,
        "z": float((effects[0] - null.mean()) / sd) if sd > 0 else float("nan"),
        "p": float((1 + (null >= effects[0]).sum()) / (1 + len(null))),
        "p_floor": 1 / (1 + n_random),
    }  # fmt: skip
