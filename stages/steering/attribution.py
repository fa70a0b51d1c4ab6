"""Which SAE latents carry a concept's behaviour: attribution patching, checked against
true ablation.

The SAE is spliced in at a hook *with its error term kept*, x = decode(f(x)) + ε with
ε = x − decode(f(x)) held fixed, so the forward pass is unchanged and a change to one
latent changes only that latent's contribution (Marks et al. 2024, "Sparse Feature
Circuits"). The behaviour metric m is the steering set's log-odds at each eval prompt's
last token (`evaluate.behaviour_metric`), averaged over prompts.

- Attribution patching (Nanda 2023, "Attribution Patching"; Syed, Rager & Conmy 2023,
  "Attribution Patching Outperforms Automated Circuit Discovery"): the first-order
  estimate of zero-ablating latent j at every position but BOS,
  Δm_j ≈ Σ_positions ∂m/∂f_j · (0 − f_j), from one forward and one backward pass.
- True ablation: x ← x − f_j(x) · W_dec[j] at every position but BOS (the same as
  setting f_j = 0 with the error term kept), for a sample of latents, batched with the
  latents as rows; Δm_j = m(ablated) − m(clean).

`attribution_vs_ablation` reports both on the sample (the latents with the largest
|attribution| and as many drawn at random from the other active ones) and their Pearson
and Spearman correlation.

`ablation_side_effects` measures what the same single-latent ablations cost on held-out
text: the rise in next-token cross-entropy (nats per predicted token, ablated − clean)
and KL(clean ‖ ablated) per token, so a latent's effect on the behaviour sits beside its
effect on loss and KL. The top latents by attribution are compared with the random
active ones of the sample (difference of means, bootstrap 95 % interval over latents).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from stages.activations import check_hooks
from stages.logits import ce_full, kl_divergence
from stages.steering.evaluate import behaviour_metric, target_masks
from stages.steering.vectors import pad_right, tokenize

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

    from stages.steering.prompts import SteeringSet


def prompt_batch(model: HookedTransformer, s: SteeringSet) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Right-padded tokens [n, L], lengths [n], target masks [n, V] × 2."""
    pos, neg = target_masks(model, s)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    toks, lens = pad_right(tokenize(model, [e.prompt for e in s.eval_prompts]), pad)
    return toks, lens, pos, neg


def _metric(model, toks: Tensor, lens: Tensor, pos: Tensor, neg: Tensor, hooks) -> Tensor:
    logits = model.run_with_hooks(toks, fwd_hooks=hooks)
    return behaviour_metric(logits[torch.arange(len(toks)), lens - 1], pos, neg)


def latent_attribution(
    model: HookedTransformer, s: SteeringSet, hook: str, sae
) -> tuple[Tensor, Tensor]:
    """(attribution [d_sae], clean latents f [n, L, d_sae] with BOS and padding zeroed):
    attribution_j = mean over prompts of Σ_positions ∂m/∂f_j · (0 − f_j)."""
    check_hooks(model, [hook], "attribution.hook")
    toks, lens, pos, neg = prompt_batch(model, s)
    live = (torch.arange(toks.shape[1])[None] < lens[:, None]) & (torch.arange(toks.shape[1]) > 0)
    held: dict[str, Tensor] = {}

    def splice(act: Tensor, hook) -> Tensor:  # noqa: ARG001
        x = act.detach()
        f = sae.encode(x.float()).detach().requires_grad_(True)
        err = x - sae.decode(f).detach().to(x.dtype)  # kept: the forward is unchanged
        held["f"] = f
        keep = live[..., None].to(x.device)
        return (sae.decode(f).to(x.dtype) + err) * keep + x * ~keep

    with torch.enable_grad():
        # the sum: row p of the gradient is then ∂m_p / ∂f_p
        m = _metric(model, toks, lens, pos, neg, [(hook, splice)]).sum()
        (grad,) = torch.autograd.grad(m, held["f"])
    f = held["f"].detach() * live[..., None]
    attr = (grad * (0.0 - f)).sum(1).mean(0)
    return attr.double(), f


@torch.no_grad()
def ablation_effects(
    model: HookedTransformer,
    s: SteeringSet,
    hook: str,
    sae,
    latents: Sequence[int],
    f: Tensor | None = None,
    *,
    scale: float = 0.0,
    batch_size: int = 256,
) -> Tensor:
    """Δm [len(latents)] (mean over prompts) of setting each latent to `scale` × its value
    at every position but BOS, error term kept: x ← x − (1 − scale) f_j(x) W_dec[j].
    Rows of a batch are (latent, prompt) pairs; `f` as from `latent_attribution`."""
    check_hooks(model, [hook], "attribution.hook")
    toks, lens, pos, neg = prompt_batch(model, s)
    n = len(toks)
    if f is None:
        f = latent_attribution(model, s, hook, sae)[1]
    clean = _metric(model, toks, lens, pos, neg, []).double()
    lat = torch.as_tensor(list(latents), dtype=torch.long)
    W = sae.W_dec.detach().float()
    state: dict[str, Tensor] = {}

    def ablate(act: Tensor, hook) -> Tensor:  # noqa: ARG001
        fj = f[state["p"], : act.shape[1], :].gather(
            2, state["j"][:, None, None].expand(-1, act.shape[1], 1))  # [B, L, 1]  # fmt: skip
        return act - ((1.0 - scale) * fj * W[state["j"]][:, None, :]).to(act.device, act.dtype)

    out = torch.zeros(len(lat), dtype=torch.float64)
    rows = len(lat) * n
    for r0 in range(0, rows, batch_size):
        r = torch.arange(r0, min(r0 + batch_size, rows))
        li, p = r // n, r % n
        state["j"], state["p"] = lat[li], p
        m = _metric(model, toks[p], lens[p], pos[p], neg[p], [(hook, ablate)]).double()
        out.index_add_(0, li, m - clean[p])
    return out / n


