"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated
Sparse Autoencoders").

Two paths share W_enc (SAELens names: W_enc, b_gate, r_mag, b_mag):
  π_gate = (x − b_dec) W_enc + b_gate          which latents are on:  H(π_gate)
  π_mag  = (x − b_dec) (W_enc ⊙ exp(r_mag)) + b_mag    how much:     ReLU(π_mag)
  f = H(π_gate) ⊙ ReLU(π_mag), x̂ = f W_dec + b_dec, unit-norm decoder rows.
Loss = ‖x − x̂‖² + λ‖ReLU(π_gate)‖₁ + ‖x − x̂_frozen(ReLU(π_gate))‖², where the auxiliary
reconstruction uses a stop-gradient copy of the decoder (the paper's frozen decoder), so
it trains the gate without pulling the dictionary.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stages.sae.base import BaseSAE, SAEOutput
from stages.sae.config import GatedConfig, SAEConfig


class GatedSAE(BaseSAE):
    architecture = "gated"
    config_class = GatedConfig
    saelens_architecture = "gated"
    plot_style = ("#9467bd", "v")
    has_b_enc = False
    cfg: GatedConfig

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        self.b_gate = nn.Parameter(torch.zeros(self.d_sae))
        self.r_mag = nn.Parameter(torch.zeros(self.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(self.d_sae))

    def pre_acts(self, x: Tensor) -> Tensor:
        """Gate pre-activations π_gate."""
        return self.sae_in(x) @ self.W_enc + self.b_gate

    def _paths(self, x: Tensor) -> tuple[Tensor, Tensor]:
        x_c = self.sae_in(x)
        pi_gate = x_c @ self.W_enc + self.b_gate
        pi_mag = x_c @ (self.W_enc * self.r_mag.exp()) + self.b_mag
        return pi_gate, pi_mag

    def encode(self, x: Tensor) -> Tensor:
        pi_gate, pi_mag = self._paths(x)
        return (pi_gate > 0).to(pi_mag.dtype) * pi_mag.relu()

    def forward(
        self, x: Tensor, sparsity_scale: float = 1.0, dead_mask: Tensor | None = None
    ) -> SAEOutput:
        pi_gate, pi_mag = self._paths(x)
        f = (pi_gate > 0).to(pi_mag.dtype) * pi_mag.relu()
        x_hat = f @ self.W_dec + self.b_dec
        gate_acts = pi_gate.relu()
        x_hat_gate = gate_acts @ self.W_dec.detach() + self.b_dec.detach()
        terms = {
            "mse": self.mse(x_hat, x),
            "l1": self.cfg.l1_coefficient * sparsity_scale * gate_acts.sum(-1).mean(),
            "aux": self.mse(x_hat_gate, x),
        }
        return self.dense_output(x, x_hat, f, terms)
