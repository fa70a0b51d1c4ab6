"""The SAE architectures by name: `ARCHITECTURES`, `sae_class`, `build_sae`.

Adding an architecture: a file defining its `BaseSAE` subclass (with `architecture` and
`config_class` set), its config class in `stages/sae/config.py`, and one import line
below. Nothing else branches on an architecture's name.
"""

from __future__ import annotations

from typing import Any

from stages.sae.base import BaseSAE
from stages.sae.batchtopk import BatchTopKSAE
from stages.sae.config import CONFIGS, SAEConfig, parse_sae_config
from stages.sae.gated import GatedSAE
from stages.sae.jumprelu import JumpReLUSAE
from stages.sae.relu import ReLUSAE
from stages.sae.topk import TopKSAE

ARCHITECTURES: dict[str, type[BaseSAE]] = {
    cls.architecture: cls for cls in (ReLUSAE, TopKSAE, BatchTopKSAE, JumpReLUSAE, GatedSAE)
}
if set(ARCHITECTURES) != set(CONFIGS):
    raise ImportError(
        f"stages/sae: SAE modules {sorted(ARCHITECTURES)} and configs {sorted(CONFIGS)} differ"
    )


def sae_class(architecture: str) -> type[BaseSAE]:
    try:
        return ARCHITECTURES[architecture]
    except KeyError:
        raise ValueError(
            f"unknown SAE architecture '{architecture}', expected one of {sorted(ARCHITECTURES)}"
        ) from None


def build_sae(cfg: SAEConfig | dict[str, Any]) -> BaseSAE:
    """Instantiate an (untrained, seeded) SAE from a config with d_in set."""
    cfg = parse_sae_config(cfg)
    return sae_class(cfg.architecture)(cfg)
