"""Sparsity calibration: bring an L1-family SAE (relu, gated, jumprelu) to a target L0.

Their L0 is set indirectly, by a penalty coefficient λ (`l1_coefficient`,
`l0_coefficient`), so comparing them with TopK at matched sparsity needs λ found per
target. Two parts, both in log λ (L0 falls roughly as a power of λ):

1. `search_coefficient` — short calibration runs, each a fresh SAE trained for
   `calibration_steps` at one λ, bracket the target and narrow the bracket
   (interpolation in log L0 against log λ, safeguarded bisection: each new λ lies in the
   middle 80 % of the bracket). It stops when a run lands within `calibration_tolerance`
   or after `calibration_runs` runs, and returns the λ whose run came closest.
2. `L0Controller` — short runs overstate L0 (an L1 SAE keeps pruning latents long after
   a quarter of its training: on the toy model's last residual stream a relu SAE at λ = 5
   has L0 149 after 24 steps, 66 after 60 and 38 after 244), so the full run keeps L0 on
   target by dual ascent on the constraint L0 = target (a Lagrange multiplier updated
   by the constraint's violation, as in GECO: Rezende & Viola 2018, "Taming VAEs"):
   log λ ← log λ + η · log(L0_batch / target) after each step, until the learning rate
   starts to decay; λ is then held, so the last `lr_decay_fraction` of training is
   ordinary training at one fixed λ.

Neither changes a relu or gated SAE's loss: the trainer multiplies the coefficient by
`L0Controller.multiplier` through the `sparsity_scale` every SAE's forward already takes.
JumpReLU with a target keeps the published λ‖f‖₀ (Rajamanoharan et al. 2024b) under the
same controller, but its straight-through gradient reaches the pre-activations as well
as θ, and θ learns faster (`JumpReLUSAE.init_for_target_l0` says why, with the trace);
once L0's first fast fall is over (`L0Controller.fall_over`) the trainer lets the SAE
move itself onto the target once (`BaseSAE.retarget_l0`: JumpReLU's thresholds go to the
target's per-latent quantile, λ stays), because after that fall its L0 answers λ by only
~0.6 % a step (`JumpReLUSAE.retarget_l0` has the trace). A gated SAE does the same with
its gate biases, in both directions, and λ moves to λ · L0 / target: a gate that closed
while L0 overshot downwards gets no gradient to reopen (`GatedSAE.retarget_l0`).
Where this differs from the references: dictionary_learning's JumpReLU trainer holds L0
with the penalty λ(L0 / target − 1)² at a fixed λ, and it, SAELens' training JumpReLU
and the paper pass the step function's gradient to θ only (θ started at 0.001 with a
0.001 bandwidth, for runs far longer than ours), and none of them moves θ other than by
its gradient. Our first version used that penalty with θ started at the target's
quantile at step 0; L0 ended at 2 for 16.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def search_coefficient(
    measure: Callable[[float], float],
    start: float,
    target: float,
    *,
    tolerance: float = 0.05,
    max_runs: int = 8,
    first_step: float = 4.0,
) -> dict[str, Any]:
    """λ with `measure(λ)` (the L0 a calibration run reaches) closest to `target`.

    `measure` must fall as λ grows. Without a bracket yet, each run moves λ by the
    log-log slope of the last two runs (−1 before there are two), by at most a factor
    `first_step`² and at least `first_step`^(1/2); inside a bracket, by interpolation
    in log-log, kept in the bracket's middle 80 %. Returns {"coefficient", "l0",
    "runs": [{"coefficient", "l0"}, ...], "converged"}.
    """
    if not (start > 0 and target > 0):
        raise ValueError(f"search_coefficient: start = {start}, target = {target}, expected > 0")

    def err(l0: float) -> float:  # log(L0 / target); an L0 of 0 counts as 0.01
        return math.log(max(l0, 1e-2) / target)

    runs: list[dict[str, float]] = []
    lam = start
    for _ in range(max_runs):
        l0 = float(measure(lam))
        runs.append({"coefficient": lam, "l0": l0})
        if abs(l0 / target - 1) <= tolerance:
            break
        lam = _next_coefficient(runs, err, first_step)
    best = min(runs, key=lambda r: abs(err(r["l0"])))
    return {
        "coefficient": best["coefficient"],
        "l0": best["l0"],
        "runs": runs,
        "converged": abs(best["l0"] / target - 1) <= tolerance,
    }


def _next_coefficient(
    runs: list[dict[str, float]], err: Callable[[float], float], first_step: float
) -> float:
    pts = [(math.log(r["coefficient"]), err(r["l0"])) for r in runs]
    above = [p for p in pts if p[1] > 0]  # L0 too high: λ must grow
    below = [p for p in pts if p[1] < 0]
    if above and below:  # a bracket: the largest λ still above, the smallest below
        lo = max(above, key=lambda p: p[0])
        hi = min(below, key=lambda p: p[0])
        if hi[0] > lo[0]:
            x = lo[0] + lo[1] * (hi[0] - lo[0]) / (lo[1] - hi[1])  # log-log regula falsi
            w = hi[0] - lo[0]
            return math.exp(min(max(x, lo[0] + 0.1 * w), hi[0] - 0.1 * w))
    x0, e0 = pts[-1]
    slope = -1.0
    if len(pts) >= 2 and pts[-1][0] != pts[-2][0]:
        s = (pts[-1][1] - pts[-2][1]) / (pts[-1][0] - pts[-2][0])
        if s < -1e-3:  # only a falling L0 says how far to go
            slope = s
    step = -e0 / slope  # in log λ
    lim_hi, lim_lo = 2 * math.log(first_step), 0.5 * math.log(first_step)
    step = math.copysign(min(max(abs(step), lim_lo), lim_hi), step)
    return math.exp(x0 + step)


# per `SAEConfig.l0_control`: the controller's settings for that mode
CONTROL_MODES: dict[str, dict[str, Any]] = {
    "trend": {},
    # the path already holds the slow fall, so a short horizon. λ may move ×1.06 a step
    # during the first fast fall (2 τ = 10 % of the run; λ rose ×1.8 in 16 steps on
    # toy-a), ×1.02 after it: at ×1.06 throughout, on synthetic data whose L0 answers λ
    # steeply, L0 swung between 12 and 372 every ~50 steps and ended at 9.75 for 32
    "reference": {"mode": "reference", "horizon": 20.0, "fast_log_step": 0.06},
}


@dataclass
class L0Controller:
    """Dual ascent of log λ on the constraint L0 = `target` (see the module docstring),
    damped so that it neither winds up nor oscillates.

    `multiplier` = exp(log_multiplier) scales the configured coefficient; `update(step,
    l0)` moves it after a training step while `step < until_step`:

        y  = EMA_β(log L0_batch)                  smoothed log L0 (β = `smoothing`)
        v  = EMA_β(y_t − y_{t−1})                 its trend per step
        e  = y − log target + H · v               the error H steps ahead
                                                  (H = `horizon`, less near the end)
        log λ += clip(`rate` · e, ±`max_log_step`)

    The predicted error is the derivative term of a PID Lagrange multiplier (Stooke,
    Achiam & Abbeel 2020, "Responsive Safety in Reinforcement Learning by PID Lagrangian
    Methods"): λ stops rising once L0 falls fast enough to reach the target within
    `horizon` steps. Without it (the first controller: e = log(L0_batch / target)) a
    gated SAE collapsed on the toy model: its L0 falls at a speed Adam's learning rate
    sets, whatever λ is, so λ kept rising ×1.105 a step for 140 steps (×8·10⁵) while
    L0 came down from 511, passed the target and went to 0.01, every gate shut.

    Mode "reference" (relu's default, `CONTROL_MODES`) steers onto a path instead of the
    target: with u = (t + H) / `until_step` and L0₀ the first batch's L0,

        log r(u) = log target + max(s · (1 − u), log(L0₀ / target) · exp(−u / τ))

    (s = `reference_slope`, τ = `reference_tau`), and e = y + H · v − log r(u), λ moving
    at most `fast_log_step` a step while u < 2τ, `max_log_step` after; with a
    sparsity warm-up, u counts from its end (`hold_until`), and λ is held until then in
    both modes (L0 answers the warm-up there; integrating it wound λ up ×14 for a 61-step
    warm-up, and L0 ended at 5.7 for 16).

    Why a path: an L1 SAE's L0 at one fixed λ falls fast for the first few % of a run
    and then keeps falling slowly to its end (toy-a, relu at the λ that lands on 16: L0
    77 at 7 % of the run, 26 at 25 %, 17 at the end, log(26 / 17) ≈ 0.4). Steering the
    batch L0 onto the target itself therefore asks for a λ whose L0 would end far below
    it: the "trend" controller raised relu's λ all run (5 → 19.6 for 16; L0 stayed above
    the target until the last 20 steps) and ended at FVU 0.85, where the fixed λ 9.22
    ends at L0 17.4 with FVU 0.38. On the path, λ settles near the fixed λ (9.2) with FVU
    0.43. A gated SAE's L0 answers λ through its gates at once, not by a slow fall: on
    the path its λ fell to 0.02 and FVU rose from 0.018 to 0.74, so gated keeps "trend".
    """

    target: float
    until_step: int
    rate: float = 0.05
    decay_steps: int = 0  # the learning rate's linear decay to 0 over the last steps
    log_multiplier: float = 0.0
    max_log_step: float = 0.02  # at most ×1.02 per step: λ moves no faster than L0 can
    smoothing: float = 0.9  # EMA factor of log L0 and of its trend (~10 steps)
    horizon: float = 60.0  # steps ahead the error is predicted
    # "reference": track the path `reference_log_l0` instead of the target itself
    mode: str = "trend"
    reference_tau: float = 0.05  # the fast first fall's time constant, in runs
    reference_slope: float = 0.4  # log(L0 / target) the path keeps at the start of the run
    start_log_l0: float | None = None  # log L0 at `hold_until` (the path's start)
    hold_until: int = 0  # λ held before this step (the sparsity warm-up); the path starts here
    fast_log_step: float = 0.02  # mode "reference": the cap while the path's fast fall lasts
    ema_log_l0: float | None = None
    ema_trend: float = 0.0
    fell: bool = False  # the smoothed L0 has fallen faster than `settled_trend` a step
    settled_trend: float = 0.01  # a fall slower than this (in log L0 a step) has ended
    trace: list[list[float]] = field(default_factory=list)  # [step, multiplier] samples

    @property
    def multiplier(self) -> float:
        return math.exp(self.log_multiplier)

    def update(self, step: int, l0: float) -> None:
        if step >= self.until_step or not math.isfinite(l0):
            return
        y = math.log(max(l0, 1e-2))
        b = self.smoothing
        if self.start_log_l0 is None and step >= self.hold_until:
            self.start_log_l0 = y
        if self.ema_log_l0 is None:
            self.ema_log_l0 = y
        else:
            prev = self.ema_log_l0
            self.ema_log_l0 = b * prev + (1 - b) * y
            self.ema_trend = b * self.ema_trend + (1 - b) * (self.ema_log_l0 - prev)
        self.fell = self.fell or self.ema_trend < -self.settled_trend
        if step < self.hold_until:  # L0 answers the warm-up here, not λ: no wind-up
            return
        h = self._horizon(step)
        err = self.ema_log_l0 + h * self.ema_trend - self.reference_log_l0(step + h)
        delta = self.rate * err
        cap = self.fast_log_step if self._in_fast_fall(step) else self.max_log_step
        self.log_multiplier += max(-cap, min(cap, delta))

    def _in_fast_fall(self, step: int) -> bool:
        """Mode "reference", within 2 τ of the path's start: λ may move `fast_log_step`."""
        u = (step - self.hold_until) / max(1, self.until_step - self.hold_until)
        return self.mode == "reference" and u < 2 * self.reference_tau

    def reference_log_l0(self, step: float) -> float:
        """log of the L0 the controller steers to at `step`: the target (mode "trend"),
        or the reference path (mode "reference", see the class docstring)."""
        lt = math.log(self.target)
        if self.mode != "reference" or self.start_log_l0 is None:
            return lt
        u = (step - self.hold_until) / max(1, self.until_step - self.hold_until)
        fall = max(0.0, self.start_log_l0 - lt) * math.exp(-u / self.reference_tau)
        return lt + max(self.reference_slope * max(0.0, 1.0 - u), fall)

    @property
    def fall_over(self) -> bool:
        """The L0's first fast fall (from the dense start of training) has ended: the
        smoothed L0 fell by more than `settled_trend` a step and now falls slower."""
        return self.fell and self.ema_trend > -self.settled_trend

    def restart_at(self, l0: float, coefficient_ratio: float) -> None:
        """After the SAE moved itself (`BaseSAE.retarget_l0`): L0 is now `l0`, with no
        trend, and λ is multiplied by `coefficient_ratio`."""
        self.ema_log_l0 = math.log(max(l0, 1e-2))
        self.ema_trend = 0.0
        self.log_multiplier += math.log(coefficient_ratio)

    def _horizon(self, step: int) -> float:
        """`horizon`, or less where less learning is left: the steps at full learning
        rate until `until_step` (the learning rate decays linearly to 0 over the last
        `decay_steps`, which count half), so a trend the decay will stop is not waited on."""
        start = self.until_step - self.decay_steps
        left = max(0, start - step) + max(0, self.until_step - max(step, start)) ** 2 / max(
            1, 2 * self.decay_steps
        )
        return min(self.horizon, left)

    def state(self) -> dict[str, float | None]:
        return {
            "log_multiplier": self.log_multiplier,
            "ema_log_l0": self.ema_log_l0,
            "ema_trend": self.ema_trend,
            "fell": self.fell,
            "start_log_l0": self.start_log_l0,
        }

    def load(self, state: dict[str, float | None]) -> None:
        self.log_multiplier = float(state["log_multiplier"])  # type: ignore[arg-type]
        e = state.get("ema_log_l0")
        self.ema_log_l0 = None if e is None else float(e)
        self.ema_trend = float(state.get("ema_trend") or 0.0)
        self.fell = bool(state.get("fell", False))
        s0 = state.get("start_log_l0")
        self.start_log_l0 = None if s0 is None else float(s0)


__all__ = ["CONTROL_MODES", "L0Controller", "search_coefficient"]
