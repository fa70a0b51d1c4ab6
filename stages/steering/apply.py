"""Applying a vector through TransformerLens hooks: add, directional ablation, both.

- `add`:        x ← x + m·v at the chosen positions
- `ablate`:     x ← x − (x·v̂) v̂   (project the direction out; m is ignored)
- `ablate_add`: x ← x − (x·v̂) v̂ + m·v   (Arditi et al.: set the component to m·‖v‖)

Positions: "all" (every position but BOS), "last" (each row's last real token; pass
`last_index` for right-padded batches) or a list of indices. Position 0 (BOS) is never
steered: its residual stream is a huge attention sink in most models and changing it
changes everything downstream.

Usage, also during generation (the hooks stay on for every generated token)::

    with model.hooks(fwd_hooks=steering_hooks("blocks.1.hook_resid_post", v, 4.0)):
        text = model.generate("Tom", max_new_tokens=10, use_past_kv_cache=False)

`generate_steered` wraps exactly that. It turns the KV cache off so that "last" and
"all" mean the same thing at every step as in a single forward pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from stages.activations import check_hooks

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer

MODES = ("add", "ablate", "ablate_add")
Positions = str | Sequence[int]  # "all" | "last" | [indices]


def position_mask(shape: tuple[int, int], positions: Positions,
                  last_index: Tensor | None = None) -> Tensor:  # fmt: skip
    """Bool [B, L]: where to steer. BOS (position 0) is always False."""
    b, n = shape
    mask = torch.zeros(b, n, dtype=torch.bool)
    if positions == "all":
        mask[:, 1:] = True
    elif positions == "last":
        last = torch.full((b,), n - 1) if last_index is None else last_index.to(torch.long)
        mask[torch.arange(b), last] = True
        mask[:, 0] = False
    elif isinstance(positions, str):
        raise ValueError(f"positions = {positions!r}, expected 'all', 'last' or a list of indices")
    else:
        for p in positions:
            idx = int(p) + n if int(p) < 0 else int(p)
            if idx == 0:
                raise ValueError("positions: index 0 is the BOS token, which is never steered")
            if idx < n:  # during generation a later position may not exist yet
                mask[:, idx] = True
    return mask


def steer(act: Tensor, vector: Tensor, multiplier: float | Tensor, mask: Tensor,
          mode: str) -> Tensor:  # fmt: skip
    """The steering operation itself on act [B, L, d] (returns a new tensor).
    `multiplier` is a float or one per row (a [B] tensor: many multipliers, one batch)."""
    if mode not in MODES:
        raise ValueError(f"steering mode = {mode!r}, expected one of {MODES}")
    v = vector.to(act.dtype)
    m = mask[..., None].to(act.dtype)
    if mode in ("ablate", "ablate_add"):
        u = v / v.norm().clamp_min(1e-12)
        act = act - m * (act @ u)[..., None] * u
    if mode in ("add", "ablate_add"):
        mult = multiplier
        if isinstance(mult, Tensor):
            mult = mult.to(act.dtype)[: act.shape[0], None, None]
        act = act + m * (mult * v)
    return act


def steering_hook(vector: Tensor, multiplier: float | Tensor = 1.0, positions: Positions = "all",
                  mode: str = "add", last_index: Tensor | None = None) -> Callable:  # fmt: skip
    """A TransformerLens hook function steering its activation."""
    if mode not in MODES:
        raise ValueError(f"steering mode = {mode!r}, expected one of {MODES}")

    def hook(act: Tensor, hook) -> Tensor:  # noqa: ARG001 - TL's signature
        b, n = act.shape[:2]
        li = None if last_index is None else last_index[:b]
        return steer(act, vector, multiplier, position_mask((b, n), positions, li), mode)

    return hook


def steering_hooks(hook_name: str, vector: Tensor, multiplier: float | Tensor = 1.0,
                   positions: Positions = "all", mode: str = "add",
                   last_index: Tensor | None = None) -> list[tuple[str, Callable]]:  # fmt: skip
    """`fwd_hooks` list for `model.hooks(...)` / `run_with_hooks`."""
    return [(hook_name, steering_hook(vector, multiplier, positions, mode, last_index))]


@torch.no_grad()
def generate_steered(
    model: HookedTransformer,
    prompts: Sequence[str],
    hook_name: str,
    vector: Tensor,
    multiplier: float,
    *,
    positions: Positions = "all",
    mode: str = "add",
    max_new_tokens: int = 12,
    do_sample: bool = False,
    temperature: float = 0.7,
    seed: int = 0,
) -> list[str]:
    """Greedy (or seeded sampled) continuations with the steering hook on."""
    check_hooks(model, [hook_name], "steering.hook")
    out = []
    with model.hooks(fwd_hooks=steering_hooks(hook_name, vector, multiplier, positions, mode)):
        for i, p in enumerate(prompts):
            torch.manual_seed(seed * 1000 + i)
            room = model.cfg.n_ctx - model.to_tokens(p).shape[1]
            out.append(model.generate(
                p, max_new_tokens=max(0, min(max_new_tokens, room)), do_sample=do_sample,
                temperature=temperature, use_past_kv_cache=False, verbose=False,
                stop_at_eos=False))  # fmt: skip
    return out
