"""Does the vector steer, and what does it break?

- Behaviour metric (per held-out prompt, at its last token):
  `logsumexp(log p[positive targets]) − logsumexp(log p[negative targets])`, the
  log-odds of "some positive target next" against "some negative target next".
- Steerability: the least-squares slope of the mean metric against the multiplier
  over a symmetric range (multiplier 1 = the raw mean-difference vector, see
  `vectors.py`), plus the fraction of prompts whose own slope has the wrong sign.
- Side effects on neutral text (held-out corpus windows): KL(clean ‖ steered) per
  predicted token and the rise in CE loss, at one multiplier; predictions from BOS
  excluded (as in the SAE evaluation).
- Layer sweep: the hook with the highest steerability among those whose KL stays
  within a budget (Arditi et al.); if none does, the lowest-KL hook, flagged.

All forward passes are batched; every (prompt, multiplier) combination is one row of a
right-padded batch, with the multiplier given per row to the steering hook.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from stages.activations import check_hooks
from stages.logits import ce_full, kl_divergence
from stages.steering.apply import Positions, position_mask, steer, steering_hooks
from stages.steering.prompts import SteeringSet, target_ids
from stages.steering.vectors import pad_right, tokenize

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

log = logging.getLogger(__name__)
DEFAULT_MULTIPLIERS = (-8.0, -6.0, -4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0, 6.0, 8.0)


def behaviour_metric(logits: Tensor, pos_mask: Tensor, neg_mask: Tensor) -> Tensor:
    """Log-odds toward the positive targets: logits [B, V], target masks [B, V] or [V].

    The softmax normaliser cancels in the difference, so it is never computed.
    """
    lg = logits.double()
    pos = lg.masked_fill(~pos_mask.bool(), float("-inf")).logsumexp(-1)
    neg = lg.masked_fill(~neg_mask.bool(), float("-inf")).logsumexp(-1)
    return pos - neg


def slope(x: Tensor, y: Tensor) -> Tensor:
    """Least-squares slope of y [..., n] against x [n]."""
    x = x.double()
    xc = x - x.mean()
    return ((y.double() - y.double().mean(-1, keepdim=True)) * xc).sum(-1) / (xc * xc).sum()


# (set name, shared first tokens) already warned about: every steerability / metric_grid
# call rebuilds the masks (a run_concept call does so for each hook and vector), and the
# warning says the same thing each time.
_WARNED_SHARED: set[tuple[str, tuple[int, ...]]] = set()


def _target_pair(model, s: SteeringSet, ep, pw: list[str], nw: list[str]):
    """Positive and negative target ids without the first tokens they share, and those."""
    pi = target_ids(model.tokenizer, pw, s.target_prefix)
    ni = target_ids(model.tokenizer, nw, s.target_prefix)
    shared = set(pi) & set(ni)
    if shared:  # a small vocabulary splits words; a shared first token says nothing
        pi, ni = [t for t in pi if t not in shared], [t for t in ni if t not in shared]
    if not pi or not ni:
        raise ValueError(f"steering set '{s.name}': eval prompt {ep.prompt!r}: positive "
                         "and negative targets have no distinct first tokens")  # fmt: skip
    return pi, ni, shared


def target_masks(model: HookedTransformer, s: SteeringSet) -> tuple[Tensor, Tensor]:
    """Bool [n_eval, V] masks of each eval prompt's positive and negative target tokens."""
    if not s.eval_prompts:
        raise ValueError(f"steering set '{s.name}': no eval prompts; expected lines of kind "
                         "'eval' (or generated held-out prompts)")  # fmt: skip
    v = model.cfg.d_vocab
    pos = torch.zeros(len(s.eval_prompts), v, dtype=torch.bool)
    neg = torch.zeros_like(pos)
    cache: dict[tuple, tuple[list[int], list[int], set[int]]] = {}
    for i, ep in enumerate(s.eval_prompts):
        pw, nw = s.targets_for(ep)
        if not pw or not nw:
            raise ValueError(f"steering set '{s.name}': eval prompt {ep.prompt!r} has no "
                             "positive or no negative targets")  # fmt: skip
        key = (tuple(pw), tuple(nw))
        if key not in cache:  # most prompts share the set's targets: tokenise once
            cache[key] = _target_pair(model, s, ep, pw, nw)
        pi, ni, _ = cache[key]
        pos[i, pi] = True
        neg[i, ni] = True
    shared = tuple(sorted(set().union(*(c[2] for c in cache.values()))))
    if shared and (s.name, shared) not in _WARNED_SHARED:
        _WARNED_SHARED.add((s.name, shared))
        log.warning("steering set '%s': targets share first tokens %s; ignoring them",
                    s.name, list(shared))  # fmt: skip
    return pos, neg


