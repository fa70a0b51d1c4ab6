"""TopK SAE with AuxK (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

f = ReLU(TopK_k(W_encᵀ(x − b_dec) + b_enc)), x̂ = W_decᵀ f + b_dec, unit-norm decoder rows.
Loss = ‖x − x̂‖² + auxk_coefficient · ‖e − ê‖², where e = x − x̂ (detached) and ê is the
reconstruction of e from the top-`k_aux` *dead* latents only: the AuxK term gives dead
latents a gradient so they come back. As in SAELens, the AuxK term is scaled down by
n_dead / k_aux while fewer than k_aux latents are dead.

The hot loop never materialises the dense [B, d_sae] code (see `sparse_ops.py`);
`use_sparse_kernels=False` runs the plain dense-autograd version of the same maths.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor

from stages.sae.base import BaseSAE, SAEOutput
from stages.sae.config import TopKConfig
from stages.sae.sparse_ops import Code, decode, encode_at, fixed_rows, topk_sorted


def auxk_loss(
    sae: BaseSAE,
    x_c: Tensor,
    pre: Tensor,
    residual: Tensor,
    dead_mask: Tensor | None,
    k_aux_cfg: int | None,
    coefficient: float,
    sparse: bool,
) -> Tensor | None:
    """AuxK term: reconstruct the (detached) residual from the top dead latents."""
    if dead_mask is None or coefficient == 0:
        return None
    dead_ids = dead_mask.nonzero().squeeze(1)
    n_dead = int(dead_ids.numel())
    if n_dead == 0:
        return None
    k_aux_full = k_aux_cfg or max(1, sae.d_in // 2)
    k_aux = min(k_aux_full, n_dead)
    scale = min(n_dead / k_aux_full, 1.0)
    with torch.no_grad():
        aux_vals, aux_j = topk_sorted(pre.detach().index_select(1, dead_ids), k_aux)
        aux_idx = dead_ids[aux_j]
        aux_idx, order = aux_idx.sort(dim=-1)
        aux_vals = aux_vals.gather(-1, order)
    if sparse:  # picked in bf16: encode_at takes the exact values
        code = Code(*fixed_rows(aux_idx), aux_vals.reshape(-1), {})
        vals = encode_at(x_c, sae.W_enc, sae.b_enc, code).relu()
        e_hat = decode(code, vals, sae.W_dec)
    else:
        vals = pre.gather(-1, aux_idx).relu()
        f_aux = torch.zeros_like(pre).scatter(-1, aux_idx, vals)
        e_hat = f_aux @ sae.W_dec
    return coefficient * scale * (e_hat - residual).pow(2).sum(-1).mean()


class TopKSAE(BaseSAE):
    architecture = "topk"
    config_class = TopKConfig
    saelens_architecture = "topk"
    plot_style = ("#1f77b4", "o")
    dashboard_default = True  # the report's default dashboards: the smallest k per hook
    cfg: TopKConfig

    def encode(self, x: Tensor) -> Tensor:
        pre = self.pre_acts(x)
        vals, idx = pre.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre).scatter(-1, idx, vals.relu())

    def forward(
        self, x: Tensor, sparsity_scale: float = 1.0, dead_mask: Tensor | None = None
    ) -> SAEOutput:
        cfg = self.cfg
        x_c = self.sae_in(x)
        # the sparse kernels are CPU kernels; on a GPU the dense GEMMs are the fast path
        sparse = cfg.use_sparse_kernels and x.device.type == "cpu"
        if sparse:
            with torch.no_grad():
                # under bf16 autocast this GEMM only picks the k latents; their values,
                # the decode, the AuxK term and every gradient stay float32
                pre = torch.addmm(self.b_enc, x_c, self.W_enc)
                vals, idx = topk_sorted(pre, cfg.k)
                code = Code(*fixed_rows(idx), vals.reshape(-1), {})
        with torch.autocast(x.device.type, enabled=False) if sparse else contextlib.nullcontext():
            if sparse:
                vals = encode_at(x_c, self.W_enc, self.b_enc, code).relu()  # float32 values
                x_hat = decode(code, vals, self.W_dec) + self.b_dec
                vals = vals.view_as(idx)
            else:
                pre = x_c @ self.W_enc + self.b_enc
                top, idx = pre.topk(cfg.k, dim=-1, sorted=False)
                vals = top.relu()
                x_hat = torch.zeros_like(pre).scatter(-1, idx, vals) @ self.W_dec + self.b_dec
            terms = {"mse": self.mse(x_hat, x)}
            aux = auxk_loss(
                self, x_c, pre, (x - x_hat).detach(), dead_mask, cfg.k_aux,
                cfg.auxk_coefficient, sparse,
            )  # fmt: skip
        if aux is not None:
            terms["auxk"] = aux
        with torch.no_grad():
            active = vals > 0
            counts = torch.bincount(idx[active], minlength=self.d_sae)
            l0 = active.sum(-1).float().mean()
        loss = terms["mse"] + terms["auxk"] if "auxk" in terms else terms["mse"]
        return SAEOutput(x_hat, loss, terms, counts, l0)

    def saelens_config(self) -> dict[str, Any]:
        return {"k": self.cfg.k, "rescale_acts_by_decoder_norm": False}

    @classmethod
    def from_saelens(
        cls, cfg: dict[str, Any], meta: dict[str, Any], state: dict[str, Tensor], where: str
    ) -> dict[str, Any]:
        if bool(cfg.get("rescale_acts_by_decoder_norm", False)):
            # topk over pre·‖W_dec‖, decode with W_dec/‖W_dec‖: fold the norms in
            norms = state["W_dec"].norm(dim=1).clamp_min(1e-8)
            state["W_enc"] = state["W_enc"] * norms
            state["b_enc"] = state["b_enc"] * norms
            state["W_dec"] = state["W_dec"] / norms[:, None]
        return {"k": int(cfg.get("k", 0))}
