"""Sparse autoencoders: architectures, trainer, evaluation and SAELens-format IO.

Adding an architecture = one new file defining a `BaseSAE` subclass (with its
`SAEConfig` subclass) + one line in `ARCHITECTURES` below.

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
            # <root>/<hook>/<name>/: the layout stages.alignment.load_saes reads back
            save_sae(root / hook / r.name, r.sae, hook_name=hook, model_name="toy-a",
                     log_feature_density=ev.log10_feature_density, metrics=ev.metrics,
                     training_config=r.config)
"""

from __future__ import annotations

from typing import Any

from stages.sae.base import BaseSAE, SAEOutput
from stages.sae.batchtopk import BatchTopKConfig, BatchTopKSAE
from stages.sae.config import SAEConfig
from stages.sae.gated import GatedConfig, GatedSAE
from stages.sae.jumprelu import JumpReLUConfig, JumpReLUSAE
from stages.sae.relu import ReLUConfig, ReLUSAE
from stages.sae.topk import TopKConfig, TopKSAE

ARCHITECTURES: dict[str, type[BaseSAE]] = {
    "relu": ReLUSAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "jumprelu": JumpReLUSAE,
    "gated": GatedSAE,
}


def sae_class(architecture: str) -> type[BaseSAE]:
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(
            f"unknown SAE architecture '{architecture}', expected one of {sorted(ARCHITECTURES)}"
        ) from None


def parse_sae_config(raw: dict[str, Any] | SAEConfig) -> SAEConfig:
    """Validate one SAE entry (e.g. from params.yaml) into its architecture's config."""
    if isinstance(raw, SAEConfig):
        return raw
    if "architecture" not in raw:
        raise ValueError(
            f"SAE config {raw!r}: missing key 'architecture', expected one of "
            f"{sorted(ARCHITECTURES)}"
        )
    return sae_class(raw["architecture"]).config_class.model_validate(raw)


def build_sae(cfg: SAEConfig | dict[str, Any]) -> BaseSAE:
    """Instantiate an (untrained, seeded) SAE from a config with d_in set."""
    cfg = parse_sae_config(cfg)
    return sae_class(cfg.architecture)(cfg)


# imported last: these modules use the registry above
from stages.sae.data import ActivationSource, ArraySource, SliceSource, ZarrSource  # noqa: E402
from stages.sae.evaluate import EvalResult, evaluate_sae  # noqa: E402
from stages.sae.io import load_pretrained_sae, load_sae, save_sae  # noqa: E402
from stages.sae.trainer import TrainResult, train_saes  # noqa: E402

__all__ = [
    "ARCHITECTURES",
    "ActivationSource",
    "ArraySource",
    "BaseSAE",
    "BatchTopKConfig",
    "EvalResult",
    "GatedConfig",
    "JumpReLUConfig",
    "ReLUConfig",
    "SAEConfig",
    "SAEOutput",
    "SliceSource",
    "TopKConfig",
    "TrainResult",
    "ZarrSource",
    "build_sae",
    "evaluate_sae",
    "load_pretrained_sae",
    "load_sae",
    "parse_sae_config",
    "sae_class",
    "save_sae",
    "train_saes",
]
