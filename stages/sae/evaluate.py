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
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from stages.compute import CPU, Device, on_device
from stages.sae import concepts as C
from stages.sae import metrics as M
from stages.sae.base import BaseSAE
from stages.sae.concepts import ConceptContext
from stages.sae.data import SourceLike, as_source, iter_rows, source_name

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


# k-sparse probing holds the held-out rows' codes in memory: at most this many numbers
# (512 MB in float32; the default run's 35 k rows x 1024 latents are 36 M). A wider SAE is
# probed on the first MAX_CODE_ELEMENTS // d_sae rows.
MAX_CODE_ELEMENTS = 2**27


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


def _flat(sae: BaseSAE, act: Tensor, where: str) -> Tensor:
    """The spliced positions (all but BOS) of a hook activation as rows [n, d_in]."""
    x = act[:, 1:]
    flat = x.reshape(-1, sae.d_in) if x.ndim > 3 else x.reshape(-1, x.shape[-1])
    _check_width(sae, flat.shape[-1], where)
    return flat


def _replace(kind: str, act: Tensor, x_hat: Tensor | None, sae: BaseSAE,
             gen: torch.Generator | None, baseline: tuple[Tensor, Tensor] | None,
             where: str) -> Tensor:  # fmt: skip
    """`act` with its non-BOS positions replaced by `kind`'s reconstruction; `x_hat`: the
    SAE's reconstruction of those rows when already computed (it is the same for the SAE,
    its rescaled version and every random draw)."""
    flat = _flat(sae, act, where)
    if kind == "zero":
        new = torch.zeros_like(flat)
    elif kind in ("mean", "pca"):
        assert baseline is not None
        mu, basis = (t.to(flat.device, flat.dtype) for t in baseline)
        new = mu.expand_as(flat) if kind == "mean" else (flat - mu) @ basis.T @ basis + mu
    else:
        if x_hat is None:
            x_hat = sae.decode(sae.encode(flat.float())).to(flat.dtype)
        if kind == "sae":
            new = x_hat
        elif kind == "rescaled":  # x̂ with the norm of x (Gurnee's norm control)
            new = x_hat * (flat.norm(dim=-1, keepdim=True)
                           / x_hat.norm(dim=-1, keepdim=True).clamp_min(1e-12))  # fmt: skip
        else:  # random direction, same per-token norm as the SAE error
            err_norm = (x_hat - flat).norm(dim=-1, keepdim=True)
            u = torch.randn(flat.shape, generator=gen, dtype=torch.float32)  # CPU stream
            u = u.to(flat.device, flat.dtype)
            new = flat + u / u.norm(dim=-1, keepdim=True) * err_norm
    act = act.clone()
    act[:, 1:] = new.reshape(act[:, 1:].shape)
    return act


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
    random_draws: int = 16,
    random_windows: int | None = 16,
    token_counts: np.ndarray | None = None,
) -> dict[str, Any]:
    """CE loss recovered, KL(clean ‖ SAE) and Gurnee's random-perturbation null over
    `random_draws` draws on the first `random_windows` windows (None: all); with `baseline` = (mean [d], orthonormal principal directions
    [r, d]) of the hook's activations, also mean-ablation and the rank-r PCA
    reconstruction (`pca_baseline`). `token_counts` [vocab]: training unigram counts, for
    the KL gap by token frequency and the unigram entropy (saturation flag of CE
    recovered); without them the eval tokens' own counts are used."""
    with on_device(model, device), on_device(sae, device):
        return _downstream(model, sae, hook_name, tokens.to(device.torch), batch_size, seed,
                           baseline, random_draws, token_counts, random_windows)  # fmt: skip


def pca_baseline(source: SourceLike, rank: int, max_rows: int = 65536) -> tuple[Tensor, Tensor]:
    """(mean, top-`rank` principal directions as orthonormal rows) of up to `max_rows`
    rows of `source`: the dense reconstruction an SAE with L0 = rank is compared with."""
    rows = torch.cat([b.double() for b in iter_rows(as_source(source, "pca_baseline"),
                                                    4096, max_rows=max_rows)])  # fmt: skip
    mu = rows.mean(0)
    _, _, vt = torch.linalg.svd(rows - mu, full_matrices=False)
    rank = max(1, min(rank, vt.shape[0]))
    return mu.float(), vt[:rank].float()