@torch.inference_mode()
def metric_grid(
    model: HookedTransformer,
    s: SteeringSet,
    hook: str | None,
    vector: Tensor | None,
    multipliers: Sequence[float],
    *,
    positions: Positions = "last",
    mode: str = "add",
    batch_size: int = 64,
) -> Tensor:
    """Behaviour metric [n_prompts, n_multipliers] (float64), one batched pass per chunk.

    Only each row's last position is read, so the blocks run on the whole batch and
    ln_final + the unembedding only on the last positions: with short prompts and a
    large vocabulary that is most of the cost of a full forward.
    """
    if hook is not None:
        check_hooks(model, [hook], "steering.hook")
    pos_mask, neg_mask = target_masks(model, s)
    seqs = tokenize(model, [e.prompt for e in s.eval_prompts])
    n, k = len(seqs), len(multipliers)
    pad = model.tokenizer.pad_token_id if model.tokenizer.pad_token_id is not None else 0
    out = torch.empty(n, k, dtype=torch.float64)
    mults = torch.tensor(list(multipliers), dtype=torch.float32)
    steered = hook is not None and vector is not None
    state: dict[str, Tensor] = {}

    def fn(act: Tensor, hook) -> Tensor:  # noqa: ARG001 - one hook for all batches
        mask = position_mask(act.shape[:2], positions, state["last"])
        return steer(act, vector, state["mult"], mask, mode)

    after_blocks = steered and not hook.startswith(("blocks.", "hook_embed", "hook_pos_embed"))
    # row r = (prompt r // k, multiplier r % k): a prompt's multipliers share a batch
    pi_all = torch.arange(n).repeat_interleave(k)
    pj_all = torch.arange(k).repeat(n)
    padded, lens_all = pad_right(seqs, pad)  # once; each batch slices its rows
    with model.hooks(fwd_hooks=[(hook, fn)] if steered else []):
        for b0 in range(0, n * k, batch_size):
            pi, pj = pi_all[b0 : b0 + batch_size], pj_all[b0 : b0 + batch_size]
            lens = lens_all[pi]
            tokens = padded[pi, : int(lens.max())]
            state["last"], state["mult"] = lens - 1, mults[pj]
            rows = torch.arange(len(pi))
            if after_blocks:  # a hook on ln_final / unembed sees the full sequence
                logits = model(tokens)[rows, lens - 1]
            else:
                resid = model(tokens, stop_at_layer=model.cfg.n_layers)
                logits = model.unembed(model.ln_final(resid[rows, lens - 1][:, None]))[:, 0]
            out[pi, pj] = behaviour_metric(logits, pos_mask[pi], neg_mask[pi])
    return out


@dataclass
class Steerability:
    hook: str
    multipliers: list[float]
    mean_metric: list[float]  # the curve: mean over prompts per multiplier
    std_metric: list[float]
    slope: float  # of the mean metric against the multiplier
    intercept: float
    wrong_way_fraction: float  # prompts whose own slope is < 0
    per_prompt_slope: list[float]
    mode: str = "add"
    positions: Any = "last"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def steerability(
    model: HookedTransformer,
    s: SteeringSet,
    hook: str,
    vector: Tensor,
    multipliers: Sequence[float] = DEFAULT_MULTIPLIERS,
    *,
    positions: Positions = "last",
    mode: str = "add",
    batch_size: int = 64,
) -> Steerability:
    if len(set(multipliers)) < 2:
        raise ValueError(f"steerability: multipliers {list(multipliers)}: need ≥ 2 distinct")
    grid = metric_grid(model, s, hook, vector, multipliers, positions=positions, mode=mode,
                       batch_size=batch_size)  # fmt: skip
    return steerability_from_grid(hook, multipliers, grid, mode, positions)


