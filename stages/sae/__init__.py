"""Sparse autoencoders: architectures, trainer, evaluation and SAELens-format IO.

Adding an architecture: one new file defining its `BaseSAE` subclass, its `SAEConfig`
subclass in `config.py` (which registers itself), and one import line in `registry.py`.

Typical use from a pipeline stage (what `flows/saes.py` does for one model)::

    from pathlib import Path

    from stages.activations import ActivationStore
    from stages.config import load_params
    from stages.models import load_model
    from stages.sae import evaluate_sae, save_sae, train_saes

    store = ActivationStore(Path("data/activations/toy-a"))
    model = load_model(Path("data/models/toy-a"))
    root, ckpt = Path("data/saes/toy-a"), Path("data/saes/toy-a.partial")
    # hook -> [SAEConfig]: the {hooks, saes} groups of saes.sweep.toy-a, each entry
    # validated by parse_sae_config (saes.eval / saes.checkpoint_every are not SAEs)
    plan = load_params().sae_plan("toy-a")
    for hook, cfgs in plan.items():
        results = train_saes(store.source(hook, "train"), cfgs, checkpoint_dir=ckpt / hook)
        for r in results:
            ev = evaluate_sae(r.sae, store.source(hook, "heldout"), model=model,
                              hook_name=hook, tokens=store.windows("heldout", 64))
            # <root>/<hook>/<name>/: the layout stages.sae.io.load_model_saes reads back
            save_sae(root / hook / r.name, r.sae, hook_name=hook, model_name="toy-a",
                     log_feature_density=ev.log10_feature_density, metrics=ev.metrics,
                     training_config=r.config)
"""

from __future__ import annotations

from stages.lazy import lazy_exports
from stages.sae.config import (  # noqa: F401  (re-exported: light, pydantic only)
    CONFIGS,
    BatchTopKConfig,
    GatedConfig,
    JumpReLUConfig,
    ReLUConfig,
    SAEConfig,
    TopKConfig,
    parse_sae_config,
)

# Everything but the configs is imported on first use (PEP 562), so that a stage which
# only validates SAE configs (every stage's params check) runs, and depends on, no SAE
# maths: see stages/sae/config.py and dvc.yaml.
_EXPORTS = {
    "base": "BaseSAE SAEOutput",
    "registry": "ARCHITECTURES build_sae sae_class",
    "data": "ActivationSource ArraySource SliceSource ZarrSource",
    "evaluate": "EvalResult evaluate_sae",
    "io": "load_pretrained_sae load_sae save_sae",
    "trainer": "TrainResult train_saes",
}
__getattr__, __dir__, __all__ = lazy_exports(
    __name__,
    _EXPORTS,
    ("CONFIGS", "BatchTopKConfig", "GatedConfig", "JumpReLUConfig", "ReLUConfig", "SAEConfig",
     "TopKConfig", "parse_sae_config"),
)  # fmt: skip
