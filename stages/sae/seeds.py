"""SAE seeds: the spread of headline metrics over SAEs that differ only in their seed,
and how universal their features are from one seed to the next.

`seed_groups` finds, among the SAEs trained on one hook, those whose configs are equal
but for `seed` (and `name`). For each group of two or more:

- `seed_summary`: every headline metric as mean, sample sd (ddof 1) and a 95 % Student-t
  interval over the seeds (n - 1 degrees of freedom);
- `seed_overlap`: for every pair of seeds, the same matching the cross-model alignment
  uses (`stages.alignment`): Pearson correlation of every latent of one SAE with every
  latent of the other over held-out rows, the one-to-one Hungarian matching, and the
  fraction of latents whose match correlates >= `threshold` ("has a partner"; Bricken
  et al. 2023 and Paulo & Belrose 2025 compare SAE seeds this way), beside the same
  matching on rows shuffled against each other (the chance level for latents of these
  sparsities) and the decoder cosine of the matched latents.

So `fraction_with_partner_hungarian` of two seeds of one SAE config, on one model, reads
directly against the same number between two models' SAEs in `metrics/alignment`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

# the metrics (flat keys of metrics/saes/<M>.json) whose spread over seeds is reported
HEADLINE = ("fvu", "l0", "dead_fraction", "ce_delta_sae", "kl_sae", "kl_sae_over_pca",
            "sae_to_random_kl_ratio", "probe_k1_f1", "probe_k20_f1", "absorption_mean")  # fmt: skip


def seed_groups(configs: Mapping[str, Mapping[str, Any]]) -> dict[str, list[str]]:
    """SAE name -> config (as plain data) in, groups of >= 2 names whose configs differ
    only in `seed` and `name` out, keyed by the first name (sorted by seed)."""
    by_key: dict[str, list[tuple[int, str]]] = {}
    for name, cfg in configs.items():
        rest = {k: v for k, v in cfg.items() if k not in ("seed", "name")}
        by_key.setdefault(repr(sorted(rest.items())), []).append((int(cfg.get("seed", 0)), name))
    out = {}
    for members in by_key.values():
        if len({s for s, _ in members}) >= 2:
            names = [n for _, n in sorted(members)]
            out[names[0]] = names
    return out


def mean_sd_interval(values: Sequence[float], level: float = 0.95) -> dict[str, float]:
    """Mean and sample sd of the finite values (`stages.alignment.aggregate.summarise`)
    with the Student-t interval of the mean; sd and interval NaN with fewer than two."""
    from scipy import stats

    from stages.alignment.aggregate import summarise

    s = summarise(values)
    half = (float(stats.t.ppf(0.5 + level / 2, s.n - 1)) * s.sd / math.sqrt(s.n)
            if s.n >= 2 else math.nan)  # fmt: skip
    return {"n": float(s.n), "mean": s.mean, "sd": s.sd, "lo": s.mean - half, "hi": s.mean + half}


def seed_summary(flat: Mapping[str, Mapping[str, float]], names: Sequence[str],
                 keys: Sequence[str] = HEADLINE) -> dict[str, dict[str, float]]:  # fmt: skip
    """Per headline key present in the SAEs' flat metrics: `mean_sd_interval` over seeds."""
    out = {}
    for key in keys:
        vals = [flat[n].get(key) for n in names if key in flat[n]]
        if vals:
            out[key] = mean_sd_interval(vals)
    return out


def _codes(sae, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return sae.encode(x).float()


def seed_overlap(sae_a, sae_b, chunks: Iterator[torch.Tensor] | Sequence[torch.Tensor], *,
                 threshold: float = 0.5, seed: int = 0) -> dict[str, float]:  # fmt: skip
    """Hungarian matching of two SAEs' latents by activation correlation over `chunks`
    (held-out rows of the hook both were trained on), with the shuffled-row null."""
    from stages.alignment.correlation import CorrelationAccumulator, random_derangement
    from stages.alignment.matching import decoder_cosine, hungarian_matches

    acc = CorrelationAccumulator(sae_a.d_sae, sae_b.d_sae)
    null = CorrelationAccumulator(sae_a.d_sae, sae_b.d_sae)
    rng = np.random.default_rng(seed)
    for x in chunks:
        fa, fb = _codes(sae_a, x), _codes(sae_b, x)
        acc.update(fa, fb)
        null.update(fa, fb[torch.from_numpy(random_derangement(len(x), rng))])
    match = hungarian_matches(np.nan_to_num(acc.correlation(), nan=0.0))
    chance = hungarian_matches(np.nan_to_num(null.correlation(), nan=0.0))
    cos = decoder_cosine(sae_a.W_dec.detach().double(), sae_b.W_dec.detach().double())
    return {
        "fraction_with_partner_hungarian": match.fraction_with_partner(threshold),
        "mean_matched_corr_hungarian": float(match.score.mean()),
        "null_fraction_with_partner_hungarian": chance.fraction_with_partner(threshold),
        "null_mean_matched_corr_hungarian": float(chance.score.mean()),
        "mean_decoder_cosine_hungarian": float(cos[match.a_index, match.b_index].mean()),
        "n_rows": float(acc.n_tokens),
        "threshold": float(threshold),
    }


def seed_report(saes: Mapping[str, Any], configs: Mapping[str, Mapping[str, Any]],
                flat: Mapping[str, Mapping[str, float]], heldout_chunks,
                threshold: float = 0.5) -> dict[str, dict[str, Any]]:  # fmt: skip
    """For each seed group of one hook: the headline summary, every seed pair's overlap
    and the overlap's `mean_sd_interval` over pairs. `heldout_chunks()` returns a fresh
    iterable of row chunks (float32 tensors) each time it is called."""
    out = {}
    for first, names in seed_groups(configs).items():
        pairs = {f"{a}~{b}": seed_overlap(saes[a], saes[b], heldout_chunks(), threshold=threshold)
                 for a, b in itertools.combinations(names, 2)}  # fmt: skip
        keys = ("fraction_with_partner_hungarian", "null_fraction_with_partner_hungarian",
                "mean_matched_corr_hungarian", "mean_decoder_cosine_hungarian")  # fmt: skip
        out[first] = {
            "seeds": list(names),
            "metrics": seed_summary(flat, names),
            "overlap_pairs": pairs,
            "overlap": {k: mean_sd_interval([p[k] for p in pairs.values()]) for k in keys},
        }
    return out
