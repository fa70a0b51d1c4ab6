"""ReLU SAE with the L1 penalty weighted by decoder norm (Anthropic, "Circuits Updates —
April 2024", the training recipe update).

f = ReLU(W_encᵀ x + b_enc) (the input is not centred by b_dec), x̂ = W_decᵀ f + b_dec.
Loss = ‖x − x̂‖² + λ Σ_i f_i ‖W_dec,i‖. The decoder is *not* constrained to unit norm:
weighting the penalty by the row norm removes the incentive to shrink f and grow W_dec.
Decoder rows start as random directions of norm `decoder_init_norm` (0.1 in the update),
W_enc = W_decᵀ, b_enc = 0. λ is warmed up linearly (`sparsity_warmup_steps`, the update
uses the first 5 % of training) and the learning rate decays over the last 20 %.

On a CPU, a batch on which few latents fire trains through the sparse kernels
(`sparse_ops.py`): off the active set ReLU's derivative and the L1 term's are zero, so
the gradients are the dense ones, summed in another order.
"""

from __future__ import annotations

import torch
from torch import Tensor

from stages.sae import sparse_ops
from stages.sae.base import BaseSAE, SAEOutput
from stages.sae.config import ReLUConfig


class ReLUSAE(BaseSAE):
    architecture = "relu"
    config_class = ReLUConfig
    saelens_architecture = "standard"
    plot_style = ("#2ca02c", "^")
    unit_norm_decoder = False
    default_apply_b_dec_to_input = False
    cfg: ReLUConfig

    def decoder_init_norm(self) -> float:
        return self.cfg.decoder_init_norm

    def encode(self, x: Tensor) -> Tensor:
        return self.pre_acts(x).relu()

    def forward(
        self, x: Tensor, sparsity_scale: float = 1.0, dead_mask: Tensor | None = None
    ) -> SAEOutput:
        pre = self.fused_pre_acts(x, self.b_enc)
        if (code := self.sparse_code(pre)) is not None:
            return self._sparse_forward(x, code, sparsity_scale)
        f = pre.relu()
        x_hat = f @ self.W_dec + self.b_dec
        weighted = (f * self.W_dec.norm(dim=1)).sum(-1).mean()
        terms = {
            "mse": self.mse(x_hat, x),
            "l1": self.cfg.l1_coefficient * sparsity_scale * weighted,
        }
        return self.dense_output(x, x_hat, f, terms)

    def _sparse_forward(self, x: Tensor, code: sparse_ops.Code, sparsity_scale: float) -> SAEOutput:
        x_c = self.sae_in(x)
        # > 0 but where a bf16 GEMM picked an entry its float32 value is not
        f = sparse_ops.encode_at(x_c, self.W_enc, self.b_enc, code).relu()
        with torch.autocast(x.device.type, enabled=False):
            x_hat = sparse_ops.decode(code, f, self.W_dec) + self.b_dec
            norms = self.W_dec.norm(dim=1).index_select(0, code.col)  # t[col]: see gated.py
            weighted = (f * norms).sum() / x.shape[0]
        terms = {
            "mse": self.mse(x_hat, x),
            "l1": self.cfg.l1_coefficient * sparsity_scale * weighted,
        }
        return self.sparse_output(x, x_hat, code.col[f.detach() > 0], terms)
