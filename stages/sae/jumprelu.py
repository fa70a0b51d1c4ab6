"""JumpReLU SAE (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction
Fidelity with JumpReLU Sparse Autoencoders").

f = pre · H(pre − θ) with a learned per-latent threshold θ, unit-norm decoder rows.
Loss = ‖x − x̂‖² + λ · Σ_i H(pre_i − θ_i), i.e. an L0 penalty. H has zero gradient almost
everywhere, so θ gets a straight-through estimate using a rectangle kernel of width
`bandwidth` ε:  ∂/∂θ H(z − θ) ≈ −(1/ε)·K((z − θ)/ε), and ∂/∂θ [z·H(z − θ)] ≈ −(θ/ε)·K(...).
The pre-activations get the ordinary gradient of z·H(z − θ) only (as in the paper).

θ is trained directly rather than as exp(log θ): Adam moves a parameter by ~lr per step,
so a log parameterisation barely moves a small initial threshold (SAELens made the same
change); positivity is kept by clamping after each step.

On a CPU, a batch on which few pre-activations reach θ − ε/2 trains through the sparse
kernels (`sparse_ops.py`): below that, f, the step function and both straight-through
kernels are zero, so nothing there has a gradient. The pre-activation loss acts on every
entry below θ, so a step that applies it trains dense.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from stages.sae import sparse_ops
from stages.sae.base import BaseSAE, SAEOutput, share_cutoffs
from stages.sae.config import JumpReLUConfig, SAEConfig


def _rectangle(u: Tensor) -> Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFn(torch.autograd.Function):
    @staticmethod
    def forward(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        return z * (z > threshold)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        z, threshold, bandwidth = inputs
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        g_z = (z > threshold) * g
        g_t = -(threshold / eps) * _rectangle((z - threshold) / eps) * g
        return g_z, g_t.reshape(-1, threshold.shape[-1]).sum(0), None


class StepFn(torch.autograd.Function):
    @staticmethod
    def forward(z: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:  # type: ignore[override]
        return (z > threshold).to(z.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        z, threshold, bandwidth = inputs
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[None, Tensor, None]:  # type: ignore[override]
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        g_t = -(1.0 / eps) * _rectangle((z - threshold) / eps) * g
        return None, g_t.reshape(-1, threshold.shape[-1]).sum(0), None


class StepFnToPreActs(StepFn):
    """H(z − θ) whose straight-through gradient reaches the pre-activations as well:
    ∂/∂z H(z − θ) ≈ +(1/ε)·K((z − θ)/ε), the mirror of θ's. Used only with a target L0
    (see `JumpReLUSAE.forward`)."""

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, Tensor, None]:  # type: ignore[override]
        z, threshold = ctx.saved_tensors
        eps = ctx.bandwidth
        k = (1.0 / eps) * _rectangle((z - threshold) / eps) * g
        return k, -k.reshape(-1, threshold.shape[-1]).sum(0), None


def pre_act_loss(pre: Tensor, threshold: Tensor, dead: Tensor, W_dec: Tensor) -> Tensor:
    """Anthropic's pre-activation loss for dead latents (Circuits Updates, January 2025;
    as SAELens' `calculate_pre_act_loss`): mean over rows of
    Σ_{i dead} ReLU(θ_i − pre_i) · ‖W_dec,i‖. Its gradient lifts a dead latent's
    pre-activations (through W_enc and b_enc) and lowers its θ until the latent fires
    again, where the L0 penalty's straight-through gradient has nothing to work on."""
    gap = (threshold - pre).relu() * dead.to(pre.dtype)
    return (gap * W_dec.norm(dim=1)).sum(-1).mean()