def steerability_from_grid(hook: str, multipliers: Sequence[float], grid: Tensor,
                           mode: str = "add", positions: Positions = "last") -> Steerability:  # fmt: skip
    """Summaries of a metric grid [n_prompts, n_multipliers]."""
    x = torch.tensor(list(multipliers), dtype=torch.float64)
    mean = grid.mean(0)
    b = float(slope(x, mean))
    per = slope(x, grid)
    return Steerability(
        hook, [float(m) for m in multipliers], mean.tolist(),
        grid.std(0, unbiased=False).tolist(), b, float(mean.mean() - b * x.mean()),
        float((per < 0).double().mean()), per.tolist(), mode,
        positions if isinstance(positions, str) else list(positions),
    )  # fmt: skip


@dataclass
class SideEffects:
    hook: str
    multiplier: float
    kl: float  # mean KL(clean ‖ steered) per predicted token, nats
    ce_clean: float
    ce_steered: float
    ce_rise: float
    n_predictions: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def side_effects(
    model: HookedTransformer,
    hook: str,
    vector: Tensor,
    multiplier: float,
    tokens: Tensor,
    *,
    positions: Positions = "all",
    mode: str = "add",
    batch_size: int = 16,
) -> SideEffects:
    """KL and CE rise on token windows [N, L] (BOS first), steering at `positions`."""
    check_hooks(model, [hook], "steering.hook")
    if tokens.ndim != 2 or tokens.shape[1] < 3:
        raise ValueError(f"tokens: expected LongTensor [n, seq ≥ 3], got {tuple(tokens.shape)}")
    kl = ce0 = ce1 = 0.0
    n = 0
    fwd = steering_hooks(hook, vector, multiplier, positions, mode)
    for b0 in range(0, len(tokens), batch_size):
        tok = tokens[b0 : b0 + batch_size]
        target = tok[:, 2:]
        clean = model(tok)[:, 1:-1]
        steered = model.run_with_hooks(tok, fwd_hooks=fwd)[:, 1:-1]
        kl += float(kl_divergence(clean, steered).sum())
        ce0 += float(ce_full(clean, target).sum())
        ce1 += float(ce_full(steered, target).sum())
        n += target.numel()
    return SideEffects(hook, float(multiplier), kl / n, ce0 / n, ce1 / n, (ce1 - ce0) / n, n)


@dataclass
class LayerSweep:
    kl_budget: float
    kl_multiplier: float
    steerability: dict[str, Steerability]
    side_effects: dict[str, SideEffects]
    best_hook: str
    within_budget: bool
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kl_budget": self.kl_budget,
            "kl_multiplier": self.kl_multiplier,
            "best_hook": self.best_hook,
            "within_budget": self.within_budget,
            "steerability": {h: s.to_dict() for h, s in self.steerability.items()},
            "side_effects": {h: s.to_dict() for h, s in self.side_effects.items()},
            **self.extra,
        }


def pick_best(slopes: dict[str, float], kls: dict[str, float], budget: float) -> tuple[str, bool]:
    """Highest slope with KL ≤ budget; else the lowest-KL hook (flagged False)."""
    ok = [h for h in slopes if kls[h] <= budget]
    if ok:
        return max(ok, key=lambda h: slopes[h]), True
    return min(kls, key=lambda h: kls[h]), False


def layer_sweep(
    model: HookedTransformer,
    s: SteeringSet,
    vectors: dict[str, Tensor],
    tokens: Tensor,
    *,
    multipliers: Sequence[float] = DEFAULT_MULTIPLIERS,
    kl_multiplier: float = 4.0,
    kl_budget: float = 0.5,
    positions: Positions = "last",
    side_positions: Positions = "all",
    mode: str = "add",
    batch_size: int = 64,
) -> LayerSweep:
    """Steerability and side effects at every hook with a vector; pick the best hook."""
    check_hooks(model, list(vectors), "steering.hooks")
    st = {h: steerability(model, s, h, v, multipliers, positions=positions, mode=mode,
                          batch_size=batch_size) for h, v in vectors.items()}  # fmt: skip
    se = {h: side_effects(model, h, v, kl_multiplier, tokens, positions=side_positions, mode=mode)
          for h, v in vectors.items()}  # fmt: skip
    best, ok = pick_best({h: x.slope for h, x in st.items()}, {h: x.kl for h, x in se.items()},
                         kl_budget)  # fmt: skip
    return LayerSweep(kl_budget, kl_multiplier, st, se, best, ok)
