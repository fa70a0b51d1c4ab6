"""Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated
Sparse Autoencoders").

Two paths share W_enc (SAELens names: W_enc, b_gate, r_mag, b_mag):
  π_gate = (x − b_dec) W_enc + b_gate          which latents are on:  H(π_gate)
  π_mag  = (x − b_dec) (W_enc ⊙ exp(r_mag)) + b_mag    how much:     ReLU(π_mag)
  f = H(π_gate) ⊙ ReLU(π_mag), x̂ = f W_dec + b_dec, unit-norm decoder rows.
Loss = ‖x − x̂‖² + λ‖ReLU(π_gate)‖₁ + ‖x − x̂_frozen(ReLU(π_gate))‖², where the auxiliary
reconstruction uses a stop-gradient copy of the decoder (the paper's frozen decoder), so
it trains the gate without pulling the dictionary.

On a CPU, a batch on which few gates open trains through the sparse kernels
(`sparse_ops.py`): a closed gate passes no gradient to any term, and at an open gate
π_mag = exp(r_mag) ⊙ (π_gate − b_gate) + b_mag, so the code of open gates carries both
paths.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from stages.sae import sparse_ops
from stages.sae.base import BaseSAE, SAEOutput, share_cutoffs
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
        return self.pre_acts(x), self._magnitudes(x)

    def _magnitudes(self, x: Tensor) -> Tensor:
        """π_mag."""
        return self.sae_in(x) @ (self.W_enc * self.r_mag.exp()) + self.b_mag

    def encode(self, x: Tensor) -> Tensor:
        pi_gate, pi_mag = self._paths(x)
        return (pi_gate > 0).to(pi_mag.dtype) * pi_mag.relu()

    def forward(
        self, x: Tensor, sparsity_scale: float = 1.0, dead_mask: Tensor | None = None
    ) -> SAEOutput:
        pi_gate = self.fused_pre_acts(x, self.b_gate)
        if (code := self.sparse_code(pi_gate)) is not None:
            return self._sparse_forward(x, code, sparsity_scale)
        pi_mag = self._magnitudes(x)
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

    def _sparse_forward(self, x: Tensor, code: sparse_ops.Code, sparsity_scale: float) -> SAEOutput:
        pi_gate = sparse_ops.encode_at(self.sae_in(x), self.W_enc, self.b_gate, code)
        col = code.col
        with torch.autocast(x.device.type, enabled=False):
            # all gates here are open, unless a bf16 GEMM picked one its float32 value shuts
            gate = pi_gate.relu()
            # index_select, not t[col]: the latter's backward (index_put_ with accumulate)
            # adds in a thread-dependent order on CPU, so training was not reproducible
            r, b_g, b_m = (
                t.index_select(0, col) for t in (self.r_mag.exp(), self.b_gate, self.b_mag)
            )
            pi_mag = r * (pi_gate - b_g) + b_m
            f = (gate.detach() > 0).to(pi_mag.dtype) * pi_mag.relu()
            x_hat = sparse_ops.decode(code, f, self.W_dec) + self.b_dec
            x_hat_gate = sparse_ops.decode(code, gate, self.W_dec.detach()) + self.b_dec.detach()
        terms = {
            "mse": self.mse(x_hat, x),
            "l1": self.cfg.l1_coefficient * sparsity_scale * gate.sum() / x.shape[0],
            "aux": self.mse(x_hat_gate, x),
        }
        return self.sparse_output(x, x_hat, col[f.detach() > 0], terms)

    @torch.no_grad()
    def retarget_l0(self, x: Tensor, target_l0: float, coefficient: float) -> float | None:
        """Gates reopened onto the target when L0's first fast fall has overshot it (the
        trainer calls this once the fall is over), and λ lowered with them.

        A closed gate gets no gradient (H(π_gate) passes none; the L1 and the auxiliary
        loss see only ReLU(π_gate)), so once L0 has fallen past the target the gates do
        not reopen by training, however far the controller lowers λ. Each latent that
        fired on `x` keeps its share of the batch's firings: its gate bias moves so that
        ⌊c_i · target / L0⌋ rows open it (c_i its firings now; all rows when that is
        more), counting only rows where its magnitude path is positive (elsewhere an
        open gate adds nothing to L0). λ is returned as λ · L0 / target, the
        coefficient that L0 ∝ 1/λ (the coefficient search's prior slope) says holds the
        target. Above the target nothing moves: λ closes gates by itself, and moving
        them there too (λ raised the same way) ended at 7.14 for 8 and 14.56 for 16
        (7.87 and 15.25 without).

        Measured on toy-a's last residual stream (1 M tokens, 244 steps, target 32):
        without this, L0 fell from 511 to 20 by step 176 and was back at only 27.4 at
        the end (−14 %). Gates moved at step 182 with λ kept: L0 31.9, then down to 23
        within 16 steps, ending at 27.7 (λ 1.12 was far above what holds 32). With λ ·
        L0 / target (0.71): 30.7 (−4 %), FVU 0.0113 instead of 0.0126; with λ · (L0 /
        target)² (0.45): 33.0 (+3 %).
        """
        pi_gate, pi_mag = self._paths(x)
        can = pi_mag > 0  # rows where an open gate counts at all
        counted = torch.where(can, pi_gate, torch.full_like(pi_gate, -torch.inf))
        c = (counted > 0).sum(0)
        l0 = float(c.sum()) / x.shape[0]
        if not 0 < l0 < target_l0:  # above the target, λ closes gates well enough
            return None
        at, keep = share_cutoffs(counted, c, target_l0 / l0)
        # asked for every row that can count: open just below the lowest of them
        low = torch.where(can, pi_gate, torch.full_like(pi_gate, torch.inf)).amin(0)
        at = torch.where(keep >= can.sum(0), low - 1e-4 * (1 + low.abs()), at)
        move = (c > 0) & torch.isfinite(at)
        self.b_gate.sub_(torch.where(move, at, torch.zeros_like(at)))
        return coefficient * l0 / target_l0