class JumpReLUSAE(BaseSAE):
    architecture = "jumprelu"
    config_class = JumpReLUConfig
    saelens_architecture = "jumprelu"
    plot_style = ("#d62728", "D")
    cfg: JumpReLUConfig

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        init = getattr(cfg, "threshold_init", 0.0)
        self.threshold = nn.Parameter(torch.full((self.d_sae,), float(init)))

    def encode(self, x: Tensor) -> Tensor:
        pre = self.pre_acts(x)
        return pre.relu() * (pre > self.threshold)

    def forward(
        self, x: Tensor, sparsity_scale: float = 1.0, dead_mask: Tensor | None = None
    ) -> SAEOutput:
        cfg = self.cfg
        # the paper's estimator moves θ only; with a target the penalty's gradient
        # reaches the encoder too (see init_for_target_l0)
        step = StepFn if cfg.target_l0 is None else StepFnToPreActs
        pre_act = cfg.pre_act_coefficient > 0 and dead_mask is not None and bool(dead_mask.any())
        # every entry whose straight-through window (θ ± ε/2) it reaches, and a margin
        window = self.threshold.detach() - 0.5 * cfg.bandwidth * (1 + 1e-3)
        pre = self.fused_pre_acts(x, self.b_enc)
        code = None if pre_act else self.sparse_code(pre, window)
        if code is not None:
            z = sparse_ops.encode_at(self.sae_in(x), self.W_enc, self.b_enc, code)
            th = self.threshold.index_select(0, code.col)  # t[col]'s grad: not reproducible
            with torch.autocast(x.device.type, enabled=False):
                f = JumpReLUFn.apply(z, th, cfg.bandwidth)
                x_hat = sparse_ops.decode(code, f, self.W_dec) + self.b_dec
                penalty = step.apply(z, th, cfg.bandwidth).sum() / x.shape[0]
            fired = code.col[(z > th).detach()]
        else:
            f = JumpReLUFn.apply(pre, self.threshold, cfg.bandwidth)
            x_hat = f @ self.W_dec + self.b_dec
            penalty = step.apply(pre, self.threshold, cfg.bandwidth).sum(-1).mean()
        terms = {
            "mse": self.mse(x_hat, x),
            "l0_penalty": cfg.l0_coefficient * sparsity_scale * penalty,
        }
        if pre_act:
            terms["pre_act"] = cfg.pre_act_coefficient * pre_act_loss(
                pre, self.threshold, dead_mask, self.W_dec
            )
        if code is not None:
            return self.sparse_output(x, x_hat, fired, terms)
        return self.dense_output(x, x_hat, f, terms)

    def lr_scales(self) -> dict[str, float]:
        """With a target L0, θ learns at `lr` · max(1, 4 / (lr · n_steps)): fast enough to
        cross one unit of the normalised pre-activations (their standard deviation at
        initialisation is about 1) in a quarter of the run (see `init_for_target_l0`).
        Without a target, θ learns at `lr` as in the paper."""
        cfg = self.cfg
        if cfg.target_l0 is None:
            return {}
        return {"threshold": max(1.0, 4.0 / (cfg.lr * cfg.n_steps))}

    @torch.no_grad()
    def init_for_target_l0(self, x: Tensor, target_l0: float) -> None:
        """With a target L0, θ keeps `threshold_init` and the L0 controller
        (`stages.sae.calibrate.L0Controller`) sets λ on the published λ‖f‖₀ penalty,
        whose straight-through gradient reaches the pre-activations as well as θ.

        Why (measured on toy-a's last residual stream, target 16): Adam moves θ by at
        most `lr` a step, 0.24 over a 244-step run, while the normalised pre-activations
        have a standard deviation of about 1. Started at the quantile that lets 16 latents
        fire (θ ≈ 2.47), the latents that did fire jumped to ≥ θ through random decoder
        rows, so the reconstruction pushed their pre-activations down: L0 fell from 15.7
        to 2.5 in 30 steps, θ moved by 0.02 (its rectangle kernel of width 0.05 that far
        in the tail saw 0.01 pre-activations per row), and neither dictionary_learning's
        λ(L0/target − 1)² nor a controller on λ could pull L0 back (2.05 held out). With
        the gradient on the pre-activations too, the penalty moves the encoder (64
        weights and a bias per latent) as an L1 penalty moves a ReLU SAE's, so L0
        follows λ within tens of steps. The paper, SAELens and dictionary_learning pass
        the step function's gradient to θ only; with no target we do as they do. The
        target's quantile is taken later instead, once L0's first fall is over
        (`retarget_l0`).
        """

    @torch.no_grad()
    def retarget_l0(self, x: Tensor, target_l0: float, coefficient: float) -> float | None:
        """Thresholds at the target's quantile, measured once the first fast fall of L0
        is over (the trainer calls this then), and λ raised by √(L0 / target).

        Each latent keeps its share of the batch's firings: θ_i rises to the value that
        its ⌊c_i · target / L0⌋-th largest pre-activation on `x` reaches (c_i its count
        of firings; never lowered), so the batch's L0 becomes ≈ target.

        Why (per-step traces on toy-a's last residual stream, 1 M tokens, 244 steps):
        whatever the target and λ, L0 falls from 488 to about 30 in the first ~60 steps
        (the reconstruction alone does it; the quantile of step 0 collapsed instead, see
        `init_for_target_l0`) and after that by only ~0.6 % a step, because the jump opens
        a gap around θ: at L0 12 only 0.1 pre-activations per row lie in ε's window, and
        the penalty's straight-through gradient, to θ and to the encoder, lives only
        there. The controller then raised λ at its ×1.02 cap for 160 steps (×26) and L0
        still ended at 12.1 for 8; with a ×1.05 cap at 10.3, with ε = 0.5 at 10.7.
        Moved here at step ~80, L0 came back up to 16 in 30 steps and ended at 9.5 for 8
        (29.4 for 32: λ cannot pull a stuck L0 back up either). λ set where the published
        loss makes the new θ stationary (λ = θ_i · E[−∂‖x − x̂‖²/∂f_i] over ε's window)
        overshot: L0 fell to 2 and ended at 5.5 for 8, 26.3 for 32 (5.0 and 27.0 with the
        penalty then reaching θ only, as published); θ back at the published `lr` after
        the retarget let L0 drift down to 6.2 for 8. λ left where it was: 9.44 for 8
        (+18 %), 15.83 for 16. λ · L0 / target (L0 ∝ 1/λ, the search's prior): 7.41 and
        14.73 (−7 %, −8 %). λ · √(L0 / target), i.e. L0 ∝ λ⁻² after the fall, which
        those two bracket: 8.40 and 15.23 (+5 %, −5 %).
        Neither the paper, SAELens nor dictionary_learning move θ other than by its
        gradient (θ from 0.001, runs far longer than ours). Closest: Anthropic's
        January 2025 "Dictionary Learning Optimization Techniques" (as reimplemented in
        goodfire-ai/spd, `my_experiments/anthropic_jumprelu_sae.py`; the note itself not
        read here) sets b_enc once at initialisation from each latent's quantile of the
        pre-activations, at a dense starting rate rather than the target, with ε = 2 and
        the straight-through gradient reaching every parameter as ours does.
        """
        pre = self.pre_acts(x)
        th = self.threshold
        fires = pre > th
        l0 = float(fires.sum(-1).float().mean())
        if not l0 > target_l0:
            return None
        at, _ = share_cutoffs(pre, fires.sum(0), target_l0 / l0)
        th.copy_(torch.maximum(th, at.clamp_min(1e-6)))
        return coefficient * math.sqrt(l0 / target_l0)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        super().after_optimizer_step()
        self.threshold.clamp_(min=1e-6)

    @classmethod
    def from_saelens(
        cls, cfg: dict[str, Any], meta: dict[str, Any], state: dict[str, Tensor], where: str
    ) -> dict[str, Any]:
        threshold_from_log(state)
        return {}


def threshold_from_log(state: dict[str, Tensor]) -> None:
    """SAELens JumpReLU folders may store `log_threshold` instead of `threshold`."""
    if "threshold" not in state and "log_threshold" in state:
        state["threshold"] = state.pop("log_threshold").exp()