def _tail_layer(model: HookedTransformer, hook_name: str) -> int | None:
    """The block after a residual-stream hook `blocks.L.hook_resid_post`: a splice there
    needs only the rest of the model (`start_at_layer`), not a full forward."""
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_post", hook_name)
    return int(m.group(1)) + 1 if m and int(m.group(1)) < model.cfg.n_layers else None


def _downstream(model: HookedTransformer, sae: BaseSAE, hook_name: str, tokens: Tensor,
                batch_size: int, seed: int, baseline: tuple[Tensor, Tensor] | None = None,
                random_draws: int = 16, token_counts: np.ndarray | None = None,
                random_windows: int | None = None) -> dict[str, Any]:  # fmt: skip
    if tokens.ndim != 2 or tokens.shape[1] < 3:
        raise ValueError(f"tokens: expected LongTensor [n, seq ≥ 3], got {tuple(tokens.shape)}")
    if hook_name not in model.hook_dict:
        raise KeyError(
            f"hook '{hook_name}' is not a hook of the model (e.g. blocks.0.hook_resid_post)"
        )
    if random_draws < 1:
        raise ValueError(f"saes.eval.random_draws = {random_draws}, expected an integer ≥ 1")
    sae.eval()
    gen = torch.Generator().manual_seed(seed)
    kinds = ["sae", "zero", "rescaled"] + (["mean", "pca"] if baseline is not None else [])
    n_rand = tokens.shape[0] if random_windows is None else min(random_windows, tokens.shape[0])
    tail = _tail_layer(model, hook_name)
    per: dict[str, list[Tensor]] = {}  # per-prediction values [n_windows, seq - 2]
    draw_kl = torch.zeros(random_draws, dtype=torch.float64)

    def put(key: str, v: Tensor) -> None:
        per.setdefault(key, []).append(v.double().cpu())

    for s in range(0, tokens.shape[0], batch_size):
        tok = tokens[s : s + batch_size]
        target = tok[:, 2:]
        logits, cache = model.run_with_cache(tok, names_filter=[hook_name], stop_at_layer=tail)
        act = cache[hook_name]
        clean = (logits if tail is None else model(act, start_at_layer=tail))[:, 1:-1]
        lp_clean = torch.log_softmax(clean.double(), dim=-1)
        p_clean = lp_clean.exp()
        lp_clean32, p_clean32 = lp_clean.float(), p_clean.float()
        ce_clean = -lp_clean.gather(-1, target[..., None]).squeeze(-1)
        put("ce_clean", ce_clean)
        put("token", tok[:, 1:-1])
        where = f"hook '{hook_name}'"
        flat = _flat(sae, act, where)
        x_hat = sae.decode(sae.encode(flat.float())).to(flat.dtype)  # once for every kind
        kl_rand = torch.zeros_like(ce_clean)
        d = 0
        draws = max(0, min(len(tok), n_rand - s))  # the windows of this batch with the null
        for kind in kinds + ["random"] * (random_draws if draws else 0):
            new = _replace(kind, act, x_hat, sae, gen, baseline, where)
            if tail is None:
                logits = model.run_with_hooks(tok, return_type="logits",
                                              fwd_hooks=[(hook_name, lambda a, hook, new=new: new)])  # fmt: skip
            else:
                logits = model(new, start_at_layer=tail, return_type="logits")
            if kind == "random":  # the null's draws in float32: their spread is far larger
                lp = torch.log_softmax(logits[:draws, 1:-1].float(), dim=-1)
                kl = (p_clean32[:draws] * (lp_clean32[:draws] - lp)).sum(-1).double()
                kl_rand[:draws] += kl / random_draws
                draw_kl[d] += float(kl.sum())
                d += 1
                continue
            lp = torch.log_softmax(logits[:, 1:-1].double(), dim=-1)
            kl = (p_clean * (lp_clean - lp)).sum(-1)
            put(f"kl_{kind}", kl)
            put(f"ce_{kind}", -lp.gather(-1, target[..., None]).squeeze(-1))
        if draws:
            put("kl_random", kl_rand[:draws])
    v = {k: torch.cat(t) for k, t in per.items()}  # [n_windows, seq - 2] each
    n = v["ce_clean"].numel()
    out: dict[str, Any] = {k: float(t.mean()) for k, t in v.items()
                           if k.startswith(("ce_", "kl_"))}  # fmt: skip
    out["ce_loss_recovered"] = M.ce_loss_recovered(out["ce_clean"], out["ce_sae"], out["ce_zero"])
    # the null is drawn on the first windows only: compare on those (paired)
    kl_sae_paired = float(v["kl_sae"][: len(v["kl_random"])].mean())
    out["kl_sae_paired"] = kl_sae_paired
    out["random_to_sae_kl_ratio"] = (
        out["kl_random"] / kl_sae_paired if kl_sae_paired > 0 else math.nan
    )
    out["ce_delta_sae"] = out["ce_sae"] - out["ce_clean"]
    out.update(_gurnee(v, draw_kl / v["kl_random"].numel(), token_counts, seed))
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


