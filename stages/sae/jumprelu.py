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
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from stages.sae.base import BaseSAE, SAEOutput
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


class JumpReLUSAE(BaseSAE):
    architecture = "jumprelu"
    config_class = JumpReLUConfig
    saelens_architecture = "jumprelu"
    plot_style = ("#d62728", "D")
    loss_targets_l0 = True  # with a target_l0 its loss holds L0 there itself (see forward)
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
        pre = self.pre_acts(x)
        f = JumpReLUFn.apply(pre, self.threshold, cfg.bandwidth)
        x_hat = f @ self.W_dec + self.b_dec
        l0 = StepFn.apply(pre, self.threshold, cfg.bandwidth).sum(-1).mean()
        if cfg.target_l0 is None:
            penalty = l0
        else:  # dictionary_learning's JumpReLU trainer: pulls L0 to the target from both sides
            penalty = (l0 / cfg.target_l0 - 1).pow(2)
        terms = {
            "mse": self.mse(x_hat, x),
            "l0_penalty": cfg.l0_coefficient * sparsity_scale * penalty,
        }
        return self.dense_output(x, x_hat, f, terms)

    @torch.no_grad()
    def init_for_target_l0(self, x: Tensor, target_l0: float) -> None:
        """θ (one value for every latent) at the quantile of the initial pre-activations
        that lets `target_l0` latents fire per row. Adam moves θ by about `lr` per step,
        so from the paper's small θ a short run cannot reach a low L0 at any λ (on the
        toy model, 244 steps at lr 1e-3 leave L0 above 100 for λ from 0.05 to 0.8)."""
        pre = self.pre_acts(x[:4096]).flatten()
        q = 1.0 - min(max(target_l0 / self.d_sae, 0.0), 1.0)
        theta = torch.quantile(pre.double()[: 2**24], q).float().clamp_min(1e-6)
        self.threshold.fill_(float(theta))

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