def attribution_vs_ablation(
    model: HookedTransformer,
    s: SteeringSet,
    hook: str,
    sae,
    n_top: int = 16,
    n_random: int = 16,
    seed: int = 0,
) -> dict[str, Any]:
    """Attribution of every latent, true ablation of a sample (the `n_top` largest
    |attribution| and `n_random` others drawn from the latents active on the prompts),
    and their Pearson and Spearman correlation over the sample."""
    attr, f = latent_attribution(model, s, hook, sae)
    active = torch.nonzero(f.abs().amax((0, 1)) > 0).flatten()
    order = active[torch.argsort(attr[active].abs(), descending=True)]
    top = order[:n_top].tolist()
    rest = order[n_top:].tolist()
    rng = np.random.default_rng(seed)
    extra = sorted(rng.choice(rest, size=min(n_random, len(rest)), replace=False).tolist()) \
        if rest else []  # fmt: skip
    sample = [int(j) for j in top + extra]
    abl = ablation_effects(model, s, hook, sae, sample, f)
    a, b = attr[sample].numpy(), abl.numpy()
    ok = len(sample) >= 3 and np.std(a) > 0 and np.std(b) > 0
    return {
        "hook": hook, "n_active": int(len(active)), "latents": sample,
        "attribution": a.tolist(), "ablation": b.tolist(),
        "pearson": float(stats.pearsonr(a, b)[0]) if ok else float("nan"),
        "spearman": float(stats.spearmanr(a, b)[0]) if ok else float("nan"),
        "sample": f"top {len(top)} by |attribution| + {len(extra)} random active latents",
        "method": "attribution patching (Nanda 2023; Syed et al. 2023), zero-ablation of one "
                  "latent at every position but BOS with the SAE error term kept (Marks et al. "
                  "2024); metric = mean log-odds over eval prompts",
    }  # fmt: skip


@torch.inference_mode()
def ablation_side_effects(
    model: HookedTransformer,
    hook: str,
    sae,
    latents: Sequence[int],
    tokens: Tensor,
    *,
    n_top: int | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Per latent, zero-ablated at every position but BOS of held-out `tokens` [n, L] with
    the SAE error term kept (x ← x − f_j(x) W_dec[j]): `delta_ce` = mean next-token
    cross-entropy ablated − clean (nats per predicted token) and `kl` = mean
    KL(clean ‖ ablated) per predicted token. With `n_top` (the first n_top latents are
    the top by attribution, the rest random active ones, as `attribution_vs_ablation`
    orders its sample): top − random difference of the means with a bootstrap 95 %
    interval over latents."""
    check_hooks(model, [hook], "attribution.hook")
    toks = tokens.long()
    clean, cache = model.run_with_cache(toks, names_filter=[hook])
    f = sae.encode(cache[hook].float())
    f[:, 0] = 0  # BOS is never edited
    W = sae.W_dec.detach().float()
    tgt = toks[:, 1:]
    clean = clean[:, :-1]
    ce_clean = ce_full(clean, tgt).mean()
    dce, kl = [], []
    for j in (int(j) for j in latents):
        delta = f[..., j : j + 1] * W[j]

        def ablate(act: Tensor, hook, delta=delta) -> Tensor:  # noqa: ARG001
            return act - delta.to(act.device, act.dtype)

        lg = model.run_with_hooks(toks, fwd_hooks=[(hook, ablate)])[:, :-1]
        dce.append(float(ce_full(lg, tgt).mean() - ce_clean))
        kl.append(float(kl_divergence(clean, lg).mean()))
    out: dict[str, Any] = {"latents": [int(j) for j in latents], "delta_ce": dce, "kl": kl,
                           "n_tokens": int(tgt.numel()),
                           "method": "zero-ablation of one latent at every position but BOS, "
                                     "SAE error term kept, on held-out windows"}  # fmt: skip
    if n_top is not None and 0 < n_top < len(dce):
        rng = np.random.default_rng([seed, 3])
        for key, vals in (("delta_ce", np.asarray(dce)), ("kl", np.asarray(kl))):
            top, rest = vals[:n_top], vals[n_top:]
            boot = [rng.choice(top, len(top)).mean() - rng.choice(rest, len(rest)).mean()
                    for _ in range(n_boot)]  # fmt: skip
            out[f"{key}_top_mean"], out[f"{key}_random_mean"] = (
                float(top.mean()),
                float(rest.mean()),
            )
            out[f"{key}_top_minus_random"] = float(top.mean() - rest.mean())
            out[f"{key}_top_minus_random_ci95"] = [float(np.percentile(boot, 2.5)),
                                                   float(np.percentile(boot, 97.5))]  # fmt: skip
    return out
