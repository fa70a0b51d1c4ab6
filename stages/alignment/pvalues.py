"""p-values that resolve: the floor of an empirical p, a normal tail beyond it, Holm.

An empirical (Monte Carlo) p-value from n random draws of the null is
p = (1 + #{null ≥ observed}) / (1 + n) (Phipson & Smyth 2010): it is never 0, and it
cannot go below its *floor* 1/(1 + n). With 100 permutations every strong effect reads
0.0099 and nothing separates a CKA of 0.3 from one of 0.99. Two additions make the
numbers informative without more permutations:

- `normal_tail`: the observed statistic as a z-score against the null draws' mean and
  standard deviation, and the upper normal tail p = 1 − Φ(z) — the "normal approximation
  of the permutation null". It is a parametric tail fitted to the null draws, in the
  spirit of Knijnenburg et al. (2009, "Fewer permutations, more accurate P-values",
  Bioinformatics 25(12), which fit a generalised Pareto tail instead). It resolves far
  below the floor, but it is only as good as the normal shape of the null: a skewed or
  discrete null (mutual kNN on few samples) makes it anti-conservative in the far tail.
  So it is reported *beside* the exact empirical p, never instead of it, and labelled.
- `holm`: the Holm (1979) step-down adjustment over a family of tests, which controls
  the family-wise error rate under any dependence between the tests (the similarity
  measures of one model pair are strongly dependent). Sorted raw p₍₁₎ ≤ … ≤ p₍ₘ₎:
  adjusted p₍ᵢ₎ = min(1, max_{j ≤ i} (m − j + 1) p₍ⱼ₎).

A family of m tests, each at the floor 1/(1 + n), cannot reach a Holm-adjusted p below
m/(1 + n): 28 tests at 100 permutations read 0.28 however strong the effects. Two more
pieces let the number of permutations follow the effect instead:

- `sequential_p`: Besag & Clifford (1991, "Sequential Monte Carlo p-values", Biometrika
  78(2)): draw null values until h of them reach the statistic, or a cap n is reached.
  Stopped at h after L draws, p = h / L; otherwise, with g < h exceedances in n draws,
  p = (g + 1)/(n + 1). It is a valid p-value (P(p ≤ α) ≤ α under the null) and a weak
  effect stops after about h / p draws, so the cap is paid only where the effect is
  strong.
- `holm_caps`: caps fixed before any data is seen, such that a family of m strong effects
  still resolves at a chosen level α after Holm's correction: the test in position j of
  a fixed order (j from 1) may draw up to ⌈(m − j + 1)/α⌉ − 1. When every test is at its
  floor, the floors sort in that order and the adjusted p₍ⱼ₎ = max_{i ≤ j} (m − i + 1)/
  ⌈(m − i + 1)/α⌉ ≤ α. Putting the measures that are cheap per permutation first gives
  them the large caps; the expensive ones at the end need only a few hundred.

Pure numpy + math: no torch, so every stage's report code can import it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

HOLM = "Holm (1979) step-down, family-wise error rate"
SEQUENTIAL = (
    "Besag & Clifford (1991) sequential permutations: each test stops once `stop_after` "
    "permuted pairings reach its statistic (p = stop_after / draws), or at a cap planned "
    "so that a family of strong effects still reaches a Holm-adjusted p <= family_alpha "
    "(p = (1 + exceedances) / (1 + cap))"
)
# The normal tail needs an sd it can trust: with n draws the sd's relative standard error
# is about 1/sqrt(2(n-1)) (13 % at 30), and a far-tail p moves by orders of magnitude with
# it. Below this many draws the tail is not reported (NaN); z still is.
MIN_NORMAL_DRAWS = 30


def p_floor(n_draws: int) -> float:
    """The smallest empirical p that n draws of the null can give: 1 / (1 + n)."""
    if n_draws < 0:
        raise ValueError(f"n_draws = {n_draws}, expected an integer >= 0")
    return 1.0 / (1.0 + n_draws)


def empirical_p(observed: float, null: Sequence[float] | np.ndarray, *, rtol: float = 0.0) -> float:
    """One-sided (1 + #{null ≥ observed}) / (1 + n) (Phipson & Smyth 2010). `rtol`: a
    null draw within rtol·max(1, |observed|) below `observed` counts as ≥ (rounding)."""
    x = np.asarray(null, dtype=np.float64)
    exceed = int(np.sum(x >= observed - rtol * max(1.0, abs(observed))))
    return (1 + exceed) / (1 + x.size)


def normal_tail(observed: float, null: Sequence[float] | np.ndarray) -> tuple[float, float]:
    """(z, p): z = (observed − mean(null)) / sd(null) (sd with ddof 1) and the upper tail
    p = 1 − Φ(z) = erfc(z / √2) / 2 of the normal approximation of the null.

    NaN for both with fewer than 2 draws or a constant null (no spread to scale by); p is
    NaN with fewer than `MIN_NORMAL_DRAWS` draws (too few to trust a fitted tail)."""
    x = np.asarray(null, dtype=np.float64)
    if x.size < 2:
        return float("nan"), float("nan")
    sd = float(x.std(ddof=1))
    if not sd > 0.0 or not math.isfinite(observed):
        return float("nan"), float("nan")
    z = (float(observed) - float(x.mean())) / sd
    if x.size < MIN_NORMAL_DRAWS:
        return z, float("nan")
    return z, 0.5 * math.erfc(z / math.sqrt(2.0))


def sequential_p(exceedances: int, draws: int, stop_after: int) -> float:
    """Besag & Clifford (1991) sequential Monte Carlo p-value: h / L when the draws
    stopped at `stop_after` = h exceedances after L = `draws` draws, else
    (exceedances + 1) / (draws + 1) (the cap was reached first)."""
    if stop_after < 1:
        raise ValueError(f"stop_after = {stop_after}, expected an integer >= 1")
    if not 0 <= exceedances <= draws:
        raise ValueError(f"exceedances = {exceedances}, draws = {draws}: expected 0 <= "
                         "exceedances <= draws")  # fmt: skip
    if exceedances >= stop_after:
        return stop_after / draws
    return (exceedances + 1) / (draws + 1)


def holm_caps(m: int, alpha: float, at_least: int = 0) -> list[int]:
    """Permutation caps for a Holm family of m tests in a fixed order: the j-th (j from 1)
    gets max(at_least, ⌈(m − j + 1)/α⌉ − 1), so that m tests all at their floors reach a
    Holm-adjusted p ≤ α (module docstring)."""
    if m < 0:
        raise ValueError(f"m = {m}, expected an integer >= 0")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha = {alpha}, expected 0 < alpha < 1")
    # the 1e-9 keeps a ratio such as 28 / 0.01 = 2800.0000000000005 at 2800
    return [max(at_least, math.ceil((m - j + 1) / alpha - 1e-9) - 1) for j in range(1, m + 1)]


def holm(p_values: Sequence[float] | np.ndarray) -> np.ndarray:
    """Holm-adjusted p-values, in the input order. NaN entries are not tests: they stay
    NaN and do not count in the family size m."""
    p = np.asarray(p_values, dtype=np.float64)
    if p.ndim != 1:
        raise ValueError(f"p_values has shape {p.shape}: expected a 1-D list of p-values")
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(~np.isnan(p))
    if ok.size == 0:
        return out
    if np.any((p[ok] < 0) | (p[ok] > 1)):
        raise ValueError(f"p_values: expected values in [0, 1], got {p[ok].tolist()}")
    m = ok.size
    order = ok[np.argsort(p[ok], kind="stable")]
    stepped = (m - np.arange(m)) * p[order]  # (m − j + 1) p₍ⱼ₎, j from 1
    out[order] = np.minimum(1.0, np.maximum.accumulate(stepped))
    return out


def holm_dict(p_values: Mapping[str, float]) -> dict[str, float]:
    """`holm` over a named family {test: p}: {test: adjusted p} (NaN stays NaN)."""
    keys = list(p_values)
    adjusted = holm([float(p_values[k]) for k in keys])
    return {k: float(v) for k, v in zip(keys, adjusted, strict=True)}
