"""Evaluate a trained SAE on held-out activations, inside its model, and against
ground-truth concept labels. Formulas live in `metrics.py`; this file only streams data.

- `evaluate_reconstruction(sae, source)`: MSE, FVU / explained variance, cosine, L0, L1,
  dead / dense fractions, shrinkage, log10 feature-density histogram.
- `evaluate_downstream(model, sae, hook_name, tokens)`: the SAE spliced into the
  HookedTransformer at `hook_name` at every non-BOS position: CE loss recovered against
  zero-ablation, KL(clean ‖ spliced) per token, and Gurnee's pathology check (KL from a
  random perturbation of the same per-token norm as the SAE error, as a ratio to the
  SAE's KL). CE and KL are averaged over next-token predictions made at positions
  1..seq−2 (the prediction at BOS is untouched by the splice, so it is left out).
  Zero-ablating a residual stream can cost more than the unigram entropy, so CE
  recovered against it saturates near 1 for every SAE; beside it sit the rise in CE in
  nats (`ce_delta_sae`, Gao et al. 2024, "Scaling and evaluating sparse autoencoders"),
  CE recovered against mean-ablation, and a dense baseline with as many numbers per token
  as the SAE's L0: the held-out activations projected on their top-round(L0) principal
  components (`ce_delta_pca`, `kl_pca`; `kl_sae_over_pca` < 1 means the SAE beats PCA).
- `evaluate_ground_truth(sae, source, labels, names)`: per concept the best single
  latent by F1 (latent fires = act > 0), its F1 and AUROC; summary mean best-F1.
- `evaluate_sae(...)` runs whichever apply and returns the `metrics.json` content.

A source may be an `ActivationSource` or a bare 2-D numpy array / torch tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from stages.compute import CPU, Device, on_device
from stages.logits import ce_full
from stages.sae import metrics as M
from stages.sae.base import BaseSAE
from stages.sae.data import SourceLike, as_source, iter_rows, source_name

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


@dataclass
class EvalResult:
    metrics: dict[str, Any]  # JSON-serialisable, written as metrics.json
    log10_feature_density: Tensor  # [d_sae], written as sparsity.safetensors


def _check_width(sae: BaseSAE, d: int, what: str) -> None:
    if d != sae.d_in:
        raise ValueError(f"SAE d_in = {sae.d_in}, but {what} has width {d}; they must match")


@torch.no_grad()
def evaluate_reconstruction(
    sae: BaseSAE,
    source: SourceLike,
    *,
    batch_size: int = 4096,
    max_rows: int | None = None,
    device: Device = CPU,
) -> tuple[dict[str, Any], Tensor]:
    """Reconstruction and sparsity metrics over `source` (the held-out split)."""
    source = as_source(source, "evaluate_reconstruction: source")
    _check_width(sae, source.d_in, f"activation array '{source_name(source)}'")
    sae.eval()
    stats = M.ReconstructionStats(sae.d_in, sae.d_sae, device.torch)
    with on_device(sae, device):
        for x in iter_rows(source, batch_size, max_rows):
            x = x.to(device.torch)
            f = sae.encode(x)
            stats.update(x, sae.decode(f), f)
    out: dict[str, Any] = stats.compute()
    dens = stats.density()
    out["log10_feature_density_histogram"] = M.log10_density_histogram(dens)
    return out, M.log10_density(dens)


def _splice_fn(kind: str, sae: BaseSAE, gen: torch.Generator | None = None,
               baseline: tuple[Tensor, Tensor] | None = None):  # fmt: skip
    def hook(act: Tensor, hook: Any) -> Tensor:
        x = act[:, 1:]
        shape = x.shape
        flat = x.reshape(-1, sae.d_in) if x.ndim > 3 else x.reshape(-1, shape[-1])
        _check_width(sae, flat.shape[-1], f"hook '{hook.name}'")
        if kind == "zero":
            new = torch.zeros_like(flat)
        elif kind in ("mean", "pca"):
            assert baseline is not None
            mu, basis = (t.to(flat.device, flat.dtype) for t in baseline)
            new = mu.expand_as(flat) if kind == "mean" else (flat - mu) @ basis.T @ basis + mu
        else:
            x_hat = sae.decode(sae.encode(flat.float())).to(flat.dtype)
            if kind == "sae":
                new = x_hat
            else:  # random direction, same per-token norm as the SAE error
                err_norm = (x_hat - flat).norm(dim=-1, keepdim=True)
                u = torch.randn(flat.shape, generator=gen, dtype=torch.float32)  # CPU stream
                u = u.to(flat.device, flat.dtype)
                new = flat + u / u.norm(dim=-1, keepdim=True) * err_norm
        act = act.clone()
        act[:, 1:] = new.reshape(shape)
        return act

    return hook


@torch.no_grad()
def evaluate_downstream(
    model: HookedTransformer,
    sae: BaseSAE,
    hook_name: str,
    tokens: Tensor,
    *,
    batch_size: int = 8,
    seed: int = 0,
    device: Device = CPU,
    baseline: tuple[Tensor, Tensor] | None = None,
) -> dict[str, float]:
    """CE loss recovered, KL(clean ‖ SAE) and the random-perturbation KL ratio; with
    `baseline` = (mean [d], orthonormal principal directions [r, d]) of the hook's
    activations, also mean-ablation and the rank-r PCA reconstruction (`pca_baseline`)."""
    with on_device(model, device), on_device(sae, device):
        return _downstream(model, sae, hook_name, tokens.to(device.torch), batch_size, seed,
                           baseline)  # fmt: skip


def pca_baseline(source: SourceLike, rank: int, max_rows: int = 65536) -> tuple[Tensor, Tensor]:
    """(mean, top-`rank` principal directions as orthonormal rows) of up to `max_rows`
    rows of `source`: the dense reconstruction an SAE with L0 = rank is compared with."""
    rows = torch.cat([b.double() for b in iter_rows(as_source(source, "pca_baseline"),
                                                    4096, max_rows=max_rows)])  # fmt: skip
    mu = rows.mean(0)
    _, _, vt = torch.linalg.svd(rows - mu, full_matrices=False)
    rank = max(1, min(rank, vt.shape[0]))
    return mu.float(), vt[:rank].float()


def _downstream(model: HookedTransformer, sae: BaseSAE, hook_name: str, tokens: Tensor,
                batch_size: int, seed: int,
                baseline: tuple[Tensor, Tensor] | None = None) -> dict[str, float]:  # fmt: skip
    if tokens.ndim != 2 or tokens.shape[1] < 3:
        raise ValueError(f"tokens: expected LongTensor [n, seq ≥ 3], got {tuple(tokens.shape)}")
    if hook_name not in model.hook_dict:
        raise KeyError(
            f"hook '{hook_name}' is not a hook of the model (e.g. blocks.0.hook_resid_post)"
        )
    sae.eval()
    gen = torch.Generator().manual_seed(seed)
    sums = {"ce_clean": 0.0, "ce_sae": 0.0, "ce_zero": 0.0, "kl_sae": 0.0, "kl_random": 0.0}
    kinds = ("sae", "zero", "random")
    if baseline is not None:
        sums.update({"ce_mean": 0.0, "ce_pca": 0.0, "kl_pca": 0.0})
        kinds += ("mean", "pca")
    n = 0
    for s in range(0, tokens.shape[0], batch_size):
        tok = tokens[s : s + batch_size]
        target = tok[:, 2:]

        clean = model(tok, return_type="logits")[:, 1:-1]
        sums["ce_clean"] += float(ce_full(clean, target).sum())
        for kind in kinds:
            splice = _splice_fn(kind, sae, gen, baseline)
            logits = model.run_with_hooks(tok, return_type="logits",
                                          fwd_hooks=[(hook_name, splice)])[:, 1:-1]  # fmt: skip
            if f"ce_{kind}" in sums:
                sums[f"ce_{kind}"] += float(ce_full(logits, target).sum())
            if f"kl_{kind}" in sums:
                sums[f"kl_{kind}"] += float(M.kl_divergence(clean, logits).sum())
        n += target.numel()
    out = {k: v / n for k, v in sums.items()}
    out["ce_loss_recovered"] = M.ce_loss_recovered(out["ce_clean"], out["ce_sae"], out["ce_zero"])
    out["random_to_sae_kl_ratio"] = (
        out["kl_random"] / out["kl_sae"] if out["kl_sae"] > 0 else math.nan
    )
    out["ce_delta_sae"] = out["ce_sae"] - out["ce_clean"]
    if baseline is not None:
        out["pca_rank"] = int(baseline[1].shape[0])
        out["ce_delta_pca"] = out["ce_pca"] - out["ce_clean"]
        out["ce_loss_recovered_mean_ablation"] = M.ce_loss_recovered(
            out["ce_clean"], out["ce_sae"], out["ce_mean"]
        )
        out["ce_loss_recovered_pca"] = M.ce_loss_recovered(
            out["ce_clean"], out["ce_pca"], out["ce_zero"]
        )
        # at rank >= d the projection is the identity: no baseline left to beat
        full = out["pca_rank"] >= baseline[1].shape[1]
        out["kl_sae_over_pca"] = (out["kl_sae"] / out["kl_pca"]
                                  if out["kl_pca"] > 0 and not full else math.nan)  # fmt: skip
    out["n_predictions"] = n
    return out


@torch.no_grad()
def evaluate_ground_truth(
    sae: BaseSAE,
    source: SourceLike,
    labels: Tensor | np.ndarray,
    concept_names: Sequence[str],
    *,
    batch_size: int = 4096,
    device: Device = CPU,
) -> dict[str, Any]:
    """Best single latent per concept by F1, with its AUROC; labels [n_rows, n_concepts]."""
    source = as_source(source, "evaluate_ground_truth: source")
    lab = torch.as_tensor(np.asarray(labels)).bool()
    if lab.ndim != 2 or lab.shape[0] != source.n_rows or lab.shape[1] != len(concept_names):
        raise ValueError(
            f"concept labels: shape {tuple(lab.shape)}, expected [{source.n_rows} rows of "
            f"'{source_name(source)}', {len(concept_names)} concepts]"
        )
    _check_width(sae, source.d_in, f"activation array '{source_name(source)}'")
    sae.eval()
    c = lab.shape[1]
    dev = device.torch
    tp = torch.zeros(c, sae.d_sae, dtype=torch.float64, device=dev)
    fires = torch.zeros(sae.d_sae, dtype=torch.float64, device=dev)
    scores = torch.empty(source.n_rows, c, dtype=torch.float64)
    with on_device(sae, device):
        row = 0
        for x in iter_rows(source, batch_size):
            fired = (sae.encode(x.to(dev)) > 0).double()
            lb = lab[row : row + len(x)].to(dev).double()
            tp += lb.T @ fired
            fires += fired.sum(0)
            row += len(x)
        tp, fires = tp.cpu(), fires.cpu()
        pos = lab.sum(0).double()
        f1 = M.binary_f1_counts(tp, fires[None, :] - tp, pos[:, None] - tp)
        best_f1, best = f1.max(dim=1)
        # second pass: activations of each concept's best latent, for AUROC
        row = 0
        for x in iter_rows(source, batch_size):
            scores[row : row + len(x)] = sae.encode(x.to(dev))[:, best.to(dev)].double().cpu()
            row += len(x)
    concepts = {}
    for j, name in enumerate(concept_names):
        concepts[str(name)] = {
            "best_latent": int(best[j]),
            "f1": float(best_f1[j]),
            "auroc": M.auroc(scores[:, j], lab[:, j]),
            "n_positive": int(pos[j]),
        }
    with_pos = [v["f1"] for v in concepts.values() if v["n_positive"] > 0]
    return {
        "concepts": concepts,
        "mean_best_f1": float(np.mean(with_pos)) if with_pos else math.nan,
    }


def evaluate_sae(
    sae: BaseSAE,
    eval_source: SourceLike,
    *,
    model: HookedTransformer | None = None,
    hook_name: str | None = None,
    tokens: Tensor | None = None,
    labels: Tensor | np.ndarray | None = None,
    concept_names: Sequence[str] | None = None,
    batch_size: int = 4096,
    max_rows: int | None = None,
    seed: int = 0,
    device: Device = CPU,
) -> EvalResult:
    """Everything that applies: reconstruction always; downstream when model, hook_name
    and tokens are given; ground truth when labels and concept_names are given.

    On `device`, always in float32 whatever its precision: these are the numbers SAEs
    are compared by. `eval_source` may also be a 2-D numpy array or torch tensor."""
    eval_source = as_source(eval_source, "evaluate_sae: eval_source")
    device = Device(device.spec, "fp32")
    metrics, log_density = evaluate_reconstruction(
        sae, eval_source, batch_size=batch_size, max_rows=max_rows, device=device
    )
    if model is not None:
        if hook_name is None or tokens is None:
            raise ValueError("evaluate_sae: with a model, give hook_name and tokens too")
        # the dense baseline: as many numbers per token as the SAE's (rounded) L0
        rank = max(1, round(float(metrics.get("l0", 1.0))))
        baseline = pca_baseline(eval_source, rank, max_rows or 65536)
        metrics["downstream"] = evaluate_downstream(
            model, sae, hook_name, tokens, seed=seed, device=device, baseline=baseline
        )
    if labels is not None:
        if concept_names is None:
            raise ValueError("evaluate_sae: labels given without concept_names")
        metrics["ground_truth"] = evaluate_ground_truth(
            sae, eval_source, labels, concept_names, batch_size=batch_size, device=device
        )
    return EvalResult(metrics, log_density)
