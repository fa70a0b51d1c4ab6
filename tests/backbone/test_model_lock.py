"""`stages.models.exclusive`: one hooked forward pass at a time per model object.

A Dask worker with several threads shares one loaded model between its tasks. Without
the lock, two threads splicing different hooks into the same TransformerLens model fire
each other's hooks (measured: 198 of 400 forward passes wrong), which would put wrong
SAE metrics, or another shard's activations, into a stage's outputs."""

from __future__ import annotations

import threading

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from stages.models import exclusive

HOOK = "blocks.0.hook_resid_post"


def _model(seed: int) -> HookedTransformer:
    cfg = HookedTransformerConfig(n_layers=2, d_model=32, n_ctx=16, d_head=8, n_heads=4,
                                  d_vocab=50, act_fn="gelu", seed=seed)  # fmt: skip
    return HookedTransformer(cfg).eval()


def test_threads_sharing_a_model_get_their_own_hooks_only():
    model = _model(0)
    tok = torch.randint(0, 50, (8, 16), generator=torch.Generator().manual_seed(0))
    hooks = {"zero": lambda x, hook: x * 0, "double": lambda x, hook: x * 2}
    with torch.no_grad():
        ref = {k: model.run_with_hooks(tok, fwd_hooks=[(HOOK, f)]) for k, f in hooks.items()}
    wrong = dict.fromkeys(hooks, 0)

    def work(name: str) -> None:
        with torch.no_grad():
            for _ in range(100):
                with exclusive(model):
                    out = model.run_with_hooks(tok, fwd_hooks=[(HOOK, hooks[name])])
                wrong[name] += int(not torch.equal(out, ref[name]))

    threads = [threading.Thread(target=work, args=(k,)) for k in hooks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == {"zero": 0, "double": 0}


def test_one_lock_per_model_object():
    a, b = _model(0), _model(1)
    assert exclusive(a) is exclusive(a)
    assert exclusive(a) is not exclusive(b)
