"""BatchTopK SAE (Bussmann et al. 2024, "BatchTopK Sparse Autoencoders").

Training keeps the B·k largest ReLU pre-activations of the whole batch (so L0 = k on
average, varying per token), with AuxK for dead latents as in TopK. Inference cannot
depend on the batch, so it uses one threshold θ: f = pre · 1[pre > θ], which is exactly
SAELens' JumpReLU, so the folder is written with `architecture: jumprelu` and a
per-latent `threshold` (as SAELens does for BatchTopK).

Where θ comes from, and where this differs from the references: Bussmann et al. and
dictionary_learning keep an exponential moving average of the smallest activation kept
per batch (dictionary_learning from step 1000 on, β = 0.999; SAELens likewise). We keep
that average during training too (`threshold_momentum`), but on a short run it still
remembers the first batches, whose activations are several times larger: on the default
world (244 steps) it ended at θ = 0.57, which gave L0 10.2 instead of 16 at inference and
left 57 % of the latents silent on held-out rows, while every latent fired in training.
So once training ends, `calibrate` sets θ to the quantity the average estimates, measured
on the final weights: the (n·k)-th largest ReLU pre-activation of n training rows, so
that the mean L0 on those rows is exactly k. The moving average is kept in the metadata
(`calibration.ema_threshold`) for comparison.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

from stages.sae.base import BaseSAE, SAEOutput
from stages.sae.config import BatchTopKConfig, SAEConfig
from stages.sae.jumprelu import threshold_from_log
from stages.sae.topk import auxk_loss


class BatchTopKSAE(BaseSAE):
    architecture = "batchtopk"
    config_class = BatchTopKConfig
    saelens_architecture = "jumprelu"  # its inference is a JumpReLU with one threshold
    reads_saelens_by_default = False  # a jumprelu folder is ours when its metadata says so
    plot_style = ("#ff7f0e", "s")
    cfg: BatchTopKConfig
    threshold: Tensor

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        # one value shared by all latents, stored per latent for the JumpReLU format
        self.register_buffer("threshold", torch.zeros(self.d_sae))

    def encode(self, x: Tensor) -> Tensor:
        pre = self.pre_acts(x)
        return pre.relu() * (pre > self.threshold)

    def forward(
        self, x: Tensor, sparsity_scale: float = 1.0, dead_mask: Tensor | None = None
    ) -> SAEOutput:
        cfg = self.cfg
        x_c = self.sae_in(x)
        pre = x_c @ self.W_enc + self.b_enc
        acts = pre.relu()
        n_keep = min(acts.numel(), max(1, round(cfg.k * x.shape[0])))
        top_vals, top_idx = acts.flatten().topk(n_keep, sorted=False)
        f = torch.zeros_like(acts).flatten().scatter(0, top_idx, top_vals).view_as(acts)
        if self.training:
            with torch.no_grad():
                kept = top_vals[top_vals > 0]
                if kept.numel():
                    m = cfg.threshold_momentum
                    first = bool((self.threshold == 0).all())
                    new = kept.min() if first else (1 - m) * self.threshold + m * kept.min()
                    self.threshold.copy_(new.expand_as(self.threshold))
        x_hat = f @ self.W_dec + self.b_dec
        terms = {"mse": self.mse(x_hat, x)}
        aux = auxk_loss(
            self, x_c, pre, (x - x_hat).detach(), dead_mask, cfg.k_aux,
            cfg.auxk_coefficient, sparse=False,
        )  # fmt: skip
        if aux is not None:
            terms["auxk"] = aux
        return self.dense_output(x, x_hat, f, terms)

    @torch.no_grad()
    def calibrate(self, x: Tensor) -> dict[str, Any]:
        """θ = the (n·k)-th largest ReLU pre-activation of the n raw rows `x`: mean L0 = k."""
        acts = self.pre_acts(x.to(self.W_enc.dtype)).relu().flatten()
        n_keep = min(acts.numel(), max(1, round(self.cfg.k * x.shape[0])))
        theta = acts.topk(n_keep, sorted=False).values.min()
        ema = float(self.threshold[0])
        if theta > 0:
            self.threshold.fill_(float(theta))
        return {"method": "batch quantile on training rows", "rows": int(x.shape[0]),
                "threshold": float(self.threshold[0]), "ema_threshold": ema}  # fmt: skip

    @classmethod
    def from_saelens(
        cls, cfg: dict[str, Any], meta: dict[str, Any], state: dict[str, Tensor], where: str
    ) -> dict[str, Any]:
        threshold_from_log(state)
        if "threshold" in state:
            thr = state["threshold"]
            if not torch.all(thr == thr[0]):
                warnings.warn(f"{where}: batchtopk threshold differs per latent", stacklevel=3)
        return {"k": float(meta.get("training_architecture_details", {}).get("k") or 1.0)}