def _gurnee(v: dict[str, Tensor], draw_kl: Tensor, token_counts: np.ndarray | None,
            seed: int, n_boot: int = 1000, n_bins: int = 5) -> dict[str, Any]:  # fmt: skip
    """Gurnee (2024), "SAE reconstruction errors are (empirically) pathological": the
    random-perturbation KL over draws (mean, sd, range), the SAE / random KL ratio with a
    bootstrap 95 % interval over windows (paired: the same windows for both), the same
    intervals for ΔCE and KL (Gao et al. 2024), the norm-rescaled SAE (x̂·‖x‖/‖x̂‖), the
    KL gap by frequency of the current token, and whether CE recovered is saturated
    (CE of the zero-ablated model above the unigram entropy)."""
    out: dict[str, Any] = {
        "random_draws": len(draw_kl),
        "kl_random_sd_draws": float(draw_kl.std()) if len(draw_kl) > 1 else 0.0,
        "kl_random_min_draw": float(draw_kl.min()),
        "kl_random_max_draw": float(draw_kl.max()),
    }
    win = {k: t.mean(1) for k, t in v.items() if k != "token"}  # per-window means
    n_win, n_rand = len(win["kl_sae"]), len(win["kl_random"])
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n_win, (n_boot, n_win), generator=g)
    idx_r = torch.randint(0, n_rand, (n_boot, n_rand), generator=g)
    q = torch.tensor([0.025, 0.975], dtype=torch.float64)

    def interval(stat: Tensor) -> tuple[float, float]:
        stat = stat[torch.isfinite(stat)]
        if len(stat) == 0:
            return math.nan, math.nan
        lo, hi = torch.quantile(stat, q)
        return float(lo), float(hi)

    m = {k: t[idx].mean(1) for k, t in win.items() if k != "kl_random"}  # [n_boot] each
    kl_s, kl_r = win["kl_sae"][:n_rand], win["kl_random"]  # paired: the null's windows
    out["random_windows"] = n_rand
    out["sae_to_random_kl_ratio"] = (
        float(kl_s.mean() / kl_r.mean()) if float(kl_r.mean()) > 0 else math.nan
    )
    out["sae_to_random_kl_ratio_lo"], out["sae_to_random_kl_ratio_hi"] = interval(
        kl_s[idx_r].mean(1) / kl_r[idx_r].mean(1)
    )
    out["kl_sae_lo"], out["kl_sae_hi"] = interval(m["kl_sae"])
    out["ce_delta_sae_lo"], out["ce_delta_sae_hi"] = interval(m["ce_sae"] - m["ce_clean"])
    out["ce_delta_sae_rescaled"] = float((v["ce_rescaled"] - v["ce_clean"]).mean())
    kl_sae, kl_resc = float(v["kl_sae"].mean()), float(v["kl_rescaled"].mean())
    out["kl_sae_rescaled"] = kl_resc
    out["rescaled_to_sae_kl_ratio"] = kl_resc / kl_sae if kl_sae > 0 else math.nan
    # frequency of the current token (the position whose residual was replaced last)
    tok = v["token"][:n_rand].long().flatten()
    counts = (torch.as_tensor(np.asarray(token_counts), dtype=torch.float64)
              if token_counts is not None else torch.bincount(tok).double())  # fmt: skip
    if token_counts is not None and len(counts) > 0:
        p = counts / counts.sum()
        out["unigram_entropy"] = float(-(p[p > 0] * p[p > 0].log()).sum())
        out["ce_loss_recovered_saturated"] = float(v["ce_zero"].mean()) > out["unigram_entropy"]
    freq = counts[tok.clamp_max(len(counts) - 1)]  # over the null's windows
    ks, kr = v["kl_sae"][:n_rand].flatten(), v["kl_random"].flatten()
    order = torch.argsort(freq, stable=True)
    bins = []
    for chunk in torch.tensor_split(order, n_bins):
        if len(chunk) == 0:
            continue
        a, b = float(ks[chunk].mean()), float(kr[chunk].mean())
        bins.append({"count_lo": float(freq[chunk].min()), "count_hi": float(freq[chunk].max()),
                     "n": len(chunk), "kl_sae": a, "kl_random": b, "gap": a - b,
                     "ratio": a / b if b > 0 else math.nan})  # fmt: skip
    out["kl_gap_by_token_frequency"] = bins
    out["kl_gap_freq_spearman"] = _spearman(freq.log(), ks - kr)
    if bins:
        out["sae_to_random_kl_ratio_rare"] = bins[0]["ratio"]
        out["sae_to_random_kl_ratio_common"] = bins[-1]["ratio"]
    return out


