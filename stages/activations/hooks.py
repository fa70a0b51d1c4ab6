"""Hook utilities on a loaded model: are these hooks the model's, and how far must the
forward pass run to reach them. (Hook names without a model: `stages/activations/hook_names.py`.)
"""

from __future__ import annotations

import difflib
from typing import TYPE_CHECKING

from stages.activations.hook_names import hook_layer

if TYPE_CHECKING:
    from transformer_lens import HookedTransformer


def stop_layer(model: HookedTransformer, hooks: list[str]) -> int | None:
    """The `stop_at_layer` that runs just far enough to reach every hook."""
    layers = [hook_layer(h) for h in hooks]
    if any(h.startswith("ln_final") for h in hooks):
        return None
    if any(layer is None for layer in layers):  # hook_embed / hook_pos_embed only
        return 0 if all(h in ("hook_embed", "hook_pos_embed") for h in hooks) else None
    # stop_at_layer = n_layers still skips ln_final and the unembedding
    return max(layers) + 1  # type: ignore[type-var]


def check_hooks(model: HookedTransformer, hooks: list[str], where: str) -> None:
    """Every hook is one of the model's; `where` names the list in the error (callers
    reading params pass 'params.yaml: <key>')."""
    for i, h in enumerate(hooks):
        if h not in model.hook_dict:
            near = difflib.get_close_matches(h, list(model.hook_dict), n=3, cutoff=0.6)
            raise ValueError(
                f"{where}[{i}] = {h!r}, expected a hook of this model"
                + (f" (did you mean {', '.join(near)}?)" if near else " (see model.hook_dict)")
            )
