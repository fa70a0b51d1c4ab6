"""TransformerLens hook names: which ones the activations stage can cache, their block
index and their width.

One place for these rules: the params check (`stages/config.py`) uses them before any
work, the activations stage (`stages/activations/writer.py`) again on the loaded model.
Light on purpose (no torch): every stage's params check imports it.
"""

from __future__ import annotations

import re

# Hook names of a standard decoder block that the activations stage can cache: one vector
# per token. Checked in params so a typo fails before any work; the stage re-checks
# against the loaded model's hook_dict.
BLOCK_HOOKS = {
    "hook_resid_pre",
    "hook_resid_mid",
    "hook_resid_post",
    "hook_attn_out",
    "hook_mlp_out",
    "ln1.hook_scale",
    "ln1.hook_normalized",
    "ln2.hook_scale",
    "ln2.hook_normalized",
    "mlp.hook_pre",
    "mlp.hook_post",
}
# Hooks of a block that exist but cannot be cached, and why (`hook_width` refuses the
# first two kinds on a loaded model with the same words).
PER_HEAD = "it has per-head shape; cache a residual / MLP / attention output hook"
PATTERN = "it is an attention pattern, not a per-token activation"
UNCACHEABLE = {
    **dict.fromkeys(("attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z",
                     "attn.hook_result"), PER_HEAD),
    **dict.fromkeys(("attn.hook_attn_scores", "attn.hook_pattern"), PATTERN),
    # TransformerLens calls these only when the model config asks for them (use_attn_in,
    # use_split_qkv_input, use_hook_mlp_in); the models here do not, so they never fire
    **dict.fromkeys(("hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input"),
                    "TransformerLens calls it only with use_attn_in / use_split_qkv_input, "
                    "which the models here do not set (and it has per-head shape)"),
    "hook_mlp_in": "TransformerLens calls it only with use_hook_mlp_in, which the models "
    "here do not set; cache hook_resid_mid (the same values)",
}  # fmt: skip
GLOBAL_HOOKS = {"hook_embed", "hook_pos_embed", "ln_final.hook_scale", "ln_final.hook_normalized"}
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")


def hook_layer(hook: str) -> int | None:
    """Block index of a TransformerLens hook name (None for embed / final-LN hooks)."""
    m = _HOOK_RE.match(hook)
    return int(m.group(1)) if m else None


def check_hook_name(hook: str, n_layers: int | None) -> str | None:
    """Return why `hook` is not a valid hook name for a model with n_layers, or None."""
    if hook in GLOBAL_HOOKS:
        return None
    m = _HOOK_RE.match(hook)
    if m and m.group(2) in UNCACHEABLE:
        return f"expected a hook with one vector per token: {UNCACHEABLE[m.group(2)]}"
    if not m or m.group(2) not in BLOCK_HOOKS:
        return "expected a TransformerLens hook name such as 'blocks.1.hook_resid_post'"
    if n_layers is not None and int(m.group(1)) >= n_layers:
        return f"expected a block index < n_layers = {n_layers}"
    return None


def hook_width(hook: str, d_model: int, d_mlp: int) -> int:
    """Width of a hook's activation per token: d_mlp inside the MLP, 1 for an LN scale,
    d_model otherwise. Raises ValueError for a hook with per-head shape or a pattern."""
    tail = hook.split(".")[-1]
    if tail in ("hook_pre", "hook_post") and ".mlp." in hook:
        return d_mlp
    if tail in ("hook_q", "hook_k", "hook_v", "hook_z", "hook_result"):
        raise ValueError(
            f"hook {hook!r} has per-head shape; cache a residual / MLP / attention output hook"
        )
    if tail in ("hook_attn_scores", "hook_pattern"):
        raise ValueError(f"hook {hook!r} is an attention pattern, not a per-token activation")
    if tail == "hook_scale":
        return 1
    return d_model