def _spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation (mid-ranks for ties)."""

    def ranks(x: Tensor) -> Tensor:
        _, inv, cnt = torch.unique(x, return_inverse=True, return_counts=True)
        ends = torch.cumsum(cnt, 0).double()
        return (ends - (cnt.double() - 1) / 2)[inv]

    ra, rb = ranks(a.double()), ranks(b.double())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / den if den > 0 else math.nan


@torch.no_grad()
def evaluate_ground_truth(
    sae: BaseSAE,
    source: SourceLike,
    labels: Tensor | np.ndarray,
    concept_names: Sequence[str],
    *,
    context: ConceptContext | None = None,
    batch_size: int = 4096,
    device: Device = CPU,
) -> dict[str, Any]:
    """Best single latent per concept by F1 (fires = act > 0), with its precision, recall
    and AUROC on all rows; labels [n_rows, n_concepts]. With a `context` (the rows'
    document ids, token ids, hierarchy) also the SAEBench-style scores of
    `stages/sae/concepts.py` under "sparse_probing": k-sparse probing beside a dense probe
    and the lexical lookup, absorption on the planted hierarchy, precision / recall per
    concept. The context computes the hook's baselines once for all its SAEs."""
    source = as_source(source, "evaluate_ground_truth: source")
    lab = torch.as_tensor(np.asarray(labels)).bool()
    if lab.ndim != 2 or lab.shape[0] != source.n_rows or lab.shape[1] != len(concept_names):
        raise ValueError(
            f"concept labels: shape {tuple(lab.shape)}, expected [{source.n_rows} rows of "
            f"'{source_name(source)}', {len(concept_names)} concepts]"
        )
    _check_width(sae, source.d_in, f"activation array '{source_name(source)}'")
    sae.eval()
    dev = device.torch
    n = source.n_rows
    # the SAEBench-style scores need the codes in memory: of at most MAX_CODE_ELEMENTS
    keep = min(n, MAX_CODE_ELEMENTS // sae.d_sae) if context is not None else 0
    xs, fs = [], []
    tp = torch.zeros(lab.shape[1], sae.d_sae, dtype=torch.float64)
    fires = torch.zeros(sae.d_sae, dtype=torch.float64)
    with on_device(sae, device):
        row = 0
        for x in iter_rows(source, batch_size):
            f = sae.encode(x.to(dev)).float().cpu()
            fired = (f > 0).float()
            tp += (lab[row : row + len(x)].float().T @ fired).double()
            fires += fired.sum(0).double()
            if row < keep:
                xs.append(x[: keep - row].float())
                fs.append(f[: keep - row])
            row += len(x)
        pos = lab.sum(0).double()
        f1 = M.binary_f1_counts(tp, fires[None, :] - tp, pos[:, None] - tp)
        best_f1, best = f1.max(dim=1)
        if keep == n:
            scores = torch.cat(fs)[:, best].double()
        else:  # second pass: the activations of each concept's best latent, for AUROC
            scores = torch.empty(n, lab.shape[1], dtype=torch.float64)
            row = 0
            for x in iter_rows(source, batch_size):
                scores[row : row + len(x)] = sae.encode(x.to(dev))[:, best.to(dev)].double().cpu()
                row += len(x)
    concepts = {}
    for j, name in enumerate(concept_names):
        t, fl = float(tp[j, best[j]]), float(fires[best[j]])
        concepts[str(name)] = {
            "best_latent": int(best[j]),
            "f1": float(best_f1[j]),
            "precision": t / fl if fl > 0 else 0.0,
            "recall": t / float(pos[j]) if pos[j] > 0 else 0.0,
            "auroc": M.auroc(scores[:, j], lab[:, j]),
            "n_positive": int(pos[j]),
        }
    with_pos = [v["f1"] for v in concepts.values() if v["n_positive"] > 0]
    out = {
        "concepts": concepts,
        "mean_best_f1": float(np.mean(with_pos)) if with_pos else math.nan,
    }
    if context is not None and keep > 0:
        x_all, acts = torch.cat(xs), torch.cat(fs)
        base = context.baselines_for(x_all, lab[:keep].numpy(), list(concept_names))
        if base.names:
            probes = C.ksparse_probing(acts, base)
            w_dec, b_dec = sae.W_dec.detach().float().cpu(), sae.b_dec.detach().float().cpu()
            absorb = C.absorption(acts, x_all, w_dec, b_dec, base, probes)
            out["sparse_probing"] = C.summarise(base, probes, absorb, concepts, context.kinds)
    return out


def evaluate_sae(
    sae: BaseSAE,
    eval_source: SourceLike,
    *,
    model: HookedTransformer | None = None,
    hook_name: str | None = None,
    tokens: Tensor | None = None,
    labels: Tensor | np.ndarray | None = None,
    concept_names: Sequence[str] | None = None,
    context: ConceptContext | None = None,
    token_counts: np.ndarray | None = None,
    random_draws: int = 16,
    random_windows: int | None = 16,
    batch_size: int = 4096,
    max_rows: int | None = None,
    seed: int = 0,
    device: Device = CPU,
) -> EvalResult:
    """Everything that applies: reconstruction always; downstream when model, hook_name
    and tokens are given (`token_counts`: training unigram counts for the KL-gap-vs-
    frequency table and the saturation flag; `random_draws` on `random_windows` windows for
    Gurnee's null); ground
    truth when labels and concept_names are given (with `context`, the SAEBench-style
    scores too).

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
            model,
            sae,
            hook_name,
            tokens,
            seed=seed,
            device=device,
            baseline=baseline,
            random_draws=random_draws,
            random_windows=random_windows,
            token_counts=token_counts,
        )
    if labels is not None:
        if concept_names is None:
            raise ValueError("evaluate_sae: labels given without concept_names")
        metrics["ground_truth"] = evaluate_ground_truth(
            sae,
            eval_source,
            labels,
            concept_names,
            context=context,
            batch_size=batch_size,
            device=device,
        )
    return EvalResult(metrics, log_density)
